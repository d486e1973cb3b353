"""Lookahead micro-batch formation for a pipeline group of g stages (plain Python, a pure function).

A group step runs as micro-batches, each passing stage 1..g; with k >= g micro-batches in flight
every stage is busy, but only if the micro-batches cost the same: the stage that gets the dearest
one sets the pace of all. The authors sort prompts longest first and give each to the virtual engine
with the fewest pending prefill tokens, then even out decode counts; that balances tokens, not time:
a decode row over a long context costs far more than one over a short one, and a prefill chunk's
cost grows with the context it attends to. Here every row's cost is the cost model's prediction of
what it adds to a stage's step (its tokens, its decode row, the KV pages it reads), and micro-batches
are balanced on that:

    1. TPOT: decode rows always run (a running stream is never starved); prefill rows join in
       arrival order while the predicted round time, the time between a request's tokens when the
       micro-batches of the step pass the pipeline (filling and draining it: round_time), stays
       within `tpot_slo_ms`. A prefill row that
       does not fit whole is cut to the tokens that fit; the rest is `deferred` (the scheduler
       schedules it again: its computed count advances only by what ran).
    2. Decode rows dearest first onto the micro-batch with the least predicted cost (LPT); then the
       prefill rows, dearest first, each onto the cheapest micro-batch, cut where it would pass the
       mean micro-batch cost so the rest fills the next cheapest one (a request's chunks in distinct
       micro-batches, chunk order following micro-batch order, so each chunk's KV is written on
       every stage before the next chunk reads it).
    3. Single moves from the dearest to the cheapest micro-batch while they lower the maximum.

The step then runs `plan.rows` (the micro-batches concatenated) as its rows: postprocess pairs the
sampled tokens with them in that order, and a request's chunks appear there in token order.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from kunjax.control.batch import Row
from kunjax.control.cost_model import CostModel
from kunjax.control.pages import pages_for


@dataclasses.dataclass(frozen=True)
class MicroBatchPlan:
    batches: tuple[tuple[Row, ...], ...]
    predicted_s: tuple[float, ...]  # each micro-batch's predicted time on one stage
    round_s: float  # predicted time between a request's consecutive tokens
    deferred: tuple[Row, ...]  # prefill left for a later step (the TPOT SLO)

    @property
    def rows(self) -> list[Row]:
        return [r for b in self.batches for r in b]

    @property
    def imbalance(self) -> float:
        """Dearest micro-batch over the mean (1.0 = every stage has equal work)."""
        if not self.predicted_s:
            return 1.0
        return max(self.predicted_s) / (sum(self.predicted_s) / len(self.predicted_s))


def row_cost(cm: CostModel, row: Row, page_size: int, stage_layers: int) -> float:
    """Predicted seconds `row` adds to one stage's step (the fixed part of a step excluded)."""
    ctx = pages_for(row.start + row.n, page_size)
    if row.n == 1:
        return stage_layers * (cm.layer_time(decode_rows=1, context_pages=ctx) - cm.layer_time())
    return stage_layers * (cm.layer_time(prefill_tokens=row.n, context_pages=ctx) - cm.layer_time())


def round_time(batch_costs: Sequence[float], g: int) -> float:
    """Time of one group step, the time between a request's tokens: the host waits for every
    micro-batch of a step before the next (kunjax.memory.group), so each step fills and drains the
    pipeline: the stages pass every micro-batch once, and the last enters stage 1 only after the
    others, then needs g - 1 more stage times (k balanced micro-batches: (k + g - 1) stage-times,
    1.5x their work for k = g = 2)."""
    if not batch_costs:
        return 0.0
    return sum(batch_costs) + (g - 1) * max(batch_costs)


def form_micro_batches(rows: Sequence[Row], g: int, cm: CostModel, page_size: int, stage_layers: int,
                       tpot_slo_ms: Optional[float] = None, num_batches: Optional[int] = None,
                       max_rows: Optional[int] = None, min_chunk: int = 16, cut_rows: bool = True) -> MicroBatchPlan:
    """Micro-batches of equal predicted work for a group of `g` stages (`stage_layers`: the layers of
    its slowest stage); `num_batches` defaults to g; `max_rows` caps a micro-batch's rows.
    `cut_rows` False: a prefill row is never cut: it runs whole in one micro-batch (step 2 places
    whole rows) or, past the TPOT bound, waits whole for a later step (the step's first prefill row
    always runs, so a prompt too long for the bound still progresses). Where a step's shape gathers
    either a short context or the longest one (kunjax's Buckets), the later piece of a cut prompt
    runs at the longest context: the simulator measured group prefill steps with cut rows at 3.1x
    their tokens padded and 2.5x the time of uncut ones."""
    if g < 1:
        raise ValueError(f"g must be >= 1, got {g}")
    if not rows:
        return MicroBatchPlan((), (), 0.0, ())
    k = max(1, min(num_batches or g, len(rows)))
    step_fixed = stage_layers * cm.layer_time() + cm.fixed_time
    order = {id(r.request): i for i, r in enumerate(rows)}  # a request's place in the step
    decode = [r for r in rows if r.n == 1]
    prefill = [r for r in rows if r.n > 1]
    cost = {id(r): row_cost(cm, r, page_size, stage_layers) for r in decode}
    # the step's time once balanced is its work times (k + g - 1) / k (round_time)
    budget = tpot_slo_ms / 1000.0 * k / (k + g - 1) if tpot_slo_ms is not None else float("inf")
    spent = k * step_fixed + sum(cost.values())
    taken, deferred = list(decode), []
    for r in prefill:
        c = row_cost(cm, r, page_size, stage_layers)
        first = not cut_rows and len(taken) == len(decode)  # uncut, the first prefill row runs whatever it costs
        if (deferred or spent + c > budget) and not first:
            n = _tokens_within(cm, r, page_size, stage_layers, budget - spent) if not deferred else 0
            if cut_rows and n >= min(min_chunk, r.n) and n < r.n:
                head, rest = Row(r.request, r.start, n), Row(r.request, r.start + n, r.n - n)
                cost[id(head)] = row_cost(cm, head, page_size, stage_layers)
                taken.append(head)
                spent += cost[id(head)]
                deferred.append(rest)
            else:
                deferred.append(r)
            continue
        cost[id(r)] = c
        taken.append(r)
        spent += c
    batches = _fill(taken, cost, k, cm, page_size, stage_layers, max_rows, min_chunk, cut_rows)
    _improve(batches, cost, max_rows)
    batches = [b for b in batches if b]
    batches.sort(key=lambda b: min((order[id(r.request)], r.start) for r in b))
    _order_chunks(batches)
    batches = [sorted(b, key=lambda r: (order[id(r.request)], r.start)) for b in batches]
    costs = tuple(step_fixed + sum(row_cost(cm, r, page_size, stage_layers) for r in b) for b in batches)
    return MicroBatchPlan(tuple(tuple(b) for b in batches), costs, round_time(costs, g), tuple(deferred))


