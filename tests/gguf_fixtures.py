"""Writing small GGUF files from random Hugging Face models, the way llama.cpp's converter does.

`write_gguf` stores a transformers Llama / Qwen2 / Qwen3 model under llama.cpp's tensor names,
with llama's q/k rows permuted (llama.cpp's `permute`), optionally Q8_0-quantized, plus a small
byte-level BPE tokenizer so the file is complete.
"""

from __future__ import annotations

import copy
import zlib
from typing import Optional

import numpy as np
import torch
import transformers

import gguf
from gguf.quants import dequantize, quantize


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF rotate-half rows -> interleaved pairs), for writing files
    the way llama.cpp does; kunjax.io.checkpoints.gguf.unpermute_qk undoes it."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (control)
MERGE_WORDS = ["the", "and", "hello", "world", "ing", "er", "on", "in"]

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=144, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.15,
              bos_token_id=1, eos_token_id=2)

# HF model_type -> GGUF architecture name
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def make_hf_model(family: str, seed: int = 0, tie: Optional[bool] = None, **overrides):
    """A random HF model; norms and biases perturbed so those paths are really tested."""
    torch.manual_seed(seed)
    common = {**COMMON, **overrides}
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=bool(tie))
    elif family == "llama3":
        cfg = transformers.LlamaConfig(**common, rope_theta=50000.0, tie_word_embeddings=bool(tie),
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True if tie is None else tie)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32, rope_theta=1e6, tie_word_embeddings=bool(tie))
    else:
        raise ValueError(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values (what byte-level BPE vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def toy_vocab(vocab_size: int) -> tuple[list[str], list[str], list[int]]:
    """Specials, the 256 bytes, then merged tokens for a few words; padded with unused tokens."""
    alpha = byte_alphabet()
    tokens = list(SPECIALS) + [alpha[b] for b in range(256)]
    types = [3] * len(SPECIALS) + [1] * 256
    merges: list[str] = []
    for word in MERGE_WORDS:
        for w in (word, "\u0120" + word):  # with and without the leading space (Ġ)
            cur = w[0]
            for ch in w[1:]:
                merged = cur + ch
                if merged not in tokens and len(tokens) < vocab_size:
                    merges.append(f"{cur} {ch}")
                    tokens.append(merged)
                    types.append(1)
                cur = merged
    while len(tokens) < vocab_size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    return tokens, merges, types


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().copy()


def quant_roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    return dequantize(quantize(w, qtype), qtype).reshape(w.shape)


QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def _kquant_affine(x: np.ndarray, levels: int):
    """Shared part of Q4_K / Q5_K: super-blocks of 256 = 8 sub-blocks of 32, y = d*sc*q - dmin*m with
    6-bit sc, m and f16 d, dmin (ggml's block_q4_K / block_q5_K). Returns (d, dmin, packed scales, q)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)  # ggml keeps min <= 0 (stored negated, as a non-negative m)
    scale = (sub.max(-1) - lo) / levels
    d = _f16(scale.max(-1, keepdims=True) / 63)
    dmin = _f16((-lo).max(-1, keepdims=True) / 63)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.ceil(_safe_div(scale, df) - 1e-6), 0, 63).astype(np.uint8)  # ceil: no clipping of q
    m = np.clip(np.rint(_safe_div(-lo, dminf)), 0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    q = np.clip(np.rint(_safe_div(sub + (dminf * m)[..., None], step)), 0, levels).astype(np.uint8)
    scales = np.zeros((n, 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return d, dmin, scales, q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Sub-blocks 2p and 2p+1 share 32 bytes: low nibbles the first, high nibbles the second."""
    n = q.shape[0]
    pairs = q.reshape(n, 4, 2, 32) & 0xF
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128).astype(np.uint8)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _kquant_affine(x, 15)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, _nibbles(q)], axis=1)  # 144 bytes


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _kquant_affine(x, 31)
    hi = (q >> 4) & 1  # bit j of qh[l] is the fifth bit of sub-block j's element l
    qh = (hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qh, _nibbles(q)], axis=1)  # 176 bytes


