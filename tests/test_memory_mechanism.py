"""Parameter drop, pipelined serving, KV exchange and restore on 8 virtual CPU devices.

Token-exact against an engine that never drops; memory checked against the live arrays XLA holds;
no compilation during a drop, grouped serving or a restore; cancellation and an injected exchange
failure mid-transition."""

import jax
import numpy as np
import pytest

from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from kunjax.io.loader import LoadedModel, load_model
from kunjax.memory import exchange, measure
from kunjax.memory.ledger import device_ledgers
from kunjax.control.plan import PlanError, split_layers
from kunjax.model.config import ModelConfig
from kunjax.model.transformer import init_params
from kunjax.runtime import compile_stats
from kunjax.runtime.cluster import ServingCluster
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.text.tokenizer import ByteTokenizer

CONFIG = EngineConfig(page_size=8, num_pages=48, max_model_len=128, hbm_bytes=64 << 20,
                      scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_rows=2))


def prompts_for(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 300, int(rng.integers(5, 40))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(load_model("tiny", "float32"), CONFIG)


def run_with_transitions(cluster, prompts, params, drop_at, restore_at, group_size):
    """Generates, dropping after `drop_at` steps and restoring `restore_at` steps later."""
    ids = [cluster.add_request(p, sp) for p, sp in zip(prompts, params)]
    outs, steps, reports = {}, 0, {}
    while cluster.has_unfinished():
        if steps == drop_at:
            plan = cluster.plan_drop(group_size)
            cluster.compile_plan(plan, background=False)
            c0 = compile_stats.compile_count()
            reports["drop"], failed = cluster.drop(plan)
            assert failed == []
            reports["compiles_before"] = c0
        if steps == drop_at + restore_at:
            (reports["restore"],), failed = cluster.restore()
            assert failed == []
            reports["compiles_grouped"] = compile_stats.compile_count() - reports["compiles_before"]
        for o in cluster.step():
            if o.finished:
                outs[o.request_id] = o
        steps += 1
    return [outs[i].token_ids for i in ids], reports


@pytest.mark.parametrize("group_size,tp", [(2, 1), (3, 1), (4, 1), (2, 2)], ids=["g2", "g3", "g4", "g2-tp2"])
def test_drop_and_restore_mid_generation_are_token_exact(host_model, reference, group_size, tp):
    """Requests in flight across a drop and across a restore produce exactly the tokens of a run with
    no drop; the tiny model's 4 layers do not divide by 3; nothing compiles during the drop, the
    grouped steps or the restore once the plan's executables are ready."""
    prompts = prompts_for(10, seed=group_size)
    params = [SamplingParams(max_tokens=20 + i % 7, ignore_eos=True) for i in range(10)]
    want = [o.token_ids for o in reference.generate(prompts, params)]
    cluster = ServingCluster.build(host_model, CONFIG, num_instances=group_size, tp=tp)
    got, rep = run_with_transitions(cluster, prompts, params, drop_at=4, restore_at=6, group_size=group_size)
    assert got == want
    assert rep["drop"].compiles == 0 and rep["restore"].compiles == 0 and rep["compiles_grouped"] == 0
    assert rep["drop"].exchange.bytes_between_devices > 0 and rep["restore"].exchange.bytes_between_devices > 0
    st = cluster.status(with_memory=False)
    assert st["groups"] == [] and st["pages_free"] == st["pages_total"]
    assert all(i["layers"] == [0, 4] for i in st["instances"])


def test_split_layers_any_group_size():
    assert split_layers(30, 4) == [(0, 7), (7, 14), (14, 22), (22, 30)]
    assert split_layers(4, 3) == [(0, 1), (1, 2), (2, 4)]
    with pytest.raises(PlanError, match="group_size"):
        split_layers(4, 5)


def wide_model() -> LoadedModel:
    """Random Llama weights large enough that weights are a realistic share of a small budget."""
    cfg = ModelConfig(model_type="llama", vocab_size=384, hidden_size=256, intermediate_size=768, num_layers=6,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=512,
                      bos_token_id=256, eos_token_ids=(257,))
    return LoadedModel("wide", cfg, init_params(cfg, seed=3, scale=0.05), ByteTokenizer(384))


def test_memory_is_real_through_a_cycle():
    """Weights take ~40 % of each device's budget. The drop frees exactly the dropped layers' bytes
    (measured from live arrays), the group's KV room grows as the plan predicts, live bytes never pass
    the budget during the drop and the restore, and after drop -> restore -> drop -> restore every
    device is back to its starting bytes with every page free."""
    model = wide_model()
    cfg = EngineConfig(page_size=8, hbm_bytes=48 << 20, max_model_len=256,
                       scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_rows=1))
    cluster = ServingCluster.build(model, cfg, num_instances=2, tp=1)
    budget = cfg.hbm_bytes
    weights = cluster.engines[0].memory_split.weights
    assert 0.3 < weights / budget < 0.5, weights / budget
    devices = cluster.devices()
    start = {d: measure.device_live_bytes(d) for d in devices}
    ledger0 = {led.device: led for led in device_ledgers(cluster.engines)}
    prompts = prompts_for(6, seed=11)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    # the reference on a device the cluster does not use (its budget is its own)
    want = [o.token_ids for o in LLMEngine(model, cfg, device=jax.devices()[7]).generate(prompts, params)]
    ids = [cluster.add_request(p, params) for p in prompts]
    for _ in range(5):
        cluster.step()
    pages_before = [e.stage.num_pages for e in cluster.engines]
    plan = cluster.plan_drop(2)
    gp = plan.groups[0]
    cluster.compile_plan(plan, background=False)
    report, _ = cluster.drop(plan)
    # freed weight bytes per device = the layers (and embedding / head) each stage gave up, as measured
    for st, e in zip(gp.stages, cluster.engines):
        led = ledger0[str(e.device)]
        given_up = sum(n for l, n in led.layers.items() if not st.holds(l))
        given_up += (0 if st.embed else led.embed) + (0 if st.head else led.head)
        assert report.freed_weight_bytes[str(e.device)] == given_up
    for d, peak in report.peak_live.items():
        assert peak <= budget, (d, peak)
    for st, led in zip(gp.stages, device_ledgers(cluster.engines)):
        assert sorted(led.layers) == list(range(st.start, st.stop))
        per_page_layer = 2 * 8 * 2 * 64 * 4  # K and V, page of 8 tokens, 2 kv heads x 64, f32
        assert led.kv == gp.num_pages * per_page_layer * st.num_layers
        assert led.live <= budget - led.reserve
    assert gp.num_pages > max(pages_before), "the group's page space must grow beyond an instance's"
    for _ in range(4):
        cluster.step()
    (rrep,), _ = cluster.restore()
    for d, peak in rrep.peak_live.items():
        assert peak <= budget, (d, peak)
    # a second cycle, then run everything out
    plan = cluster.plan_drop(2)
    cluster.compile_plan(plan, background=False)
    cluster.drop(plan)
    outs = {}
    steps = 0
    while cluster.has_unfinished():
        for o in cluster.step():
            if o.finished:
                outs[o.request_id] = o
        steps += 1
        if steps == 3:
            cluster.restore()
    if cluster.groups():
        cluster.restore()
    assert [outs[i].token_ids for i in ids] == want
    st = cluster.status(with_memory=False)
    assert st["pages_free"] == st["pages_total"] and st["groups"] == []
    end = {d: measure.device_live_bytes(d) for d in devices}
    assert end == start


