"""Device execution: the compiled per-layer steps, KV pools, one serving instance, the cluster."""
