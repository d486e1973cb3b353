"""Lookahead micro-batches: kunserve's cost-balanced formation against the authors' token-balanced one.

    python -m tools.bench_lookahead [--seeds=3]

Each seed: a group step of 40 decode rows over contexts of 8..4000 tokens and 5 prompts of 32..800
tokens, on a cost model whose attention cost grows with the context read (per layer 1 ms + 20 us per
prefill token + 50 us per decode row + 2 us per context page; the head 3 ms + 30 us per row), for
groups of 2 and 4 stages of an 8-layer model. Printed: each formation's slowest micro-batch over
the mean (1.0: every stage has equal work each step) and the slowest micro-batch of kunserve's over
the authors' (the pipeline's pace). The authors' formation as their released code describes it:
prompts longest first onto the micro-batch with the fewest prefill tokens, then decodes dealt to
even out batch sizes (their chunking of long prompts to the size of short ones is not reproduced).
Pure Python, no JAX.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from kunjax.control.batch import Row
from kunjax.control.cost_model import CostModel
from kunjax.control.lookahead import form_micro_batches, row_cost
from kunjax.control.request import Request, SamplingParams

LAYERS = 8
COST = CostModel([0.5e-3, 1e-3, 20e-6, 50e-6, 2e-6, 3e-3, 30e-6])


def authors_lpt(rows, k):
    """Prompts longest first onto the micro-batch with the fewest prefill tokens; decodes dealt to
    the smallest micro-batch."""
    batches, tokens = [[] for _ in range(k)], [0] * k
    for r in sorted((r for r in rows if r.n > 1), key=lambda r: -r.n):
        j = min(range(k), key=lambda j: tokens[j])
        batches[j].append(r)
        tokens[j] += r.n
    for r in (r for r in rows if r.n == 1):
        min(batches, key=len).append(r)
    return batches


def step_rows(seed: int) -> list[Row]:
    rng = np.random.default_rng(seed)

    def req(rid: str, n: int) -> Request:
        return Request(rid, list(range(n)), SamplingParams(max_tokens=64))

    rows = [Row(req(f"d{i}", int(c)), int(c) - 1, 1) for i, c in enumerate(rng.integers(8, 4000, 40))]
    return rows + [Row(req(f"p{i}", int(n)), 0, int(n)) for i, n in enumerate(rng.integers(32, 800, 5))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"{'seed':>4} {'stages':>6} {'kunserve max/mean':>17} {'authors max/mean':>16} {'slowest kunserve/authors':>24}")
    for seed in range(args.seeds):
        rows = step_rows(seed)
        for g in (2, 4):
            sl = LAYERS // g
            plan = form_micro_batches(rows, g, COST, page_size=16, stage_layers=sl)
            fixed = sl * COST.layer_time() + COST.fixed_time
            theirs = [fixed + sum(row_cost(COST, r, 16, sl) for r in b) for b in authors_lpt(rows, g)]
            print(f"{seed:>4} {g:>6} {plan.imbalance:17.3f} {max(theirs) / (sum(theirs) / g):16.3f} "
                  f"{max(plan.predicted_s) / max(theirs):24.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