def _q6_k(x: np.ndarray) -> np.ndarray:
    """ggml's block_q6_K: 16 groups of 16 with int8 scales times an f16 d, 6-bit q - 32 stored as
    4 low bits (ql) and 2 high bits (qh)."""
    n = x.shape[0]
    grp = x.reshape(n, 16, 16)
    s = np.abs(grp).max(-1) / 31
    d = _f16(s.max(-1, keepdims=True) / 127)
    df = d.astype(np.float32)
    sc = np.clip(np.ceil(_safe_div(s, df) - 1e-6), 0, 127).astype(np.int8)
    step = (df * sc)[..., None]
    q = (np.clip(np.rint(_safe_div(grp, step)), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    # per half of 128: quarter k (elements 32k..32k+31) -> ql nibble (k & 1 picks bytes 0-31 / 32-63,
    # k >> 1 picks low / high nibble) and bits 2k..2k+1 of qh
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(n, 128)
    qh = sum(((q[:, :, k] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8).reshape(n, 64)
    return np.concatenate([ql.astype(np.uint8), qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)  # 210 bytes


K_QUANTS = (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K)


def quantize_k(w: np.ndarray, qtype) -> np.ndarray:
    """Q4_K / Q5_K / Q6_K bytes for `w` (rows a multiple of 256), written from ggml's block layouts
    (ggml-common.h) since the gguf package can only dequantize k-quants. A simple quantizer (min / max
    per sub-block, scales rounded up so nothing clips), independent of gguf's decoder, so loading
    such a file checks that decoder and kunjax's handling of it against the original weights."""
    enc = dict(zip(K_QUANTS, (_q4_k, _q5_k, _q6_k)))[qtype]
    w = np.asarray(w, np.float32)
    if w.shape[-1] % QK_K:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {QK_K}, got {w.shape}")
    blocks = w.reshape(-1, QK_K)
    return enc(blocks).reshape(*w.shape[:-1], -1)


def quantizable(name: str, w: np.ndarray) -> bool:
    return w.ndim == 2 and w.shape[1] % 32 == 0 and name.endswith(".weight") and "norm" not in name


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """llama.cpp names -> arrays in HF (out, in) order, llama q/k rows permuted like convert_hf_to_gguf."""
    cfg = model.config
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    permute = cfg.model_type == "llama"
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf_name, g_name in names.items():
            key = f"model.layers.{i}.{hf_name}"
            if key not in sd:
                continue
            w = sd[key]
            if permute and g_name.startswith("attn_q."):
                w = permute_qk(w, cfg.num_attention_heads)
            elif permute and g_name.startswith("attn_k."):
                w = permute_qk(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{g_name}"] = w
    return out


def rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    return float(theta if theta else cfg.rope_parameters["rope_theta"])


def llama3_rope_freqs(cfg) -> np.ndarray:
    """llama.cpp's rope_freqs tensor: per-frequency divisors for Llama 3.1 scaling."""
    s = cfg.rope_scaling
    hd = cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (rope_theta(cfg) ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in inv:
        wl = 2 * np.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1.0 / ((1 - smooth) / s["factor"] + smooth))
    return np.asarray(out, np.float32)


def write_gguf(model, path: str, qtype: str = "F32", arch: Optional[str] = None, pre: str = "smollm",
               chat_template: Optional[str] = CHATML, extra_tensors: Optional[dict] = None,
               qtypes: Optional[dict] = None, raw_types: Optional[dict] = None, drop: tuple = (),
               eos_token_id: int = 2) -> str:
    """Writes `model` as a GGUF. qtype "Q8_0" quantizes every 2-D weight whose rows are a multiple of 32.
    `qtypes` quantizes named tensors to a given type (name -> GGMLQuantizationType) with gguf's quantizer,
    or `quantize_k` for Q4_K / Q5_K / Q6_K;
    `raw_types` stores named tensors as a type with random bytes instead of the weights (for types gguf
    cannot quantize: every byte is below 0x3C, so every f16 scale field is finite and below 1);
    tensors named in `drop` are left out."""
    cfg = model.config
    arch = arch or GGUF_ARCH[cfg.model_type]
    w = gguf.GGUFWriter(path, arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_name("kunjax-test")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(7 if qtype == "Q8_0" else 0)
    tokens, merges, types = toy_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_token_id)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    tensors = gguf_tensors(model)
    scaling = getattr(cfg, "rope_scaling", None) or {}
    if scaling.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_freqs(cfg)
        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    tensors.update(extra_tensors or {})
    for name, arr in tensors.items():
        if name in drop:
            continue
        if raw_types and name in raw_types:
            t = raw_types[name]
            byte_shape = gguf.quant_shape_to_byte_shape(arr.shape, t)
            rng = np.random.default_rng(zlib.crc32(f"{name}/{t.name}".encode()))
            w.add_tensor(name, rng.integers(0, 0x3C, byte_shape, dtype=np.uint8), raw_dtype=t)
        elif qtypes and name in qtypes:
            t = qtypes[name]
            data = quantize_k(arr, t) if t in K_QUANTS else quantize(arr, t)
            w.add_tensor(name, data, raw_dtype=None if t == gguf.GGMLQuantizationType.F16 else t)
        elif qtype == "Q8_0" and quantizable(name, arr):
            w.add_tensor(name, quantize(arr, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized_copy(model, qtype: str):
    """A copy of the HF model whose weights went through the same quantization as `write_gguf` used."""
    if qtype == "F32":
        return model
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            arr = _np(p)
            if quantizable(name, arr):
                p.copy_(torch.from_numpy(quant_roundtrip(arr, gguf.GGMLQuantizationType.Q8_0)))
    return q


_HF_LAYER = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
             "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
             "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
             "mlp_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
             "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight"}


def kunjax_vs_hf_pairs(params, hf_model):
    """(name, kunjax array, HF array in kunjax layout) for every parameter."""
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    pairs = [("embed", params["embed"], sd["model.embed_tokens.weight"]),
             ("final_norm", params["final_norm"], sd["model.norm.weight"])]
    if "lm_head" in params:
        pairs.append(("lm_head", params["lm_head"], sd["lm_head.weight"].T))
    for i, lp in enumerate(params["layers"]):
        for key, arr in lp.items():
            ref = sd[f"model.layers.{i}.{_HF_LAYER[key]}"]
            pairs.append((f"layers.{i}.{key}", arr, ref.T if ref.ndim == 2 else ref))
    return pairs
