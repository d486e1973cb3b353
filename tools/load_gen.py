"""Load generator for the kunjax gRPC server (asyncio): synthetic arrivals or a trace replay.

    # Poisson arrivals at 20 req/s (gamma arrivals with --burstiness < 1 are burstier)
    python -m tools.load_gen --target localhost:50051 --rate 20 --num_requests 200 \
        --input_len 32 --output_len 32
    # replay the Azure conversation trace shipped in data/traces, 10x faster, lengths clipped
    python -m tools.load_gen --trace azure_conv \
        --trace_offset 9342 --trace_limit 200 --time_scale 10 --max_input_len 96 --max_output_len 32

Prompts are random token ids (`prompt_token_ids`, ids in [--min_token_id, --max_token_id)) with
ignore_eos, so every request produces exactly its output length. TTFT is measured at the client
from sending the call to the first streamed token; TPOT is (last - first token) / (tokens - 1).
Traces: Azure LLM inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens), BurstGPT CSV
(Timestamp, Request tokens, Response tokens) and Mooncake JSONL (timestamp ms, input_length,
output_length). `--trace` takes a path or the short name of a trace shipped in data/traces
(TRACES below; data/traces/README.md gives their sources and licences).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass
class Arrival:
    t: float  # seconds from the start
    input_len: int
    output_len: int


@dataclasses.dataclass
class Result:
    """One request as the client saw it. Times are seconds from the start of the run (the same
    clock for every request; `run_wall_start` in the summary is that moment as Unix time), so a
    request's whole life can be plotted: sent, every token's arrival, finished. A failed request
    keeps everything it got before it failed (its tokens, its error)."""

    ok: bool
    input_len: int
    output_len: int = 0  # tokens received
    ttft: Optional[float] = None
    tpot: Optional[float] = None
    e2e: Optional[float] = None
    itl: list = dataclasses.field(default_factory=list)
    server_ttft_ms: Optional[float] = None
    error: str = ""
    index: int = -1  # position in the arrival list
    request_id: str = ""
    max_tokens: int = 0  # asked for
    send_t: Optional[float] = None  # the call was made
    token_times: list = dataclasses.field(default_factory=list)  # arrival of each token (one per token)
    finish_t: Optional[float] = None  # the stream ended (finished, failed or cancelled)
    finish_reason: str = ""
    server_queue_ms: Optional[float] = None  # receipt to first scheduled, as the server measured it
    instance: int = -1
    error_message: str = ""

    def set_derived(self) -> None:
        """ttft / tpot / e2e / itl from the timestamps."""
        ts = self.token_times
        self.output_len = len(ts)
        if ts and self.send_t is not None:
            self.ttft = ts[0] - self.send_t
            self.e2e = ts[-1] - self.send_t
            self.itl = [b - a for a, b in zip(ts, ts[1:])]
            if len(ts) > 1:
                self.tpot = (ts[-1] - ts[0]) / (len(ts) - 1)


def synthetic_arrivals(n: int, rate: float, burstiness: float, input_len: int, output_len: int,
                       rng: np.random.Generator, len_jitter: float = 0.0) -> list[Arrival]:
    """Gamma inter-arrival times with mean 1/rate and shape `burstiness` (1 = Poisson); rate=inf
    sends everything at t=0."""
    if math.isinf(rate):
        gaps = np.zeros(n)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
        gaps[0] = 0.0
    ts = np.cumsum(gaps)

    def jitter(x):
        if len_jitter <= 0:
            return x
        return max(1, int(round(x * rng.uniform(1 - len_jitter, 1 + len_jitter))))
    return [Arrival(float(t), jitter(input_len), jitter(output_len)) for t in ts]


DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "traces")
# Short names for the traces shipped in the repository (data/traces).
TRACES = {
    "azure_code": "AzureLLMInferenceTrace_code.csv",
    "azure_conv": "AzureLLMInferenceTrace_conv.csv",
    "burstgpt": "burstgpt1_head400.csv",
    "mooncake_conversation": "mooncake_conversation_trace_head1000.jsonl",
    "mooncake_synthetic": "mooncake_synthetic_trace_head1000.jsonl",
}


def trace_path(name_or_path: str) -> str:
    """A short name of TRACES (-> its file in data/traces) or a path; raises ValueError naming both
    when it is neither."""
    if name_or_path in TRACES:
        return os.path.join(DATA_DIR, TRACES[name_or_path])
    if os.path.isfile(name_or_path):
        return name_or_path
    raise ValueError(f"--trace={name_or_path}: no such file, and not one of the shipped traces "
                     f"({', '.join(TRACES)})")


def load_trace(path: str, offset: int = 0, limit: Optional[int] = None) -> list[Arrival]:
    """Arrivals of a trace file (or a short name of TRACES), from row `offset` (0-based, header not
    counted), at most `limit` rows; times are relative to the first row returned."""
    path = trace_path(path)
    rows: list[tuple[float, int, int]] = []
    try:
        if path.endswith(".jsonl"):
            with open(path) as f:
                for line in f:
                    d = json.loads(line)
                    rows.append((d["timestamp"] / 1000.0, int(d["input_length"]), int(d["output_length"])))
        else:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                for r in reader:
                    if "TIMESTAMP" in r:  # Azure 2023
                        ts = datetime.datetime.fromisoformat(r["TIMESTAMP"][:26]).replace(
                            tzinfo=datetime.timezone.utc).timestamp()  # no zone given; UTC avoids DST jumps
                        rows.append((ts, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
                    elif "Timestamp" in r:  # BurstGPT
                        rows.append((float(r["Timestamp"]), int(r["Request tokens"]), int(r["Response tokens"])))
                    else:
                        raise ValueError(f"unknown trace columns {list(r)}")
    except (KeyError, TypeError, ValueError) as e:  # a missing field, a malformed number or line
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: row {len(rows) + 1}: {what}") from None
    rows = rows[offset:offset + limit if limit else None]
    if not rows:
        raise ValueError(f"{path}: no rows at offset {offset}")
    t0 = rows[0][0]
    return [Arrival(t - t0, i, o) for t, i, o in rows]


def pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def fit_context(arrivals: list[Arrival], max_model_len: int) -> int:
    """Shortens requests that the server's context cannot hold (prompt + output <= max_model_len):
    the output to at most half the context, then the prompt to what is left. Returns how many."""
    n = 0
    if max_model_len < 2:
        return 0
    for a in arrivals:
        if a.input_len + a.output_len > max_model_len:
            a.output_len = min(a.output_len, max_model_len // 2)
            a.input_len = min(a.input_len, max_model_len - a.output_len)
            n += 1
    return n


async def replay(target: str, arrivals: list[Arrival], *, prompts: Optional[Sequence] = None,
                 max_concurrency: Optional[int] = None, min_token_id: int = 10, max_token_id: int = 250,
                 seed: int = 0, timeout: float = 600.0, fit: bool = True, during=None) -> dict:
    """Sends every arrival at its time through the client library and records each request's
    timestamps (`Result`). `prompts`: one per arrival, text or token ids (default: random token ids
    of the arrival's input length). `during(client, start)`: a coroutine run alongside the replay
    (e.g. sampling Admin.Status); it is cancelled when the last request ends. Returns
    {"results", "duration", "before", "after", "clipped", "wall_start"}."""
    import grpc

    from serving.client import AsyncClient

    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    results: list[Result] = [Result(ok=False, input_len=a.input_len, index=i) for i, a in enumerate(arrivals)]

    async with AsyncClient(target) as client:
        before = await client.status(skip_memory=True)
        clipped = fit_context(arrivals, before.max_model_len) if fit else 0
        if prompts is None:
            rng = np.random.default_rng(seed)
            prompts = [rng.integers(min_token_id, max_token_id, size=a.input_len).tolist() for a in arrivals]
        start = time.perf_counter()
        wall_start = time.time()

        async def one(a: Arrival, prompt, r: Result):
            if sem is not None:
                await sem.acquire()
            r.input_len, r.max_tokens = a.input_len, a.output_len
            kw = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
            r.send_t = time.perf_counter() - start
            try:
                async for chunk in client.generate(max_tokens=a.output_len, ignore_eos=True, timeout=timeout, **kw):
                    now = time.perf_counter() - start
                    r.request_id = r.request_id or chunk.request_id
                    r.token_times.extend([now] * len(chunk.token_ids))
                    if chunk.finish_reason:
                        r.finish_reason = FINISH_NAMES.get(chunk.finish_reason) or ""
                        r.server_ttft_ms = chunk.usage.ttft_ms
                        r.server_queue_ms = getattr(chunk.usage, "queue_ms", None)
                        r.instance = chunk.usage.instance
                r.ok = bool(r.finish_reason) and r.finish_reason not in ("abort", "error")
                if not r.ok:
                    r.error = r.finish_reason.upper() or "NO_FINISH_REASON"
            except grpc.aio.AioRpcError as e:
                r.error, r.error_message = e.code().name, e.details() or ""
            except Exception as e:  # never lose a request: record what went wrong
                r.error, r.error_message = type(e).__name__, str(e)
            finally:
                r.finish_t = time.perf_counter() - start
                r.set_derived()
                if sem is not None:
                    sem.release()

        side = asyncio.create_task(during(client, start)) if during is not None else None
        tasks = []
        for a, prompt, r in zip(arrivals, prompts, results):
            delay = a.t - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(a, prompt, r)))
        await asyncio.gather(*tasks, return_exceptions=True)
        duration = time.perf_counter() - start
        if side is not None:
            side.cancel()
            await asyncio.gather(side, return_exceptions=True)
        after = await client.status(skip_memory=True)
    return {"results": results, "duration": duration, "before": before, "after": after, "clipped": clipped,
            "wall_start": wall_start}


async def run_load(target: str, arrivals: list[Arrival], **kw) -> dict:
    """`replay`, summarized (`summarize`); the per-request results are under "results"."""
    run = await replay(target, arrivals, **kw)
    s = summarize(run["results"], run["duration"], run["before"], run["after"])
    s["clipped_to_context"] = run["clipped"]
    s["run_wall_start"] = run["wall_start"]
    s["results"] = run["results"]
    return s


FINISH_NAMES = {1: "length", 2: "stop", 3: "abort", 4: "error"}  # kunjax.v1.FinishReason


def summarize(results: list[Result], duration: float, before=None, after=None) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    itl = [x for r in ok for x in r.itl]
    s = {
        "requests": len(results), "completed": len(ok), "errors": errors, "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (in_tokens + out_tokens) / duration,
        "server_ttft_ms_p50": pct([r.server_ttft_ms for r in ok if r.server_ttft_ms is not None], 50),
    }
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("e2e_ms", e2e)):
        s[f"{name}_mean"] = 1e3 * float(np.mean(xs)) if xs else float("nan")
        for q in (50, 90, 99):
            s[f"{name}_p{q}"] = 1e3 * pct(xs, q)
    if after is not None:
        t = {k: v - before.timing.get(k, 0.0) for k, v in after.timing.items()}  # this run only
        s["server_timing"] = t
        s["server_compiles"] = after.compiles - before.compiles
        if t.get("tokens"):
            busy = t.get("schedule_dispatch_s", 0) + t.get("wait_device_s", 0) + t.get("postprocess_s", 0)
            s["server_us_per_token"] = {
                "host_schedule_dispatch": 1e6 * t.get("schedule_dispatch_s", 0) / t["tokens"],
                "wait_device": 1e6 * t.get("wait_device_s", 0) / t["tokens"],
                "postprocess": 1e6 * t.get("postprocess_s", 0) / t["tokens"],
                "deliver": 1e6 * t.get("deliver_s", 0) / t["tokens"],
                "busy_total": 1e6 * busy / t["tokens"],
            }
            if t.get("iterations"):
                s["server_ms_per_iteration"] = 1e3 * busy / t["iterations"]
                s["server_steps_per_iteration"] = t.get("steps", 0) / t["iterations"]
    return s


REQUEST_COLUMNS = ["index", "request_id", "ok", "error", "finish_reason", "input_len", "max_tokens", "tokens",
                   "send_s", "first_token_s", "last_token_s", "finish_s", "ttft_ms", "tpot_ms", "server_ttft_ms",
                   "server_queue_ms", "instance", "token_times_s"]


def request_row(r: Result) -> dict:
    """One CSV row: times in seconds from the run's start, every token's arrival ;-joined."""
    ms = lambda x: "" if x is None else f"{1e3 * x:.3f}"  # noqa: E731
    sec = lambda x: "" if x is None else f"{x:.6f}"  # noqa: E731
    return {"index": r.index, "request_id": r.request_id, "ok": int(r.ok), "error": r.error,
            "finish_reason": r.finish_reason, "input_len": r.input_len, "max_tokens": r.max_tokens,
            "tokens": r.output_len, "send_s": sec(r.send_t),
            "first_token_s": sec(r.token_times[0] if r.token_times else None),
            "last_token_s": sec(r.token_times[-1] if r.token_times else None), "finish_s": sec(r.finish_t),
            "ttft_ms": ms(r.ttft), "tpot_ms": ms(r.tpot),
            "server_ttft_ms": "" if r.server_ttft_ms is None else f"{r.server_ttft_ms:.3f}",
            "server_queue_ms": "" if r.server_queue_ms is None else f"{r.server_queue_ms:.3f}",
            "instance": r.instance, "token_times_s": ";".join(f"{t:.6f}" for t in r.token_times)}


def write_requests_csv(path: str, results: Sequence[Result], extra: Optional[dict] = None) -> None:
    """One row per request (`request_row`), plus constant `extra` columns (e.g. the policy)."""
    extra = extra or {}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(extra) + REQUEST_COLUMNS)
        w.writeheader()
        for r in results:
            w.writerow({**extra, **request_row(r)})


def print_summary(s: dict) -> None:
    print(f"requests {s['completed']}/{s['requests']} in {s['duration_s']:.2f}s  errors {s['errors'] or 'none'}"
          + (f"  ({s['clipped_to_context']} shortened to the server's context)" if s.get("clipped_to_context") else ""))
    print(f"throughput: {s['request_throughput']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s, "
          f"{s['total_tokens_per_s']:.1f} total tok/s")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        print(f"{name:8s} mean {s[f'{name}_mean']:9.2f}  p50 {s[f'{name}_p50']:9.2f}  p90 {s[f'{name}_p90']:9.2f}  "
              f"p99 {s[f'{name}_p99']:9.2f}")
    if "server_us_per_token" in s:
        u = s["server_us_per_token"]
        print("server us/token: " + ", ".join(f"{k} {v:.0f}" for k, v in u.items()))
        print(f"server ms/iteration {s['server_ms_per_iteration']:.2f}, "
              f"instance steps/iteration {s['server_steps_per_iteration']:.2f}, "
              f"idle {s['server_timing'].get('idle_s', 0):.2f}s, compiles during run {s['server_compiles']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.load_gen", description="kunjax gRPC load generator")
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals; 1 = Poisson")
    ap.add_argument("--num_requests", type=int, default=100)
    ap.add_argument("--input_len", type=int, default=32)
    ap.add_argument("--output_len", type=int, default=32)
    ap.add_argument("--len_jitter", type=float, default=0.0, help="uniform +-fraction on synthetic lengths")
    ap.add_argument("--trace", help="trace file (Azure CSV, BurstGPT CSV, Mooncake JSONL) or a shipped trace: "
                    + ", ".join(TRACES))
    ap.add_argument("--trace_offset", type=int, default=0)
    ap.add_argument("--trace_limit", type=int, default=None)
    ap.add_argument("--time_scale", type=float, default=1.0, help="divide trace times by this (speed-up)")
    ap.add_argument("--max_input_len", type=int, default=None, help="clip prompt lengths (small models)")
    ap.add_argument("--max_output_len", type=int, default=None, help="clip output lengths")
    ap.add_argument("--no_fit_context", dest="fit_context", action="store_false",
                    help="send requests longer than the server's context as they are (they fail)")
    ap.add_argument("--max_concurrency", type=int, default=None)
    ap.add_argument("--min_token_id", type=int, default=10)
    ap.add_argument("--max_token_id", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--requests_csv", help="write one row per request here (send, tokens' times, finish)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.trace:
        try:
            arrivals = load_trace(args.trace, args.trace_offset, args.trace_limit)
        except (OSError, ValueError, KeyError) as e:
            ap.error(str(e))
        for a in arrivals:
            a.t /= args.time_scale
    else:
        arrivals = synthetic_arrivals(args.num_requests, args.rate, args.burstiness, args.input_len,
                                      args.output_len, rng, args.len_jitter)
    for a in arrivals:
        a.input_len = max(1, min(a.input_len, args.max_input_len or a.input_len))
        a.output_len = max(1, min(a.output_len, args.max_output_len or a.output_len))
    s = asyncio.run(run_load(args.target, arrivals, max_concurrency=args.max_concurrency,
                             min_token_id=args.min_token_id, max_token_id=args.max_token_id, seed=args.seed,
                             timeout=args.timeout, fit=args.fit_context))
    print_summary(s)
    results = s.pop("results")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    if args.requests_csv:
        write_requests_csv(args.requests_csv, results)
    return 0 if s["completed"] == s["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
