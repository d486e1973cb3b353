"""The Llama-family transformer as pure JAX functions: config, rotary embeddings, paged attention,
sampling, and the per-layer forward pass (device code)."""
