"""What a step unit does when its KV pages run out: a policy the scheduler consults (plain Python).

When a running request needs a page and none is free, the scheduler asks its policy for an action:

    Preempt(victim, how)   free the victim's pages now; `how` says what becomes of its KV
                           ("recompute": dropped and recomputed as part of its prompt later, the vLLM
                           baseline; other modes, such as a swap to host memory, put device work
                           into the step's `actions` for the unit to carry out before the step runs)
    Stall(request)         leave the request out of this step and keep its pages (memory is on its
                           way, e.g. a parameter drop under way); it is scheduled again next step

Cluster-wide remedies (migrating requests, dropping parameters into a pipeline group) act across
units; they watch the same signals (`Scheduler.out_of_pages_events`, queued demand) from the cluster
loop and live beside these policies.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, Union

from kunjax.control.request import Request


@dataclasses.dataclass(frozen=True)
class Preempt:
    victim: Request
    how: str = "recompute"


@dataclasses.dataclass(frozen=True)
class Stall:
    request: Request


Action = Union[Preempt, Stall]


class OverloadPolicy(Protocol):
    name: str

    def on_out_of_pages(self, running: Sequence[Request], needing: Request) -> Action:
        """`needing` (running) needs one more page and none is free; `running` are the unit's
        running requests in arrival order."""
        ...


class RecomputePolicy:
    """vLLM's recompute preemption: the latest arrival loses its KV and goes back to the head of the
    queue with its generated tokens, which are recomputed as part of its prompt."""

    name = "recompute"

    def on_out_of_pages(self, running: Sequence[Request], needing: Request) -> Action:
        return Preempt(max(running, key=lambda r: r.arrival_time), "recompute")
