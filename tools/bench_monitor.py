"""The kunserve overload trigger against the authors' on synthetic load, on the real scheduler.

    python -m tools.bench_monitor [--seeds=3]

One instance (the control plane's Scheduler and UnitCore, recompute preemption, a device whose step
time is a cost model's prediction) serves decode-heavy requests (prompts 64..512 tokens, outputs
128..1024 drawn per request, max_tokens 1024 so the scheduler does not know the length) arriving as
a Poisson process whose rate follows a scenario:

    ramp       up from a light load to well past what the pages hold, held, then down
    burst      a 3 s burst on a light load that the pages absorb (no preemption ever happens)
    wave       a wave of long generations fills most pages; a second wave arrives as the first is
               15 tokens from its end: a sudden overload (admitted prompts take the pages the first
               wave still needs: recompute preempts within about half a second)
    steady     a constant load at about three quarters of the pages

Both triggers see the same views at every scheduler iteration (nothing is dropped: the question is
when each would fire; "#" counts the fires, which repeat while the condition holds, since nothing
is applied): kunserve's OverloadMonitor (committed demand incl. expected growth >= the
pages for drop_dwell_s) and the authors' rule (KV demand (held + queued) >= 95 % of the pages and
queued pages >= free pages, polled every 0.1 s). Printed per scenario and seed: when the overload
became real (the first recompute preemption; the first request that waited because its prompt did
not fit), when each trigger first fired and how many times it fired, and the lead of each trigger
over the first preemption. A trigger that fires in a scenario with no preemption at all is a false
drop. Pure Python, no JAX.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from kunjax.control.cost_model import CostModel
from kunjax.control.monitor import MonitorConfig, OverloadMonitor
from kunjax.control.pages import PageAllocator, pages_for
from kunjax.control.request import Request, SamplingParams
from kunjax.control.scheduler import Scheduler, SchedulerConfig
from kunjax.control.unit import UnitCore

PAGES = 2048  # x 16 tokens
LAYERS = 30
EOS = 0
# a GPU-like instance: 1 ms fixed, per layer 0.1 ms + 2 us/prefill token + 5 us/decode row + 0.2 us/page
COST = CostModel([1e-3, 1e-4, 2e-6, 5e-6, 2e-7, 1e-3, 1e-5])


def rate(scenario: str, t: float) -> float:
    """Requests per second at time t."""
    if scenario == "ramp":
        return 1.0 if t < 10 else (1.0 + (t - 10) * 0.4 if t < 30 else (9.0 if t < 60 else 0.5))
    if scenario == "burst":
        return 12.0 if 10 <= t < 13 else 0.6
    if scenario == "wave":
        return 0.0  # its requests come in two waves (simulate)
    return 3.0  # steady


def lengths(rng) -> tuple[int, int]:
    """(prompt, output) tokens of a request: decode-heavy."""
    return int(rng.integers(64, 513)), int(rng.integers(128, 1025))


WAVE = 20  # first wave: requests of 256 + 1000 tokens (77 % of the pages at their end)
WAVE2 = 18  # second wave: prompts of 500 tokens, arriving when the first is 15 tokens from its end


class AuthorsTrigger:
    """Drop when (held + queued pages) >= 95 % of the pages and queued pages >= free pages, polled
    every 0.1 s (their values)."""

    def __init__(self, poll_s: float = 0.1):
        self.poll_s = poll_s
        self._next = 0.0

    def update(self, v, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.poll_s
        return v.pages_used + v.queued_pages >= 0.95 * v.pages_total and v.queued_pages >= v.pages_free


def simulate(scenario: str, seed: int, duration: float = 90.0) -> dict:
    rng = np.random.default_rng(seed)
    sched = Scheduler(SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=2048, max_prefill_rows=8,
                                      max_queue=100000), PageAllocator(PAGES + 1), 16, 4096)
    core = UnitCore(sched, eos_ids=(EOS,))
    target: dict[str, int] = {}
    monitor, authors = OverloadMonitor(MonitorConfig()), AuthorsTrigger()
    t, next_arrival, n = 0.0, 0.0, 0
    fired = {"kunserve": [], "authors": []}
    first_wait = None
    def add(prompt: int, output: int, at: float) -> None:
        nonlocal n
        rid = f"r{n}"
        n += 1
        target[rid] = output
        core.add(Request(rid, [1] * prompt, SamplingParams(max_tokens=1024), arrival_time=at))

    waves = [10.0, None] if scenario == "wave" else []
    if waves:
        next_arrival = float("inf")
    while t < duration:
        while next_arrival <= t:
            add(*lengths(rng), next_arrival)
            next_arrival += rng.exponential(1.0 / max(1e-6, rate(scenario, next_arrival)))
        if waves and waves[0] is not None and t >= waves[0]:
            for _ in range(WAVE):
                add(256, 1000, t)
            waves[0] = None
        if waves and waves[1] is None and any(len(r.output_token_ids) >= 985 for r in sched.running):
            for _ in range(WAVE2):
                add(500, int(rng.integers(128, 1025)), t)
            waves[1] = t
        v = core.view(0, instances=(0,))
        if monitor.update([v], t):
            fired["kunserve"].append(t)
        if authors.update(v, t):
            fired["authors"].append(t)
        if first_wait is None and sched.waiting and pages_for(sched.waiting[0].num_tokens, 16) > sched.allocator.num_free:
            first_wait = t
        step = core.schedule()
        if step is None:  # idle until the next arrival
            t = max(t, min(next_arrival, waves[0] if waves and waves[0] is not None else float("inf")))
            if t == float("inf"):
                break
            continue
        tokens = [EOS if r.samples and len(r.request.output_token_ids) + 1 >= target[r.request.request_id] else 1
                  for r in step.rows]
        if step.prefill:
            dt = COST.step_time(prefill_tokens=sum(r.n for r in step.rows), context_pages=sum(
                pages_for(r.start + r.n, 16) for r in step.rows), layers=LAYERS, prefill_rows=len(step.rows))
        else:
            dt = COST.step_time(decode_rows=len(step.rows), context_pages=sum(
                pages_for(r.start + 1, 16) for r in step.rows), layers=LAYERS)
        core.apply(step, tokens)
        t += dt
        if sched.num_preemptions and "first_preemption" not in fired:
            fired["first_preemption"] = t
    return {"first_preemption": fired.get("first_preemption"), "first_wait": first_wait,
            "kunserve": fired["kunserve"], "authors": fired["authors"], "preemptions": sched.num_preemptions,
            "requests": n}


def fmt(x) -> str:
    return "-" if x is None else f"{x:6.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=90.0)
    args = ap.parse_args(argv)
    print(f"{'scenario':>8} {'seed':>4} {'preempt':>8} {'1st wait':>8} | {'kunserve':>8} {'#':>3} {'lead s':>7} | "
          f"{'authors':>8} {'#':>3} {'lead s':>7} | preemptions")
    for scenario in ("ramp", "burst", "wave", "steady"):
        for seed in range(args.seeds):
            r = simulate(scenario, seed, args.duration)
            p = r["first_preemption"]
            cells = []
            for name in ("kunserve", "authors"):
                first = r[name][0] if r[name] else None
                lead = (p - first) if (p is not None and first is not None) else None
                cells.append(f"{fmt(first):>8} {len(r[name]):>3} {fmt(lead):>7}")
            print(f"{scenario:>8} {seed:>4} {fmt(p):>8} {fmt(r['first_wait']):>8} | {cells[0]} | {cells[1]} | "
                  f"{r['preemptions']} ({r['requests']} requests)")
    print("lead = first preemption - first fire (s; > 0: the trigger fired before recompute had to preempt). "
          "Fires where no preemption ever happens are false drops.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
