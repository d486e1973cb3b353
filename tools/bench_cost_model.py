"""The cost model's error on the steps an instance then runs: calibrate at start-up, serve, compare.

    python -m tools.bench_cost_model                          # the tiny model, every bucket compiled
    python -m tools.bench_cost_model --model=smollm2-135m --requests=24

One instance on one device; `kunjax.runtime.calibrate` times null steps of every compiled shape and
fits the cost model; then random prompts (16..200 tokens, 8..64 new tokens) run to completion, and
every step's measured seconds (execute until its tokens are on the host; the host's bookkeeping
after it is not part of the model) are compared with the model's
prediction for the shape it ran at. Printed: the coefficients, the bandwidths, and the mean absolute
percentage error over prefill steps, decode steps and all (CostModel.observe).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from kunjax.runtime.jax_setup import configure_jax

    configure_jax(None)
    import jax

    from kunjax.control.batch import StepShape
    from kunjax.control.cost_model import FEATURES, CostModel
    from kunjax.control.request import SamplingParams
    from kunjax.control.scheduler import SchedulerConfig
    from kunjax.io.loader import load_model
    from kunjax.runtime.calibrate import calibrate
    from kunjax.runtime.engine import EngineConfig, LLMEngine

    model = load_model(args.model, "float32")
    eng = LLMEngine(model, EngineConfig(page_size=16, num_pages=512, max_model_len=512, warmup=True,
                                        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256,
                                                                  max_prefill_rows=4)), device=jax.devices()[0])
    t = time.perf_counter()
    cm = calibrate(eng)
    print(f"calibrated in {time.perf_counter() - t:.1f}s on {len(eng.buckets.all_shapes())} shapes")
    print("coefficients (s):", {k: f"{v:.3g}" for k, v in zip(FEATURES, cm.coef)})
    print("bandwidths (bytes/s):", {k: f"{v:.3g}" for k, v in cm.bandwidths.items()})

    rng = np.random.default_rng(args.seed)
    for i in range(args.requests):
        eng.add_request(rng.integers(1, 200, int(rng.integers(16, 201))).tolist(),
                        SamplingParams(max_tokens=int(rng.integers(8, 65)), ignore_eos=True))
    layers = len(eng.stage.layer_ids)
    by_kind = {"prefill": CostModel(cm.coef), "decode": CostModel(cm.coef)}
    while eng.has_unfinished():
        step = eng.schedule()
        if step is None:
            continue
        op = eng.prepare(step)
        t = time.perf_counter()
        handle = eng.execute(op)
        handle.result()
        actual = time.perf_counter() - t  # the device's part: the host's bookkeeping is not the model's
        eng.finish(step, handle)
        pred = cm.shape_time(StepShape(*op.args["shape"]), layers)
        cm.observe(pred, actual)
        by_kind["prefill" if step.prefill else "decode"].observe(pred, actual)
    for kind, m in by_kind.items():
        print(f"{kind:>8}: mean abs error {m.error():5.1f} % over {m.error_stats()['observed_steps']} steps")
    print(f"{'all':>8}: mean abs error {cm.error():5.1f} % over {cm.error_stats()['observed_steps']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
