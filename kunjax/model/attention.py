"""Paged attention in pure JAX over KV-head-major page pools, plus the dense reference.

A layer's pools lead with the KV head and hold one page as a contiguous tile:

    K pool (kv_heads, pages, head_dim, page_size)   -- each page stored transposed
    V pool (kv_heads, pages, page_size, head_dim)

so that
  - gathering a row's pages yields K^T (kv_heads, rows, head_dim, context) and V (kv_heads, rows,
    context, head_dim) with one swap of two small axes at most, already in the layout of the batched
    GEMMs of attention (batch dims kv head and row): both products are plain "NN" GEMMs. On XLA:CPU
    the "NT" form (keys with head_dim minor) ran 3-5x slower in f32 (measured: 32 rows x 256 keys,
    3 kv heads: 2.2 ms vs 0.6 ms for Q K^T);
  - tensor parallelism splits the leading axis, one contiguous block of heads per device;
  - a page id means the same slots in every layer, so KV moves page by page between pools
    (kunjax.memory.exchange).

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


def write_kv(pool: jnp.ndarray, new: jnp.ndarray, slots: jnp.ndarray, transposed: bool = False) -> jnp.ndarray:
    """Scatters new K or V (R, Q, KV, hd) into its pool at flat slots (R, Q): a V pool (KV, P, ps, hd),
    or with `transposed` a K pool (KV, P, hd, ps).

    Padding tokens point at slots of the reserved null page 0, which no request owns. The scatter
    indexes (page, offset) on the pool directly: scattering into a flattened view makes XLA copy the
    whole pool every step instead of updating the donated buffer in place.
    """
    ps = pool.shape[3] if transposed else pool.shape[2]
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
    values = values.astype(pool.dtype)
    if transposed:
        return pool.at[:, flat // ps, :, flat % ps].set(values.transpose(1, 0, 2))  # (N+1, KV, hd)
    return pool.at[:, flat // ps, flat % ps].set(values)


def _as(pages, pool_dtype, dtype):
    if pool_dtype == jnp.uint16 and jnp.dtype(dtype).itemsize == 2:
        return jax.lax.bitcast_convert_type(pages, dtype)  # fuses into the gather; the pool is never converted
    return pages.astype(dtype)


def read_k(pool: jnp.ndarray, block_tables: jnp.ndarray, dtype) -> jnp.ndarray:
    """K^T of each row's pages, (KV, R, hd, Pb * page_size), in `dtype`."""
    kv, _, hd, ps = pool.shape
    r, pb = block_tables.shape
    pages = _as(pool[:, block_tables], pool.dtype, dtype)  # (KV, R, Pb, hd, ps)
    return pages.swapaxes(2, 3).reshape(kv, r, hd, pb * ps)


def read_v(pool: jnp.ndarray, block_tables: jnp.ndarray, dtype) -> jnp.ndarray:
    """V of each row's pages as one contiguous context, (KV, R, Pb * page_size, hd), in `dtype`."""
    kv, _, ps, hd = pool.shape
    r, pb = block_tables.shape
    return _as(pool[:, block_tables], pool.dtype, dtype).reshape(kv, r, pb * ps, hd)


def context_mask(positions, ctx_lens, num_keys: int, sliding_window: Optional[int]):
    """(R, Q, S) boolean mask: key j is visible to a query at position p iff j <= p, j < ctx_len."""
    kpos = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :]
    pos = positions[:, :, None]
    mask = (kpos <= pos) & (kpos < ctx_lens[:, None, None])
    if sliding_window is not None:
        mask &= pos - kpos < sliding_window
    return mask


