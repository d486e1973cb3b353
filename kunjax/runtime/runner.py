"""Device side of one instance: the jitted step, shape buckets, and the KV pools it donates.

One scheduler iteration = one call of `step` = one executable from a small set of padded shapes:
rows R (power of two), query tokens per row Q (1 for decode, a power of two for prefill chunks) and
gathered context pages Pb (power of two, capped by the longest allowed sequence). The KV pools are
donated so XLA updates them in place, and the only host sync is reading back the sampled tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kunjax.runtime import compile_stats
from kunjax.model.config import ModelConfig
from kunjax.runtime.kv_pools import NULL_PAGE, pages_for
from kunjax.model.transformer import Params, embed, forward_layers, lm_logits
from kunjax.control.request import Request
from kunjax.model.sampling import sample


def _step(params: Params, kv, batch: dict, cfg: ModelConfig):
    h = embed(params, batch["tokens"])
    h, kv = forward_layers(params["layers"], kv, h, batch["positions"], batch["slots"], batch["block_tables"],
                           batch["ctx_lens"], cfg)
    rows = jnp.arange(h.shape[0])
    logits = lm_logits(params, h[rows, batch["last_idx"]], cfg)
    tokens = sample(logits, batch["temperature"], batch["top_k"], batch["top_p"], batch["seeds"],
                    batch["counters"])
    return kv, tokens, logits


step_fn = jax.jit(_step, static_argnames=("cfg",), donate_argnums=(1,))


def pow2_bucket(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n (at least lo), capped at hi (hi itself need not be a power of 2)."""
    b = lo
    while b < n:
        b *= 2
    return min(b, hi) if n <= hi else n


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


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The padded shapes a step can take. Few on purpose: each is one executable to compile.

    Decode steps bucket the gathered context (Pb pages, at least `min_context` tokens) because
    decode cost is dominated by reading KV; prefill steps always gather the longest context, since
    their cost is dominated by the chunk's matmuls and a Pb axis would multiply their shapes.
    """

    max_rows: int
    max_prefill_rows: int
    max_chunk: int  # max query tokens of a prefill row
    max_pages_per_seq: int
    page_size: int = 16
    min_chunk: int = 32
    min_context: int = 256

    def rows(self, n: int, prefill: bool) -> int:
        return pow2_bucket(n, 1, self.max_prefill_rows if prefill else self.max_rows)

    def query(self, n: int) -> int:
        """Query tokens of a prefill step: a chunk bucket, even for a 1-token chunk (a 1-token prompt,
        or the last token of a chunked one), so every prefill shape is one warm-up compiled."""
        return pow2_bucket(n, min(self.min_chunk, self.max_chunk), self.max_chunk)

    def pages(self, n: int, prefill: bool = False, q: Optional[int] = None) -> int:
        """Gathered context pages for a step whose rows need at most n pages. A prefill step takes
        one of two: the pages of its query bucket q (every row is a prompt's first chunk, the common
        case, whose context is the chunk itself), or the longest context (a later chunk of a long
        prompt). Two, not a power-of-two ladder, to keep the executables few; the short one saves
        the attention over (max_model_len - chunk) masked keys that dominated short prompts' TTFT."""
        if prefill:
            short = min(pages_for(q or self.max_chunk, self.page_size), self.max_pages_per_seq)
            return short if n <= short else self.max_pages_per_seq
        lo = min(pages_for(self.min_context, self.page_size), self.max_pages_per_seq)
        return pow2_bucket(n, lo, self.max_pages_per_seq)

    def all_shapes(self) -> list[tuple[int, int, int]]:
        """Every (R, Q, Pb) the scheduler can produce: what warm-up compiles."""
        def pow2s(lo, hi):
            out, b = [], lo
            while b < hi:
                out.append(b)
                b *= 2
            return out + [hi]

        shapes = []
        lo = min(pages_for(self.min_context, self.page_size), self.max_pages_per_seq)
        for pb in pow2s(lo, self.max_pages_per_seq):
            for r in pow2s(1, self.max_rows):
                shapes.append((r, 1, pb))
        for q in pow2s(min(self.min_chunk, self.max_chunk), self.max_chunk):
            for r in pow2s(1, self.max_prefill_rows):
                shapes.append((r, q, self.pages(0, prefill=True, q=q)))
                shapes.append((r, q, self.max_pages_per_seq))
        return sorted(set(shapes))


