"""The kunserve overload policy: decides, at every scheduler iteration, which instances drop
parameters into a pipeline group and which groups split again (plain Python; the cluster applies the
decisions through its plan / drop / restore entry points).

    decide(views, now) -> [DropDecision | RestoreDecision | FallbackDecision]

The monitor (kunjax.control.monitor) says where an overload is; the planner (kunjax.control.planner)
picks the smallest group around it whose pages cover the demand, among plans that are ready; when
the instances around are overloaded too and no group covers it, the group that adds the most pages
(partial relief, counted in partial_drops). One group per decision, where the overload is: groups are
planned and switched one at a time, never all together. When no plan relieves the overload, the
instance keeps serving with recompute preemption (its scheduler's policy, vLLM-style): a
FallbackDecision, counted once per overload episode. A decision stays pending (its instances are not decided on again) until the views show it
carried out or `decision_timeout_s` passes.

Every decision is one log line with its reason and the numbers behind it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence, Union

from kunjax.control.cost_model import CostModel
from kunjax.control.monitor import MonitorConfig, OverloadMonitor
from kunjax.control.plan import DropPlan, GroupPlan
from kunjax.control.planner import GroupPlanner, PlannerConfig
from kunjax.control.unit import UnitView

log = logging.getLogger(__name__)

OVERLOAD_POLICIES = ("recompute", "kunserve")  # --overload_policy; recompute is the default


@dataclasses.dataclass(frozen=True)
class KunserveConfig:
    monitor: MonitorConfig = MonitorConfig()
    planner: PlannerConfig = PlannerConfig()
    tpot_slo_ms: float = 200.0  # lookahead micro-batches keep the time between tokens within this
    drops_per_decision: int = 1  # groups formed per iteration at most (one at a time)
    decision_timeout_s: float = 120.0  # a decision the views do not show carried out by then is forgotten

    def validate(self) -> None:
        self.monitor.validate()
        self.planner.validate()
        if self.tpot_slo_ms <= 0:
            raise ValueError(f"tpot_slo_ms must be > 0, got {self.tpot_slo_ms}")
        if self.drops_per_decision < 1:
            raise ValueError(f"drops_per_decision must be >= 1, got {self.drops_per_decision}")


@dataclasses.dataclass(frozen=True)
class DropDecision:
    instances: tuple[int, ...]  # in stage order
    group_size: int
    reason: str
    numbers: dict
    plan: Optional[DropPlan] = None  # the planned group (cluster.drop(plan) applies it)


@dataclasses.dataclass(frozen=True)
class RestoreDecision:
    group_id: int
    reason: str
    numbers: dict


@dataclasses.dataclass(frozen=True)
class FallbackDecision:
    instance: int
    reason: str
    numbers: dict


Decision = Union[DropDecision, RestoreDecision, FallbackDecision]


def group_identity(plan: GroupPlan, group_id: int) -> dict:
    """What the cluster passes to a pipeline group's `view` (UnitView.instances / group /
    base_pages), so the policy knows the group's members and the pages they have once split."""
    return {"instances": tuple(plan.instances), "group": group_id,
            "base_pages": sum(p - 1 for p in plan.pages_before.values())}  # usable: less each null page


