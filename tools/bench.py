"""Overload policies side by side on a real trace: one gRPC server per policy, same cluster, same requests.

    # the paper's Azure code window, 10x faster, lengths scaled to a small model and budget
    python -m tools.bench --policies recompute,swap,kunserve --trace azure_code \\
        --trace_offset 5100 --trace_limit 927 --time_scale 10 --len_scale 0.1 --max_input_len 512 \\
        --model smollm2-135m --num_instances 4 --hbm_bytes 400000000 --out /tmp/bench
    python -m tools.bench --smoke --out /tmp/smoke     # tiny model, a few dozen requests, ~1 minute

For each policy the launcher (`serving.launch --overload_policy=<policy>`) starts as a subprocess on
the same cluster shape (the flags below, plus anything after `--`, go to it unchanged); once it
serves and its background compiler is idle, the requests are replayed through the client library
(tools.load_gen.replay: the path users take), while Admin.Status is sampled every
--sample_interval seconds (queue, free pages, the policy's counters, its event log; parameter
bytes per device every --memory_every samples). Then the server is stopped and the next policy runs.

Per policy it prints TTFT, TPOT and inter-token gap P50/P90/P99, the server's queue time, SLO
attainment (a request meets the SLO when its TTFT <= --ttft_slo_ms and its TPOT <= --tpot_slo_ms),
goodput (requests meeting the SLO per second), throughput and the policy's counters, then each
baseline's P99 TTFT (and P99 TPOT) divided by kunserve's when kunserve ran. `--out DIR` writes
requests.csv (one row per request: send, first and last token, tokens, every token's time),
events.csv (preemptions, swaps, migrations, drops, restores, with times), timeline.csv (the Status
samples), summary.json and the plots (tools.bench_plots: TTFT CDF, one timeline per policy).
Times are seconds from the start of each policy's replay.

Requests: a trace of data/traces (tools.load_gen.TRACES) from --trace_offset, --trace_limit rows,
gaps divided by --time_scale, a random --sample fraction kept (load scaled by sampling); lengths
times --len_scale (outputs times --output_scale when given), clipped to --max_input_len /
--max_output_len and to the server's context.
Prompts: random token ids of the trace's lengths (`--prompts synthetic`), or ShareGPT text
(`--prompts sharegpt`) cut to at most the trace's prompt length in UTF-8 bytes (so never more
tokens than that; fewer with a real tokenizer). Every request sets ignore_eos, so it produces
exactly its output length under every policy.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from tools import load_gen

POLICY_COUNTERS = ("preemptions", "recomputed_tokens", "swap_outs", "swap_ins", "swapped_out_bytes",
                   "swapped_in_bytes", "migrations_out", "migrated_bytes")
EVENT_COLUMNS = ["policy", "t_s", "kind", "instance", "target", "request_id", "bytes", "tokens", "seconds", "source"]
TIMELINE_COLUMNS = ["policy", "t_s", "running", "waiting", "queued", "pages_free", "pages_total", "swapped",
                    "groups", "weights_bytes_per_device", *POLICY_COUNTERS]
SHAREGPT = os.path.join(load_gen.DATA_DIR, "sharegpt_v3_filtered_500.json")
# Launcher flags the benchmark passes through (the same cluster shape for every policy).
SERVER_FLAGS = {"model": str, "dtype": str, "num_instances": int, "tp": int, "cpu_devices": int, "hbm_bytes": int,
                "num_pages": int, "page_size": int, "max_model_len": int, "max_num_seqs": int,
                "max_num_batched_tokens": int, "max_prefill_rows": int, "swap_space_bytes": int, "dispatch": str,
                "group_shapes": str}
# --smoke: one small instance (few shapes to compile: --nowarmup compiles only those that cover every
# step) whose pool a burst of the Azure code trace overloads.
SMOKE = dict(model="tiny", dtype="float32", num_instances=1, tp=1, cpu_devices=1, num_pages=24, page_size=16,
             max_model_len=192, max_num_seqs=4, max_num_batched_tokens=64, max_prefill_rows=2,
             policies="recompute,swap", trace="azure_code", trace_offset=5100, trace_limit=24, time_scale=4.0,
             max_input_len=128, max_output_len=16, sample_interval=0.1, memory_every=5, ttft_slo_ms=5000.0,
             tpot_slo_ms=500.0)
SMOKE_LAUNCH = ["--nowarmup"]


# ---- requests -----------------------------------------------------------------------------------
def build_arrivals(args) -> list[load_gen.Arrival]:
    if args.trace:
        arrivals = load_gen.load_trace(args.trace, args.trace_offset, args.trace_limit)
    else:
        arrivals = load_gen.synthetic_arrivals(args.num_requests, args.rate, args.burstiness, args.input_len,
                                               args.output_len, np.random.default_rng(args.seed))
    if args.sample < 1.0:
        keep = np.random.default_rng(args.seed + 1).random(len(arrivals)) < args.sample
        arrivals = [a for a, k in zip(arrivals, keep) if k]
        if arrivals:
            t0 = arrivals[0].t
            for a in arrivals:
                a.t -= t0
    for a in arrivals:
        a.t /= args.time_scale
        a.input_len = max(1, min(int(round(a.input_len * args.len_scale)), args.max_input_len or 1 << 30))
        out_scale = args.len_scale if args.output_scale is None else args.output_scale
        a.output_len = max(1, min(int(round(a.output_len * out_scale)), args.max_output_len or 1 << 30))
    if not arrivals:
        raise ValueError("no requests left (check --trace_limit / --sample)")
    return arrivals


def sharegpt_prompts(arrivals: Sequence[load_gen.Arrival], seed: int) -> list[str]:
    """ShareGPT first turns (in a seeded order), each cut to at most the arrival's prompt length in
    UTF-8 bytes; short texts are joined with the next ones until the length is reached."""
    with open(SHAREGPT) as f:
        texts = [c["conversations"][0]["value"] for c in json.load(f) if c.get("conversations")]
    order = np.random.default_rng(seed).permutation(len(texts))
    out, k = [], 0
    for a in arrivals:
        buf = b""
        budget = max(1, a.input_len - 1)  # room for a BOS token
        while len(buf) < budget:
            buf += texts[order[k % len(order)]].encode() + b"\n"
            k += 1
        out.append(buf[:budget].decode("utf-8", errors="ignore") or "a")
    return out


# ---- one policy -----------------------------------------------------------------------------------
@dataclasses.dataclass
class PolicyRun:
    policy: str
    results: list
    duration: float
    samples: list
    events: list
    final: dict  # counters summed over instances at the end
    error: str = ""
    serving_s: float = 0.0


def _counters(st) -> dict:
    return {k: sum(int(getattr(i, k, 0)) for i in st.instances) for k in POLICY_COUNTERS}


def _event_row(policy: str, ev, wall_start: float) -> dict:
    return {"policy": policy, "t_s": round(ev.time - wall_start, 6), "kind": ev.kind, "instance": ev.instance,
            "target": ev.target, "request_id": ev.request_id, "bytes": ev.bytes, "tokens": ev.tokens,
            "seconds": round(ev.seconds, 6), "source": "event_log"}


async def _sample(client, start: float, policy: str, samples: list, events: list, state: dict,
                  interval: float, memory_every: int) -> None:
    """Polls Admin.Status until cancelled: one timeline row per poll, the new overload events."""
    wall_start = time.time() - (time.perf_counter() - start)
    state["wall_start"] = wall_start
    k = 0
    while True:
        with_mem = memory_every > 0 and k % memory_every == 0
        st = await client.status(skip_memory=not with_mem, events_after=state["seq"])
        t = time.perf_counter() - start
        for ev in st.events:
            events.append(_event_row(policy, ev, wall_start))
            state["seq"] = max(state["seq"], ev.seq)
        weights = [int(m.weights) for m in st.memory] if with_mem else None
        samples.append({"policy": policy, "t_s": round(t, 4), "running": st.running, "waiting": st.waiting,
                        "queued": st.queued, "pages_free": st.pages_free, "pages_total": st.pages_total,
                        "swapped": sum(i.swapped for i in st.instances), "groups": len(st.groups),
                        "weights_bytes_per_device": weights, **_counters(st)})
        k += 1
        await asyncio.sleep(interval)


def _inferred_transitions(policy: str, samples: list, events: list) -> list:
    """Drops and restores seen as a change of the pipeline-group count between two samples, when the
    server's event log has none of its own."""
    if any(e["kind"] in ("drop", "restore") for e in events):
        return []
    out = []
    for a, b in zip(samples, samples[1:]):
        if b["groups"] != a["groups"]:
            out.append({"policy": policy, "t_s": b["t_s"], "kind": "drop" if b["groups"] > a["groups"] else "restore",
                        "instance": -1, "target": -1, "request_id": "", "bytes": 0, "tokens": 0, "seconds": 0.0,
                        "source": "status_groups"})
    return out


