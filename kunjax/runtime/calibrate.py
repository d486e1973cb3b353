"""Start-up calibration of the cost model (kunjax.control.cost_model) on the devices at hand.

For each compiled step shape of an instance, a null step (every token on the null page: the pools'
contents do not change) is timed from its host batch to its tokens on the host, three ways: every
layer, half of them (so the per-layer cost separates from the step's fixed cost), and every layer
without the head. The median of a few runs of each is a sample; `cost_model.fit` turns the samples
into coefficients. Bandwidths: a device-to-device move to a peer instance's mesh ("d2d") and a copy
on the same device ("local").
Nothing is compiled beyond what the instance already has, except the copy that times "local".
"""

from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence

import jax
import numpy as np

from kunjax.control.batch import StepShape, null_batch
from kunjax.control.cost_model import CostModel, StepSample, fit, shape_work
from kunjax.runtime.runner import Stage
from sharding.transfer import move


def _typical(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # the first run of an executable can pay for allocations
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return statistics.median(out)  # what a step typically takes here, as the served steps will


def _step_samples(stage: Stage, shape: StepShape, repeats: int) -> list[StepSample]:
    """Three timings of a null step at `shape`, each from the host batch to what the step hands
    back (as a served step runs: the batch put on the mesh, the tokens read back): every layer with
    the head, half the layers with the head (the per-layer cost apart from the fixed one), every
    layer without the head (the head's cost apart)."""
    batch = null_batch(shape)
    layers = stage.layer_ids
    kept = layers[:max(1, len(layers) // 2)]

    def run(on: Stage, head: bool):
        dev = on.put(batch)
        h = on.run_layers(on.run_embed(dev, shape), dev, shape)
        return np.asarray(on.run_head(h, dev, shape)[0]) if head else h

    full_s = _typical(lambda: run(stage, True), repeats)
    nohead_s = _typical(lambda: run(stage, False), repeats)
    half = Stage(stage.exes, {l: stage.layers[l] for l in kept}, {l: stage.pools[l] for l in kept},
                 stage.num_pages, stage.embed, stage.head)  # the first half, on the pools as they are now
    try:
        half_s = _typical(lambda: run(half, True), repeats)
    finally:
        stage.pools.update(half.pools)  # the layer calls donate the pools: keep the live ones
    work = shape_work(shape.rows, shape.query, shape.pages)
    return [StepSample(**work, layers=len(layers), seconds=full_s),
            StepSample(**work, layers=len(kept), seconds=half_s),
            StepSample(**work, layers=len(layers), seconds=nohead_s, head=False)]


def bandwidth(src: jax.sharding.NamedSharding, dst: Optional[jax.sharding.NamedSharding], nbytes: int,
              repeats: int = 3) -> float:
    """Bytes/s of moving `nbytes` from `src`'s devices to `dst`'s (or copying them on `src` when
    `dst` is None)."""
    x = jax.device_put(np.zeros((nbytes // 4,), np.float32), src)
    if dst is None:
        copy = jax.jit(lambda a: a + 0)
        seconds = _typical(lambda: copy(x), repeats)
    else:
        seconds = _typical(lambda: move(x, dst), repeats)
    return nbytes / seconds


def calibrate(engine, shapes: Optional[Sequence[StepShape]] = None,
              peer: Optional[jax.sharding.NamedSharding] = None, repeats: int = 3,
              transfer_bytes: int = 16 << 20) -> CostModel:
    """Times real steps of `engine` (an LLMEngine holding every layer) on its compiled `shapes`
    (default: all compiled ones) and fits the cost model; `peer`: a sharding on another instance's
    devices (e.g. its `stage.exes.rep`), for the device-to-device bandwidth."""
    stage = engine.stage
    shapes = [s for s in (shapes if shapes is not None else engine.buckets.all_shapes()) if stage.ready(s)]
    if not shapes:
        raise ValueError("calibrate: none of the shapes is compiled on this instance")
    samples = [s for shape in shapes for s in _step_samples(stage, shape, repeats)]
    rep = stage.exes.rep
    bw = {"local": bandwidth(rep, None, transfer_bytes, repeats)}
    if peer is not None:
        bw["d2d"] = bandwidth(rep, peer, transfer_bytes, repeats)
    return fit(samples, bw)
