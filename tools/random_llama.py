"""Random-weight Llama checkpoints saved as Hugging Face directories, for benchmarks that need a
model of a given shape but no download.

    python -m tools.random_llama --preset 10m --out /tmp/llama10m   # the trace benchmark's small model

The weights come from transformers' own initialisation (seeded), so every loader path (HF dir,
orbax conversion) and the transformers oracle see the same checkpoint.
"""

from __future__ import annotations

import argparse
import sys

PRESETS = {
    # ~10M parameters (42 MB in f32), 8 layers: small enough that a 4-instance CPU cluster steps in
    # tens of milliseconds, so a trace burst is bound by KV memory rather than by the two CPU cores
    "10m": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=8192),
    # ~125M parameters: Llama-shaped, GQA, vocab 32000
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),
    # ~1.2B: Llama 3.2 1B shape
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


def build(preset: str, dtype: str = "float32", seed: int = 0):
    """A transformers LlamaForCausalLM of the preset's shape with seeded random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**PRESETS[preset], max_position_embeddings=4096, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype))


def save(path: str, preset: str, dtype: str = "float32", seed: int = 0) -> str:
    build(preset, dtype, seed).save_pretrained(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.random_llama", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="10m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="directory to write (config.json + model.safetensors)")
    args = ap.parse_args(argv)
    save(args.out, args.preset, args.dtype, args.seed)
    print(f"wrote a random Llama {args.preset} ({args.dtype}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
