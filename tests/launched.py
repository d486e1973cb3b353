"""A launcher subprocess as a user runs it (`python -m serving.launch`), its output collected as it
comes: the launcher and multi-process tests wait for its log lines and signal it."""

import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e["JAX_PLATFORMS"] = "cpu"
    return e


class Launched:
    """A launcher subprocess whose merged stdout/stderr is collected by a thread; `wait_for` blocks
    until a line contains a marker."""

    def __init__(self, args, cache_dir):
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.launch", *args,
                                      f"--compilation_cache_dir={cache_dir}"],
                                     cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    @property
    def output(self) -> str:
        with self._cv:
            return "".join(self.lines)

    def wait_for(self, marker: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not any(marker in line for line in self.lines):
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, f"no {marker!r} in:\n{''.join(self.lines)}"
                self._cv.wait(min(left, 0.5))

    def sigterm_and_time_exit(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return time.monotonic() - t0

    def finish(self, timeout: float = 60.0) -> int:
        self.proc.wait(timeout)
        self._reader.join(5)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
