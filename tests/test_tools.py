"""Offline tools end to end: batch_generate on tiny and on a saved HF directory, HF -> orbax."""

import json
import subprocess
import sys
import types

import pytest
import torch

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
                      {"id": "d", "prompt_token_ids": [99999]}, {"id": "e", "prompt": "again"},
                      {"id": "f", "messages": [{"role": "user", "content": "Hello there"}], "max_new_tokens": 4},
                      {"id": "g", "messages": [{"role": "robot", "content": "beep"}]},
                      {"id": "h", "messages": "not a list"}])
    summary = batch_generate.run("tiny", str(inp), str(out), flags(), progress=False)
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", 2, "b", "c", "d", "e", "f", "g", "h"]
    assert rows[1]["finish_reason"] == "error" and "line 2" in rows[1]["error"]
    assert "line 4" in rows[3]["error"] and "exactly one" in rows[3]["error"]
    assert "vocabulary" in rows[4]["error"]
    assert len(rows[0]["token_ids"]) == 8 and rows[0]["finish_reason"] == "length"
    assert len(rows[2]["token_ids"]) == 3
    # tiny has no chat template: its messages rows are refused, as over gRPC
    assert "line 7" in rows[6]["error"] and "no chat template" in rows[6]["error"]
    assert "line 8" in rows[7]["error"] and "messages[0].role" in rows[7]["error"]
    assert "line 9" in rows[8]["error"] and "messages must be a list" in rows[8]["error"]
    assert summary["errors"] == 6 and summary["generated_tokens"] == 8 + 3 + 8


def test_batch_generate_a_new_input_of_similar_size_compiles_nothing(tmp_path):
    """The offline KV pool is sized to the input, rounded to a power of two (offline_kv_pages): the
    pool size keys every layer executable, so an exact count made every new input file compile anew."""
    summaries = []
    for n, lens in enumerate([[20, 40, 33], [25, 47, 30, 12]]):  # 9 and 13 pages of KV at once
        inp, out = tmp_path / f"in{n}.jsonl", tmp_path / f"out{n}.jsonl"
        write_jsonl(inp, [{"id": i, "prompt_token_ids": list(range(3, 3 + k)), "max_new_tokens": 8}
                          for i, k in enumerate(lens)])
        summaries.append(batch_generate.run("tiny", str(inp), str(out), flags(num_pages=None), progress=False))
    assert summaries[0]["errors"] == summaries[1]["errors"] == 0
    assert summaries[1]["compilations"] == 0, summaries


def test_batch_generate_flags():
    """Default model smollm2-135m; --dtype takes float32 | bfloat16 (or auto) and nothing else."""
    from absl import flags as absl_flags

    fv = absl_flags.FlagValues()
    batch_generate.define_flags(fv)
    fv(["batch_generate", "--input=in.jsonl", "--output=out.jsonl"])
    assert fv.model == "smollm2-135m" and fv.dtype == "auto"
    for dtype in ("float32", "bfloat16"):
        fv.unparse_flags()
        fv(["batch_generate", "--input=a", "--output=b", f"--dtype={dtype}"])
        assert fv.dtype == dtype
    fv.unparse_flags()
    with pytest.raises(absl_flags.IllegalFlagValueError, match="float16"):
        fv(["batch_generate", "--input=a", "--output=b", "--dtype=float16"])


def test_batch_generate_cli_tiny(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": i, "prompt": f"prompt number {i}"} for i in range(4)])
    proc = subprocess.run([sys.executable, "-m", "tools.batch_generate", "--model=tiny", f"--input={inp}",
                           f"--output={out}", "--max_new_tokens=5", "--dtype=bfloat16", "--num_pages=64",
                           "--max_model_len=128"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "done: 4 requests" in proc.stderr and "tokens/s" in proc.stderr
    assert [len(r["token_ids"]) for r in read_jsonl(out)] == [5] * 4


@pytest.mark.parametrize("args, message", [
    (["--input={tmp}/missing.jsonl", "--output={tmp}/out.jsonl"], "--input={tmp}/missing.jsonl: no such file"),
    (["--input={tmp}/in.jsonl", "--output={tmp}/no/such/dir/out.jsonl"], "does not exist"),
    (["--input={tmp}/in.jsonl", "--output={tmp}/out.jsonl", "--model={tmp}/nope.gguf"], "no such file or directory"),
])
def test_batch_generate_bad_arguments_fail_fast(tmp_path, args, message):
    """A missing input, an output folder that does not exist, a wrong --model: one line, exit 2, and
    before the model loads (the default smollm2-135m takes seconds; this must not)."""
    import time

    write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "prompt": "x"}])
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tools.batch_generate", *(a.format(tmp=tmp_path) for a in args)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batch_generate: error:"), proc.stderr
    assert message.format(tmp=tmp_path) in lines[0]
    assert time.monotonic() - t0 < 10 and not (tmp_path / "out.jsonl").exists()