def null_batch(R: int, Q: int, Pb: int) -> dict[str, np.ndarray]:
    """A step of shape (R, Q, Pb) whose every token reads and writes the null page only."""
    return {
        "tokens": np.zeros((R, Q), np.int32), "positions": np.zeros((R, Q), np.int32),
        "slots": np.zeros((R, Q), np.int32), "block_tables": np.zeros((R, Pb), np.int32),
        "ctx_lens": np.zeros((R,), np.int32), "last_idx": np.zeros((R,), np.int32),
        "temperature": np.zeros((R,), np.float32), "top_k": np.zeros((R,), np.int32),
        "top_p": np.ones((R,), np.float32), "seeds": np.zeros((R,), np.uint32),
        "counters": np.zeros((R,), np.int32),
    }


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose sampled tokens are not read yet."""

    tokens: jax.Array  # (R,) padded rows
    num_rows: int


class ModelRunner:
    """Owns an instance's parameters and KV pools and runs one padded step at a time."""

    def __init__(self, cfg: ModelConfig, params: Params, kv: list, page_size: int, buckets: Buckets,
                 step: Optional[Any] = None):
        self.cfg = cfg
        # The jitted step; a mesh instance passes one with pinned shardings (sharding.step).
        self.step_fn = step or step_fn
        self.params = params
        self.kv = kv
        self.page_size = page_size
        self.buckets = buckets
        self.last_logits: Optional[jax.Array] = None

    def build_batch(self, rows: Sequence[Row], prefill: bool) -> dict[str, np.ndarray]:
        ps = self.page_size
        R = self.buckets.rows(len(rows), prefill)
        Q = self.buckets.query(max(r.n for r in rows)) if prefill else 1
        Pb = self.buckets.pages(max(pages_for(r.start + r.n, ps) for r in rows), prefill, Q)
        b = {
            "tokens": np.zeros((R, Q), np.int32),
            "positions": np.zeros((R, Q), np.int32),
            "slots": np.full((R, Q), NULL_PAGE * ps, np.int32),
            "block_tables": np.full((R, Pb), NULL_PAGE, np.int32),
            "ctx_lens": np.zeros((R,), np.int32),
            "last_idx": np.zeros((R,), np.int32),
            "temperature": np.zeros((R,), np.float32),
            "top_k": np.zeros((R,), np.int32),
            "top_p": np.ones((R,), np.float32),
            "seeds": np.zeros((R,), np.uint32),
            "counters": np.zeros((R,), np.int32),
        }
        for i, row in enumerate(rows):
            req = row.request
            ids = req.all_token_ids[row.start:row.start + row.n]
            pos = np.arange(row.start, row.start + row.n, dtype=np.int32)
            pages = np.asarray(req.pages, np.int32)
            b["tokens"][i, :row.n] = ids
            b["positions"][i, :row.n] = pos
            b["slots"][i, :row.n] = pages[pos // ps] * ps + pos % ps
            k = min(len(pages), Pb)
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

    def step(self, rows: Sequence[Row], prefill: bool) -> np.ndarray:
        """Runs the rows; returns the sampled token of each row (one host sync)."""
        return self.collect(self.dispatch(rows, prefill))

    def dispatch(self, rows: Sequence[Row], prefill: bool) -> "InFlight":
        """Enqueues the step on the device and returns at once (JAX async dispatch); the sampled
        tokens start copying to the host in the background."""
        return self.dispatch_batch(self.build_batch(rows, prefill), len(rows))

    def dispatch_batch(self, batch: dict[str, np.ndarray], num_rows: int) -> "InFlight":
        self.kv, tokens, self.last_logits = self.step_fn(self.params, self.kv, batch, cfg=self.cfg)
        try:
            tokens.copy_to_host_async()
        except Exception:  # not every array type supports it; collect() syncs anyway
            pass
        return InFlight(tokens, num_rows)

    @staticmethod
    def collect(inflight: "InFlight") -> np.ndarray:
        """Blocks until the step's tokens are on the host."""
        return np.asarray(inflight.tokens)[:inflight.num_rows]

    def warmup(self, shapes: Optional[Sequence[tuple[int, int, int]]] = None) -> int:
        """Compiles the step for every bucket shape (AOT through the jit cache). Returns compiles done."""
        before = compile_stats.compile_count()
        for R, Q, Pb in shapes or self.buckets.all_shapes():
            # Runs for real on the null page only (all slots point at page 0), so pools stay valid.
            self.kv, tokens, _ = self.step_fn(self.params, self.kv, null_batch(R, Q, Pb), cfg=self.cfg)
        jax.block_until_ready(self.kv)
        return compile_stats.compile_count() - before
