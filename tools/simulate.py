"""The overload policies side by side on a simulated cluster: the real control plane, simulated devices.

    # the paper's setting: Llama-3-70B on 32 H100s in instances of tp 4, the Azure code slice
    python -m tools.simulate --model=llama-3-70b --gpu=h100-sxm --num_gpus=32 --tp=4 \\
        --trace=azure_code --trace_offset=5100 --trace_limit=927 --page_size=256 \\
        --max_num_batched_tokens=4096 --max_num_seqs=256 --max_model_len=16384 \\
        --policies=recompute,swap,migrate,kunserve --out=/tmp/sim
    # fit the device model to real steps on the devices at hand (CPU here), then predict a real run
    python -m tools.simulate --calibrate --model=tiny --out=/tmp/cpu.json
    python -m tools.simulate --validate=/tmp/kb_tiny --calibration=/tmp/cpu.json

Every flag of `tools.bench` means the same here (`--trace`, `--trace_offset`, `--trace_limit`,
`--time_scale`, `--sample`, `--len_scale`, `--max_input_len`, `--max_output_len`, `--policies`,
`--ttft_slo_ms`, `--tpot_slo_ms`, `--out`, the cluster shape `--num_instances`, `--tp`,
`--num_pages`, `--page_size`, `--max_model_len`, `--max_num_seqs`, `--max_num_batched_tokens`,
`--max_prefill_rows`, `--swap_space_bytes`, `--hbm_bytes`, `--dispatch`, `--group_shapes`, and launcher
flags after `--`, e.g.
`-- --drop_dwell_s=0.2`): they are read by the benchmark's and the launcher's own parsers. Added:
`--gpu` (a preset of kunjax.sim.hardware: h100-sxm, h200, a100-80gb), `--num_gpus` (instances =
num_gpus / tp), `--calibration=FILE` (a fitted device instead of a preset), `--markdown=FILE`,
`--group_compile_s` (how long an on-demand group shape takes to compile, per stage).

The policies run through the serving code unchanged (kunjax.sim.cluster): dispatch, the schedulers,
recompute / swap / migrate, the kunserve monitor, planner, plan.py, the drop and restore tasks,
lookahead micro-batches. `--out DIR` writes what `tools.bench --out` writes (requests.csv,
events.csv, timeline.csv, summary.json, the plots), through the benchmark's own writers, so a
simulated run and a real one compare with the same script; times are simulated seconds.

`--calibrate` (imports JAX) runs real steps of `--model` (every shape compiled, as a server once its
background compiler is done) in the serving control plane's loop, times each as its cycle there
(dispatch to its unit's next dispatch), measures the device's peaks (numpy matmul FLOP/s, copy
bandwidth) and its links, fits the efficiency factors and overheads
(kunjax.sim.hardware.fit_efficiency) and reports the fit's error, on the steps and held out; on
virtual CPU devices it also fits how much two instances' steps slow each other on the shared cores
(the host capacity of kunjax.sim.sharing), in the bare loop and through a server with the same
flags, whose lone requests also give what the serving path adds to a first token.
`--validate=DIR` reads a real `tools.bench --out DIR` run (its recorded
argv and launch flags), simulates the same slice, cluster and policies, and prints predicted
against measured P50 / P99 TTFT and TPOT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import types
from typing import Optional, Sequence

from tools import bench, load_gen

SIM_METRICS = ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")
# What the launcher did before --dispatch and --group_shapes existed (tools.bench records both since).
OLD_DEFAULTS = {"dispatch": "most_free_pages", "group_shapes": "first"}


def sim_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.simulate", add_help=False)
    ap.add_argument("--gpu", default="h100-sxm", help="device preset (kunjax.sim.hardware.PRESETS)")
    ap.add_argument("--num_gpus", type=int, default=None, help="devices in all (instances = num_gpus / tp)")
    ap.add_argument("--calibration", default=None, help="a --calibrate file: its device instead of --gpu")
    ap.add_argument("--calibrate", action="store_true", help="fit the device model to real steps; --out=FILE")
    ap.add_argument("--validate", default=None, help="a real tools.bench --out DIR to predict")
    ap.add_argument("--markdown", default=None, help="append the run's table to this markdown file")
    ap.add_argument("--dtype_bytes", type=int, default=None, help="bytes per weight / KV element (default: 2 on "
                    "a GPU preset, the calibration's otherwise)")
    ap.add_argument("--link_scale", type=float, default=1.0, help="multiply the bandwidth of the links bulk copies "
                    "take by this (a drop, a restore, a swap, a migration; not a step's TP all-reduces)")
    ap.add_argument("--group_compile_s", type=float, default=2.0,
                    help="--group_shapes=on_demand: seconds the background compiler takes for one step shape on one "
                    "stage of a pipeline group (its layer executable at the group's page count); shapes queue one "
                    "after the other on each member's compiler. Default 2: kunjax's Llama-3-70B tp4 layer "
                    "executable compiled in 1.9-2.2 s with XLA:CPU here (docs/simulator.md)")
    ap.add_argument("--no_server", action="store_true", help="--calibrate: skip timing the serving path "
                    "(a server with the same flags, lone requests through the client)")
    ap.add_argument("--attention", choices=("gather", "paged"), default="gather",
                    help="how attention is costed: as kunjax computes it (every row over the step's gathered "
                    "pages, gathered first) or, as a what-if, as a paged-attention kernel would (each row its own context)")
    ap.add_argument("--log_level", default="warning", help="the control plane's log (info: every overload "
                    "decision, each drop and restore)")
    ap.add_argument("--calibrate_requests", type=int, default=48, help="--calibrate: requests served and timed")
    return ap


# ---- the cluster the launcher would build --------------------------------------------------------
@dataclasses.dataclass
class Setting:
    """Everything a simulated run is made of (from the benchmark's and the launcher's flags)."""

    model: str
    cfg: object  # ModelConfig
    calibration: object  # kunjax.sim.hardware.Calibration
    instance: object  # kunjax.sim.units.InstanceConfig
    num_instances: int
    tp: int
    num_pages: Optional[int]
    hbm_bytes: Optional[int]
    dtype_bytes: int
    kunserve: object  # KunserveConfig
    launch: list
    dispatch: str = "most_free_pages"

    def describe(self) -> dict:
        sc = self.instance.scheduler
        return {"model": self.model, "device": self.calibration.spec.name, "num_instances": self.num_instances,
                "tp": self.tp, "num_pages": self.num_pages, "page_size": self.instance.page_size,
                "max_model_len": self.instance.max_model_len, "max_num_seqs": sc.max_num_seqs,
                "max_num_batched_tokens": sc.max_num_batched_tokens, "max_prefill_rows": sc.max_prefill_rows,
                "dtype_bytes": self.dtype_bytes, "dispatch": self.dispatch, "efficiency": dataclasses.asdict(self.calibration.efficiency),
                "device_source": self.calibration.spec.source, "calibration_fit": self.calibration.fit}


def launcher_options(launch: Sequence[str]):
    """The launcher's own options from its flags (serving.launch parses them: same defaults, same
    checks); JAX is not imported."""
    from serving import launch as launcher

    launcher.FLAGS.unparse_flags()
    launcher.FLAGS(["simulate", *[a for a in launch if not a.startswith("--overload_policy")]])
    return launcher.options_from_flags(), launcher.kunserve_config


def setting(sim, launch: Sequence[str]) -> Setting:
    from kunjax.control.mechanism import resolve_group_shapes
    from kunjax.control.scheduler import SchedulerConfig
    from kunjax.sim.hardware import Calibration, preset
    from kunjax.sim.models import model_config
    from kunjax.sim.units import InstanceConfig

    opts, kunserve_config = launcher_options(launch)
    cfg = model_config(opts.model.model)
    cal = Calibration.load(sim.calibration) if sim.calibration else preset(sim.gpu)
    if sim.link_scale != 1.0:
        if not sim.link_scale > 0:
            raise ValueError(f"link_scale must be > 0, got {sim.link_scale}")
        cal = dataclasses.replace(cal, efficiency=dataclasses.replace(
            cal.efficiency, link=cal.efficiency.link * sim.link_scale))
    tp = opts.cluster.tp
    n = opts.cluster.num_instances
    if sim.num_gpus is not None:
        if sim.num_gpus % tp:
            raise ValueError(f"num_gpus: {sim.num_gpus} is not a multiple of tp={tp}")
        n = sim.num_gpus // tp
    s = opts.scheduler
    sched = SchedulerConfig(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                            max_prefill_rows=s.max_prefill_rows, max_queue=s.max_queue)
    c = opts.cache
    max_len = min(c.max_model_len or 4096, cfg.max_position_embeddings)
    dtype = sim.dtype_bytes or cal.fit.get("dtype_bytes") or 2
    if not sim.group_compile_s >= 0:
        raise ValueError(f"group_compile_s must be >= 0, got {sim.group_compile_s}")
    inst = InstanceConfig(sched, c.page_size, max_len, opts.memory.swap_space_bytes, opts.scheduler.warmup,
                          resolve_group_shapes(opts.cluster.group_shapes, accelerator=not cal.shared_devices),
                          sim.group_compile_s, sim.attention == "paged")
    return Setting(opts.model.model, cfg, cal, inst, n, tp, c.num_pages, c.hbm_bytes, int(dtype),
                   kunserve_config(opts.memory), list(launch), opts.cluster.dispatch)


def arrivals_for(args, max_model_len: int) -> list:
    arrivals = bench.build_arrivals(args)
    load_gen.fit_context(arrivals, max_model_len)  # as the real replay shortens them to the server's context
    return arrivals


def run_policy(policy: str, st: Setting, arrivals, args) -> bench.PolicyRun:
    from kunjax.sim import cluster as sim_cluster

    t = time.perf_counter()
    cl = sim_cluster.build(st.cfg, st.calibration, st.instance, st.num_instances, st.tp, policy, st.num_pages,
                           st.hbm_bytes, st.dtype_bytes, st.kunserve, st.dispatch)
    results, samples, duration = sim_cluster.replay(cl, [dataclasses.replace(a) for a in arrivals],
                                                    args.sample_interval, args.memory_every)
    for s in samples:
        s["policy"] = policy
    events = [bench._event_row(policy, types.SimpleNamespace(**ev), 0.0) for ev in cl.event_rows()]
    for e in events:
        e["source"] = "simulated"
    run = bench.PolicyRun(policy, results, duration, samples, events, cl.counters())
    run.serving_s = time.perf_counter() - t  # the simulation's own wall time
    run.pages = cl.engines[0].num_pages
    return run


def simulate(args, st: Setting, policies: Sequence[str]):
    arrivals = arrivals_for(args, st.instance.max_model_len)
    runs = []
    for p in policies:
        run = run_policy(p, st, arrivals, args)
        print(f"policy {p}: {sum(r.ok for r in run.results)}/{len(run.results)} ok, {run.duration:.1f} simulated s "
              f"in {run.serving_s:.1f} s ({run.pages} KV pages per instance)", flush=True)
        runs.append(run)
    table = [bench.metrics(r, args.ttft_slo_ms, args.tpot_slo_ms) for r in runs]
    return arrivals, runs, table


def markdown(table: list[dict], title: str) -> str:
    rows = [f"**{title}**", "", "| policy | done | TTFT P50 ms | TTFT P99 ms | TPOT P50 ms | TPOT P99 ms | SLO | "
            "preempt | swap outs | migrations | drops | restores |", "|" + "---|" * 12]
    for m in table:
        rows.append(f"| {m['policy']} | {m['completed']}/{m['requests']} | {m['ttft_ms_p50']:.0f} | "
                    f"{m['ttft_ms_p99']:.0f} | {m['tpot_ms_p50']:.1f} | {m['tpot_ms_p99']:.1f} | "
                    f"{100 * m['slo_attainment']:.1f}% | {m.get('preemptions', 0)} | {m.get('swap_outs', 0)} | "
                    f"{m.get('migrations_out', 0)} | {m['drops']} | {m['restores']} |")
    return "\n".join(rows) + "\n"


# ---- calibration ----------------------------------------------------------------------------
def calibrate(sim, args, launch: Sequence[str]) -> int:
    """Real steps of the model on this machine's devices -> a calibration file (imports JAX)."""
    if not args.out:
        print("error: --calibrate needs --out=FILE", file=sys.stderr)
        return 2
    opts, _ = launcher_options(launch)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    from tools.sim_calibrate import calibrate_device

    cal = calibrate_device(opts, sim.calibrate_requests, args.seed, None if sim.no_server else list(launch))
    with open(args.out, "w") as f:
        json.dump(cal.to_json(), f, indent=1)
    fit = cal.fit
    print(f"calibrated {fit['steps']} steps of {opts.model.model} on {cal.spec.name}: mean abs error "
          f"{fit['mean_abs_pct_error']:.1f}% (P90 {fit['p90_abs_pct_error']:.1f}%), held out "
          f"{fit['held_out_mean_abs_pct_error']:.1f}% (P90 {fit['held_out_p90_abs_pct_error']:.1f}%); "
          f"efficiency {dataclasses.asdict(cal.efficiency)}; wrote {args.out}")
    share, served = fit.get("host_sharing"), fit.get("serving", {})
    if share:
        print(f"shared cores: the serving loop's steps, two instances at once: host capacity {share['host_capacity']:.2f} "
              f"lone steps (each of k concurrent steps at min(1, C/k) of its lone speed), fitted on "
              f"{share['concurrent_steps']} steps (median slowdown {share['slowdown_median']:.2f}x): mean abs error "
              f"{share['mean_abs_pct_error']:.1f}% (C = 1: {share['mean_abs_pct_error_c1']:.1f}%, parallel: "
              f"{share['mean_abs_pct_error_parallel']:.1f}%)")
    if "served_capacity" in served:
        print(f"served (server and client on the same cores): TPOT alone {1e3 * served['served_tpot_alone_s']:.2f} ms, "
              f"two at once {1e3 * served['served_tpot_two_at_once_s']:.2f} ms over {served['served_pairs']} pairs: "
              f"capacity {served['served_capacity']:.2f}, the one used")
    print(f"host capacity: {cal.host_capacity}")
    return 0


