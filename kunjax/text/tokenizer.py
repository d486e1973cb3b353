"""Tokenizers behind one small interface, and streaming detokenization.

Real checkpoints use the Hugging Face `tokenizers` library (tokenizer.json, or a BPE rebuilt from
GGUF metadata); the `tiny` model uses a byte-level tokenizer so it needs no files at all.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 is BOS, 257 is EOS. Used by the embedded `tiny` model."""

    BOS = 256
    EOS = 257

    def __init__(self, vocab_size: int = 384):
        self.vocab_size = vocab_size
        self.bos_token_id = self.BOS
        self.eos_token_ids = (self.EOS,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS] + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps a `tokenizers.Tokenizer` (from tokenizer.json or built from GGUF metadata)."""

    def __init__(self, tok, bos_token_id: Optional[int], eos_token_ids: Sequence[int], add_bos: bool = False):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos

    @property
    def backend(self):
        return self._tok

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: Sequence[int] = (), bos_token_id: Optional[int] = None):
        from tokenizers import Tokenizer as _Tok

        tok = _Tok.from_file(os.path.join(path, "tokenizer.json"))
        add_bos = False
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                tc = json.load(f)
            # tokenizer.json's post-processor already adds BOS where the model wants it; only an
            # explicit add_bos_token without a post-processor needs us to add it by hand.
            add_bos = bool(tc.get("add_bos_token", False)) and tok.post_processor is None
        return cls(tok, bos_token_id, eos_token_ids, add_bos=add_bos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (a few tokens of left context plus the new ones) rather than the whole
    sequence, and holds back output while it ends in an incomplete UTF-8 character (U+FFFD), so a
    stream never emits half of a multi-byte character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a stream, emit whatever is held back (even a replacement character)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