def wait_idle(target: str, timeout_s: float = 600.0) -> None:
    """Until the background compiler is done, then two short requests (first executions off the clock)."""
    from serving.client import Client

    with Client(target) as c:
        t0 = time.monotonic()
        while c.status(skip_memory=True).compiling and time.monotonic() - t0 < timeout_s:
            time.sleep(0.2)
        for _ in range(2):
            c.complete(prompt_token_ids=[11, 12, 13], max_tokens=2, timeout=300)


def run_policy(policy: str, launch_args: list, arrivals, prompts, args, log_dir: str) -> PolicyRun:
    from serving.client import Client
    from tools import launcher

    arrivals = [dataclasses.replace(a) for a in arrivals]  # fit_context edits them
    log_path = os.path.join(log_dir, f"server_{policy}.log")
    try:
        srv = launcher.start([f"--overload_policy={policy}", *launch_args], log_path, f"policy {policy}",
                             args.launch_timeout)
    except RuntimeError as e:
        return PolicyRun(policy, [], 0.0, [], [], {}, error=str(e))
    try:
        wait_idle(srv.target)
        samples, events, state = [], [], {"seq": 0, "wall_start": time.time()}
        with Client(srv.target) as c:  # events of the warm-up are not this run's
            state["seq"] = max([e.seq for e in c.status(skip_memory=True).events], default=0)

        def during(client, start):
            return _sample(client, start, policy, samples, events, state, args.sample_interval, args.memory_every)

        run = asyncio.run(load_gen.replay(srv.target, arrivals, prompts=prompts, seed=args.seed,
                                          timeout=args.request_timeout, during=during))
        with Client(srv.target) as c:
            st = c.status(skip_memory=True, events_after=state["seq"])
            events += [_event_row(policy, ev, state["wall_start"]) for ev in st.events]
            final = {**_counters(st), **{k: float(v) for k, v in st.transitions.items()
                                         if k in ("policy_fallbacks", "cost_model_error_pct", "cost_model_observed_steps")}}
        events += _inferred_transitions(policy, samples, events)
        return PolicyRun(policy, run["results"], run["duration"], samples, events, final, serving_s=srv.serving_s)
    except Exception as e:  # a policy that fails must not take the others down
        return PolicyRun(policy, [], 0.0, [], [], {}, error=f"{type(e).__name__}: {e}\n{srv.tail()}")
    finally:
        srv.stop()


