"""Processor sharing: steps that run on one shared set of cores (virtual CPU devices), each slowed
by the others in flight with it.

On a CPU every virtual device runs on the same cores, and one small XLA:CPU step does not use all
of them, so two concurrent steps overlap partly: neither one at a time nor fully in parallel. The
model: the host has a capacity C in lone-step units (1 <= C <= the number of steps that can run at
once); while k steps are in flight each progresses at min(1, C / k) of its lone speed (a step's
lone time is the device model's). A step's landing is therefore only known once nothing else starts
or ends before it: `HostShare` recomputes the landings whenever a step starts or ends. C = 1 is one
lone step's worth of work at a time, shared between the steps in flight (what the cores of a machine
running a single-threaded step each would give); C >= k, every step at its lone speed (parallel).
`python -m tools.simulate --calibrate` fits C from steps timed with one and with two instances
stepping at once (`fit_capacity`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

EPS = 1e-12  # seconds of lone work below which a step is done (float round-off of the piecewise advance)


@dataclasses.dataclass
class _Job:
    key: Any
    start: float
    remaining: float  # lone seconds of work left


class HostShare:
    """Steps sharing one host of capacity `capacity` (lone-step units). `add` a step (from its start
    time on, with its lone seconds), ask `next_event` when something next starts or lands, `advance`
    the time to collect the steps that landed by then."""

    def __init__(self, capacity: float):
        if not capacity >= 1.0:
            raise ValueError(f"host_capacity must be >= 1 (a lone step's speed), got {capacity}")
        self.capacity = float(capacity)
        self.now = 0.0
        self.pending: list[_Job] = []  # start in the future
        self.active: list[_Job] = []

    def rate(self, k: int) -> float:
        """Each step's speed (of its lone speed) while k steps are in flight."""
        return min(1.0, self.capacity / k) if k else 1.0

    def add(self, key, start: float, seconds: float) -> None:
        job = _Job(key, max(start, self.now), max(0.0, float(seconds)))
        (self.active if job.start <= self.now else self.pending).append(job)

    def __len__(self) -> int:
        return len(self.pending) + len(self.active)

    def next_event(self) -> Optional[float]:
        """When the next step starts or lands, the steps in flight as they are; None when empty."""
        t = min(self._next_start(), self._next_landing())
        return None if t == float("inf") else t

    def _next_start(self) -> float:
        return min((j.start for j in self.pending), default=float("inf"))

    def _next_landing(self) -> float:
        if not self.active:
            return float("inf")
        return self.now + min(j.remaining for j in self.active) / self.rate(len(self.active))

    def advance(self, t: float) -> list[tuple[Any, float]]:
        """Moves to time `t`; (key, landing time) of every step that landed by then, in order."""
        landed = []
        while True:
            self._start_due()
            start, landing = self._next_start(), self._next_landing()
            nxt = min(start, landing)
            if nxt > t or nxt == float("inf"):
                if t != float("inf"):
                    self._progress(t - self.now)
                    self.now = max(self.now, t)
                return landed
            first = min(self.active, key=lambda j: j.remaining) if landing <= start else None
            self._progress(nxt - self.now)
            self.now = nxt
            # the step that defined this landing is done whatever float round-off left of it
            done = [j for j in self.active if j is first or j.remaining <= EPS]
            self.active = [j for j in self.active if not (j is first or j.remaining <= EPS)]
            landed += [(j.key, self.now) for j in done]

    def _start_due(self) -> None:
        due = [j for j in self.pending if j.start <= self.now]
        if due:
            self.pending = [j for j in self.pending if j.start > self.now]
            self.active += due

    def _progress(self, dt: float) -> None:
        if dt <= 0 or not self.active:
            return
        r = self.rate(len(self.active))
        for j in self.active:
            j.remaining -= dt * r


def shared_ends(capacity: float, steps: Sequence[tuple[float, float]]) -> list[float]:
    """When each step of (start, lone seconds) lands on a host of `capacity` (the starts are given,
    as measured: nothing waits for a landing)."""
    host = HostShare(capacity)
    ends = [0.0] * len(steps)
    for i, (start, seconds) in sorted(enumerate(steps), key=lambda x: x[1][0]):
        for key, end in host.advance(start):
            ends[key] = end
        host.add(i, start, seconds)
    for key, end in host.advance(float("inf")):
        ends[key] = end
    return ends


def capacity_error(capacity: float, steps: Sequence[tuple[float, float, float]]) -> float:
    """Mean absolute % error of the shared model's step times against measured ones, for steps of
    (start, lone seconds, measured seconds)."""
    ends = shared_ends(capacity, [(s, lone) for s, lone, _ in steps])
    return 100.0 * sum(abs((e - s) - m) / m for e, (s, _, m) in zip(ends, steps)) / len(steps)


def fit_capacity(steps: Sequence[tuple[float, float, float]], max_capacity: float,
                 resolution: float = 0.01) -> tuple[float, dict]:
    """The capacity C in [1, max_capacity] that predicts concurrently measured steps best (steps of
    (start, lone seconds, measured seconds); least mean absolute % error on a grid of `resolution`),
    and the fit's figures: its error, and the error of the two extremes (C = 1: the lone work
    shared; C = max: fully parallel)."""
    if not steps:
        raise ValueError("steps: no concurrently timed steps to fit the host capacity to")
    if not max_capacity >= 1.0:
        raise ValueError(f"max_capacity must be >= 1, got {max_capacity}")
    n = int(round((max_capacity - 1.0) / resolution))
    grid = [1.0 + i * resolution for i in range(n + 1)] or [1.0]
    errs = [capacity_error(c, steps) for c in grid]
    best = min(range(len(grid)), key=errs.__getitem__)
    return grid[best], {"host_capacity": grid[best], "concurrent_steps": len(steps),
                        "mean_abs_pct_error": errs[best], "mean_abs_pct_error_c1": errs[0],
                        "mean_abs_pct_error_parallel": errs[-1]}
