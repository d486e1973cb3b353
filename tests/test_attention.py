"""Paged attention equals dense attention over the same context, for prefill chunks and decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kunjax.attention import dense_attention, paged_attention, write_kv


@pytest.mark.parametrize("q_len,window", [(1, None), (7, None), (16, None), (7, 9)])
def test_paged_equals_dense(q_len, window):
    rng = np.random.default_rng(0)
    R, H, KV, hd, ps, P = 3, 4, 2, 8, 4, 32
    ctx = np.array([5, 13, 22])  # total context per row after this step's tokens
    q_len_rows = np.minimum(q_len, ctx)
    k_pool = jnp.asarray(rng.standard_normal((P, ps, KV, hd)), jnp.float32)
    v_pool = jnp.asarray(rng.standard_normal((P, ps, KV, hd)), jnp.float32)
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
    k_pool2 = write_kv(k_pool, k_new, jnp.asarray(slots))
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
            k_dense[r, j], v_dense[r, j] = kp[page, o], vp[page, o]
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
