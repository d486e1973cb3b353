"""API keys and TLS for both fronts.

Keys: `--api_key` (repeatable) / `--api_key_file` open Generation (gRPC Generation service; HTTP
/v1/*), `--admin_api_key` opens Admin. A Generation key never opens Admin (PERMISSION_DENIED / 403);
an admin key also opens Generation. With Generation keys set and no admin key, Admin is closed to
everyone; with no keys at all both stay open, as before. Health (grpc.health.v1, reflection, HTTP
/health and /metrics) is always open. A key travels as `authorization: Bearer <key>` (gRPC metadata,
or the HTTP header); it is compared with every configured key in constant time (hmac.compare_digest,
no early exit) and never logged (ServerOptions' repr hides them).

TLS: `--tls_cert_file` / `--tls_key_file` serve both fronts over TLS; `--tls_client_ca_file` also
requires a client certificate signed by that CA (mutual TLS).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import ssl
from typing import Iterable, Optional

from serving.errors import ServingError
from serving.options import ServerOptions

log = logging.getLogger(__name__)

GENERATION, ADMIN, OPEN = "generation", "admin", "open"


def read_key_file(path: str) -> list[str]:
    """Keys, one a line; blank lines and lines starting with '#' are skipped."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _matches(presented: bytes, keys: Iterable[bytes]) -> bool:
    ok = False
    for k in keys:  # every key compared, whatever matched before: the time does not depend on which
        ok |= hmac.compare_digest(presented, k)
    return ok


@dataclasses.dataclass(frozen=True)
class KeyCheck:
    generation: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_options(cls, options: ServerOptions) -> "KeyCheck":
        return cls(tuple(k.encode() for k in options.api_keys), tuple(k.encode() for k in options.admin_api_keys))

    @property
    def enabled(self) -> bool:
        return bool(self.generation or self.admin)

    def check(self, scope: str, authorization: Optional[str]) -> None:
        """Raises ServingError UNAUTHENTICATED (no key / a wrong one) or PERMISSION_DENIED (a valid
        key of the wrong scope) for a call of `scope` carrying this authorization value."""
        if scope == OPEN or not self.enabled:
            return
        key = bearer(authorization)
        is_admin = key is not None and _matches(key, self.admin)
        is_gen = key is not None and _matches(key, self.generation)
        if scope == GENERATION:
            if not self.generation or is_gen or is_admin:  # only an admin key set: Generation stays open
                return
            raise ServingError("UNAUTHENTICATED", _missing(key))
        if is_admin:
            return
        if is_gen:
            raise ServingError("PERMISSION_DENIED", "this API key opens Generation only; Admin needs an admin "
                                                    "key (--admin_api_key on the server)")
        if not self.admin:
            raise ServingError("PERMISSION_DENIED", "Admin is closed: the server has API keys but no "
                                                    "--admin_api_key")
        raise ServingError("UNAUTHENTICATED", _missing(key))


def _missing(key: Optional[bytes]) -> str:
    return ("missing API key: send 'Authorization: Bearer <key>'" if key is None else "invalid API key")


def bearer(value: Optional[str]) -> Optional[bytes]:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


# ---- TLS ------------------------------------------------------------------------------------------
def tls_enabled(options: ServerOptions) -> bool:
    return bool(options.tls_cert_file)


def check_tls_options(options: ServerOptions) -> None:
    """Raises ValueError (the flag named) for an incomplete or unreadable TLS set-up."""
    if bool(options.tls_cert_file) != bool(options.tls_key_file):
        raise ValueError("--tls_cert_file and --tls_key_file go together")
    if options.tls_client_ca_file and not options.tls_cert_file:
        raise ValueError("--tls_client_ca_file (mutual TLS) needs --tls_cert_file and --tls_key_file")
    for flag in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        path = getattr(options, flag)
        if path:
            try:
                open(path, "rb").close()
            except OSError as e:
                raise ValueError(f"--{flag}={path}: {e.strerror}") from None
    if tls_enabled(options):
        try:
            server_ssl_context(options)
        except (ssl.SSLError, ValueError) as e:
            raise ValueError(f"--tls_cert_file/--tls_key_file: not a usable certificate and key ({e})") from None


def server_ssl_context(options: ServerOptions) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(options.tls_cert_file, options.tls_key_file)
    if options.tls_client_ca_file:
        ctx.load_verify_locations(options.tls_client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def grpc_server_credentials(options: ServerOptions):
    import grpc

    def read(p):
        with open(p, "rb") as f:
            return f.read()
    ca = read(options.tls_client_ca_file) if options.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(read(options.tls_key_file), read(options.tls_cert_file))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def warn_plaintext_keys(options: ServerOptions) -> None:
    if (options.api_keys or options.admin_api_keys) and not tls_enabled(options):
        log.warning("API keys are set but the server is plaintext (no --tls_cert_file): keys travel "
                    "unencrypted; serve over TLS or only on a trusted network")
