"""Device side of a step: the weights and KV pools one placement holds, and how a step runs on them.

A `Stage` is what one mesh holds of the model: a set of layers (a contiguous range), maybe the
embedding and maybe the LM head, with the KV pools of its layers. A serving instance is one stage
holding everything; after a parameter drop, a pipeline group is a chain of stages on its members'
meshes (kunjax.memory). Running a step on a stage is: put the batch on the mesh (one transfer),
embed, one compiled call per layer, head + sample; every call is asynchronous, the only host sync is
reading the sampled tokens. The KV pools are donated to each layer call and replaced by its outputs,
so XLA updates them in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from kunjax.control.batch import Buckets, StepShape
from kunjax.runtime.executables import (EMBED, HEAD, HEAD_X, HEAD_X_FIELDS, LAYER, ExeKey, StepExecutables,
                                        keys_for)
from sharding.transfer import put_tree

LayerParams = dict[str, jax.Array]


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose sampled tokens are not read yet."""

    tokens: jax.Array  # (R,) padded rows
    num_rows: int
    logits: Optional[jax.Array] = None  # (R, V) f32, kept on device (tests read it)
    logprobs: Optional[tuple] = None  # the penalty head's (chosen (R,), top values (R, K), top ids (R, K))

    def result(self) -> np.ndarray:
        """Blocks until the step's tokens are on the host."""
        out = np.asarray(self.tokens)[:self.num_rows]
        self.logits = None  # nobody reads a finished step's logits on device (the engine keeps its own)
        return out

    def host_logprobs(self) -> Optional[tuple]:
        """The step's logprobs on the host, rows trimmed (None: a plain-head step)."""
        if self.logprobs is None:
            return None
        return tuple(np.asarray(a)[:self.num_rows] for a in self.logprobs)


def host_logprobs(handles) -> Optional[tuple]:
    """The logprobs of a step run as several handles (micro-batches), concatenated in row order;
    None when none of them ran the penalty head (rows of plain handles get NaN)."""
    parts = [h.host_logprobs() for h in handles]
    if all(p is None for p in parts):
        return None
    k = next(p for p in parts if p is not None)[1].shape[1]
    filled = [p if p is not None else (np.full((h.num_rows,), np.nan, np.float32),
                                       np.full((h.num_rows, k), np.nan, np.float32),
                                       np.zeros((h.num_rows, k), np.int32)) for p, h in zip(parts, handles)]
    return tuple(np.concatenate([f[i] for f in filled]) for i in range(3))


class Stage:
    """Weights and KV pools held on one mesh. `layers` maps layer index -> its weights (the held
    range); `pools` maps the same indices -> (k_pool, v_pool) of `num_pages` pages each; `embed` and
    `head` (final norm + lm_head or the tied embedding) are present where this stage holds them."""

    def __init__(self, exes: StepExecutables, layers: dict[int, LayerParams], pools: dict[int, tuple],
                 num_pages: int, embed: Optional[jax.Array] = None, head: Optional[dict] = None):
        self.exes = exes
        self.layers = layers
        self.pools = pools
        self.num_pages = num_pages
        self.embed = embed
        self.head = head

    @property
    def mesh(self):
        return self.exes.mesh

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.layers)

    def keys(self, shape: StepShape, embed: Optional[bool] = None, head: Optional[bool] = None) -> list[ExeKey]:
        return keys_for(shape, self.num_pages, self.embed is not None if embed is None else embed,
                        self.head is not None if head is None else head)

    def ready(self, shape: StepShape) -> bool:
        return self.exes.all_ready(self.keys(shape))

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The step's batch arrays on this mesh, replicated: one transfer, read by every layer."""
        return put_tree(batch, self.exes.rep)

    def run_embed(self, dev: dict, shape: StepShape) -> jax.Array:
        return self.exes.get(ExeKey(EMBED, shape.rows, shape.query))(self.embed, dev["tokens"])

    def run_layers(self, h: jax.Array, dev: dict, shape: StepShape) -> jax.Array:
        layer = self.exes.get(ExeKey(LAYER, shape.rows, shape.query, shape.pages, self.num_pages))
        pos, slots, bt, cl = dev["positions"], dev["slots"], dev["block_tables"], dev["ctx_lens"]
        for l in self.layer_ids:
            k, v = self.pools[l]
            h, k, v = layer(self.layers[l], k, v, h, pos, slots, bt, cl)
            self.pools[l] = (k, v)
        return h

    def run_head(self, h: jax.Array, dev: dict, shape: StepShape) -> tuple:
        """(tokens, logits, logprobs or None): the penalty variant when the batch carries its
        arrays (a row asked for penalties, min_p or logprobs), else the plain head."""
        args = (self.head, h, dev["last_idx"], dev["temperature"], dev["top_k"], dev["top_p"], dev["seeds"],
                dev["counters"])
        if HEAD_X_FIELDS[0] not in dev:
            return self.exes.get(ExeKey(HEAD, shape.rows, shape.query))(*args) + (None,)
        tokens, logits, *lp = self.exes.get(ExeKey(HEAD_X, shape.rows, shape.query, shape.pages))(
            *args, *(dev[f] for f in HEAD_X_FIELDS))
        return tokens, logits, tuple(lp)

    def run(self, batch: dict[str, np.ndarray], shape: StepShape, num_rows: int) -> InFlight:
        """A whole step on a stage that holds everything (a serving instance)."""
        dev = self.put(batch)
        h = self.run_layers(self.run_embed(dev, shape), dev, shape)
        return launched(*self.run_head(h, dev, shape), num_rows=num_rows)

    def null_step(self, shape: StepShape) -> None:
        """Runs one step of `shape` on the null page only (pools keep their contents): used to warm
        a freshly compiled shape's first execution out of the request path."""
        from kunjax.control.batch import null_batch

        self.run(null_batch(shape), shape, 0).tokens.block_until_ready()


def launched(tokens: jax.Array, logits: Optional[jax.Array] = None, logprobs: Optional[tuple] = None, *,
             num_rows: int) -> InFlight:
    """Starts copying the sampled tokens (and logprobs) to the host in the background."""
    for a in (tokens,) + (logprobs or ()):
        try:
            a.copy_to_host_async()
        except Exception:  # not every array type supports it; result() syncs anyway
            pass
    return InFlight(tokens, num_rows, logits, logprobs)


def pick_shape(needed: StepShape, buckets: Buckets, ready) -> Optional[StepShape]:
    """The cheapest compiled shape that covers `needed` (`ready(shape)` says what is compiled), or
    None when none is: the step then waits for the compiler instead of compiling on the request
    path."""
    if ready(needed):
        return needed
    for shape in buckets.all_shapes():  # cheapest first
        if shape.covers(needed) and ready(shape):
            return shape
    return None
