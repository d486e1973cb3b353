"""Process-wide JAX set-up shared by the command-line entry points."""

from __future__ import annotations

import os


def configure_jax(cache_dir: str | None = None) -> None:
    """Turns on JAX's persistent compilation cache, so a restart reuses the executables compiled
    by the previous run instead of compiling every shape bucket again."""
    import jax

    cache_dir = cache_dir or os.environ.get("KUNJAX_COMPILE_CACHE",
                                            os.path.join(os.path.expanduser("~"), ".cache", "kunjax", "jax"))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        # Every executable: a step is many small per-layer pieces, each well under a second to
        # compile, and together they are the start-up time a restart should not pay again.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except OSError:
        pass  # read-only home: run without the persistent cache
