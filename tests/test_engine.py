"""Engine behaviour on the embedded tiny model: pages, compilation, sampling, stops, preemption."""

import numpy as np
import pytest

from kunjax.runtime import compile_stats
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.control.pages import OutOfPages, PageAllocator
from kunjax.io.loader import load_model
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", dtype="float32")


def make_engine(tiny, **kw):
    sched = kw.pop("scheduler", SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_rows=2))
    return LLMEngine(tiny, EngineConfig(page_size=8, num_pages=kw.pop("num_pages", 96), max_model_len=256,
                                        scheduler=sched, **kw))


def rand_prompts(n, seed=0, lo=1, hi=90):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def test_allocator_explicit_failure_and_double_free():
    a = PageAllocator(5)
    pages = a.allocate(4)
    assert 0 not in pages and a.num_free == 0
    with pytest.raises(OutOfPages):
        a.allocate(1)
    a.free(pages)
    with pytest.raises(ValueError):
        a.free(pages[:1])


def test_batched_equals_one_by_one_and_no_leak(tiny):
    prompts = rand_prompts(10)
    eng = make_engine(tiny)
    batched = eng.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    single = [make_engine(tiny).generate([p], SamplingParams(max_tokens=12, ignore_eos=True))[0] for p in prompts[:3]]
    for a, b in zip(batched, single):
        assert a.token_ids == b.token_ids
    assert eng.allocator.num_free == eng.allocator.num_usable


def test_preemption_keeps_greedy_output(tiny):
    """A pool too small for all requests at once forces recompute preemption; output is unchanged."""
    prompts = rand_prompts(8, seed=3, lo=20, hi=40)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ref = make_engine(tiny).generate(prompts, params)
    small = make_engine(tiny, num_pages=30)
    outs = small.generate(prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert small.allocator.num_free == small.allocator.num_usable


def test_abort_frees_pages(tiny):
    eng = make_engine(tiny)
    req = eng.add_request(list(range(50)), SamplingParams(max_tokens=100, ignore_eos=True))
    eng.add_request(list(range(20)), SamplingParams(max_tokens=5, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert req.pages
    out = eng.abort(req.request_id)
    assert out.finished and out.finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert eng.allocator.num_free == eng.allocator.num_usable


def test_no_recompilation_after_warmup(tiny):
    eng = make_engine(tiny, warmup=True)
    before = compile_stats.compile_count()
    rng = np.random.default_rng(7)
    for i in range(3):
        prompts = rand_prompts(int(rng.integers(1, 8)), seed=i, lo=1, hi=200)
        eng.generate(prompts, [SamplingParams(max_tokens=int(rng.integers(1, 50)), ignore_eos=True,
                                              temperature=float(rng.choice([0.0, 0.8])), top_k=int(rng.integers(0, 5)))
                               for _ in prompts])
    # 1-token prompts and a prompt one token past a chunk: prefill steps of a single query token.
    chunk = eng.config.scheduler.max_num_batched_tokens
    eng.generate([[5], [7], list(range(1, chunk + 2))], SamplingParams(max_tokens=3, ignore_eos=True))
    assert compile_stats.compile_count() == before


def test_seeded_sampling_reproducible_and_batch_independent(tiny):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    prompt = list(b"the quick brown fox")
    alone = make_engine(tiny).generate([prompt], p)[0].token_ids
    others = rand_prompts(5, seed=9)
    mixed = make_engine(tiny).generate(others[:2] + [prompt] + others[2:],
                                       [SamplingParams(max_tokens=10, temperature=0.7, seed=5)] * 2 + [p] +
                                       [SamplingParams(max_tokens=10)] * 3)[2].token_ids
    assert alone == mixed
    other_seed = make_engine(tiny).generate([prompt], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9,
                                                                     seed=124, ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_top_k_one_is_greedy(tiny):
    prompt = list(b"abcabc")
    greedy = make_engine(tiny).generate([prompt], SamplingParams(max_tokens=15, ignore_eos=True))[0].token_ids
    topk1 = make_engine(tiny).generate([prompt], SamplingParams(max_tokens=15, temperature=1.5, top_k=1, seed=1,
                                                                ignore_eos=True))[0].token_ids
    assert topk1 == greedy


def test_sampler_distribution():
    """top-k / top-p restrict the support exactly; temperature sampling follows the softmax."""
    import jax.numpy as jnp
    from kunjax.model.sampling import sample

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    n = logits.shape[0]
    ones = jnp.ones((n,), jnp.float32)
    seeds = jnp.arange(n, dtype=jnp.uint32)
    counters = jnp.zeros((n,), jnp.int32)
    free = np.asarray(sample(logits, ones, jnp.zeros((n,), jnp.int32), ones, seeds, counters))
    freq = np.bincount(free, minlength=4) / n
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = np.asarray(sample(logits, ones, jnp.full((n,), 2, jnp.int32), ones, seeds, counters))
    assert set(np.unique(top2)) == {0, 1}
    topp = np.asarray(sample(logits, ones, jnp.zeros((n,), jnp.int32), jnp.full((n,), 0.75), seeds, counters))
    assert set(np.unique(topp)) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    # A tiny (legal) top_p keeps exactly the most likely token, wherever it sits in the vocabulary.
    shuffled = jnp.log(jnp.asarray([[0.15, 0.3, 0.5, 0.05]] * 64, jnp.float32))
    m = shuffled.shape[0]
    for tiny_p in (1e-45, 1e-6):
        got = np.asarray(sample(shuffled, jnp.ones((m,)), jnp.zeros((m,), jnp.int32), jnp.full((m,), tiny_p),
                                seeds[:m], counters[:m]))
        assert set(np.unique(got)) == {2}, tiny_p


def test_stop_token_and_stop_string(tiny):
    prompt = list(b"hello")
    free = make_engine(tiny).generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    stop_tok = free.token_ids[5]
    out = make_engine(tiny).generate([prompt], SamplingParams(max_tokens=30, stop_token_ids=(stop_tok,),
                                                             ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_tok
    assert len(out.token_ids) == free.token_ids.index(stop_tok) + 1
    text = free.text
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2]), None)
    if stop is not None:
        eng = make_engine(tiny)
        s = eng.generate([prompt], SamplingParams(max_tokens=30, stop=(stop,), ignore_eos=True))[0]
        assert s.finish_reason == "stop" and s.text == text[:text.find(stop)]
        assert eng.allocator.num_free == eng.allocator.num_usable


@pytest.mark.parametrize("bad,match", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[400]), "vocabulary"),
    (dict(prompt=[1] * 300), "context"),
    (dict(params=SamplingParams(max_tokens=0)), "max_tokens"),
    (dict(params=SamplingParams(max_tokens=250), prompt=[1] * 10), "max_tokens"),
    (dict(params=SamplingParams(temperature=-1)), "temperature"),
    (dict(params=SamplingParams(top_p=0.0)), "top_p"),
    (dict(params=SamplingParams(top_p=1.5)), "top_p"),
])
def test_invalid_requests_rejected_clearly(tiny, bad, match):
    eng = make_engine(tiny)
    with pytest.raises(ValueError, match=match):
        eng.add_request(bad.get("prompt", [1, 2, 3]), bad.get("params", SamplingParams()))
    assert not eng.has_unfinished()


