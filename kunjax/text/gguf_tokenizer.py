"""A `tokenizers` byte-level BPE rebuilt from a GGUF file's tokenizer metadata.

GGUF files carry no tokenizer.json. For byte-level BPE vocabularies (`tokenizer.ggml.model ==
"gpt2"`, used by SmolLM, Llama 3, Qwen2/3, GPT-2 ...) they store the vocabulary in the GPT-2 byte
alphabet, the merges ("a b" strings, best first), a type per token (1 normal, 3 control, 4
user-defined, ...), BOS/EOS ids, whether BOS is prepended, and the *name* of the pre-tokenizer
(`tokenizer.ggml.pre`). The name selects the split rules the vocabulary was trained with; we
rebuild the same pre-tokenizer the model's original tokenizer.json uses:

    smollm                      digits one by one, then the GPT-2 byte-level regex
    gpt-2 / default-like names  the GPT-2 byte-level regex
    llama-bpe / llama3 / ...    the Llama 3 split regex (digits in groups of up to 3), merges
                                skipped when a whole word is in the vocabulary (ignore_merges)
    qwen2 / deepseek-r1-qwen    NFC, then the Qwen2 split regex (single digits)

Control tokens become special added tokens (skipped by `decode(skip_special_tokens=True)`), user-
defined tokens plain added tokens; both are matched whole in the input text, like llama.cpp does.
An unknown tokenizer model or pre-tokenizer name raises ValueError rather than silently
tokenizing differently from the model's training.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from kunjax.text.tokenizer import HFTokenizer

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = "gpt2"
_SMOLLM = "smollm"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (split kind, ignore_merges, NFC normalizer)
PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    "smollm": (_SMOLLM, False, False),
    "gpt-2": (_GPT2, False, False),
    "gpt2": (_GPT2, False, False),
    "phi-2": (_GPT2, False, False),
    "llama-bpe": (_LLAMA3, True, False),
    "llama3": (_LLAMA3, True, False),
    "llama-v3": (_LLAMA3, True, False),
    "smaug-bpe": (_LLAMA3, True, False),
    "qwen2": (_QWEN2, False, True),
    "deepseek-r1-qwen": (_QWEN2, False, True),
}


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind == _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == _SMOLLM:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(kind), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_bpe_tokenizer(tokens: Sequence[str], merges: Sequence[str], token_types: Optional[Sequence[int]],
                        pre: str, source: str = "<gguf>"):
    """The `tokenizers.Tokenizer` for a GGUF byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{source}: unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
                         f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    kind, ignore_merges, nfc = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated spelling keeps its first id, like llama.cpp's lookup
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{source}: malformed BPE merge {m!r} in tokenizer.ggml.merges")
        pairs.append((parts[0], parts[1]))
    model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
    tok = Tokenizer(model)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(kind)
    tok.decoder = decoders.ByteLevel()
    types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * len(tokens)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{source}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens after adding "
                         f"special tokens, expected {len(tokens)} (duplicate spellings in tokenizer.ggml.tokens?)")
    return tok


def tokenizer_from_metadata(md: Any, eos_token_ids: Optional[Sequence[int]] = None) -> HFTokenizer:
    """`md` is a `kunjax.io.checkpoints.gguf.GGUFMetadata` (anything with `.get(key, default)` and `.path`)."""
    source = getattr(md, "path", "<gguf>")
    model = md.get("tokenizer.ggml.model", None)
    if model != "gpt2":
        raise ValueError(f"{source}: unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model); "
                         f"only byte-level BPE ('gpt2') is supported")
    tokens = md.get("tokenizer.ggml.tokens")
    merges = md.get("tokenizer.ggml.merges", None)
    if not merges:
        raise ValueError(f"{source}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    types = md.get("tokenizer.ggml.token_type", None)
    if types is not None and len(types) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    pre = md.get("tokenizer.ggml.pre", "gpt-2")
    tok = build_bpe_tokenizer(tokens, merges, types, pre, source)
    bos = md.get("tokenizer.ggml.bos_token_id", None)
    eos = md.get("tokenizer.ggml.eos_token_id", None)
    if eos_token_ids is None:
        eos_token_ids = (int(eos),) if eos is not None else ()
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    return HFTokenizer(tok, int(bos) if bos is not None else None, tuple(eos_token_ids), add_bos=add_bos)


def load_gguf_tokenizer(path: str) -> HFTokenizer:
    """The tokenizer of a GGUF file (reads only metadata)."""
    from kunjax.io.checkpoints.gguf import GGUFMetadata, end_of_turn_ids, open_gguf

    md = GGUFMetadata(open_gguf(path), path)
    tokens = md.get("tokenizer.ggml.tokens")
    eos = end_of_turn_ids(md, tokens, md.get("tokenizer.ggml.token_type", None) or [],
                          md.get("tokenizer.chat_template", None))
    return tokenizer_from_metadata(md, eos_token_ids=eos)
