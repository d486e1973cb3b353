"""The control plane on its own: no JAX, no devices. Scheduling, page accounting, dispatch, overload
policy and the cluster loop are driven through the step-unit interface with a fake unit whose
"device" answers (last token + 1) mod 100, so every output can be worked out by hand (the way
JetStream tests its orchestrator with a mock engine)."""

import os
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import kunjax.control
from kunjax.control.cluster import Cluster, MostFreePages
from kunjax.control.ops import STEP, DeviceOp, decode_ops, encode_ops
from kunjax.control.overload import Preempt, Stall
from kunjax.control.pages import PageAllocator
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import Scheduler, SchedulerConfig
from kunjax.control.unit import UnitCore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTROL_MODULES = ["kunjax.control." + m.name for m in pkgutil.iter_modules(kunjax.control.__path__)]


def test_control_plane_imports_without_jax():
    """Every control-plane module imports with jax made unimportable (a fresh interpreter: this one
    has jax loaded already)."""
    assert len(CONTROL_MODULES) >= 8, CONTROL_MODULES
    code = ("import sys, importlib\n"
            "for name in ('jax', 'jaxlib', 'flax', 'orbax'):\n"
            "    sys.modules[name] = None  # 'import jax' now raises ImportError\n"
            f"for m in {CONTROL_MODULES!r}:\n"
            "    importlib.import_module(m)\n"
            "print('ok', len([m for m in sys.modules if m.startswith('kunjax.')]))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


class FakeUnit(UnitCore):
    """A step unit with a hand-computable device: every sampling row answers (last token + 1) % 100."""

    def __init__(self, num_pages: int, page_size: int = 4, policy=None):
        sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_prefill_rows=2),
                          PageAllocator(num_pages), page_size, max_model_len=64, policy=policy)
        super().__init__(sched, eos_ids=())
        self.executed: list[DeviceOp] = []

    def prepare(self, step):
        last = [r.request.all_token_ids[r.start + r.n - 1] for r in step.rows]
        return DeviceOp(STEP, 0, {"prefill": step.prefill}, {"last": np.asarray(last, np.int32)})

    def execute(self, op):
        self.executed.append(op)
        return (op.arrays["last"] + 1) % 100

    def finish(self, step, handle):
        return self.apply(step, handle.tolist())

    def status(self):
        return self.host_status()


class FakeFrontend:
    tokenizer = None
    max_model_len = 64

    def validate(self, ids, params):
        if not ids:
            raise ValueError("prompt is empty")

    def detokenizer(self, ids):
        return None


class RecordingLog:
    def __init__(self, units):
        self.units = units
        self.sent: list[tuple[str, int, int]] = []

    def send(self, ops):
        for op in ops:  # the op is logged before any unit has executed it
            self.sent.append((op.kind, op.target, len(self.units[op.target].executed) if op.target >= 0 else -1))


def expected(prompt, n):
    return [(prompt[-1] + i) % 100 for i in range(1, n + 1)]


def test_cluster_loop_with_fake_units():
    units = [FakeUnit(64), FakeUnit(64)]
    log = RecordingLog(units)
    cluster = Cluster(units, FakeFrontend(), MostFreePages(), oplog=log)
    prompts = [[i, 10 + i, 20 + i] for i in range(6)]
    outs = cluster.generate(prompts, [SamplingParams(max_tokens=3 + i % 4) for i in range(6)])
    assert [o.token_ids for o in outs] == [expected(p, 3 + i % 4) for i, p in enumerate(prompts)]
    assert all(u.executed for u in units), "the policy spreads requests over both units"
    assert log.sent and all(kind == STEP for kind, _, _ in log.sent)
    # every op was sent before its unit executed it, and each unit saw its ops in log order
    for target in (0, 1):
        seen = [n for _, t, n in log.sent if t == target]
        assert seen == list(range(len(units[target].executed)))
    st = cluster.status()
    assert st["pages_free"] == st["pages_total"] and st["running"] == st["waiting"] == 0


def test_recompute_preemption_keeps_outputs_and_frees_pages():
    unit = FakeUnit(num_pages=9, page_size=4)  # 8 usable pages: 32 tokens for 4 requests of 14
    cluster = Cluster([unit], FakeFrontend())
    prompts = [[7, 8, 9, 10, 11, 12]] * 4
    outs = cluster.generate(prompts, SamplingParams(max_tokens=8))
    assert unit.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [expected(p, 8) for p in prompts]
    assert unit.allocator.num_free == unit.allocator.num_usable


