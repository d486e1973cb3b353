"""The launcher as a user meets it (`python -m serving.launch` in a subprocess): a wrong --model or a
port in use is one line and a non-zero exit before anything slow; SIGTERM at any moment of start-up
(joining the job, warm-up) ends the process within seconds, one process or two on loopback; a
follower signalled while serving keeps replaying until the controller stops (tests/test_multihost.py,
where two processes serve anyway). No TPU-probe noise on a CPU host: tests/test_server.py::test_launcher_subprocess."""

import os
import signal
import socket
import subprocess
import sys
import time

import portpicker
import pytest
from launched import Launched, env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Few shape buckets: the warm-up is short but still several compilations long.
SMALL = ["--model=tiny", "--dtype=float32", "--num_pages=32", "--max_model_len=64", "--max_num_seqs=2",
         "--max_num_batched_tokens=32", "--max_prefill_rows=2"]
EXIT_WITHIN_S = 5.0


def run_launcher(args, timeout=60):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "serving.launch", *args], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("model, message", [
    ("/nonexistent/model.gguf", "no such file or directory"),
    ("{tmp}", "directory without config.json"),
    ("{tmp}/weights.bin", "not a GGUF file"),
])
def test_wrong_model_is_one_line_before_anything_slow(tmp_path, model, message):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    r, elapsed = run_launcher([f"--model={model.format(tmp=tmp_path)}", "--port=0"])
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("serving.launch: error:"), r.stderr
    assert elapsed < 10  # before JAX starts: Python and absl start-up only


def test_port_in_use_fails_before_loading():
    port = portpicker.pick_unused_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r, elapsed = run_launcher([*SMALL, f"--port={port}", "--host=127.0.0.1", "--log_level=info"])
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], r.stderr
    assert "start-up: loading" not in r.stdout + r.stderr and "devices:" not in r.stderr
    assert elapsed < 15


def test_sigterm_during_warmup_single_process(tmp_path):
    p = Launched([*SMALL, f"--port={portpicker.pick_unused_port()}"], tmp_path)  # empty compile cache
    try:
        p.wait_for("start-up: warm-up")
        took = p.sigterm_and_time_exit()
        assert took < EXIT_WITHIN_S, p.output
        assert p.finish() == 128 + signal.SIGTERM
        out = p.output
        assert "SIGTERM during start-up (warm-up" in out and "kunjax serving" not in out, out
    finally:
        p.kill()


def two_processes(tmp_path, extra=()):
    coord, port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
    common = [*SMALL, "--num_instances=2", "--tp=2", "--cpu_devices=4", f"--coordinator_address=localhost:{coord}",
              "--num_processes=2", f"--port={port}", *extra]
    return [Launched([*common, f"--process_id={i}"], tmp_path / f"cache{i}") for i in range(2)], port


def test_sigterm_during_warmup_two_processes(tmp_path):
    """Both processes are compiling (collectives across them) when SIGTERM reaches both: each exits
    within seconds. Before, JAX's preemption notifier swallowed the signal and compiling went on."""
    procs, _ = two_processes(tmp_path)
    try:
        for p in procs:
            p.wait_for("start-up: warm-up")
        t0 = time.monotonic()
        for p in procs:
            p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            p.proc.wait(60)
        assert time.monotonic() - t0 < EXIT_WITHIN_S, [p.output for p in procs]
        for p in procs:
            assert p.finish() == 128 + signal.SIGTERM, p.output
            assert "SIGTERM during start-up (warm-up" in p.output and "SIGTERM caught" not in p.output, p.output
    finally:
        for p in procs:
            p.kill()


@pytest.mark.parametrize("process_id", [0, 1])
def test_sigterm_while_waiting_for_the_other_process(tmp_path, process_id):
    """One process of two started alone blocks in jax.distributed.initialize (a runtime call where
    Python signal handlers cannot run); SIGTERM still ends it within seconds."""
    coord = portpicker.pick_unused_port()
    p = Launched([*SMALL, "--num_instances=2", "--tp=2", "--cpu_devices=4", f"--coordinator_address=localhost:{coord}",
                  "--num_processes=2", f"--process_id={process_id}", f"--port={portpicker.pick_unused_port()}"],
                 tmp_path)
    try:
        p.wait_for("start-up: joining the 2-process job")
        time.sleep(0.5)  # inside the blocking call
        took = p.sigterm_and_time_exit()
        assert took < EXIT_WITHIN_S, p.output
        assert p.finish() == 128 + signal.SIGTERM
        assert "SIGTERM during start-up (joining" in p.output, p.output
    finally:
        p.kill()


def test_model_spec_checks(tmp_path):
    """What check_model_spec accepts and the one-line reasons it gives otherwise (no JAX, no weights)."""
    import json

    from kunjax.io.model_spec import ModelSpecError, check_model_spec

    assert check_model_spec("tiny") == "embedded" and check_model_spec("smollm2-135m") == "embedded"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 32)
    assert check_model_spec(str(gguf)) == "gguf"  # the loader parses the rest
    hf = tmp_path / "hf"
    hf.mkdir()
    cases = [("{", "not valid JSON"), (json.dumps({"model_type": "gpt2"}), "unsupported model_type 'gpt2'"),
             (json.dumps({"model_type": "llama"}), "missing")]
    for text, message in cases:
        (hf / "config.json").write_text(text)
        with pytest.raises(ModelSpecError, match=message) as e:
            check_model_spec(str(hf))
        assert "\n" not in str(e.value)
    orbax = tmp_path / "orbax"
    orbax.mkdir()
    (orbax / "kunjax_config.json").write_text("{}")
    assert check_model_spec(str(orbax)) == "orbax"
    with pytest.raises(ModelSpecError, match="--model is empty"):
        check_model_spec("")
