"""KV exchange: moving the pages that hold data from one pool to another, device to device.

A page id names the same slots in every layer, so a request's KV of one layer is the pages its page
table lists in that layer's K and V pools. Moving it is: gather `chunk` pages on the source mesh,
transfer them to the destination mesh (sharding.transfer.move: device to device, nothing compiled),
scatter them into the destination pool (donated, updated in place) at the new ids. Only pages that
requests hold are moved; chunks are padded with the null page, so one compiled gather and one
compiled scatter per pool size serve every move. Each chunk is waited for before the next one, so
at most one chunk is in flight per device pair (the transient the drop plan budgets for).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from kunjax.control.pages import NULL_PAGE
from kunjax.control.transition import ExchangeStats
from kunjax.runtime.executables import GATHER, SCATTER, ExeKey
from kunjax.runtime.kv_pools import K, V
from kunjax.runtime.runner import Stage
from sharding.transfer import move, put

log = logging.getLogger(__name__)

# Tests inject failures here: called as FAULT_HOOK(event, info) before every chunk copy; may raise.
FAULT_HOOK: Optional[Callable[[str, dict], None]] = None


def page_bytes_per_device(stage: Stage, pool=None) -> int:
    """Bytes of one page of one pool (K or V) on one device of the stage's mesh (of `pool`, else of
    any pool the stage holds)."""
    pool = pool if pool is not None else next(iter(stage.pools.values()))[0]
    shard = pool.sharding.shard_shape(pool.shape)
    return int(np.prod(shard)) // shard[1] * pool.dtype.itemsize


def _chunks(ids: Sequence[int], chunk: int):
    """(ids padded to `chunk` with the null page, count of real ids) for each chunk of `ids`: every
    gather and scatter then runs at the one compiled chunk size."""
    for i in range(0, len(ids), chunk):
        n = min(chunk, len(ids) - i)
        padded = np.full((chunk,), NULL_PAGE, np.int32)
        padded[:n] = ids[i:i + n]
        yield padded, n


def _page_ops(stage: Stage, kind: str, chunk: int, pool_pages: int) -> tuple:
    """The compiled GATHER or SCATTER of `chunk` pages for the K and the V pool of `pool_pages` pages."""
    return tuple(stage.exes.get(ExeKey(kind, chunk, 0, 0, pool_pages, part)) for part in (K, V))


def copy_pages(src: Stage, src_pools: tuple, dst: Stage, dst_pools: tuple, src_ids: Sequence[int],
               dst_ids: Sequence[int], chunk: int, stats: ExchangeStats, event: str = "copy",
               info: Optional[dict] = None, lost: Optional[set] = None) -> tuple:
    """Copies pages src_ids of (k, v) `src_pools` into `dst_pools` at dst_ids; returns the new
    destination pools (the old ones were donated). With `lost` given, a chunk whose copy fails adds
    its destination ids there and the copy goes on with the next chunk (the caller fails the
    requests that hold them); without it, the failure propagates."""
    if len(src_ids) != len(dst_ids):
        raise ValueError("source and destination page lists differ in length")
    if not len(src_ids):
        return dst_pools
    t = time.perf_counter()
    gather_k, gather_v = _page_ops(src, GATHER, chunk, src_pools[0].shape[1])
    scatter_k, scatter_v = _page_ops(dst, SCATTER, chunk, dst_pools[0].shape[1])
    crossing = src.mesh != dst.mesh
    per_page = page_bytes_per_device(dst, dst_pools[0]) * dst.mesh.size
    k_dst, v_dst = dst_pools
    for (s, n), (d, _) in zip(_chunks(src_ids, chunk), _chunks(dst_ids, chunk)):
        try:
            if FAULT_HOOK is not None:
                FAULT_HOOK(event, {**(info or {}), "src_ids": s[:n].tolist(), "dst_ids": d[:n].tolist()})
            s_dev = put(s, src.exes.rep)
            d_dev = put(d, dst.exes.rep)
            k_pages, v_pages = gather_k(src_pools[0], s_dev), gather_v(src_pools[1], s_dev)
            if crossing:
                k_pages, v_pages = move(k_pages, dst.exes.kv_sh), move(v_pages, dst.exes.kv_sh)
            k_dst = scatter_k(k_dst, d_dev, k_pages)
            v_dst = scatter_v(v_dst, d_dev, v_pages)
            v_dst.block_until_ready()
        except Exception:
            if lost is None or k_dst.is_deleted() or v_dst.is_deleted():
                raise
            log.exception("%s: copying pages %s failed; the requests holding them fail", event, d[:n].tolist())
            lost.update(int(p) for p in d[:n])
            continue
        moved = 2 * n * per_page
        if crossing:
            stats.bytes_between_devices += moved
        else:
            stats.bytes_local += moved
        stats.bytes_padding += 2 * (chunk - n) * per_page
        stats.chunks += 1
    stats.seconds += time.perf_counter() - t
    return k_dst, v_dst


def new_pools(stage: Stage, num_pages: int, stats: ExchangeStats) -> tuple:
    """A fresh (k, v) pool pair of `num_pages` on the stage's mesh, timed and counted in `stats`."""
    t = time.perf_counter()
    pools = jax.block_until_ready(stage.exes.new_pools(num_pages))
    stats.allocate_seconds += time.perf_counter() - t
    stats.bytes_allocated += sum(p.nbytes for p in pools)
    return pools


