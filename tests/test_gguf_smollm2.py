"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF) in kunjax vs transformers' own GGUF loading, f32.

Both sides dequantize the same file, so every weight must be bit-identical (this also checks the
q/k un-permutation against transformers' independent implementation), and greedy decoding through
the engine must give the same tokens as `model.generate(do_sample=False)`: for chat-templated
prompts, for raw text (code, digits, non-ASCII, and a prompt of several hundred tokens that crosses
many KV pages), and through `tools.batch_generate` with `messages` rows, where generation must end at
the model's end-of-turn token (`<|im_end|>`) exactly where transformers' generation ends.
"""

import json
import os
import types

import numpy as np
import pytest
import torch

from gguf_fixtures import kunjax_vs_hf_pairs
from kunjax.text.chat import render_chat
from kunjax.io.checkpoints.gguf import smollm2_path
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.io.loader import load_model
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig

NEW_TOKENS = 16
CHAT_TOKENS = 24  # enough for these short answers and their end-of-turn token
PAGE = 16
LONG_MIN_TOKENS = 450  # the long raw prompt: several hundred tokens, ~30 pages of PAGE
# A greedy divergence is accepted only where transformers' top-1/top-2 logit margin at that step is
# below this. Measured f32 logit differences kunjax vs transformers on this model are ~3e-5 (550-token
# prompt), so 2e-3 leaves a wide safety factor while still rejecting any real disagreement.
NEAR_TIE_MARGIN = 2e-3
# Scheduler limits chosen to keep the number of compiled shapes (and so the test time) small: the
# short prompts and the first chunk of the long one share a prefill step, the rest of the long
# prompt follows in 256-token chunks. Both tests use it, so they share compiled executables.
ENGINE_CONFIG = EngineConfig(page_size=PAGE, num_pages=160, max_model_len=640,
                             scheduler=SchedulerConfig(max_num_batched_tokens=256, max_prefill_rows=8))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAREGPT = os.path.join(REPO_ROOT, "data", "traces", "sharegpt_v3_filtered_500.json")


def _long_raw_text(tokenizer, min_tokens: int = LONG_MIN_TOKENS) -> str:
    """Real ShareGPT prompts (data/traces, shipped in the repository) joined until the text is
    `min_tokens` tokens long."""
    with open(SHAREGPT) as f:
        texts = [c["conversations"][0]["value"] for c in json.load(f)]
    out = ""
    for t in texts:
        if 200 < len(t) < 800:
            out += t + "\n\n"
            if len(tokenizer.encode(out)) >= min_tokens:
                break
    return out


@pytest.fixture(scope="module")
def models():
    path = smollm2_path()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    hf.eval()
    # One torch thread: on a small shared CPU, OpenMP barriers of a multi-threaded torch stall badly
    # whenever another process (or XLA's own pool) takes a core; single-threaded is slower but steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield hf, load_model("smollm2-135m", dtype="float32")
    torch.set_num_threads(threads)


def _prompts(lm):
    chat = lambda msgs: lm.tokenizer.encode(render_chat(lm.chat_template, msgs))  # noqa: E731
    return {
        "chat-capital": chat([{"role": "user", "content": "What is the capital of France?"}]),
        "chat-system": chat([{"role": "system", "content": "You are a poet."},
                             {"role": "user", "content": "Write a haiku about the sea."}]),
        "chat-multiturn": chat([{"role": "user", "content": "Hi! Can you count?"},
                                {"role": "assistant", "content": "Yes: 1, 2, 3."},
                                {"role": "user", "content": "Continue to 10, please."}]),
        "raw-code": lm.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n"),
        "raw-digits": lm.tokenizer.encode("The numbers 3.14159, 2.71828 and 1234567890 are"),
        "raw-non-ascii": lm.tokenizer.encode("Le café à Paris était très bon, mais le thé à Tōkyō"),
        "raw-long": lm.tokenizer.encode(_long_raw_text(lm.tokenizer)),
    }


def _hf_generate(hf, prompt, max_new_tokens, eos_token_id=None):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos_token_id, pad_token_id=2, output_logits=True,
                          return_dict_in_generate=True)
    return ref.sequences[0, len(prompt):].tolist(), [lg[0].float().numpy() for lg in ref.logits]


def _check_greedy(name, ours, ref_ids, ref_logits) -> bool:
    """True when kunjax's tokens equal transformers'. A divergence is accepted (False) only where the
    reference's own top-1/top-2 logit margin at that step is below NEAR_TIE_MARGIN, which is checked
    here, and kunjax's token is that near-tied runner-up; after it the continuations may differ."""
    for step, (ours_t, ref_t) in enumerate(zip(ours, ref_ids)):
        if ours_t == ref_t:
            continue
        logits = ref_logits[step]
        top2 = np.sort(logits)[-2:]
        margin = float(top2[1] - top2[0])
        assert margin < NEAR_TIE_MARGIN, (
            f"{name}: step {step}: kunjax {ours_t} vs transformers {ref_t}, reference margin {margin:.4f}")
        assert logits[ref_t] - logits[ours_t] < NEAR_TIE_MARGIN, f"{name}: kunjax took a non-top-2 token"
        return False
    assert len(ours) == len(ref_ids), f"{name}: {len(ours)} tokens vs transformers' {len(ref_ids)}"
    return True


def test_weights_identical_to_transformers(models):
    hf, lm = models
    assert lm.name == "smollm2-135m" and lm.config.tie_word_embeddings
    for name, ours, ref in kunjax_vs_hf_pairs(lm.params, hf):
        np.testing.assert_array_equal(np.asarray(ours), ref, err_msg=name)


def test_greedy_matches_transformers(models):
    hf, lm = models
    prompts = _prompts(lm)
    assert len(prompts["raw-long"]) >= LONG_MIN_TOKENS  # crosses ~30 pages of 16
    eng = LLMEngine(lm, ENGINE_CONFIG)
    outs = eng.generate(list(prompts.values()), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                               ignore_eos=True))
    full_matches = 0
    for (name, prompt), out in zip(prompts.items(), outs):
        ref_ids, ref_logits = _hf_generate(hf, prompt, NEW_TOKENS)
        assert len(out.token_ids) == len(ref_ids) == NEW_TOKENS
        full_matches += _check_greedy(name, out.token_ids, ref_ids, ref_logits)
    assert full_matches >= len(prompts) - 1


