"""Offline batch generation end to end, kunjax against Hugging Face transformers, side by side in one run.

    python -m tools.bench_batch                        # ~125M random Llama saved as a HF dir, f32
    python -m tools.bench_batch --dtype=bfloat16
    python -m tools.bench_batch --model=/path/to/hf_dir --modes=batch

The workload (the offline case of issue 17): `--prompts` prompts of random token ids with lengths drawn
uniformly from [`--min_len`, `--max_len`], `--new_tokens` greedy tokens each (ending early at the
model's end-of-sequence token, the same for both). Every run is its own process and timed from its
start to its exit, imports and model loading included, as a user runs it:

- transformers: `from_pretrained` + one batched, left-padded `generate` (its fastest offline use);
- kunjax `batch`: `python -m tools.batch_generate` on a JSONL of the prompts;
- kunjax `engine`: `LLMEngine(...)` + `generate(prompts)` as a library (this module's `--worker=engine`).

Each kunjax mode runs twice on one fresh compilation cache directory: first empty (cold: everything
compiles), then warm (the executables come from kunjax's executable store). Printed: seconds, generated
tokens/s, the ratio to transformers (throughput; > 1 is faster), and how many rows produced exactly
transformers' tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("model", None, "HF model directory (default: a random Llama of --preset, saved to a temp dir)")
    flags.DEFINE_string("preset", "100m", "random-weight model shape (tools.random_llama.PRESETS)")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "weights and KV dtype, both sides")
    flags.DEFINE_integer("prompts", 32, "prompts in the batch")
    flags.DEFINE_integer("min_len", 16, "shortest prompt (tokens)")
    flags.DEFINE_integer("max_len", 200, "longest prompt (tokens)")
    flags.DEFINE_integer("new_tokens", 64, "greedy tokens per prompt")
    flags.DEFINE_integer("seed", 0, "prompt lengths and tokens")
    flags.DEFINE_list("modes", ["batch", "engine"],
                      "kunjax modes: batch (tools.batch_generate), engine (LLMEngine.generate)")
    flags.DEFINE_integer("repeats", 1, "warm runs per mode, each paired with a transformers run just before it "
                         "(on a shared machine the pairs' median ratio is the figure to read)")
    flags.DEFINE_enum("worker", None, ["hf", "engine"], "internal: run one side in this process and print JSON")
    flags.DEFINE_string("input", None, "internal: the prompts (JSONL of prompt_token_ids)")
    flags.DEFINE_string("output", None, "internal: where the worker writes its generated tokens (JSON)")


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def scheduler_flags(n: int) -> dict:
    """The batch tool's defaults, with room for every prompt at once (as transformers' one batch)."""
    return dict(max_num_seqs=max(n, 1), max_num_batched_tokens=512, max_model_len=2048)


# ---- workers (one side each, in their own process) -------------------------------------------
def hf_worker(model: str, dtype: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    m.eval()
    n = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    eos = m.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    rows = []
    for r in out[:, n:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


def engine_worker(model: str, dtype: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from kunjax.runtime.jax_setup import configure_jax

    configure_jax()
    from kunjax.control.request import SamplingParams
    from kunjax.control.scheduler import SchedulerConfig
    from kunjax.io.loader import host_place, load_model, parse_dtype
    from kunjax.runtime.engine import EngineConfig, LLMEngine

    lm = load_model(model, dtype=dtype, place=host_place(parse_dtype(dtype)))
    s = scheduler_flags(len(prompts))
    eng = LLMEngine(lm, EngineConfig(hbm_bytes=4 << 30, max_model_len=s["max_model_len"],
                                     scheduler=SchedulerConfig(max_num_seqs=s["max_num_seqs"],
                                                               max_num_batched_tokens=s["max_num_batched_tokens"])))
    outs = eng.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    return [list(o.token_ids) for o in outs]  # like transformers' rows: ending with the EOS token when reached


# ---- the driver -------------------------------------------------------------------------------
def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.monotonic() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {p.returncode}:\n{p.stderr[-3000:]}")
    return dt, p.stderr


def run_side(kind: str, model: str, dtype: str, prompts_path: str, new_tokens: int, work: str,
             cache: Optional[str] = None) -> tuple[float, list[list[int]]]:
    env = dict(os.environ)
    if cache is not None:
        env["KUNJAX_COMPILE_CACHE"] = cache
    out = os.path.join(work, f"{kind}.out")
    if kind == "batch":
        s = scheduler_flags(sum(1 for _ in open(prompts_path)))
        cmd = [sys.executable, "-m", "tools.batch_generate", f"--model={model}", f"--input={prompts_path}",
               f"--output={out}", f"--max_new_tokens={new_tokens}", "--temperature=0", f"--dtype={dtype}",
               "--noprogress", *[f"--{k}={v}" for k, v in s.items()]]
        dt, _ = _timed(cmd, env)
        with open(out) as f:
            rows = [json.loads(line) for line in f]
        return dt, [r["token_ids"] for r in rows]
    cmd = [sys.executable, "-m", "tools.bench_batch", f"--worker={kind}", f"--model={model}", f"--dtype={dtype}",
           f"--input={prompts_path}", f"--output={out}", f"--new_tokens={new_tokens}"]
    dt, _ = _timed(cmd, env)
    with open(out) as f:
        return dt, json.load(f)


def same_rows(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def main(argv):
    del argv
    if FLAGS.worker:
        with open(FLAGS.input) as f:
            prompts = [json.loads(line)["prompt_token_ids"] for line in f]
        fn = hf_worker if FLAGS.worker == "hf" else engine_worker
        rows = fn(FLAGS.model, FLAGS.dtype, prompts, FLAGS.new_tokens)
        with open(FLAGS.output, "w") as f:
            json.dump(rows, f)
        return 0
    work = tempfile.mkdtemp(prefix="kunjax-bench-batch-")
    model = FLAGS.model
    if model is None:
        from tools import random_llama

        model = random_llama.save(os.path.join(work, "model"), FLAGS.preset, FLAGS.dtype)
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts = make_prompts(FLAGS.prompts, FLAGS.min_len, FLAGS.max_len, vocab, FLAGS.seed)
    prompts_path = os.path.join(work, "prompts.jsonl")
    with open(prompts_path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": i, "prompt_token_ids": p}) + "\n")
    print(f"model {FLAGS.model or 'random Llama ' + FLAGS.preset}, {FLAGS.dtype}; {FLAGS.prompts} prompts of "
          f"{FLAGS.min_len}-{FLAGS.max_len} tokens ({sum(map(len, prompts))} in all), {FLAGS.new_tokens} new greedy "
          f"tokens; {os.cpu_count()} CPU threads; every run a fresh process, timed start to exit", flush=True)
    def hf_run():
        dt, rows = run_side("hf", model, FLAGS.dtype, prompts_path, FLAGS.new_tokens, work)
        print(f"{'transformers':<22}{dt:8.1f} s  {sum(map(len, rows)) / dt:8.1f} tok/s  ({sum(map(len, rows))} tokens)",
              flush=True)
        return sum(map(len, rows)) / dt, rows

    hf_tps, hf_rows = hf_run()
    for mode in FLAGS.modes:
        cache = tempfile.mkdtemp(prefix="kunjax-bench-batch-cache-", dir=work)
        ratios = []
        for i, label in enumerate(["cold"] + ["warm"] * FLAGS.repeats):
            if i > 1:
                hf_tps, _ = hf_run()
            dt, rows = run_side(mode, model, FLAGS.dtype, prompts_path, FLAGS.new_tokens, work, cache)
            tok = sum(map(len, rows))
            ratio = (tok / dt) / hf_tps
            ratios += [ratio] if label == "warm" else []
            print(f"{'kunjax ' + mode + ' ' + label:<22}{dt:8.1f} s  {tok / dt:8.1f} tok/s  ({tok} tokens)   "
                  f"{ratio:5.2f}x transformers   rows identical {same_rows(rows, hf_rows)}/{len(rows)}", flush=True)
        print(f"kunjax {mode} warm / transformers, median of {len(ratios)}: {sorted(ratios)[len(ratios) // 2]:.2f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
