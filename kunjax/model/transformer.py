"""The Llama-family transformer (and its mixture-of-experts variant) as Flax NNX modules.

One module per piece a stage holds on its own: `Embedding`, `DecoderLayer` (one per layer) and
`LMHead`. A layer's weights live in its own module, so one layer's buffers can be deleted on their
own (parameter dropping) and any contiguous layer range [a, b) runs on its own (pipeline stages).
Each `nnx.Param` carries the logical axes of its dimensions (its `out_sharding` metadata: what each
dimension *means*); `sharding.rules` maps logical axes to mesh axes, the one place placement is
decided.

The modules are built abstractly (`nnx.eval_shape`, no weights drawn) to read their graph
definition and state layout (`StateSpec`: keys, shapes, logical axes). A module's state is held
as a flat dict of arrays keyed by its parameter path (`wq`, `experts.3.w_up`): what loaders fill,
what orbax writes and reads, and what a stage holds per layer:

    params = {
      "embed": (V, D),                                   # Embedding
      "layers": [ {attn_norm (D), wq (D, H*hd), wk (D, KV*hd), wv (D, KV*hd), wo (H*hd, D),
                   [bq, bk, bv]  (Qwen2),  [q_norm, k_norm] (hd,) (Qwen3),
                   mlp_norm (D), w_gate (D, F), w_up (D, F), w_down (F, D)          # dense MLP
                   | router (D, E), experts.e.{w_gate, w_up, w_down} for e < E}     # MoE (Qwen3-MoE)
                 , ... ],                                # one DecoderLayer each
      "final_norm": (D),                                 # LMHead
      "lm_head": (D, V)      # absent when embeddings are tied (the head reads "embed")
    }

The compiled step pieces (kunjax.runtime.executables) take a module's flat state as their leaves
and rebuild the module inside the trace (`StateSpec.merge`, graph definition static), so the
compiled code is the same as for plain functions over the arrays.

Weights are stored input-major (x @ W), i.e. the transpose of Hugging Face's nn.Linear layout.
A layer's KV is a (k_pool, v_pool) pair: K `(kv_heads, pages, head_dim, page_size)` (pages stored
transposed) and V `(kv_heads, pages, page_size, head_dim)` (see kunjax.model.attention).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kunjax.model.attention import paged_attention, write_kv
from kunjax.model.config import ModelConfig
from kunjax.model.rope import apply_rope

Params = dict[str, Any]
LayerParams = dict[str, jnp.ndarray]
LayerKV = tuple[jnp.ndarray, jnp.ndarray]
Axes = tuple[Optional[str], ...]


# ---- math shared by the modules ------------------------------------------------------------------
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


def swiglu(x, w_gate, w_up, w_down):
    return matmul(jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)


def _param(shape: tuple[int, ...], axes: Axes) -> nnx.Param:
    """A parameter with its logical axes. Modules are only ever built abstractly (nnx.eval_shape),
    so the zeros are never allocated; placement is sharding.rules' job, not eager sharding's."""
    return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=axes, eager_sharding=False)


# ---- the modules ---------------------------------------------------------------------------------
class Embedding(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        self.embed = _param((cfg.vocab_size, cfg.hidden_size), ("vocab_in", "embed"))

    def __call__(self, tokens):
        return jnp.take(self.embed[...], tokens, axis=0)


class Expert(nnx.Module):
    """One routed expert's SwiGLU MLP: its own parameters, so each expert's weights are state of
    their own (deletable, movable, placeable per expert)."""

    def __init__(self, d: int, f: int):
        self.w_gate = _param((d, f), ("embed", "expert_mlp"))
        self.w_up = _param((d, f), ("embed", "expert_mlp"))
        self.w_down = _param((f, d), ("expert_mlp", "embed"))

    def __call__(self, x):
        return swiglu(x, self.w_gate[...], self.w_up[...], self.w_down[...])


def route(logits: jnp.ndarray, top_k: int, normalize: bool, dtype) -> jnp.ndarray:
    """Router logits (..., E) -> each expert's weight per token (..., E), zero outside the top k:
    softmax in f32, top k, optionally renormalised over the k chosen (Qwen3-MoE's norm_topk_prob),
    cast to the activation dtype (transformers' Qwen3MoeTopKRouter)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_v, top_i = jax.lax.top_k(probs, top_k)
    if normalize:
        top_v = top_v / jnp.sum(top_v, axis=-1, keepdims=True)
    top_v = top_v.astype(dtype)
    chosen = top_i[..., None] == jnp.arange(logits.shape[-1])  # (..., k, E)
    return jnp.sum(jnp.where(chosen, top_v[..., None], jnp.zeros((), dtype)), axis=-2)


class DecoderLayer(nnx.Module):
    """One decoder layer: attention over the paged KV pools, then a dense SwiGLU MLP or (Qwen3-MoE)
    a router over `num_experts` experts of which each token uses `num_experts_per_tok`."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = _param((d,), ("embed",))
        self.wq = _param((d, cfg.q_size), ("embed", "q_heads"))
        self.wk = _param((d, cfg.kv_size), ("embed", "kv_heads"))
        self.wv = _param((d, cfg.kv_size), ("embed", "kv_heads"))
        self.wo = _param((cfg.q_size, d), ("q_heads", "embed"))
        self.mlp_norm = _param((d,), ("embed",))
        if cfg.is_moe:
            self.router = _param((d, cfg.num_experts), ("embed", "expert"))
            self.experts = nnx.List([Expert(d, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)])
        else:
            f = cfg.intermediate_size
            self.w_gate = _param((d, f), ("embed", "mlp"))
            self.w_up = _param((d, f), ("embed", "mlp"))
            self.w_down = _param((f, d), ("mlp", "embed"))
        if cfg.attention_bias:
            self.bq = _param((cfg.q_size,), ("q_heads",))
            self.bk = _param((cfg.kv_size,), ("kv_heads",))
            self.bv = _param((cfg.kv_size,), ("kv_heads",))
        if cfg.qk_norm:
            self.q_norm = _param((hd,), ("head_dim",))
            self.k_norm = _param((hd,), ("head_dim",))

    def mlp(self, x):
        if not self.cfg.is_moe:
            return swiglu(x, self.w_gate[...], self.w_up[...], self.w_down[...])
        # Dense formulation: every expert runs on every token and is weighted by the router (zero
        # for the experts a token did not choose), summed in expert order as transformers does.
        # It computes E / k times the routed FLOPs: fine on CPU and for small expert counts; a
        # grouped (ragged) matmul over the chosen tokens is the step to take on accelerators.
        cfg = self.cfg
        weights = route(matmul(x, self.router[...]), cfg.num_experts_per_tok, cfg.norm_topk_prob, x.dtype)
        out = jnp.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * weights[..., e:e + 1]
        return out

    def __call__(self, kv: LayerKV, h, positions, slots, block_tables, ctx_lens):
        """One decoder layer on h (R, Q, D). Writes this step's K/V into the layer's pools first, so a
        prefill chunk attends to itself through the same paged path as to its earlier context."""
        cfg = self.cfg
        r, nq, _ = h.shape
        x = rms_norm(h, self.attn_norm[...], cfg.rms_norm_eps)
        q = matmul(x, self.wq[...])
        k = matmul(x, self.wk[...])
        v = matmul(x, self.wv[...])
        if cfg.attention_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        q = q.reshape(r, nq, cfg.num_heads, cfg.head_dim)
        k = k.reshape(r, nq, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(r, nq, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q = apply_rope(q, positions, cfg)
        k = apply_rope(k, positions, cfg)
        k_pool = write_kv(kv[0], k, slots, transposed=True)
        v_pool = write_kv(kv[1], v, slots)
        attn = paged_attention(q, k_pool, v_pool, block_tables, positions, ctx_lens,
                               scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window)
        h = h + matmul(attn.reshape(r, nq, cfg.q_size), self.wo[...])
        return h + self.mlp(rms_norm(h, self.mlp_norm[...], cfg.rms_norm_eps)), (k_pool, v_pool)


class LMHead(nnx.Module):
    """Final norm + the output projection: `lm_head` (D, V), or the tied embedding (V, D), which the
    head then holds under the embedding's own name and axes."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.final_norm = _param((cfg.hidden_size,), ("embed",))
        if cfg.tie_word_embeddings:
            self.embed = _param((cfg.vocab_size, cfg.hidden_size), ("vocab_in", "embed"))
        else:
            self.lm_head = _param((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, h):
        """h (..., D) -> f32 logits (..., V)."""
        h = rms_norm(h, self.final_norm[...], self.cfg.rms_norm_eps)
        if self.cfg.tie_word_embeddings:
            return matmul(h, self.embed[...], w_transposed=True, out_dtype=jnp.float32)
        return matmul(h, self.lm_head[...], out_dtype=jnp.float32)


# ---- module state as flat dicts -----------------------------------------------------------------
def _declared(node, prefix: tuple = ()) -> Iterator[tuple[tuple, nnx.Variable]]:
    """(path, variable) of a module in declaration order (nnx's own flat state is sorted by path;
    declaration order keeps seeded initialisation and checkpoint reading in a fixed, readable order)."""
    items = enumerate(node) if isinstance(node, nnx.List) else vars(node).items()
    for name, v in items:
        if isinstance(v, nnx.Variable):
            yield prefix + (name,), v
        elif isinstance(v, (nnx.Module, nnx.List)):
            yield from _declared(v, prefix + (name,))


def key_of(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def expert_prefix(e: int) -> str:
    """The key prefix of routed expert `e`'s parameters in a layer's state."""
    return f"experts.{e}."


@dataclasses.dataclass(frozen=True, eq=False)
class StateSpec:
    """What one module's state is: its graph definition (static) and, per flat key, the shape and
    logical axes of the parameter. Built once per config (`model_spec`)."""

    graphdef: Any
    keys: tuple[str, ...]  # declaration order
    shapes: dict[str, tuple[int, ...]]
    axes: dict[str, Axes]
    paths: tuple[tuple, ...]  # nnx's flat-state order (sorted), what merge hands back

    @classmethod
    def of(cls, factory: Callable[[], nnx.Module]) -> "StateSpec":
        graphdef, _ = nnx.split(nnx.eval_shape(factory))
        declared = []

        def build():  # traced, so nothing is allocated; the module as built keeps declaration order
            declared.extend((p, tuple(v.get_value().shape), tuple(v.get_metadata()["out_sharding"]))
                            for p, v in _declared(factory()))
            return 0

        jax.eval_shape(build)
        keys = tuple(key_of(p) for p, _, _ in declared)
        shapes = {key_of(p): shape for p, shape, _ in declared}
        axes = {key_of(p): ax for p, _, ax in declared}
        return cls(graphdef, keys, shapes, axes, tuple(sorted((p for p, _, _ in declared), key=key_of)))

    def merge(self, flat: dict[str, Any]) -> nnx.Module:
        """The module over these arrays (inside a trace: over tracers); raises naming a missing key."""
        missing = [k for k in self.keys if k not in flat]
        if missing:
            raise KeyError(f"module state lacks {', '.join(missing)}")
        return nnx.merge(self.graphdef, nnx.from_flat_state([(p, flat[key_of(p)]) for p in self.paths]))

    def build(self, leaf: Callable[[str, tuple[int, ...], Axes], Any]) -> dict[str, Any]:
        """A flat state with `leaf(key, shape, axes)` for every parameter, in declaration order."""
        return {k: leaf(k, self.shapes[k], self.axes[k]) for k in self.keys}

    def expert_keys(self, e: int) -> list[str]:
        """The keys of routed expert `e` in a layer's state (empty for a dense layer)."""
        return [k for k in self.keys if k.startswith(expert_prefix(e))]


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSpec:
    embed: StateSpec
    layer: StateSpec
    head: StateSpec
    num_layers: int

    def build(self, leaf: Callable[[str, tuple[int, ...], Axes], Any],
              layer_leaf: Optional[Callable[[int], Callable]] = None) -> Params:
        """The whole model's params tree; `layer_leaf(l)` gives layer l's leaf function (default
        `leaf`). A tied head's `embed` is the embedding's own entry, not a second one."""
        params: Params = dict(self.embed.build(leaf))
        params["layers"] = [self.layer.build(layer_leaf(l) if layer_leaf else leaf) for l in range(self.num_layers)]
        params.update({k: leaf(k, self.head.shapes[k], self.head.axes[k]) for k in self.head.keys if k not in params})
        return params


@functools.lru_cache(maxsize=None)
def model_spec(cfg: ModelConfig) -> ModelSpec:
    return ModelSpec(StateSpec.of(lambda: Embedding(cfg)), StateSpec.of(lambda: DecoderLayer(cfg)),
                     StateSpec.of(lambda: LMHead(cfg)), cfg.num_layers)


def init_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32, scale: float = 0.02) -> Params:
    """Seeded random weights in host memory (numpy), identical on every platform and run."""
    rng = np.random.default_rng(seed)
    spec = model_spec(cfg)

    def draw(key, shape, _axes):
        if key.endswith("norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    # drawn layers first, then the embedding and the head (the order seeded models always had)
    layers = [spec.layer.build(draw) for _ in range(cfg.num_layers)]
    return spec.build(draw, lambda l: lambda key, _shape, _axes: layers[l][key])


def abstract_params(cfg: ModelConfig, dtype=np.float32, sharding=None) -> Params:
    """The params tree as ShapeDtypeStructs (no weights drawn): what a checkpoint restores into."""
    return model_spec(cfg).build(lambda _k, shape, _a: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))


def take_expert(layer_state: LayerParams, e: int) -> LayerParams:
    """Removes routed expert `e`'s parameters from a layer's state and returns them (to delete, or
    to move to the device that will serve that expert); the rest of the layer stays as it is."""
    keys = [k for k in layer_state if k.startswith(expert_prefix(e))]
    if not keys:
        raise KeyError(f"this layer state holds no expert {e}")
    return {k: layer_state.pop(k) for k in keys}


def head_params(params: Params) -> Params:
    """The weights the LM head reads: the final norm and lm_head, or the tied embedding."""
    w = "lm_head" if "lm_head" in params else "embed"
    return {"final_norm": params["final_norm"], w: params[w]}


def to_device(params: Params, dtype, device_or_sharding: Optional[Any] = None) -> Params:
    """Casts host weights to the serving dtype and places them, one array at a time."""
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a).astype(dtype), device_or_sharding), params)
