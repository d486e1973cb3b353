"""The BPE tokenizer rebuilt from GGUF metadata: identical to transformers' GGUF tokenizer on SmolLM2,
lossless round trips, special tokens, pre-tokenizer variants, and streaming detokenization."""

import json
import os
import unicodedata

import pytest

from gguf_fixtures import toy_vocab
from kunjax.checkpoints.gguf import smollm2_path
from kunjax.gguf_tokenizer import build_bpe_tokenizer, load_gguf_tokenizer
from kunjax.tokenizer import IncrementalDetokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAREGPT = os.path.join(os.path.dirname(REPO_ROOT), "shared", "traces", "sharegpt_v3_filtered_500.json")
NUM_SHAREGPT = 200

EXTRA = [
    "", " ", "  ", "\n", "\n\n\n", "\t\t x", "a  b   c    d", "trailing spaces   ", "   leading", "line\r\nbreak",
    "0", "12", "123", "1234567890", "3.14159265358979", "-42e-7", "x1y22z333", "2024-11-25T18:17:03.9799600",
    "emoji 🤗🎉👩‍👩‍👧 flags 🇫🇷🇯🇵 and skin 👍🏽", "CJK 你好，世界。東京タワー 서울", "ünïcödé ñ ß Ω ∑ √ ∞ ≠ “quotes” — dash",
    "Ελληνικά Русский עברית العربية हिन्दी", "e\u0301 combining vs \u00e9 precomposed", "zero\u200bwidth",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><|im_end|>", "<|im_start|><|im_start|>",
    "text<|im_end|>text", "<repo_name>kunjax<file_sep>main.py", "<|im_start", "im_end|>", "< |im_end| >",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))", "{\"json\": [1, 2.5, null, true]}", "I'm you're we'll they'd",
    "CAPS LOCK SHOUTING", "mIxEd CaSe", "http://example.com/path?q=1&r=2#frag", "a" * 300, "🤗" * 20,
]


def corpus() -> list[str]:
    texts = list(EXTRA)
    if os.path.exists(SHAREGPT):
        with open(SHAREGPT) as f:
            data = json.load(f)
        texts += [c["conversations"][0]["value"] for c in data[:NUM_SHAREGPT]]
    else:  # the traces are present in CI; keep the test meaningful without them
        texts += [f"Prompt number {i}: explain topic {i * 7} in {i % 5 + 1} sentences." for i in range(50)]
    return texts


@pytest.fixture(scope="module")
def ours():
    return load_gguf_tokenizer(smollm2_path())


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoTokenizer

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_sharegpt_corpus_is_used():
    assert len(corpus()) >= len(EXTRA) + (NUM_SHAREGPT if os.path.exists(SHAREGPT) else 50)


def _whitespace_run_before_digit(text: str) -> bool:
    return any(text[i].isspace() and text[i + 1].isspace() and unicodedata.category(text[i + 2]).startswith("N")
               for i in range(len(text) - 2))


def test_encode_identical_to_transformers(ours, theirs):
    """Same ids as transformers' GGUF tokenizer, once its pre-tokenizer is llama.cpp's "smollm" one.

    transformers 5.x does not know the pre-tokenizer name "smollm" and falls back to the plain GPT-2
    byte-level split; llama.cpp (and SmolLM's own tokenizer.json) isolate digits first. The two only
    differ where a run of 2+ whitespace characters precedes a digit ("results:\n\n1." -> "\n\n" is
    one token for llama.cpp and for us, two for transformers), which the second half checks."""
    from tokenizers import Tokenizer, pre_tokenizers

    fixed = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    texts = corpus()
    mine = [e.ids for e in ours.backend.encode_batch(texts, add_special_tokens=False)]
    ref = [e.ids for e in fixed.encode_batch(texts, add_special_tokens=False)]
    unpatched = [e.ids for e in theirs.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    for text, ids, r, u in zip(texts, mine, ref, unpatched):
        assert ids == r, repr(text[:80])
        assert ids == u or _whitespace_run_before_digit(text), repr(text[:80])
    for text in EXTRA:  # the public entry point, with special-token handling as transformers does it
        assert ours.encode(text) == theirs.encode(text), repr(text)
    newline2 = ours.encode("\n\n")
    assert len(newline2) == 1 and ours.encode("results:\n\n1.")[2:4] == [newline2[0], ours.encode("1")[0]]


def test_decode_identical_and_lossless(ours, theirs):
    for text in corpus():
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text, repr(text[:80])
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), repr(text[:80])


def test_special_tokens(ours):
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == 1 and ours.eos_token_ids == (2,)
    assert not ours.add_bos  # tokenizer.ggml.add_bos_token is false for SmolLM2
    assert ours.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids) == "user\nhi"
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_digits_are_split_one_by_one(ours):
    # SmolLM's pre-tokenizer ("smollm") isolates every digit
    assert ours.encode("12345") == [ours.encode(d)[0] for d in "12345"]


@pytest.mark.parametrize("pre, pieces", [
    ("smollm", ["Hello", "Ġ", "1", "2", "3", "4", "Ġworld"]),
    ("gpt-2", ["Hello", "Ġ1234", "Ġworld"]),
    ("llama-bpe", ["Hello", "Ġ", "123", "4", "Ġworld"]),
    ("qwen2", ["Hello", "Ġ", "1", "2", "3", "4", "Ġworld"]),
])
def test_pre_tokenizer_variants(pre, pieces):
    tokens, merges, types = toy_vocab(320)
    tok = build_bpe_tokenizer(tokens, merges, types, pre)
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("Hello 1234 world")] == pieces
    text = "hello world, the end 123 🤗"
    assert tok.decode(tok.encode(text).ids) == text


def test_unknown_pre_tokenizer_and_model():
    tokens, merges, types = toy_vocab(320)
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'nope'"):
        build_bpe_tokenizer(tokens, merges, types, "nope")


def _stream(tok, ids, prompt=()):
    detok = IncrementalDetokenizer(tok, list(prompt))
    deltas = [detok.add([t]) for t in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", [
    "Emoji 🤗 then 🎉🎉 and a family 👩‍👩‍👧 done.",
    "中文字符：你好，世界！日本語のテキスト。한국어 텍스트.",
    "mixed ünïcödé ✓ 💡 ∑ and ascii",
    "🤗" * 12,
])
def test_streaming_never_emits_partial_utf8(ours, text):
    ids = ours.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 4  # byte-level pieces: multi-byte chars span tokens
    for prompt in ((), ours.encode("<|im_start|>assistant\n")):
        deltas = _stream(ours, ids, prompt)
        assert all("\ufffd" not in d for d in deltas), deltas
        assert "".join(deltas) == ours.decode(ids) == text
    # some tokens really are partial characters (otherwise this test would prove nothing)
    assert any("\ufffd" in ours.decode([t]) for t in ids)
