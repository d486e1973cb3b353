"""Paged KV cache: per-layer page pools on device and the host-side page allocator.

Each layer owns its own K and V pool `(num_pages, page_size, kv_heads, head_dim)`, so a layer's KV
can later be freed, grown or shipped on its own. Page 0 is a null page that no request owns: padded
token slots write there, which keeps every step's shapes static.
"""

from __future__ import annotations

import collections
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from kunjax.model.config import ModelConfig

NULL_PAGE = 0


class OutOfPages(Exception):
    pass


class PageAllocator:
    """Free list of page ids 1..num_pages-1. Allocation failure is explicit, never a garbage page."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: Sequence[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} freed twice or never allocated")
            self._used.remove(p)
            self._free.append(p)


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def page_bytes(cfg: ModelConfig, page_size: int, dtype, num_layers: Optional[int] = None) -> int:
    """Bytes one page costs across `num_layers` layers (K and V)."""
    layers = cfg.num_layers if num_layers is None else num_layers
    return 2 * layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype KV pools are held in: 2-byte floats (bf16, f16) as their u16 bit pattern. XLA's CPU
    backend normalises a bf16 scatter to f32, converting (copying) the whole pool per layer per step;
    on the bit pattern the per-step scatter updates the donated pool in place on every backend, and
    the gather bit-casts only the pages it reads (attention.read_pages). Same bytes, same values."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.uint16)
    return dtype


def allocate_pools(cfg: ModelConfig, num_pages: int, page_size: int, dtype, layers: Sequence[int],
                   sharding: Optional[Any] = None) -> list[tuple[jax.Array, jax.Array]]:
    """Zeroed per-layer (K, V) pools, created directly on device (no host staging)."""
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, storage_dtype(dtype)), out_shardings=sharding)
    return [(make(), make()) for _ in layers]
