"""Streaming chat through the OpenAI-compatible HTTP front vs the same through gRPC, side by side on
one server: TTFT and TPOT P50/P99 of each front and their ratio, and the server's host CPU per
generated token through each front.

    python -m tools.bench_http                                     # smollm2-135m, 1/16/64 streams
    python -m tools.bench_http --max_tokens=32 -- --max_model_len=512 --max_num_batched_tokens=128
    python -m tools.bench_http --mode=completion --concurrency=1,16 --max_tokens=16 -- --model=tiny

Everything after `--` goes to `serving.launch` (default model smollm2-135m). The launcher runs as a
subprocess with both fronts (--port, --http_port); at each concurrency c the tool sends c concurrent
streaming chat requests (the same messages, ignore_eos, --max_tokens each), once the background
compiler is done (every step at its own shape bucket), first over gRPC
(Generation.Generate with messages), then over HTTP (/v1/chat/completions, stream: true, read as
server-sent events on a bare asyncio connection, or with httpx: --http_client), --rounds times,
alternating. TTFT: from sending the request to the
first streamed token; TPOT: (last - first token) / (tokens - 1), per request. Host CPU: the
launcher's user + system CPU seconds (/proc/<pid>/stat) over each front's runs, per generated token
(the executor's work is the same for both fronts; the difference is the front's cost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

import numpy as np

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
PROMPT = "Write a short poem about the sea."
CHAT = True  # --mode=completion: the prompt as text (/v1/completions), for models without a chat template
HTTP_CLIENT = "raw"  # --http_client


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _grpc_one(client, max_tokens: int) -> tuple[float, Optional[float], int]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    kw = dict(messages=MESSAGES) if CHAT else dict(prompt=PROMPT)
    async for chunk in client.generate(max_tokens=max_tokens, ignore_eos=True, **kw):
        if chunk.token_ids:
            now = time.perf_counter()
            first = first or now
            last = now
            n += len(chunk.token_ids)
    return first - t0, (last - first) / (n - 1) if n > 1 else None, n


async def _http_one(http, url: str, max_tokens: int) -> tuple[float, Optional[float], int]:
    body = {**({"messages": MESSAGES} if CHAT else {"prompt": PROMPT}), "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            ids = ev["choices"][0].get("token_ids") if ev.get("choices") else None  # vLLM's return_token_ids
            if ids:
                now = time.perf_counter()
                first = first or now
                last = now
                n += len(ids)
    return first - t0, (last - first) / (n - 1) if n > 1 else None, n


async def _raw_one(url: str, max_tokens: int) -> tuple[float, Optional[float], int]:
    """The same request over a bare asyncio connection: the server-sent events as they arrive, with no
    HTTP library between (what the server costs, not what a client library adds)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    body = json.dumps({**({"messages": MESSAGES} if CHAT else {"prompt": PROMPT}), "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": True, "return_token_ids": True}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    first = last = None
    n = 0
    try:
        while line := await reader.readline():
            if line.startswith(b"data: {"):  # one event per chunk, one line per event
                ids = (json.loads(line[6:]).get("choices") or [{}])[0].get("token_ids")
                if ids:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += len(ids)
            elif line.startswith(b"data: [DONE]"):
                break
    finally:
        writer.close()
    return first - t0, (last - first) / (n - 1) if n > 1 else None, n


async def _round(front: str, c: int, max_tokens: int, grpc_target: str, http_url: str):
    import httpx

    from serving.client import AsyncClient

    if front == "grpc":
        async with AsyncClient(grpc_target) as client:
            return await asyncio.gather(*(_grpc_one(client, max_tokens) for _ in range(c)))
    if HTTP_CLIENT == "raw":
        return await asyncio.gather(*(_raw_one(http_url, max_tokens) for _ in range(c)))
    limits = httpx.Limits(max_connections=c + 8, max_keepalive_connections=c + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        return await asyncio.gather(*(_http_one(http, http_url, max_tokens) for _ in range(c)))


def wait_compiled(target: str, timeout_s: float = 1800.0) -> None:
    """Until the launcher's background compiler is done: every step then runs at its own bucket."""
    from serving.client import Client

    deadline = time.monotonic() + timeout_s
    with Client(target) as c:
        while c.status(skip_memory=True).compiling and time.monotonic() < deadline:
            time.sleep(1.0)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def bench(pid: int, grpc_target: str, http_url: str, concurrency: Sequence[int], max_tokens: int,
          rounds: int) -> list[dict]:
    rows = []
    for c in concurrency:
        asyncio.run(_round("grpc", c, 4, grpc_target, http_url))  # warm both paths at this batch size
        asyncio.run(_round("http", c, 4, grpc_target, http_url))
        acc = {f: {"ttft": [], "tpot": [], "tokens": 0, "cpu": 0.0} for f in ("grpc", "http")}
        for _ in range(rounds):
            for front in ("grpc", "http"):
                cpu0 = _cpu_seconds(pid)
                res = asyncio.run(_round(front, c, max_tokens, grpc_target, http_url))
                a = acc[front]
                a["cpu"] += _cpu_seconds(pid) - cpu0
                a["ttft"] += [r[0] for r in res]
                a["tpot"] += [r[1] for r in res if r[1] is not None]
                a["tokens"] += sum(r[2] for r in res)
        row = {"concurrency": c}
        for front, a in acc.items():
            row[front] = {"ttft_p50_ms": 1e3 * pct(a["ttft"], 50), "ttft_p99_ms": 1e3 * pct(a["ttft"], 99),
                          "tpot_p50_ms": 1e3 * pct(a["tpot"], 50), "tpot_p99_ms": 1e3 * pct(a["tpot"], 99),
                          "cpu_ms_per_token": 1e3 * a["cpu"] / max(1, a["tokens"]), "tokens": a["tokens"]}
        g, h = row["grpc"], row["http"]
        row["ratio"] = {k: h[k] / g[k] for k in ("ttft_p50_ms", "tpot_p50_ms", "tpot_p99_ms", "cpu_ms_per_token")}
        row["ttft_p50_added_ms"] = h["ttft_p50_ms"] - g["ttft_p50_ms"]
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict) -> None:
    c = row["concurrency"]
    for front in ("grpc", "http"):
        r = row[front]
        print(f"c={c:3d} {front:4s}  TTFT p50 {r['ttft_p50_ms']:8.1f} ms  p99 {r['ttft_p99_ms']:8.1f} ms   "
              f"TPOT p50 {r['tpot_p50_ms']:7.2f} ms  p99 {r['tpot_p99_ms']:7.2f} ms   "
              f"host CPU {r['cpu_ms_per_token']:6.2f} ms/token ({r['tokens']} tokens)", flush=True)
    q = row["ratio"]
    print(f"c={c:3d} http/grpc  TTFT p50 x{q['ttft_p50_ms']:.3f} ({row['ttft_p50_added_ms']:+.1f} ms)  "
          f"TPOT p50 x{q['tpot_p50_ms']:.3f}  p99 x{q['tpot_p99_ms']:.3f}  CPU/token x{q['cpu_ms_per_token']:.3f}",
          flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import portpicker

    argv = list(sys.argv[1:] if argv is None else argv)
    launch_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m tools.bench_http", description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated concurrent streams")
    ap.add_argument("--max_tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--rounds", type=int, default=2, help="runs per front and concurrency (alternating)")
    ap.add_argument("--mode", choices=("chat", "completion"), default="chat",
                    help="chat: messages (/v1/chat/completions); completion: the prompt as text (/v1/completions)")
    ap.add_argument("--http_client", choices=("raw", "httpx"), default="raw",
                    help="raw: a bare asyncio connection (the server's cost; gRPC's client is C-core); httpx: "
                    "what a Python client library adds on top")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(own)
    global CHAT, HTTP_CLIENT
    CHAT = args.mode == "chat"
    HTTP_CLIENT = args.http_client
    conc = [int(c) for c in args.concurrency.split(",")]
    port, http_port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
    cmd = [sys.executable, "-m", "serving.launch", f"--port={port}", f"--http_port={http_port}", "--host=localhost",
           f"--max_num_seqs={max(conc)}", *launch_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "kunjax OpenAI-compatible HTTP API" in line:
                break
        else:
            raise RuntimeError(f"the launcher exited with {proc.wait()}")
        # keep reading its output, so the launcher never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        print(f"launcher: {' '.join(cmd[1:])}", flush=True)
        wait_compiled(f"localhost:{port}")
        rows = bench(proc.pid, f"localhost:{port}", f"http://localhost:{http_port}/v1/{'chat/completions' if CHAT else 'completions'}", conc,
                     args.max_tokens, args.rounds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
