"""Cluster runtime: N instances stepped together, dispatch policy, status, abort."""

import numpy as np
import pytest

from kunjax.control.cluster import MostFreePages, RoundRobin
from kunjax.runtime.cluster import ServingCluster as Cluster
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.io.loader import load_model
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig

CONFIG = EngineConfig(page_size=16, num_pages=128, max_model_len=128,
                      scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_rows=4))
PROMPTS = [f"prompt {i}" for i in range(6)]  # short: one 16-token prefill chunk


@pytest.fixture(scope="module")
def cluster(host_model):
    return Cluster.build(host_model, CONFIG, num_instances=2, tp=2)


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(load_model("tiny", "float32"), CONFIG)


def test_cluster_matches_single_engine(cluster, reference):
    params = SamplingParams(max_tokens=8)
    want = [o.token_ids for o in reference.generate(PROMPTS, params)]
    outs = cluster.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == want
    st = cluster.status()
    assert all(s["steps"] > 0 for s in st["instances"]), "both instances should have served requests"
    assert st["pages_free"] == st["pages_total"]


def test_most_free_pages_policy(cluster):
    ids = [cluster.add_request("x" * 40, SamplingParams(max_tokens=4)) for _ in range(4)]
    where = [cluster.instance_of(i) for i in ids]
    assert sorted(where) == [0, 0, 1, 1]
    while cluster.has_unfinished():
        cluster.step()
    st = cluster.status()
    assert st["pages_free"] == st["pages_total"]


def test_round_robin_policy(cluster):
    views = cluster.views() + cluster.views()[:1]
    views = [v.__class__(**{**v.__dict__, "index": i}) for i, v in enumerate(views)]
    rr = RoundRobin()
    assert [rr.choose(views, 1) for _ in range(4)] == [0, 1, 2, 0]


def test_abort_frees_pages(cluster):
    rid = cluster.add_request("hello", SamplingParams(max_tokens=100))
    for _ in range(3):
        cluster.step()
    inst = cluster.status()["instances"][cluster.instance_of(rid)]
    assert inst["pages_free"] < inst["pages_total"]
    out = cluster.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    st = cluster.status()
    assert st["pages_free"] == st["pages_total"] and not cluster.has_unfinished()


def test_status_and_timing(cluster):
    st = cluster.status()
    assert len(st["instances"]) == 2 and st["groups"] == []
    assert [len(s["devices"]) for s in st["instances"]] == [2, 2]
    assert len(st["memory"]) == 4 and all(m["live"] > 0 and m["weights"] > 0 and m["kv"] > 0 for m in st["memory"])
    t = st["timing"]
    assert t["steps"] >= t["iterations"] > 0 and t["wait_device_s"] > 0


def test_duplicate_request_id_rejected(cluster):
    cluster.add_request("a", SamplingParams(max_tokens=2), request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        cluster.add_request("b", SamplingParams(max_tokens=2), request_id="dup")
    while cluster.has_unfinished():
        cluster.step()


def test_policy_prefers_free_instance(cluster):
    eng0 = cluster.engines[0]
    rid = cluster.add_request("z" * 60, SamplingParams(max_tokens=60), request_id="big")
    assert cluster.instance_of(rid) == 0
    cluster.step()
    assert MostFreePages().choose(cluster.views(), 5) == 1
    assert eng0.allocator.num_free < cluster.engines[1].allocator.num_free
    cluster.abort(rid)


def test_step_dispatches_every_instance_before_collecting(cluster, monkeypatch):
    """One controller: all instances' steps are enqueued (async dispatch) before it waits on any."""
    calls = []
    for i, eng in enumerate(cluster.engines):
        execute, finish = eng.execute, eng.finish

        def logged_execute(op, _f=execute, _i=i):
            calls.append(("dispatch", _i))
            return _f(op)

        def logged_finish(step, fl, _f=finish, _i=i):
            calls.append(("collect", _i))
            return _f(step, fl)

        monkeypatch.setattr(eng, "execute", logged_execute)
        monkeypatch.setattr(eng, "finish", logged_finish)
    ids = [cluster.add_request(p, SamplingParams(max_tokens=3, ignore_eos=True)) for p in ("left", "right")]
    assert sorted(cluster.instance_of(r) for r in ids) == [0, 1]
    while cluster.has_unfinished():
        calls.clear()
        cluster.step()
        assert calls == [("dispatch", 0), ("dispatch", 1), ("collect", 0), ("collect", 1)]
    st = cluster.status(with_memory=False)
    assert st["pages_free"] == st["pages_total"] and st["pages_used"] == 0


def test_parallel_warmup_then_no_compiles(host_model):
    """Instances warm up concurrently (threads); afterwards a varied stream compiles nothing and
    the output equals a single engine's."""
    from kunjax.runtime import compile_stats

    small = EngineConfig(page_size=16, num_pages=64, max_model_len=64,
                         scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32, max_prefill_rows=1))
    c = Cluster.build(host_model, small, num_instances=3, tp=1)
    e0 = c.engines[0]
    per_instance = len(set(e0.shape_keys(e0.buckets.all_shapes())))
    missing = sum(1 for e in c.engines for k in set(e.shape_keys(e.buckets.all_shapes())) if not e.exes.is_ready(k))
    n = c.warmup(parallel=True)
    assert n == missing  # executables are shared per mesh: what an earlier test compiled is not compiled again
    assert all(e.exes.is_ready(k) for e in c.engines for k in e.shape_keys(e.buckets.all_shapes()))
    assert per_instance > len(e0.shape_keys(e0.buckets.covering_shapes()))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 300, int(rng.integers(1, 40))).tolist() for _ in range(7)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 20)), ignore_eos=True) for _ in prompts]
    before = compile_stats.compile_count()
    got = [o.token_ids for o in c.generate(prompts, params)]
    assert compile_stats.compile_count() == before
    ref = LLMEngine(load_model("tiny", "float32"), small)
    assert got == [o.token_ids for o in ref.generate(prompts, params)]
