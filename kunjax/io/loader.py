"""One entry point from a model name or path to config, weights and tokenizer.

`spec` is one of: an embedded model name (`tiny`, `smollm2-135m`), a Hugging Face checkpoint
directory, an orbax directory written by `tools.convert_checkpoint`, or a `.gguf` file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kunjax.model.config import ModelConfig, tiny_config
from kunjax.model.transformer import Params, init_params
from kunjax.text.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

EMBEDDED_MODELS = ("tiny", "smollm2-135m")
TINY_SEED = 1234


@dataclasses.dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    params: Params
    tokenizer: Optional[Tokenizer]
    chat_template: Optional[str] = None


def parse_dtype(name: Optional[str]):
    """`float32` / `bfloat16` / None (bfloat16 on GPU and TPU, float32 on CPU)."""
    if name is None or name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    table = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
             "float16": jnp.float16, "f16": jnp.float16}
    if name not in table:
        raise ValueError(f"unsupported dtype {name!r}; use float32 or bfloat16")
    return table[name]


def default_place(dtype, device_or_sharding=None) -> Callable[[np.ndarray], Any]:
    def place(a: np.ndarray):
        return jax.device_put(np.asarray(a).astype(dtype), device_or_sharding)
    return place


def host_place(dtype) -> Callable[[np.ndarray], Any]:
    """Keeps weights in host memory (numpy, in the serving dtype): what engines and clusters are
    built from, each placing its own replica on its own devices (no device copy held by the model)."""
    return lambda a: np.asarray(a).astype(dtype, copy=False)


def load_model(spec: str, dtype=None, place: Optional[Callable[[np.ndarray], Any]] = None) -> LoadedModel:
    """Loads config, tokenizer and weights; weights go through `place` one tensor at a time."""
    dtype = parse_dtype(dtype) if (dtype is None or isinstance(dtype, str)) else dtype
    place = place or default_place(dtype)
    if spec == "tiny":
        cfg = tiny_config()
        host = init_params(cfg, seed=TINY_SEED, scale=0.08)
        params = jax.tree.map(place, host)
        return LoadedModel("tiny", cfg, params, ByteTokenizer(cfg.vocab_size))
    if spec == "smollm2-135m" or spec.endswith(".gguf"):
        from kunjax.io.checkpoints.gguf import load_gguf, smollm2_path

        path = smollm2_path() if spec == "smollm2-135m" else spec
        return load_gguf(path, dtype=dtype, place=place, name=spec)
    from kunjax.io.checkpoints import hf, orbax_io

    if orbax_io.is_orbax_dir(spec):
        cfg = orbax_io.load_orbax_config(spec)
        params = orbax_io.load_orbax_params(spec, cfg, dtype=dtype)
        params = jax.tree.map(lambda a: place(np.asarray(a)) if place is not None else a, params)
        return LoadedModel(spec, cfg, params, _dir_tokenizer(spec, cfg), _dir_chat_template(spec))
    if hf.is_hf_dir(spec):
        cfg = ModelConfig.from_hf_dir(spec)
        params = hf.load_hf_params(spec, cfg, place, dtype=np.float32 if dtype == jnp.float32 else dtype)
        return LoadedModel(spec, cfg, params, _dir_tokenizer(spec, cfg), _dir_chat_template(spec))
    if not os.path.exists(spec):
        raise FileNotFoundError(
            f"model {spec!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor an existing path")
    raise ValueError(f"{spec!r} is not a Hugging Face directory (config.json + *.safetensors), an orbax "
                     f"directory or a .gguf file")


def _dir_tokenizer(path: str, cfg: ModelConfig) -> Optional[Tokenizer]:
    """The directory's tokenizer.json; None when it has none (token-id prompts only)."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return HFTokenizer.from_dir(path, eos_token_ids=cfg.eos_token_ids, bos_token_id=cfg.bos_token_id)
    return None


def _dir_chat_template(path: str) -> Optional[str]:
    import json

    p = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(p):
        with open(p) as f:
            tmpl = json.load(f).get("chat_template")
        if isinstance(tmpl, str):
            return tmpl
    p = os.path.join(path, "chat_template.jinja")
    if os.path.exists(p):
        with open(p) as f:
            return f.read()
    return None
