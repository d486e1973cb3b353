"""Two processes on loopback (4 virtual CPU devices each, gloo collectives) serve one cluster whose
instances span both processes; process 0 runs gRPC and sends each step to process 1. Signalled while
serving, the follower keeps replaying the controller's steps until the controller stops it."""

import signal

import portpicker
from launched import Launched

from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.io.loader import load_model
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from serving.client import Client
from serving.proto import kunjax_pb2 as pb


def test_two_process_serving(tmp_path):
    coord, port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
    common = ["--model=tiny", "--dtype=float32", "--num_instances=2",
              "--tp=2", "--cpu_devices=4", "--num_pages=64", "--max_model_len=128", "--max_num_seqs=4",
              "--max_num_batched_tokens=64", "--nowarmup", "--hbm_bytes=67108864", f"--coordinator_address=localhost:{coord}",
              "--num_processes=2", "--shutdown_grace_s=2"]
    procs = [Launched(common + [f"--process_id={i}", f"--port={port}"], tmp_path / f"cache{i}") for i in range(2)]
    ctl, fol = procs
    try:
        ctl.wait_for("kunjax serving", timeout=300)
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
            # SIGTERM to the follower first: it keeps executing its half of every step until the
            # controller has drained and stops it.
            fol.proc.send_signal(signal.SIGTERM)
            fol.wait_for("following the controller's steps until it stops")
            assert fol.proc.poll() is None
            assert [t for ch in c.generate(prompts[1], max_tokens=6, timeout=120) for t in ch.token_ids] == want[1]
        ctl.proc.send_signal(signal.SIGTERM)
        assert ctl.finish() == 0 and "kunjax server stopped" in ctl.output, ctl.output
        assert fol.finish() == 0 and "kunjax follower stopped" in fol.output, fol.output
    finally:
        for p in procs:
            p.kill()