# ---- validation -----------------------------------------------------------------------------
def validate(sim, directory: str, out: Optional[str] = None) -> int:
    """Predicts the real run in `directory`; `out`: where the simulated run's files go (never the
    real run's directory, whose --out its recorded argv names)."""
    with open(os.path.join(directory, "summary.json")) as f:
        real = json.load(f)
    meta = real["meta"]
    args, _ = bench.parse(meta["argv"])
    args.argv, args.out = list(meta["argv"]), out
    launch = list(meta["launch"])
    for name, old in OLD_DEFAULTS.items():  # a run recorded before the flag existed ran its old default
        if not any(x.startswith(f"--{name}=") for x in launch):
            launch.append(f"--{name}={old}")
    st = setting(sim, launch)
    measured = {m["policy"]: m for m in real["policies"] if m.get("completed")}
    _, runs, table = simulate(args, st, list(measured))
    print(f"\npredicted (simulated, {st.calibration.spec.name}) vs measured ({directory}); error = predicted / "
          f"measured - 1")
    print(f"{'policy':10s} " + " ".join(f"{k:>24s}" for k in SIM_METRICS))
    report = {}
    for m in table:
        ms = measured[m["policy"]]
        errs = {k: m[k] / ms[k] - 1 for k in SIM_METRICS if ms.get(k)}
        report[m["policy"]] = {"predicted": {k: m[k] for k in SIM_METRICS}, "measured": {k: ms[k] for k in SIM_METRICS},
                               "error": errs}
        print(f"{m['policy']:10s} " + " ".join(f"{m[k]:8.1f}/{ms[k]:8.1f} {100 * errs.get(k, float('nan')):+5.0f}%"
                                               for k in SIM_METRICS))
    if args.out:
        write(args, st, runs, table, extra={"validation": report, "validated": directory})
    return 0


