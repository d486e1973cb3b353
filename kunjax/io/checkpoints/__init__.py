"""Checkpoint formats: Hugging Face safetensors directories, orbax directories, GGUF files."""