def attend(q, k_t, v, mask, scale):
    """q (R, Q, H, hd); k_t (KV, R, hd, S) and v (KV, R, S, hd) head-major; mask (R, Q, S) ->
    (R, Q, H, hd).

    Heads are GEMM batch dims (KV, R); the G = H / KV query heads of a KV head and the Q query tokens
    are the GEMM rows, so both products are plain batched GEMMs over the gathered context as it lies.
    The mask is an additive bias and the softmax is normalised after the PV product, so the one large
    array (the scores) is read and written as few times as possible."""
    r, nq, h, hd = q.shape
    kvh, g, s = k_t.shape[0], h // k_t.shape[0], k_t.shape[3]
    # (KV, R, G*Q, hd): the query heads of a KV head and the query tokens form one GEMM row dim (a
    # 1-row-per-head product runs far slower on XLA:CPU than G*Q rows in one product).
    qt = q.reshape(r, nq, kvh, g, hd).transpose(2, 0, 3, 1, 4).reshape(kvh, r, g * nq, hd)
    bias = jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[None, :, None]  # (1, R, 1, Q, S)
    scores = jnp.einsum("krmd,krds->krms", qt, k_t, preferred_element_type=jnp.float32)
    scores = scores.reshape(kvh, r, g, nq, s) * scale + bias
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("krms,krsd->krmd", probs.reshape(kvh, r, g * nq, s).astype(v.dtype), v,
                     preferred_element_type=jnp.float32).reshape(kvh, r, g, nq, hd) / denom
    return out.transpose(1, 3, 0, 2, 4).reshape(r, nq, h, hd).astype(q.dtype)


# Pages of context one iteration of the attention loop reads per row: small blocks stay in cache
# (decode: 2 pages of 16 tokens; a prefill chunk's many query rows make larger blocks pay).
DECODE_BLOCK_PAGES = 2
PREFILL_BLOCK_PAGES = 8


def paged_attention(q, k_pool, v_pool, block_tables, positions, ctx_lens, scale, sliding_window=None):
    """q (R, Q, H, hd); K pool (KV, P, hd, ps) and V pool (KV, P, ps, hd) already holding this step's
    K/V; block_tables (R, Pb); positions (R, Q); ctx_lens (R,).

    Flash-style: a loop over blocks of each row's pages with an online softmax, so the gathered
    context never exists as a whole (materialising it cost 6x more for a 1024-token decode context on
    XLA:CPU, measured) and the loop stops after the last block any row needs: the trip count is
    ceil(max(ctx_lens) / block tokens), whatever the page bucket Pb. Within a block both products are
    batched GEMMs with batch dims (KV, R) and the G*Q query rows of a KV head as GEMM rows."""
    r, nq, h, hd = q.shape
    kvh, _, _, ps = k_pool.shape
    g = h // kvh
    pb = block_tables.shape[1]
    ch = min(DECODE_BLOCK_PAGES if nq == 1 else PREFILL_BLOCK_PAGES, pb)
    if pb % ch:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, ch - pb % ch)))  # null pages
    width = ch * ps
    qt = q.reshape(r, nq, kvh, g, hd).transpose(2, 0, 3, 1, 4).reshape(kvh, r, g * nq, hd)
    n_blocks = (jnp.max(ctx_lens) + width - 1) // width

    def block(i, carry):
        m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(block_tables, i * ch, ch, axis=1)  # (R, ch)
        k = _as(k_pool[:, pages], k_pool.dtype, q.dtype)  # (KV, R, ch, hd, ps)
        v = _as(v_pool[:, pages], v_pool.dtype, q.dtype).reshape(kvh, r, width, hd)
        s = jnp.einsum("krmd,krcdp->krmcp", qt, k, preferred_element_type=jnp.float32)
        s = s.reshape(kvh, r, g, nq, width) * scale
        kpos = i * width + jnp.arange(width, dtype=jnp.int32)
        mask = (kpos[None, None, :] <= positions[:, :, None]) & (kpos[None, None, :] < ctx_lens[:, None, None])
        if sliding_window is not None:
            mask &= positions[:, :, None] - kpos[None, None, :] < sliding_window
        s = jnp.where(mask[None, :, None], s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        a = jnp.exp(m - m_new)
        pv = jnp.einsum("krms,krsd->krmd", p.reshape(kvh, r, g * nq, width).astype(v.dtype), v,
                        preferred_element_type=jnp.float32).reshape(kvh, r, g, nq, hd)
        return m_new, l * a + jnp.sum(p, axis=-1), acc * a[..., None] + pv

    init = (jnp.full((kvh, r, g, nq), NEG_INF, jnp.float32), jnp.zeros((kvh, r, g, nq), jnp.float32),
            jnp.zeros((kvh, r, g, nq, hd), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, block, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # (KV, R, G, Q, hd); rows with no key stay finite
    return out.transpose(1, 3, 0, 2, 4).reshape(r, nq, h, hd).astype(q.dtype)


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