def test_kv_sized_from_memory_budget(tiny):
    """Pages come from a per-device byte budget minus the measured live bytes (parameters) and the
    activation reserve: 40 pages' worth of extra budget gives exactly 40 more pages."""
    import gc

    from kunjax.runtime.kv_pools import page_bytes

    per_page = page_bytes(tiny.config, 8, np.float32)
    base = 12 << 20
    a = LLMEngine(tiny, EngineConfig(page_size=8, hbm_bytes=base, max_model_len=256))
    n_a, split = a.num_pages, a.memory_split
    assert split.budget == base and split.weights > 0 and split.reserve > 0 and split.kv == n_a * per_page
    assert 0 <= split.free < per_page  # every byte the formula allows went to pages
    del a
    gc.collect()
    b = LLMEngine(tiny, EngineConfig(page_size=8, hbm_bytes=base + 40 * per_page, max_model_len=256))
    assert 2 <= n_a < 1025 and b.num_pages == n_a + 40
    with pytest.raises(ValueError, match="memory budget"):
        LLMEngine(tiny, EngineConfig(page_size=8, hbm_bytes=1 << 20, max_model_len=256))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_steps_update_kv_pools_in_place(dtype):
    """Every compiled layer executable updates the donated KV pools in place: no instruction copies or
    converts a pool-sized array. (XLA may fuse the KV write into the attention's gather; the pool
    is then copied once per layer per step, which made 1-row f32 decode 10x slower.)"""
    import re

    from kunjax.runtime.executables import LAYER

    lm = load_model("tiny", dtype)
    eng = LLMEngine(lm, EngineConfig(page_size=16, num_pages=999, max_model_len=128, warmup=True,
                                     scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32)))
    keys = [k for k in eng.shape_keys(eng.buckets.all_shapes()) if k.kind == LAYER]
    assert len(keys) == len(eng.buckets.all_shapes())
    for pool in eng.stage.pools[0]:  # K (pages stored transposed) and V
        dims = ",".join(map(str, pool.shape))
        for key in keys:
            hlo = eng.exes.get(key).as_text()
            ops = set(re.findall(rf"= \w+\[{dims}\]\{{[^}}]*\}} ([\w-]+)\(", hlo))
            assert ops, key
            assert not ops & {"copy", "convert"}, (key, ops)
            for fused in re.findall(rf"%(\S+) = \w+\[{dims}\]\{{[^}}]*\}} fusion\(", hlo):
                assert "copy" not in fused and "convert" not in fused, (key, fused)
