"""LLMEngine.generate compiles the step shapes a run keeps needing instead of running them padded to
the start-up (covering) shapes for ever, packs its prefill into rows of OFFLINE_SEGMENT tokens (a
prompt over several rows of one step), and its tokens are those of the padded, one-row-per-prompt run."""

import numpy as np

from kunjax.control.batch import StepShape
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from kunjax.runtime.engine import OFFLINE_COMPILE, OFFLINE_SEGMENT, EngineConfig, LLMEngine


def test_generate_compiles_needed_shapes_and_stays_token_exact(host_model):
    eng = LLMEngine(host_model, EngineConfig(page_size=8, num_pages=200, max_model_len=512, scheduler=SchedulerConfig(
        max_num_seqs=16, max_num_batched_tokens=128, max_prefill_rows=4)))
    rng = np.random.default_rng(3)
    # mixed lengths: 4 + 2 prefill rows stepped by hand; generate packs the 70 tokens into 3 rows
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 17, 30, 9, 12, 70)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)  # decode at 8 rows (of 16) for more than 32 steps
    # Stepping by hand (a server's way) compiles nothing: every step runs padded to a start-up shape.
    compiled = eng.exes.num_compiled
    padded = [eng.add_request(p, params).request_id for p in prompts]
    final = {}
    while eng.has_unfinished():
        final.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
    assert eng.exes.num_compiled == compiled
    ran, needed = [], []
    execute, prepare = eng.execute, eng.prepare
    eng.execute = lambda op: (ran.append(StepShape(*op.args["shape"])), execute(op))[1]
    split = []  # prefill steps of generate where one request had several rows
    eng.prepare = lambda step: (needed.append(eng.buckets.needed(step.rows, step.prefill)),
                                split.append(len({id(r.request) for r in step.rows}) < len(step.rows)),
                                prepare(step))[2]
    outs = eng.generate(prompts, params)
    assert [o.token_ids for o in outs] == [final[r] for r in padded]
    at_once, again = OFFLINE_COMPILE
    tokens = lambda s: s.rows * s.query  # noqa: E731
    assert len(ran) == len(needed)
    assert all(s.query == OFFLINE_SEGMENT for s in ran if s.prefill) and any(split)
    for i, (want, shape) in enumerate(zip(needed, ran)):
        if shape != want:  # ran padded: a shape padded to < at_once x its tokens, not yet needed `again` times
            ratio = tokens(shape) / tokens(want)
            assert not (want.prefill and ratio >= at_once)
            assert ratio < 2 or needed[:i + 1].count(want) < again[want.prefill]
    exact = {s for s, r in zip(needed, ran) if s == r} - set(eng.first_shapes())
    assert any(s.prefill for s in exact) and any(not s.prefill for s in exact), exact  # compiled by generate
