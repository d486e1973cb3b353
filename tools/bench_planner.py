"""How long the kunserve group planner takes to answer one overload, for 8 .. 1024 instances.

    python -m tools.bench_planner                 # 8, 16, ..., 1024 instances
    python -m tools.bench_planner 64 4096         # the sizes given

Each size: instances shaped like SmolLM2-135M replicas (30 layers, tied embedding, weights at 40 % of
a device's budget), loads drawn at random (seeded), one instance overloaded. Timed (median of
repeats, after one warm run; wall and this process's CPU time): `GroupPlanner.plan` end to end, and its two parts: choosing the
group (`GroupPlanner.candidates`: the partners with the most spare pages and each size's closed-form
page estimate, O(N log g)) and the exact page count of the chosen group (plan.plan_drop over its
members: a binary search over simulated transitions, independent of the instance count). The goal is
< 1 ms at 1024 instances. Pure Python, no JAX.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Sequence

import numpy as np

from kunjax.control.cost_model import CostModel
from kunjax.control.plan import MemberInfo, plan_drop
from kunjax.control.planner import GroupPlanner, PlannerConfig
from kunjax.control.unit import UnitView

LAYERS = 30
LAYER_BYTES = 14_160_000  # one SmolLM2-135M layer in float32
EMBED_BYTES = 113_246_208  # 49152 x 576 float32, tied: also the head
PAGE_LAYER_BYTES = 24_576  # 16 tokens x 3 KV heads x 64 x K and V x 4 bytes
BUDGET = 1_350_000_000  # weights at ~40 %


def cluster(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    room = BUDGET - LAYERS * LAYER_BYTES - EMBED_BYTES - 2 * 20_000_000
    pages = room // (LAYERS * PAGE_LAYER_BYTES) - 1
    used = rng.integers(0, pages // 2, n)
    used[0] = pages - 10
    infos = {i: MemberInfo(index=i, budget=BUDGET, layer_bytes=(LAYER_BYTES,) * LAYERS, embed_bytes=EMBED_BYTES,
                           head_bytes=0, other_bytes=20_000_000, reserve=20_000_000,
                           page_layer_bytes=PAGE_LAYER_BYTES, num_pages=pages + 1, used_pages=int(used[i]))
             for i in range(n)}
    views = [UnitView(index=i, pages_total=pages, pages_free=pages - int(used[i]),
                      queued_pages=200 if i == 0 else 0, running=8, waiting=4 if i == 0 else 0, page_size=16,
                      growth_pages=int(used[i]) // 4, instances=(i,)) for i in range(n)]
    return infos, views


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and median CPU seconds of this process (the CPU time is the planner's own work
    when the machine is shared: it leaves out the time spent waiting for a core)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: Sequence[str]) -> int:
    sizes = [int(a) for a in argv] or [8, 16, 32, 64, 128, 256, 512, 1024]
    cm = CostModel([0.5e-3, 1e-3, 20e-6, 50e-6, 2e-6, 3e-3, 30e-6])
    print(f"{'instances':>9} {'plan ms':>8} {'select ms':>9} {'exact ms':>9}   (CPU: plan, select, exact)  group")
    for n in sizes:
        infos, views = cluster(n)
        planner = GroupPlanner(PlannerConfig(max_group_size=4), tied=True, member_infos=lambda: infos, cost_model=cm)
        choice, why = planner.plan(views, views[0])
        if choice is None:
            print(f"{n:>9} no plan covers the demand: {why}")
            continue
        members, g = list(choice.members), choice.group_size
        rng = planner.ranges(LAYERS, g)
        cap = -(-(next(c for c in planner.candidates(views, views[0], infos) if c.members == tuple(members))
                   .estimate_pages + 1) // g)
        total = timed(lambda: planner.plan(views, views[0]), 21)
        select = timed(lambda: planner.candidates(views, views[0], infos), 21)
        exact = timed(lambda: plan_drop([infos[m] for m in members], g, True, cap, eligible=members, chunk_pages=64,
                                        ranges=rng), 21)
        print(f"{n:>9} {total[0] * 1e3:8.3f} {select[0] * 1e3:9.3f} {exact[0] * 1e3:9.3f}   "
              f"({total[1] * 1e3:6.3f} {select[1] * 1e3:6.3f} {exact[1] * 1e3:6.3f})  {members} "
              f"{choice.capacity_pages} pages for {choice.demand_pages}, stages {list(rng)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
