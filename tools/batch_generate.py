"""Offline batch generation: JSONL prompts in, JSONL completions out, in input order.

    python -m tools.batch_generate --model=smollm2-135m --input=in.jsonl --output=out.jsonl \\
        --max_new_tokens=64 --temperature=0 --dtype=float32

The default model is the embedded SmolLM2-135M-Instruct (`smollm2-135m`); `--dtype` is float32 or
bfloat16 (default auto: bfloat16 on GPU/TPU, float32 on CPU).

Input rows: {"id": ..., "prompt": "..."} or {"id": ..., "prompt_token_ids": [...]} or
{"id": ..., "messages": [{"role": "user", "content": "..."}]} (rendered with the model's chat
template, with the assistant prompt appended). A row may override max_new_tokens / temperature /
top_p / top_k / seed / stop. Generation ends at the model's end-of-sequence or end-of-turn token
(`<|im_end|>` for SmolLM2), which is not part of the text.
Output rows: id, token_ids (generated only), text, finish_reason. A malformed row gets an output
row with finish_reason "error" and an "error" message naming its line; the other rows still run.

Exit status: 0 done (some rows may be errors); 1 every row was an error; 2 bad arguments (a missing
--input, an --output folder that does not exist, a --model that names nothing loadable), reported in
one line before the model loads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

from absl import app, flags

FLAGS = flags.FLAGS


DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("auto", "float32", "bfloat16")


def define_flags(fv: Optional[flags.FlagValues] = None) -> None:
    """Command-line flags (into `fv`, default the global FLAGS); defined only when run as a program,
    so importing the module for its functions never clashes with another tool's flags."""
    fv = FLAGS if fv is None else fv
    flags.DEFINE_string("model", DEFAULT_MODEL, "tiny | smollm2-135m | HF directory | orbax directory | .gguf file",
                        flag_values=fv)
    flags.DEFINE_string("input", None, "input JSONL file", required=True, flag_values=fv)
    flags.DEFINE_string("output", None, "output JSONL file", required=True, flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per row (rows may override)", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "top-k filter (0 = off)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "base seed; row i uses seed + i unless the row sets its own", flag_values=fv)
    flags.DEFINE_enum("dtype", "auto", list(DTYPES), "weights and KV cache dtype; auto: bfloat16 on GPU/TPU, "
                      "float32 on CPU", flag_values=fv)
    flags.DEFINE_integer("page_size", 16, "tokens per KV page", flag_values=fv)
    flags.DEFINE_integer("num_pages", None, "KV pages (default: sized from the memory budget)", flag_values=fv)
    flags.DEFINE_integer("hbm_bytes", None, "per-device memory budget in bytes (default: 4 GiB on CPU, "
                         "a fraction of the device limit on GPU)", flag_values=fv)
    flags.DEFINE_integer("max_model_len", 2048, "longest prompt + generation", flag_values=fv)
    flags.DEFINE_integer("max_num_seqs", 32, "requests decoded together", flag_values=fv)
    flags.DEFINE_integer("max_num_batched_tokens", 512, "prefill token budget per step", flag_values=fv)
    flags.DEFINE_enum("overload_policy", "recompute", ["recompute", "swap"], "when KV pages run out: recompute "
                      "the latest arrival later, or swap its KV to host memory and back", flag_values=fv)
    flags.DEFINE_integer("swap_space_bytes", 1 << 30, "host memory for swapped-out KV (--overload_policy=swap)",
                         flag_values=fv)
    flags.DEFINE_bool("progress", True, "progress bar on stderr", flag_values=fv)


CPU_DEFAULT_BUDGET = 4 << 30


