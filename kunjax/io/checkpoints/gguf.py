"""GGUF checkpoints (llama.cpp's single-file format): config, weights, tokenizer and chat template.

A GGUF file holds metadata (hyper-parameters under `{arch}.*`, the tokenizer under `tokenizer.*`)
and tensors under llama.cpp's names, possibly quantized. We parse the header with our own lean reader
(`gguf_file`, 40x faster than `gguf.GGUFReader` on a tokenizer's 100k strings), dequantize with the
`gguf` package one tensor at a time to float32, turn it into the kunjax layout and hand it to `place`.

Two layout details differ from a Hugging Face checkpoint:

* GGUF (like nn.Linear) stores a projection as (out_features, in_features) in numpy order; kunjax
  stores it input-major, so 2-D weights are transposed.
* For `llama` files, llama.cpp's converter permutes the rows of the q and k projections so that
  rotary pairs are interleaved (GPT-J style) instead of split in halves (the HF "rotate half"
  convention kunjax uses). Per head, original row `s * hd/2 + j` (s in {0, 1}) is stored at row
  `2 * j + s`. We undo exactly that. `qwen2` / `qwen3` files are not permuted by llama.cpp.

Supported architectures: llama (incl. Mistral-style files, which llama.cpp labels llama), qwen2,
qwen3. Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K. Anything
else, and truncated or corrupt files, raise `ValueError` naming the problem.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import numpy as np

from kunjax.io.checkpoints.hf import as_layout
from kunjax.io.model_spec import SMOLLM2_FILE, smollm2_path  # noqa: F401  (re-exported: jax-free home)
from kunjax.model.config import ModelConfig, RopeScaling
from kunjax.model.transformer import Params, model_spec

Place = Callable[[np.ndarray], Any]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor name suffix (under blk.N.) for each kunjax per-layer parameter.
_LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}

# End-of-turn markers used by common chat templates. A control token with one of these spellings
# that the chat template actually emits also ends generation (llama.cpp does the same by name).
_END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "</s>")


# ---------------------------------------------------------------------------------------------
# Reading


def _supported_types():
    from gguf import GGMLQuantizationType as T

    return (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


def open_gguf(path: str):
    """The parsed header of `path` (`gguf_file.GGUFFile`: fields and tensors, data left on disk); any
    failure to parse becomes a ValueError naming the file."""
    from kunjax.io.checkpoints.gguf_file import GGUFFile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return GGUFFile(path)
    except Exception as e:  # cut or corrupt headers: short reads, bad type ids, undecodable counts
        raise ValueError(f"{path}: cannot parse GGUF file, it is truncated or corrupt ({type(e).__name__}: {e})") from e


class GGUFMetadata:
    """Typed access to a reader's key/value metadata."""

    _MISSING = object()

    def __init__(self, reader, path: str = "<gguf>"):
        self.reader = reader
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise ValueError(f"{self.path}: required GGUF metadata key {key!r} is missing")
            return default
        try:
            return field.contents()
        except Exception as e:
            raise ValueError(f"{self.path}: GGUF metadata key {key!r} is corrupt ({e})") from e


def _positive_int(md: GGUFMetadata, key: str, default: Any = GGUFMetadata._MISSING) -> int:
    v = md.get(key, default)
    if isinstance(v, list):
        raise ValueError(f"{md.path}: per-layer values for {key!r} are not supported (got a list)")
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or int(v) <= 0:
        raise ValueError(f"{md.path}: GGUF metadata {key!r} must be a positive integer, got {v!r}")
    return int(v)


