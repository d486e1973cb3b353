"""Model configuration: one typed dataclass for every supported Llama-family architecture.

Llama 2/3/3.1, Qwen2/2.5, Qwen3 and Mistral differ only in a handful of switches (QKV bias, q/k
RMSNorm, tied embeddings, RoPE scaling, sliding window), so one config and one forward pass serve
them all. Qwen3-MoE is Qwen3's attention with a routed mixture of experts in place of the dense MLP
(`num_experts` > 0). `from_hf_config` reads a Hugging Face `config.json` dict.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    sliding_window: Optional[int] = None  # Mistral v0.1
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (Qwen3-MoE): every layer routes each token to num_experts_per_tok of
    # num_experts SwiGLU experts of width moe_intermediate_size; 0 experts = a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the chosen experts' router probabilities to sum to 1

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts "
                             f"({self.num_experts})")
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ValueError("moe_intermediate_size must be positive for a mixture-of-experts model")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def mlp_size(self) -> int:
        """The hidden width tensor parallelism splits: the dense MLP's, or each expert's."""
        return self.moe_intermediate_size if self.is_moe else self.intermediate_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        mlp = self.num_experts * 3 * d * self.moe_intermediate_size + d * self.num_experts if self.is_moe else 3 * d * f
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + mlp + 2 * d
        if self.attention_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dict (Llama/Mistral/Qwen2/Qwen3)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_theta = hf.get("rope_theta")
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        rope_scaling = None
        if scaling:
            rope_theta = rope_theta or scaling.get("rope_theta")
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                )
            elif kind not in (None, "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, llama3)")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        sliding = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        if model_type in ("qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
            sliding = None
        moe = {}
        if model_type == "qwen3_moe":
            # One compiled layer serves every layer, so all layers must be alike: the checkpoints
            # published (Qwen3-30B-A3B, 235B-A22B) route in every layer.
            dense = hf.get("mlp_only_layers") or []
            if dense or int(hf.get("decoder_sparse_step", 1)) != 1:
                raise ValueError(f"qwen3_moe with dense layers (mlp_only_layers={dense}, decoder_sparse_step="
                                 f"{hf.get('decoder_sparse_step')}) is not supported: every layer must be a "
                                 f"mixture-of-experts layer (decoder_sparse_step 1, mlp_only_layers empty)")
            # published checkpoints say num_experts; transformers 5 writes num_local_experts
            experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
            moe = dict(num_experts=int(experts), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                       moe_intermediate_size=int(hf["moe_intermediate_size"]),
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **moe,
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelConfig":
        with open(os.path.join(path, "config.json")) as f:
            cfg = cls.from_hf_config(json.load(f))
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                extra = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
                merged = tuple(dict.fromkeys(cfg.eos_token_ids + extra))
                cfg = dataclasses.replace(cfg, eos_token_ids=merged)
        return cfg


def tiny_config() -> ModelConfig:
    """The embedded `tiny` model: Llama-shaped, small enough for CPU tests, byte-level vocab."""
    return ModelConfig(
        model_type="llama",
        vocab_size=384,  # 256 bytes + specials (see kunjax.text.tokenizer.ByteTokenizer), padded
        hidden_size=64,
        intermediate_size=172,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_ids=(257,),
    )
