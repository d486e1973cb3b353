"""Group planner: which instances merge, into a group of which size, with which layers per stage, so
that the freed memory covers an overloaded instance's demand with the least pipelining (plain
Python; the page counts and transition peaks are kunjax.control.plan's).

One group at a time, where the overload is: the overloaded instance (the seed) takes as partners the
single instances with the most spare pages (pages - committed demand), and the group size grows from
2 until the group's pages cover the members' committed demand. Smallest g first: a smaller group
pipelines less (fewer stages, fewer hidden-state hops, a restore sooner) and leaves the other
instances free to form their own groups where their overload comes.

Cost: the partners are the g_max - 1 largest of N spares (heapq.nlargest, O(N log g_max)); each size
g is first estimated in closed form (every member's steady-state pages for the layers it keeps: an
upper bound of plan_group's answer, which also bounds the transition peak), and only a size whose
estimate covers the demand is planned exactly (plan.plan_drop, a binary search over simulated
transitions). So a plan is O(N log g_max) + a few exact plans of g instances, whatever N is
(tools/bench_planner measures 8..1024 instances).

Stage layer ranges are balanced by the cost model: every layer of a step costs the same, the first
stage also runs the embedding and, with a tied embedding, the head; otherwise the last stage runs the
head. Layers go one at a time to the stage whose predicted time stays lowest (optimal for identical
layers), so the head's stage gets fewer layers. Without a cost model the split is plan.split_layers'.

A plan is chosen only if its executables are ready (`ready(plan)`, from the runtime): a plan whose
shapes are still compiling is passed over for the next size, and counted (`not_ready`) so the
caller can compile it for next time.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable, Mapping, Optional, Sequence

from kunjax.control.cost_model import CostModel
from kunjax.control.plan import (DropPlan, GroupPlan, MemberInfo, PlanError, _kept_weights, plan_drop,
                                 split_layers, stage_plans)
from kunjax.control.unit import UnitView


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    max_group_size: int = 4  # stages of a group at most
    max_pages_per_instance: int = 1 << 30  # pages an instance can use at most (plan.plan_drop's cap)
    chunk_pages: int = 64  # pages per exchange chunk (the transition's peak)
    headroom: float = 1.0  # the group's pages must be >= headroom x its members' committed demand
    # When no group covers the demand (every instance around is overloaded too), the ready group
    # that adds the most pages, if it adds at least this share of its members' own pages: partial
    # relief (the group still preempts within itself, less than its instances would apart). 0: off.
    min_partial_gain: float = 0.25
    balance_decode_rows: int = 32  # the step the stage ranges are balanced for: decode rows ...
    balance_context_pages: int = 512  # ... and the KV pages they read

    def validate(self) -> None:
        if self.max_group_size < 2:
            raise ValueError(f"max_group_size must be >= 2, got {self.max_group_size}")
        if self.headroom <= 0:
            raise ValueError(f"headroom must be > 0, got {self.headroom}")
        if self.min_partial_gain < 0:
            raise ValueError(f"min_partial_gain must be >= 0, got {self.min_partial_gain}")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A group worth planning exactly: its members, stage ranges, committed demand, and the pages it
    needs and is estimated to have."""

    members: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    demand_pages: int
    need_pages: int
    estimate_pages: int
    own_pages: int = 0  # usable pages the members have apart
    options: tuple = ()  # (stage ranges, estimated pages) to plan exactly: cost-balanced first, then even


@dataclasses.dataclass(frozen=True)
class GroupChoice:
    """The plan chosen for one overload, and the numbers behind the choice."""

    plan: DropPlan
    seed: int  # the overloaded instance
    demand_pages: int  # committed demand of the members together
    capacity_pages: int  # usable pages of the group (its page count less the null page)
    sizes_tried: int
    not_ready: int  # covering plans passed over because their executables were not ready
    exchange_bytes: int  # what the drop's KV exchange moves between devices
    covers: bool = True  # False: no group covered the demand; this one relieves the most (partial)
    own_pages: int = 0  # usable pages the members have apart

    @property
    def group(self) -> GroupPlan:
        return self.plan.groups[0]

    @property
    def members(self) -> tuple[int, ...]:
        return self.group.instances

    @property
    def group_size(self) -> int:
        return len(self.members)


