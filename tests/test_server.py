"""gRPC server end to end over loopback sockets: streaming == LLMEngine.generate, concurrency,
cancellation, invalid input, queue limits, health, reflection, and the launcher as a subprocess."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import portpicker
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kunjax.cluster import Cluster
from kunjax.engine import EngineConfig, LLMEngine
from kunjax.loader import load_model
from kunjax.request import SamplingParams
from kunjax.scheduler import SchedulerConfig
from serving.client import AsyncClient, Client
from serving.options import ServerOptions
from serving.proto import kunjax_pb2 as pb
from serving.server import ServerThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = EngineConfig(page_size=16, num_pages=128, max_model_len=128,
                      scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_rows=4))


@pytest.fixture(scope="module")
def host_model():
    return load_model("tiny", "float32", place=lambda a: np.asarray(a, np.float32))


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(load_model("tiny", "float32"), CONFIG)


@pytest.fixture(scope="module")
def server(host_model):
    srv = ServerThread(Cluster.build(host_model, CONFIG, num_instances=2, tp=2),
                       ServerOptions(port=portpicker.pick_unused_port(), host="localhost")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(f"localhost:{server.port}") as c:
        yield c


def wait_pages_free(client, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        st = client.status(skip_memory=True)
        if st.pages_free == st.pages_total and st.running == 0 and st.waiting == 0:
            return st
        assert time.monotonic() < deadline, f"pages not freed: {st.pages_free}/{st.pages_total}"
        time.sleep(0.02)


def test_generated_modules_up_to_date():
    from serving.proto import gen

    assert gen.check() == []


@pytest.mark.parametrize("kw", [dict(max_tokens=10), dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=11)],
                         ids=["greedy", "sampled"])
def test_stream_equals_engine_generate(client, reference, kw):
    prompt = "hello world"
    want = reference.generate([prompt], SamplingParams(**kw))[0]
    chunks = list(client.generate(prompt, **kw))
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert "".join(c.text for c in chunks) == want.text
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 10 and last.usage.prompt_tokens == want.prompt_tokens
    assert last.usage.ttft_ms > 0 and last.usage.e2e_ms >= last.usage.ttft_ms
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_complete_with_token_ids(client, reference):
    want = reference.generate([[256, 10, 20, 30]], SamplingParams(max_tokens=6))[0]
    r = client.complete(prompt_token_ids=[256, 10, 20, 30], max_tokens=6)
    assert list(r.token_ids) == want.token_ids and r.usage.prompt_tokens == 4


def test_64_concurrent_streams(server, reference):
    prompts = [f"s{i:02d}" for i in range(64)]
    params = SamplingParams(max_tokens=8)
    want = [o.token_ids for o in reference.generate(prompts, params)]

    async def run():
        async with AsyncClient(f"localhost:{server.port}") as c:
            async def one(p):
                toks, last = [], None
                async for chunk in c.generate(p, max_tokens=8):
                    toks.extend(chunk.token_ids)
                    last = chunk
                return toks, last
            return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(run())
    assert [g[0] for g in got] == want
    assert all(g[1].finish_reason == pb.FINISH_REASON_LENGTH for g in got)
    assert {g[1].usage.instance for g in got} == {0, 1}


def test_cancel_frees_pages(client):
    stream = client.generate("cancel me", max_tokens=110, ignore_eos=True)
    first = next(stream)
    next(stream)
    assert len(first.token_ids) == 1
    st = client.status(skip_memory=True)
    assert st.pages_free < st.pages_total
    stream.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    wait_pages_free(client)


def test_deadline_frees_pages(client):
    with pytest.raises(grpc.RpcError) as e:
        for _ in client.generate("slow", max_tokens=115, ignore_eos=True, timeout=0.3):
            time.sleep(0.01)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_pages_free(client)


@pytest.mark.parametrize("kw,field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="x", prompt_token_ids=[1]), "prompt"),
    (dict(max_tokens=0, prompt="x"), "max_tokens"),
    (dict(max_tokens=-3, prompt="x"), "max_tokens"),
    (dict(max_tokens=1000, prompt="x"), "max_tokens"),
    (dict(temperature=-0.5, prompt="x"), "temperature"),
    (dict(temperature=float("nan"), prompt="x"), "temperature"),
    (dict(top_p=0.0, prompt="x"), "top_p"),
    (dict(top_p=1.5, prompt="x"), "top_p"),
    (dict(top_k=-1, prompt="x"), "top_k"),
    (dict(prompt_token_ids=[1, 384]), "prompt_token_ids"),
    (dict(prompt_token_ids=[-1]), "prompt_token_ids"),
    (dict(stop_token_ids=[9999], prompt="x"), "stop_token_ids"),
    (dict(prompt="y" * 200), "prompt"),
    (dict(messages=[{"role": "user", "content": "hi"}]), "chat template"),
    (dict(prompt="x", request_id=""), "request_id"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_arguments(client, kw, field):
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate(**kw))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.complete(**kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.complete("still serving", max_tokens=2).usage.completion_tokens == 2


def test_chat_messages(server, client, reference):
    model = server.server.cluster.engines[0].model
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    model.chat_template = template
    try:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        ids = reference.tokenizer.encode("system: be brief\nuser: hi\nassistant:", add_special_tokens=False)
        want = reference.generate([ids], SamplingParams(max_tokens=5))[0]
        r = client.complete(messages=msgs, max_tokens=5)
        assert list(r.token_ids) == want.token_ids and r.usage.prompt_tokens == len(ids)
        with pytest.raises(grpc.RpcError) as e:
            client.complete(messages=[{"role": "robot", "content": "x"}])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in e.value.details()
    finally:
        model.chat_template = None


def test_duplicate_request_id(client):
    stream = client.generate("one", max_tokens=100, ignore_eos=True, request_id="same")
    next(stream)
    with pytest.raises(grpc.RpcError) as e:
        client.complete("two", max_tokens=2, request_id="same")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stream.cancel()
    wait_pages_free(client)


def test_queue_full(host_model):
    srv = ServerThread(Cluster.build(host_model, CONFIG, num_instances=2, tp=2),
                       ServerOptions(port=portpicker.pick_unused_port(), host="localhost", max_queue=2)).start()
    try:
        results = []

        def one(i):
            try:
                with Client(f"localhost:{srv.port}") as c:
                    results.append(c.complete(f"q{i}", max_tokens=20).finish_reason)
            except grpc.RpcError as e:
                results.append(e.code())

        threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in results
        assert results.count(pb.FINISH_REASON_LENGTH) >= 2
        assert set(results) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, pb.FINISH_REASON_LENGTH}
        with Client(f"localhost:{srv.port}") as c:
            assert c.complete("after", max_tokens=3).usage.completion_tokens == 3
            wait_pages_free(c)
    finally:
        srv.stop()


def test_status(client):
    st = client.status()
    assert st.model == "tiny" and len(st.instances) == 2 and st.max_model_len == 128
    assert [i.tp for i in st.instances] == [2, 2]
    assert len(st.memory) == 4 and all(m.live_bytes > 0 for m in st.memory)
    assert st.overload_policy == "none" and len(st.groups) == 0


def test_health_and_reflection(server):
    with grpc.insecure_channel(f"localhost:{server.port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "kunjax.v1.Generation"):
            assert h.Check(health_pb2.HealthCheckRequest(service=svc)).status == health_pb2.HealthCheckResponse.SERVING
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"kunjax.v1.Generation", "kunjax.v1.Admin", "grpc.health.v1.Health"} <= names


def test_launcher_subprocess(reference):
    port, mport = portpicker.pick_unused_port(), portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.launch", "--model=tiny", "--dtype=float32", "--num_instances=2", "--tp=1",
         "--cpu_devices=2", "--num_pages=64", "--max_model_len=128", "--max_num_seqs=4",
         "--max_num_batched_tokens=64", "--nowarmup", f"--port={port}", f"--metrics_port={mport}",
         "--shutdown_grace_s=20"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "kunjax serving" in line:
                break
        assert proc.poll() is None, "".join(lines)
        want = reference.generate(["launched"], SamplingParams(max_tokens=5))[0]
        with Client(f"localhost:{port}") as c:
            r = c.complete("launched", max_tokens=5)
            assert list(r.token_ids) == want.token_ids
            assert len(c.status().instances) == 2
            metrics = urllib.request.urlopen(f"http://localhost:{mport}/metrics", timeout=10).read().decode()
            assert "kunjax_time_to_first_token_seconds_count 1.0" in metrics
            assert 'kunjax_requests_total{finish_reason="length"} 1.0' in metrics
            # SIGTERM with a stream in flight: the stream still finishes within the grace period.
            stream = c.generate("graceful", max_tokens=60, ignore_eos=True)
            next(stream)
            proc.send_signal(signal.SIGTERM)
            rest = list(stream)
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 60
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "kunjax server stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
