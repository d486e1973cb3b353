"""The Llama-family transformer (and Qwen3-MoE) as Flax NNX modules over pure JAX math: config,
rotary embeddings, paged attention, sampling, and the per-layer modules (device code)."""