def _live_total(cluster) -> int:
    live = measure.live_bytes_by_device()
    return sum(live.get(d, 0) for d in cluster.devices())


def _finish(cluster) -> dict:
    outs = {}
    while cluster.has_unfinished():
        for o in cluster.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


@pytest.mark.parametrize("point", ["allocate", "scatter", "restore"])
def test_a_failure_at_any_point_leaves_the_cluster_serving(host_model, reference, point):
    """Failure injection inside a transition: in a drop (allocating a group pool after old pools are
    gone, or mid-exchange) the piece is put back from its chunks and the drop rolls back: nothing is
    lost, every request token-exact, live bytes back to the start. In a restore the requests whose
    pages a failed copy held fail; the others keep their tokens and the cluster ends split."""
    prompts = prompts_for(6, seed=21)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    want = {i: o.token_ids for i, o in enumerate(reference.generate(prompts, params))}
    cluster = ServingCluster.build(host_model, CONFIG, num_instances=2, tp=1)
    plan = cluster.plan_drop(2)
    cluster.compile_plan(plan, background=False)
    live0 = _live_total(cluster)
    ids = [cluster.add_request(p, params) for p in prompts]
    for _ in range(4):
        cluster.step()
    calls = {"n": 0}
    victims = None

    def inject(event, info):
        calls["n"] += event == point
        if event == point and calls["n"] == 3:
            raise RuntimeError(f"injected {point} failure")
    if point == "restore":
        cluster.drop(plan)
    exchange.FAULT_HOOK = inject
    try:
        if point == "restore":
            (report,), failed = cluster.restore()
            victims = {o.request_id for o in failed}
            assert victims and all(o.finish_reason == "error" for o in failed)
            assert report.state == "done" and cluster.groups() == []
        else:
            report, failed = cluster.drop(plan)
            assert failed == [] and report.state == "rolled_back" and point in report.error
            assert cluster.groups() == [] and all(e.route is None for e in cluster.engines)
    finally:
        exchange.FAULT_HOOK = None
    outs = _finish(cluster)
    for k, rid in enumerate(ids):
        if not victims or rid not in victims:
            assert outs[rid].token_ids == want[k], rid
    assert cluster.generate([prompts[0]], params)[0].token_ids == want[0]
    st = cluster.status(with_memory=False)
    assert st["pages_free"] == st["pages_total"]
    assert _live_total(cluster) == live0


