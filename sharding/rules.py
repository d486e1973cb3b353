"""Logical-axis rules: ONE table from logical axes to mesh axes gives every NamedSharding.

Every parameter names the logical axes of its dimensions in its module (`nnx.Param(...,
out_sharding=...)`, kunjax.model.transformer); the KV pools name theirs here. One rule table maps
logical axes to the instance's mesh axes. Megatron-style tensor parallelism falls out of it:

    wq/wk/wv (D, H*hd)   (embed, q_heads/kv_heads)  column split on heads -> each device its own heads
    wo       (H*hd, D)   (q_heads, embed)           row split on heads    -> partial sums, one all-reduce
    w_gate/w_up (D, F)   (embed, mlp)               column split on mlp   -> a slice of the hidden
    w_down   (F, D)      (mlp, embed)               row split on mlp      -> partial sums, one all-reduce
    experts.e.*          (embed, expert_mlp) ...    each expert split like the dense MLP
    router   (D, E)      (embed, expert)            replicated (every device routes every token)
    lm_head  (D, V)      (embed, vocab)             column split on vocab -> logits gathered for sampling
    embed    (V, D)      (vocab_in, embed)          replicated            -> the lookup is a local gather
    norms, q/k-norm      replicated

Splitting the flattened H*hd columns into tp contiguous blocks keeps whole heads together, and with
GQA the q heads of one kv head land on the same device as that kv head (q head h uses kv head
h // (H / KV)), so attention needs no communication. KV pools `(kv_heads, pages, page_size, head_dim)`
are split on kv heads the same way. Each routed expert is a state of its own per layer (its own
arrays, `experts.<e>.*`), split over tp by `expert_mlp`; the router's expert dimension is named
`expert`, so expert parallelism (whole experts placed per device, replicated experts dropped) is a
rule and a placement of those per-expert states, not a new table.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kunjax.model.config import ModelConfig
from kunjax.model.transformer import model_spec

TP = "tp"  # the one mesh axis of an instance

Axes = tuple[Optional[str], ...]

# logical axis -> mesh axis (None = replicated)
RULES: dict[str, Optional[str]] = {
    "vocab_in": None,
    "vocab": TP,
    "embed": None,
    "q_heads": TP,
    "kv_heads": TP,
    "mlp": TP,
    "expert": None,
    "expert_mlp": TP,
    "head_dim": None,
    "pages": None,
    "page": None,
}

KV_POOL_AXES: Axes = ("kv_heads", "pages", "page", "head_dim")


def spec_for(axes: Axes) -> P:
    """The PartitionSpec of a value whose dimensions have these logical axes."""
    unknown = [a for a in axes if a is not None and a not in RULES]
    if unknown:
        raise KeyError(f"no rule for logical axes {unknown}; add them to sharding.rules.RULES")
    return P(*(RULES[a] if a is not None else None for a in axes))


def named(mesh: Mesh, axes: Axes) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes))


def state_shardings(spec, mesh: Mesh) -> dict[str, NamedSharding]:
    """Key -> NamedSharding of one module's flat state (a kunjax.model.transformer.StateSpec)."""
    return {k: named(mesh, spec.axes[k]) for k in spec.keys}


def validate_tp(cfg: ModelConfig, tp: int) -> None:
    """Raises ValueError unless every split dimension divides by tp."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    checks = [("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
              ("moe_intermediate_size" if cfg.is_moe else "intermediate_size", cfg.mlp_size)]
    if not cfg.tie_word_embeddings:
        checks.append(("vocab_size", cfg.vocab_size))
    bad = [f"{n}={v}" for n, v in checks if v % tp]
    if bad:
        raise ValueError(f"tp={tp} does not divide the model's {', '.join(bad)}; tensor parallelism splits "
                         f"attention heads, kv heads and the MLP (or each expert's) hidden over tp devices, "
                         f"so choose tp among the common divisors (e.g. tp=1)")


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
    """A pytree of NamedShardings matching the model's params tree (kunjax.model.transformer)."""
    return model_spec(cfg).build(lambda _k, _shape, axes: named(mesh, axes))


def kv_sharding(mesh: Mesh) -> NamedSharding:
    return named(mesh, KV_POOL_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_params(params: Any, mesh: Mesh, cfg: ModelConfig) -> Any:
    """Places (host or device) params on `mesh` by the rules, after validating tp."""
    validate_tp(cfg, mesh.shape[TP])
    return jax.device_put(params, param_shardings(cfg, mesh))
