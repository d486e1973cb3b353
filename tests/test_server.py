"""gRPC server end to end over loopback sockets: streaming == LLMEngine.generate (tp=2 instances vs a
tp=1 engine), 64 concurrent streams, cancellation and deadlines freeing pages within one step, invalid
input, queue limits, health, reflection, graceful shutdown, the client CLI, the load generator, and
the launcher as a subprocess (metrics scraped, SIGTERM with streams in flight)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import portpicker
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kunjax.runtime.cluster import ServingCluster as Cluster
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.io.loader import load_model
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from serving.client import AsyncClient, Client, make_request
from serving.options import ServerOptions
from serving.proto import kunjax_pb2 as pb
from serving.server import ServerThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = EngineConfig(page_size=16, num_pages=128, max_model_len=128,
                      scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_rows=4))


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(load_model("tiny", "float32"), CONFIG)


@pytest.fixture(scope="module")
def server(host_model):
    srv = ServerThread(Cluster.build(host_model, CONFIG, num_instances=2, tp=2),
                       ServerOptions(port=portpicker.pick_unused_port(), host="localhost")).start()
    yield srv
    srv.stop()


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


def test_stream_equals_batch_generate(client, tmp_path):
    """The same rows through tools.batch_generate (offline, one tp=1 engine) and through the server."""
    from types import SimpleNamespace

    from tools import batch_generate

    rows = [{"id": "g", "prompt": "hello world", "max_new_tokens": 10},
            {"id": "s", "prompt": "the quick brown fox", "max_new_tokens": 9, "temperature": 0.7, "top_p": 0.95,
             "top_k": 40, "seed": 1234},
            {"id": "t", "prompt_token_ids": [256, 7, 8, 9], "max_new_tokens": 6}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    defaults = SimpleNamespace(dtype="float32", max_new_tokens=16, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    with open(os.devnull, "w") as devnull:
        batch_generate.run("tiny", str(src), str(dst), defaults, engine_config=CONFIG, progress=False, log=devnull)
    want = {r["id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    for row in rows:
        kw = dict(max_tokens=row["max_new_tokens"], seed=row.get("seed", 0))
        kw.update({k: row[k] for k in ("temperature", "top_p", "top_k", "prompt_token_ids") if k in row})
        chunks = list(client.generate(row.get("prompt"), **kw))
        assert [t for c in chunks for t in c.token_ids] == want[row["id"]]["token_ids"], row["id"]
        assert "".join(c.text for c in chunks) == want[row["id"]]["text"], row["id"]
        assert pb.FinishReason.Name(chunks[-1].finish_reason) == "FINISH_REASON_" + want[row["id"]]["finish_reason"].upper()


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


@pytest.fixture
def step_log(server, monkeypatch):
    """Records, for every cluster step the executor runs, the ids of the requests the instances hold
    before it; and, for every cancellation the front hands to the executor, how many steps had
    started by then. Steps are slowed to >= 20 ms, so a request of ~100 tokens is surely still
    running when the client cancels it or its deadline passes."""
    cluster, executor = server.server.cluster, server.executor
    steps, cancels = [], {}
    step, cancel = cluster.step, executor.cancel

    def logged_step():
        steps.append({r.request_id for e in cluster.engines
                      for r in list(e.scheduler.running) + list(e.scheduler.waiting)})
        time.sleep(0.02)
        return step()

    def logged_cancel(rid):
        cancel(rid)
        cancels[rid] = len(steps)

    monkeypatch.setattr(cluster, "step", logged_step)
    monkeypatch.setattr(executor, "cancel", logged_cancel)
    return steps, cancels


def assert_freed_within_one_step(client, step_log, rid):
    steps, cancels = step_log
    st = wait_pages_free(client)
    assert rid in cancels, "the server never cancelled the request"
    n = cancels[rid]
    # The step already started when the cancel arrived may still hold it; none after that does.
    assert [i for i, ids in enumerate(steps) if rid in ids and i > n] == []
    return st


def test_cancel_frees_pages(client, step_log):
    stream = client.generate("cancel me", max_tokens=110, ignore_eos=True, request_id="to-cancel")
    first = next(stream)
    next(stream)
    assert len(first.token_ids) == 1
    st = client.status(skip_memory=True)
    assert st.pages_free < st.pages_total
    stream.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert_freed_within_one_step(client, step_log, "to-cancel")


def test_deadline_frees_pages(client, step_log):
    with pytest.raises(grpc.RpcError) as e:
        for _ in client.generate("slow", max_tokens=115, ignore_eos=True, timeout=0.3, request_id="to-expire"):
            time.sleep(0.01)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_freed_within_one_step(client, step_log, "to-expire")


def test_unary_cancel_frees_pages(server, client, step_log):
    fut = client.generation.Complete.future(make_request("unary", max_tokens=110, ignore_eos=True,
                                                         request_id="unary-cancel"))
    deadline = time.monotonic() + 10
    while client.status(skip_memory=True).running == 0:
        assert time.monotonic() < deadline and not fut.done()
        time.sleep(0.005)
    fut.cancel()
    assert fut.cancelled()
    assert_freed_within_one_step(client, step_log, "unary-cancel")


@pytest.mark.parametrize("kw,field", [
    (dict(prompt=""), "prompt"),
    (dict(max_tokens=5), "prompt"),  # neither prompt form
    (dict(prompt="x", prompt_token_ids=[1]), "prompt"),
    (dict(prompt_token_ids=[1], messages=[{"role": "user", "content": "hi"}]), "prompt"),
    (dict(max_tokens=0, prompt="x"), "max_tokens"),
    (dict(max_tokens=-3, prompt="x"), "max_tokens"),
    (dict(max_tokens=1000, prompt="x"), "max_tokens"),
    (dict(temperature=-0.5, prompt="x"), "temperature"),
    (dict(temperature=float("nan"), prompt="x"), "temperature"),
    (dict(top_p=0.0, prompt="x"), "top_p"),
    (dict(top_p=1.5, prompt="x"), "top_p"),
    (dict(top_p=-0.2, prompt="x"), "top_p"),
    (dict(top_k=-1, prompt="x"), "top_k"),
    (dict(prompt_token_ids=[1, 384]), "prompt_token_ids"),
    (dict(prompt_token_ids=[-1]), "prompt_token_ids"),
    (dict(stop_token_ids=[9999], prompt="x"), "stop_token_ids"),
    (dict(prompt="y" * 200), "prompt"),
    (dict(prompt_token_ids=[5] * 128), "prompt"),  # no room for even one token
    (dict(prompt_token_ids=[5] * 100, max_tokens=29), "max_tokens"),
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


def test_odd_but_valid_inputs(client, reference):
    """Extreme values inside the valid ranges run to completion and leave the server serving."""
    greedy = reference.generate(["x"], SamplingParams(max_tokens=4))[0].token_ids
    assert list(client.complete("x", max_tokens=4, temperature=1e-30).token_ids) == greedy
    for kw in (dict(temperature=1e30), dict(temperature=1.0, top_k=2 ** 31 - 1), dict(temperature=1.0, seed=2 ** 64 - 1),
               dict(stop=["z" * 5000, ""]), dict(top_k=1, temperature=0.5)):
        r = client.complete("x", max_tokens=4, ignore_eos=True, **kw)
        assert r.usage.completion_tokens == 4 and all(0 <= t < 384 for t in r.token_ids), kw
    assert client.complete(prompt_token_ids=[0, 383], max_tokens=127 - 1).usage.prompt_tokens == 2
    wait_pages_free(client)


# How gRPC refuses a call that arrives while the server is stopping: UNAVAILABLE from our handler or
# the channel, or CANCELLED when the call reaches the server core as it shuts its listeners down.
REFUSED_WHILE_STOPPING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def wait_shutting_down(channel, timeout=10.0):
    """Until health says NOT_SERVING, or new calls are refused outright."""
    h = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if h.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
        except grpc.RpcError as e:
            assert e.code() in REFUSED_WHILE_STOPPING
            return
        assert time.monotonic() < deadline, "the server did not start shutting down"
        time.sleep(0.01)


def test_shutdown_aborts_streams_after_grace(host_model):
    """Past the grace period an in-flight stream ends cleanly: a last message with
    FINISH_REASON_ABORT and usage, status OK, and new calls are refused meanwhile."""
    srv = ServerThread(Cluster.build(host_model, CONFIG, num_instances=2, tp=2),
                       ServerOptions(port=portpicker.pick_unused_port(), host="localhost")).start()
    hold = threading.Event()
    try:
        with Client(f"localhost:{srv.port}") as c:
            stream = c.generate("long", max_tokens=110, ignore_eos=True)
            got = [next(stream), next(stream)]
            # Park the executor between two steps, so the stream cannot finish within the grace period.
            parked = srv.executor.call(lambda cluster: hold.wait(30))
            stopper = threading.Thread(target=srv.stop, kwargs=dict(grace=0.3))
            stopper.start()
            wait_shutting_down(c.channel)
            with pytest.raises(grpc.RpcError) as e:
                c.complete("too late", max_tokens=2)
            assert e.value.code() in REFUSED_WHILE_STOPPING
            time.sleep(0.4)  # past the grace period, with the stream unfinished
            hold.set()
            parked.result(10)
            got += list(stream)  # ends without an RpcError
            last = got[-1]
            assert last.finish_reason == pb.FINISH_REASON_ABORT
            n = sum(len(g.token_ids) for g in got)
            assert 2 <= n < 110 and last.usage.completion_tokens == n
            stopper.join(30)
            assert not stopper.is_alive() and not srv.executor.alive
        st = srv.server.cluster.status(with_memory=False)
        assert st["pages_free"] == st["pages_total"] and st["running"] == 0
        assert srv.server.metrics.registry.get_sample_value(
            "kunjax_requests_total", {"finish_reason": "abort"}) == 1.0
    finally:
        hold.set()
        if srv.executor.alive:
            srv.stop()


def test_cli_stream(server, reference):
    want = reference.generate(["hello world"], SamplingParams(max_tokens=10))[0]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "serving.client", "--target", f"localhost:{server.port}",
                        "--prompt", "hello world", "--stream", "--max_tokens", "10"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    tail = json.loads(r.stderr.strip().splitlines()[-1])
    assert tail["finish_reason"] == "length" and tail["usage"]["completion_tokens"] == 10
    r = subprocess.run([sys.executable, "-m", "serving.client", "--target", f"localhost:{server.port}",
                        "--prompt", "x", "--top_p", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and "top_p" in r.stderr


def cli(*args, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "serving.client", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_complete_prints_text_and_a_summary(server, reference):
    """Without --stream: the text on stdout, a JSON summary (finish_reason, usage) on stderr, token
    ids only with --show_token_ids."""
    want = reference.generate(["hello world"], SamplingParams(max_tokens=6))[0]
    r = cli("--target", f"localhost:{server.port}", "--prompt", "hello world", "--max_tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    tail = json.loads(r.stderr.strip().splitlines()[-1])
    assert tail["finish_reason"] == "length" and tail["usage"]["completion_tokens"] == 6 and "token_ids" not in tail
    r = cli("--target", f"localhost:{server.port}", "--prompt", "hello world", "--max_tokens", "6", "--show_token_ids")
    assert r.returncode == 0 and json.loads(r.stderr.strip().splitlines()[-1])["token_ids"] == want.token_ids


@pytest.mark.parametrize("args, message", [
    (["--chat"], "--chat needs --prompt"),
    (["--chat", "--prompt", ""], "--chat needs --prompt"),
    ([], "--prompt is missing"),
    (["--token_ids", "1,x"], "comma-separated integers"),
    (["--system", "Be brief.", "--prompt", "hi"], "--system goes with --chat"),
])
def test_cli_usage_errors(args, message):
    """Caught before any call is made (the target does not even exist): usage on stderr, exit 2."""
    r = cli("--target", "localhost:1", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and r.stdout == ""


def test_cli_exit_code_on_aborted_stream(host_model):
    """A stream the server aborts (shutdown past its grace period) ends with exit status 3, the text
    so far on stdout and finish_reason "abort" in the summary."""
    srv = ServerThread(Cluster.build(host_model, CONFIG, num_instances=1, tp=1),
                       ServerOptions(port=portpicker.pick_unused_port(), host="localhost")).start()
    hold = threading.Event()
    # The same request once first, so every shape it steps through is compiled: after the executor is
    # unparked the abort is delivered at once, well inside gRPC's backstop (grace + ABORT_MARGIN_S),
    # however slowly a compilation would run on a loaded machine.
    with Client(f"localhost:{srv.port}") as c:
        assert len(c.complete("long", max_tokens=110, ignore_eos=True, timeout=120).token_ids) == 110
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "-m", "serving.client", "--target", f"localhost:{srv.port}", "--prompt",
                             "long", "--stream", "--ignore_eos", "--max_tokens", "110"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Client(f"localhost:{srv.port}") as c:
            deadline = time.monotonic() + 60
            while c.status(skip_memory=True).running == 0:  # the CLI's request is decoding
                assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
                time.sleep(0.005)
        # Park the executor between two steps, so the stream cannot finish within the grace period.
        parked = srv.executor.call(lambda cluster: hold.wait(30))
        stopper = threading.Thread(target=srv.stop, kwargs=dict(grace=0.2))
        stopper.start()
        time.sleep(0.4)
        hold.set()
        parked.result(10)
        out, err = proc.communicate(timeout=60)
        stopper.join(30)
        assert proc.returncode == 3, err
        tail = json.loads(err.strip().splitlines()[-1])
        assert tail["finish_reason"] == "abort" and 0 < tail["usage"]["completion_tokens"] < 110
        assert out.endswith("\n")
    finally:
        hold.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if srv.executor.alive:
            srv.stop()


def test_load_gen_rate(server, capsys):
    from tools import load_gen

    rc = load_gen.main(["--target", f"localhost:{server.port}", "--rate", "100", "--num_requests", "12",
                        "--input_len", "10", "--output_len", "5", "--len_jitter", "0.2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "requests 12/12" in out and "throughput:" in out
    for name in ("ttft_ms", "tpot_ms"):
        line = next(l for l in out.splitlines() if l.startswith(name))
        vals = [float(line.split(q)[1].split()[0]) for q in ("p50", "p90", "p99")]
        assert 0 < vals[0] <= vals[1] <= vals[2], line


def test_load_gen_replays_azure_trace(server, capsys, tmp_path):
    """Ten consecutive rows (5101-5110) of the Azure code trace shipped in data/traces, by its short
    name: a real burst replayed end to end."""
    from tools import load_gen

    arrivals = load_gen.load_trace("azure_code", 5100, 10)
    assert len(arrivals) == 10 and arrivals[0].t == 0.0
    assert [(a.input_len, a.output_len) for a in arrivals[:2]] == [(2893, 33), (118, 25)]
    assert all(b.t >= a.t for a, b in zip(arrivals, arrivals[1:])) and arrivals[-1].t > 0
    summary = tmp_path / "s.json"
    # Real time (the 10 rows span ~0.4 s); prompts of thousands of tokens cut to the tiny model's size.
    rc = load_gen.main(["--target", f"localhost:{server.port}", "--trace", "azure_code", "--trace_offset", "5100",
                        "--trace_limit", "10", "--max_input_len", "12", "--max_output_len", "4",
                        "--json", str(summary)])
    out = capsys.readouterr().out
    assert rc == 0, out
    s = json.loads(summary.read_text())
    assert s["completed"] == 10 and s["output_tokens_per_s"] > 0
    assert s["duration_s"] >= arrivals[-1].t
    assert all(s[f"{m}_p{q}"] > 0 for m in ("ttft_ms", "tpot_ms") for q in (50, 90, 99))
    assert "requests 10/10" in out and "p99" in out
    wait_pages_free_target(server)


def wait_pages_free_target(server):
    with Client(f"localhost:{server.port}") as c:
        wait_pages_free(c)


def test_status(client):
    st = client.status()
    assert st.model == "tiny" and len(st.instances) == 2 and st.max_model_len == 128
    assert [i.tp for i in st.instances] == [2, 2]
    assert len(st.memory) == 4 and all(m.live_bytes > 0 for m in st.memory)
    assert st.overload_policy == "recompute" and len(st.groups) == 0


def test_health_and_reflection(server):
    with grpc.insecure_channel(f"localhost:{server.port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "kunjax.v1.Generation"):
            assert h.Check(health_pb2.HealthCheckRequest(service=svc)).status == health_pb2.HealthCheckResponse.SERVING
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"kunjax.v1.Generation", "kunjax.v1.Admin", "grpc.health.v1.Health"} <= names


def scrape(port):
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10).read().decode()
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def test_launcher_subprocess(reference, tmp_path):
    """The launcher as a user starts it: JAX probes every backend (no JAX_PLATFORMS), yet a CPU-only
    host logs no "Unable to initialize backend 'tpu'" noise (libtpu is absent); then serving, metrics
    and the two-step SIGTERM."""
    port, mport = portpicker.pick_unused_port(), portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.launch", "--model=tiny", "--dtype=float32", "--num_instances=2", "--tp=1",
         "--cpu_devices=2", "--num_pages=64", "--max_model_len=1024", "--max_num_seqs=4",
         "--max_num_batched_tokens=64", "--nowarmup", f"--port={port}", f"--metrics_port={mport}",
         "--shutdown_grace_s=60", "--log_level=info", f"--compilation_cache_dir={tmp_path}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "kunjax serving" in line:
                break
        assert proc.poll() is None, "".join(lines)
        out = "".join(lines)
        assert "devices: [CpuDevice" in out, out
        assert "Unable to initialize backend" not in out, out
        want = reference.generate(["launched"], SamplingParams(max_tokens=5))[0]
        with Client(f"localhost:{port}") as c:
            r = c.complete("launched", max_tokens=5)
            assert list(r.token_ids) == want.token_ids
            st = c.status()
            assert len(st.instances) == 2 and st.max_model_len == 1024
            m = scrape(mport)
            assert m[("kunjax_time_to_first_token_seconds_count", ())] == 1.0
            assert m[("kunjax_time_per_output_token_seconds_count", ())] == 1.0
            assert m[("kunjax_time_per_output_token_seconds_sum", ())] > 0
            assert m[("kunjax_requests_total", (("finish_reason", "length"),))] == 1.0
            assert m[("kunjax_queue_length", ())] == 0.0
            assert {("kunjax_kv_utilization", (("instance", str(i)),)) for i in range(2)} <= m.keys()
            live = {k[1][0][1]: v for k, v in m.items() if k[0] == "kunjax_device_live_bytes"}
            assert sorted(live) == sorted(d for i in st.instances for d in i.devices)
            assert all(v > 0 for v in live.values())
            # SIGTERM with two streams in flight: the short one finishes within the grace period, new
            # calls are refused, and a second SIGTERM aborts the long one cleanly (ABORT, status OK).
            short = c.generate("graceful", max_tokens=20, ignore_eos=True)
            long = c.generate("aborted", max_tokens=1000, ignore_eos=True)
            got_short, got_long = [next(short)], [next(long)]
            proc.send_signal(signal.SIGTERM)
            got_short += list(short)
            assert got_short[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert got_short[-1].usage.completion_tokens == 20
            wait_shutting_down(c.channel)
            with pytest.raises(grpc.RpcError) as e:
                c.complete("refused", max_tokens=2, timeout=10)
            assert e.value.code() in REFUSED_WHILE_STOPPING
            proc.send_signal(signal.SIGTERM)
            got_long += list(long)
            n = sum(len(x.token_ids) for x in got_long)
            assert got_long[-1].finish_reason == pb.FINISH_REASON_ABORT
            assert 2 <= n < 1000 and got_long[-1].usage.completion_tokens == n
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "kunjax server stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unset_max_tokens_fits_the_context(client):
    """Without max_tokens a request gets the server's default, shortened to the context left after its
    prompt, instead of an INVALID_ARGUMENT it never asked for."""
    r = client.complete(prompt_token_ids=[7] * 100, ignore_eos=True)
    assert r.finish_reason == pb.FINISH_REASON_LENGTH
    assert r.usage.completion_tokens == 128 - 100
    short = client.complete(prompt_token_ids=[7] * 3, ignore_eos=True)
    assert short.usage.completion_tokens == 128 - 3  # the default (256) itself is capped by the context
