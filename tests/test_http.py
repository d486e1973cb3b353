"""The OpenAI-compatible HTTP front beside gRPC, API keys and TLS, end to end on the tiny model: the
official `openai` package (and raw httpx for the wire details) against one live server that serves
both fronts with API keys set; a second one over (mutual) TLS with a certificate made here."""

import json
import os
import subprocess
import sys
import time

import grpc
import httpx
import openai
import portpicker
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from kunjax.io.loader import load_model
from kunjax.runtime.cluster import ServingCluster as Cluster
from kunjax.runtime.engine import EngineConfig, LLMEngine
from serving.client import Client
from serving.options import ServerOptions
from serving.proto import kunjax_pb2 as pb
from serving.server import ServerThread

CONFIG = EngineConfig(page_size=16, num_pages=128, max_model_len=128,
                      scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_rows=4))
KEY, ADMIN_KEY = "gen-key-1", "admin-key-1"
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(load_model("tiny", "float32"), CONFIG)


@pytest.fixture(scope="module")
def server(host_model):
    cluster = Cluster.build(host_model, CONFIG, num_instances=1, tp=1)
    model = cluster.engines[0].model  # the session's shared tiny model: its template is put back after
    before, model.chat_template = model.chat_template, TEMPLATE
    srv = ServerThread(cluster, ServerOptions(port=portpicker.pick_unused_port(), host="localhost", http_port=0,
                                              api_keys=(KEY, "gen-key-2"), admin_api_keys=(ADMIN_KEY,))).start()
    yield srv
    srv.stop()
    model.chat_template = before


@pytest.fixture(scope="module")
def base(server):
    return f"http://localhost:{server.http_port}"


