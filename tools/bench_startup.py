"""Start-up of the gRPC server as an operator sees it: launch to SERVING with an empty and with a warm
persistent compilation cache, the first request after it, and peak resident memory.

    python -m tools.bench_startup                                    # make serve's command
    python -m tools.bench_startup -- --model=tiny --num_instances=4 --tp=2 --cpu_devices=8
    python -m tools.bench_startup -- --num_instances=4 --tp=1 --hbm_bytes=1350000000 --max_model_len=1024

Everything after `--` goes to `serving.launch` unchanged (the default model is smollm2-135m). Each run
starts the launcher as a subprocess on a free port with its own compilation cache directory: first
empty (cold), then the same directory again (warm). Timed: launch until the launcher prints
`kunjax serving`, then one 8-token Complete request. Printed per run: seconds to SERVING, the first
request's milliseconds, executables compiled by then (Status.compiles) and whether the background
compiler was still busy, and the launcher's peak RSS (VmHWM). The launcher is stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence


def _peak_rss_mib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def run_once(launch_args: Sequence[str], cache_dir: str, label: str, timeout_s: float = 900.0) -> dict:
    import portpicker

    from serving.client import Client

    port = portpicker.pick_unused_port()
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "serving.launch", f"--port={port}", f"--compilation_cache_dir={cache_dir}",
           *launch_args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-20:]
            if "kunjax serving" in line:
                break
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{label}: not serving after {timeout_s:.0f} s")
        serving_s = time.monotonic() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"{label}: the launcher exited with {proc.returncode}:\n{''.join(tail)}")
        with Client(f"localhost:{port}") as c:
            t1 = time.monotonic()
            c.complete("Hello", max_tokens=8, timeout=300)
            first_ms = (time.monotonic() - t1) * 1e3
            st = c.status(skip_memory=True)
        out = {"label": label, "serving_s": serving_s, "first_request_ms": first_ms, "compiles": int(st.compiles),
               "compiling_in_background": bool(st.compiling), "peak_rss_mib": _peak_rss_mib(proc.pid)}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launch_args = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not any(a.startswith("--model") for a in launch_args):
        launch_args = ["--model=smollm2-135m", *launch_args]
    print("serving.launch " + " ".join(launch_args), flush=True)
    with tempfile.TemporaryDirectory(prefix="kunjax-startup-cache-") as cache:
        for label in ("empty cache", "warm cache"):
            r = run_once(launch_args, cache, label)
            print(f"{label:12s}  SERVING after {r['serving_s']:6.1f} s   first request {r['first_request_ms']:6.0f} ms   "
                  f"compiled {r['compiles']:4d} (background still compiling: {r['compiling_in_background']})   "
                  f"peak RSS {r['peak_rss_mib']} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