def test_batch_generate_chat_rows_end_at_end_of_turn(models, tmp_path, monkeypatch):
    """`messages` rows through tools.batch_generate (--dtype=float32): the prompt is the GGUF chat template
    as transformers renders and tokenizes it, the tokens are transformers' greedy ones, and generation
    stops at the end-of-turn token, the token the template closes an assistant turn with."""
    from transformers import AutoTokenizer

    from tools import batch_generate

    hf, lm = models
    path = smollm2_path()
    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # The end-of-turn token: what the template writes right after an assistant message.
    turn = render_chat(lm.chat_template, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                       add_generation_prompt=False)
    eot = lm.tokenizer.encode(turn[turn.rindex("Yo") + 2:])[0]
    assert lm.tokenizer.decode([eot]) == "" and eot in lm.config.eos_token_ids
    assert eot == hf.generation_config.eos_token_id  # transformers stops there too

    convs = {"capital": [{"role": "user", "content": "What is the capital of France?"}],
             "multiturn": [{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "The capital of France is Paris."},
                           {"role": "user", "content": "And of Germany?"}],
             "non-ascii": [{"role": "user", "content": "Écris « bonjour » en majuscules. 🙂"}]}
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": k, "messages": m}) + "\n" for k, m in convs.items()))
    loads = []

    def fake_load(spec, dtype=None, place=None):  # reuse the loaded model; record what the tool asked for
        loads.append((spec, dtype))
        return lm

    monkeypatch.setattr("kunjax.io.loader.load_model", fake_load)
    defaults = types.SimpleNamespace(max_new_tokens=CHAT_TOKENS, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                                     dtype="float32")
    summary = batch_generate.run("smollm2-135m", str(inp), str(outp), defaults, engine_config=ENGINE_CONFIG,
                                 progress=False)
    assert loads == [("smollm2-135m", "float32")] and summary["errors"] == 0
    rows = [json.loads(line) for line in outp.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(convs)
    ended_at_eot = 0
    for row, (name, conv) in zip(rows, convs.items()):
        prompt = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
        ref_ids, ref_logits = _hf_generate(hf, list(prompt), CHAT_TOKENS, eos_token_id=eot)
        assert row["text"] == lm.tokenizer.decode(row["token_ids"]) and "<|im_end|>" not in row["text"]
        if not _check_greedy(name, row["token_ids"], ref_ids, ref_logits):
            continue
        if ref_ids[-1] == eot:
            assert row["finish_reason"] == "stop" and row["token_ids"][-1] == eot, row
            assert eot not in row["token_ids"][:-1]
            ended_at_eot += 1
        else:
            assert row["finish_reason"] == "length" and len(row["token_ids"]) == CHAT_TOKENS, row
    assert ended_at_eot >= 1  # otherwise this test would show nothing about end-of-turn
