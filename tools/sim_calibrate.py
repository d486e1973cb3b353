"""`python -m tools.simulate --calibrate`: the simulator's device model fitted to real steps here.

Instances of the model run on this machine's devices with the step shapes a server has compiled
(every one once its background compiler is done; with the launcher flag --nowarmup only those it
compiles before serving, so the steps run padded as that server's do), serving seeded waves of
requests of varied prompt and output lengths in the serving control plane's own loop
(kunjax.control.cluster.Cluster: one controller thread schedules, dispatches and finishes every
unit's steps, waiter threads wait for the devices). A step's time is its cycle in that loop, from
its dispatch to its unit's next one: what a served step costs, the controller's host work included,
and what a simulated unit's step stands for (its next one starts when it lands). The device's peaks
are measured in the same run (numpy matmul FLOP/s, a large copy's bandwidth), as are its links (a
device-to-device move to the second device, device to host); kunjax.sim.hardware.fit_efficiency
fits the efficiencies and overheads to the steps timed alone. On virtual CPU devices, which share
the cores, two instances then serve the same waves at once, alternating with alone, and
kunjax.sim.sharing.fit_capacity fits the host's capacity to how much they slowed each other. A
server with the same flags times lone requests through the client (what the serving path adds to
a first token). Imports JAX (the only part of the simulator that does).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np


def peak_flops(n: int = 1024, repeats: int = 5) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n ** 3 / best


def peak_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * nbytes / best  # read + write


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def host_bandwidth(sharding, nbytes: int = 16 << 20, repeats: int = 3) -> float:
    """Device to host (a swap's direction) bytes/s."""
    import jax

    x = jax.device_put(np.zeros(nbytes // 4, np.float32), sharding)
    jax.block_until_ready(x)
    best = min(_timed(lambda: np.asarray(jax.device_get(x + 0))) for _ in range(repeats))
    return nbytes / best


def waves(engine, num_requests: int, seed: int, tag: str):
    """The calibration's seeded waves of requests for `engine` (lists of Requests): half a lone
    request (one-row prefills, as most arrive), half a batch of them. `tag` keeps the request ids of
    two runs of the same seed apart."""
    from kunjax.control.request import Request, SamplingParams

    rng = np.random.default_rng(seed)
    max_len = engine.max_model_len
    k = 0
    while k < num_requests:
        size = 1 if rng.random() < 0.5 else int(rng.integers(2, engine.config.scheduler.max_num_seqs + 1))
        wave = []
        for _ in range(min(size, num_requests - k)):
            # prompts log-uniform up to half the context (short ones are most; long ones make the
            # large prefill chunks), outputs up to 128 tokens: decodes over contexts up to ~max_len / 2
            prompt = int(np.exp(rng.uniform(np.log(4), np.log(max(5, max_len // 2)))))
            out = int(rng.integers(1, max(2, min(128, max_len - prompt))))
            ids = rng.integers(10, 250, size=prompt).tolist()
            wave.append(Request(f"{tag}-{seed}-{k}", ids, SamplingParams(max_tokens=out, ignore_eos=True)))
            k += 1
        yield wave


def cluster_dispatches(engines: list, busy, num_requests: int, seed: int, tag: str) -> dict:
    """The serving control plane's own loop (kunjax.control.cluster.Cluster: one controller thread
    schedules, dispatches and finishes every unit's steps, waiter threads wait for the devices)
    over `engines`, the engines in `busy` serving their `waves` (engine i seed + i), the others
    idle. Returns, per busy engine, (when each step was dispatched, its shape)."""
    from kunjax.control.batch import StepShape
    from kunjax.control.cluster import Cluster

    cluster = Cluster(engines, engines[0])
    log: dict = {i: [] for i in busy}

    def recording(i, execute):
        def run(op):
            log[i].append((time.perf_counter(), StepShape(*op.args["shape"])))
            return execute(op)
        return run

    todo = {i: waves(engines[i], num_requests, seed + i, tag) for i in busy}
    for i in busy:
        engines[i].execute = recording(i, engines[i].execute)
    try:
        while todo or cluster.has_unfinished():
            for i in list(todo):
                if not engines[i].has_unfinished():
                    wave = next(todo[i], None)
                    if wave is None:
                        del todo[i]
                    for r in wave or ():
                        engines[i].add(r)
            cluster.poll(timeout=0.05)
    finally:
        for i in busy:
            del engines[i].execute  # the class's own again
        cluster.close_waiters()
    return log


def concurrent_steps(engines: list, num_requests: int, seed: int, rounds: int = 2) -> tuple[list, int, list]:
    """Step cycles (dispatch to the unit's next dispatch: everything a served step costs, the
    controller's host work included) on the shared cores, in the serving control plane's loop:
    each engine serves its seeded waves alone (the others idle), then every engine serves the same
    waves at once; `rounds` times over, alternating, so that a drift of the machine's speed weighs
    on both sides alike. Returns, per engine and round, (dispatch, cycle alone, cycle side by side)
    of its steps while every step ran at the same shape both times (kunjax.sim.sharing.fit_capacity's
    input: steps back to back, as a simulated unit's are), how many steps were left out, and every
    step timed alone (`cycles`: what the device model is fitted to)."""
    out, left, alone_steps = [], 0, []
    for r in range(rounds):
        lone = [cluster_dispatches(engines, [i], num_requests, seed + r, f"lone{r}")[i] for i in range(len(engines))]
        together = cluster_dispatches(engines, range(len(engines)), num_requests, seed + r, f"together{r}")
        for i, alone in enumerate(lone):
            alone_steps += cycles(alone)
            side = together[i]
            k = next((n for n, (a, b) in enumerate(zip(alone, side)) if a[1] != b[1]), min(len(alone), len(side)))
            k = max(0, k - 1)  # the last paired dispatch has no next one to end its cycle
            out.append([(side[n][0], alone[n + 1][0] - alone[n][0], side[n + 1][0] - side[n][0]) for n in range(k)])
            left += max(len(alone), len(side)) - k
    return out, left, alone_steps


def cycles(log: list) -> list:
    """MeasuredSteps of one unit's (dispatch, shape) log: a step's seconds from its dispatch to the
    unit's next one (the last step, with no next, is left out)."""
    from kunjax.sim.hardware import MeasuredStep

    return [MeasuredStep(shape, b - t, t) for (t, shape), (b, _) in zip(log, log[1:])]


def served_tpots(target: str, streams: int, prompt_len: int, max_tokens: int) -> list:
    """Client TPOTs of `streams` requests sent at once, one client each (threads); None for a
    request that shared its instance with another (each should get its own: the dispatch spreads
    them)."""
    import threading

    from serving.client import Client

    out: list = [None] * streams
    where: list = [None] * streams
    barrier = threading.Barrier(streams)

    def one(i: int) -> None:
        with Client(target) as c:
            barrier.wait()
            stamps = []
            for chunk in c.generate(prompt_token_ids=[11] * prompt_len, max_tokens=max_tokens, ignore_eos=True,
                                    timeout=120):
                stamps.append(time.perf_counter())
                if chunk.finish_reason:
                    where[i] = chunk.usage.instance
            out[i] = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out if len(set(where)) == streams else [None] * streams


def serving_latency(engine, launch: list, model_step, requests: int = 16, prompt_len: int = 64,
                    shared: bool = False) -> dict:
    """What the serving path adds to a token beyond its step: a server with the same launcher flags
    answers lone requests (one at a time: no queueing) of `prompt_len` tokens through the client
    library. Its median TTFT less the fitted model's time for that prompt's prefill step (`model_step`:
    StepShape -> seconds; the shape `engine` runs it at) is the first token's latency from the
    request's send to the step and from the step to the client (the executor, gRPC): what the
    simulator adds, so that a lone served request's first token is where it was measured. Later
    tokens' extra gap is the median client TPOT less the model's lone decode step (both at least 0).
    The engine's own timings of the two steps are reported beside them. `shared` (instances on shared cores, at least two of them): also one request
    alone and two at once (one an instance), alternating; the TPOT ratio is how much two
    instances' decodes slow each other on the serving path (server threads and client included),
    2 x alone / together the host capacity it implies (`served_capacity`, in [1, 2])."""
    import statistics
    import tempfile

    from kunjax.control.request import Request, SamplingParams
    from serving.client import Client
    from tools import bench, launcher

    from kunjax.control.batch import StepShape

    shapes = []

    def lone(max_tokens: int) -> tuple[float, float]:
        engine.add(Request(f"lat-{time.perf_counter_ns()}", [11] * prompt_len,
                           SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        times = []
        while engine.has_unfinished():
            t = time.perf_counter()
            step = engine.schedule()
            op = engine.prepare(step)
            engine.finish(step, engine.execute(op))
            times.append(time.perf_counter() - t)
            shapes.append(StepShape(*op.args["shape"]))
        return times[0], statistics.median(times[1:]) if len(times) > 1 else 0.0

    engine_steps = [lone(8) for _ in range(requests)]
    prefill_shape, decode_shape = shapes[0], shapes[1]
    prefill = statistics.median(x[0] for x in engine_steps)
    decode = statistics.median(x[1] for x in engine_steps)
    log = os.path.join(tempfile.mkdtemp(prefix="kunjax-calibrate-"), "server.log")
    srv = launcher.start(["--overload_policy=recompute", *launch], log, "calibration server", 900.0)
    try:
        bench.wait_idle(srv.target)
        ttft, tpot = [], []
        with Client(srv.target) as c:
            for _ in range(requests):
                t = time.perf_counter()
                stamps = [time.perf_counter() - t for _ in c.generate(prompt_token_ids=[11] * prompt_len, max_tokens=8,
                                                                       ignore_eos=True, timeout=120)]
                ttft.append(stamps[0])
                tpot.append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1))
        alone, together = [], []
        for _ in range(requests // 2 if shared else 0):
            alone += served_tpots(srv.target, 1, prompt_len, 32)
            together += [x for x in served_tpots(srv.target, 2, prompt_len, 32) if x is not None]
    finally:
        srv.stop()
    out = {"first_token_latency_s": max(0.0, statistics.median(ttft) - model_step(prefill_shape)),
           "token_latency_s": max(0.0, statistics.median(tpot) - model_step(decode_shape)),
           "serving_ttft_s": statistics.median(ttft), "model_prefill_s": model_step(prefill_shape),
           "engine_prefill_s": prefill, "serving_tpot_s": statistics.median(tpot),
           "model_decode_s": model_step(decode_shape), "engine_decode_s": decode}
    if alone and together:
        a, b = statistics.median(alone), statistics.median(together)
        out.update({"served_tpot_alone_s": a, "served_tpot_two_at_once_s": b, "served_pairs": len(together) // 2,
                    "served_capacity": min(2.0, max(1.0, 2 * a / b))})
    return out


def calibrate_device(opts, num_requests: int, seed: int, launch: Optional[list] = None):
    """A kunjax.sim.hardware.Calibration of this machine's devices for `opts` (the launcher's
    options: model, dtype, page size, scheduler, context); with `launch` (its flags) a server is
    started too, for what the serving path adds to each token (`serving_latency`)."""
    from kunjax.runtime.jax_setup import configure_jax

    configure_jax(opts.scheduler.compilation_cache_dir)
    import dataclasses

    import jax

    from kunjax.control.scheduler import SchedulerConfig
    from kunjax.io.loader import load_model, parse_dtype
    from kunjax.runtime.calibrate import bandwidth
    from kunjax.runtime.engine import EngineConfig, LLMEngine
    from kunjax.sim.hardware import Calibration, DeviceModel, DeviceSpec, fit_efficiency
    from kunjax.sim.sharing import fit_capacity

    dtype = parse_dtype(opts.model.dtype)
    model = load_model(opts.model.model, dtype)
    s, c = opts.scheduler, opts.cache
    cfg = EngineConfig(page_size=c.page_size, num_pages=c.num_pages, hbm_bytes=c.hbm_bytes, max_model_len=c.max_model_len,
                       scheduler=SchedulerConfig(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                                                 max_prefill_rows=s.max_prefill_rows),
                       warmup=s.warmup, compile_small_first=True)
    devs = jax.devices()
    t = time.perf_counter()
    engine = LLMEngine(model, cfg, device=devs[0])
    compile_s = time.perf_counter() - t
    cluster_dispatches([engine], [0], max(8, num_requests // 4), seed + 1, "warm")  # first runs off the clock
    cpu = devs[0].platform == "cpu"
    capacity, share = None, None
    if cpu:  # the virtual devices share the cores: how much two concurrent steps slow each other
        if len(devs) < 2:
            raise ValueError("calibrate: timing concurrent steps needs two CPU devices")
        other = LLMEngine(model, cfg, device=devs[1])
        cluster_dispatches([other], [0], max(8, num_requests // 4), seed + 2, "warm")
        pairs, unpaired, steps = concurrent_steps([engine, other], num_requests, seed + 3)
        capacity, share = fit_capacity(pairs, max_capacity=2.0)
        share.update({"unpaired_steps": unpaired,
                      "slowdown_median": float(np.median([m / lone for th in pairs for _, lone, m in th])),
                      "samples": [[[round(x, 6) for x in step] for step in th] for th in pairs]})
        del other
    else:
        steps = cycles(cluster_dispatches([engine], [0], num_requests, seed, "cal")[0])
    rep = engine.stage.exes.rep
    peer = None
    if len(devs) > 1:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        peer = NamedSharding(Mesh(np.array([devs[1]]), ("tp",)), PartitionSpec())
    d2d = bandwidth(rep, peer, 16 << 20) if peer is not None else bandwidth(rep, None, 16 << 20)
    spec = DeviceSpec(f"{devs[0].platform} ({os.cpu_count()} cores, measured)", flops=peak_flops(),
                      hbm_bandwidth=peak_bandwidth(), hbm_bytes=int(engine.budget or 0), nvlink_bandwidth=d2d,
                      pcie_bandwidth=host_bandwidth(rep), network_bandwidth=d2d, devices_per_node=1 << 16,
                      source="measured on this machine by tools.simulate --calibrate (numpy matmul FLOP/s, a 256 MiB "
                             "copy's bandwidth, a 16 MiB device-to-device move and device-to-host read)")
    dtype_bytes = int(np.dtype(engine.dtype).itemsize)
    eff, fit = fit_efficiency(engine.cfg, spec, steps, engine.page_size, engine.tp, dtype_bytes)
    if share is not None:
        fit["host_sharing"] = share
    eff = dataclasses.replace(eff, link=1.0)  # the links' bandwidths are measured, not peaks
    if launch is not None:
        model = DeviceModel(engine.cfg, Calibration(spec, eff), engine.tp, dtype_bytes)
        lat = serving_latency(engine, launch, lambda shape: model.step_time(shape, engine.page_size),
                              shared=cpu and opts.cluster.num_instances > 1)
        fit["serving"] = lat
        if "served_capacity" in lat:
            # what the simulator predicts is a served run: the capacity the serving path leaves the
            # steps (its server threads and the client on the same cores), not the bare loop's
            fit["host_sharing"]["loop_capacity"] = capacity
            capacity = lat["served_capacity"]
        # the serving loop's own cost per step (executor, streaming) joins the step's overhead
        eff = dataclasses.replace(eff, first_token_latency_s=lat["first_token_latency_s"],
                                  step_overhead_s=eff.step_overhead_s + lat["token_latency_s"])
    fit.update({"dtype_bytes": dtype_bytes, "model": opts.model.model, "compile_s": round(compile_s, 1),
                "load_average": list(os.getloadavg()), "seconds_of_steps": round(sum(x.seconds for x in steps), 2)})
    return Calibration(spec, eff, fit, overlap_stages=not cpu, host_capacity=capacity)