def _tokens_within(cm: CostModel, r: Row, page_size: int, stage_layers: int, seconds: float) -> int:
    """The most leading tokens of prefill row `r` whose cost fits in `seconds` (bisection)."""
    lo, hi = 0, r.n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if row_cost(cm, Row(r.request, r.start, mid), page_size, stage_layers) <= seconds:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fill(rows: list[Row], cost: dict, k: int, cm: CostModel, page_size: int, stage_layers: int,
          max_rows: Optional[int], min_chunk: int, cut_rows: bool = True) -> list[list[Row]]:
    """Decode rows dearest first onto the cheapest micro-batch (LPT); then prefill rows, dearest
    first, each onto the cheapest micro-batch, cut where it would pass the mean (the target) so that
    the rest fills the next cheapest one; a request's chunks go to distinct micro-batches."""
    batches: list[list[Row]] = [[] for _ in range(k)]
    load = [0.0] * k
    target = sum(cost[id(r)] for r in rows) / k

    def eligible(r: Row) -> list[int]:
        return [j for j in range(len(batches)) if (max_rows is None or len(batches[j]) < max_rows)
                and not any(x.request is r.request for x in batches[j])]

    def place(r: Row, j: int) -> None:
        batches[j].append(r)
        load[j] += cost[id(r)]

    def remember(r: Row) -> Row:
        cost[id(r)] = row_cost(cm, r, page_size, stage_layers)
        return r

    for r in sorted((r for r in rows if r.n == 1), key=lambda r: -cost[id(r)]):
        room = eligible(r) or [len(batches)]
        j = min(room, key=lambda j: (load[j] if j < len(load) else 0.0, j))
        if j == len(batches):  # every micro-batch is full: one more
            batches.append([])
            load.append(0.0)
        place(r, j)
    for r in sorted((r for r in rows if r.n > 1), key=lambda r: -cost[id(r)]):
        while True:
            room = eligible(r)
            if not room:  # every micro-batch is full or has a chunk of this request: one more
                batches.append([])
                load.append(0.0)
                room = [len(batches) - 1]
            j = min(room, key=lambda j: (load[j], j))
            n = r.n
            if cut_rows and len(room) > 1:  # another micro-batch can take the rest
                fit = _tokens_within(cm, r, page_size, stage_layers, target - load[j])
                if min_chunk <= fit < r.n and r.n - fit >= min_chunk:
                    n = fit
            if n == r.n:
                place(r, j)
                break
            place(remember(Row(r.request, r.start, n)), j)
            r = remember(Row(r.request, r.start + n, r.n - n))
    return batches


def _improve(batches: list[list[Row]], cost: dict, max_rows: Optional[int]) -> None:
    """Single-row moves from the dearest to the cheapest micro-batch while the maximum falls."""
    total = [sum(cost[id(r)] for r in b) for b in batches]
    for _ in range(sum(len(b) for b in batches)):
        hi = max(range(len(batches)), key=lambda j: total[j])
        lo = min(range(len(batches)), key=lambda j: total[j])
        if max_rows is not None and len(batches[lo]) >= max_rows:
            return
        movable = [r for r in batches[hi] if not any(x.request is r.request for x in batches[lo])
                   and cost[id(r)] < total[hi] - total[lo]]
        if not movable:
            return
        r = max(movable, key=lambda r: cost[id(r)])  # the largest move that still lowers the maximum
        batches[hi].remove(r)
        batches[lo].append(r)
        total[hi] -= cost[id(r)]
        total[lo] += cost[id(r)]


def _order_chunks(batches: list[list[Row]]) -> None:
    """Chunks of one request in micro-batch order: each micro-batch keeps the number of tokens it
    was given, and the request's tokens are cut again in micro-batch order."""
    where: dict[int, list[tuple[int, int]]] = {}
    for j, b in enumerate(batches):
        for i, r in enumerate(b):
            where.setdefault(id(r.request), []).append((j, i))
    for places in where.values():
        if len(places) < 2:
            continue
        start = min(batches[j][i].start for j, i in places)
        for j, i in sorted(places):
            r = batches[j][i]
            batches[j][i] = Row(r.request, start, r.n)
            start += r.n
