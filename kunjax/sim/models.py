"""Model shapes the simulator knows without weights: the paper's models as configs only, the
embedded `tiny` model, or any Hugging Face checkpoint directory (its config.json alone is read).

The three paper shapes are the `config.json` of the public checkpoints (Hugging Face model cards):
Qwen/Qwen2.5-14B-Instruct, deepseek-ai/DeepSeek-R1-Distill-Llama-70B (a Llama-3-70B; the tokenizer
the KunServe authors' code defaults to) and Qwen/Qwen2.5-72B-Instruct.
"""

from __future__ import annotations

import json
import os

from kunjax.model.config import ModelConfig, tiny_config

PAPER_MODELS = {
    "qwen2.5-14b": {"model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": False},
    "llama-3-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "qwen2.5-72b": {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": False},
}


def model_config(spec: str) -> ModelConfig:
    """The ModelConfig of a paper shape, `tiny`, or a HF checkpoint directory; ValueError naming the
    field otherwise."""
    if spec in PAPER_MODELS:
        return ModelConfig.from_hf_config(PAPER_MODELS[spec])
    if spec == "tiny":
        return tiny_config()
    path = os.path.join(spec, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return ModelConfig.from_hf_config(json.load(f))
    raise ValueError(f"model: {spec!r} is not one of {', '.join([*PAPER_MODELS, 'tiny'])} nor a directory with a "
                     f"config.json")