def test_units_outside_the_group_and_the_group_itself_step_through_a_transition(host_model, reference, monkeypatch):
    """3 instances, a group of 2 forms and splits again in many pieces (one atom each: a zero time
    budget): the instance outside the group steps between every piece, the members keep decoding
    through their own drop, and the outputs stay token-exact."""
    from kunjax.control import transition

    monkeypatch.setattr(transition, "PIECE_STEPS", 0.0)
    prompts = prompts_for(6, seed=4)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = {i: o.token_ids for i, o in enumerate(reference.generate(prompts, params))}
    cluster = ServingCluster.build(host_model, CONFIG, num_instances=3, tp=1)
    ids = [cluster.add_request(p, params) for p in prompts]
    for _ in range(3):
        cluster.step()
    outside = cluster.engines[2]
    assert outside.scheduler.running
    members = cluster.engines[:2]
    member_reqs = [r for m in members for r in m.scheduler.running]
    plan = cluster.plan_drop(2)
    assert plan.alone == (2,)
    cluster.compile_plan(plan, background=False)
    c0 = compile_stats.compile_count()
    task = cluster.start_drop(plan)
    steps0, tokens0 = outside.num_steps, sum(len(r.output_token_ids) for r in member_reqs)
    outs = {}
    while not task.done:
        for o in cluster.step():
            if o.finished:
                outs[o.request_id] = o
    atoms = plan.groups[0].drop_atoms()
    assert max(map(len, atoms)) == 1, "room for one layer an atom: the members wait for one layer at a time"
    assert 4 <= task.report.pieces <= len(atoms) + 2  # begin, one atom a piece while the members step, finish
    assert outside.num_steps - steps0 >= task.report.pieces - 1, "the outside instance stepped between pieces"
    assert sum(len(r.output_token_ids) for r in member_reqs) - tokens0 >= task.report.pieces - 2, \
        "the members decoded through their own drop"
    assert task.report.exchange.bytes_between_devices > 0 and task.report.exchange.bytes_local > 0
    [rtask] = cluster.start_restore()
    steps1 = outside.num_steps
    while not rtask.done:
        for o in cluster.step():
            if o.finished:
                outs[o.request_id] = o
    assert outside.num_steps - steps1 >= rtask.report.pieces - 1
    assert compile_stats.compile_count() == c0
    outs.update(_finish(cluster))
    assert [outs[i].token_ids for i in ids] == [want[k] for k in range(len(ids))]
    st = cluster.status(with_memory=False)
    assert st["pages_free"] == st["pages_total"]


