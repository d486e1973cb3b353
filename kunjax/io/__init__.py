"""Loading models: Hugging Face safetensors, orbax and GGUF checkpoints into a LoadedModel."""
