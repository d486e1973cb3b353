"""The clock the control plane is given, not one it reads (plain Python).

Every timestamp of the control plane (a request's arrival, admission, first token, finish; an event
of the overload log; the kunserve policy's `now`) comes from a clock passed in: the wall clock when
serving, simulated time in the simulator (kunjax.sim), where time advances only as simulated steps
and transitions finish. A clock is any zero-argument callable returning seconds.
"""

from __future__ import annotations

import time
from typing import Callable

Clock = Callable[[], float]

WALL: Clock = time.monotonic  # serving: the monotonic wall clock (requests, scheduler, policies)
UNIX: Clock = time.time  # serving: Unix time (the overload event log, which clients correlate)


class SimClock:
    """Simulated time: starts at `start`, moves only forward, only when told to."""

    def __init__(self, start: float = 0.0):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        if t < self.now:
            raise ValueError(f"time cannot go back: now {self.now}, asked {t}")
        self.now = float(t)
