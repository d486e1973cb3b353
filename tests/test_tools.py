"""Offline tools end to end: batch_generate on tiny and on a saved HF directory, HF -> orbax."""

import json
import subprocess
import sys
import types

import pytest

from hf_models import hf_greedy, make_model, save_model
from tools import batch_generate
from tools.convert_checkpoint import convert

DEFAULTS = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=0, dtype="float32", page_size=16,
                num_pages=128, hbm_bytes=None, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64)


def flags(**kw):
    return types.SimpleNamespace(**{**DEFAULTS, **kw})


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def add_tokenizer(path):
    """A small byte-level BPE tokenizer.json whose ids fit the test model's 320-token vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=310, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(f"{path}/tokenizer.json")
    return tok


def test_batch_generate_tiny_rows_and_errors(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": "a", "prompt": "Hello there"}, "{broken json",
                      {"id": "b", "prompt_token_ids": [5, 6, 7], "max_new_tokens": 3},
                      {"id": "c", "prompt": "x", "prompt_token_ids": [1]},
                      {"id": "d", "prompt_token_ids": [99999]}, {"id": "e", "prompt": "again"}])
    summary = batch_generate.run("tiny", str(inp), str(out), flags(), progress=False)
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", 2, "b", "c", "d", "e"]
    assert rows[1]["finish_reason"] == "error" and "line 2" in rows[1]["error"]
    assert "line 4" in rows[3]["error"] and "exactly one" in rows[3]["error"]
    assert "vocabulary" in rows[4]["error"]
    assert len(rows[0]["token_ids"]) == 8 and rows[0]["finish_reason"] == "length"
    assert len(rows[2]["token_ids"]) == 3
    assert summary["errors"] == 3 and summary["generated_tokens"] == 8 + 3 + 8


def test_batch_generate_cli_tiny(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": i, "prompt": f"prompt number {i}"} for i in range(4)])
    proc = subprocess.run([sys.executable, "-m", "tools.batch_generate", "--model=tiny", f"--input={inp}",
                           f"--output={out}", "--max_new_tokens=5", "--dtype=float32", "--num_pages=64",
                           "--max_model_len=128"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "done: 4 requests" in proc.stderr and "tokens/s" in proc.stderr
    assert [len(r["token_ids"]) for r in read_jsonl(out)] == [5] * 4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = make_model("llama", seed=3)
    path = str(tmp_path_factory.mktemp("hf_llama"))
    save_model(model, path)
    tok = add_tokenizer(path)
    return model, path, tok


def test_batch_generate_hf_dir_matches_transformers(hf_dir, tmp_path):
    model, path, tok = hf_dir
    texts = ["the quick brown fox", "lazy dog jumps", "over the fox over the dog"]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": i, "prompt": t} for i, t in enumerate(texts)])
    batch_generate.run(path, str(inp), str(out), flags(max_new_tokens=10), progress=False)
    rows = read_jsonl(out)
    for t, row in zip(texts, rows):
        ids = tok.encode(t).ids
        assert row["token_ids"] == hf_greedy(model, ids, 10)
        assert row["text"] == tok.decode(row["token_ids"])


def test_convert_to_orbax_and_serve(hf_dir, tmp_path):
    import numpy as np

    from kunjax.engine import EngineConfig, LLMEngine
    from kunjax.loader import load_model
    from kunjax.request import SamplingParams

    model, path, tok = hf_dir
    dst = str(tmp_path / "orbax")
    convert(path, dst, "float32")
    a, b = load_model(path, dtype="float32"), load_model(dst, dtype="float32")
    assert a.config == b.config
    for x, y in zip(__import__("jax").tree.leaves(a.params), __import__("jax").tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    prompt = tok.encode("the lazy fox").ids
    out = LLMEngine(b, EngineConfig(num_pages=32, max_model_len=128)).generate(
        [prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(model, prompt, 8)
    assert b.tokenizer is not None and b.tokenizer.decode(prompt) == "the lazy fox"