# ---- metrics -----------------------------------------------------------------------------------
def metrics(run: PolicyRun, ttft_slo_ms: float, tpot_slo_ms: float) -> dict:
    rs = run.results
    ok = [r for r in rs if r.ok]
    ms = lambda xs, q: 1e3 * load_gen.pct(xs, q)  # noqa: E731
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    itl = [x for r in ok for x in r.itl]
    queue = [r.server_queue_ms / 1e3 for r in ok if r.server_queue_ms is not None]
    meets = [r for r in ok if r.ttft is not None and 1e3 * r.ttft <= ttft_slo_ms
             and (r.tpot is None or 1e3 * r.tpot <= tpot_slo_ms)]
    d = max(run.duration, 1e-9)
    m = {"policy": run.policy, "requests": len(rs), "completed": len(ok), "failed": len(rs) - len(ok),
         "error": run.error.splitlines()[0] if run.error else "", "duration_s": run.duration,
         "slo_attainment": len(meets) / len(rs) if rs else float("nan"), "goodput_rps": len(meets) / d,
         "throughput_rps": len(ok) / d, "output_tokens_per_s": sum(r.output_len for r in ok) / d}
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("queue_ms", queue)):
        for q in (50, 90, 99):
            m[f"{name}_p{q}"] = ms(xs, q)
    m["itl_ms_max"] = 1e3 * max(itl, default=float("nan"))
    m.update(run.final)
    kinds = [e["kind"] for e in run.events]
    m["drops"], m["restores"] = kinds.count("drop"), kinds.count("restore")
    usable = overload_to_usable(run.events)
    m["overload_to_usable_s_mean"] = float(np.mean(usable)) if usable else float("nan")
    m["overload_to_usable_s_max"] = max(usable, default=float("nan"))
    m["queue_share_of_slowest_ttft"] = queue_share(ok)
    return m