def pages_out(src: Stage, pools: tuple, ids: Sequence[int], chunk: int, stats: ExchangeStats) -> list:
    """Gathers pages `ids` of (k, v) `pools` into chunk arrays on the same mesh: [(k, v, n), ...].
    The chunks hold only the pages that carry data, so the pool can be deleted before its
    replacement exists (a restore shrinking a group pool)."""
    t = time.perf_counter()
    gather_k, gather_v = _page_ops(src, GATHER, chunk, pools[0].shape[1])
    out = []
    for s, n in _chunks(ids, chunk):
        s_dev = put(s, src.exes.rep)
        out.append((gather_k(pools[0], s_dev), gather_v(pools[1], s_dev), n))
    jax.block_until_ready([c[:2] for c in out])
    stats.seconds += time.perf_counter() - t
    return out


def pages_in(dst: Stage, pools: tuple, chunks: list, ids: Sequence[int], chunk: int, stats: ExchangeStats,
             src_mesh=None) -> tuple:
    """Scatters chunks from `pages_out` (gathered on `src_mesh`, default dst's own) into (k, v)
    `pools` (donated) at `ids`; returns the pools. Chunks from another mesh move device to device
    first; the bytes are counted as crossing or local, the padding apart."""
    t = time.perf_counter()
    scatter_k, scatter_v = _page_ops(dst, SCATTER, chunk, pools[0].shape[1])
    crossing = src_mesh is not None and src_mesh != dst.mesh
    per_page = 2 * page_bytes_per_device(dst, pools[0]) * dst.mesh.size
    k_dst, v_dst = pools
    for (k_pages, v_pages, n), (d, _) in zip(chunks, _chunks(ids, chunk)):
        if FAULT_HOOK is not None:
            FAULT_HOOK("scatter", {"dst_ids": d[:n].tolist()})
        if crossing:
            k_pages, v_pages = move(k_pages, dst.exes.kv_sh), move(v_pages, dst.exes.kv_sh)
        d_dev = put(d, dst.exes.rep)
        k_dst = scatter_k(k_dst, d_dev, k_pages)
        v_dst = scatter_v(v_dst, d_dev, v_pages)
        if crossing:
            stats.bytes_between_devices += n * per_page
        else:
            stats.bytes_local += n * per_page
        stats.bytes_padding += (chunk - n) * per_page
        stats.chunks += 1
    v_dst.block_until_ready()
    stats.seconds += time.perf_counter() - t
    return k_dst, v_dst


def delete_arrays(tree) -> int:
    """Deletes every array of a pytree now (its device memory returns to the allocator); returns the
    bytes per device of the arrays it deleted (first device of each)."""
    freed, seen = 0, set()
    for a in jax.tree.leaves(tree):
        if id(a) in seen or a.is_deleted():
            continue
        seen.add(id(a))
        freed += int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
        a.delete()
    return freed
