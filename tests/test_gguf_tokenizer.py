"""The BPE tokenizer rebuilt from GGUF metadata: identical to transformers' GGUF tokenizer on SmolLM2,
lossless round trips, special tokens, pre-tokenizer variants, and streaming detokenization."""

import functools
import json
import os
import unicodedata

import pytest

from gguf_fixtures import toy_vocab
from kunjax.io.checkpoints.gguf import smollm2_path
from kunjax.text.gguf_tokenizer import build_bpe_tokenizer, load_gguf_tokenizer, tokenizer_from_metadata
from kunjax.text.tokenizer import IncrementalDetokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = os.path.join(REPO_ROOT, "data", "traces")  # shipped in the repository (data/traces/README.md)

EXTRA = [
    "", " ", "  ", "\n", "\n\n\n", "\t\t x", "a  b   c    d", "trailing spaces   ", "   leading", "line\r\nbreak",
    "0", "12", "123", "1234567890", "3.14159265358979", "-42e-7", "x1y22z333", "2024-11-25T18:17:03.9799600",
    "emoji 🤗🎉👩‍👩‍👧 flags 🇫🇷🇯🇵 and skin 👍🏽", "CJK 你好，世界。東京タワー 서울", "ünïcödé ñ ß Ω ∑ √ ∞ ≠ “quotes” — dash",
    "Ελληνικά Русский עברית العربية हिन्दी", "e\u0301 combining vs \u00e9 precomposed", "zero\u200bwidth",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><|im_end|>", "<|im_start|><|im_start|>",
    "text<|im_end|>text", "<repo_name>kunjax<file_sep>main.py", "<|im_start", "im_end|>", "< |im_end| >",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))", "{\"json\": [1, 2.5, null, true]}", "I'm you're we'll they'd",
    "CAPS LOCK SHOUTING", "mIxEd CaSe", "http://example.com/path?q=1&r=2#frag", "a" * 300, "🤗" * 20,
    "tabs\t\t\tand  \n \n  mixed   \r\n\r\n  runs", " " * 17 + "indented", "results:\n\n1. one\n  2. two\n\n\n\t3",
    "ids 007 0x1F 1e10 1,000,000 ½ ² ٣ ௫ 四", "👩🏽‍💻 🧑‍🤝‍🧑 ❤️‍🔥 🏳️‍🌈 #️⃣ 🫠",
]


def sharegpt_files() -> list[str]:
    """The ShareGPT JSON files in data/traces (each a list of {"id", "conversations": [...]})."""
    if not os.path.isdir(TRACES):
        return []
    names = [f for f in os.listdir(TRACES) if f.startswith("sharegpt") and f.endswith(".json")]
    return sorted(os.path.join(TRACES, f) for f in names)


@functools.lru_cache(maxsize=1)
def sharegpt_prompts() -> tuple[str, ...]:
    """Every turn of every conversation in every ShareGPT file of the traces folder (3,478 texts, 1.7 MB)."""
    files = sharegpt_files()
    if not files:
        pytest.fail(f"no ShareGPT traces (sharegpt*.json) in {TRACES}: the tokenizer corpus needs the prompt "
                    f"files the repository ships there")
    texts = []
    for path in files:
        with open(path) as f:
            texts += [turn["value"] for conv in json.load(f) for turn in conv["conversations"]]
    return tuple(texts)


def corpus() -> list[str]:
    return list(EXTRA) + list(sharegpt_prompts())


@pytest.fixture(scope="module")
def ours():
    return load_gguf_tokenizer(smollm2_path())


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoTokenizer

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_sharegpt_corpus_is_used():
    """The corpus holds every ShareGPT prompt of the traces, plus whitespace runs, digits, emoji, specials."""
    names = {os.path.basename(f) for f in sharegpt_files()}
    assert {"sharegpt_v3_filtered_500.json", "sharegpt_sg90k_first_turn_sampled_2978.json"} <= names
    texts = corpus()
    prompts = sharegpt_prompts()
    assert len(prompts) >= 500 + 2978 and set(prompts) <= set(texts)
    assert any("  " in t and "\n\n" in t for t in EXTRA)  # whitespace runs
    assert any(t.isdigit() and len(t) > 3 for t in EXTRA)  # digit runs
    assert any(ord(c) >= 0x1F300 for t in EXTRA for c in t)  # emoji
    assert all(any(sp in t for t in EXTRA) for sp in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))


