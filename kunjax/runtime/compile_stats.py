"""Counts XLA backend compilations through JAX's public monitoring hooks.

Serving must compile nothing after warm-up; tests and the engine's status read this counter rather
than trusting the bucket logic to be right.
"""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_seconds = 0.0
_installed = False


def _listener(event: str, duration: float, **_kwargs) -> None:
    global _count, _seconds
    if event == _EVENT:
        with _lock:
            _count += 1
            _seconds += duration


def install() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


def compile_count() -> int:
    install()
    return _count


def compile_seconds() -> float:
    install()
    return _seconds


install()
