"""The memory mechanism driven through the gRPC Admin service: PlanDrop changes nothing, Drop and
Restore keep running streams token-exact, bad admin requests get their codes, and a request cancelled
at any moment of a drop, an exchange or a restore is freed before the next step."""

import threading
import time

import grpc
import portpicker
import pytest

from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from kunjax.io.loader import load_model
from kunjax.memory import exchange
from kunjax.runtime.cluster import ServingCluster
from kunjax.runtime.engine import EngineConfig, LLMEngine
from serving.options import ServerOptions
from serving.proto import kunjax_pb2 as pb
from serving.server import ServerThread

CONFIG = EngineConfig(page_size=8, num_pages=64, max_model_len=128, hbm_bytes=64 << 20,
                      scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_rows=2))
PROMPTS = ["first stream", "second one here", "a third", "and the fourth"]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def reference():
    eng = LLMEngine(load_model("tiny", "float32"), CONFIG)
    return [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]


@pytest.fixture(scope="module")
def server(host_model):
    cluster = ServingCluster.build(host_model, CONFIG, num_instances=2, tp=1)
    plan = cluster.plan_drop(2)
    cluster.compile_plan(plan, background=False)  # a drop never compiles; compile it before the tests time it
    srv = ServerThread(cluster, ServerOptions(port=portpicker.pick_unused_port(), host="localhost")).start()
    yield srv
    srv.stop()


@pytest.fixture
def steps(server, monkeypatch):
    """Slows every cluster step to >= 20 ms (so streams are surely running during a transition) and
    records the request ids every unit holds before each step."""
    cluster = server.server.cluster
    log = []
    step = cluster.step

    def logged_step():
        log.append({rid for u in cluster.units for rid in u.requests})
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(cluster, "step", logged_step)
    return log


def start_streams(client, tag):
    results = {}

    def run(i, p):
        chunks = list(client.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, request_id=f"{tag}-{i}",
                                      timeout=120))
        results[i] = ([t for c in chunks for t in c.token_ids], chunks[-1].finish_reason)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while client.status(skip_memory=True).running < len(PROMPTS):
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.01)
    return threads, results


def wait_idle(client, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        st = client.status(skip_memory=True)
        if st.running == 0 and st.waiting == 0 and st.pages_free == st.pages_total:
            return st
        assert time.monotonic() < deadline, f"pages not freed: {st.pages_free}/{st.pages_total}"
        time.sleep(0.02)


def test_plan_drop_changes_nothing(client):
    before = client.status()
    plan = client.plan_drop(2)
    assert len(plan.groups) == 1 and list(plan.groups[0].instances) == [0, 1]
    stages = plan.groups[0].stages
    assert [(s.layer_start, s.layer_stop) for s in stages] == [(0, 2), (2, 4)]
    assert stages[0].embed and stages[1].head and not stages[0].head
    g = plan.groups[0]
    assert g.num_pages > 64 and g.pages_gained[0] == g.num_pages - 64
    assert all(g.peak_bytes[i] <= g.budget_bytes[i] for i in (0, 1))
    assert plan.executables_ready == plan.executables_total > 0
    after = client.status()
    assert list(after.groups) == [] and after.pages_total == before.pages_total
    assert [(m.device, m.weights, m.kv) for m in after.memory] == [(m.device, m.weights, m.kv) for m in before.memory]


def test_drop_and_restore_over_grpc_keep_streams_exact(client, reference, steps):
    threads, results = start_streams(client, "exact")
    resp = client.drop(2, timeout=60)
    assert resp.report.kind == "drop" and resp.report.compiles == 0 and resp.report.failed_requests == 0
    assert resp.report.exchange_bytes_between_devices > 0
    assert sum(resp.report.freed_weight_bytes.values()) > 0
    st = client.status()
    assert len(st.groups) == 1 and st.groups[0].state == "grouped"
    assert [(i.group, i.layer_start, i.layer_stop) for i in st.instances] == [(0, 0, 2), (0, 2, 4)]
    held = {m.device: sorted(m.layers) for m in st.memory}
    assert sorted(held.values()) == [[0, 1], [2, 3]]
    time.sleep(0.1)
    rest = client.restore(timeout=60)
    assert len(rest.reports) == 1 and rest.reports[0].compiles == 0
    for t in threads:
        t.join(60)
    assert [results[i][0] for i in range(len(PROMPTS))] == reference
    assert all(results[i][1] == pb.FINISH_REASON_LENGTH for i in results)
    st = wait_idle(client)
    assert list(st.groups) == [] and all(i.group == -1 and (i.layer_start, i.layer_stop) == (0, 4) for i in st.instances)
    assert st.transitions["drops"] >= 1 and st.transitions["restores"] >= 1 and st.transitions["exchanged_bytes"] > 0
    assert list(st.in_progress) == []


@pytest.mark.parametrize("when", ["drop", "restore"])
def test_cancel_during_a_transition_frees_pages_before_the_next_step(server, client, reference, steps, when):
    """A request cancelled while the KV exchange of a drop (or a restore) is under way ends with
    finish_reason abort, and no step after the transition holds it."""
    executor = server.executor
    threads, results = start_streams(client, f"cancel-{when}")
    victim = f"cancel-{when}-1"
    cancelled_at = []

    def cancel_mid_exchange(event, info):
        if event == {"drop": "allocate", "restore": "restore"}[when] and not cancelled_at:
            executor.cancel(victim)
            cancelled_at.append(len(steps))

    if when == "restore":
        client.drop(2, timeout=60)
    exchange.FAULT_HOOK = cancel_mid_exchange
    try:
        if when == "drop":
            client.drop(2, timeout=60)
        else:
            client.restore(timeout=60)
    finally:
        exchange.FAULT_HOOK = None
    assert cancelled_at, "the hook never ran"
    for t in threads:
        t.join(60)
    assert results[1][1] == pb.FINISH_REASON_ABORT
    assert [i for i, held in enumerate(steps) if victim in held and i >= cancelled_at[0]] == []
    assert [results[i][0] for i in (0, 2, 3)] == [reference[i] for i in (0, 2, 3)]
    if client.status(skip_memory=True).groups:
        client.restore(timeout=60)
    wait_idle(client)


def test_bad_admin_requests_get_their_codes(client):
    for size, code in [(1, grpc.StatusCode.INVALID_ARGUMENT), (5, grpc.StatusCode.INVALID_ARGUMENT),
                       (-2, grpc.StatusCode.INVALID_ARGUMENT)]:
        for call in (client.plan_drop, client.drop):
            with pytest.raises(grpc.RpcError) as e:
                call(size, timeout=30)
            assert e.value.code() == code and "group_size" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.restore(timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no pipeline group" in e.value.details()
    client.drop(0, timeout=60)  # 0: the server's choice (2)
    try:
        with pytest.raises(grpc.RpcError) as e:
            client.drop(2, timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "pipeline groups" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            client.restore([7], timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "group" in e.value.details()
        # the server keeps serving while grouped
        assert len(client.complete("still here", max_tokens=5).token_ids) == 5
    finally:
        client.restore(timeout=60)
    assert len(client.complete("and after", max_tokens=5).token_ids) == 5
    wait_idle(client)
