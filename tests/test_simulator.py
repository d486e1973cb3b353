"""The cluster simulator (kunjax.sim, tools.simulate): the real control plane over simulated devices.

On a workload whose every step can be worked out by hand the simulated times are the device model's,
and those are the roofline's arithmetic; an overloading burst under kunserve drops and restores and
completes every request without a leaked page; the simulator (tool included) imports no JAX."""

import os
import subprocess
import sys

import pytest

from kunjax.control.batch import StepShape
from kunjax.control.kunserve import KunserveConfig
from kunjax.control.monitor import MonitorConfig
from kunjax.control.scheduler import SchedulerConfig
from kunjax.model.config import tiny_config
from kunjax.sim import cluster as sim_cluster
from kunjax.sim.hardware import Calibration, DeviceModel, DeviceSpec, Efficiency
from kunjax.sim.units import InstanceConfig
from tools.load_gen import Arrival

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Round figures, so every step time below is arithmetic: memory-bound at 1e11 B/s, compute at 1e12 FLOP/s.
SPEC = DeviceSpec("test", flops=1e12, hbm_bandwidth=1e11, hbm_bytes=10**9, nvlink_bandwidth=1e10,
                  pcie_bandwidth=1e9, network_bandwidth=1e9)
EFF = Efficiency(compute=1.0, memory=1.0, link=1.0, step_overhead_s=1e-3, layer_overhead_s=0.0,
                 allreduce_latency_s=0.0)
INST = InstanceConfig(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_prefill_rows=2), page_size=16,
                      max_model_len=256)


def test_simulated_times_equal_the_cost_model_by_hand():
    """One request, 32 prompt tokens, 3 output tokens, on one tiny instance: its first token lands
    after one prefill step at (1 row, 32 tokens, 2 pages), every next one a decode step at
    (1 row, 1 token, 16 pages) later; each step's time is computed here from the tiny model's shapes."""
    cfg = tiny_config()  # hidden 64, mlp 172, 4 layers, 4 heads x 16, 2 KV heads, vocab 384
    d, q, kv, L, V = 64, 64, 32, 4, 384
    params = d * (q + 2 * kv) + q * d + 3 * d * 172  # matmul weights of a layer
    dtype = 2

    def by_hand(rows, query, pages):
        tokens, ctx = rows * query, pages * 16
        flops = 2 * params * tokens + 4 * tokens * ctx * q
        nbytes = params * dtype + 3 * rows * ctx * 2 * kv * dtype  # weights, then KV gathered and read
        head = max(2 * d * V * rows / 1e12, d * V * dtype / 1e11)
        return 1e-3 + L * max(flops / 1e12, nbytes / 1e11) + head

    cal = Calibration(SPEC, EFF)
    prefill, decode = by_hand(1, 32, 2), by_hand(1, 1, 16)
    dm = DeviceModel(cfg, cal, tp=1, dtype_bytes=dtype)
    assert dm.step_time(StepShape(1, 32, 2), 16) == pytest.approx(prefill, rel=1e-12)
    assert dm.step_time(StepShape(1, 1, 16), 16) == pytest.approx(decode, rel=1e-12)

    cl = sim_cluster.build(cfg, cal, INST, 1, 1, "recompute", num_pages=32, dtype_bytes=dtype)
    results, _, end = sim_cluster.replay(cl, [Arrival(0.5, 32, 3)])
    r = results[0]
    assert r.ok and r.output_len == 3
    assert r.ttft == pytest.approx(prefill, rel=1e-9)
    assert r.tpot == pytest.approx(decode, rel=1e-9)
    assert r.token_times[-1] == pytest.approx(0.5 + prefill + 2 * decode, rel=1e-9)
    assert end == pytest.approx(r.token_times[-1])
    assert cl.engines[0].allocator.num_used == 0


def test_a_simulated_burst_under_kunserve_drops_restores_and_completes_every_request():
    """Two small instances, a burst whose KV demand is twice what one holds: the kunserve policy
    (real monitor, planner, plan.py, drop and restore tasks) merges them, splits them again when
    the burst is over, and every request finishes with its full output; no page is left held."""
    cfg = tiny_config()
    cal = Calibration(SPEC, EFF)
    kc = KunserveConfig(monitor=MonitorConfig(drop_dwell_s=0.0, restore_dwell_s=0.2, transition_cooldown_s=0.05))
    cl = sim_cluster.build(cfg, cal, INST, 2, 1, "kunserve", num_pages=48, dtype_bytes=2, kunserve=kc)
    burst = [Arrival(0.001 * i, 96, 64) for i in range(12)] + [Arrival(2.0, 32, 8)]
    results, samples, _ = sim_cluster.replay(cl, burst, sample_interval=0.05)
    kinds = [e["kind"] for e in cl.event_rows()]
    assert kinds.count("drop") >= 1 and kinds.count("restore") >= 1, kinds
    assert all(r.ok and r.output_len == r.max_tokens for r in results), [r.error_message for r in results if not r.ok]
    assert max(s["groups"] for s in samples) == 1 and not cl.groups()
    assert all(e.allocator.num_used == 0 for e in cl.engines)
    assert cl.transition_counts["drops"] >= 1 and cl.transition_counts["restores"] >= 1