def overload_to_usable(events: list) -> list[float]:
    """For each drop, seconds from its overload being detected (the monitor's condition first held:
    the decision's over_s before it) to the drop finished (the freed pages usable)."""
    out, decided = [], None
    for e in sorted(events, key=lambda e: e["t_s"]):
        if e["kind"] == "drop_decided":
            decided = e
        elif e["kind"] == "drop" and decided is not None:
            out.append(e["t_s"] - decided["t_s"] + decided["seconds"])
            decided = None
    return out


def queue_share(ok: list, slowest: float = 0.05) -> float:
    """Of the slowest `slowest` share of requests by TTFT (at least one), the part of their TTFT spent
    queued in the server (admission waits), not computing their prefill."""
    rs = sorted((r for r in ok if r.ttft is not None and r.server_queue_ms is not None), key=lambda r: r.ttft)
    tail = rs[-max(1, int(round(slowest * len(rs)))):] if rs else []
    total = sum(r.ttft for r in tail)
    return sum(r.server_queue_ms / 1e3 for r in tail) / total if total > 0 else float("nan")


def ratios(table: list[dict], reference: str = "kunserve") -> list[dict]:
    """Each other policy's P99 TTFT / the reference's, and the reference's P99 TPOT / the other's."""
    ref = next((m for m in table if m["policy"] == reference and m["completed"]), None)
    if ref is None:
        return []
    return [{"policy": m["policy"], "p99_ttft_over_" + reference: m["ttft_ms_p99"] / ref["ttft_ms_p99"],
             reference + "_p99_tpot_over_policy": ref["tpot_ms_p99"] / m["tpot_ms_p99"]}
            for m in table if m["policy"] != reference and m["completed"]]


def print_table(table: list[dict], rat: list[dict]) -> None:
    print(f"{'policy':10s} {'done':>8s} {'TTFT p50/p90/p99 ms':>26s} {'TPOT p50/p90/p99 ms':>22s} "
          f"{'ITL p99':>8s} {'queue p99':>9s} {'SLO':>6s} {'goodput':>8s} {'req/s':>6s} {'tok/s':>7s} "
          f"{'preempt':>7s} {'recomp':>7s} {'swap MiB':>8s} {'migr':>5s} {'drops':>5s}")
    for m in table:
        if m["error"] and not m["completed"]:
            print(f"{m['policy']:10s} FAILED: {m['error']}")
            continue
        print(f"{m['policy']:10s} {m['completed']:>4d}/{m['requests']:<3d} "
              f"{m['ttft_ms_p50']:8.1f}/{m['ttft_ms_p90']:8.1f}/{m['ttft_ms_p99']:8.1f} "
              f"{m['tpot_ms_p50']:6.1f}/{m['tpot_ms_p90']:6.1f}/{m['tpot_ms_p99']:6.1f} {m['itl_ms_p99']:8.1f} "
              f"{m['queue_ms_p99']:9.1f} {100 * m['slo_attainment']:5.1f}% {m['goodput_rps']:8.2f} "
              f"{m['throughput_rps']:6.2f} {m['output_tokens_per_s']:7.1f} {m.get('preemptions', 0):7d} "
              f"{m.get('recomputed_tokens', 0):7d} {m.get('swapped_out_bytes', 0) / 2**20:8.1f} "
              f"{m.get('migrations_out', 0):5d} {m['drops']:5d}")
    for m in table:
        if not m["completed"]:
            continue
        extra = [f"longest inter-token gap {m['itl_ms_max']:.0f} ms",
                 f"queue share of the slowest 5% TTFT {100 * m['queue_share_of_slowest_ttft']:.0f}%"]
        if m["drops"]:
            extra.append(f"overload -> freed memory usable {m['overload_to_usable_s_mean']:.2f} s mean, "
                         f"{m['overload_to_usable_s_max']:.2f} s max over {m['drops']} drops, {m['restores']} restores")
        if "cost_model_error_pct" in m:
            extra.append(f"cost model error {m['cost_model_error_pct']:.1f}% over "
                         f"{int(m.get('cost_model_observed_steps', 0))} steps")
        if m.get("policy_fallbacks"):
            extra.append(f"fallbacks to recompute {int(m['policy_fallbacks'])}")
        print(f"{m['policy']:10s} " + "; ".join(extra))
    for r in rat:
        keys = list(r)
        print(f"{r['policy']:10s} P99 TTFT / kunserve's: {r[keys[1]]:.2f}x   kunserve's P99 TPOT / its: {r[keys[2]]:.2f}x")


