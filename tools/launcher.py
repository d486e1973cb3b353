"""The gRPC launcher as a subprocess, for the benchmark tools: start on a free port, wait for
SERVING, stop with SIGTERM.

The launcher's output (stdout and stderr) goes to a log file, not a pipe: a server logging one line
per overload decision would otherwise fill the pipe and block once nobody reads it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

READY_LINE = "kunjax serving"


@dataclasses.dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: str
    serving_s: float  # launch until the launcher said it serves

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def peak_rss_mib(self) -> Optional[int]:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM"):
                        return int(line.split()[1]) // 1024
        except OSError:
            pass
        return None

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, then the exit status (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(launch_args: Sequence[str], log_path: str, label: str = "server", timeout_s: float = 900.0,
          env: Optional[dict] = None) -> ServerProcess:
    """Starts `python -m serving.launch --port=<free> <launch_args>` and returns once it serves;
    raises RuntimeError (with the log's tail) when it exits first or does not serve in time."""
    import portpicker

    port = portpicker.pick_unused_port()
    cmd = [sys.executable, "-m", "serving.launch", f"--port={port}", *launch_args]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ) if env is None else env)
    srv = ServerProcess(proc, port, log_path, 0.0)
    while True:
        try:
            with open(log_path, errors="replace") as f:
                if READY_LINE in f.read():
                    break
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{label}: the launcher exited with {proc.returncode}:\n{srv.tail()}")
        if time.monotonic() - t0 > timeout_s:
            srv.stop()
            raise RuntimeError(f"{label}: not serving after {timeout_s:.0f} s:\n{srv.tail()}")
        time.sleep(0.1)
    srv.serving_s = time.monotonic() - t0
    return srv
