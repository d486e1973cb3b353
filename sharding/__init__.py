"""Device partitioning into instances, logical-axis sharding rules, per-mesh jitted steps."""
