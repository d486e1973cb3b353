"""Hugging Face checkpoint directories: config.json + (sharded) *.safetensors + tokenizer.json.

Tensors are read one at a time from memory-mapped safetensors files and handed to `place` (which
casts and puts them on devices), layer by layer, so host memory never holds two full copies. What
is read is the modules' state (kunjax.model.transformer.model_spec): every parameter key of each
module, at the shape the module declares; Qwen3-MoE experts are read one expert at a time.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Optional

import numpy as np
from safetensors import safe_open

from kunjax.model.config import ModelConfig
from kunjax.model.transformer import Params, model_spec

Place = Callable[[np.ndarray], Any]

_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "router": ("mlp.gate.weight", True),
}
# a routed expert's parameter -> its tensor under mlp.experts.<e>. (the per-expert layout that
# transformers writes for Qwen3-MoE)
_EXPERT_NAMES = {"w_gate": "gate_proj.weight", "w_up": "up_proj.weight", "w_down": "down_proj.weight"}


def layer_tensor(key: str) -> tuple[str, bool]:
    """A layer-state key -> (checkpoint tensor name under layers.<i>., transposed?)."""
    if key.startswith("experts."):
        _, e, leaf = key.split(".")
        return f"mlp.experts.{e}.{_EXPERT_NAMES[leaf]}", True
    return _LAYER_NAMES[key]


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) and bool(
        glob.glob(os.path.join(path, "*.safetensors")))


class _SafetensorsIndex:
    """Maps tensor names to the file that holds them (single file or sharded index)."""

    def __init__(self, path: str):
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            self.where = {k: os.path.join(path, v) for k, v in weight_map.items()}
        else:
            self.where = {}
            for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
                with safe_open(file, framework="numpy") as f:
                    for k in f.keys():
                        self.where[k] = file
        self._open: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise KeyError(f"tensor {name!r} not found in checkpoint")
        file = self.where[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="numpy")
        return self._open[file].get_tensor(name)

    def close(self):
        self._open.clear()


def as_layout(arr: np.ndarray, dtype) -> np.ndarray:
    """`arr` (maybe a transposed view) as a C-contiguous array of `dtype`, in one copy at most: a cast
    writes the new layout directly; a 500 MB f32 checkpoint was copied three times on its way in
    (astype, ascontiguousarray, the host placement's astype), a second of a batch run's start-up."""
    return np.ascontiguousarray(arr) if arr.dtype == dtype else arr.astype(dtype, order="C")


def load_hf_params(path: str, cfg: ModelConfig, place: Place, dtype=np.float32) -> Params:
    """Reads weights into the kunjax layout (input-major), casting to `dtype`, one tensor at a time."""
    idx = _SafetensorsIndex(path)
    prefix = "model." if "model.embed_tokens.weight" in idx else ""

    def read(name: str, transpose: bool, shape: Optional[tuple] = None) -> Any:
        arr = idx.get(name)
        if transpose:
            arr = arr.T
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {arr.shape}, expected {shape} from config.json")
        return place(as_layout(arr, dtype))

    top = {"embed": (f"{prefix}embed_tokens.weight", False), "final_norm": (f"{prefix}norm.weight", False),
           "lm_head": ("lm_head.weight", True)}

    def layer(i: int):
        def leaf(key, shape, _axes):
            name, transpose = layer_tensor(key)
            return read(f"{prefix}layers.{i}.{name}", transpose, shape)
        return leaf

    params = model_spec(cfg).build(lambda key, shape, _axes: read(*top[key], shape), layer)
    idx.close()
    return params
