"""Compiled executables on disk, under kunjax's own key: a warm start loads them without tracing,
lowering or compiling.

JAX's persistent compilation cache saves XLA's work but not JAX's: every executable is still traced
to a jaxpr and lowered to StableHLO before the cache is consulted (0.1-0.2 s per executable of the
~125M Llama on 2 CPU cores, against 0.015 s to load a serialized one). A step is a few executables
per shape bucket and pool size, so a restart pays that for every one. This store keeps the compiled
executable itself (`jax.experimental.serialize_executable`: the PJRT executable plus its argument
and result pytrees) and loads it with `deserialize_and_load`. `jax.export` was the other candidate;
it serializes StableHLO, so loading it still lowers the exported call and compiles it (a persistent
cache hit at best): it saves the tracing only.

One file per executable. Its NAME is a hash of what the executable is (model config, dtype, page
size, the ExeKey: shape bucket and pool size, the mesh's devices); its HEADER holds the full identity,
which adds what it was built with (jax and jaxlib versions, platform and its version, device kinds,
XLA flags, the jax config options that change lowering, and a hash of the kunjax source that builds
executables). So a file written by another jax version or another kunjax is found, compared field by
field, rejected (the log names the fields) and replaced by a fresh compile instead of piling up. A
truncated or corrupted file (the payload's sha256 is in the header) or one that does not load is
rejected the same way. Writes go to a temporary file renamed into place, so a reader never sees half
a file and concurrent processes may share the directory.

Loading a file runs pickle: the directory must be the user's own (it sits in their compilation cache
directory), as with any cache of executable code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import struct
import tempfile
from typing import Any, Optional

import jax

log = logging.getLogger(__name__)

MAGIC = b"KUNJAX-EXE\x00\x01"
FORMAT = 1
SUBDIR = "kunjax-executables"
# jax options that change what a function lowers to (and so what the executable computes).
_JAX_OPTIONS = ("jax_default_matmul_precision", "jax_enable_x64", "jax_default_prng_impl",
                "jax_threefry_partitionable", "jax_numpy_dtype_promotion")
# The kunjax code an executable is built from (the model's math, the step pieces, the KV pool layout,
# the sharding rules): if any of it changes, every entry is stale. Whole packages where the code that
# builds executables may move between modules.
_SOURCE_PACKAGES = ("kunjax/model", "kunjax/runtime/executables.py", "kunjax/runtime/kv_pools.py",
                    "kunjax/runtime/exe_store.py", "sharding")

_stats = {"hits": 0, "misses": 0, "rejected": 0, "saved": 0}


def stats() -> dict[str, int]:
    """Process-wide counts: executables loaded, not found, rejected as stale or corrupted, saved."""
    return dict(_stats)


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over the kunjax source files that build executables (paths and contents)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files = []
    for rel in _SOURCE_PACKAGES:
        path = os.path.join(root, rel)
        if os.path.isdir(path):
            files += sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py"))
        else:
            files.append(path)
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(os.path.relpath(f, root).encode())
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def build_identity() -> dict[str, Any]:
    """What an executable was built WITH (not what it is): versions, platform, flags, source."""
    import jaxlib

    dev = jax.devices()[0]
    return {"format": FORMAT, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "platform": dev.platform, "platform_version": dev.client.platform_version,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_options": {k: str(getattr(jax.config, k, None)) for k in _JAX_OPTIONS},
            "kunjax_source": source_hash()}


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


class ExecutableStore:
    """A directory of serialized executables. `load` returns a ready `jax.stages.Compiled` or None
    (absent, stale or corrupted: the caller compiles and `save`s); it never raises for a bad file."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._built_with = build_identity()

    def path(self, what: dict) -> str:
        return os.path.join(self.directory, hashlib.sha256(_canonical(what)).hexdigest()[:40] + ".exe")

    def identity(self, what: dict) -> dict:
        return {"what": what, **self._built_with}

    def load(self, what: dict, devices) -> Optional[jax.stages.Compiled]:
        """The executable `what` describes, loaded onto `devices` (the mesh's, in mesh order)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self.path(what)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            _stats["misses"] += 1
            return None
        except OSError as e:
            return self._reject(path, f"unreadable ({e})")
        try:
            header, payload = _split(blob)
        except ValueError as e:
            return self._reject(path, str(e))
        want = json.loads(_canonical(self.identity(what)))
        if header.get("identity") != want:
            got = header.get("identity") or {}
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            return self._reject(path, "stale: built with a different " + ", ".join(diff))
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            return self._reject(path, "corrupted: the payload does not match its checksum")
        try:
            serialized, in_tree, out_tree = pickle.loads(payload)
            compiled = deserialize_and_load(serialized, in_tree, out_tree, execution_devices=list(devices))
        except Exception as e:  # a file that does not load is as good as absent
            return self._reject(path, f"does not load ({type(e).__name__}: {e})")
        _stats["hits"] += 1
        return compiled

    def save(self, what: dict, compiled: jax.stages.Compiled) -> None:
        """Writes `compiled` under `what` (atomically); a failure is logged, never raised: the
        executable still serves this process, the next start compiles it again."""
        from jax.experimental.serialize_executable import serialize

        try:
            payload = pickle.dumps(serialize(compiled), protocol=pickle.HIGHEST_PROTOCOL)
            header = _canonical({"identity": self.identity(what), "sha256": hashlib.sha256(payload).hexdigest()})
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(header)) + header + payload)
            os.replace(tmp, self.path(what))
            _stats["saved"] += 1
        except Exception as e:
            log.warning("could not save the compiled executable %s: %s", what.get("exe"), e)

    def _reject(self, path: str, why: str) -> None:
        _stats["rejected"] += 1
        log.warning("compiled executable %s rejected, compiling it again: %s", os.path.basename(path), why)
        return None


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = len(MAGIC)
    if blob[:n] != MAGIC or len(blob) < n + 8:
        raise ValueError("corrupted: not a kunjax executable file")
    (hlen,) = struct.unpack("<Q", blob[n:n + 8])
    if len(blob) < n + 8 + hlen:
        raise ValueError("corrupted: truncated header")
    try:
        header = json.loads(blob[n + 8:n + 8 + hlen])
    except ValueError:
        raise ValueError("corrupted: unreadable header") from None
    return header, blob[n + 8 + hlen:]


# ---- the process-wide store ------------------------------------------------------------------
_directory: Optional[str] = None
_store: Optional[ExecutableStore] = None


def configure(directory: Optional[str]) -> None:
    """Turns the store on in `directory` (None: off). Touches no device: the launcher calls this
    before a multi-process job is joined; the store opens on first use."""
    global _directory, _store
    _directory, _store = directory, None


def current() -> Optional[ExecutableStore]:
    """The configured store, or None: not configured, an unusable directory, or a multi-process job
    (each process would load executables for devices it does not address)."""
    global _directory, _store
    if _store is None and _directory is not None:
        if jax.process_count() > 1:
            _directory = None
            return None
        try:
            _store = ExecutableStore(_directory)
        except OSError as e:
            log.warning("no executable store at %s: %s", _directory, e)
            _directory = None
    return _store
