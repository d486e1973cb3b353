"""What one step computes, and the padded shape it runs at (plain Python and numpy).

A step is a list of rows, each a segment of one request; it runs at a `StepShape` (rows R, query
tokens per row Q, gathered context pages Pb) taken from a small set of buckets, each of which is
compiled ahead of time. `build_batch` turns the rows into the padded host arrays every executable of
the step reads; padding rows and tokens point at the null page only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from kunjax.control.pages import NULL_PAGE, pages_for
from kunjax.control.request import Request


def pow2_bucket(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n (at least lo), capped at hi (hi itself need not be a power of 2)."""
    b = lo
    while b < n:
        b *= 2
    return min(b, hi) if n <= hi else n


def pow2_ladder(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


@dataclasses.dataclass
class Row:
    """A segment of one request computed in this step: tokens [start, start + n)."""

    request: Request
    start: int
    n: int

    @property
    def samples(self) -> bool:
        """Only a row that reaches the end of the known tokens produces a new token."""
        return self.start + self.n == self.request.num_tokens


def split_rows(rows: Sequence[Row], size: int) -> list[Row]:
    """Each row as consecutive rows of at most `size` tokens, in order (packed prefill). A later
    piece attends to the earlier ones of the same step: every layer writes the step's K/V into the
    pools before attending, and the causal mask follows positions. Only a request's last piece can
    sample, and applying the pieces in order leaves its computed count at the last one's end."""
    return [Row(r.request, s, min(size, r.start + r.n - s)) for r in rows for s in range(r.start, r.start + r.n, size)]


@dataclasses.dataclass
class ScheduledStep:
    rows: list[Row]
    prefill: bool


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    """The padded shape of a step: R rows x Q query tokens, Pb context pages gathered per row."""

    rows: int
    query: int
    pages: int

    @property
    def prefill(self) -> bool:
        return self.query > 1

    def covers(self, other: "StepShape") -> bool:
        """A step needing `other` can run padded to this shape."""
        return (self.prefill == other.prefill and self.rows >= other.rows and self.query >= other.query
                and self.pages >= other.pages)

    def cost(self) -> int:
        """Rough relative cost (tokens x context) to prefer the cheapest ready bucket."""
        return self.rows * self.query * (self.pages + 64)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The padded shapes a step can take. Few on purpose: each is a set of executables to compile.

    Decode steps bucket the gathered context (Pb pages, at least `min_context` tokens) because
    decode cost is dominated by reading KV. A prefill step takes one of two contexts: the pages of
    its query bucket (every row is a prompt's first chunk, the common case) or the longest context
    (a later chunk of a long prompt); a ladder between them would multiply the prefill shapes.
    """

    max_rows: int
    max_prefill_rows: int
    max_chunk: int  # max query tokens of a prefill row
    max_pages_per_seq: int
    page_size: int = 16
    min_chunk: int = 32
    min_context: int = 256

    def needed(self, rows: Sequence[Row], prefill: bool) -> StepShape:
        """The smallest bucket that holds these rows."""
        need_pages = max(pages_for(r.start + r.n, self.page_size) for r in rows)
        if prefill:
            q = pow2_bucket(max(r.n for r in rows), min(self.min_chunk, self.max_chunk), self.max_chunk)
            short = self._short_context(q)
            return StepShape(pow2_bucket(len(rows), 1, self.max_prefill_rows), q,
                             short if need_pages <= short else self.max_pages_per_seq)
        lo = min(pages_for(self.min_context, self.page_size), self.max_pages_per_seq)
        return StepShape(pow2_bucket(len(rows), 1, self.max_rows), 1,
                         pow2_bucket(need_pages, lo, self.max_pages_per_seq))

    def _short_context(self, q: int) -> int:
        return min(pages_for(q, self.page_size), self.max_pages_per_seq)

    def all_shapes(self) -> list[StepShape]:
        """Every shape the scheduler can produce, cheapest first."""
        shapes = set()
        lo = min(pages_for(self.min_context, self.page_size), self.max_pages_per_seq)
        for pb in pow2_ladder(lo, self.max_pages_per_seq):
            for r in pow2_ladder(1, self.max_rows):
                shapes.add(StepShape(r, 1, pb))
        for q in pow2_ladder(min(self.min_chunk, self.max_chunk), self.max_chunk):
            for r in pow2_ladder(1, self.max_prefill_rows):
                shapes.add(StepShape(r, q, self._short_context(q)))
                shapes.add(StepShape(r, q, self.max_pages_per_seq))
        return sorted(shapes, key=lambda s: (s.cost(), s))

    def first_shapes(self) -> list[StepShape]:
        """What an instance compiles before it serves: the covering shapes (every step can run), the
        smallest decode shape and the one-row prefill shapes of prompts up to 4 chunks of the smallest
        bucket (a lone short request, a chat turn, does not pay for the largest buckets while the
        rest compile in the background)."""
        lo = min(pages_for(self.min_context, self.page_size), self.max_pages_per_seq)
        small = [StepShape(1, 1, lo)]
        for q in pow2_ladder(min(self.min_chunk, self.max_chunk), min(4 * self.min_chunk, self.max_chunk)):
            small.append(StepShape(1, q, self._short_context(q)))  # a short prompt, e.g. a chat turn
        return self.covering_shapes() + [s for s in small if s not in self.covering_shapes()]

    def covering_shapes(self) -> list[StepShape]:
        """The shapes that between them cover every step (the largest decode and prefill shapes):
        what a server compiles before it answers; the rest can follow in the background."""
        top = [StepShape(self.max_rows, 1, self.max_pages_per_seq),
               StepShape(self.max_prefill_rows, self.max_chunk, self.max_pages_per_seq)]
        short = StepShape(self.max_prefill_rows, self.max_chunk, self._short_context(self.max_chunk))
        return top + ([short] if short not in top else [])


BATCH_FIELDS = ("tokens", "positions", "slots", "block_tables", "ctx_lens", "last_idx", "temperature", "top_k",
                "top_p", "seeds", "counters")


def null_batch(shape: StepShape) -> dict[str, np.ndarray]:
    """A step of this shape whose every token reads and writes the null page only."""
    R, Q, Pb = shape.rows, shape.query, shape.pages
    return {
        "tokens": np.zeros((R, Q), np.int32), "positions": np.zeros((R, Q), np.int32),
        "slots": np.full((R, Q), NULL_PAGE, np.int32), "block_tables": np.full((R, Pb), NULL_PAGE, np.int32),
        "ctx_lens": np.zeros((R,), np.int32), "last_idx": np.zeros((R,), np.int32),
        "temperature": np.zeros((R,), np.float32), "top_k": np.zeros((R,), np.int32),
        "top_p": np.ones((R,), np.float32), "seeds": np.zeros((R,), np.uint32),
        "counters": np.zeros((R,), np.int32),
    }


# What the head's penalty variant reads beyond the plain head's arrays, in its argument order: each
# row's tokens (prompt then output, -1 padded, as wide as the shape's gathered context), the prompt
# length, the penalties and min_p. Present in a batch only when one of its sampling rows asks for
# penalties, min_p or logprobs, so every other step runs (and transfers) exactly what it did before.
PENALTY_FIELDS = ("history", "prompt_lens", "repetition_penalty", "frequency_penalty", "presence_penalty", "min_p")


def add_penalty_arrays(b: dict, rows: Sequence[Row], shape: StepShape, page_size: int) -> None:
    R = shape.rows
    b["history"] = np.full((R, shape.pages * page_size), -1, np.int32)
    b["prompt_lens"] = np.zeros((R,), np.int32)
    b["repetition_penalty"] = np.ones((R,), np.float32)
    for f in ("frequency_penalty", "presence_penalty", "min_p"):
        b[f] = np.zeros((R,), np.float32)
    for i, row in enumerate(rows):
        if not row.samples:
            continue
        req, p = row.request, row.request.params
        toks = req.all_token_ids
        b["history"][i, :len(toks)] = toks
        b["prompt_lens"][i] = len(req.prompt_token_ids)
        for f in PENALTY_FIELDS[2:]:
            b[f][i] = getattr(p, f)


def build_batch(rows: Sequence[Row], shape: StepShape, page_size: int,
                page_tables: Optional[dict] = None) -> dict[str, np.ndarray]:
    """The padded host arrays of a step. `page_tables` overrides a request's own page list (a
    request's pages in another page space); by default `request.pages`."""
    b = null_batch(shape)
    if any(row.samples and row.request.params.needs_penalty_head for row in rows):
        add_penalty_arrays(b, rows, shape, page_size)
    ps = page_size
    for i, row in enumerate(rows):
        req = row.request
        pos = np.arange(row.start, row.start + row.n, dtype=np.int32)
        pages = np.asarray(page_tables[req.request_id] if page_tables else req.pages, np.int32)
        b["tokens"][i, :row.n] = req.all_token_ids[row.start:row.start + row.n]
        b["positions"][i, :row.n] = pos
        b["slots"][i, :row.n] = pages[pos // ps] * ps + pos % ps
        k = min(len(pages), shape.pages)
        b["block_tables"][i, :k] = pages[:k]
        b["ctx_lens"][i] = row.start + row.n
        b["last_idx"][i] = row.n - 1
        p = req.params
        b["temperature"][i] = p.temperature
        b["top_k"][i] = p.top_k
        b["top_p"][i] = p.top_p
        b["seeds"][i] = req.seed
        b["counters"][i] = len(req.output_token_ids)
    return b


def pick_shape(needed: StepShape, buckets: Buckets, ready: Callable[[StepShape], bool]) -> Optional[StepShape]:
    """The cheapest compiled shape that covers `needed` (`ready(shape)` says what is compiled), or
    None when none is: the step then waits for the compiler instead of compiling on the request
    path."""
    if ready(needed):
        return needed
    for shape in buckets.all_shapes():  # cheapest first
        if shape.covers(needed) and ready(shape):
            return shape
    return None