class KunservePolicy:
    name = "kunserve"

    def __init__(self, config: KunserveConfig, monitor: OverloadMonitor, planner: GroupPlanner,
                 cost_model: Optional[CostModel] = None):
        config.validate()
        self.config = config
        self.monitor = monitor
        self.planner = planner
        self.cost_model = cost_model
        self.drops = 0
        self.restores = 0
        self.fallbacks = 0
        self.partial_drops = 0  # drops whose group did not cover the whole demand (the most relief there was)
        self._pending_drop: dict[tuple[int, ...], float] = {}  # members -> when decided
        self._pending_restore: dict[int, float] = {}  # group id -> when decided
        self._fallback: set[int] = set()  # instances in an overload episode no plan covered

    @classmethod
    def build(cls, config: KunserveConfig, tied: bool, member_infos, cost_model: Optional[CostModel] = None,
              ready=lambda plan: True) -> "KunservePolicy":
        """The policy with its monitor and planner made from `config`: `member_infos()` gives every
        instance's plan.MemberInfo now (the cluster's ledger), `ready(plan)` whether a plan's
        executables are compiled, `tied` whether the head is the tied embedding."""
        return cls(config, OverloadMonitor(config.monitor),
                   GroupPlanner(config.planner, tied, member_infos, cost_model, ready), cost_model)

    def status(self) -> dict:
        """Counters and settings for Admin.Status and the metrics."""
        out = {"overload_policy": self.name, "drops": self.drops, "restores": self.restores,
               "fallbacks": self.fallbacks, "partial_drops": self.partial_drops, "pending": len(self._pending_drop) + len(self._pending_restore)}
        if self.cost_model is not None:
            out["cost_model"] = self.cost_model.error_stats()
        return out

    def _settle(self, views: Sequence[UnitView], now: float) -> set[int]:
        """Forgets pending decisions the views show carried out (or that timed out); returns the
        instances still waiting on one."""
        groups = {v.members: v.group for v in views if v.is_group}
        alive = {v.group for v in views if v.is_group}
        limit = self.config.decision_timeout_s
        for members, t in list(self._pending_drop.items()):
            if members in groups or now - t > limit:
                del self._pending_drop[members]
        for gid, t in list(self._pending_restore.items()):
            if gid not in alive or now - t > limit:
                del self._pending_restore[gid]
        busy = {i for m in self._pending_drop for i in m}
        busy |= {i for v in views if v.is_group and v.group in self._pending_restore for i in v.members}
        return busy

    def decide(self, views: Sequence[UnitView], now: float) -> list[Decision]:
        busy = self._settle(views, now)
        signals = self.monitor.update(views, now)
        for v in views:  # an overload episode ends when the condition no longer holds
            if not v.is_group and not self.monitor.is_over(v):
                self._fallback.discard(v.members[0])
        out: list[Decision] = []
        for s in (s for s in signals if s.kind == "restore"):
            v = s.view
            if v.group in self._pending_restore:
                continue
            self._pending_restore[v.group] = now
            self.monitor.transitioned(v.members, now)
            busy |= set(v.members)
            self.restores += 1
            d = RestoreDecision(v.group, f"nothing queued and demand {s.numbers['demand_of_base']:.0%} of the "
                                f"members' own pages, not rising, for {s.numbers['under_s']:.1f}s", s.numbers)
            log.info("kunserve: restore group %d (instances %s): %s %s", v.group, list(v.members), d.reason, d.numbers)
            out.append(d)
        drops = sorted((s for s in signals if s.kind == "drop"),
                       key=lambda s: -(s.view.demand_pages - s.view.pages_total))  # largest deficit first
        made = 0
        for s in drops:
            v = s.view
            seed = v.members[0]
            if seed in busy or made >= self.config.drops_per_decision:
                continue
            choice, why = self.planner.plan(views, v, exclude=sorted(busy | self._cooling(views, now)))
            if choice is None:
                if seed not in self._fallback:
                    self._fallback.add(seed)
                    self.fallbacks += 1
                    d = FallbackDecision(seed, "no ready plan covers the demand: recompute preemption continues",
                                         {**s.numbers, **why})
                    log.info("kunserve: fallback on instance %d: %s %s", seed, d.reason, d.numbers)
                    out.append(d)
                continue
            numbers = {**s.numbers, "group_demand_pages": choice.demand_pages,
                       "group_pages": choice.capacity_pages, "stages": [(st.start, st.stop) for st in choice.group.stages],
                       "sizes_tried": choice.sizes_tried, "not_ready": choice.not_ready,
                       "exchange_bytes": choice.exchange_bytes}
            if self.cost_model is not None and "d2d" in self.cost_model.bandwidths:
                numbers["predicted_exchange_s"] = round(
                    self.cost_model.transition_time({"d2d": choice.exchange_bytes}), 4)
            self._pending_drop[choice.members] = now
            self.monitor.transitioned(choice.members, now)
            busy |= set(choice.members)
            self._fallback.discard(seed)
            self.drops += 1
            made += 1
            if not choice.covers:
                self.partial_drops += 1
            relief = (f"a group of {choice.group_size} covers it" if choice.covers else
                      f"no group covers it; a group of {choice.group_size} relieves the most "
                      f"({choice.own_pages} -> {choice.capacity_pages} pages)")
            d = DropDecision(choice.members, choice.group_size,
                             f"instance {seed}: committed demand {s.numbers['demand']:.0%} of its pages for "
                             f"{s.numbers['over_s']:.1f}s; {relief}", numbers, choice.plan)
            log.info("kunserve: drop instances %s into a group of %d: %s %s", list(d.instances), d.group_size,
                     d.reason, d.numbers)
            out.append(d)
        return out

    def _cooling(self, views: Sequence[UnitView], now: float) -> set[int]:
        return {v.members[0] for v in views if not v.is_group and self.monitor.cooling(v.members, now)}