def end_of_turn_ids(md: GGUFMetadata, tokens: list[str], token_types: list[int],
                    chat_template: Optional[str]) -> tuple[int, ...]:
    """EOS, the explicit EOT/EOM ids, and control tokens spelled like an end-of-turn marker that the
    chat template emits (e.g. `<|im_end|>` for ChatML files whose EOS is `<|endoftext|>`)."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = md.get(key, None)
        if v is not None and 0 <= int(v) < len(tokens):
            ids.append(int(v))
    if chat_template:
        for i, (tok, tt) in enumerate(zip(tokens, token_types or [3] * len(tokens))):
            if tt == 3 and tok in _END_OF_TURN_TEXTS and tok in chat_template:
                ids.append(i)
    return tuple(dict.fromkeys(ids))


def _rope_scaling_from_freqs(md: GGUFMetadata, arch: str, factors: np.ndarray, head_dim: int,
                             theta: float) -> RopeScaling:
    """llama.cpp stores Llama 3.1 scaling as a `rope_freqs` tensor of per-frequency divisors. Recover
    the llama3 parameters (factor from metadata or the tensor, low/high factors 1 and 4, as in every
    released Llama 3.x) and check they reproduce the tensor exactly; otherwise refuse the file."""
    from kunjax.model.rope import inv_frequencies

    factors = np.asarray(factors, np.float64).reshape(-1)
    if factors.shape[0] != head_dim // 2:
        raise ValueError(f"{md.path}: rope_freqs.weight has {factors.shape[0]} entries, expected {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    factor = float(md.get(f"{arch}.rope.scaling.factor", float(factors.max())))
    orig = int(md.get(f"{arch}.rope.scaling.original_context_length", 8192))
    cand = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=orig)
    probe = ModelConfig(model_type="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                        num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta)
    base = inv_frequencies(probe).astype(np.float64)
    scaled = inv_frequencies(dataclasses.replace(probe, rope_scaling=cand)).astype(np.float64)
    if not np.allclose(base / factors, scaled, rtol=1e-4, atol=0):
        raise ValueError(f"{md.path}: rope_freqs.weight does not match Llama 3 rope scaling "
                         f"(factor={factor}, original_context_length={orig}); unsupported rope scaling")
    return cand


def config_from_gguf(md: GGUFMetadata, tensor_names: set[str], tokens: Optional[list[str]] = None,
                     token_types: Optional[list[int]] = None, rope_freqs: Optional[np.ndarray] = None) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{md.path}: unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    d = _positive_int(md, f"{arch}.embedding_length")
    n_heads = _positive_int(md, f"{arch}.attention.head_count")
    n_kv = _positive_int(md, f"{arch}.attention.head_count_kv", n_heads)
    head_dim = _positive_int(md, f"{arch}.attention.key_length", d // n_heads if d % n_heads == 0 else 0)
    v_len = _positive_int(md, f"{arch}.attention.value_length", head_dim)
    if v_len != head_dim:
        raise ValueError(f"{md.path}: key_length {head_dim} != value_length {v_len} is not supported")
    rope_dim = _positive_int(md, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{md.path}: partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim "
                         f"{head_dim}) are not supported")
    theta = float(md.get(f"{arch}.rope.freq_base", 10000.0))
    scaling_type = md.get(f"{arch}.rope.scaling.type", "none")
    rope_scaling = None
    if rope_freqs is not None:
        rope_scaling = _rope_scaling_from_freqs(md, arch, rope_freqs, head_dim, theta)
    elif scaling_type not in ("none", None):
        raise ValueError(f"{md.path}: unsupported rope scaling type {scaling_type!r}")
    if tokens is not None:
        vocab_size = len(tokens)
    else:
        vocab_size = _positive_int(md, f"{arch}.vocab_size")
    bias = "blk.0.attn_q.bias" in tensor_names
    if arch == "qwen2" and not bias:
        raise ValueError(f"{md.path}: qwen2 file without q/k/v biases (blk.0.attn_q.bias missing)")
    chat_template = md.get("tokenizer.chat_template", None)
    bos = md.get("tokenizer.ggml.bos_token_id", None)
    eos_ids = end_of_turn_ids(md, tokens or [], token_types or [], chat_template) if tokens is not None else ()
    return ModelConfig(
        model_type=arch,
        vocab_size=vocab_size,
        hidden_size=d,
        intermediate_size=_positive_int(md, f"{arch}.feed_forward_length"),
        num_layers=_positive_int(md, f"{arch}.block_count"),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_positive_int(md, f"{arch}.context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=bias,
        qk_norm=arch == "qwen3",
        sliding_window=None,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` on q/k projection rows (out dim first; 1-D biases too)."""
    out = w.shape[0]
    hd = out // n_heads
    if hd * n_heads != out or hd % 2:
        raise ValueError(f"cannot un-permute a q/k tensor of {out} rows into {n_heads} heads")
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Tensors:
    def __init__(self, reader, path: str):
        self.path = path
        self.by_name = {t.name: t for t in reader.tensors}
        self.supported = _supported_types()

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def read(self, name: str) -> np.ndarray:
        """Dequantized float32 array in numpy (row-major, HF nn.Linear) order."""
        from gguf import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        t = self.by_name.get(name)
        if t is None:
            raise ValueError(f"{self.path}: tensor {name!r} is missing from the GGUF file")
        if t.tensor_type not in self.supported:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported GGUF type {t.tensor_type.name}; "
                             f"supported: {', '.join(s.name for s in self.supported)}")
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        if t.n_elements % block or t.data.nbytes != t.n_elements // block * type_size:
            raise ValueError(f"{self.path}: tensor {name!r} data is truncated or corrupt")
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(reversed([int(x) for x in t.shape]))
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"{self.path}: tensor {name!r} dequantized to {arr.size} values, expected {shape}")
        arr = np.asarray(arr, np.float32).reshape(shape)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{self.path}: tensor {name!r} contains NaN or Inf values (corrupt file?)")
        return arr