def test_the_simulator_imports_no_jax():
    """kunjax.sim and tools.simulate import, and a short simulated run completes, with jax made
    unimportable (a fresh interpreter)."""
    code = ("import sys\n"
            "for name in ('jax', 'jaxlib', 'flax', 'orbax'):\n"
            "    sys.modules[name] = None\n"
            "from tools import simulate\n"
            "import kunjax.sim.cluster, kunjax.sim.hardware, kunjax.sim.units, kunjax.sim.models\n"
            "rc = simulate.main(['--model=tiny', '--gpu=a100-80gb', '--num_gpus=2', '--trace_limit=20',\n"
            "                    '--policies=recompute,migrate', '--max_model_len=512'])\n"
            "print('ok', rc)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok 0" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def _grouped_sim(group_shapes: str, compile_s: float = 0.05):
    """Two tiny simulated instances merged into one pipeline group; the same wave of requests twice,
    the second once the first is done and `compile_s` has passed. Returns (cluster, group, the
    group's (time, needed shape, shape run) per micro-batch)."""
    import dataclasses

    from kunjax.control.request import SamplingParams

    inst = dataclasses.replace(INST, group_shapes=group_shapes, group_compile_s=compile_s)
    cl = sim_cluster.build(tiny_config(), Calibration(SPEC, EFF), inst, 2, 1, "recompute", num_pages=48)
    cl.drop(cl.plan_drop(2))
    [group] = cl.groups()
    picks = []
    pick = group.pick

    def recording(needed, ready):
        shape = pick(needed, ready)
        picks.append((cl.clock(), needed, shape))
        return shape

    group.pick = recording
    for wave in range(2):
        cl.advance_to(cl.clock() + compile_s)
        for i in range(6):
            cl.add_request([11] * (20 + 7 * i), SamplingParams(max_tokens=12, ignore_eos=True))
        while cl.has_unfinished():
            cl.poll()
            cl.advance_to(cl.next_landing() if cl.next_landing() is not None else cl.controller_free_at)
    return cl, group, picks


def test_a_padded_group_step_queues_its_shape_and_later_steps_run_it():
    """group_shapes=on_demand: a group step whose shape its pools lack runs padded and queues that
    shape once per (pool size, shape), on every stage's compiler; once the compile time has passed
    the group's steps run the shape itself. With "first" nothing is queued and steps stay padded."""
    cl, group, picks = _grouped_sim("on_demand")
    wanted = cl.wanted_group_shapes
    assert wanted and len(set(wanted)) == len(wanted) and {(m, p) for m, p, _ in wanted} == {((0, 1), group.num_pages)}
    for _, _, shape in wanted:
        ready_at = cl.group_shape_ready_at(group.plan, shape)
        before = [s for t, n, s in picks if n == shape and t < ready_at]
        after = [s for t, n, s in picks if n == shape and t >= ready_at]
        assert before and all(s != shape and s.covers(shape) for s in before)  # padded while compiling
        assert all(s == shape for s in after)  # exact once compiled
    assert any(n == s and ((0, 1), group.num_pages, n) in wanted for _, n, s in picks)  # the second wave ran them
    # the compiles queue one after the other on each stage's compiler
    ends = sorted(cl.group_shape_ready_at(group.plan, shape) for _, _, shape in wanted)
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(ends, ends[1:]))
    first, _, fpicks = _grouped_sim("first")
    assert first.wanted_group_shapes == [] and any(n != s for _, n, s in fpicks)


def test_a_drop_forms_its_group_once_its_first_shape_is_compiled():
    """group_shapes=on_demand: a drop's atoms are over in milliseconds, far sooner than the shapes
    queued for the group as it starts (0.1 s each here) compile; the members serve on as instances
    until the first of them (the shape they ran most) is ready, and only then the group forms."""
    import dataclasses

    from kunjax.control.request import SamplingParams

    inst = dataclasses.replace(INST, group_shapes="on_demand", group_compile_s=0.1)
    cl = sim_cluster.build(tiny_config(), Calibration(SPEC, EFF), inst, 2, 1, "recompute", num_pages=48)
    for i in range(4):
        cl.add_request([11] * (20 + 7 * i), SamplingParams(max_tokens=200, ignore_eos=True))

    def turn():
        cl.poll()
        cl.advance_to(cl.next_landing() if cl.next_landing() is not None else cl.controller_free_at)

    for _ in range(6):
        turn()
    plan = cl.plan_drop(2)
    gp = plan.groups[0]
    task = cl.start_drop(plan)
    first = next(s for m, p, s in cl.wanted_group_shapes if (m, p) == (tuple(gp.instances), gp.num_pages))
    moved_at = None
    while not task.done:
        turn()
        if moved_at is None and not task._todo[0]:
            moved_at = cl.clock()
    assert moved_at is not None and moved_at < cl.group_shape_ready_at(gp, first) - 0.05, "the atoms were quick"
    assert cl.clock() >= cl.group_shape_ready_at(gp, first), "the group formed once its first shape was ready"
    assert cl.groups() and cl.has_unfinished()
    assert task.report.pieces <= len(gp.drop_atoms()) + 2, "the wait runs nothing and counts no piece"


