"""The kunserve policy's deciding half on its own (plain Python, no devices): the overload monitor on
synthetic load ramps, the cost model's fit, the group planner, lookahead micro-batches and the
policy's decisions. The planner's page counts are kunjax.control.plan's, on MemberInfos with
realistic proportions (weights about half the budget)."""

import dataclasses
import logging
import math

import numpy as np
import pytest

from kunjax.control.batch import Row
from kunjax.control.cost_model import FEATURES, CostModel, StepSample, fit
from kunjax.control.kunserve import (DropDecision, FallbackDecision, KunserveConfig, KunservePolicy, RestoreDecision,
                                     group_identity)
from kunjax.control.lookahead import form_micro_batches, row_cost
from kunjax.control.monitor import MonitorConfig, OverloadMonitor
from kunjax.control.pages import PageAllocator, pages_for
from kunjax.control.plan import MemberInfo, PlanError, plan_drop, split_layers
from kunjax.control.planner import GroupPlanner, PlannerConfig, balanced_ranges, estimate_pages
from kunjax.control.request import Request, SamplingParams
from kunjax.control.scheduler import Scheduler, SchedulerConfig
from kunjax.control.unit import UnitCore, UnitView
from tools.bench_lookahead import authors_lpt

MB = 1 << 20
L = 8
PAGES = 175  # usable pages of one instance with the infos below


def member_info(i: int, used: int = 0) -> MemberInfo:
    """Budget 266 MB per device (weights 38 %): 8 layers of 10 MB, a tied embedding of 20 MB, 5 MB other, 20 MB
    activation reserve (more than one layer's pages: a drop's gathered chunks need room), pages of 0.1 MB per
    layer: 175 pages alone."""
    return MemberInfo(index=i, budget=266 * MB, layer_bytes=(10 * MB,) * L, embed_bytes=20 * MB, head_bytes=0,
                      other_bytes=5 * MB, reserve=20 * MB, page_layer_bytes=MB // 10, num_pages=PAGES + 1,
                      used_pages=used)


def instance_view(i: int, used: int, queued: int = 0, growth: int = 0, total: int = PAGES) -> UnitView:
    return UnitView(index=i, pages_total=total, pages_free=total - used, queued_pages=queued, running=used // 4,
                    waiting=1 if queued else 0, page_size=16, growth_pages=growth, instances=(i,))


def group_view(index: int, gid: int, members, used: int, total: int, base: int, growth: int = 0) -> UnitView:
    return UnitView(index=index, pages_total=total, pages_free=total - used, queued_pages=0, running=used // 4,
                    waiting=0, page_size=16, growth_pages=growth, instances=tuple(members), group=gid, base_pages=base)


def cost_model() -> CostModel:
    """Per layer 1 ms + 20 us per prefill token + 50 us per decode row + 2 us per context page;
    the head 3 ms + 30 us per row (a head as dear as three layers: a small model's large vocabulary)."""
    return CostModel([0.5e-3, 1e-3, 20e-6, 50e-6, 2e-6, 3e-3, 30e-6], {"d2d": 10e9})


def planner(n: int, used: dict, ready=lambda plan: True, cm=None, **cfg) -> GroupPlanner:
    infos = {i: member_info(i, used.get(i, 0)) for i in range(n)}
    return GroupPlanner(PlannerConfig(max_group_size=cfg.pop("max_group_size", 4), **cfg), tied=True,
                        member_infos=lambda: infos, cost_model=cm, ready=ready)


