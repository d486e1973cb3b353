"""Processor sharing: steps that run on one shared set of cores (virtual CPU devices), each slowed
by the others in flight with it.

On a CPU every virtual device runs on the same cores, and one small XLA:CPU step does not use all
of them, so two concurrent steps overlap partly: neither one at a time nor fully in parallel. The
model: the host has a capacity C in lone-step units (1 <= C <= the number of steps that can run at
once); while k steps are in flight each progresses at min(1, C / k) of its lone speed (a step's
lone time is the device model's). A step's landing is therefore only known once nothing else starts
or ends before it: `HostShare` recomputes the landings whenever a step starts or ends. C = 1: the
steps in flight share one lone step's speed (together they do the work of one step alone, the
throughput of running them one at a time); C >= k: every step at its lone speed (parallel).
`python -m tools.simulate --calibrate` fits C from steps timed with one and with two instances
stepping at once, in the serving loop (`fit_capacity`) and through a server (tools.sim_calibrate).
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


def shared_ends(capacity: float, threads: Sequence[Sequence[tuple[float, float]]]) -> list[list[tuple[float, float]]]:
    """When each step lands on a host of `capacity`, for threads that each run their steps one
    after the other (as an instance does: its next step starts once the last has landed): a thread
    is a list of (gap, lone seconds), the gap the host time before the step (for the first step,
    from time 0). Returns each thread's (start, end) per step."""
    host = HostShare(capacity)
    out: list[list] = [[None] * len(th) for th in threads]
    for j, th in enumerate(threads):
        if th:
            host.add((j, 0), th[0][0], th[0][1])
            out[j][0] = th[0][0]
    while len(host):
        for (j, i), end in host.advance(host.next_event()):
            out[j][i] = (out[j][i], end)
            if i + 1 < len(threads[j]):
                gap, lone = threads[j][i + 1]
                host.add((j, i + 1), end + gap, lone)
                out[j][i + 1] = end + gap
    return out


def capacity_error(capacity: float, threads: Sequence[Sequence[tuple[float, float, float]]]) -> float:
    """Mean absolute % error of the shared model's step times against measured ones; each thread a
    list of (start, lone seconds, measured seconds) of the steps it ran one after the other (starts
    on one clock). The model replays each thread's steps after one another with the measured gaps
    between them, so a step it predicts slower delays the thread's next ones, as it did for real."""
    t0 = min(th[0][0] for th in threads if th)
    model = []
    for th in threads:
        prev_end, steps = t0, []
        for start, lone, measured in th:
            steps.append((max(0.0, start - prev_end), lone))
            prev_end = start + measured
        model.append(steps)
    ends = shared_ends(capacity, model)
    errs = [abs((e - s) - m) / m for th, en in zip(threads, ends) for (_, _, m), (s, e) in zip(th, en)]
    return 100.0 * sum(errs) / len(errs)


def fit_capacity(threads: Sequence[Sequence[tuple[float, float, float]]], max_capacity: float,
                 resolution: float = 0.01) -> tuple[float, dict]:
    """The capacity C in [1, max_capacity] that predicts concurrently measured steps best (each
    thread: (start, lone seconds, measured seconds) of its steps; least mean absolute % error on a
    grid of `resolution`), and the fit's figures: its error, and the error of the two extremes
    (C = 1: one lone step's work at a time, shared; C = max: fully parallel)."""
    if not any(threads):
        raise ValueError("steps: no concurrently timed steps to fit the host capacity to")
    if not max_capacity >= 1.0:
        raise ValueError(f"max_capacity must be >= 1, got {max_capacity}")
    n = int(round((max_capacity - 1.0) / resolution))
    grid = [1.0 + i * resolution for i in range(n + 1)]
    errs = [capacity_error(c, threads) for c in grid]
    best = min(range(len(grid)), key=errs.__getitem__)
    return grid[best], {"host_capacity": grid[best], "concurrent_steps": sum(len(th) for th in threads),
                        "mean_abs_pct_error": errs[best], "mean_abs_pct_error_c1": errs[0],
                        "mean_abs_pct_error_parallel": errs[-1]}
