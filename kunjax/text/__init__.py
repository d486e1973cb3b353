"""Text: tokenizers (byte, Hugging Face, GGUF metadata), streaming detokenizer, chat templates."""
