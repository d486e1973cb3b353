"""Counts XLA backend compilations, and JAX's tracing and lowering, through JAX's public monitoring
hooks.

Serving must compile nothing after warm-up; tests and the engine's status read this counter rather
than trusting the bucket logic to be right. A persistent-cache hit still counts as a compile (JAX
reports it as one: the module was traced and lowered to look it up); an executable loaded from
kunjax's executable store (kunjax.runtime.exe_store) counts as none of the three.
"""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
# The name of kunjax.runtime.executables.BackgroundCompiler's thread: compiles there are off the
# request path (a server's cheaper shapes, the pool ladder, the shapes a pipeline group asked for).
BACKGROUND_THREAD = "kunjax-compile"
_lock = threading.Lock()
_count = 0
_background = 0
_seconds = 0.0
_traces = 0
_lowerings = 0
_installed = False


def _listener(event: str, duration: float, **_kwargs) -> None:
    global _count, _seconds, _traces, _lowerings, _background
    if event == _EVENT:
        background = threading.current_thread().name == BACKGROUND_THREAD  # JAX reports on the compiling thread
        with _lock:
            _count += 1
            _background += background
            _seconds += duration
    elif event == _TRACE:
        with _lock:
            _traces += 1
    elif event == _LOWER:
        with _lock:
            _lowerings += 1


def install() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


def compile_count() -> int:
    install()
    return _count


def foreground_compile_count() -> int:
    """Compilations on any thread but the background compilers': what the request path (or a drop,
    a restore) compiled itself."""
    install()
    with _lock:
        return _count - _background


def compile_seconds() -> float:
    install()
    return _seconds


def trace_count() -> int:
    """Functions traced to a jaxpr (jit tracing; a jit call whose trace JAX has cached is none)."""
    install()
    return _traces


def lowering_count() -> int:
    """jaxprs lowered to an MLIR module."""
    install()
    return _lowerings


install()