# ---- cost model ---------------------------------------------------------------------------------
def test_cost_model_fit_recovers_known_coefficients_and_reports_its_error():
    true = cost_model()
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(60):
        pt, dr = (int(rng.integers(16, 512)), 0) if rng.random() < 0.5 else (0, int(rng.integers(1, 64)))
        ctx, layers, head = int(rng.integers(8, 2048)), int(rng.integers(0, L + 1)), bool(rng.random() < 0.7)
        if layers == 0 and not head:
            head = True
        pr = 4 if pt else 0
        t = true.step_time(pt, dr, ctx, layers, head, pr) * (1 + rng.normal(0, 0.002))
        samples.append(StepSample(pt, dr, ctx, layers, t, head, pr))
    got = fit(samples, {"d2d": 10e9})
    np.testing.assert_allclose(got.coef, true.coef, rtol=0.05, atol=2e-6, err_msg=str(dict(zip(FEATURES, got.coef))))
    assert got.error() == 0 and got.error_stats()["observed_steps"] == 0
    assert got.observe(1.1, 1.0) == pytest.approx(10.0)
    assert got.observe(0.8, 1.0) == pytest.approx(15.0)  # running mean of 10 % and 20 %
    got.observe_step(true.step_time(0, 8, 100, L), decode_rows=8, context_pages=100, layers=L)
    assert got.error_stats()["observed_steps"] == 3 and got.error() < 10.1
    assert got.transition_time({"d2d": 10**9}) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="h2d"):
        got.transition_time({"h2d": 1})
    with pytest.raises(ValueError, match="samples"):
        fit([])


def test_cost_model_fit_keeps_costs_non_negative():
    """Samples that cannot tell two features apart (every step runs all layers and the head) still
    give non-negative costs that predict those steps."""
    true = cost_model()
    samples = [StepSample(0, r, 4 * r, L, true.step_time(0, r, 4 * r, L)) for r in (1, 2, 4, 8, 16, 32)]
    got = fit(samples)
    assert np.all(got.coef >= 0)
    for s in samples:
        assert got.step_time(0, s.decode_rows, s.context_pages, L) == pytest.approx(s.seconds, rel=1e-6)


