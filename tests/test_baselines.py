"""The KV-centric overload baselines on the tiny model, with page pools small enough to force them:
recompute and swap preemption (per instance). Each keeps greedy output token-exact with an
unloaded run, leaks no page, loses no request; swap's host copies are freed afterwards (host bytes
measured with tracemalloc, which numpy reports its buffers to; device bytes with jax.live_arrays);
a request cancelled while swapped out frees everything."""

import gc
import tracemalloc

import numpy as np
import pytest

from conftest import stepped
from kunjax.control.request import SamplingParams, Status
from kunjax.control.scheduler import SchedulerConfig
from kunjax.io.loader import load_model
from kunjax.memory import measure
from kunjax.runtime import compile_stats
from kunjax.runtime.engine import EngineConfig, LLMEngine

PARAMS = SamplingParams(max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", dtype="float32")


def make_engine(tiny, policy="recompute", num_pages=96, **kw):
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_rows=2)
    return LLMEngine(tiny, EngineConfig(page_size=8, num_pages=num_pages, max_model_len=256, scheduler=sched,
                                        overload_policy=policy, **kw))


def prompts(n=8, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(20, 40))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny):
    return [o.token_ids for o in make_engine(tiny).generate(prompts(), PARAMS)]


def live(engine) -> int:
    gc.collect()
    return measure.device_live_bytes(engine.device)


@pytest.mark.parametrize("policy", ["recompute", "swap"])
def test_policy_is_token_exact_and_frees_everything(tiny, reference, policy):
    eng = make_engine(tiny, policy, num_pages=30)
    start = live(eng)
    compiles = compile_stats.compile_count()
    tracemalloc.start()
    host0 = tracemalloc.get_traced_memory()[0]
    outs = stepped(eng, prompts(), PARAMS)
    host_peak = tracemalloc.get_traced_memory()[1]
    gc.collect()
    host1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert [o.token_ids for o in outs] == reference
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    s = eng.scheduler
    assert s.num_preemptions > 0
    assert eng.allocator.num_free == eng.allocator.num_usable and not s.has_work()
    st = eng.host_status()
    if policy == "swap":
        assert s.num_swap_outs > 0 and s.num_swap_ins == s.num_swap_outs and s.num_recomputed_tokens == 0
        assert st["swapped_out_bytes"] == st["swapped_in_bytes"] > 0 and st["host_swap_bytes"] == 0
        assert host_peak - host0 >= st["swapped_out_bytes"] // s.num_swap_outs  # the copies were really on the host
        assert eng.swap.host == {} and s.host_pages == 0
        kinds = [e["kind"] for e in s.events.after(0)]
        assert kinds.count("swap_out") == s.num_swap_outs and kinds.count("swap_in") == s.num_swap_ins
    else:
        assert s.num_recomputed_tokens > 0 and s.num_swap_outs == 0
        assert [e["kind"] for e in s.events.after(0)].count("preempt") == s.num_preemptions
    assert host1 - host0 < 256 * 1024  # nothing swapped stays on the host
    assert live(eng) == start  # no device copy left behind
    assert compile_stats.compile_count() == compiles  # swaps run on executables compiled at start-up


def test_swap_pool_bound_falls_back_to_recompute(tiny, reference):
    page = 2 * tiny.config.num_layers * 8 * tiny.config.num_kv_heads * tiny.config.head_dim * 4
    eng = make_engine(tiny, "swap", num_pages=30, swap_space_bytes=6 * page)
    outs = eng.generate(prompts(), PARAMS)
    assert [o.token_ids for o in outs] == reference
    s = eng.scheduler
    assert s.swap_capacity_pages == 6 and s.num_recomputed_tokens > 0  # victims of more than 6 pages recompute
    assert eng.allocator.num_free == eng.allocator.num_usable and eng.swap.host == {}


def test_cancel_while_swapped_out_frees_everything(tiny):
    eng = make_engine(tiny, "swap", num_pages=30)
    start = live(eng)
    reqs = [eng.add_request(p, PARAMS) for p in prompts()]
    while not eng.scheduler.swapped or eng.scheduler.moves:  # until a swap out has been carried out
        eng.step()
    victim = eng.scheduler.swapped[0]
    assert victim.status == Status.SWAPPED and victim.request_id in eng.swap.host
    out = eng.abort(victim.request_id)
    assert out.finished and out.finish_reason == "abort"
    assert victim.request_id not in eng.swap.host  # freed at once, not at the next step
    while eng.has_unfinished():
        eng.step()
    assert all(r.is_finished for r in reqs)
    assert eng.allocator.num_free == eng.allocator.num_usable and eng.swap.host_bytes() == 0
    assert eng.scheduler.host_pages == 0
    assert live(eng) == start


# ---- live migration (two instances) ---------------------------------------------------------------
class FirstUnit:
    """Dispatch that sends everything to instance 0: the overload the migration has to relieve."""

    def choose(self, views, num_tokens):
        return 0


def migrating_cluster(tiny, num_pages=30):
    from kunjax.runtime import migrate
    from kunjax.runtime.cluster import ServingCluster

    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_rows=2)
    cfg = EngineConfig(page_size=8, num_pages=num_pages, max_model_len=256, scheduler=sched)
    cluster = ServingCluster.build(tiny, cfg, num_instances=2, policy=FirstUnit())
    return cluster, migrate.install(cluster)


def cluster_live(cluster) -> list:
    gc.collect()
    return [measure.device_live_bytes(e.device) for e in cluster.engines]


def test_migrate_is_token_exact_and_frees_everything(tiny, reference):
    cluster, _ = migrating_cluster(tiny)
    start = cluster_live(cluster)
    compiles = compile_stats.compile_count()
    outs = cluster.generate(prompts(), PARAMS)
    assert [o.token_ids for o in outs] == reference
    s0, s1 = (e.scheduler for e in cluster.engines)
    assert s0.num_migrations_out > 0 and s1.num_migrations_in == s0.num_migrations_out and s0.migrated_bytes > 0
    kinds = [e["kind"] for e in s0.events.after(0)]
    assert kinds.count("migrate") == s0.num_migrations_out and "redispatch" in kinds
    for e in cluster.engines:
        assert e.allocator.num_free == e.allocator.num_usable and not e.has_unfinished()
    assert not cluster.tasks and cluster_live(cluster) == start  # no copy left on either device
    assert compile_stats.compile_count() == compiles
    st = cluster.status(with_memory=False)["instances"]
    assert st[0]["migrations_out"] == s0.num_migrations_out and st[1]["migrations_in"] == s1.num_migrations_in


def test_cancel_mid_migration_frees_everything(tiny):
    from kunjax.control.migration import MigrationTask

    cluster, controller = migrating_cluster(tiny)
    start = cluster_live(cluster)
    ids = [cluster.add_request(p, PARAMS) for p in prompts()]
    while not any(isinstance(t, MigrationTask) and t.copied for t in cluster.tasks):
        cluster.step()
    task = next(t for t in cluster.tasks if isinstance(t, MigrationTask))
    assert task.dst_pages and not task.done
    out = cluster.abort(task.req.request_id)
    assert out.finished and out.finish_reason == "abort"
    while cluster.has_unfinished():
        cluster.step()
    assert task.done and task.dst_pages == []
    assert cluster.engines[1].scheduler.num_migrations_in == controller.cluster.engines[0].scheduler.num_migrations_out
    for e in cluster.engines:
        assert e.allocator.num_free == e.allocator.num_usable
    assert len(ids) == 8 and cluster_live(cluster) == start