def test_policy_actions_are_carried_out():
    class StallThenPreempt:
        """Stalls the needing request once, then preempts the latest arrival."""
        name = "test"

        def __init__(self):
            self.calls = []

        def on_out_of_pages(self, running, needing):
            self.calls.append(needing.request_id)
            if len(self.calls) == 1:
                return Stall(needing)
            return Preempt(max(running, key=lambda r: r.arrival_time))

    policy = StallThenPreempt()
    unit = FakeUnit(num_pages=9, page_size=4, policy=policy)
    outs = Cluster([unit], FakeFrontend()).generate([[1, 2, 3, 4, 5, 6]] * 4, SamplingParams(max_tokens=8))
    assert len(policy.calls) >= 2 and unit.scheduler.out_of_pages_events >= 2
    assert [o.token_ids for o in outs] == [expected([6], 8)] * 4
    assert unit.allocator.num_free == unit.allocator.num_usable


def test_abort_and_duplicate_ids():
    unit = FakeUnit(32)
    cluster = Cluster([unit], FakeFrontend())
    rid = cluster.add_request([1, 2, 3], SamplingParams(max_tokens=50), request_id="r")
    with pytest.raises(ValueError, match="already in use"):
        cluster.add_request([4], SamplingParams(max_tokens=2), request_id="r")
    cluster.step()
    assert unit.allocator.num_used > 0
    out = cluster.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    assert unit.allocator.num_used == 0 and not cluster.has_unfinished()


def test_device_ops_round_trip_the_wire():
    ops = [DeviceOp(STEP, 1, {"shape": [4, 1, 8], "num_rows": 3}, {"tokens": np.arange(4, dtype=np.int32)}),
           DeviceOp("drop", -1, {"groups": [[0, 1]]}),
           DeviceOp("kv_copy", -1, {"layer": 3}, {"pages": np.asarray([5, 6], np.int32),
                                                   "f": np.ones((2, 2), np.float32)})]
    back = decode_ops(*encode_ops(ops))
    assert [(o.kind, o.target, o.args) for o in back] == [(o.kind, o.target, o.args) for o in ops]
    for a, b in zip(ops, back):
        assert a.arrays.keys() == b.arrays.keys()
        for k in a.arrays:
            np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
            assert a.arrays[k].dtype == b.arrays[k].dtype


def test_cluster_ops_go_through_the_log_in_order():
    units = [FakeUnit(16)]
    log = RecordingLog(units)
    cluster = Cluster(units, FakeFrontend(), oplog=log)
    ran = []
    cluster.register_op("drop", lambda c, op: ran.append(("drop", op.args["g"])))
    cluster.register_op("restore", lambda c, op: ran.append(("restore", None)))
    cluster.add_request([1], SamplingParams(max_tokens=2))
    cluster.step()
    cluster.run_op(DeviceOp("drop", -1, {"g": 2}))
    cluster.step()
    cluster.run_op(DeviceOp("restore", -1))
    assert [k for k, _, _ in log.sent] == [STEP, "drop", STEP, "restore"]
    assert ran == [("drop", 2), ("restore", None)]
    with pytest.raises(ValueError, match="no handler"):
        cluster.execute(DeviceOp("unknown", -1))


