"""Paged attention in pure JAX, plus the dense reference it is tested against.

Every row of a step is a segment of one sequence: Q query tokens (a prefill chunk, or one decode
token) at known positions. Its context lives in pages of the per-layer pool, listed by the row's
block table. We gather those pages into a contiguous (S = pages * page_size) context, then apply a
causal + length (+ optional sliding-window) mask. Gathering is the portable formulation that works on
CPU and GPU; the number of gathered pages is bucketed per step so short contexts stay cheap.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked padding rows give a harmless uniform softmax, never NaN


def write_kv(pool: jnp.ndarray, new: jnp.ndarray, slots: jnp.ndarray) -> jnp.ndarray:
    """Scatters new K or V (R, Q, KV, hd) into pool (P, page_size, KV, hd) at flat slots (R, Q).

    Padding tokens point at slots of the reserved null page 0, which no request owns. The scatter
    indexes (page, offset) on the 4-D pool directly: scattering into a flattened (P*page_size)
    view makes XLA copy the whole pool every step instead of updating the donated buffer in place.
    """
    ps = pool.shape[1]
    # One extra update of the null page's slot 0 keeps this a scatter of at least two rows. A
    # one-row scatter becomes a dynamic-update-slice, which XLA:CPU fuses into the attention's
    # gather that reads the pool next; the donated pool is then copied whole per layer per step
    # (seen for 1-row f32 decode: 10x slower). tests/test_engine.py checks every step shape.
    flat = jnp.concatenate([slots.reshape(-1), jnp.zeros((1,), slots.dtype)])
    values = new.reshape(-1, *pool.shape[2:])
    values = jnp.concatenate([values, jnp.zeros((1, *values.shape[1:]), values.dtype)])
    if pool.dtype == jnp.uint16:  # 2-byte float KV held as its bit pattern (kv_cache.storage_dtype)
        values = jax.lax.bitcast_convert_type(values, jnp.uint16)
    return pool.at[flat // ps, flat % ps].set(values.astype(pool.dtype))


def read_pages(pool: jnp.ndarray, block_tables: jnp.ndarray, dtype) -> jnp.ndarray:
    """Gathers the pages of each row, (R, Pb, page_size, KV, hd), as `dtype` (bit-cast back from a
    u16 storage pool; the bitcast fuses into the gather, the pool itself is never converted)."""
    pages = pool[block_tables]
    if pool.dtype == jnp.uint16 and jnp.dtype(dtype).itemsize == 2:
        return jax.lax.bitcast_convert_type(pages, dtype)
    return pages.astype(dtype)


def _attend(q, k, v, mask, scale):
    """q (R, Q, H, hd); k, v (R, S, KV, hd); mask (R, Q, S) -> (R, Q, H, hd).

    Heads are laid out as GEMM batch dimensions (R, KV) once, up front, so both products are plain
    batched GEMMs and the (R, KV, G, Q, S) scores are never transposed; the mask is an additive bias
    and the softmax is normalised after the PV product (as flash attention does), so the one large
    array is read and written as few times as possible. 3x faster on XLA:CPU than a per-einsum layout
    for a 512-token chunk (measured), same result to f32 rounding."""
    r, nq, h, hd = q.shape
    kvh = k.shape[2]
    qt = q.reshape(r, nq, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4)  # (R, KV, G, Q, hd)
    kt = k.transpose(0, 2, 1, 3)  # (R, KV, S, hd)
    vt = v.transpose(0, 2, 1, 3)
    bias = jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]  # (R, 1, 1, Q, S)
    scores = jnp.einsum("rkgqd,rksd->rkgqs", qt, kt, preferred_element_type=jnp.float32) * scale + bias
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("rkgqs,rksd->rkgqd", probs.astype(v.dtype), vt, preferred_element_type=jnp.float32) / denom
    return out.transpose(0, 3, 1, 2, 4).reshape(r, nq, h, hd).astype(q.dtype)


def _attend_decode_gemm(q, k, v, mask, scale):
    """One query token per row, bf16/f16: batched GEMMs with the heads grouped per KV head and the
    probabilities normalised before the PV product; on XLA:CPU this layout is the fastest measured
    for 2-byte decode (32 rows x 256 keys: 1.2 ms vs 1.7 ms for `_attend`, 2.0 ms elementwise)."""
    r, nq, h, hd = q.shape
    kvh = k.shape[2]
    qg = q.reshape(r, nq, kvh, h // kvh, hd)
    scores = jnp.einsum("rqkgd,rskd->rkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("rkgqs,rskd->rqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(r, nq, h, hd).astype(q.dtype)


def _attend_decode_f32(q, k, v, mask, scale):
    """One query token per row, f32: products and sums over the context as one fused elementwise
    reduction. For a single query XLA:CPU runs the batched-GEMM form above as many tiny GEMMs,
    4-5x slower (32 rows x 1024 keys: 22 ms vs 4.6 ms per layer, measured); for bf16 the GEMM form
    is as fast, so it stays there."""
    r, _, h, hd = q.shape
    kvh = k.shape[2]
    qg = q.reshape(r, 1, kvh, h // kvh, hd)
    scores = jnp.sum(qg * k[:, :, :, None, :], axis=-1) * scale  # (R, S, KV, G)
    scores = jnp.where(mask[:, 0, :, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.sum(probs[..., None] * v[:, :, :, None, :], axis=1)  # (R, KV, G, hd)
    return out.reshape(r, 1, h, hd)


def context_mask(positions, ctx_lens, num_keys: int, sliding_window: Optional[int]):
    """(R, Q, S) boolean mask: key j is visible to a query at position p iff j <= p, j < ctx_len."""
    kpos = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :]
    pos = positions[:, :, None]
    mask = (kpos <= pos) & (kpos < ctx_lens[:, None, None])
    if sliding_window is not None:
        mask &= pos - kpos < sliding_window
    return mask


def gather_context(pool, block_tables, dtype) -> jnp.ndarray:
    """The pages of each row's block table as one contiguous context, (R, Pb * page_size, KV, hd)."""
    r = block_tables.shape[0]
    return read_pages(pool, block_tables, dtype).reshape(r, -1, *pool.shape[2:])


def attend(q, k, v, positions, ctx_lens, scale, sliding_window=None):
    """q (R, Q, H, hd) over contiguous contexts k, v (R, S, KV, hd), causal + length (+ window) mask,
    in the formulation measured fastest for the step's kind and dtype."""
    mask = context_mask(positions, ctx_lens, k.shape[1], sliding_window)
    if q.shape[1] == 1:  # decode
        if q.dtype == jnp.float32:
            return _attend_decode_f32(q, k, v, mask, scale)
        return _attend_decode_gemm(q, k, v, mask, scale)
    return _attend(q, k, v, mask, scale)


def paged_attention(q, k_pool, v_pool, block_tables, positions, ctx_lens, scale, sliding_window=None):
    """q (R, Q, H, hd); pools (P, page_size, KV, hd) already holding this step's K/V; block_tables
    (R, Pb); positions (R, Q); ctx_lens (R,)."""
    k = gather_context(k_pool, block_tables, q.dtype)
    v = gather_context(v_pool, block_tables, q.dtype)
    return attend(q, k, v, positions, ctx_lens, scale, sliding_window)


def dense_attention(q, k, v, positions, ctx_lens, scale, sliding_window=None):
    """Reference: k, v already contiguous per row, (R, S, KV, hd)."""
    mask = context_mask(positions, ctx_lens, k.shape[1], sliding_window)
    return _attend(q, k, v, mask, scale)
