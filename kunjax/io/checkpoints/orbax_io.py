"""Orbax checkpoints: a directory with config.json (kunjax's ModelConfig), the tokenizer files and
an orbax PyTree checkpoint of the modules' state under `params/` (the params tree of
kunjax.model.transformer: the embedding's, each decoder layer's and the head's flat state)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from kunjax.model.config import ModelConfig
from kunjax.model.transformer import Params, abstract_params

MARKER = "kunjax_config.json"


def is_orbax_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, MARKER))


def save_orbax(path: str, cfg: ModelConfig, params: Params, tokenizer_dir: Optional[str] = None,
               chat_template: Optional[str] = None) -> None:
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    if tokenizer_dir:
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(path, name))
    if chat_template:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(chat_template)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, "params"), params, force=True)


def load_orbax_config(path: str) -> ModelConfig:
    with open(os.path.join(path, MARKER)) as f:
        return ModelConfig.from_dict(json.load(f))


def load_orbax_params(path: str, cfg: ModelConfig, dtype=np.float32, sharding=None) -> Params:
    """Restores straight into the target dtype and placement (no intermediate host copy of the tree)."""
    path = os.path.abspath(path)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = abstract_params(cfg, dtype, sharding)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(os.path.join(path, "params"), target)