# ---- command line ---------------------------------------------------------------------------
def write(args, st: Setting, runs, table, extra: Optional[dict] = None) -> None:
    rat = bench.ratios(table)
    meta = {"argv": list(args.argv), "launch": st.launch, "requests": len(runs[0].results) if runs else 0,
            "ttft_slo_ms": args.ttft_slo_ms, "tpot_slo_ms": args.tpot_slo_ms, "window_s": args.window_s,
            "simulated": st.describe(), **(extra or {})}
    plots = bench.write_out(args.out, runs, table, rat, meta)
    print(f"wrote {args.out}: requests.csv, events.csv, timeline.csv, summary.json, "
          + ", ".join(os.path.basename(p) for p in plots))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    head, tail = (argv[:argv.index("--")], argv[argv.index("--"):]) if "--" in argv else (argv, [])
    sim, rest = sim_parser().parse_known_args(head)
    logging.basicConfig(level=sim.log_level.upper(), format="%(levelname).1s %(name)s: %(message)s")
    try:
        args, launch = bench.parse(rest + tail)
        if sim.validate:
            if args.out and os.path.abspath(args.out) == os.path.abspath(sim.validate):
                raise ValueError("out: the simulated run must not overwrite the real run it validates")
            return validate(sim, sim.validate, args.out)
        args.argv = argv
        if sim.calibrate:
            return calibrate(sim, args, launch)
        st = setting(sim, launch)
        policies = [p for p in args.policies.split(",") if p]
        print(f"simulating {st.model} on {st.num_instances} x tp{st.tp} {st.calibration.spec.name} "
              f"({st.num_instances * st.tp} devices); policies {', '.join(policies)}", flush=True)
        arrivals, runs, table = simulate(args, st, policies)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    span = arrivals[-1].t if arrivals else 0.0
    print(f"{len(arrivals)} requests over {span:.1f} s; prompt tokens {sum(a.input_len for a in arrivals)}, "
          f"output tokens {sum(a.output_len for a in arrivals)}")
    rat = bench.ratios(table)
    bench.print_table(table, rat)
    if sim.markdown:
        with open(sim.markdown, "a") as f:
            f.write(markdown(table, f"{st.model} on {st.num_instances} x tp{st.tp} {st.calibration.spec.name}, "
                                    f"{args.trace} from row {args.trace_offset}, {len(arrivals)} requests, "
                                    f"time / {args.time_scale:g}") + "\n")
    if args.out:
        write(args, st, runs, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
