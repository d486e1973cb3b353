"""Chat template rendering: SmolLM2's template from its GGUF, equality with transformers'
apply_chat_template, HF template helpers and message validation."""

import os

import pytest

from kunjax.text.chat import TemplateError, render_chat
from kunjax.io.checkpoints.gguf import GGUFMetadata, open_gguf, smollm2_path

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Translate «café» to 日本語 🤗"}],
    [{"role": "user", "content": "  leading and trailing whitespace \n\n"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "{{ not a template }} {% raw %}"}],
]


@pytest.fixture(scope="module")
def template():
    path = smollm2_path()
    return GGUFMetadata(open_gguf(path), path).get("tokenizer.chat_template")


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_smollm2_template_renders_chatml(template):
    text = render_chat(template, [{"role": "user", "content": "Hello!"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    text = render_chat(template, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                       add_generation_prompt=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


@pytest.mark.parametrize("gen", [True, False])
def test_equals_transformers_apply_chat_template(template, hf_tokenizer, gen):
    assert hf_tokenizer.chat_template == template
    for conv in CONVERSATIONS:
        ours = render_chat(template, conv, add_generation_prompt=gen)
        theirs = hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs, conv


HELPERS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{% continue %}{% endif %}"
    "{% generation %}{{ m.role }}={{ m.content | tojson }}{% endgeneration %}\n"
    "  {% if loop.last %}[{{ m.content | length }}]{% endif %}\n"
    "{% endfor %}{% if tools %}{{ tools | tojson(indent=None) }}{% endif %}{{ eos_token }}")
HELPERS_MESSAGES = [{"role": "user", "content": "é \"q\""}, {"role": "tool", "content": "skip"},
                    {"role": "assistant", "content": "ok"}]


def test_hf_template_helpers(hf_tokenizer):
    """loopcontrols, {% generation %}, tojson keeping non-ASCII, trim_blocks/lstrip_blocks, extra kwargs."""
    out = render_chat(HELPERS_TEMPLATE, HELPERS_MESSAGES, bos_token="<|im_start|>", eos_token="<|im_end|>",
                      tools=[{"name": "f"}])
    assert out == '<|im_start|>user="é \\"q\\""assistant="ok"[2][{"name": "f"}]<|im_end|>'
    theirs = hf_tokenizer.apply_chat_template(HELPERS_MESSAGES, chat_template=HELPERS_TEMPLATE, tokenize=False,
                                              tools=[{"name": "f"}])
    assert out == theirs


def test_raise_exception_and_bad_templates():
    tmpl = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}x"
    assert render_chat(tmpl, [{"role": "user", "content": "a"}]) == "x"
    with pytest.raises(TemplateError, match="first message must be from the user"):
        render_chat(tmpl, [{"role": "assistant", "content": "a"}])
    with pytest.raises(TemplateError, match="does not compile"):
        render_chat("{% for %}", [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="failed to render|unsafe"):  # the sandbox refuses attribute escapes
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "a"}])


@pytest.mark.parametrize("messages, match", [
    ("hello", "messages must be a list"),
    ([], "must not be empty"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\].role must be one of system, user, assistant, tool"),
    ([{"content": "x"}], r"messages\[0\].role must be one of"),
    ([{"role": "user"}], r"messages\[0\].content is missing"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": 3}], r"messages\[1\].content must be a string"),
    ([{"role": "user", "content": None}], r"messages\[0\].content must be a string"),
])
def test_message_validation(template, messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(template, messages)


def test_rendered_prompt_tokenizes_to_chat_tokens(template):
    from kunjax.text.gguf_tokenizer import load_gguf_tokenizer

    tok = load_gguf_tokenizer(smollm2_path())
    ids = tok.encode(render_chat(template, [{"role": "user", "content": "Hello!"}]))
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2
    last_start = len(ids) - 1 - ids[::-1].index(1)
    assert tok.decode(ids[last_start:], skip_special_tokens=False) == "<|im_start|>assistant\n"