# ---- planner ------------------------------------------------------------------------------------
def test_planner_covers_the_demand_with_the_smallest_group_and_the_least_loaded_partner():
    used = {0: 150, 1: 60, 2: 10, 3: 40}
    views = [instance_view(0, 150, queued=40, growth=30), instance_view(1, 60, growth=20),
             instance_view(2, 10, growth=5), instance_view(3, 40, growth=10)]
    choice, _ = planner(4, used).plan(views, views[0])
    assert choice is not None and choice.members == (0, 2)  # instance 2 has the most spare pages
    assert choice.group_size == 2 and choice.sizes_tried == 1  # a pair covers it: no larger group is planned
    assert choice.demand_pages == 220 + 15 and choice.capacity_pages >= choice.demand_pages > PAGES
    exact = plan_drop([member_info(0, 150), member_info(2, 10)], 2, True, 1 << 30, eligible=[0, 2],
                      ranges=planner(4, used).ranges(L, 2))
    assert choice.group.num_pages == exact.groups[0].num_pages  # the exact count is plan.plan_drop's
    assert choice.exchange_bytes == (150 * 4 + 10 * 4) * (MB // 10)  # every member's pages of the other half

    # with a partner that itself is loaded, the pair no longer covers: larger groups are tried
    loaded = [views[0]] + [instance_view(i, 150, growth=40) for i in (1, 2, 3)]
    choice, why = planner(4, {0: 150, 1: 150, 2: 150, 3: 150}).plan(loaded, loaded[0])
    assert choice is None and why["largest_group_tried"] == 4 and why["demand_pages"] == 220 + 3 * 190


def test_planner_picks_only_ready_plans_and_says_why_it_found_none():
    used = {0: 100, 1: 10, 2: 10}
    views = [instance_view(0, 100, queued=60, growth=40), instance_view(1, 10), instance_view(2, 10)]
    choice, _ = planner(3, used, ready=lambda plan: len(plan.groups[0].instances) == 3).plan(views, views[0])
    assert choice.group_size == 3 and choice.not_ready == 1
    choice, why = planner(3, used, ready=lambda plan: False).plan(views, views[0])
    assert choice is None and why["not_ready"] == 4  # 2 covering plans, then the same 2 as partial relief
    huge = [instance_view(0, 110, queued=5000)] + views[1:]
    choice, why = planner(3, {**used, 0: 110}, min_partial_gain=0).plan(huge, huge[0])
    assert choice is None and why["demand_pages"] == 110 + 5000 + 20 and why["exact_plans"] == 0
    choice, _ = planner(3, {**used, 0: 110}).plan(huge, huge[0])  # nothing covers it: the most relief
    assert not choice.covers and choice.group_size == 3 and choice.capacity_pages > choice.own_pages
    choice, why = planner(3, used).plan(views, views[0], exclude=[1, 2])  # partners busy elsewhere
    assert choice is None and why["candidates"] == 0


def test_planner_takes_the_most_relief_when_every_instance_is_overloaded():
    """Balanced dispatch overloads every instance at once: no pair covers its members' demand, but a
    pair still adds pages (partial relief), unless that gain is below min_partial_gain."""
    views = [instance_view(i, 60, growth=200) for i in range(4)]
    used = {i: 60 for i in range(4)}
    choice, _ = planner(4, used, max_group_size=2).plan(views, views[0])
    assert choice is not None and not choice.covers and choice.group_size == 2
    assert choice.own_pages == 2 * PAGES and choice.capacity_pages >= 1.25 * choice.own_pages
    assert choice.capacity_pages < choice.demand_pages == 2 * 260
    assert planner(4, used, max_group_size=2, min_partial_gain=0).plan(views, views[0])[0] is None
    assert planner(4, used, max_group_size=2, min_partial_gain=0.5).plan(views, views[0])[0] is None
    # the cost-balanced split gives the embedding's stage more layers (fewer pages); the even one is tried too
    cm_planner = planner(4, used, max_group_size=2, cm=cost_model())
    options = cm_planner.candidates(views, views[0], cm_planner.member_infos())[0].options
    assert [r for r, _ in options][-1] == tuple(split_layers(L, 2))
    assert cm_planner.plan(views, views[0])[0].capacity_pages == max(est for _, est in options) == choice.capacity_pages
    covering = [instance_view(0, 60, growth=200)] + [instance_view(i, 10) for i in (1, 2, 3)]
    choice, _ = planner(4, {0: 60}, max_group_size=2).plan(covering, covering[0])
    assert choice.covers


def test_an_instance_measured_a_little_above_its_budget_can_still_drop():
    """KV pools fill the budget at start-up; small arrays measured later as `other` put an instance a
    few KB above it. Its own state is then the limit a transition must stay within, not the budget
    (before, no plan was ever found for it: a restore ends where the instance started)."""
    from kunjax.control.plan import memory_limit

    assert memory_limit(member_info(0)) == member_info(0).budget  # 0.2 MB to spare
    over = [dataclasses.replace(member_info(i, 20), other_bytes=5 * MB + 300 * 1024) for i in range(2)]
    assert all(memory_limit(i) > i.budget for i in over)
    plan = plan_drop(over, 2, True, 1 << 30, eligible=[0, 1])
    assert all(plan.groups[0].peak_bytes[i.index] <= memory_limit(i) for i in over)


@pytest.mark.parametrize("g", [2, 3, 4, 8])
def test_stage_ranges_partition_the_layers_and_balance_the_predicted_cost(g):
    cm = cost_model()
    p = planner(8, {}, cm=cm)
    rng = p.ranges(L, g)
    assert [a for a, _ in rng] == [0] + [b for _, b in rng[:-1]] and rng[-1][1] == L and all(b > a for a, b in rng)
    layer, head = cm.layer_time(decode_rows=32, context_pages=512), cm.head_time(32)

    def slowest(ranges):  # tied: the head runs on the first stage
        return max((b - a) * layer + (head if s == 0 else 0) for s, (a, b) in enumerate(ranges))

    assert slowest(rng) <= slowest(split_layers(L, g)) + 1e-12
    if g == 2:
        assert rng[0][1] - rng[0][0] < rng[1][1] - rng[1][0]  # the head's stage keeps fewer layers
        assert slowest(rng) < slowest(split_layers(L, g))
    # Room for an uneven split: a stage with more than L/g layers must still hold every member's page
    # space at once (a drop keeps each member's page ids at an offset of the group's space).
    infos = {i: MemberInfo(**{**member_info(i).__dict__, "budget": 300 * MB}) for i in range(g)}
    est = estimate_pages(infos, list(range(g)), True, rng, 1 << 30)
    exact = plan_drop(list(infos.values()), g, True, 1 << 30, ranges=rng).groups[0]
    assert [(s.start, s.stop) for s in exact.stages] == list(rng) and exact.num_pages - 1 <= est
    assert balanced_ranges(L, g, 0.0, 1.0, 0.0) == split_layers(L, g)  # no cost model: even


def test_plan_drop_rejects_ranges_that_do_not_partition_the_layers():
    infos = [member_info(0), member_info(1)]
    for bad in ([(0, 4)], [(0, 4), (5, 8)], [(0, 0), (0, 8)], [(0, 5), (4, 8)], [(0, 4), (4, 7)]):
        with pytest.raises(PlanError, match="ranges"):
            plan_drop(infos, 2, True, 1 << 30, ranges=bad)


# ---- monitor and policy -------------------------------------------------------------------------
def ramp(t: float) -> float:
    """Committed demand of instance 0 (pages): flat, up past its capacity (175 pages, crossed at
    t = 19), a plateau, down again; with a deterministic wobble of +-6 pages, so the drop threshold
    is crossed back and forth."""
    if t < 10:
        d = 40
    elif t < 22:
        d = 40 + (t - 10) * 15
    elif t < 60:
        d = 220
    elif t < 80:
        d = 220 - (t - 60) * 10  # the group's demand falls to half its members' pages at t ~ 66
    else:
        d = 20
    return d + 6 * math.sin(t * 7.3)


def run_cluster(policy: KunservePolicy, steps: int, dt: float):
    """Two instances under the ramp; the 'cluster' applies every decision at once: a drop turns them
    into one group view with the planned pages, a restore back into two instances."""
    decisions, grouped = [], None
    for k in range(steps):
        t = k * dt
        d0, d1 = ramp(t), 15
        if grouped is None:
            used0 = min(PAGES, int(d0 * 0.7))
            views = [instance_view(0, used0, queued=max(0, int(d0) - used0 - int(0.3 * d0)), growth=int(0.3 * d0)),
                     instance_view(1, 10, growth=5)]
        else:
            used = int((d0 + d1) * 0.7)
            views = [group_view(0, 7, (0, 1), used, grouped, base=2 * PAGES, growth=int((d0 + d1) * 0.3))]
        for d in policy.decide(views, t):
            decisions.append((t, d))
            if isinstance(d, DropDecision):
                grouped = d.plan.groups[0].num_pages - 1
            elif isinstance(d, RestoreDecision):
                grouped = None
    return decisions


def make_policy(cfg: MonitorConfig = MonitorConfig(), ready=lambda plan: True, n=2, used=None) -> KunservePolicy:
    infos = {i: member_info(i, (used or {0: 100, 1: 10}).get(i, 0)) for i in range(n)}
    return KunservePolicy.build(KunserveConfig(monitor=cfg), tied=True, member_infos=lambda: infos,
                                cost_model=cost_model(), ready=ready)


def test_a_load_ramp_up_and_down_gives_exactly_one_drop_and_one_restore(caplog):
    policy = make_policy()
    with caplog.at_level(logging.INFO, logger="kunjax.control.kunserve"):
        decisions = run_cluster(policy, steps=2000, dt=0.05)  # 100 s, a decision every 50 ms
    kinds = [type(d).__name__ for _, d in decisions]
    assert kinds == ["DropDecision", "RestoreDecision"], decisions
    (t_drop, drop), (t_restore, restore) = decisions
    assert 18.5 < t_drop < 20  # the wobble crosses capacity from t ~ 18.6 on; drop_dwell_s later
    assert drop.instances == (0, 1) and drop.group_size == 2 and drop.numbers["group_pages"] >= drop.numbers["group_demand_pages"] > PAGES
    assert 70 < t_restore < 75 and restore.group_id == 7
    assert group_identity(drop.plan.groups[0], 7) == {"instances": (0, 1), "group": 7, "base_pages": 2 * PAGES}
    assert policy.status() | {"cost_model": None} == {"overload_policy": "kunserve", "drops": 1, "restores": 1,
                                                      "fallbacks": 0, "partial_drops": 0, "pending": 0,
                                                      "cost_model": None}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "drop instances [0, 1]" in lines[0] and "restore group 7" in lines[1]
    assert "group_pages" in lines[0] and "demand_of_base" in lines[1]


def test_no_drop_for_a_spike_shorter_than_the_dwell_and_no_oscillation_at_the_threshold():
    mon = OverloadMonitor(MonitorConfig(drop_dwell_s=0.5))
    signals = []
    for k in range(400):  # demand alternates above and below capacity every iteration: never 0.5 s over
        t = k * 0.01
        v = instance_view(0, PAGES - 10, queued=20 if k % 2 else 0, growth=0)
        signals += mon.update([v], t)
    assert signals == []
    for k in range(400, 460):  # a real overload: held continuously
        signals += mon.update([instance_view(0, PAGES - 10, queued=20)], k * 0.01)
    assert [s.kind for s in signals] == ["drop"] and signals[0].numbers["over_s"] == pytest.approx(0.5)
    surge = OverloadMonitor(MonitorConfig(drop_dwell_s=0.5, drop_surge=1.5))  # a sudden overload: no dwell
    assert [s.kind for s in surge.update([instance_view(1, PAGES - 10, queued=PAGES)], 7.0)] == ["drop"]


def test_restore_waits_for_demand_that_is_low_and_not_rising():
    mon = OverloadMonitor(MonitorConfig(restore_dwell_s=5.0))
    out = []
    for k in range(100):  # low but rising by 10 % of the members' pages over every window
        out += mon.update([group_view(0, 1, (0, 1), 20 + 5 * k, 400, base=224)], k * 0.1)
    assert out == []
    for k in range(100, 200):
        out += mon.update([group_view(0, 1, (0, 1), 60, 400, base=224)], k * 0.1)
    assert [s.kind for s in out] == ["restore"]
    with pytest.raises(ValueError, match="restore_demand"):
        MonitorConfig(restore_demand=1.2).validate()


def test_fallback_is_counted_once_per_overload_episode():
    policy = make_policy(ready=lambda plan: False)
    out = []
    for k in range(200):
        out += policy.decide([instance_view(0, PAGES - 5, queued=10), instance_view(1, 10)], k * 0.05)
    for k in range(200, 220):  # the overload passes
        out += policy.decide([instance_view(0, 50), instance_view(1, 10)], k * 0.05)
    for k in range(220, 300):  # and comes back
        out += policy.decide([instance_view(0, PAGES - 5, queued=10), instance_view(1, 10)], k * 0.05)
    assert [type(d) for d in out] == [FallbackDecision, FallbackDecision]
    # the covering pair, then the same pair as partial relief: neither ready
    assert policy.fallbacks == 2 and policy.drops == 0 and out[0].numbers["not_ready"] == 2


def test_a_pending_drop_is_not_decided_twice():
    policy = make_policy()
    views = [instance_view(0, PAGES - 5, queued=10), instance_view(1, 10)]
    out = []
    for k in range(100):  # the cluster has not carried the drop out yet: views unchanged
        out += policy.decide(views, k * 0.05)
    assert [type(d) for d in out] == [DropDecision]


# ---- views --------------------------------------------------------------------------------------
def test_view_counts_the_expected_growth_of_unfinished_requests():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), PageAllocator(64), 4, 256)
    core = UnitCore(sched)
    core.add(Request("a", list(range(10)), SamplingParams(max_tokens=30)))
    core.add(Request("b", list(range(4)), SamplingParams(max_tokens=4)))
    v = core.view(3, instances=(5,))
    assert v.members == (5,) and not v.is_group
    assert v.growth_pages == (pages_for(40, 4) - pages_for(10, 4)) + (pages_for(8, 4) - pages_for(4, 4))
    assert v.demand_pages == v.pages_used + v.queued_pages + v.growth_pages
    core.typical_output = 6.0  # finished requests were short: expect 6 tokens, not 30
    assert core.view().growth_pages == (pages_for(16, 4) - pages_for(10, 4)) + (pages_for(8, 4) - pages_for(4, 4))
    g = core.view(0, instances=(1, 2), group=9, base_pages=100)
    assert g.is_group and g.members == (1, 2)


