"""Engine speed, measured side by side in one run: kunjax vs Hugging Face transformers on the same
weights, and every kunjax figure against both physical bounds measured in the same run.

    python -m tools.bench_engine                       # ~125M-parameter Llama-shaped model, f32, CPU
    python -m tools.bench_engine --preset=1b --dtype=bfloat16   # on a GPU
    python -m tools.bench_engine --model=smollm2-135m  # a real checkpoint (HF reference loads it too)

Decode tokens/s is measured on steady-state decode steps only (after every prompt is prefilled);
prefill tokens/s on full prefill chunks. Bounds, both measured in this run:
- memory bandwidth: (parameter bytes + KV bytes read) / the bandwidth of a large on-device reduction;
- compute: model FLOPs (2 x tokens x matmul parameters + attention) / the peak GEMM FLOP/s of a large
  matmul in the step's dtype.
"step/bound" divides the measured time by the larger of the two.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

from tools.random_llama import PRESETS, build as build_random_llama

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("preset", "100m", "random-weight model shape: " + ", ".join(PRESETS))
    flags.DEFINE_string("model", None, "benchmark a real checkpoint instead (smollm2-135m, .gguf, HF dir)")
    flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
    flags.DEFINE_list("batch_sizes", ["1", "32"], "decode batch sizes")
    flags.DEFINE_integer("prompt_len", 128, "prompt tokens before decode")
    flags.DEFINE_integer("decode_steps", 32, "timed decode steps")
    flags.DEFINE_integer("prefill_len", 512, "prompt tokens for the prefill measurement")
    flags.DEFINE_integer("prefill_prompts", 4, "prompts in the prefill measurement")
    flags.DEFINE_bool("hf", True, "also measure Hugging Face transformers (torch) on the same weights")


def measure_bandwidth(nbytes: int = 1 << 29) -> float:
    """Bytes/s of a streaming read on the default device (a sum over a large array)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def measure_peak_flops(dtype, n: int = 2048) -> float:
    """FLOP/s of a large n x n matmul in `dtype`, accumulated in f32 as the model's matmuls are."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def matmul_params(cfg) -> int:
    """Parameters every token multiplies by: the layers and the LM head (the embedding lookup is no
    matmul; a tied embedding is the LM head)."""
    return cfg.num_params() - cfg.hidden_size - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def attention_flops(cfg, queries: int, keys: int) -> int:
    return 4 * queries * keys * cfg.num_heads * cfg.head_dim * cfg.num_layers


def kunjax_bench(lm, batch_sizes, prompt_len, decode_steps, prefill_len, prefill_prompts):
    import jax
    import numpy as np

    from kunjax.runtime.engine import EngineConfig, LLMEngine
    from kunjax.runtime.kv_pools import page_bytes
    from kunjax.control.request import SamplingParams
    from kunjax.control.scheduler import SchedulerConfig

    cfg = lm.config
    rng = np.random.default_rng(0)
    max_b = max(batch_sizes)
    max_len = max(prompt_len + decode_steps + 8, prefill_len + 8)
    max_len = 1 << (max_len - 1).bit_length()
    sc = SchedulerConfig(max_num_seqs=max(max_b, prefill_prompts), max_num_batched_tokens=prefill_len,
                         max_prefill_rows=1)
    eng = LLMEngine(lm, EngineConfig(page_size=16, num_pages=(max(max_b, prefill_prompts) + 1) * max_len // 16 + 2,
                                     max_model_len=max_len, scheduler=sc, warmup=True))
    results = {}
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    for b in batch_sizes:
        prompts = [rng.integers(0, cfg.vocab_size, prompt_len).tolist() for _ in range(b)]
        for p in prompts:
            eng.add_request(p, SamplingParams(max_tokens=decode_steps * 2 + 4, ignore_eos=True))
        while any(r.num_pending > 1 for r in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        for _ in range(3):  # warm the decode shape
            eng.step()
        t = time.perf_counter()
        for _ in range(decode_steps):
            eng.step()
        dt = (time.perf_counter() - t) / decode_steps
        ctx = prompt_len + 3 + decode_steps // 2
        kv_read = b * ctx * page_bytes(cfg, 1, lm.params["embed"].dtype)
        flops = 2 * b * matmul_params(cfg) + attention_flops(cfg, b, ctx)
        results[f"decode_b{b}"] = dict(step_s=dt, tok_s=b / dt, bytes=param_bytes + kv_read, flops=flops)
        for r in list(eng.scheduler.running):
            eng.abort(r.request_id)
    prompts = [rng.integers(0, cfg.vocab_size, prefill_len).tolist() for _ in range(prefill_prompts + 1)]
    eng.generate(prompts[:1], SamplingParams(max_tokens=1))  # compile the prefill shape
    t = time.perf_counter()
    eng.generate(prompts[1:], SamplingParams(max_tokens=1))
    dt = time.perf_counter() - t
    flops = prefill_prompts * (2 * prefill_len * matmul_params(cfg) + attention_flops(cfg, prefill_len, prefill_len) // 2)
    results["prefill"] = dict(step_s=dt, tok_s=prefill_len * prefill_prompts / dt, flops=flops,
                              bytes=prefill_prompts * param_bytes)
    return results


def hf_bench(model, batch_sizes, prompt_len, decode_steps, prefill_len, prefill_prompts):
    import torch

    results = {}
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for b in batch_sizes:
            ids = torch.randint(0, vocab, (b, prompt_len), generator=g).to(device)
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
            sync()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            sync()
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1, **kw)
            sync()
            dt = (time.perf_counter() - t - t1) / decode_steps
            results[f"decode_b{b}"] = dict(step_s=dt, tok_s=b / dt)
        ids = torch.randint(0, vocab, (1, prefill_len), generator=g).to(device)
        model(ids)
        sync()
        t = time.perf_counter()
        for _ in range(prefill_prompts):
            model(ids)
        sync()
        results["prefill"] = dict(tok_s=prefill_len * prefill_prompts / (time.perf_counter() - t))
    return results


def main(argv):
    del argv
    import numpy as np
    import torch
    import transformers

    from kunjax.io.loader import host_place, load_model, parse_dtype

    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    tdtype = torch.float32 if FLAGS.dtype == "float32" else torch.bfloat16
    torch.set_num_threads(os.cpu_count() or 1)
    if FLAGS.model:
        lm = load_model(FLAGS.model, dtype=FLAGS.dtype, place=host_place(parse_dtype(FLAGS.dtype)))
        hf_model = None
        if FLAGS.hf and (FLAGS.model.endswith(".gguf") or FLAGS.model == "smollm2-135m"):
            from kunjax.io.checkpoints.gguf import smollm2_path

            path = smollm2_path() if FLAGS.model == "smollm2-135m" else FLAGS.model
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=tdtype)
        elif FLAGS.hf:
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(FLAGS.model, dtype=tdtype)
        name = FLAGS.model
    else:
        hf_model = build_random_llama(FLAGS.preset, FLAGS.dtype)
        tmp = tempfile.mkdtemp()
        hf_model.save_pretrained(tmp)
        lm = load_model(tmp, dtype=FLAGS.dtype, place=host_place(parse_dtype(FLAGS.dtype)))
        name = f"random Llama {FLAGS.preset}"
    if hf_model is not None:
        hf_model.eval()
        if torch.cuda.is_available():
            hf_model = hf_model.cuda()
    import jax

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lm.params))
    bw = measure_bandwidth()
    peak = measure_peak_flops(parse_dtype(FLAGS.dtype))
    ours = kunjax_bench(lm, batch_sizes, FLAGS.prompt_len, FLAGS.decode_steps, FLAGS.prefill_len, FLAGS.prefill_prompts)
    ref = hf_bench(hf_model, batch_sizes, FLAGS.prompt_len, FLAGS.decode_steps, FLAGS.prefill_len,
                   FLAGS.prefill_prompts) if hf_model is not None else {}
    print(f"\nmodel: {name}, {n_params / 1e6:.1f}M parameters, {FLAGS.dtype}, backend {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPU threads")
    print(f"measured memory bandwidth: {bw / 1e9:.1f} GB/s; peak GEMM ({FLAGS.dtype}, 2048^3): {peak / 1e9:.0f} GFLOP/s; "
          f"prompt {FLAGS.prompt_len} tokens, {FLAGS.decode_steps} timed decode steps; prefill "
          f"{FLAGS.prefill_prompts} x {FLAGS.prefill_len} tokens (its 'step' is the whole prefill)\n")
    print(f"{'measure':<12}{'kunjax tok/s':>14}{'HF tok/s':>10}{'kunjax/HF':>11}{'step ms':>10}{'bw bound':>10}"
          f"{'compute':>10}{'step/bound':>12}  closest to")
    for key in [f"decode_b{b}" for b in batch_sizes] + ["prefill"]:
        k = ours[key]
        h = ref.get(key, {}).get("tok_s")
        hs = f"{h:.1f}" if h else "-"
        ratio = f"{k['tok_s'] / h:.2f}" if h else "-"
        mem, comp = k["bytes"] / bw, k["flops"] / peak
        bound = max(mem, comp)
        print(f"{key:<12}{k['tok_s']:>14.1f}{hs:>10}{ratio:>11}{k['step_s'] * 1e3:>10.2f}{mem * 1e3:>10.2f}"
              f"{comp * 1e3:>10.2f}{k['step_s'] / bound:>12.2f}  {'memory' if mem >= comp else 'compute'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