def load_gguf_params(tensors: _Tensors, cfg: ModelConfig, place: Place, dtype=np.float32) -> Params:
    """Weights in kunjax layout, one dequantized tensor at a time, layer by layer."""
    permute = cfg.model_type == "llama"

    def put(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> Any:
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{tensors.path}: tensor {name!r} has shape {tuple(arr.shape)} (kunjax layout), "
                             f"expected {tuple(shape)} from the GGUF metadata")
        return place(as_layout(arr, dtype))

    top = {"embed": ("token_embd.weight", False), "final_norm": ("output_norm.weight", False),
           "lm_head": ("output.weight", True)}

    def layer(i: int):
        def leaf(key, shape, _axes):
            name = f"blk.{i}.{_LAYER_TENSORS[key]}"
            arr = tensors.read(name)
            if permute and key in ("wq", "bq"):
                arr = unpermute_qk(arr, cfg.num_heads)
            elif permute and key in ("wk", "bk"):
                arr = unpermute_qk(arr, cfg.num_kv_heads)
            if arr.ndim == 2:
                arr = arr.T
            return put(name, arr, shape)
        return leaf

    def other(key, shape, _axes):
        name, transpose = top[key]
        arr = tensors.read(name)
        return put(name, arr.T if transpose else arr, shape)

    # the modules' state (kunjax.model.transformer.model_spec), at the shapes the modules declare
    return model_spec(cfg).build(other, layer)


def load_gguf(path: str, dtype=np.float32, place: Optional[Place] = None, name: Optional[str] = None):
    """Reads a GGUF file into a `LoadedModel` (config, weights via `place`, tokenizer, chat template)."""
    from kunjax.text.gguf_tokenizer import tokenizer_from_metadata
    from kunjax.io.loader import LoadedModel

    place = place or (lambda a: a)
    reader = open_gguf(path)
    md = GGUFMetadata(reader, path)
    tensors = _Tensors(reader, path)
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:  # before anything else, so the error names the architecture
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    tokens = md.get("tokenizer.ggml.tokens", None)
    token_types = md.get("tokenizer.ggml.token_type", None)
    rope_freqs = tensors.read("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    cfg = config_from_gguf(md, set(tensors.by_name), tokens, token_types, rope_freqs)
    if tokens is None:
        raise ValueError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    tokenizer = tokenizer_from_metadata(md, eos_token_ids=cfg.eos_token_ids)
    params = load_gguf_params(tensors, cfg, place, dtype)
    chat_template = md.get("tokenizer.chat_template", None)
    return LoadedModel(name or path, cfg, params, tokenizer, chat_template)