# ---- output -----------------------------------------------------------------------------------
def _write_csv(path: str, columns: list, rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (";".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v))
                        for k, v in r.items()})


def write_out(out: str, runs: list[PolicyRun], table: list[dict], rat: list[dict], meta: dict) -> list[str]:
    from tools import bench_plots

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "requests.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["policy"] + load_gen.REQUEST_COLUMNS)
        w.writeheader()
        for run in runs:
            for r in run.results:
                w.writerow({"policy": run.policy, **load_gen.request_row(r)})
    _write_csv(os.path.join(out, "events.csv"), EVENT_COLUMNS,
               sorted((e for run in runs for e in run.events), key=lambda e: (e["policy"], e["t_s"])))
    _write_csv(os.path.join(out, "timeline.csv"), TIMELINE_COLUMNS, [s for run in runs for s in run.samples])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"meta": meta, "policies": table, "ratios": rat,
                   "errors": {r.policy: r.error for r in runs if r.error}}, f, indent=1)
    return bench_plots.plot_all(out, runs, meta.get("window_s", 5.0))


# ---- command line -----------------------------------------------------------------------------------
def parse(argv: Optional[Sequence[str]]):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="recompute,swap,kunserve",
                    help="comma-separated --overload_policy values, run one after the other (recompute, swap, "
                    "migrate, kunserve)")
    ap.add_argument("--smoke", action="store_true", help="a tiny slice on the tiny model (about a minute)")
    for name, typ in SERVER_FLAGS.items():
        ap.add_argument(f"--{name}", type=typ, default=None, help="passed to serving.launch")
    ap.add_argument("--trace", default="azure_code", help="a trace of data/traces (" + ", ".join(load_gen.TRACES)
                    + ") or a path; '' for synthetic arrivals")
    ap.add_argument("--trace_offset", type=int, default=5100, help="first row (the paper: code 5100, conv 9342)")
    ap.add_argument("--trace_limit", type=int, default=927, help="rows (the paper: code 927, conv 759)")
    ap.add_argument("--time_scale", type=float, default=1.0, help="divide the trace's gaps by this")
    ap.add_argument("--sample", type=float, default=1.0, help="keep this random fraction of the requests")
    ap.add_argument("--len_scale", type=float, default=1.0, help="multiply prompt and output lengths by this")
    ap.add_argument("--output_scale", type=float, default=None,
                    help="multiply output lengths by this instead of --len_scale (long generations, as in "
                    "chain-of-thought serving: a decode-heavy burst whose KV outgrows the pool)")
    ap.add_argument("--max_input_len", type=int, default=None)
    ap.add_argument("--max_output_len", type=int, default=None)
    ap.add_argument("--prompts", choices=("synthetic", "sharegpt"), default="synthetic")
    ap.add_argument("--rate", type=float, default=10.0, help="synthetic arrivals (no --trace): requests/s")
    ap.add_argument("--burstiness", type=float, default=1.0)
    ap.add_argument("--num_requests", type=int, default=100)
    ap.add_argument("--input_len", type=int, default=64)
    ap.add_argument("--output_len", type=int, default=32)
    ap.add_argument("--ttft_slo_ms", type=float, default=5000.0)
    ap.add_argument("--tpot_slo_ms", type=float, default=200.0)
    ap.add_argument("--sample_interval", type=float, default=0.25, help="seconds between Admin.Status samples")
    ap.add_argument("--memory_every", type=int, default=8, help="measure device memory every N samples")
    ap.add_argument("--window_s", type=float, default=5.0, help="sliding window of the P99 TTFT timeline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request_timeout", type=float, default=900.0)
    ap.add_argument("--launch_timeout", type=float, default=900.0)
    ap.add_argument("--compilation_cache_dir", default=None, help="passed to serving.launch")
    ap.add_argument("--out", default=None, help="directory for the CSVs, summary.json and the plots")
    args = ap.parse_args(argv)
    if args.smoke:
        explicit = {a.split("=")[0][2:] for a in argv if a.startswith("--")}
        for k, v in SMOKE.items():
            if k not in explicit:
                setattr(args, k, v)
    launch = [f"--{n}={getattr(args, n)}" for n in SERVER_FLAGS if getattr(args, n) is not None]
    if args.compilation_cache_dir:
        launch.append(f"--compilation_cache_dir={args.compilation_cache_dir}")
    if args.smoke:
        extra = SMOKE_LAUNCH + extra
    if not any(a.startswith("--log_level") for a in extra):
        launch.append("--log_level=info")
    for name in PINNED_FLAGS:  # recorded even when defaulted: a later default must not change what a run meant
        if not any(a.startswith(f"--{name}=") for a in launch + extra):
            launch.append(f"--{name}={launcher_default(name)}")
    return args, launch + extra


