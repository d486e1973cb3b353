"""Swap preemption's device half: a request's KV pages copied to host memory and back.

The scheduler decides (kunjax.control.scheduler: `swap_out`, `_swap_in`, moves in `take_moves`);
the instance carries each move out at the start of the step it prepares, inside that step's logged
device operation, so a follower process of a multi-host cluster replays the same copies of its own
shards. Per layer, the request's pages are gathered by the compiled page gather of the exchange
(kunjax.memory.exchange.pages_out) and copied off the device:

- on a GPU/TPU with a `pinned_host` memory space, into pinned host memory (`device_put` with that
  memory kind: a DMA, the arrays stay jax arrays outside the device's budget);
- elsewhere (CPU), into numpy arrays, shard by shard, trimmed to the pages that hold data.

Swapping in is the reverse: the host copy goes back onto the mesh and the compiled page scatter
(`pages_in`) writes it into the donated pools at the request's new page ids. Bytes and seconds are
measured on the copies themselves and logged as one event per move; the bytes held now are summed
over the host arrays (`host_bytes`). The host pool's bound is the scheduler's `swap_capacity_pages`,
set from --swap_space_bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import jax
import numpy as np

from kunjax.control.events import EventLog
from kunjax.memory.exchange import ExchangeStats, delete_arrays, pages_in, pages_out
from kunjax.runtime.executables import GATHER, SCATTER, ExeKey
from kunjax.runtime.kv_pools import K, V
from kunjax.runtime.runner import Stage

log = logging.getLogger(__name__)

PINNED = "pinned_host"


def pinned_host_available(device: jax.Device) -> bool:
    """The device has a pinned host memory space jax can place arrays in (GPU/TPU, not CPU)."""
    if device.platform == "cpu":
        return False
    try:
        return any(m.kind == PINNED for m in device.addressable_memories())
    except Exception:  # older runtimes without memory spaces
        return False


@dataclasses.dataclass
class SwapCounters:
    swapped_out_bytes: int = 0
    swapped_in_bytes: int = 0
    swap_seconds: float = 0.0


class HostChunk:
    """One gathered chunk of one pool, off the device: a pinned-host jax array, or numpy shards."""

    def __init__(self, pages: jax.Array, n: int, pinned: bool):
        self.n = n
        self.shape, self.sharding = pages.shape, pages.sharding
        if pinned:
            self.pinned = jax.device_put(pages, pages.sharding.with_memory_kind(PINNED))
            self.pinned.block_until_ready()
            self.shards = None
        else:
            self.pinned = None
            self.shards = [(s.device, np.array(s.data)[:, :n]) for s in pages.addressable_shards]

    @property
    def nbytes(self) -> int:
        if self.pinned is not None:
            return sum(s.data.nbytes for s in self.pinned.addressable_shards)
        return sum(a.nbytes for _, a in self.shards)

    def to_device(self) -> jax.Array:
        if self.pinned is not None:
            return jax.device_put(self.pinned, self.sharding)
        arrays = []
        for dev, a in self.shards:
            full = np.zeros(a.shape[:1] + (self.shape[1],) + a.shape[2:], a.dtype)
            full[:, :self.n] = a
            arrays.append(jax.device_put(full, dev))
        return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)

    def free(self) -> None:
        if self.pinned is not None:
            self.pinned.delete()
        self.shards = None


class SwapSpace:
    """Host copies of swapped-out requests' KV, per request: {layer: [(k_chunk, v_chunk), ...]}."""

    chunk_pages = 16  # pages per compiled gather / scatter call

    def __init__(self, stage: Stage, events: EventLog, device: jax.Device):
        self.stage = stage
        self.events = events
        self.pinned = pinned_host_available(device)
        self.host: dict[str, dict[int, list[tuple[HostChunk, HostChunk]]]] = {}
        self.counters = SwapCounters()
        self.stage.exes.compile(self.keys())

    def keys(self) -> list[ExeKey]:
        """The page gather and scatter a swap needs on this instance's pools (compiled at start-up)."""
        return [ExeKey(kind, self.chunk_pages, 0, 0, self.stage.num_pages, part)
                for kind in (GATHER, SCATTER) for part in (K, V)]

    def apply(self, moves: list[dict]) -> None:
        """Carries out the scheduler's moves in order (before the step that follows them)."""
        for m in moves:
            if m["kind"] == "swap_out":
                self.swap_out(m["request_id"], m["pages"])
            elif m["kind"] == "swap_in":
                self.swap_in(m["request_id"], m["pages"])
            elif m["kind"] == "discard":
                self.discard(m["request_id"])
            else:
                raise ValueError(f"unknown swap move {m['kind']!r}")

    def swap_out(self, request_id: str, pages: list[int]) -> None:
        t = time.perf_counter()
        stats = ExchangeStats()
        held: dict[int, list] = {}
        for layer in self.stage.layer_ids:
            chunks = pages_out(self.stage, self.stage.pools[layer], pages, self.chunk_pages, stats)
            held[layer] = [(HostChunk(k, n, self.pinned), HostChunk(v, n, self.pinned)) for k, v, n in chunks]
            delete_arrays([c[:2] for c in chunks])
        self.host[request_id] = held
        nbytes = self._bytes(held)
        dt = time.perf_counter() - t
        self.counters.swapped_out_bytes += nbytes
        self.counters.swap_seconds += dt
        self.events.record("swap_out", request_id, bytes=nbytes, seconds=dt)
        log.info("swap out %s: %d pages, %.2f MiB to host in %.1f ms", request_id, len(pages), nbytes / 2**20, 1e3 * dt)

    def swap_in(self, request_id: str, pages: list[int]) -> None:
        held = self.host.pop(request_id, None)
        if held is None:  # a move replayed twice, or its swap out never ran: a bug
            raise RuntimeError(f"swap in of {request_id}: no host copy")
        t = time.perf_counter()
        stats = ExchangeStats()
        nbytes = self._bytes(held)
        for layer, chunks in held.items():
            dev = [(k.to_device(), v.to_device(), k.n) for k, v in chunks]
            self.stage.pools[layer] = pages_in(self.stage, self.stage.pools[layer], dev, pages, self.chunk_pages, stats)
            delete_arrays([c[:2] for c in dev])
            for k, v in chunks:
                k.free()
                v.free()
        dt = time.perf_counter() - t
        self.counters.swapped_in_bytes += nbytes
        self.counters.swap_seconds += dt
        self.events.record("swap_in", request_id, bytes=nbytes, seconds=dt)
        log.info("swap in %s: %d pages, %.2f MiB from host in %.1f ms", request_id, len(pages), nbytes / 2**20, 1e3 * dt)

    def discard(self, request_id: str) -> None:
        """Frees a request's host copy (cancelled while swapped out). Idempotent."""
        held = self.host.pop(request_id, None)
        if held is None:
            return
        for chunks in held.values():
            for k, v in chunks:
                k.free()
                v.free()
        self.events.record("swap_discard", request_id)

    @staticmethod
    def _bytes(held) -> int:
        return sum(k.nbytes + v.nbytes for chunks in held.values() for k, v in chunks)

    def host_bytes(self) -> int:
        """Bytes of host memory the swapped-out requests hold now, summed over the arrays."""
        return sum(self._bytes(h) for h in self.host.values())

    def status(self) -> dict:
        return {"swapped_out_bytes": self.counters.swapped_out_bytes, "swapped_in_bytes": self.counters.swapped_in_bytes,
                "swap_seconds": self.counters.swap_seconds, "host_swap_bytes": self.host_bytes()}


def host_page_bytes(page_bytes_all_devices: int, tp: int, local_devices: int) -> int:
    """Host bytes one page of every layer costs in this process (its shards of the page)."""
    return page_bytes_all_devices // tp * local_devices


def capacity_pages(swap_space_bytes: Optional[int], per_page: int) -> int:
    return 0 if not swap_space_bytes else int(swap_space_bytes // per_page)