def test_batch_generate_dtype_reaches_the_model(tmp_path, monkeypatch):
    import jax.numpy as jnp

    import kunjax.io.loader

    loaded = []
    real = kunjax.io.loader.load_model

    def spy(spec, dtype=None, place=None):
        loaded.append(real(spec, dtype=dtype, place=place))
        return loaded[-1]

    monkeypatch.setattr(kunjax.io.loader, "load_model", spy)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"prompt": "bf16"}])
    batch_generate.run("tiny", str(inp), str(out), flags(dtype="bfloat16", max_new_tokens=2), progress=False)
    leaves = __import__("jax").tree.leaves(loaded[0].params)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    assert len(read_jsonl(out)[0]["token_ids"]) == 2


def _greedy_until(model, prompt, n, eos):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=list(eos), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_batch_generate_messages_end_at_end_of_turn(tmp_path):
    """A GGUF whose EOS is <|endoftext|> but whose chat template closes turns with <|im_end|>: `messages`
    rows get the ChatML prompt, and generation stops at <|im_end|> exactly where transformers stops.

    The random model is made to emit <|im_end|> (id 2): its greedy continuation is computed first, and the
    lm_head rows of id 2 and of the first new token at step k >= 2 are swapped, so steps before k are
    unchanged and step k picks id 2."""
    from gguf_fixtures import make_hf_model, write_gguf
    from kunjax.text.gguf_tokenizer import load_gguf_tokenizer

    hf = make_hf_model("llama", seed=5)
    path = str(tmp_path / "chat.gguf")
    write_gguf(hf, path, eos_token_id=0)
    tok = load_gguf_tokenizer(path)
    conv = [{"role": "system", "content": "the end"}, {"role": "user", "content": "hello world"}]
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv) + "<|im_start|>assistant\n"
    prompt = tok.encode(chatml, add_special_tokens=False)
    assert prompt.count(1) == 3 and prompt.count(2) == 2  # <|im_start|> x3, <|im_end|> x2
    n = 12
    free = _greedy_until(hf, prompt, n, eos=())
    k = next(i for i in range(2, n) if free[i] not in free[:i] + [0, 1, 2] and not {0, 2} & set(free[:i]))
    with torch.no_grad():
        w = hf.lm_head.weight
        w[[2, free[k]]] = w[[free[k], 2]].clone()
    ref = _greedy_until(hf, prompt, n, eos=(0, 2))
    assert ref == free[:k] + [2]
    write_gguf(hf, path, eos_token_id=0)

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": "chat", "messages": conv}, {"id": "raw", "prompt": "hello world and the"}])
    summary = batch_generate.run(path, str(inp), str(out), flags(max_new_tokens=n), progress=False)
    chat, raw = read_jsonl(out)
    assert summary["errors"] == 0
    assert chat["token_ids"] == ref and chat["finish_reason"] == "stop"
    assert chat["text"] == tok.decode(ref[:-1]) and "<|im_end|>" not in chat["text"]
    raw_ref = _greedy_until(hf, tok.encode("hello world and the"), n, eos=(0, 2))
    assert raw["token_ids"] == raw_ref
    assert raw["finish_reason"] == ("stop" if raw_ref[-1] in (0, 2) else "length")


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

    from kunjax.runtime.engine import EngineConfig, LLMEngine
    from kunjax.io.loader import load_model
    from kunjax.control.request import SamplingParams

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


def test_bench_startup_measures_a_cold_and_a_warm_launch(capsys, monkeypatch):
    """tools.bench_startup launches the server twice on one fresh cache directory and reports both
    launches (SERVING seconds, a real first request, compile count, peak RSS); the warm launch reads
    the cache the cold one wrote, so it compiles through the cache rather than from scratch."""
    from tools import bench_startup

    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the launcher creates its own virtual devices
    args = ["--", "--model=tiny", "--dtype=float32", "--cpu_devices=1", "--num_pages=32", "--max_model_len=64",
            "--max_num_seqs=2", "--max_num_batched_tokens=16", "--log_level=warning"]
    assert bench_startup.main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "SERVING after" in line]
    assert [r.split()[0] for r in rows] == ["empty", "warm"], out
    for r in rows:
        assert float(r.split("SERVING after")[1].split()[0]) > 0
        assert int(r.split("peak RSS")[1].split()[0]) > 100  # MiB: a real process with jax loaded
