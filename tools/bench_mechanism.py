"""What the parameter-centric mechanism costs, measured in one run (a benchmark, not a test).

    python -m tools.bench_mechanism                                   # SmolLM2-135M, 2 CPU devices
    python -m tools.bench_mechanism --model=tiny --hbm_bytes=8000000 --prompt_len=64 --max_model_len=256  # quick
    python -m tools.bench_mechanism --group_size=4 --num_instances=4

Weights are set to a realistic share of each device's budget (the KunServe setting, 35-45 %; by
default the budget is sized from the weights with --weight_share). The run:
  1. measures device-to-device bandwidth (a large array copied between two devices, best of 5);
  2. fills instance 0 with --batch running requests, times its decode steps (one instance);
  3. with --batch requests running on every instance, drives the cluster's independent loop
     (`poll`) through one drop (the first --group_size instances; the others stay outside) and
     one restore, timing every token of every request: the longest gap between two tokens during
     each transition, for the members' requests and for the requests outside the group, against the
     normal step; the outside instances' step time during the transitions against before;
  4. reports the drop's and the restore's bytes between devices and within devices against the
     minimum the new placement needs, the padding apart, their pieces' time against bytes /
     bandwidth, wall time, peak live bytes against the budget, 0 compilations, live bytes back;
  5. times the grouped decode steps of instance 0's batch (the pipelining overhead).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("model", "smollm2-135m", "model to run (embedded name, .gguf, HF or orbax dir)")
    flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
    flags.DEFINE_integer("num_instances", 2, "instances (one device each)")
    flags.DEFINE_integer("group_size", 2, "instances per pipeline group")
    flags.DEFINE_float("weight_share", 0.4, "weights / per-device budget, when --hbm_bytes is not given")
    flags.DEFINE_integer("hbm_bytes", None, "per-device budget (default: weights / --weight_share)")
    flags.DEFINE_integer("batch", 8, "running requests on instance 0")
    flags.DEFINE_integer("max_num_seqs", 32, "running requests per instance (its KV room is then bound by memory)")
    flags.DEFINE_integer("prompt_len", 256, "prompt tokens per request")
    flags.DEFINE_integer("max_model_len", 1024, "context length")
    flags.DEFINE_integer("steps", 8, "timed decode steps per measurement")


def device_bandwidth(src, dst, nbytes: int = 1 << 28) -> float:
    """Bytes/s of a device-to-device copy (best of 5)."""
    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), src)
    jax.device_put(x, dst).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        jax.device_put(x, dst).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def fill_bandwidth(stage, num_pages: int) -> float:
    """Bytes/s of allocating a fresh (k, v) pool pair of `num_pages` on the stage (median of 5): what a
    transition pays per byte of the new pools it needs, since JAX allocates only initialised memory
    (on a CPU that includes the kernel's first touch of the newly mapped pages)."""
    import jax

    times, nbytes = [], 0
    for _ in range(5):
        t = time.perf_counter()
        pools = jax.block_until_ready(stage.exes.new_pools(num_pages))
        times.append(time.perf_counter() - t)
        nbytes = sum(p.nbytes for p in pools)
        for p in pools:
            p.delete()
    return nbytes / sorted(times)[2]


def timed_steps(cluster, n: int) -> float:
    for _ in range(2):
        cluster.step()
    t = time.perf_counter()
    for _ in range(n):
        cluster.step()
    return (time.perf_counter() - t) / n


def main(argv):
    del argv
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={FLAGS.num_instances}").strip()
    import jax
    import numpy as np

    from kunjax.control.plan import DropPlan
    from kunjax.control.request import SamplingParams
    from kunjax.control.scheduler import SchedulerConfig
    from kunjax.io.loader import host_place, load_model, parse_dtype
    from kunjax.memory import measure
    from kunjax.runtime import compile_stats
    from kunjax.runtime.cluster import ServingCluster
    from kunjax.runtime.engine import EngineConfig
    from kunjax.runtime.jax_setup import configure_jax

    configure_jax()
    dtype = parse_dtype(FLAGS.dtype)
    model = load_model(FLAGS.model, dtype, place=host_place(dtype))
    weights = sum(a.nbytes for a in jax.tree.leaves(model.params))
    budget = FLAGS.hbm_bytes or int(weights / FLAGS.weight_share)
    cfg = EngineConfig(page_size=16, hbm_bytes=budget, max_model_len=FLAGS.max_model_len,
                       scheduler=SchedulerConfig(max_num_seqs=max(FLAGS.batch, FLAGS.max_num_seqs),
                                                 max_num_batched_tokens=256, max_prefill_rows=2))
    t0 = time.perf_counter()
    cluster = ServingCluster.build(model, cfg, num_instances=FLAGS.num_instances, tp=1)
    print(f"model {FLAGS.model} ({weights / 2**20:.0f} MiB of weights, {FLAGS.dtype}), {FLAGS.num_instances} instances "
          f"on {[str(d) for d in cluster.devices()]}, budget {budget / 2**20:.0f} MiB per device "
          f"(weights {weights / budget:.0%}); built in {time.perf_counter() - t0:.1f}s")
    e0 = cluster.engines[0]
    print(f"per instance: {e0.num_pages} KV pages of {e0.page_size} tokens; memory split {e0.memory_split}")
    devs = cluster.devices()
    bw = device_bandwidth(devs[0], devs[1])
    print(f"device-to-device bandwidth {devs[0]} -> {devs[1]}: {bw / 1e9:.2f} GB/s")

    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=FLAGS.max_model_len - FLAGS.prompt_len - 1, ignore_eos=True)

    class OnInstance:  # a batch on one chosen instance
        target = 0

        def choose(self, views, num_tokens):
            return self.target

    place = OnInstance()
    cluster.policy = place
    n = FLAGS.num_instances
    for i in range(n):
        place.target = i
        for _ in range(FLAGS.batch):
            cluster.add_request(rng.integers(0, model.config.vocab_size, FLAGS.prompt_len).tolist(), params)
    while any(r.num_pending > 1 for e in cluster.engines for r in e.scheduler.running) or cluster.num_waiting():
        cluster.step()
    where = {rid: i for i, e in enumerate(cluster.engines) for rid in e.requests}
    start_live = {d: measure.device_live_bytes(d) for d in devs}

    plan = cluster.plan_drop(FLAGS.group_size)
    if len(plan.groups) > 1:  # one group of the first instances; the others stay outside it
        outside = {i for g in plan.groups[1:] for i in g.instances}
        plan = DropPlan(plan.groups[:1], tuple(sorted(set(plan.alone) | outside)))
    members = set(plan.groups[0].instances)
    t = time.perf_counter()
    cluster.compile_plan(plan, background=False)
    compile_s = time.perf_counter() - t
    ready, total = cluster.plan_ready(plan)
    fill_bw = fill_bandwidth(e0.stage, plan.groups[0].num_pages)
    print(f"fresh pool allocation on {devs[0]}: {fill_bw / 1e9:.2f} GB/s")
    c0 = compile_stats.compile_count()

    last: dict[str, float] = {}

    def run(seconds=None, until=None) -> dict:
        """Polls the cluster; returns the longest token gap of member / outside requests and the
        outside instances' steps."""
        gaps = {"member": 0.0, "outside": 0.0, "member_step": 0.0, "member_steps": []}
        steps0 = [e.num_steps for e in cluster.engines]

        prev_on_step = cluster.on_step

        def on_step(unit, op, seconds):  # dispatch to landing of every member (or group) step
            if prev_on_step is not None:
                prev_on_step(unit, op, seconds)
            if unit not in cluster.engines or cluster.engines.index(unit) in members:
                gaps["member_step"] = max(gaps["member_step"], seconds)
                gaps["member_steps"].append(seconds)

        cluster.on_step = on_step
        t0 = time.perf_counter()
        while True:
            for o in cluster.poll(timeout=0.5):
                now = time.perf_counter()
                if o.new_token_ids and o.request_id in last:
                    kind = "member" if where[o.request_id] in members else "outside"
                    gaps[kind] = max(gaps[kind], now - last[o.request_id])
                last[o.request_id] = now
            if (until is not None and until()) or (seconds is not None and time.perf_counter() - t0 >= seconds):
                break
        cluster.on_step = prev_on_step
        dt = time.perf_counter() - t0
        out_steps = sum(cluster.engines[i].num_steps - steps0[i] for i in range(n) if i not in members)
        gaps["outside_step"] = dt / max(out_steps / max(n - len(members), 1), 1) if n > len(members) else 0.0
        gaps["seconds"] = dt
        gaps["step0"] = dt / max(cluster.engines[0].num_steps - steps0[0], 1)
        return gaps

    def kv_pages(ids):
        return {i: sum(len(r.pages) for r in cluster.engines[i].scheduler.running) for i in ids}

    normal = run(seconds=3.0)
    one = normal["step0"]  # the normal step: instance 0's mean step time with every instance running
    used = kv_pages(members)
    task = cluster.start_drop(plan)
    during_drop = run(until=lambda: task.done)
    drop = task.report
    run(seconds=max(3.0, FLAGS.steps * one))  # grouped serving
    group = cluster.groups()[0]
    used_group = sum(len(r.pages) for r in group.scheduler.running)
    (rtask,) = cluster.start_restore()
    during_restore = run(until=lambda: rtask.done)
    restore = rtask.report
    run(seconds=max(3.0, FLAGS.steps * one))  # split again
    compiles = compile_stats.compile_count() - c0
    for rid in list(last):
        cluster.abort(rid)
    while cluster.has_unfinished():
        cluster.step()
    end_live = {d: measure.device_live_bytes(d) for d in devs}

    # The grouped step of one instance's batch (pipelining overhead), measured apart.
    place.target = 0
    for _ in range(FLAGS.batch):
        cluster.add_request(rng.integers(0, model.config.vocab_size, FLAGS.prompt_len).tolist(), params)
    while any(r.num_pending > 1 for r in e0.scheduler.running) or e0.scheduler.waiting:
        cluster.step()
    single = timed_steps(cluster, FLAGS.steps)
    cluster.drop(plan)
    grouped = timed_steps(cluster, FLAGS.steps)
    cluster.groups()[0].pipeline_depth = 1
    grouped_one = timed_steps(cluster, FLAGS.steps)
    cluster.restore()

    gp = plan.groups[0]
    plb = e0.page_layer_bytes
    L = model.config.num_layers
    # The least the new placement needs: each member's pages of the layers it gives up change device.
    min_cross = sum(used[st.instance] * plb * (L - st.num_layers) for st in gp.stages)
    min_local = sum(used[st.instance] * plb * st.num_layers for st in gp.stages)
    print(f"\nplan: groups {[list(g.instances) for g in plan.groups]}, stages "
          f"{[(s.instance, s.start, s.stop) for s in gp.stages]}, group pages {gp.num_pages} on the ladder "
          f"{cluster.ladder()} (instances had {e0.num_pages}); {ready}/{total} executables ready after compile_plan "
          f"({compile_s:.1f}s)")
    rows = []

    def row(name, value, vs="", ratio=""):
        rows.append((name, value, vs, ratio))

    step_ms = one * 1e3
    for name, rep, phase in (("drop", drop, during_drop), ("restore", restore, during_restore)):
        x = rep.exchange
        moved = x.bytes_between_devices + (0 if name == "drop" else sum(drop.freed_weight_bytes.values()))
        row(f"{name}: wall time (members step between pieces)", f"{rep.seconds * 1e3:.1f} ms", f"{rep.pieces} pieces")
        row(f"{name}: pieces alone", f"{rep.piece_seconds_total * 1e3:.1f} ms",
            f"bytes/bw {moved / bw * 1e3:.1f} ms", f"{rep.piece_seconds_total / max(moved / bw, 1e-9):.1f}x")
        work = rep.piece_seconds_total - rep.sampling_seconds
        row(f"{name}: pieces without peak sampling", f"{work * 1e3:.1f} ms",
            f"bytes/bw + step {(moved / bw + one) * 1e3:.1f} ms", f"{work / max(moved / bw + one, 1e-9):.2f}x")
        alloc = x.bytes_allocated / fill_bw
        row(f"{name}: of which allocating fresh pools", f"{x.allocate_seconds * 1e3:.1f} ms",
            f"{x.bytes_allocated / 2**20:.0f} MiB / fill bw {alloc * 1e3:.1f} ms")
        row(f"{name}: pieces vs what the bytes require", f"{work * 1e3:.1f} ms",
            f"moved/bw + new pools/fill bw + step {(moved / bw + alloc + one) * 1e3:.1f} ms",
            f"{work / max(moved / bw + alloc + one, 1e-9):.2f}x")
        row(f"{name}: longest piece", f"{rep.piece_seconds_max * 1e3:.1f} ms", f"step {step_ms:.1f} ms",
            f"{rep.piece_seconds_max / one:.1f} steps")
        row(f"{name}: longest step of a member (dispatch to landing)", f"{phase['member_step'] * 1e3:.1f} ms",
            f"normal {normal['member_step'] * 1e3:.1f} ms", f"{phase['member_step'] / one:.1f} steps")
        med, med0 = (float(np.median(p["member_steps"] or [0])) for p in (phase, normal))
        row(f"{name}: median step of a member (dispatch to landing)", f"{med * 1e3:.1f} ms",
            f"normal {med0 * 1e3:.1f} ms", f"{med / max(med0, 1e-9):.2f}x")
        row(f"{name}: longest token gap, members' requests", f"{phase['member'] * 1e3:.1f} ms",
            f"step {step_ms:.1f} ms", f"{phase['member'] / one:.1f} steps")
        if n > len(members):
            row(f"{name}: longest token gap, outside requests", f"{phase['outside'] * 1e3:.1f} ms",
                f"step {step_ms:.1f} ms", f"{phase['outside'] / one:.1f} steps")
            row(f"{name}: outside instance step", f"{phase['outside_step'] * 1e3:.1f} ms",
                f"before {normal['outside_step'] * 1e3:.1f} ms", f"{phase['outside_step'] / max(normal['outside_step'], 1e-9):.2f}x")
        row(f"{name}: KV between devices", f"{x.bytes_between_devices / 2**20:.2f} MiB",
            (f"minimum {min_cross / 2**20:.2f} MiB" if name == "drop" else f"pages held {used_group} x {L} layers"),
            (f"{x.bytes_between_devices / max(min_cross, 1):.2f}x" if name == "drop" else ""))
        row(f"{name}: KV copied within devices", f"{x.bytes_local / 2**20:.2f} MiB",
            f"owner's own {min_local / 2**20:.2f} MiB" if name == "drop" else "")
        row(f"{name}: chunk padding moved", f"{x.bytes_padding / 2**20:.2f} MiB")
        for d in map(str, devs[:FLAGS.group_size]):
            row(f"{name}: peak live bytes {d}", f"{rep.peak_live[d] / 2**20:.1f} MiB", f"budget {budget / 2**20:.0f} MiB",
                f"{rep.peak_live[d] / budget:.2f}")
    row("drop: weights freed per device", f"{max(drop.freed_weight_bytes.values()) / 2**20:.1f} MiB")
    row("normal: longest token gap", f"{normal['member'] * 1e3:.1f} ms", f"step {step_ms:.1f} ms",
        f"{normal['member'] / one:.1f} steps")
    row(f"decode step, batch {FLAGS.batch}, alone on the cluster: one instance", f"{single * 1e3:.1f} ms")
    row(f"decode step, batch {FLAGS.batch}: group of {FLAGS.group_size}, {FLAGS.group_size} micro-batches",
        f"{grouped * 1e3:.1f} ms", "vs one instance", f"{grouped / single:.2f}x")
    row(f"decode step, batch {FLAGS.batch}: group of {FLAGS.group_size}, 1 micro-batch", f"{grouped_one * 1e3:.1f} ms",
        "vs one instance", f"{grouped_one / single:.2f}x")
    row("compilations during drop, grouped serving, restore", str(compiles))
    row("live bytes back to the start on every device", str(end_live == start_live))
    w = max(len(r[0]) for r in rows)
    for name, value, vs, ratio in rows:
        print(f"{name:<{w}}  {value:>28}  {vs:>26}  {ratio:>9}")
    print(f"\n(CPU virtual devices share {os.cpu_count()} cores: a pipeline's stages and the instances do not run "
          f"in parallel here)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