def _space_before_numeric(text: str) -> bool:
    """A whitespace character directly before a Unicode number (category N*, e.g. "\n\n1", " ½")."""
    return any(text[i].isspace() and unicodedata.category(text[i + 1]).startswith("N") for i in range(len(text) - 1))


def test_encode_identical_to_transformers(ours, theirs):
    """Same ids as transformers' GGUF tokenizer, once its pre-tokenizer is llama.cpp's "smollm" one.

    transformers 5.x does not know the pre-tokenizer name "smollm" and falls back to the plain GPT-2
    byte-level split; llama.cpp (regex "\\p{N}" first) and SmolLM's own tokenizer.json (Digits with
    individual_digits) isolate every numeric character first. The two can only differ where whitespace
    directly precedes a number: "results:\n\n1." -> "\n\n" is one token for llama.cpp and for us, two for
    transformers; " ½" is "Ġ" + "Â½" for us, "ĠÂ" + "½" for transformers. Everywhere else the ids must
    equal transformers' unpatched tokenizer too, which the second assertion checks."""
    from tokenizers import Tokenizer, pre_tokenizers

    fixed = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    texts = corpus()
    mine = [e.ids for e in ours.backend.encode_batch(texts, add_special_tokens=False)]
    ref = [e.ids for e in fixed.encode_batch(texts, add_special_tokens=False)]
    unpatched = [e.ids for e in theirs.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    same_as_unpatched = 0
    for text, ids, r, u in zip(texts, mine, ref, unpatched):
        assert ids == r, repr(text[:80])
        assert ids == u or _space_before_numeric(text), repr(text[:80])
        same_as_unpatched += ids == u
    assert same_as_unpatched > 0.9 * len(texts)  # the exception is rare in real prompts
    for text in EXTRA:  # the public entry point, with special-token handling as transformers does it
        expected = fixed.encode(text).ids if _space_before_numeric(text) else theirs.encode(text)
        assert ours.encode(text) == expected, repr(text)
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

    class Metadata(dict):  # the interface tokenizer_from_metadata reads (GGUFMetadata's get / path)
        path = "spm.gguf"

        def get(self, key, default=None):
            return dict.get(self, key, default)

    md = Metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                   "tokenizer.ggml.token_type": types})
    with pytest.raises(ValueError, match="spm.gguf: unsupported GGUF tokenizer model 'llama'"):
        tokenizer_from_metadata(md)
    md["tokenizer.ggml.model"] = "gpt2"  # byte-level BPE, but no merges
    with pytest.raises(ValueError, match="without tokenizer.ggml.merges"):
        tokenizer_from_metadata(md)
    md["tokenizer.ggml.merges"], md["tokenizer.ggml.pre"] = merges, "smollm"
    tok = tokenizer_from_metadata(md)
    assert tok.decode(tok.encode("hello world")) == "hello world"


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


def test_streaming_sharegpt_multibyte(ours):
    """Token-by-token streaming of real ShareGPT prompts with 3- and 4-byte characters (CJK, emoji...)."""
    texts = [t[:600] for t in sharegpt_prompts() if any(len(c.encode("utf-8")) >= 3 for c in t[:600])]
    texts = [t for t in texts if "\ufffd" not in t][:40]
    assert len(texts) >= 20
    partial_tokens = 0
    for text in texts:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        deltas = _stream(ours, ids)
        assert all("\ufffd" not in d for d in deltas), repr(text[:80])
        assert "".join(deltas) == text
        partial_tokens += sum("\ufffd" in ours.decode([t]) for t in ids)
    assert partial_tokens > 0


def test_streaming_one_byte_per_token(ours):
    """The worst case: every UTF-8 byte its own token (2-, 3- and 4-byte characters split at every byte)."""
    from gguf_fixtures import byte_alphabet

    alpha = byte_alphabet()
    vocab = ours.backend.get_vocab()
    text = "é ß — “q” 你好 東京 서울 🤗 👩‍👩‍👧 🇫🇷 ok"
    ids = [vocab[alpha[b]] for b in text.encode("utf-8")]
    assert len(ids) == len(text.encode("utf-8")) and ours.decode(ids) == text
    for prompt in ((), ours.encode("<|im_start|>assistant\n"), [vocab[alpha[0xF0]]]):  # even after a stray byte
        deltas = _stream(ours, ids, prompt)
        assert all("\ufffd" not in d for d in deltas), deltas
        assert "".join(deltas) == text
        assert sum(d == "" for d in deltas) >= len(text.encode("utf-8")) - len(text)  # held back mid-character