def parse_row(line_no: int, line: str, model, defaults, index: int):
    """Returns (id, prompt ids, SamplingParams) or raises ValueError naming the line. `model` is the
    LoadedModel (its tokenizer and chat template): rows are tokenized before the engine exists, so
    the KV cache is sized to what they need (`check_row` then validates against the engine)."""
    from kunjax.control.request import SamplingParams
    from kunjax.text.chat import encode_chat, encode_prompt

    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"line {line_no}: expected a JSON object")
    rid = row.get("id", line_no)
    forms = [k for k in ("prompt", "prompt_token_ids", "messages") if k in row]
    if len(forms) != 1:
        raise ValueError(f"line {line_no}: give exactly one of prompt, prompt_token_ids, messages (got {forms or 'none'})")
    try:
        if "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise ValueError("prompt must be a non-empty string")
            ids = encode_prompt(model.tokenizer, row["prompt"])
        elif "prompt_token_ids" in row:
            ids = row["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
        else:
            ids = encode_chat(model.tokenizer, model.chat_template, row["messages"])
        params = SamplingParams(
            max_tokens=int(row.get("max_new_tokens", defaults.max_new_tokens)),
            temperature=float(row.get("temperature", defaults.temperature)),
            top_p=float(row.get("top_p", defaults.top_p)),
            top_k=int(row.get("top_k", defaults.top_k)),
            seed=int(row.get("seed", defaults.seed + index)),
            stop=tuple(row.get("stop", ())),
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"line {line_no}: {e}") from None
    return rid, ids, params


def check_row(line_no: int, engine, ids, params) -> None:
    """What only the engine can say about a parsed row (vocabulary, context, KV pages); raises
    ValueError naming the line."""
    try:
        engine.validate(ids, params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"line {line_no}: {e}") from None


def run(model: str, input_path: str, output_path: str, defaults: Any, engine_config=None,
        progress: bool = True, log=sys.stderr) -> dict:
    from tqdm import tqdm

    from kunjax.runtime import compile_stats
    from kunjax.runtime.engine import EngineConfig, LLMEngine, offline_kv_pages, offline_scheduler_config
    from kunjax.io.loader import host_place, load_model, parse_dtype
    from kunjax.control.scheduler import SchedulerConfig

    compiles_before = compile_stats.compile_count()  # the summary reports what this run compiled
    t_load = time.perf_counter()
    lm = load_model(model, dtype=defaults.dtype, place=host_place(parse_dtype(defaults.dtype)))
    with open(input_path) as f:
        lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    parsed: list = []  # per line: (id, ids, params) or the ValueError naming it
    for index, (line_no, line) in enumerate(lines):
        try:
            parsed.append(parse_row(line_no, line, lm, defaults, index))
        except ValueError as e:
            parsed.append(e)
    if engine_config is None:
        import jax

        hbm = defaults.hbm_bytes or (CPU_DEFAULT_BUDGET if jax.default_backend() == "cpu" else None)
        # The KV cache holds what the rows need at once (at most max_num_seqs of them), not the
        # whole budget: the pools are written when made.
        need = [min(len(p[1]) + max(p[2].max_tokens, 1), defaults.max_model_len) for p in parsed if isinstance(p, tuple)]
        engine_config = EngineConfig(page_size=defaults.page_size, num_pages=defaults.num_pages, hbm_bytes=hbm,
                                     max_pages=offline_kv_pages(need, defaults.max_num_seqs, defaults.page_size),
                                     max_model_len=defaults.max_model_len, compile_on_demand=True,
                                     overload_policy=getattr(defaults, "overload_policy", "recompute"),
                                     swap_space_bytes=getattr(defaults, "swap_space_bytes", 1 << 30),
                                     scheduler=offline_scheduler_config(SchedulerConfig(
                                         max_num_seqs=defaults.max_num_seqs,
                                         max_num_batched_tokens=defaults.max_num_batched_tokens)))
    engine = LLMEngine(lm, engine_config)
    load_s = time.perf_counter() - t_load

    results: list[Optional[dict]] = []
    by_request: dict[str, int] = {}
    errors = 0
    for index, ((line_no, line), p) in enumerate(zip(lines, parsed)):
        try:
            if isinstance(p, ValueError):
                raise p
            rid, ids, params = p
            check_row(line_no, engine, ids, params)
        except ValueError as e:
            errors += 1
            print(f"error: {e}", file=log)
            rid = _safe_id(line, line_no)
            results.append({"id": rid, "token_ids": [], "text": "", "finish_reason": "error", "error": str(e)})
            continue
        req = engine.add_request(ids, params, request_id=f"row-{index}")
        by_request[req.request_id] = len(results)
        results.append({"id": rid, "prompt_tokens": len(ids)})

    t0 = time.perf_counter()
    generated = 0
    bar = tqdm(total=len(by_request), desc="generate", unit="req", file=log, disable=not progress)
    while engine.has_unfinished():
        for out in engine.step():
            generated += len(out.new_token_ids)
            if out.finished:
                row = results[by_request[out.request_id]]
                row.update(token_ids=out.token_ids, text=out.text, finish_reason=out.finish_reason)
                bar.update(1)
                bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    elapsed = time.perf_counter() - t0
    with open(output_path, "w") as f:
        for row in results:
            row.pop("prompt_tokens", None)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {"requests": len(lines), "errors": errors, "generated_tokens": generated,
               "seconds": round(elapsed, 3), "tokens_per_s": round(generated / elapsed, 1) if elapsed else 0.0,
               "load_seconds": round(load_s, 2), "compilations": compile_stats.compile_count() - compiles_before}
    print(f"done: {summary['requests']} requests ({errors} errors), {generated} tokens in {elapsed:.2f}s "
          f"= {summary['tokens_per_s']} tokens/s (model load {load_s:.1f}s, {summary['compilations']} XLA "
          f"compilations: 0 when every shape came from the executable store)", file=log)
    return summary


def _safe_id(line: str, line_no: int):
    try:
        row = json.loads(line)
        if isinstance(row, dict) and "id" in row:
            return row["id"]
    except json.JSONDecodeError:
        pass
    return line_no


class UsageError(ValueError):
    """A bad flag value, found before anything slow; `main` prints it as one line and exits 2."""


def check_args(model: str, input_path: str, output_path: str) -> None:
    """What can be checked before the model loads: the input file is readable, the output's folder
    exists, the model spec names something loadable. Raises UsageError (one line)."""
    from kunjax.io.model_spec import ModelSpecError, check_model_spec

    if not os.path.isfile(input_path):
        what = "is a directory" if os.path.isdir(input_path) else "no such file"
        raise UsageError(f"--input={input_path}: {what}")
    if not os.access(input_path, os.R_OK):
        raise UsageError(f"--input={input_path}: not readable")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    if os.path.isdir(output_path):
        raise UsageError(f"--output={output_path}: is a directory")
    if not os.path.isdir(out_dir):
        raise UsageError(f"--output={output_path}: folder {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"--output={output_path}: folder {out_dir} is not writable")
    try:
        check_model_spec(model)
    except ModelSpecError as e:
        raise UsageError(str(e)) from None


def main(argv):
    del argv
    try:
        check_args(FLAGS.model, FLAGS.input, FLAGS.output)
    except UsageError as e:
        print(f"batch_generate: error: {e}", file=sys.stderr)
        return 2
    from kunjax.runtime.jax_setup import configure_jax

    configure_jax()
    summary = run(FLAGS.model, FLAGS.input, FLAGS.output, FLAGS, progress=FLAGS.progress)
    return 1 if summary["errors"] == summary["requests"] and summary["requests"] else 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
