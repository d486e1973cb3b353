"""Process-wide JAX set-up shared by the command-line entry points."""

from __future__ import annotations

import os


def default_cache_dir() -> str:
    return os.environ.get("KUNJAX_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kunjax", "jax"))


def configure_jax(cache_dir: str | None = None, multi_process: bool = False) -> None:
    """Turns on kunjax's executable store in the `kunjax-executables` folder of `cache_dir`
    (kunjax.runtime.exe_store): a restart loads the compiled step executables instead of tracing,
    lowering and compiling every shape bucket again. Touches no device (a multi-process job is
    joined after this).

    JAX's persistent compilation cache (in `cache_dir` itself) is on only where the store is not: in
    a multi-process job. kunjax jits nothing but its step executables, which the store holds, and
    an executable that XLA:CPU loaded from JAX's cache serializes without its kernels (measured on
    jax 0.10.2: 5383 instead of 6512 bytes for a zeros constructor; loading it in another process
    fails with "Function wrapped_broadcast not found"), so a store fed from JAX's cache would hold
    broken entries."""
    import jax

    from kunjax.runtime import exe_store

    cache_dir = cache_dir or default_cache_dir()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        if multi_process:
            exe_store.configure(None)
            jax.config.update("jax_compilation_cache_dir", cache_dir)
            # Every executable: a step is many small per-layer pieces, each well under a second to
            # compile, and together they are the start-up time a restart should not pay again.
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        else:
            exe_store.configure(os.path.join(cache_dir, exe_store.SUBDIR))
    except OSError:
        pass  # read-only home: run without a cache
