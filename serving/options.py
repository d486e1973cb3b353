"""Server options, importable without JAX (the launcher reads flags before jax starts)."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    port: int = 50051
    host: str = "[::]"
    max_queue: int = 1024  # requests received and not yet running, across the cluster
    shutdown_grace_s: float = 10.0  # in-flight streams get this long to finish on shutdown
    default_max_tokens: int = 256
    overload_policy: str = "recompute"  # what Status reports: recompute (the default) or kunserve
    http_port: Optional[int] = None  # the OpenAI-compatible HTTP front (off when None; 0: any free port)
    served_model_name: str = ""  # the model name both fronts report and HTTP requests must name ("": --model)
    api_keys: tuple[str, ...] = ()  # keys that open Generation (both fronts); none: open
    admin_api_keys: tuple[str, ...] = ()  # keys that open Admin; none while api_keys are set: Admin closed
    tls_cert_file: Optional[str] = None  # PEM certificate chain: both fronts serve TLS
    tls_key_file: Optional[str] = None
    tls_client_ca_file: Optional[str] = None  # PEM CA bundle: clients must present a certificate it signed

    def __repr__(self) -> str:  # never print the keys (logs, tracebacks)
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("api_keys", "admin_api_keys"):
            shown[name] = f"<{len(shown[name])} keys>"
        return "ServerOptions(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