def balanced_ranges(num_layers: int, g: int, layer_cost: float, first_extra: float,
                    last_extra: float) -> list[tuple[int, int]]:
    """g contiguous layer ranges minimising the slowest stage, stage s costing n_s x layer_cost plus
    first_extra (s = 0) and last_extra (s = g - 1). Ties go to the later stage, as split_layers."""
    if not 2 <= g <= num_layers:
        raise PlanError(f"group_size {g} must be between 2 and the layer count {num_layers}")
    if layer_cost <= 0:
        return split_layers(num_layers, g)
    extra = [0.0] * g
    extra[0] += first_extra
    extra[-1] += last_extra
    sizes = [1] * g
    heap = [(2 * layer_cost + extra[s], -s) for s in range(g)]  # cost of the stage with one more layer
    heapq.heapify(heap)
    for _ in range(num_layers - g):
        cost, neg = heapq.heappop(heap)
        s = -neg
        sizes[s] += 1
        heapq.heappush(heap, ((sizes[s] + 1) * layer_cost + extra[s], neg))
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out


def estimate_pages(infos: Mapping[int, MemberInfo], members: Sequence[int], tied: bool,
                   ranges: Sequence[tuple[int, int]], max_pages: int) -> int:
    """Usable pages of the group in the steady state (an upper bound of plan.plan_group's count):
    each member's room after the weights it keeps and its reserve, over the bytes a page of its
    layers takes; the smallest member decides."""
    num_layers = len(infos[members[0]].layer_bytes)
    pages = max_pages
    for st in stage_plans(members, num_layers, tied, ranges):
        i = infos[st.instance]
        room = i.budget - i.reserve - i.other_bytes - _kept_weights(i, st)
        pages = min(pages, room // (st.num_layers * i.page_layer_bytes))
    return max(0, pages - 1)


def exchange_bytes(group: GroupPlan, infos: Mapping[int, MemberInfo]) -> int:
    """Bytes the drop's KV exchange moves between devices: each member's used pages of the layers
    another stage keeps."""
    total = 0
    for st in group.stages:
        i = infos[st.instance]
        total += i.used_pages * (len(i.layer_bytes) - st.num_layers) * i.page_layer_bytes
    return total


class GroupPlanner:
    def __init__(self, config: PlannerConfig, tied: bool, member_infos: Callable[[], Mapping[int, MemberInfo]],
                 cost_model: Optional[CostModel] = None, ready: Callable[[DropPlan], bool] = lambda plan: True,
                 ladder: Optional[Sequence[int]] = None):
        """`member_infos()`: every instance's MemberInfo now (read only when a plan is made: it reads
        the ledger); `ready(plan)`: whether the plan's executables are compiled; `ladder`: the group
        pool sizes compiled ahead (kunjax.control.plan.pool_ladder), None: any size."""
        config.validate()
        self.ladder = ladder
        self.config = config
        self.tied = tied
        self.member_infos = member_infos
        self.cost_model = cost_model
        self.ready = ready
        self._ranges: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}

    def ranges(self, num_layers: int, g: int) -> tuple[tuple[int, int], ...]:
        """Each stage's layers for a group of g, balanced by the cost model (computed once per size)."""
        key = (num_layers, g)
        if key not in self._ranges:
            cm, c = self.cost_model, self.config
            if cm is None:
                rng = split_layers(num_layers, g)
            else:
                layer = cm.layer_time(decode_rows=c.balance_decode_rows, context_pages=c.balance_context_pages)
                head = cm.head_time(c.balance_decode_rows)
                first, last = (head, 0.0) if self.tied else (0.0, head)
                rng = balanced_ranges(num_layers, g, layer, first, last)
            self._ranges[key] = tuple(rng)
        return self._ranges[key]

    def candidates(self, views: Sequence[UnitView], seed: UnitView, infos: Mapping[int, MemberInfo],
                   exclude: Sequence[int] = ()) -> list[Candidate]:
        """The groups around `seed` worth an exact plan, smallest first: seed + the g - 1 single
        instances with the most spare pages, for g = 2 .. max_group_size, whose closed-form page
        estimate covers the members' committed demand. O(N log max_group_size)."""
        c = self.config
        banned = set(exclude) | set(seed.members)
        singles = [v for v in views if not v.is_group and not v.transitioning and v.members[0] not in banned]
        partners = heapq.nlargest(c.max_group_size - 1, singles,
                                  key=lambda v: (v.pages_total - v.demand_pages, -v.members[0]))
        out, demand, own = [], seed.demand_pages, seed.pages_total
        num_layers = len(infos[seed.members[0]].layer_bytes)
        for k, p in enumerate(partners[:num_layers - 1]):
            g = k + 2
            demand += p.demand_pages
            own += p.pages_total
            members = tuple(sorted(seed.members + tuple(v.members[0] for v in partners[:k + 1])))
            # the cost-balanced ranges, and the even ones: a stage that carries the embedding or the
            # head holds fewer layers when balanced for time, which can leave the group fewer pages
            options = tuple(dict.fromkeys((self.ranges(num_layers, g), tuple(split_layers(num_layers, g)))))
            ests = tuple(estimate_pages(infos, members, self.tied, r, g * c.max_pages_per_instance) for r in options)
            out.append(Candidate(members, options[0], demand, int(c.headroom * demand), max(ests), own,
                                 tuple(zip(options, ests))))
        return out

    def _exact(self, cand: Candidate, infos: Mapping[int, MemberInfo], need: int,
               why: Optional[dict] = None) -> Optional[DropPlan]:
        """The exact plan of a candidate (plan.plan_drop) with at least `need` usable pages: its range
        options in order (cost-balanced first), those whose estimate reaches `need`; among the ones that
        fit, the first that reaches it, else None."""
        g = len(cand.members)
        for ranges, est in cand.options or ((cand.ranges, cand.estimate_pages),):
            if est < need:
                continue
            # the estimate bounds the exact count: searching no higher gives the same answer sooner
            cap = min(self.config.max_pages_per_instance, -(-(est + 1) // g))
            try:
                plan = plan_drop([infos[m] for m in cand.members], g, self.tied, cap, eligible=cand.members,
                                 chunk_pages=self.config.chunk_pages, ranges=ranges, ladder=self.ladder)
            except PlanError as e:
                if why is not None:
                    why.setdefault("exact_errors", {})[len(cand.members)] = str(e)[:200]
                continue
            if plan.groups[0].num_pages - 1 >= need:
                return plan
            if why is not None:  # planned, but short of what was needed
                why.setdefault("exact_pages", {})[len(cand.members)] = (plan.groups[0].num_pages - 1, need)
        return None

    def _choice(self, plan: DropPlan, seed: UnitView, cand: Candidate, infos, tried: int, not_ready: int,
                covers: bool) -> GroupChoice:
        return GroupChoice(plan, seed.members[0], cand.demand_pages, plan.groups[0].num_pages - 1, tried, not_ready,
                           exchange_bytes(plan.groups[0], infos), covers, cand.own_pages)

    def plan(self, views: Sequence[UnitView], seed: UnitView,
             exclude: Sequence[int] = ()) -> tuple[Optional[GroupChoice], dict]:
        """The smallest group around `seed` (an overloaded single instance) whose pages cover its
        members' committed demand, among plans that are ready; when none covers, the ready group
        adding the most pages (at least min_partial_gain of its members' own: `covers` False); else
        (None, the numbers of why)."""
        c = self.config
        infos = self.member_infos()
        cands = self.candidates(views, seed, infos, exclude)
        numbers = {"seed": seed.members[0], "seed_demand_pages": seed.demand_pages, "candidates": len(cands)}
        tried = not_ready = 0
        # the smallest group that covers the demand; else the one that adds the most pages (partial)
        tries = [(x, x.need_pages, True) for x in cands]
        if c.min_partial_gain > 0:
            tries += [(x, int(math.ceil((1 + c.min_partial_gain) * x.own_pages)), False)
                      for x in sorted(cands, key=lambda x: -x.estimate_pages)]
        for cand, need, covers in tries:
            if cand.estimate_pages < need:
                continue
            tried += 1
            plan = self._exact(cand, infos, need, numbers)
            if plan is None:
                continue
            if not self.ready(plan):
                not_ready += 1
                continue
            return self._choice(plan, seed, cand, infos, tried, not_ready, covers), numbers
        numbers.update({"largest_group_tried": len(cands[-1].members) if cands else 1,
                        "demand_pages": cands[-1].demand_pages if cands else seed.demand_pages,
                        "best_estimate_pages": max((x.estimate_pages for x in cands), default=0),
                        "exact_plans": tried, "not_ready": not_ready})
        return None, numbers
