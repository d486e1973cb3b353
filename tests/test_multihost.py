"""Two processes on loopback (4 virtual CPU devices each, gloo collectives) serve one cluster whose
instances span both processes; process 0 runs gRPC and sends each step to process 1."""

import os
import signal
import subprocess
import sys

import portpicker

from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.io.loader import load_model
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from serving.client import Client
from serving.proto import kunjax_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_serving():
    coord, port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    common = [sys.executable, "-m", "serving.launch", "--model=tiny", "--dtype=float32", "--num_instances=2",
              "--tp=2", "--cpu_devices=4", "--num_pages=64", "--max_model_len=128", "--max_num_seqs=4",
              "--max_num_batched_tokens=64", "--nowarmup", "--hbm_bytes=67108864", f"--coordinator_address=localhost:{coord}",
              "--num_processes=2"]
    procs = [subprocess.Popen(common + [f"--process_id={i}", f"--port={port}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        lines = []
        for line in procs[0].stdout:
            lines.append(line)
            if "kunjax serving" in line:
                break
        assert procs[0].poll() is None, "".join(lines)
        prompts = ["across hosts", "second one"]
        ref = LLMEngine(load_model("tiny", "float32"), EngineConfig(
            page_size=16, num_pages=64, max_model_len=128,
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64)))
        want = [o.token_ids for o in ref.generate(prompts, SamplingParams(max_tokens=6))]
        with Client(f"localhost:{port}") as c:
            for p, w in zip(prompts, want):
                chunks = list(c.generate(p, max_tokens=6, timeout=120))
                assert [t for ch in chunks for t in ch.token_ids] == w
                assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
            # A drop and a restore are logged device operations: process 1 replays them in order, and a
            # stream running across both gives the tokens of one process with no drop.
            long_want = ref.generate([prompts[0]], SamplingParams(max_tokens=40, ignore_eos=True))[0].token_ids
            stream = c.generate(prompts[0], max_tokens=40, ignore_eos=True, timeout=120)
            got = list(next(stream).token_ids)
            drop = c.drop(2, timeout=120)
            assert drop.report.compiles == 0 and len(drop.groups) == 1
            mid = [t for ch in c.generate(prompts[1], max_tokens=6, timeout=120) for t in ch.token_ids]
            assert mid == want[1]
            rest = c.restore(timeout=120)
            assert rest.reports[0].compiles == 0
            got += [t for ch in stream for t in ch.token_ids]
            assert got == long_want
            st = c.status()
            # every instance has one device in each process (ids >= 2048 belong to process 1 on CPU)
            assert all(len(i.devices) == 2 for i in st.instances)
            assert sum(i.steps for i in st.instances) > 0 and st.pages_free == st.pages_total
        procs[0].send_signal(signal.SIGTERM)
        out0, _ = procs[0].communicate(timeout=60)
        out1, _ = procs[1].communicate(timeout=60)
        assert procs[0].returncode == 0, out0
        assert procs[1].returncode == 0 and "kunjax follower stopped" in out1, out1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