def test_restore_refused_while_the_group_is_too_full(host_model):
    cfg = EngineConfig(page_size=8, num_pages=10, max_model_len=64, hbm_bytes=64 << 20,
                       scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_rows=2))
    cluster = ServingCluster.build(host_model, cfg, num_instances=2, tp=1)
    plan = cluster.plan_drop(2)
    cluster.compile_plan(plan, background=False)
    cluster.drop(plan)
    group = cluster.groups()[0]
    assert group.num_pages > 10
    for p in prompts_for(8, seed=5):
        cluster.add_request(p[:30], SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(10):
        cluster.step()
    from kunjax.memory.restore import RestoreError

    if group.allocator.num_used > 2 * 9:
        with pytest.raises(RestoreError, match="more than its 2 instances can hold"):
            cluster.restore()
        assert cluster.groups() == [group]
    while cluster.has_unfinished():
        cluster.step()
    cluster.restore()
    assert cluster.groups() == []


def test_kunserve_drops_and_restores_by_itself_through_a_burst(host_model, reference):
    """The automatic policy: a burst that overloads both instances' KV makes the cluster drop into a
    group by itself (the plan from the pool ladder, compiled ahead), and restore once the load has
    passed; every request ends token-exact with an unloaded run, every page free, every parameter
    back, every device's live bytes at the start."""
    from kunjax.control.kunserve import KunserveConfig
    from kunjax.control.monitor import MonitorConfig

    prompts = prompts_for(12, seed=8)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = [o.token_ids for o in reference.generate(prompts, params)]
    cluster = ServingCluster.build(host_model, CONFIG, num_instances=2, tp=1)
    cluster.compile_ladder(background=False)
    ready, total = cluster.plan_ready(cluster.plan_drop(2))
    assert ready == total, "after the ladder compiled, every plan the planner can return is ready"
    live0 = _live_total(cluster)
    c0 = compile_stats.compile_count()
    from kunjax.control.cost_model import CostModel

    cm = CostModel([0.5e-3, 1e-3, 20e-6, 50e-6, 2e-6, 3e-3, 30e-6], {"d2d": 10e9})
    cluster.enable_kunserve(KunserveConfig(monitor=MonitorConfig(drop_dwell_s=0.0, restore_dwell_s=0.3,
                                                                 transition_cooldown_s=0.0)), cm)
    ids = [cluster.add_request(p, params) for p in prompts]
    outs, grouped_at = {}, None
    while cluster.has_unfinished() or cluster.groups():
        for o in cluster.step():
            if o.finished:
                outs[o.request_id] = o
        if cluster.groups() and grouped_at is None:
            grouped_at = len(outs)
    assert grouped_at is not None, "the burst never made the cluster drop"
    st = cluster.status(with_memory=False)
    assert st["transition_counts"]["drops"] >= 1 and st["transition_counts"]["restores"] >= 1
    assert st["overload_policy"]["drops"] >= 1 and st["overload_policy"]["restores"] >= 1
    assert st["overload_policy"]["cost_model"]["observed_steps"] > 0  # it reports its own error
    assert [outs[i].token_ids for i in ids] == want
    assert st["pages_free"] == st["pages_total"] and cluster.groups() == []
    assert all(sorted(e.stage.layers) == list(range(4)) and e.stage.embed is not None for e in cluster.engines)
    assert _live_total(cluster) == live0
    assert compile_stats.compile_count() == c0


def test_lookahead_micro_batches_keep_a_group_token_exact(host_model, reference):
    """A group with a cost model splits its steps into lookahead micro-batches (equal predicted work,
    prefill beyond the TPOT bound deferred to later steps); outputs stay token-exact."""
    from kunjax.control.cost_model import CostModel

    prompts = prompts_for(8, seed=31)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in reference.generate(prompts, params)]
    cluster = ServingCluster.build(host_model, CONFIG, num_instances=2, tp=1)
    plan = cluster.plan_drop(2)
    cluster.compile_plan(plan, background=False)
    cluster.drop(plan)
    (group,) = cluster.groups()
    group.pipeline_depth = 2  # as on accelerators, where stages overlap
    group.cost_model = CostModel([0.5e-3, 1e-3, 20e-6, 50e-6, 2e-6, 3e-3, 30e-6], {"d2d": 10e9})
    group.tpot_slo_ms = 5.0  # tight: long prefills are cut and deferred
    splits = []
    real = group.micro_batches
    group.micro_batches = lambda step: splits.append(len(real(step))) or real(step)
    outs = cluster.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert max(splits) == 2
    cluster.restore()


