"""Small randomly initialised Hugging Face models of every supported family, for oracle tests."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=144, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.15,
              bos_token_id=1, eos_token_id=2)


def make_config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False)
    if family == "llama3":  # Llama 3.1 rope scaling, original context shorter than our prompts
        return transformers.LlamaConfig(**COMMON, rope_theta=50000.0, tie_word_embeddings=False,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 32})
    if family == "qwen2":
        return transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=True)
    if family == "qwen3":
        return transformers.Qwen3Config(**COMMON, head_dim=32, rope_theta=1e6, tie_word_embeddings=False)
    if family == "mistral":
        return transformers.MistralConfig(**COMMON, rope_theta=1e4, sliding_window=40, tie_word_embeddings=False)
    if family == "qwen3_moe":  # every layer routes each token to 2 of 4 experts (Qwen3-30B-A3B: 8 of 128)
        return transformers.Qwen3MoeConfig(**COMMON, head_dim=32, rope_theta=1e6, tie_word_embeddings=False,
                                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                           norm_topk_prob=True)
    raise ValueError(family)


FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral", "qwen3_moe")


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = make_config(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                          attn_implementation="eager")
    randomize_extras(model, seed + 1)
    model.eval()
    return model


def save_model(model, path: str) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_last_logits(model, prompt: list[int]):
    return model(torch.tensor([prompt])).logits[0, -1].float().numpy()


@torch.no_grad()
def randomize_extras(model, seed: int = 1) -> None:
    """HF initialises norms to 1 and biases to 0; perturb them so those code paths are really tested."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