# ---- lookahead micro-batches --------------------------------------------------------------------
def req(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), SamplingParams(max_tokens=64))


def test_lookahead_gives_every_stage_equal_predicted_work():
    cm = cost_model()
    rng = np.random.default_rng(1)
    rows = [Row(req(f"d{i}", int(c)), int(c) - 1, 1) for i, c in enumerate(rng.integers(8, 4000, 40))]
    rows += [Row(req(f"p{i}", int(n)), 0, int(n)) for i, n in enumerate((700, 90, 64, 300, 40))]
    for g in (2, 4):
        plan = form_micro_batches(rows, g, cm, page_size=16, stage_layers=L // g)
        assert len(plan.batches) == g and plan.deferred == ()
        assert plan.imbalance < 1.05, plan.predicted_s
        mine = max(plan.predicted_s)
        theirs = max(sum(row_cost(cm, r, 16, L // g) for r in b) for b in authors_lpt(rows, g))
        assert mine < theirs  # balanced on time, not tokens: strictly better here
        # every token of every row runs exactly once, chunks of one request in micro-batch order
        covered = {}
        for j, b in enumerate(plan.batches):
            for r in b:
                covered.setdefault(r.request.request_id, []).append((j, r.start, r.n))
        for r in rows:
            parts = covered[r.request.request_id]
            assert sum(n for _, _, n in parts) == r.n and len({j for j, _, _ in parts}) == len(parts)
            assert [s for _, s, _ in parts] == sorted(s for _, s, _ in parts) and parts[0][1] == r.start
        order = [r.request.request_id for r in plan.rows]
        for rid in covered:
            idx = [i for i, x in enumerate(order) if x == rid]
            assert [plan.rows[i].start for i in idx] == sorted(plan.rows[i].start for i in idx)


def test_lookahead_keeps_the_round_within_the_tpot_slo():
    cm = cost_model()
    rows = [Row(req(f"d{i}", 500), 499, 1) for i in range(16)]
    rows += [Row(req(f"p{i}", 512), 0, 512) for i in range(4)]
    free = form_micro_batches(rows, 2, cm, 16, L // 2)
    slo_ms = free.round_s * 1000 / 2
    plan = form_micro_batches(rows, 2, cm, 16, L // 2, tpot_slo_ms=slo_ms)
    assert plan.round_s * 1000 <= slo_ms * 1.02 < free.round_s * 1000
    assert plan.deferred and all(r.n > 1 for r in plan.deferred)  # decodes never wait
    assert sum(1 for r in plan.rows if r.n == 1) == 16
    ran = {r.request.request_id: r.n for r in plan.rows if r.n > 1}
    for r in plan.deferred:  # what ran plus what waits is the whole prompt, in order
        assert ran.get(r.request.request_id, 0) + r.n == 512 and r.start == ran.get(r.request.request_id, 0)


def test_uncut_lookahead_runs_every_prefill_row_whole_in_one_micro_batch():
    """cut_rows=False (a pipeline group's setting): no prompt chunk is split across micro-batches nor
    cut at the TPOT bound (a cut piece would gather the longest context); rows past the bound wait
    whole, the step's first prefill row runs whatever its cost, decodes always run."""
    cm = cost_model()
    rows = [Row(req(f"d{i}", 500), 499, 1) for i in range(6)]
    rows += [Row(req(f"p{i}", n), 0, n) for i, n in enumerate((900, 64, 300, 40))]
    cut = form_micro_batches(rows, 2, cm, 16, L // 2)
    assert any(r.n not in (1, 900, 64, 300, 40) for r in cut.rows), "the cutting lookahead cuts the 900-token row"
    whole = form_micro_batches(rows, 2, cm, 16, L // 2, cut_rows=False)
    assert sorted(r.n for r in whole.rows) == sorted(r.n for r in rows) and whole.deferred == ()
    assert len(whole.batches) == 2 and all(r.start == 0 for r in whole.rows if r.n > 1)
    tight = form_micro_batches(rows, 2, cm, 16, L // 2, tpot_slo_ms=1e-3, cut_rows=False)
    assert sum(1 for r in tight.rows if r.n == 1) == 6  # decodes never wait
    ran = [r for r in tight.rows if r.n > 1]
    assert [(r.request.request_id, r.start, r.n) for r in ran] == [("p0", 0, 900)]  # the first, whole
    assert [(r.start, r.n) for r in tight.deferred] == [(0, 64), (0, 300), (0, 40)]  # the rest wait whole


def test_dispatch_policies_on_hand_made_views():
    """least_loaded: memory decides where a request can go now, load per instance where among them;
    most_free_pages sends it to the group just formed; fewest_queued ignores that the emptiest queue
    cannot hold the prompt."""
    from kunjax.control.cluster import DISPATCH_POLICIES, FewestQueued, LeastLoaded, MostFreePages

    views = [dataclasses.replace(group_view(0, 7, (0, 1), used=100, total=1900, base=2 * PAGES), waiting=4,
                                 running=60),
             dataclasses.replace(instance_view(1, used=PAGES - 20), waiting=0, running=30),  # 20 free: no room
             dataclasses.replace(instance_view(2, used=100), waiting=1, running=10),
             dataclasses.replace(instance_view(3, used=90), waiting=1, running=20)]
    prompt = 40 * 16  # 40 pages
    assert MostFreePages().choose(views, prompt) == 0
    assert FewestQueued().choose(views, prompt) == 1
    assert LeastLoaded().choose(views, prompt) == 2  # fits; 1 waiting and 10 running per instance beats 3's 20
    assert LeastLoaded().choose(views, 10 * 16) == 1  # 10 pages fit the emptiest queue: it goes there
    full = [dataclasses.replace(v, pages_free=5) for v in views]
    assert LeastLoaded().choose(full, prompt) == FewestQueued().choose(full, prompt) == 1  # nowhere fits now
    assert set(DISPATCH_POLICIES) == {"most_free_pages", "fewest_queued", "least_loaded"}


def test_launcher_dispatch_and_group_shapes_flags(monkeypatch):
    """--dispatch names a DISPATCH_POLICIES entry (default fewest_queued: the simulator's choice) and
    the cluster the launcher builds dispatches with it; --group_shapes a MechanismCluster.group_shapes
    value (default auto: first on these CPU devices, on_demand on accelerators), set on that cluster; a
    bad value is refused by the flag parser, naming the flag."""
    import types

    from kunjax.control.mechanism import resolve_group_shapes
    from absl import flags

    from kunjax.control.cluster import LeastLoaded
    from kunjax.runtime.cluster import ServingCluster
    from serving import launch

    built = {}

    class Built:  # what build_cluster touches of the cluster it built
        engines = []
        platform = "cpu"

        def devices(self):
            return [types.SimpleNamespace(platform=self.platform)]

        def compile_in_background(self):
            built["background"] = True

    def build(model, config, num_instances=1, tp=1, devices=None, policy=None, oplog=None):
        built["policy"] = policy
        return built.setdefault("cluster", Built())

    monkeypatch.setattr(ServingCluster, "build", build)

    try:
        launch.FLAGS.unparse_flags()
        launch.FLAGS(["launch"])
        opts = launch.options_from_flags()
        assert (opts.cluster.dispatch, opts.cluster.group_shapes) == ("fewest_queued", "auto")
        launch.FLAGS.unparse_flags()
        launch.FLAGS(["launch", "--dispatch=least_loaded", "--group_shapes=all"])
        opts = launch.options_from_flags()
        assert (opts.cluster.dispatch, opts.cluster.group_shapes) == ("least_loaded", "all")
        launch.FLAGS.unparse_flags()
        launch.FLAGS(["launch", "--model=tiny", "--dispatch=least_loaded", "--group_shapes=all"])
        cluster = launch.build_cluster(launch.options_from_flags())
        assert isinstance(built["policy"], LeastLoaded) and cluster.group_shapes == "all" and built["background"]
        launch.FLAGS.unparse_flags()
        launch.FLAGS(["launch", "--model=tiny"])
        assert launch.build_cluster(launch.options_from_flags()).group_shapes == "first"  # auto on CPU devices
        built.pop("cluster")
        Built.platform = "gpu"
        assert launch.build_cluster(launch.options_from_flags()).group_shapes == "on_demand"  # auto on GPUs
        assert resolve_group_shapes("all", accelerator=False) == "all"
        with pytest.raises(ValueError, match="group_shapes"):
            resolve_group_shapes("sometimes", accelerator=True)
        launch.FLAGS.unparse_flags()
        with pytest.raises(flags.IllegalFlagValueError, match="dispatch"):
            launch.FLAGS(["launch", "--dispatch=random"])
    finally:
        launch.FLAGS.unparse_flags()


# ---- launcher flags -----------------------------------------------------------------------------
def test_launch_flags_build_the_kunserve_config_and_name_a_bad_one():
    from absl import app

    from serving.launch import MemoryPolicyOptions, kunserve_config

    opts = MemoryPolicyOptions(overload_policy="kunserve", drop_demand=0.9, drop_dwell_s=0.2, drop_surge=1.2,
                               restore_demand=0.4,
                               restore_dwell_s=3.0, transition_cooldown_s=2.0, max_group_size=3, tpot_slo_ms=150.0)
    cfg = kunserve_config(opts)
    assert (cfg.monitor.drop_demand, cfg.monitor.drop_dwell_s, cfg.monitor.restore_demand) == (0.9, 0.2, 0.4)
    assert (cfg.monitor.restore_dwell_s, cfg.monitor.transition_cooldown_s) == (3.0, 2.0)
    assert cfg.planner.max_group_size == 3 and cfg.tpot_slo_ms == 150.0
    for field, value in (("restore_demand", 0.95), ("drop_surge", 0.5), ("max_group_size", 1), ("tpot_slo_ms", 0.0),
                         ("transition_cooldown_s", -1.0), ("min_partial_gain", -0.1)):
        bad = MemoryPolicyOptions(**{**opts.__dict__, field: value})
        with pytest.raises(app.UsageError, match=f"--{field}"):
            kunserve_config(bad)


# ---- the tools ----------------------------------------------------------------------------------
def test_on_a_ramp_the_monitor_fires_before_the_authors_trigger_and_before_recompute_preempts():
    """tools.bench_monitor's ramp on the real scheduler (simulated clock, seeded): the committed
    demand crosses the pages seconds before the first preemption; the authors' rule has not fired."""
    from tools.bench_monitor import simulate

    r = simulate("ramp", 0, duration=32.0)
    first = r["kunserve"][0]
    assert r["first_preemption"] - first > 2.0  # seconds of lead for the drop's transition
    assert r["authors"][0] - first > 2.0 and r["authors"][0] > r["first_preemption"] - 0.5


def test_bench_planner_prints_a_row_per_size(capsys):
    from tools import bench_planner

    assert bench_planner.main(["8", "64"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines()[1:] if l.strip()]
    assert [int(l.split()[0]) for l in rows] == [8, 64] and all("pages for" in l for l in rows)


def test_a_group_scheduler_logs_on_its_members_time_axis_and_its_counters_outlive_it():
    """The group's overload events carry the members' event-log clock (Unix time when serving), not
    their monotonic scheduling clock, so a preemption inside a group lands on the same timeline as
    every other event; and its counters fold into its first member's when it splits."""
    import types

    from kunjax.control.group import group_scheduler

    def sched(clock, event_clock):
        return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), PageAllocator(16), 16, 256,
                         clock=clock, event_clock=event_clock)

    members = [types.SimpleNamespace(config=types.SimpleNamespace(scheduler=SchedulerConfig(max_num_seqs=4)),
                                     page_size=16, max_model_len=256,
                                     scheduler=sched(lambda: 5.0, lambda: 1.7e9)) for _ in range(2)]
    g = group_scheduler(members, types.SimpleNamespace(num_pages=32))
    assert g.clock() == 5.0 and g.events.clock() == 1.7e9
    req = Request("r", list(range(40)), SamplingParams(max_tokens=4))
    g.add(req)
    g.schedule()
    g.preempt(req)
    assert [e["time"] for e in g.events.after()] == [1.7e9]
    before = members[0].scheduler.counters()
    members[0].scheduler.absorb_counters(g)
    after = members[0].scheduler.counters()
    assert after["preemptions"] == before["preemptions"] + 1 == 1
    assert after == {k: v + g.counters()[k] for k, v in before.items()}
