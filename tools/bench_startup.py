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
import sys
import tempfile
import time
from typing import Optional, Sequence


def run_once(launch_args: Sequence[str], cache_dir: str, label: str, timeout_s: float = 900.0) -> dict:
    from serving.client import Client
    from tools import launcher

    with tempfile.TemporaryDirectory(prefix="kunjax-startup-log-") as logs:
        srv = launcher.start([f"--compilation_cache_dir={cache_dir}", *launch_args],
                             os.path.join(logs, "launch.log"), label, timeout_s)
        try:
            with Client(srv.target) as c:
                t1 = time.monotonic()
                c.complete("Hello", max_tokens=8, timeout=300)
                first_ms = (time.monotonic() - t1) * 1e3
                st = c.status(skip_memory=True)
            return {"label": label, "serving_s": srv.serving_s, "first_request_ms": first_ms,
                    "compiles": int(st.compiles), "compiling_in_background": bool(st.compiling),
                    "peak_rss_mib": srv.peak_rss_mib()}
        finally:
            srv.stop()


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