def test_drop_planner_without_devices():
    """The planner on plain numbers: stage ranges, the group's page count, and a predicted transition
    peak that stays within every member's budget."""
    from kunjax.control.plan import MemberInfo, PlanError, assign_requests, plan_drop, simulate_restore

    mib = 1 << 20
    infos = [MemberInfo(index=i, budget=100 * mib, layer_bytes=(4 * mib,) * 10, embed_bytes=6 * mib,
                        head_bytes=6 * mib, other_bytes=mib, reserve=5 * mib, page_layer_bytes=4 << 10,
                        num_pages=900, used_pages=300 + 50 * i) for i in range(3)]
    plan = plan_drop(infos, 3, tied=False, max_pages_per_instance=10_000)
    (gp,) = plan.groups
    assert plan.alone == () and [(s.start, s.stop) for s in gp.stages] == [(0, 3), (3, 6), (6, 10)]
    assert gp.stages[0].embed and gp.stages[2].head and not gp.stages[1].embed
    assert gp.num_pages > 900 * 2  # each member keeps a third of the layers: its KV room per layer grows
    for st in gp.stages:
        i = infos[st.instance]
        assert gp.peak_bytes[st.instance] <= i.budget
        assert gp.steady_bytes[st.instance] + i.reserve <= i.budget
    # a tighter budget gives fewer pages
    tighter = plan_drop([MemberInfo(**{**i.__dict__, "budget": i.budget - mib}) for i in infos], 3,
                       tied=False, max_pages_per_instance=10_000)
    assert tighter.groups[0].num_pages < gp.num_pages
    assert gp == plan_drop(infos, 3, tied=False, max_pages_per_instance=10_000).groups[0]  # deterministic
    with pytest.raises(PlanError, match="group_size"):
        plan_drop(infos, 4, tied=False, max_pages_per_instance=10_000)
    peak = simulate_restore({i.index: i for i in infos}, gp, 64, {0: 100, 1: 100, 2: 100})
    assert all(p <= 100 * mib for p in peak.values())
    assert assign_requests({"a": 5, "b": 4, "c": 2}, {0: 6, 1: 6}) == {"a": 0, "b": 1, "c": 1}
    assert assign_requests({"a": 5, "b": 4, "c": 3}, {0: 6, 1: 6}) is None
    assert assign_requests({"a": 7}, {0: 6, 1: 6}) is None


def test_drop_atoms_move_one_layer_where_memory_allows_and_whole_rounds_where_not():
    """A drop's atoms are single layers when every state between them (the members may step there,
    activation reserve kept) and every transient fits; a round without that room stays whole; the
    end state is the same either way."""
    from kunjax.control.plan import MemberInfo, drop_atoms, layer_rounds, memory_limit, plan_drop, simulate_drop

    mib = 1 << 20

    def infos(embed):  # tied; each instance's KV pools fill its budget, as at start-up
        pages = (200 * mib - mib - 32 * mib - embed - 5 * mib) // (8 * (8 << 10))
        return {i: MemberInfo(index=i, budget=200 * mib, layer_bytes=(4 * mib,) * 8, embed_bytes=embed,
                              head_bytes=0, other_bytes=mib, reserve=5 * mib, page_layer_bytes=8 << 10,
                              num_pages=pages, used_pages=200) for i in range(2)}

    def plan(infos):
        return plan_drop(list(infos.values()), 2, tied=True, max_pages_per_instance=10_000).groups[0]

    roomy = infos(40 * mib)  # the second member's embedding copy is the first room
    gp = plan(roomy)
    atoms = gp.drop_atoms()
    assert sorted(l for a in atoms for l in a) == list(range(8)) and max(map(len, atoms)) == 1
    assert atoms[0] == [4], "the member with room (its embedding copy freed) takes its layer first"
    _, final, between = simulate_drop(roomy, gp.stages, gp.layer_order, gp.num_pages, 64, atoms)
    assert all(between[m] + roomy[m].reserve <= memory_limit(roomy[m]) for m in roomy)
    assert final == simulate_drop(roomy, gp.stages, gp.layer_order, gp.num_pages, 64)[1]
    assert gp == type(gp).from_dict(gp.to_dict())

    # No first room: whichever owner goes first would take its grown pool before the other member
    # frees anything, and the budgets are full, so no round can be cut.
    tight = infos(0)
    gp = plan(tight)
    assert gp.drop_atoms() == layer_rounds(gp.layer_order, gp.stages)
    assert drop_atoms(tight, gp.stages, gp.layer_order, gp.num_pages, 64) == layer_rounds(gp.layer_order, gp.stages)


def test_a_round_whose_rest_does_not_fit_after_a_cut_stays_whole(monkeypatch):
    """drop_atoms' fallback: one layer of a round fits alone, then neither the other layer nor the
    rest of the round does; the round stays one atom (the states plan_group checked)."""
    from kunjax.control import plan as P

    mib = 1 << 20
    infos = {i: P.MemberInfo(index=i, budget=100 * mib, layer_bytes=(mib,) * 4, embed_bytes=0, head_bytes=0,
                             other_bytes=0, reserve=0, page_layer_bytes=1024, num_pages=10, used_pages=1)
             for i in range(2)}
    stages = P.stage_plans([0, 1], 4, tied=False)
    order = P.interleaved_order([(s.start, s.stop) for s in stages])  # rounds [0, 2], [1, 3]
    calls = []

    def fake_atom(infos, stages, layers, num_pages, chunk_pages, cur):
        calls.append(list(layers))
        assert len(calls) < 50, "drop_atoms keeps trying"
        if len(layers) == 1 and layers[0] in (0, 1) and cur == {0: 0, 1: 0}:
            return {0: 1, 1: 1}, {0: 1, 1: 1}  # the first layer of a round fits alone
        if len(layers) == 2:
            return {0: 0, 1: 0}, {0: 0, 1: 0}  # the whole round, from its start
        return {0: 10 ** 12, 1: 0}, {0: 10 ** 12, 1: 0}  # nothing else fits

    monkeypatch.setattr(P, "_drop_atom", fake_atom)
    assert P.drop_atoms(infos, stages, order, 20, 64) == [[0, 2], [1, 3]]


