"""The Llama-family transformer as pure functions over a per-layer parameter pytree.

Parameters are held per layer so that one layer's buffers can be deleted on their own (parameter
dropping) and so that any contiguous layer range [a, b) can run on its own (pipeline stages):

    params = {
      "embed": (V, D),
      "layers": [ {attn_norm (D), wq (D, H*hd), wk (D, KV*hd), wv (D, KV*hd), wo (H*hd, D),
                   [bq, bk, bv]  (Qwen2),  [q_norm, k_norm] (hd,) (Qwen3),
                   mlp_norm (D), w_gate (D, F), w_up (D, F), w_down (F, D)}, ... ],
      "final_norm": (D),
      "lm_head": (D, V)      # absent when embeddings are tied
    }

Weights are stored input-major (x @ W), i.e. the transpose of Hugging Face's nn.Linear layout.
A layer's KV is a (k_pool, v_pool) pair: K `(kv_heads, pages, head_dim, page_size)` (pages stored
transposed) and V `(kv_heads, pages, page_size, head_dim)` (see kunjax.model.attention). A step runs
as one compiled call per layer (kunjax.runtime.executables), so any layer range runs on the same
executables.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kunjax.model.attention import paged_attention, write_kv
from kunjax.model.config import ModelConfig
from kunjax.model.rope import apply_rope

Params = dict[str, Any]
LayerParams = dict[str, jnp.ndarray]
LayerKV = tuple[jnp.ndarray, jnp.ndarray]


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {
        "attn_norm": (d,),
        "wq": (d, cfg.q_size),
        "wk": (d, cfg.kv_size),
        "wv": (d, cfg.kv_size),
        "wo": (cfg.q_size, d),
        "mlp_norm": (d,),
        "w_gate": (d, f),
        "w_up": (d, f),
        "w_down": (f, d),
    }
    if cfg.attention_bias:
        shapes.update(bq=(cfg.q_size,), bk=(cfg.kv_size,), bv=(cfg.kv_size,))
    if cfg.qk_norm:
        shapes.update(q_norm=(hd,), k_norm=(hd,))
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32, scale: float = 0.02) -> Params:
    """Seeded random weights in host memory (numpy), identical on every platform and run."""
    rng = np.random.default_rng(seed)

    def normal(shape):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    def norm_weight(shape):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    layers = []
    for _ in range(cfg.num_layers):
        lp = {}
        for name, shape in layer_shapes(cfg).items():
            lp[name] = norm_weight(shape) if name.endswith("norm") else normal(shape)
        layers.append(lp)
    params = {"embed": normal((cfg.vocab_size, cfg.hidden_size)), "layers": layers,
              "final_norm": norm_weight((cfg.hidden_size,))}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((cfg.hidden_size, cfg.vocab_size))
    return params


def matmul(x: jnp.ndarray, w: jnp.ndarray, w_transposed: bool = False, out_dtype=None) -> jnp.ndarray:
    """x (..., D) @ w (D, N) (or w (N, D) with `w_transposed`), accumulated in f32, returned in
    `out_dtype` (default x's dtype). For bf16 the f32 accumulation is what GPUs do anyway, and on CPU
    it lets XLA pick its fast bf16 GEMM (a bf16 -> bf16 dot takes a slow path).

    A single bf16 row is multiplied as two (the second zero): XLA:CPU emits a 1-row product as a
    matrix-vector reduction over weights converted to f32, a bf16 -> f32 copy of the weights per
    call, 4x slower per decode step than its bf16 GEMM. The pad costs one row of compute."""
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    n = rows.shape[0]
    if n == 1 and x.dtype.itemsize == 2:
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)])
    out = jax.lax.dot_general(rows, w, (((1,), (1 if w_transposed else 0,)), ((), ())),
                              preferred_element_type=jnp.float32)[:n]
    return out.reshape(*lead, out.shape[-1]).astype(out_dtype or x.dtype)


def rms_norm(x: jnp.ndarray, w: jnp.ndarray, eps: float) -> jnp.ndarray:
    """HF semantics: normalise in f32, cast back, then scale by the weight."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def layer_forward(lp: LayerParams, kv: LayerKV, h, positions, slots, block_tables, ctx_lens, cfg: ModelConfig):
    """One decoder layer on h (R, Q, D). Writes this step's K/V into the layer's pools first, so a
    prefill chunk attends to itself through the same paged path as to its earlier context."""
    r, nq, _ = h.shape
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    q = matmul(x, lp["wq"])
    k = matmul(x, lp["wk"])
    v = matmul(x, lp["wv"])
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(r, nq, cfg.num_heads, cfg.head_dim)
    k = k.reshape(r, nq, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(r, nq, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, positions, cfg)
    k = apply_rope(k, positions, cfg)
    k_pool = write_kv(kv[0], k, slots, transposed=True)
    v_pool = write_kv(kv[1], v, slots)
    attn = paged_attention(q, k_pool, v_pool, block_tables, positions, ctx_lens,
                           scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window)
    h = h + matmul(attn.reshape(r, nq, cfg.q_size), lp["wo"])
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    h = h + matmul(jax.nn.silu(matmul(x, lp["w_gate"])) * matmul(x, lp["w_up"]), lp["w_down"])
    return h, (k_pool, v_pool)


def embed(params: Params, tokens: jnp.ndarray) -> jnp.ndarray:
    return jnp.take(params["embed"], tokens, axis=0)


def head_params(params: Params) -> Params:
    """The weights the LM head reads: the final norm and lm_head, or the tied embedding."""
    w = "lm_head" if "lm_head" in params else "embed"
    return {"final_norm": params["final_norm"], w: params[w]}


def lm_logits(params: Params, h: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """h (..., D) -> f32 logits (..., V); `params` holds final_norm and lm_head or (tied) embed."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if "lm_head" in params:
        return matmul(h, params["lm_head"], out_dtype=jnp.float32)
    return matmul(h, params["embed"], w_transposed=True, out_dtype=jnp.float32)


def to_device(params: Params, dtype, device_or_sharding: Optional[Any] = None) -> Params:
    """Casts host weights to the serving dtype and places them, one array at a time."""
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a).astype(dtype), device_or_sharding), params)