# Launcher flags whose default changed (most_free_pages, first): every run records the value it used,
# so tools.simulate --validate replays a run recorded before them with the old meaning
# (tools.simulate.OLD_DEFAULTS).
PINNED_FLAGS = ("dispatch", "group_shapes")


def launcher_default(name: str) -> str:
    from serving import launch

    return str(launch.FLAGS[name].default)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, launch = parse(argv)
    policies = [p for p in args.policies.split(",") if p]
    try:
        arrivals = build_arrivals(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = sharegpt_prompts(arrivals, args.seed) if args.prompts == "sharegpt" else None
    span = arrivals[-1].t if arrivals else 0.0
    print(f"{len(arrivals)} requests over {span:.1f} s; prompt tokens {sum(a.input_len for a in arrivals)}, "
          f"output tokens {sum(a.output_len for a in arrivals)}; policies {', '.join(policies)}", flush=True)
    print("serving.launch " + " ".join(launch), flush=True)
    log_dir = args.out or tempfile.mkdtemp(prefix="kunjax-bench-")
    os.makedirs(log_dir, exist_ok=True)
    runs = []
    for p in policies:
        t = time.monotonic()
        run = run_policy(p, launch, arrivals, prompts, args, log_dir)
        runs.append(run)
        state = f"FAILED: {run.error.splitlines()[0]}" if run.error else f"{sum(r.ok for r in run.results)} ok"
        print(f"policy {p}: {state} ({time.monotonic() - t:.0f} s, server log {log_dir}/server_{p}.log)", flush=True)
    table = [metrics(r, args.ttft_slo_ms, args.tpot_slo_ms) for r in runs]
    rat = ratios(table)
    print_table(table, rat)
    if args.out:
        meta = {"argv": list(sys.argv[1:] if argv is None else argv), "launch": launch, "requests": len(arrivals),
                "ttft_slo_ms": args.ttft_slo_ms, "tpot_slo_ms": args.tpot_slo_ms, "window_s": args.window_s}
        plots = write_out(args.out, runs, table, rat, meta)
        print(f"wrote {args.out}: requests.csv, events.csv, timeline.csv, summary.json, "
              + ", ".join(os.path.basename(p) for p in plots))
    return 0 if all(not r.error and all(x.ok for x in r.results) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
