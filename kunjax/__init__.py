"""kunjax: LLM serving on JAX/XLA with parameter-centric memory management."""

__version__ = "0.1.0"
