"""Paged attention in pure JAX over KV-head-major page pools, plus the dense reference.

A layer's K (and V) pool is `(kv_heads, pages, page_size, head_dim)`: KV heads lead, so
  - gathering a row's pages yields `(kv_heads, rows, context, head_dim)` directly, already in the
    layout of the batched GEMMs of attention (batch dims kv head and row): no transpose of the
    gathered context, which was the largest cost of a decode step in the page-major layout;
  - tensor parallelism splits the leading axis, one contiguous block of heads per device;
  - one page of one head is a contiguous (page_size, head_dim) tile, and a page id means the same
    slots in every layer, so KV can be moved page by page between pools (kunjax.memory).

Every row of a step is a segment of one sequence: Q query tokens (a prefill chunk, or one decode
token) at known positions. Its context lives in the pages its block table lists; we gather them into
a contiguous (S = pages * page_size) context and apply a causal + length (+ sliding-window) mask.
Gathering is the portable formulation that works on CPU and GPU; the number of gathered pages is
bucketed per step so short contexts stay cheap.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked padding rows give a harmless uniform softmax, never NaN


def write_kv(pool: jnp.ndarray, new: jnp.ndarray, slots: jnp.ndarray) -> jnp.ndarray:
    """Scatters new K or V (R, Q, KV, hd) into pool (KV, P, page_size, hd) at flat slots (R, Q).

    Padding tokens point at slots of the reserved null page 0, which no request owns. The scatter
    indexes (page, offset) on the pool directly: scattering into a flattened view makes XLA copy the
    whole pool every step instead of updating the donated buffer in place.
    """
    ps = pool.shape[2]
    # One extra update of the null page's slot 0 keeps this a scatter of at least two rows. A
    # one-row scatter becomes a dynamic-update-slice, which XLA:CPU fuses into the attention's
    # gather that reads the pool next; the donated pool is then copied whole per layer per step.
    # tests/test_engine.py checks every compiled step shape for pool-sized copies.
    flat = jnp.concatenate([slots.reshape(-1), jnp.zeros((1,), slots.dtype)])
    values = new.reshape(-1, *new.shape[2:])  # (N, KV, hd)
    values = jnp.concatenate([values, jnp.zeros((1, *values.shape[1:]), values.dtype)])
    values = values.transpose(1, 0, 2)  # (KV, N+1, hd): small, this step's tokens only
    if pool.dtype == jnp.uint16:  # 2-byte float KV held as its bit pattern (kv_pools.storage_dtype)
        values = jax.lax.bitcast_convert_type(values, jnp.uint16)
    return pool.at[:, flat // ps, flat % ps].set(values.astype(pool.dtype))


def read_pages(pool: jnp.ndarray, block_tables: jnp.ndarray, dtype) -> jnp.ndarray:
    """The pages of each row as one contiguous context, (KV, R, Pb * page_size, hd), in `dtype`
    (bit-cast back from a u16 storage pool; the bitcast fuses into the gather, the pool itself is
    never converted)."""
    r, pb = block_tables.shape
    pages = pool[:, block_tables]  # (KV, R, Pb, ps, hd)
    if pool.dtype == jnp.uint16 and jnp.dtype(dtype).itemsize == 2:
        pages = jax.lax.bitcast_convert_type(pages, dtype)
    else:
        pages = pages.astype(dtype)
    return pages.reshape(pool.shape[0], r, pb * pool.shape[2], pool.shape[3])


def context_mask(positions, ctx_lens, num_keys: int, sliding_window: Optional[int]):
    """(R, Q, S) boolean mask: key j is visible to a query at position p iff j <= p, j < ctx_len."""
    kpos = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :]
    pos = positions[:, :, None]
    mask = (kpos <= pos) & (kpos < ctx_lens[:, None, None])
    if sliding_window is not None:
        mask &= pos - kpos < sliding_window
    return mask


def attend(q, k, v, mask, scale):
    """q (R, Q, H, hd); k, v (KV, R, S, hd) head-major; mask (R, Q, S) -> (R, Q, H, hd).

    Heads are GEMM batch dims (KV, R), the G = H / KV query heads of a KV head and the Q query
    tokens are the GEMM rows, so both products are plain batched GEMMs over the gathered context as
    it lies. The mask is an additive bias and the softmax is normalised after the PV product, so the
    one large array (the scores) is read and written as few times as possible."""
    r, nq, h, hd = q.shape
    kvh = k.shape[0]
    qt = q.reshape(r, nq, kvh, h // kvh, hd).transpose(2, 0, 3, 1, 4)  # (KV, R, G, Q, hd): small
    bias = jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[None, :, None]  # (1, R, 1, Q, S)
    scores = jnp.einsum("krgqd,krsd->krgqs", qt, k, preferred_element_type=jnp.float32) * scale + bias
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("krgqs,krsd->krgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
    return out.transpose(1, 3, 0, 2, 4).reshape(r, nq, h, hd).astype(q.dtype)


def paged_attention(q, k_pool, v_pool, block_tables, positions, ctx_lens, scale, sliding_window=None):
    """q (R, Q, H, hd); pools (KV, P, page_size, hd) already holding this step's K/V; block_tables
    (R, Pb); positions (R, Q); ctx_lens (R,)."""
    k = read_pages(k_pool, block_tables, q.dtype)
    v = read_pages(v_pool, block_tables, q.dtype)
    return attend(q, k, v, context_mask(positions, ctx_lens, k.shape[2], sliding_window), scale)


def dense_attention(q, k, v, positions, ctx_lens, scale, sliding_window=None):
    """Reference, written independently of `attend`: k, v already contiguous per row (R, S, KV, hd);
    every query head against its KV head's keys, a plain masked softmax."""
    h, kvh = q.shape[2], k.shape[2]
    kk = jnp.repeat(k, h // kvh, axis=2).astype(jnp.float32)  # (R, S, H, hd)
    vv = jnp.repeat(v, h // kvh, axis=2).astype(jnp.float32)
    scores = jnp.einsum("rqhd,rshd->rhqs", q.astype(jnp.float32), kk) * scale
    mask = context_mask(positions, ctx_lens, k.shape[1], sliding_window)
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, NEG_INF), axis=-1)
    return jnp.einsum("rhqs,rshd->rqhd", probs, vv).astype(q.dtype)
