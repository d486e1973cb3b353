"""Penalties, min_p and logprobs of the head's penalty variant, against transformers on greedy output:
repetition penalty == RepetitionPenaltyLogitsProcessor (HF generate), frequency / presence == the
OpenAI API's definition applied to HF's logits, logprobs == log_softmax of HF's logits; a request
without them, in the same batch, is unchanged; nothing compiles on the request path."""

import numpy as np
import pytest
import torch

from conftest import stepped
from hf_models import make_model, save_model
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from kunjax.io.loader import load_model
from kunjax.runtime import compile_stats
from kunjax.runtime.engine import EngineConfig, LLMEngine

NEW = 12
PROMPTS = ([3, 4, 5, 3, 4, 5, 3, 4, 5, 3, 4], list(range(40, 60)) + [41, 42, 43])  # greedy repeats on the first


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # One torch thread: the reference runs a few tiny forward passes, which two threads beside the
    # JAX runtime's own only slow down (x20 measured on a loaded 2-core host).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield from _models(tmp_path_factory)
    torch.set_num_threads(threads)


def _models(tmp_path_factory):
    hf = make_model("llama")
    path = save_model(hf, str(tmp_path_factory.mktemp("llama")))
    eng = LLMEngine(load_model(path, dtype="float32"),
                    EngineConfig(page_size=16, num_pages=64, max_model_len=128,
                                 scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                                           max_prefill_rows=2)))
    yield hf, eng


@torch.no_grad()
def hf_penalised_greedy(hf, prompt, n, frequency=0.0, presence=0.0):
    """Greedy decoding with OpenAI's frequency / presence penalties over the generated tokens."""
    ids, out, lps = list(prompt), [], []
    for _ in range(n):
        logits = hf(torch.tensor([ids])).logits[0, -1].double()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).double() if out \
            else torch.zeros_like(logits)
        pen = logits - frequency * counts - presence * (counts > 0).double()
        tok = int(torch.argmax(pen))
        lps.append(torch.log_softmax(logits, -1).numpy())
        out.append(tok)
        ids.append(tok)
    return out, lps


@pytest.mark.parametrize("penalty", [1.3, 0.5])
def test_repetition_penalty_equals_transformers(models, penalty):
    hf, eng = models
    before = compile_stats.compile_count()
    plain = stepped(eng, [PROMPTS[1]], SamplingParams(max_tokens=NEW, ignore_eos=True))[0].token_ids
    # one row with the penalty and one without, in the same steps
    outs = stepped(eng, list(PROMPTS), [SamplingParams(max_tokens=NEW, ignore_eos=True, repetition_penalty=penalty),
                                        SamplingParams(max_tokens=NEW, ignore_eos=True)])
    assert compile_stats.compile_count() == before  # the penalty head was compiled with the covering shapes
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                           repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
        unpenalised = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    assert want != unpenalised  # the penalty changes this output, so the comparison means something
    assert outs[0].token_ids == want
    assert outs[1].token_ids == plain  # the neighbour without penalties is untouched


@pytest.fixture(scope="module")
def unpenalised(models):
    return hf_penalised_greedy(models[0], PROMPTS[0], NEW)[0]


@pytest.mark.parametrize("frequency,presence", [(0.7, 0.6), (-1.0, 0.0)])
def test_frequency_presence_equal_api_definition(models, unpenalised, frequency, presence):
    hf, eng = models
    want, _ = hf_penalised_greedy(hf, PROMPTS[0], NEW, frequency, presence)
    assert want != unpenalised  # the penalty matters here
    got = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW, ignore_eos=True, frequency_penalty=frequency,
                                                    presence_penalty=presence))[0].token_ids
    assert got == want


def test_logprobs_equal_transformers(models):
    hf, eng = models
    want, lps = hf_penalised_greedy(hf, PROMPTS[1], 6)
    req = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3))
    got = []
    while eng.has_unfinished():
        for out in eng.step():
            got.extend(out.new_logprobs)
    assert [g.token_id for g in got] == want == req.output_token_ids
    for g, lp in zip(got, lps):
        assert g.logprob == pytest.approx(lp[g.token_id], abs=1e-4)
        assert [t for t, _ in g.top] == list(np.argsort(-lp)[:3])
        assert [v for _, v in g.top] == pytest.approx(np.sort(lp)[::-1][:3], abs=1e-4)


def test_min_p_one_is_greedy(models):
    _, eng = models
    greedy = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW, ignore_eos=True))[0].token_ids
    sampled = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW, ignore_eos=True, temperature=1.5, seed=3,
                                                        min_p=1.0))[0].token_ids
    free = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW, ignore_eos=True, temperature=1.5,
                                                     seed=3))[0].token_ids
    assert sampled == greedy and free != greedy


@pytest.mark.parametrize("kw,field", [(dict(frequency_penalty=2.5), "frequency_penalty"),
                                      (dict(presence_penalty=-3.0), "presence_penalty"),
                                      (dict(repetition_penalty=0.0), "repetition_penalty"),
                                      (dict(min_p=1.5), "min_p"), (dict(logprobs=6), "logprobs")])
def test_invalid_penalties(models, kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw).validate()
