"""The runner's step jitted for one instance mesh, with explicit input and output shardings.

Pinning in_shardings and out_shardings (params by the rules, KV split on kv heads, the batch and the
sampled tokens replicated) makes the donated KV come back with exactly the sharding it went in with,
so step N+1 hits the executable of step N: no recompiles after warm-up, whatever XLA's sharding
propagation would have picked. One jitted callable per mesh; its cache is keyed by the shape bucket.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh

from kunjax.model.config import ModelConfig
from kunjax.runtime.runner import _step
from sharding.rules import kv_sharding, param_shardings, replicated


_CACHE: dict = {}


def make_step_fn(mesh: Mesh, params: Any, cfg: ModelConfig):
    """Returns step(params, kv, batch, cfg=...) like kunjax.runtime.runner.step_fn, bound to `mesh`.

    Memoised on (mesh, config, parameter layout): instances rebuilt on the same devices (a restart
    of an instance, a test suite) reuse the compiled executables of every shape bucket."""
    p_sh = param_shardings(params, mesh)
    leaves, treedef = jax.tree.flatten(p_sh)
    key = (mesh, cfg, treedef, tuple(s.spec for s in leaves))
    if key not in _CACHE:
        _CACHE[key] = _build(mesh, p_sh, cfg)
    return _CACHE[key]


def _build(mesh: Mesh, p_sh: Any, cfg: ModelConfig):
    kv = kv_sharding(mesh)
    kv_tree = [(kv, kv)] * cfg.num_layers
    rep = replicated(mesh)
    jitted = jax.jit(functools.partial(_step, cfg=cfg), donate_argnums=(1,),
                     in_shardings=(p_sh, kv_tree, rep),
                     out_shardings=(kv_tree, rep, rep))

    def step(params, kv, batch, cfg=None):  # cfg is bound above; the argument keeps the runner's call
        return jitted(params, kv, batch)

    step.jitted = jitted
    return step