def test_piece_pacer_runs_atoms_within_a_share_of_its_units_step():
    """A transition's piece runs atoms while one more, as long as the last, ends within the time
    its units took to step since the last piece; one at first; every atom while they are idle."""
    from kunjax.control.transition import PIECE_STEPS, PiecePacer

    p = PiecePacer()
    first = p.deadline(0.0, busy=True)
    assert not p.more(0.001, 0.001, first)  # one atom
    p.ended(1.0)
    d = p.deadline(1.0 + 0.04 / PIECE_STEPS, busy=True)  # the units stepped 40 ms since
    now = 1.0 + 0.04 / PIECE_STEPS
    ran = 0
    while True:  # atoms of 15 ms: two, and a third would end after the deadline
        now += 0.015
        ran += 1
        if not p.more(now, 0.015, d):
            break
    assert ran == 2
    assert not p.more(now, 0.5, d), "an atom that turned slow ends the piece"
    assert p.more(1e9, 1e9, p.deadline(now, busy=False))


def test_a_unit_whose_step_never_lands_does_not_stop_the_others():
    """Independent stepping: unit 0's step blocks (until released) while unit 1 runs its request to
    the end; then unit 0 finishes too. Nothing waits for the slowest unit."""
    import threading

    release = threading.Event()

    class SlowUnit(FakeUnit):
        def wait(self, handle):
            release.wait(30)

    slow, fast = SlowUnit(32), FakeUnit(32)
    cluster = Cluster([slow, fast], FakeFrontend(), policy=RoundRobinPolicy())
    a = cluster.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    b = cluster.add_request([7, 8], SamplingParams(max_tokens=6))
    assert cluster.instance_of(a) == 0 and cluster.instance_of(b) == 1
    done = {}
    for _ in range(200):
        for o in cluster.poll(timeout=0.01):
            if o.finished:
                done[o.request_id] = o
        if b in done:
            break
    assert b in done and done[b].token_ids == expected([8], 6)
    assert a not in done and cluster.busy(slow) and slow.num_steps == 0
    release.set()
    while cluster.has_unfinished():
        for o in cluster.poll(timeout=0.05):
            if o.finished:
                done[o.request_id] = o
    assert done[a].token_ids == expected([3], 4)
    cluster.close_waiters()


class RoundRobinPolicy:
    def __init__(self):
        self.n = 0

    def choose(self, views, num_tokens):
        self.n += 1
        return views[(self.n - 1) % len(views)].index


def test_a_task_over_two_units_is_not_starved_by_their_steps():
    """Two units whose steps land at different times: a task over both still advances (its idle unit
    waits for the busy one instead of being dispatched again in turn)."""
    import threading

    class Lagging(FakeUnit):
        def __init__(self, delay):
            super().__init__(64)
            self.delay = delay

        def wait(self, handle):
            threading.Event().wait(self.delay)

    a, b = Lagging(0.002), Lagging(0.011)
    cluster = Cluster([a, b], FakeFrontend(), policy=RoundRobinPolicy())

    class Pieces:
        units = [a, b]
        done = 0

        def holds(self, unit):
            return False

        def advance(self, cluster):
            assert not cluster.busy(a) and not cluster.busy(b)
            self.done += 1
            return self.done == 5

    for _ in range(2):
        cluster.add_request([1, 2], SamplingParams(max_tokens=60))
    task = Pieces()
    cluster.start_task(task)
    ids = list(cluster._where)
    for _ in range(100):
        cluster.poll(timeout=0.05)
        if task not in cluster.tasks:
            break
    assert task.done == 5 and task not in cluster.tasks
    assert all(cluster.is_known(i) for i in ids), "the task finished while both units still had work"
    while cluster.has_unfinished():
        cluster.poll(timeout=0.05)
    cluster.close_waiters()
