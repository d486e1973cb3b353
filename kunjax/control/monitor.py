"""Overload monitor: when a unit should drop parameters and when a group should split again (plain
Python; evaluated at every scheduler iteration on the units' views, with the time passed in).

What it measures, per unit: the committed KV demand, the pages its requests hold, the pages its
queued requests need for their prompts and the pages all its unfinished requests are expected to
grow into as they generate (UnitView.growth_pages: to max_tokens, or to the unit's typical output
length), against its pages.

    drop     a single instance whose demand >= drop_demand x its pages (at 1.0: its requests cannot
             all finish without a preemption) continuously for drop_dwell_s, or at once when it is
             drop_surge x its pages (a sudden overload: waiting the dwell only costs time)
    restore  a group with nothing queued whose demand <= restore_demand x the pages its members have
             once split (UnitView.base_pages), continuously for restore_dwell_s, and not rising over
             that window (its end at most restore_rise_tolerance x those pages above its start: noise
             in a flat, low demand must not postpone a restore forever)

Why this and not the authors' trigger (usage >= 95 % and queued pages >= free pages): usage only
reaches 95 % once the pages are nearly gone, so the transition's seconds are spent while requests
already wait or get preempted; the committed demand counts the growth of the running requests and
crosses capacity as soon as the admitted work cannot complete in the memory there is, which is
earlier by the time those requests take to grow into the pages (tools/bench_monitor measures it on a
synthetic ramp). The dwell filters what is no overload: a spike of queued prompts that the free pages
absorb within the dwell (finishing requests free their pages) never holds the condition long
enough. Hysteresis against oscillation has three parts: the restore threshold is measured against
the split instances' own pages and lies far below the drop threshold (a split group starts at
<= restore_demand of its capacity, so it needs the demand to double before it drops again); the
restore window requires demand not rising; and `transition_cooldown_s` keeps an instance from a new transition
right after its last one (drop or restore).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from kunjax.control.unit import UnitView


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    drop_demand: float = 1.0  # committed demand / pages at which an instance is overloaded
    drop_dwell_s: float = 0.5  # ... for this long, continuously
    drop_surge: float = 1.5  # ... or at once, when the demand is this many times the pages
    restore_demand: float = 0.5  # committed demand / the members' own pages at which a group may split
    restore_dwell_s: float = 5.0  # ... with nothing queued and demand not rising, for this long
    restore_rise_tolerance: float = 0.05  # "not rising": window end <= start + this x the members' own pages
    transition_cooldown_s: float = 5.0  # no new transition of an instance this soon after its last one

    def validate(self) -> None:
        """Raises ValueError naming the field."""
        if not self.drop_demand > 0:
            raise ValueError(f"drop_demand must be > 0, got {self.drop_demand}")
        if not self.drop_surge >= self.drop_demand:
            raise ValueError(f"drop_surge must be >= drop_demand={self.drop_demand}, got {self.drop_surge}")
        if not 0 <= self.restore_demand < self.drop_demand:
            raise ValueError(f"restore_demand must be in [0, drop_demand={self.drop_demand}), got "
                             f"{self.restore_demand} (the gap between them keeps drop and restore from oscillating)")
        for name in ("drop_dwell_s", "restore_dwell_s", "transition_cooldown_s", "restore_rise_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Signal:
    kind: str  # "drop" (a single instance) or "restore" (a group)
    view: UnitView
    numbers: dict


def unit_key(view: UnitView) -> tuple:
    """A unit's identity across iterations (views' indices shift when units merge and split)."""
    return ("group", view.group) if view.is_group else ("instance", view.members)


def drop_numbers(view: UnitView) -> dict:
    return {"demand_pages": view.demand_pages, "pages_total": view.pages_total, "pages_free": view.pages_free,
            "queued_pages": view.queued_pages, "growth_pages": view.growth_pages, "waiting": view.waiting,
            "demand": round(view.demand_pages / max(1, view.pages_total), 4)}


def restore_numbers(view: UnitView) -> dict:
    base = view.base_pages or view.pages_total
    held = view.pages_used + view.growth_pages
    return {"demand_pages": held, "base_pages": base, "pages_total": view.pages_total, "waiting": view.waiting,
            "demand_of_base": round(held / max(1, base), 4)}


@dataclasses.dataclass
class _UnitState:
    over_since: Optional[float] = None
    last_fired: Optional[float] = None
    under_since: Optional[float] = None
    under_start: float = 0.0  # demand when the restore window began


class OverloadMonitor:
    def __init__(self, config: MonitorConfig = MonitorConfig()):
        config.validate()
        self.config = config
        self._state: dict[tuple, _UnitState] = {}
        self._last_transition: dict[int, float] = {}  # instance -> time of its last drop or restore

    def transitioned(self, instances: Sequence[int], now: float) -> None:
        """The policy decided a drop or restore of these instances at `now` (starts their cooldown)."""
        for i in instances:
            self._last_transition[i] = now

    def cooling(self, instances: Sequence[int], now: float) -> bool:
        return any(now - self._last_transition.get(i, float("-inf")) < self.config.transition_cooldown_s for i in instances)

    def overloaded(self, view: UnitView) -> bool:
        """The drop condition holds now (whether or not it has held long enough)."""
        c = self.config
        pending = view.queued_pages + view.growth_pages
        return (not view.is_group and pending > 0
                and view.demand_pages >= c.drop_demand * max(1, view.pages_total))

    def underloaded(self, view: UnitView) -> bool:
        base = view.base_pages or view.pages_total
        return (view.is_group and view.waiting == 0
                and view.pages_used + view.growth_pages <= self.config.restore_demand * base)

    def is_over(self, view: UnitView) -> bool:
        """The drop condition has held continuously up to the last update."""
        st = self._state.get(unit_key(view))
        return st is not None and st.over_since is not None

    def update(self, views: Sequence[UnitView], now: float) -> list[Signal]:
        """One evaluation (every scheduler iteration): the drop and restore signals due at `now`."""
        c = self.config
        out, seen = [], set()
        for v in views:
            key = unit_key(v)
            seen.add(key)
            st = self._state.setdefault(key, _UnitState())
            if v.transitioning:
                st.over_since = st.under_since = None
                continue
            if self.overloaded(v):
                st.over_since = now if st.over_since is None else st.over_since
                start = max(st.over_since, st.last_fired if st.last_fired is not None else st.over_since)
                surge = st.last_fired is None and v.demand_pages >= c.drop_surge * max(1, v.pages_total)
                if (surge or now - start >= c.drop_dwell_s) and not self.cooling(v.members, now):
                    st.last_fired = now
                    out.append(Signal("drop", v, {**drop_numbers(v), "over_s": round(now - st.over_since, 3)}))
            else:
                st.over_since = st.last_fired = None
            demand = v.pages_used + v.growth_pages
            if self.underloaded(v):
                if st.under_since is None:
                    st.under_since, st.under_start = now, demand
                if now - st.under_since >= c.restore_dwell_s and not self.cooling(v.members, now):
                    if demand <= st.under_start + c.restore_rise_tolerance * (v.base_pages or v.pages_total):
                        out.append(Signal("restore", v, {**restore_numbers(v), "under_s": round(now - st.under_since, 3),
                                                         "demand_at_window_start": st.under_start}))
                        st.under_since = None
                    else:  # rising over the window: a new window starts here
                        st.under_since, st.under_start = now, demand
            else:
                st.under_since = None
        for key in [k for k in self._state if k not in seen]:  # units that merged or split
            del self._state[key]
        return out