def test_steps_sharing_the_cores_land_as_the_processor_sharing_model_says():
    """Host capacity C = 1.5: two steps of lone times a < b started together each run at 0.75 of
    their lone speed, so the first lands at a / 0.75 and the other, alone from then on, b - a later.
    Checked on the model itself and through the simulated cluster (two instances, one one-token
    request each: one prefill step apiece)."""
    from kunjax.sim.sharing import HostShare, fit_capacity, shared_ends

    a, b = 0.010, 0.025

    def ends(c, threads):
        return [e for th in shared_ends(c, threads) for _, e in th]

    assert ends(1.5, [[(0.0, a)], [(0.0, b)]]) == pytest.approx([a / 0.75, a / 0.75 + (b - a)], rel=1e-12)
    assert ends(2.0, [[(0.0, a)], [(0.0, b)]]) == pytest.approx([a, b])  # parallel
    assert ends(1.0, [[(0.0, a)], [(a / 2, a)]]) == pytest.approx([1.5 * a, 2.0 * a])  # half done alone
    # a thread's next step starts its gap after the last one landed
    assert ends(1.0, [[(0.0, a), (0.0, a)], [(0.0, a)]]) == pytest.approx([2 * a, 3 * a, 2 * a])
    # a capacity is recovered from steps it produced
    threads = [[(0.001 * (i % 2), 0.003 + 0.002 * ((i + j) % 3)) for i in range(8)] for j in range(2)]
    measured = [[(s, lone, e - s) for (_, lone), (s, e) in zip(th, en)]
                for th, en in zip(threads, shared_ends(1.37, threads))]
    c, fit = fit_capacity(measured, max_capacity=2.0)
    assert c == pytest.approx(1.37) and fit["mean_abs_pct_error"] < 1e-6 < fit["mean_abs_pct_error_c1"]
    with pytest.raises(ValueError, match="host_capacity"):
        HostShare(0.5)

    cfg = tiny_config()
    dm = DeviceModel(cfg, Calibration(SPEC, EFF), tp=1, dtype_bytes=2)
    ta, tb = dm.step_time(StepShape(1, 32, 2), 16), dm.step_time(StepShape(1, 64, 4), 16)  # the shapes they run at
    assert ta < tb
    cal = Calibration(SPEC, EFF, host_capacity=1.5)
    cl = sim_cluster.build(cfg, cal, INST, 2, 1, "recompute", num_pages=32, dtype_bytes=2, dispatch="fewest_queued")
    results, _, _ = sim_cluster.replay(cl, [Arrival(0.0, 32, 1), Arrival(0.0, 64, 1)])
    assert {r.instance for r in results} == {0, 1}
    assert results[0].ttft == pytest.approx(ta / 0.75, rel=1e-9)
    assert results[1].ttft == pytest.approx(ta / 0.75 + (tb - ta), rel=1e-9)


def test_a_calibration_file_from_before_host_capacity_loads_as_capacity_one():
    """A file with shared_devices true and no host_capacity (what --calibrate wrote on a CPU before)
    means one step's work at a time on the shared cores: capacity 1, under which two equal steps
    started together both land after twice a step's time (the same total as when they queued); a
    file without shared_devices runs steps in parallel; a capacity below 1 is refused by name."""
    import dataclasses

    old = {"spec": dataclasses.asdict(SPEC), "efficiency": dataclasses.asdict(EFF), "fit": {}, "overlap_stages": False,
           "shared_devices": True}
    cal = Calibration.from_json(old)
    assert cal.host_capacity == 1.0 and cal.shared_devices and not cal.overlap_stages
    assert Calibration.from_json(cal.to_json()) == cal
    assert Calibration.from_json({**old, "shared_devices": False}).host_capacity is None
    assert Calibration.from_json({**old, "host_capacity": 1.25}).host_capacity == 1.25
    with pytest.raises(ValueError, match="host_capacity"):
        Calibration.from_json({**old, "host_capacity": 0.5})
    t = DeviceModel(tiny_config(), cal, tp=1, dtype_bytes=2).step_time(StepShape(1, 32, 2), 16)
    for c, ends in ((cal, [2 * t, 2 * t]), (Calibration(SPEC, EFF), [t, t])):
        cl = sim_cluster.build(tiny_config(), c, INST, 2, 1, "recompute", num_pages=32, dtype_bytes=2,
                               dispatch="fewest_queued")
        results, _, _ = sim_cluster.replay(cl, [Arrival(0.0, 32, 1), Arrival(0.0, 32, 1)])
        assert [r.ttft for r in results] == pytest.approx(ends, rel=1e-9)
