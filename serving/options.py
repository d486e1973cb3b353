"""Server options, importable without JAX (the launcher reads flags before jax starts)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    port: int = 50051
    host: str = "[::]"
    max_queue: int = 1024  # requests received and not yet running, across the cluster
    shutdown_grace_s: float = 10.0  # in-flight streams get this long to finish on shutdown
    default_max_tokens: int = 256
    overload_policy: str = "recompute"  # what Status reports: recompute (the default) or kunserve
