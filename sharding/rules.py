"""Logical-axis rules: one table from parameter names to PartitionSpecs over an instance's `tp` axis.

Every weight is named by logical axes (what each dimension *means*), and one rule table maps logical
axes to mesh axes. Megatron-style tensor parallelism falls out of it:

    wq/wk/wv (D, H*hd)   column split on heads   -> each device computes its own heads
    wo       (H*hd, D)   row split on heads      -> partial sums, one all-reduce per layer
    w_gate/w_up (D, F)   column split on mlp     -> each device holds a slice of the hidden
    w_down   (F, D)      row split on mlp        -> partial sums, one all-reduce per layer
    lm_head  (D, V)      column split on vocab   -> logits sharded on vocab, gathered for sampling
    embed    (V, D)      replicated              -> the lookup is a local gather, no collective
    norms, q/k-norm      replicated

Splitting the flattened H*hd columns into tp contiguous blocks keeps whole heads together, and with
GQA the q heads of one kv head land on the same device as that kv head (q head h uses kv head
h // (H / KV)), so attention needs no communication. KV pools `(kv_heads, pages, page_size, head_dim)`
are split on kv heads the same way.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kunjax.model.config import ModelConfig

TP = "tp"  # the one mesh axis of an instance

# parameter name -> logical axes of its dimensions
LOGICAL_AXES: dict[str, tuple[Optional[str], ...]] = {
    "embed": ("vocab_in", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "wq": ("embed", "q_heads"),
    "wk": ("embed", "kv_heads"),
    "wv": ("embed", "kv_heads"),
    "wo": ("q_heads", "embed"),
    "bq": ("q_heads",),
    "bk": ("kv_heads",),
    "bv": ("kv_heads",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    # KV pools (kv_heads, pages, page_size, head_dim)
    "kv_pool": ("kv_heads", "pages", "page", "head_dim"),
}

# logical axis -> mesh axis (None = replicated)
RULES: dict[str, Optional[str]] = {
    "vocab_in": None,
    "vocab": TP,
    "embed": None,
    "q_heads": TP,
    "kv_heads": TP,
    "mlp": TP,
    "head_dim": None,
    "pages": None,
    "page": None,
}


def spec_for(name: str) -> P:
    if name not in LOGICAL_AXES:
        raise KeyError(f"no logical axes for parameter {name!r}; add it to sharding.rules.LOGICAL_AXES")
    return P(*(RULES[a] for a in LOGICAL_AXES[name]))


def validate_tp(cfg: ModelConfig, tp: int) -> None:
    """Raises ValueError unless every split dimension divides by tp."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    checks = [("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
              ("intermediate_size", cfg.intermediate_size)]
    if not cfg.tie_word_embeddings:
        checks.append(("vocab_size", cfg.vocab_size))
    bad = [f"{n}={v}" for n, v in checks if v % tp]
    if bad:
        raise ValueError(f"tp={tp} does not divide the model's {', '.join(bad)}; tensor parallelism splits "
                         f"attention heads, kv heads and the MLP hidden over tp devices, so choose tp among "
                         f"the common divisors (e.g. tp=1)")


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A pytree of NamedShardings matching `params` (the per-layer layout of kunjax.model.transformer)."""
    def one(path, _leaf):
        key = path[-1]
        name = key.key if hasattr(key, "key") else str(key)
        return NamedSharding(mesh, spec_for(name))
    return jax.tree_util.tree_map_with_path(one, params)


def kv_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for("kv_pool"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_params(params: Any, mesh: Mesh, cfg: Optional[ModelConfig] = None) -> Any:
    """Places (host or device) params on `mesh` by the rules; validates tp first when cfg is given."""
    if cfg is not None:
        validate_tp(cfg, mesh.shape[TP])
    return jax.device_put(params, param_shardings(params, mesh))
