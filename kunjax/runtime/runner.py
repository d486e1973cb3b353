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

from kunjax.control.batch import StepShape, pick_shape  # noqa: F401  (pick_shape: engine.py imports it from here)
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

    def wait(self) -> None:
        """Blocks until the step's tokens are computed (a waiter thread calls it; releases the GIL)."""
        self.tokens.block_until_ready()

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

    def run_layers(self, h: jax.Array, dev: dict, shape: StepShape, layers=None) -> jax.Array:
        """Runs `layers` (default: every layer held) in order. The executable follows each layer's
        pool size: during a transition some pools already have the group's page count."""
        pos, slots, bt, cl = dev["positions"], dev["slots"], dev["block_tables"], dev["ctx_lens"]
        exes = {}
        for l in (self.layer_ids if layers is None else layers):
            k, v = self.pools[l]
            n = k.shape[1]
            layer = exes.get(n) or exes.setdefault(n, self.exes.get(ExeKey(LAYER, shape.rows, shape.query,
                                                                            shape.pages, n)))
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

    def restore_embed_head(self, embed_holder: "Stage", head_holder: "Stage") -> None:
        """Copies the embedding and the head back from the stages that kept them, where missing."""
        from sharding.transfer import move

        if self.embed is None:
            self.embed = move(embed_holder.embed, self.exes.embed_sh)
        if self.head is None:
            self.head = {n: (self.embed if n == "embed" else move(a, self.exes.head_sh[n]))
                         for n, a in head_holder.head.items()}

    def null_step(self, shape: StepShape) -> None:
        """Runs one step of `shape` on the null page only (pools keep their contents): used to warm
        a freshly compiled shape's first execution out of the request path."""
        from kunjax.control.batch import null_batch

        self.run(null_batch(shape), shape, 0).tokens.block_until_ready()


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive layers of a step that run on one stage. `page_offset` shifts the batch's page ids
    into that stage's page space (a member's pages live at offset + id in its group's pools while a
    drop is under way; 0 otherwise)."""

    stage: "Stage"
    layers: tuple[int, ...]
    page_offset: int = 0
    batch: str = ""  # which of the step's batches gives its page tables ("": the main one)


def offset_batch(batch: dict[str, np.ndarray], page_offset: int, page_size: int) -> dict[str, np.ndarray]:
    if not page_offset:
        return batch
    out = dict(batch)
    out["slots"] = batch["slots"] + np.int32(page_offset * page_size)
    out["block_tables"] = batch["block_tables"] + np.int32(page_offset)
    return out


def run_route(segments, embed_stage: "Stage", head_stage: "Stage", batch: dict[str, np.ndarray],
              shape: StepShape, num_rows: int, page_size: int, others: Optional[dict] = None) -> InFlight:
    """One step (or micro-batch) through a chain of stages: embed on `embed_stage`, each segment's
    layers on its stage (the hidden state moves device to device when the stage changes, the batch is
    put once per stage, batch and page offset), head + sample on `head_stage`. A pipeline group's
    stages, a member instance mid-drop and a group mid-restore are all such chains. `others` are
    extra batches (other page tables of the same rows) that segments may name."""
    from sharding.transfer import move

    devs: dict = {}

    def dev_for(stage, off, name=""):
        key = (id(stage), off, name)
        if key not in devs:
            devs[key] = stage.put(offset_batch(others[name] if name else batch, off, page_size))
        return devs[key]

    h = embed_stage.run_embed(dev_for(embed_stage, 0), shape)
    at = embed_stage
    for seg in segments:
        if seg.stage is not at:
            h = move(h, seg.stage.exes.rep)
            at = seg.stage
        h = seg.stage.run_layers(h, dev_for(seg.stage, seg.page_offset, seg.batch), shape, seg.layers)
    if head_stage is not at:
        h = move(h, head_stage.exes.rep)
    return launched(*head_stage.run_head(h, dev_for(head_stage, 0), shape), num_rows=num_rows)


def route_ready(segments, embed_stage: "Stage", head_stage: "Stage", shape: StepShape) -> bool:
    """Every executable a routed step of `shape` needs is compiled (layer executables at each
    segment's pool sizes)."""
    keys = [(embed_stage, ExeKey(EMBED, shape.rows, shape.query)), (head_stage, ExeKey(HEAD, shape.rows, shape.query)),
            (head_stage, ExeKey(HEAD_X, shape.rows, shape.query, shape.pages))]
    for seg in segments:
        for n in {seg.stage.pools[l][0].shape[1] for l in seg.layers}:
            keys.append((seg.stage, ExeKey(LAYER, shape.rows, shape.query, shape.pages, n)))
    return all(st.exes.is_ready(k) for st, k in keys)


def launched(tokens: jax.Array, logits: Optional[jax.Array] = None, logprobs: Optional[tuple] = None, *,
             num_rows: int) -> InFlight:
    """Starts copying the sampled tokens (and logprobs) to the host in the background."""
    for a in (tokens,) + (logprobs or ()):
        try:
            a.copy_to_host_async()
        except Exception:  # not every array type supports it; result() syncs anyway
            pass
    return InFlight(tokens, num_rows, logits, logprobs)
