"""Start-up calibration of the cost model (kunjax.control.cost_model) on the devices at hand.

For each compiled step shape of an instance, a null step (every token on the null page: the pools'
contents do not change) is timed in three parts: embedding + all the instance's layers, embedding +
half of them (so the per-layer cost separates from the step's fixed cost), and the head. The best of
a few runs of each is a sample; `cost_model.fit` turns the samples into coefficients. Bandwidths:
a device-to-device move to a peer instance's mesh ("d2d") and a copy on the same device ("local").
Nothing is compiled beyond what the instance already has, except the copy that times "local".
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import jax
import numpy as np

from kunjax.control.batch import StepShape, null_batch
from kunjax.control.cost_model import CostModel, StepSample, fit
from kunjax.runtime.runner import Stage
from sharding.transfer import move


def _best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # the first run of an executable can pay for allocations
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return min(out)


def _step_samples(stage: Stage, shape: StepShape, repeats: int) -> list[StepSample]:
    dev = stage.put(null_batch(shape))
    layers = stage.layer_ids
    full_s = _best(lambda: stage.run_layers(stage.run_embed(dev, shape), dev, shape), repeats)
    kept = layers[:max(1, len(layers) // 2)]  # a stage of the first half, on the pools as they are now
    half = Stage(stage.exes, {l: stage.layers[l] for l in kept}, {l: stage.pools[l] for l in kept},
                 stage.num_pages, stage.embed)
    try:
        half_s = _best(lambda: half.run_layers(half.run_embed(dev, shape), dev, shape), repeats)
    finally:
        stage.pools.update(half.pools)  # the layer calls donate the pools: keep the live ones
    h = stage.run_layers(stage.run_embed(dev, shape), dev, shape)
    head_s = _best(lambda: stage.run_head(h, dev, shape)[0], repeats)
    R, Q, Pb = shape.rows, shape.query, shape.pages
    prefill = shape.prefill
    work = dict(prefill_tokens=R * Q if prefill else 0, decode_rows=0 if prefill else R, context_pages=R * Pb)
    rows = R if prefill else 0
    return [StepSample(**work, layers=len(layers), seconds=full_s, head=False, prefill_rows=rows),
            StepSample(**work, layers=len(half.layers), seconds=half_s, head=False, prefill_rows=rows),
            StepSample(0, 0 if prefill else R, 0, 0, head_s, head=True, prefill_rows=rows)]


def bandwidth(src: jax.sharding.NamedSharding, dst: Optional[jax.sharding.NamedSharding], nbytes: int,
              repeats: int = 3) -> float:
    """Bytes/s of moving `nbytes` from `src`'s devices to `dst`'s (or copying them on `src` when
    `dst` is None)."""
    x = jax.device_put(np.zeros((nbytes // 4,), np.float32), src)
    if dst is None:
        copy = jax.jit(lambda a: a + 0)
        seconds = _best(lambda: copy(x), repeats)
    else:
        seconds = _best(lambda: move(x, dst), repeats)
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
