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


def latest_arrival(running: Sequence[Request]) -> Request:
    return max(running, key=lambda r: r.arrival_time)


class RecomputePolicy:
    """vLLM's recompute preemption: the latest arrival loses its KV and goes back to the head of the
    queue with its generated tokens, which are recomputed as part of its prompt."""

    name = "recompute"

    def on_out_of_pages(self, running: Sequence[Request], needing: Request) -> Action:
        return Preempt(latest_arrival(running), "recompute")


class SwapPolicy:
    """vLLM's swap preemption / InferCept's swap: the latest arrival's KV pages are copied to host
    memory and its device pages freed; it comes back (same KV, new page ids) as soon as pages are
    free again, before any new request is admitted. When the host pool is full the scheduler falls
    back to recompute for that victim."""

    name = "swap"

    def on_out_of_pages(self, running: Sequence[Request], needing: Request) -> Action:
        return Preempt(latest_arrival(running), "swap")


# The per-unit policy each --overload_policy value runs on every instance. Cluster-wide policies
# (migrate: live KV migration between instances; kunserve: the parameter drop) act from the cluster
# loop and leave recompute as the instance's last resort.
UNIT_POLICIES = {"recompute": RecomputePolicy, "swap": SwapPolicy,
                 "migrate": RecomputePolicy, "kunserve": RecomputePolicy}


def unit_policy(name: str) -> OverloadPolicy:
    """The per-unit policy of an --overload_policy value; ValueError naming the field otherwise."""
    if name not in UNIT_POLICIES:
        raise ValueError(f"overload_policy: {name!r} is not one of {', '.join(UNIT_POLICIES)}")
    return UNIT_POLICIES[name]()
