"""The memory ledger: per device, what XLA holds, split by what it is for.

Every live array on a device (jax.live_arrays()) is attributed by identity to what the instance on
that device holds: the weights of each layer, the embedding, the head, the KV pools; whatever is
left is "other" (a step's batch arrays, arrays a caller keeps). Budget and activation reserve come
from the instance's sizing. On a GPU the allocator's bytes_in_use is reported beside the live sum.
Nothing here is a counter the code keeps: drop and restore are checked against these numbers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax

from kunjax.memory import measure


@dataclasses.dataclass
class DeviceLedger:
    device: str
    instance: int
    budget: Optional[int]  # None: the device reports no limit and none was given
    layers: dict[int, int]  # layer -> weight bytes held on this device
    embed: int
    head: int  # final norm + lm_head (+ the tied embedding when it is only here as the head)
    kv: int
    reserve: int
    other: int
    live: int  # every live array on the device
    bytes_in_use: Optional[int]  # the allocator's view (GPU)

    @property
    def weights(self) -> int:
        return sum(self.layers.values()) + self.embed + self.head

    @property
    def free(self) -> Optional[int]:
        return None if self.budget is None else self.budget - self.live - self.reserve

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        d.update(weights=self.weights, free=self.free, layers_held=sorted(self.layers))
        return d


def _shard_bytes(a: jax.Array) -> int:
    return math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize


def device_ledgers(engines) -> list[DeviceLedger]:
    """One ledger per local device of every instance (`engines`: kunjax.runtime.engine.LLMEngine)."""
    me = jax.process_index()
    owner: dict[int, tuple[str, object]] = {}  # id(array) -> (category, layer)
    for e in engines:
        st = e.stage
        for l, lp in st.layers.items():
            for a in jax.tree.leaves(lp):
                owner[id(a)] = ("layer", l)
        if st.embed is not None:
            owner[id(st.embed)] = ("embed", None)
        for a in jax.tree.leaves(st.head or {}):
            owner.setdefault(id(a), ("head", None))
        for k, v in st.pools.values():
            owner[id(k)] = owner[id(v)] = ("kv", None)
    out: dict = {}
    for i, e in enumerate(engines):
        for d in e.devices:
            if d.process_index == me:
                out[d] = DeviceLedger(str(d), i, e.budget, {l: 0 for l in e.stage.layers}, 0, 0, 0,
                                      e.reserve(), 0, 0, None)
    for a in jax.live_arrays():
        if a.is_deleted():
            continue
        kind, layer = owner.get(id(a), ("other", None))
        n = _shard_bytes(a)
        for d in a.sharding.addressable_devices:
            led = out.get(d)
            if led is None:
                continue
            led.live += n
            if kind == "layer":
                led.layers[layer] = led.layers.get(layer, 0) + n
            elif kind == "embed":
                led.embed += n
            elif kind == "head":
                led.head += n
            elif kind == "kv":
                led.kv += n
            else:
                led.other += n
    for d, led in out.items():
        st = measure.device_stats(d) or {}
        led.bytes_in_use = st.get("bytes_in_use")
    return list(out.values())