def test_a_padded_group_step_compiles_its_shape_in_the_background(host_model, reference):
    """group_shapes=on_demand on a real group: a step whose shape the group's pools lack (the plan
    compiled only the covering shapes) runs padded, or for a prefill micro-batch waits for a later
    step, and the cluster queues a shape on every stage's background compiler, once; nothing
    compiles on the request path; the same wave again runs those shapes exact; both waves
    token-exact with an unloaded run."""
    prompts = prompts_for(3, seed=41)  # 3 prompts: 2 prefill micro-batches (2 rows + 1), decodes of 3 rows
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in reference.generate(prompts, params)]
    cluster = ServingCluster.build(host_model, CONFIG, num_instances=2, tp=1)
    cluster.group_shapes = "on_demand"
    plan = cluster.plan_drop(2)
    cluster.compile_plan(plan, background=False)
    cluster.drop(plan)
    [group] = cluster.groups()
    group.max_prefill_padding = 1.5  # the one-row prefill micro-batch runs at 2 rows: it waits instead
    picks, deferred = [], []
    pick, shaped = group.pick, group.shaped_parts
    group.pick = lambda needed, ready: picks.append((needed, pick(needed, ready))) or picks[-1][1]

    def shaped_parts(step, ready):
        n = len(step.rows)
        out = shaped(step, ready)
        deferred.append(n - len(step.rows))
        return out

    group.shaped_parts = shaped_parts
    c0, f0 = compile_stats.compile_count(), compile_stats.foreground_compile_count()
    assert [o.token_ids for o in cluster.generate(prompts, params)] == want
    assert any(deferred), "a padded prefill micro-batch waited for a later step"
    wanted = list(cluster.wanted_group_shapes)
    assert wanted and all(k[:2] == ((0, 1), group.num_pages) for k in wanted) and len(set(wanted)) == len(wanted)
    shapes = {k[2] for k in wanted}
    assert all(s != n for n, s in picks if n in shapes)  # ran padded (or waited) the first time
    compilers = list(cluster.group_compilers.values())
    assert len(compilers) == 2 and all(c.wait(300) for c in compilers) and not any(c.errors for c in compilers)
    assert compile_stats.compile_count() - c0 == sum(c.done for c in compilers) > 0  # all in the background
    assert compile_stats.foreground_compile_count() == f0
    assert all(group.ready(shape) for shape in shapes)
    del picks[:]
    assert [o.token_ids for o in cluster.generate(prompts, params)] == want
    assert any(s == n and n in shapes for n, s in picks)  # now exact
    # --group_shapes=all: every shape's layer executable at every ladder size, beyond the first shapes'
    from kunjax.runtime.executables import LAYER

    first, every = cluster.ladder_keys(), cluster.ladder_keys(all_shapes=True)
    for (ex, few), (ex2, keys) in zip(first, every):
        assert ex is ex2 and set(few) < set(keys)
        layer = {(k.rows, k.query, k.pages, k.pool_pages) for k in keys if k.kind == LAYER}
        assert layer >= {(sh.rows, sh.query, sh.pages, p) for sh in group.buckets.all_shapes() for p in cluster.ladder()}
    cluster.close()
