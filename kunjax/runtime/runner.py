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
from kunjax.runtime.executables import EMBED, HEAD, LAYER, ExeKey, StepExecutables, keys_for
from sharding.transfer import put_tree

LayerParams = dict[str, jax.Array]


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose sampled tokens are not read yet."""

    tokens: jax.Array  # (R,) padded rows
    num_rows: int
    logits: Optional[jax.Array] = None  # (R, V) f32, kept on device (tests read it)

    def result(self) -> np.ndarray:
        """Blocks until the step's tokens are on the host."""
        out = np.asarray(self.tokens)[:self.num_rows]
        self.logits = None  # nobody reads a finished step's logits on device (the engine keeps its own)
        return out


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

    def run_head(self, h: jax.Array, dev: dict, shape: StepShape) -> tuple[jax.Array, jax.Array]:
        return self.exes.get(ExeKey(HEAD, shape.rows, shape.query))(
            self.head, h, dev["last_idx"], dev["temperature"], dev["top_k"], dev["top_p"], dev["seeds"],
            dev["counters"])

    def run(self, batch: dict[str, np.ndarray], shape: StepShape, num_rows: int) -> InFlight:
        """A whole step on a stage that holds everything (a serving instance)."""
        dev = self.put(batch)
        h = self.run_layers(self.run_embed(dev, shape), dev, shape)
        tokens, logits = self.run_head(h, dev, shape)
        return launched(tokens, num_rows, logits)

    def null_step(self, shape: StepShape) -> None:
        """Runs one step of `shape` on the null page only (pools keep their contents): used to warm
        a freshly compiled shape's first execution out of the request path."""
        from kunjax.control.batch import null_batch

        self.run(null_batch(shape), shape, 0).tokens.block_until_ready()


def launched(tokens: jax.Array, num_rows: int, logits: Optional[jax.Array] = None) -> InFlight:
    """Starts copying the sampled tokens to the host in the background."""
    try:
        tokens.copy_to_host_async()
    except Exception:  # not every array type supports it; result() syncs anyway
        pass
    return InFlight(tokens, num_rows, logits)


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