@pytest.fixture(scope="module")
def oai(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def admin(server):
    with Client(f"localhost:{server.port}", api_key=ADMIN_KEY) as c:
        yield c


def greedy(reference, prompt, n, **kw):
    return reference.generate([prompt], SamplingParams(max_tokens=n, **kw))[0]


def wait_pages_free(admin, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        st = admin.status(skip_memory=True)
        if st.pages_free == st.pages_total and st.running == 0 and st.waiting == 0:
            return
        assert time.monotonic() < deadline, f"pages not freed: {st.pages_free}/{st.pages_total}"
        time.sleep(0.02)


def sse_events(response) -> list:
    """The `data:` payloads of a server-sent-event response; the last one must be [DONE]."""
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---- the API ------------------------------------------------------------------------------------
def test_models(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].owned_by == "kunjax"


def test_completion_equals_engine_and_grpc(oai, server, reference):
    want = greedy(reference, "hello world", 10)
    r = oai.completions.create(model="tiny", prompt="hello world", max_tokens=10, extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert c.text == want.text and c.finish_reason == "length" and c.model_extra["token_ids"] == want.token_ids
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        want.prompt_tokens, 10, want.prompt_tokens + 10)
    with Client(f"localhost:{server.port}", api_key=KEY) as g:
        assert list(g.complete("hello world", max_tokens=10).token_ids) == c.model_extra["token_ids"]
    # token ids as the prompt
    r = oai.completions.create(model="tiny", prompt=[256, 10, 20, 30], max_tokens=6)
    assert r.choices[0].text == greedy(reference, [256, 10, 20, 30], 6).text and r.usage.prompt_tokens == 4


def test_completion_stream(oai, reference):
    want = greedy(reference, "stream me", 8)
    chunks = list(oai.completions.create(model="tiny", prompt="stream me", max_tokens=8, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat(oai, reference):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = reference.tokenizer.encode("system: be brief\nuser: hi\nassistant:", add_special_tokens=False)
    want = greedy(reference, ids, 6)
    r = oai.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=6)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == len(ids)
    chunks = list(oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_stop_string(oai, reference):
    full = greedy(reference, "the stop test", 12).text
    stop = full[3:5]
    cut = full.find(stop)
    r = oai.completions.create(model="tiny", prompt="the stop test", max_tokens=12, stop=[stop])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"


def test_logprobs(oai, server, reference):
    want = greedy(reference, "log me", 5)
    r = oai.completions.create(model="tiny", prompt="log me", max_tokens=5, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == want.text and len(lp.tokens) == 5
    assert len(lp.token_logprobs) == 5 and all(len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and all(v <= 0 for v in lp.token_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(v == pytest.approx(max(t.values())) for v, t in zip(lp.token_logprobs, lp.top_logprobs))
    chunks = list(oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                              logprobs=True, top_logprobs=2, stream=True))
    content = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.bytes is not None for c in content)
    with Client(f"localhost:{server.port}", api_key=KEY) as g:
        resp = g.complete("log me", max_tokens=5, logprobs=3)
    assert list(resp.token_ids) == want.token_ids
    assert [x.logprob for x in resp.logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [len(x.top) for x in resp.logprobs] == [3] * 5


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.4), dict(frequency_penalty=1.2, presence_penalty=0.5),
                                dict(temperature=0.9, seed=5, min_p=0.2, top_p=0.9)], ids=["repetition", "freq", "min_p"])
def test_penalties_http_equal_grpc(oai, server, kw):
    extra = {k: kw[k] for k in ("repetition_penalty", "min_p") if k in kw}
    std = {k: v for k, v in kw.items() if k not in extra}
    r = oai.completions.create(model="tiny", prompt="again and again", max_tokens=12, extra_body={
        "return_token_ids": True, "ignore_eos": True, **extra}, **std)
    with Client(f"localhost:{server.port}", api_key=KEY) as g:
        want = g.complete("again and again", max_tokens=12, ignore_eos=True, **kw)
        plain = g.complete("again and again", max_tokens=12, ignore_eos=True,
                           **{k: v for k, v in kw.items() if k in ("temperature", "seed", "top_p")})
    assert r.choices[0].model_extra["token_ids"] == list(want.token_ids)
    if "min_p" not in kw:
        assert list(want.token_ids) != list(plain.token_ids)  # the penalty changed the output


def test_sse_wire_format(base, reference):
    with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                            "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert {e["object"] for e in events} == {"chat.completion.chunk"} and len({e["id"] for e in events}) == 1


# ---- errors: the OpenAI body, the right status ----------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 999]}, "prompt_token_ids"),
    ({}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_completion_fields(base, body, param):
    r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]


def test_bad_chat_fields(oai):
    for kw, param in ((dict(n=3), "n"), (dict(logprobs=True, top_logprobs=9), "top_logprobs"),
                      (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **kw)
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    assert "role" in e.value.body["message"]


def test_error_statuses(base, oai, server):
    post = lambda body, **kw: httpx.post(base + "/v1/completions", json=body, **kw)  # noqa: E731
    r = httpx.post(base + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model" and e.value.status_code == 404
    r = httpx.get(base + "/v2/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    executor = server.executor
    max_queue = executor.max_queue
    executor.max_queue = 0  # a full queue
    try:
        with pytest.raises(openai.RateLimitError) as e:
            oai.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert "queue full" in e.value.body["message"]
    finally:
        executor.max_queue = max_queue
    assert post({"model": "tiny", "prompt": "x", "max_tokens": 2}, headers={"Authorization": f"Bearer {KEY}"}
                ).status_code == 200


def test_disconnect_frees_pages(base, server, admin, monkeypatch):
    cluster, executor = server.server.cluster, server.executor
    step, cancel = cluster.step, executor.cancel
    cancelled = []
    monkeypatch.setattr(cluster, "step", lambda: (time.sleep(0.02), step())[1])  # 100 tokens take >= 2 s
    monkeypatch.setattr(executor, "cancel", lambda rid: (cancelled.append(rid), cancel(rid)))
    with httpx.stream("POST", base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "go on", "max_tokens": 100, "ignore_eos": True,
                            "stream": True}) as r:
        lines = r.iter_lines()
        got = [line for _, line in zip(range(6), lines) if line.startswith("data: ")]
        assert got
        st = admin.status(skip_memory=True)
        assert st.running == 1 and st.pages_free < st.pages_total
    t = time.monotonic()
    wait_pages_free(admin)
    assert time.monotonic() - t < 1.5 and len(cancelled) == 1


# ---- API keys on both fronts ---------------------------------------------------------------------
def test_http_keys(base):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(base + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", headers
        assert httpx.get(base + "/v1/models", headers=headers).status_code == 401
    for key in ("gen-key-2", ADMIN_KEY):  # every Generation key, and the admin key, open Generation
        assert httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                          ).status_code == 200
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert "kunjax_generated_tokens" in httpx.get(base + "/metrics").text


def test_grpc_keys(server):
    target = f"localhost:{server.port}"
    for key in (None, "wrong"):
        with Client(target, api_key=key) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.complete("x", max_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate("x", max_tokens=2))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                c.status()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(target, api_key=KEY) as c:
        assert c.complete("x", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(grpc.RpcError) as e:
            c.drop(2)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            c.status()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        h = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest())
        assert h.status == health_pb2.HealthCheckResponse.SERVING  # health stays open
    with Client(target, api_key=ADMIN_KEY) as c:
        assert c.status(skip_memory=True).model == "tiny"


def test_cli_api_key_and_quiet_broken_pipe(server):
    cmd = [sys.executable, "-m", "serving.client", f"--target=localhost:{server.port}", "--prompt=hello",
           "--max_tokens=60", "--ignore_eos", "--stream"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
    r = subprocess.run(" ".join(cmd + [f"--api_key={KEY}"]) + " | head -c 1", shell=True, capture_output=True,
                       text=True, timeout=60)
    assert len(r.stdout) == 1 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert KEY not in r.stderr and KEY not in repr(server.server.options)


# ---- TLS -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    import trustme

    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client_cert = ca.issue_cert("client@example.org")
    paths = {n: str(d / f"{n}.pem") for n in ("ca", "cert", "key", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    client_cert.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client_cert.private_key_pem.write_to_path(paths["client_key"])
    return paths


def test_tls_both_fronts(host_model, tls_files, reference):
    f = tls_files
    srv = ServerThread(Cluster.build(host_model, CONFIG, num_instances=1, tp=1),
                       ServerOptions(port=portpicker.pick_unused_port(), host="localhost", http_port=0,
                                     tls_cert_file=f["cert"], tls_key_file=f["key"],
                                     tls_client_ca_file=f["ca"])).start()
    try:
        want = greedy(reference, "secure", 5).text
        mtls = dict(tls_ca_file=f["ca"], tls_cert_file=f["client_cert"], tls_key_file=f["client_key"])
        with Client(f"localhost:{srv.port}", **mtls) as c:
            assert c.complete("secure", max_tokens=5).text == want
        with Client(f"localhost:{srv.port}", tls_ca_file=f["ca"]) as c:  # no client certificate
            with pytest.raises(grpc.RpcError) as e:
                c.complete("secure", max_tokens=5, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with Client(f"localhost:{srv.port}") as c:  # plaintext
            with pytest.raises(grpc.RpcError) as e:
                c.complete("secure", max_tokens=5, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        import ssl

        ctx = ssl.create_default_context(cafile=f["ca"])
        ctx.load_cert_chain(f["client_cert"], f["client_key"])
        https = openai.OpenAI(base_url=f"https://localhost:{srv.http_port}/v1", api_key="none", max_retries=0,
                              http_client=httpx.Client(verify=ctx))
        assert https.completions.create(model="tiny", prompt="secure", max_tokens=5).choices[0].text == want
        with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port
            httpx.post(f"http://localhost:{srv.http_port}/v1/completions", json={"prompt": "x"}, timeout=10)
        with pytest.raises((httpx.HTTPError, OSError)):  # TLS without a client certificate
            httpx.post(f"https://localhost:{srv.http_port}/v1/completions", json={"prompt": "x"},
                       verify=ssl.create_default_context(cafile=f["ca"]), timeout=10)
        # draining: 503 with the API's body, health 503
        srv.executor.close()
        r = httpx.post(f"https://localhost:{srv.http_port}/v1/completions", json={"prompt": "x"}, verify=ctx)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
        assert httpx.get(f"https://localhost:{srv.http_port}/health", verify=ctx).status_code == 503
    finally:
        srv.stop()


def test_grpc_usage_on_http_server(server):
    """The gRPC front of the same process still answers with its own usage fields."""
    with Client(f"localhost:{server.port}", api_key=KEY) as c:
        r = c.complete("x", max_tokens=3)
    assert r.finish_reason == pb.FINISH_REASON_LENGTH and r.usage.e2e_ms > 0


# ---- the launcher's flags (subprocess, before anything slow) -----------------------------------------
@pytest.mark.parametrize("args,status,message", [
    (["--tls_cert_file=/nonexistent/cert.pem", "--tls_key_file=/nonexistent/key.pem"], 2, "--tls_cert_file"),
    (["--tls_cert_file=cert.pem"], 2, "go together"),
    (["--api_key_file=/nonexistent/keys"], 2, "--api_key_file"),
    (["--http_port={busy}", "--host=127.0.0.1"], 1, "in use"),
], ids=["tls-missing", "tls-half", "key-file", "http-port-in-use"])
def test_launcher_front_flags(args, status, message):
    import socket

    port = portpicker.pick_unused_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r = subprocess.run([sys.executable, "-m", "serving.launch", "--model=tiny",
                            f"--port={portpicker.pick_unused_port()}", *[a.format(busy=port) for a in args]],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status and len(lines) == 1 and message in lines[0], r.stderr
    assert "start-up: loading" not in r.stderr
