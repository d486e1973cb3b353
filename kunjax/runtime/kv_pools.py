"""KV pools on device: one K and one V array per layer, K `(kv_heads, pages, head_dim, page_size)`
and V `(kv_heads, pages, page_size, head_dim)`.

Per-layer pools let a layer's KV be freed, grown or shipped on its own (parameter dropping moves a
layer's KV to the pipeline stage that owns the layer). The layout is KV-head-major (see
kunjax.model.attention for why). Page ids are handed out by kunjax.control.pages; page 0 is the null
page that padding writes to.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from kunjax.model.config import ModelConfig


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype KV pools are held in: 2-byte floats (bf16, f16) as their u16 bit pattern. XLA's CPU
    backend normalises a bf16 scatter to f32, converting (copying) the whole pool per layer per step;
    on the bit pattern the per-step scatter updates the donated pool in place on every backend, and
    the gather bit-casts only the pages it reads (attention.read_pages). Same bytes, same values."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.uint16)
    return dtype


K, V = "k", "v"


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int, part: str) -> tuple[int, int, int, int]:
    """K pools hold each page transposed (head_dim, page_size); V pools (page_size, head_dim)."""
    if part == K:
        return (cfg.num_kv_heads, num_pages, cfg.head_dim, page_size)
    return (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)


def page_bytes(cfg: ModelConfig, page_size: int, dtype, num_layers: Optional[int] = None) -> int:
    """Bytes one page costs across `num_layers` layers (K and V; all layers by default)."""
    layers = cfg.num_layers if num_layers is None else num_layers
    return 2 * layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def allocate_pools(exes, num_pages: int, layers) -> dict:
    """Zeroed (K, V) pools for `layers` on the mesh of `exes` (kunjax.runtime.executables), created
    on device by a compiled constructor: {layer index: (k_pool, v_pool)}."""
    from kunjax.runtime.executables import ZEROS, ExeKey

    exes.compile([ExeKey(ZEROS, 0, 0, 0, num_pages, part) for part in (K, V)])
    return {l: exes.new_pools(num_pages) for l in layers}
