"""What the parameter-centric mechanism costs, measured in one run (a benchmark, not a test).

    python -m tools.bench_mechanism                                   # SmolLM2-135M, 2 CPU devices
    python -m tools.bench_mechanism --model=tiny --hbm_bytes=8000000  # quick
    python -m tools.bench_mechanism --group_size=4 --num_instances=4

Weights are set to a realistic share of each device's budget (the KunServe setting, 35-45 %; by
default the budget is sized from the weights with --weight_share). The run:
  1. measures device-to-device bandwidth (a large array copied between two devices, best of 5);
  2. fills instance 0 with --batch running requests, times its decode steps (one instance);
  3. drops (groups of --group_size), and reports time to freed memory usable, weights freed, the KV
     exchange's bytes and seconds against bytes / bandwidth, peak live bytes against the budget;
  4. times the grouped decode steps of the same requests (the pipelining overhead);
  5. restores, reporting its seconds against the bytes moved / bandwidth, and checks that every
     device is back to its starting live bytes and no compilation happened on the way.
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
    class OnInstanceZero:  # the whole batch on one instance: the baseline for the grouped steps
        def choose(self, views, num_tokens):
            return 0

    cluster.policy = OnInstanceZero()
    for _ in range(FLAGS.batch):
        cluster.add_request(rng.integers(0, model.config.vocab_size, FLAGS.prompt_len).tolist(), params)
    while any(r.num_pending > 1 for r in e0.scheduler.running) or e0.scheduler.waiting:
        cluster.step()
    one = timed_steps(cluster, FLAGS.steps)
    start_live = {d: measure.device_live_bytes(d) for d in devs}

    plan = cluster.plan_drop(FLAGS.group_size)
    t = time.perf_counter()
    cluster.compile_plan(plan, background=False)
    compile_s = time.perf_counter() - t
    c0 = compile_stats.compile_count()
    drop, failed = cluster.drop(plan)
    assert not failed
    grouped = timed_steps(cluster, FLAGS.steps)
    cluster.groups()[0].pipeline_depth = 1
    grouped_one = timed_steps(cluster, FLAGS.steps)
    (restore,), failed = cluster.restore()
    assert not failed
    compiles = compile_stats.compile_count() - c0
    end_live = {d: measure.device_live_bytes(d) for d in devs}

    gp = plan.groups[0]
    print(f"\nplan: groups {[list(g.instances) for g in plan.groups]}, stages "
          f"{[(s.instance, s.start, s.stop) for s in gp.stages]}, group pages {gp.num_pages} "
          f"(instances had {e0.num_pages}); plan executables compiled ahead in {compile_s:.1f}s")
    rows = []

    def row(name, value, vs="", ratio=""):
        rows.append((name, value, vs, ratio))

    xb = drop.exchange.bytes_between_devices
    row("drop: to freed memory usable", f"{drop.seconds * 1e3:.1f} ms")
    row("drop: weights freed per device", f"{max(drop.freed_weight_bytes.values()) / 2**20:.1f} MiB")
    row("drop: KV exchange between devices", f"{xb / 2**20:.2f} MiB in {drop.exchange.seconds * 1e3:.1f} ms",
        f"bound {xb / bw * 1e3:.1f} ms", f"{drop.exchange.seconds / max(xb / bw, 1e-9):.1f}x")
    row("drop: KV copied within devices", f"{drop.exchange.bytes_local / 2**20:.2f} MiB")
    for d in map(str, devs[:FLAGS.group_size]):
        row(f"drop: peak live bytes {d}", f"{drop.peak_live[d] / 2**20:.1f} MiB", f"budget {budget / 2**20:.0f} MiB",
            f"{drop.peak_live[d] / budget:.2f}")
    rb = restore.exchange.bytes_between_devices
    restore_bytes = rb + sum(drop.freed_weight_bytes.values())
    row("restore: total", f"{restore.seconds * 1e3:.1f} ms",
        f"bytes/bw {restore_bytes / bw * 1e3:.1f} ms", f"{restore.seconds / max(restore_bytes / bw, 1e-9):.1f}x")
    row("restore: weights + KV moved", f"{restore_bytes / 2**20:.1f} MiB (KV {rb / 2**20:.2f} MiB)")
    for d in map(str, devs[:FLAGS.group_size]):
        row(f"restore: peak live bytes {d}", f"{restore.peak_live[d] / 2**20:.1f} MiB",
            f"budget {budget / 2**20:.0f} MiB", f"{restore.peak_live[d] / budget:.2f}")
    row(f"decode step, batch {FLAGS.batch}: one instance", f"{one * 1e3:.1f} ms")
    row(f"decode step, batch {FLAGS.batch}: group of {FLAGS.group_size}, {FLAGS.group_size} micro-batches",
        f"{grouped * 1e3:.1f} ms", "vs one instance", f"{grouped / one:.2f}x")
    row(f"decode step, batch {FLAGS.batch}: group of {FLAGS.group_size}, 1 micro-batch", f"{grouped_one * 1e3:.1f} ms",
        "vs one instance", f"{grouped_one / one:.2f}x")
    row("compilations during drop, grouped steps, restore", str(compiles))
    row("live bytes back to the start on every device", str(end_live == start_live))
    w = max(len(r[0]) for r in rows)
    for name, value, vs, ratio in rows:
        print(f"{name:<{w}}  {value:>28}  {vs:>22}  {ratio:>7}")
    print(f"\n(CPU virtual devices share {os.cpu_count()} cores: a pipeline's stages do not run in parallel here)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
