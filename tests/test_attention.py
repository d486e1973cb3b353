"""Paged attention equals dense attention over the same context, for prefill chunks and decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kunjax.model.attention import dense_attention, paged_attention, write_kv


@pytest.mark.parametrize("q_len,window", [(1, None), (7, None), (16, None), (7, 9)])
def test_paged_equals_dense(q_len, window):
    rng = np.random.default_rng(0)
    R, H, KV, hd, ps, P = 3, 4, 2, 8, 4, 32
    ctx = np.array([5, 13, 22])  # total context per row after this step's tokens
    q_len_rows = np.minimum(q_len, ctx)
    k_pool = jnp.asarray(rng.standard_normal((KV, P, hd, ps)), jnp.float32)  # K pages stored transposed
    v_pool = jnp.asarray(rng.standard_normal((KV, P, ps, hd)), jnp.float32)
    # Scattered, non-contiguous page tables (page 0 is the null page).
    perm = rng.permutation(np.arange(1, P))
    pages_per_row = -(-ctx // ps)
    Pb = int(pages_per_row.max())
    tables = np.zeros((R, Pb), np.int32)
    off = 0
    for r in range(R):
        tables[r, :pages_per_row[r]] = perm[off:off + pages_per_row[r]]
        off += pages_per_row[r]
    Q = q_len
    positions = np.zeros((R, Q), np.int32)
    slots = np.zeros((R, Q), np.int32)
    for r in range(R):
        pos = np.arange(ctx[r] - q_len_rows[r], ctx[r])
        positions[r, :len(pos)] = pos
        slots[r, :len(pos)] = tables[r, pos // ps] * ps + pos % ps
    k_new = jnp.asarray(rng.standard_normal((R, Q, KV, hd)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((R, Q, KV, hd)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((R, Q, H, hd)), jnp.float32)
    k_pool2 = write_kv(k_pool, k_new, jnp.asarray(slots), transposed=True)
    v_pool2 = write_kv(v_pool, v_new, jnp.asarray(slots))
    out = paged_attention(q, k_pool2, v_pool2, jnp.asarray(tables), jnp.asarray(positions), jnp.asarray(ctx),
                          scale=hd ** -0.5, sliding_window=window)
    # Dense reference: materialise each row's context contiguously.
    S = Pb * ps
    k_dense = np.zeros((R, S, KV, hd), np.float32)
    v_dense = np.zeros((R, S, KV, hd), np.float32)
    kp, vp = np.asarray(k_pool2), np.asarray(v_pool2)
    for r in range(R):
        for j in range(ctx[r]):
            page, o = tables[r, j // ps], j % ps
            k_dense[r, j], v_dense[r, j] = kp[:, page, :, o], vp[:, page, o]
    ref = dense_attention(q, jnp.asarray(k_dense), jnp.asarray(v_dense), jnp.asarray(positions), jnp.asarray(ctx),
                          scale=hd ** -0.5, sliding_window=window)
    for r in range(R):
        n = q_len_rows[r]
        np.testing.assert_allclose(np.asarray(out)[r, :n], np.asarray(ref)[r, :n], atol=1e-5)
    # And an independent numpy check of one row's last query (softmax over visible keys).
    r, qi = 2, q_len_rows[2] - 1
    p = positions[r, qi]
    lo = 0 if window is None else p - window + 1
    keys = np.arange(max(lo, 0), p + 1)
    for h in range(H):
        g = h // (H // KV)
        s = k_dense[r, keys, g] @ np.asarray(q)[r, qi, h] * hd ** -0.5
        w = np.exp(s - s.max()); w /= w.sum()
        np.testing.assert_allclose(np.asarray(out)[r, qi, h], w @ v_dense[r, keys, g], atol=1e-5)


def test_bf16_pool_stored_as_bits_round_trips():
    """bf16 KV lives in u16 pools (kv_pools.storage_dtype); what attention reads back is the very bf16
    that was written, and paged attention over it equals dense attention over the bf16 values."""
    from kunjax.runtime.kv_pools import storage_dtype

    assert storage_dtype(jnp.bfloat16) == jnp.uint16 and storage_dtype(jnp.float32) == jnp.float32
    rng = np.random.default_rng(1)
    P, ps, KV, hd, H = 8, 4, 2, 8, 4
    pool = jnp.zeros((KV, P, ps, hd), jnp.uint16)
    k_new = jnp.asarray(rng.standard_normal((1, 6, KV, hd)), jnp.bfloat16)
    slots = jnp.asarray([[3 * ps + i for i in range(4)] + [5 * ps, 5 * ps + 1]], jnp.int32)
    pool = write_kv(pool, k_new, slots)
    k_pool = write_kv(jnp.zeros((KV, P, hd, ps), jnp.uint16), k_new, slots, transposed=True)
    assert pool.dtype == jnp.uint16 and k_pool.dtype == jnp.uint16
    back = jax.lax.bitcast_convert_type(pool, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(back[:, 3].transpose(1, 0, 2), np.float32),
                                  np.asarray(k_new[0, :4], np.float32))
    np.testing.assert_array_equal(np.asarray(back[:, 5, :2].transpose(1, 0, 2), np.float32),
                                  np.asarray(k_new[0, 4:], np.float32))
    back_k = jax.lax.bitcast_convert_type(k_pool, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(back_k[:, 3].transpose(2, 0, 1), np.float32),
                                  np.asarray(k_new[0, :4], np.float32))
    q = jnp.asarray(rng.standard_normal((1, 6, H, hd)), jnp.bfloat16)
    positions = jnp.arange(6, dtype=jnp.int32)[None]
    ctx = jnp.asarray([6], jnp.int32)
    out = paged_attention(q, k_pool, pool, jnp.asarray([[3, 5]], jnp.int32), positions, ctx, scale=hd ** -0.5)
    ref = dense_attention(q, k_new, k_new, positions, ctx, scale=hd ** -0.5)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


@pytest.mark.parametrize("transposed", [False, True], ids=["v", "k"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kv_write_updates_donated_pool_in_place(dtype, transposed):
    """The compiled KV write must not copy or convert the pool (a full-pool copy per layer per step is
    what XLA's CPU backend did for a bf16 scatter): no instruction other than the in-place
    scatter / dynamic-update-slice produces a pool-shaped array."""
    import re

    from kunjax.runtime.kv_pools import storage_dtype

    shape = (2, 512, 64, 16) if transposed else (2, 512, 16, 64)
    pool = jnp.zeros(shape, storage_dtype(dtype))
    new = jnp.ones((4, 1, 2, 64), dtype)
    slots = jnp.asarray([[17], [40], [99], [1000]], jnp.int32)
    hlo = jax.jit(lambda p, n, s: write_kv(p, n, s, transposed), donate_argnums=(0,)).lower(
        pool, new, slots).compile().as_text()
    dims = ",".join(map(str, shape))
    ops = [m.group(1) for m in re.finditer(rf"= \w+\[{dims}\]\{{[^}}]*\}} ([\w-]+)\(", hlo)]
    assert ops, hlo
    assert not [op for op in ops if op not in ("parameter", "scatter", "dynamic-update-slice", "fusion", "tuple",
                                              "bitcast")], ops
    assert "copy" not in ops and "convert" not in ops


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_decode_equals_dense_reference(dtype, atol):
    """Decode (one query per row) over scattered pages of a u16/f32 pool agrees with the independent
    dense reference over the same keys (bf16: to bf16 rounding of the probabilities)."""
    from kunjax.model.attention import read_k, read_v
    from kunjax.runtime.kv_pools import storage_dtype

    rng = np.random.default_rng(3)
    R, H, KV, hd, ps, P = 4, 6, 2, 16, 4, 40
    ctx = np.array([1, 9, 16, 30])
    k_pool = jnp.asarray(rng.standard_normal((KV, P, hd, ps)), dtype)
    v_pool = jnp.asarray(rng.standard_normal((KV, P, ps, hd)), dtype)
    if storage_dtype(dtype) != dtype:
        k_pool, v_pool = (jax.lax.bitcast_convert_type(p, storage_dtype(dtype)) for p in (k_pool, v_pool))
    tables = jnp.asarray(rng.permutation(np.arange(1, P))[:R * 8].reshape(R, 8), jnp.int32)
    q = jnp.asarray(rng.standard_normal((R, 1, H, hd)), dtype)
    positions = jnp.asarray(ctx[:, None] - 1, jnp.int32)
    ctx_lens = jnp.asarray(ctx, jnp.int32)
    got = paged_attention(q, k_pool, v_pool, tables, positions, ctx_lens, scale=hd ** -0.5)
    k = read_k(k_pool, tables, dtype).transpose(1, 3, 0, 2)  # (R, S, KV, hd)
    v = read_v(v_pool, tables, dtype).transpose(1, 2, 0, 3)
    want = dense_attention(q, k, v, positions, ctx_lens, scale=hd ** -0.5)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol)
