"""The host half of a pipeline group (plain Python, no JAX): its scheduler, its micro-batches, the
members and plan it was made from, and its status.

A pipeline group is g instances that dropped layers and serve as one step unit over one page space
(kunjax/memory/group.py runs it on devices; kunjax.sim runs it on a cost model). Everything that
decides rather than executes lives here, so both run the very same decisions: the group schedules
for g instances' worth of requests with each prefill row capped at one instance chunk (every
micro-batch fits the instances' buckets), and a step is split into micro-batches of at most one
instance bucket each, by predicted cost when there is a cost model (kunjax.control.lookahead),
during a restore one per target member (kunjax.control.transition.RestoreRouting).
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

from kunjax.control.batch import Row, ScheduledStep, StepShape, pick_shape
from kunjax.control.pages import PageAllocator
from kunjax.control.plan import GroupPlan
from kunjax.control.scheduler import Scheduler, SchedulerConfig
from kunjax.control.unit import UnitCore


def group_scheduler_config(base: SchedulerConfig, g: int) -> SchedulerConfig:
    """g instances' worth of requests, with each prefill row capped at one instance chunk, so every
    micro-batch fits the instances' buckets."""
    return SchedulerConfig(max_num_seqs=g * base.max_num_seqs, max_num_batched_tokens=g * base.max_num_batched_tokens,
                           max_prefill_rows=g * base.max_prefill_rows, max_queue=g * base.max_queue,
                           max_chunk_tokens=base.max_chunk_tokens or base.max_num_batched_tokens)


def group_scheduler(members: Sequence, gp: GroupPlan) -> Scheduler:
    """The scheduler of the group `members` (instances in stage order) form under plan `gp`: their
    policy and clock, the group's page space."""
    m0 = members[0]
    return Scheduler(group_scheduler_config(m0.config.scheduler, len(members)), PageAllocator(gp.num_pages),
                     m0.page_size, m0.max_model_len, m0.scheduler.policy, clock=m0.scheduler.clock,
                     event_clock=m0.scheduler.events.clock)


class GroupCore(UnitCore):
    """What every pipeline group holds on the host: its id, plan, members, scheduler, restore state."""

    # Micro-batches a step is split into (at least; each also fits one instance bucket): None = one
    # per stage, so every stage has work while the next works on the previous micro-batch. Where the
    # stages cannot run at the same time (virtual CPU devices sharing cores) 1 avoids re-reading
    # every layer's weights once per micro-batch.
    pipeline_depth: Optional[int] = None

    # Lookahead micro-batches (kunjax.control.lookahead): with a cost model, a step's rows are split so
    # every stage gets equal predicted work and the time between tokens stays within `tpot_slo_ms`
    # (prefill beyond it is deferred to a later step); without one, rows are split evenly by count.
    cost_model = None
    tpot_slo_ms: Optional[float] = None
    # Whether the lookahead may cut a prompt's chunk across micro-batches to even them out. Off: the
    # later piece starts past position 0, so it runs at the longest gathered context (a prefill
    # shape gathers its query bucket's pages or the most a sequence has): the simulator measured group
    # prefill steps with cut rows at 3.1x their tokens padded and 2.5x the time of uncut ones.
    cut_prefill_rows = False
    # With shapes compiled on demand (the cluster's group_shapes "on_demand"), a prefill micro-batch
    # whose cheapest ready shape costs more than this many times its own waits for a later step
    # (shaped_parts) instead of running padded: a prompt of two rows padded to the covering
    # (16 x 4,096) shape computes 32-64x its tokens, seconds for a 70B model, while every decode of
    # the group waits behind it.
    max_prefill_padding = 4.0
    defer_padded_prefill = False

    def __init__(self, group_id: int, plan: GroupPlan, members: Sequence, scheduler: Scheduler, eos_ids=()):
        """`members`: the instances in stage order (they hold the group's layer ranges now)."""
        super().__init__(scheduler, eos_ids)
        self.id = group_id
        self.plan = plan
        self.members = list(members)
        self.buckets = self.members[0].buckets
        self.page_size = self.members[0].page_size
        self.state = "grouped"
        # While a restore runs (kunjax.control.transition): `routing` (controller) knows which member
        # each request goes to and its page table there; `restored` (every process) the layers that
        # are back on the members: those run on the row's member, the others on their group stage.
        self.routing = None
        self.restored: set[int] = set()
        self.restoring: Optional[dict] = None  # the device side of a restore under way
        # Called with (group, needed shape, shape run) when a micro-batch runs padded because the
        # shape it needs is not compiled for this group's pools (the cluster compiles shapes in the
        # background from what it hears: configure).
        self.on_padded = None

    @property
    def num_pages(self) -> int:
        return self.plan.num_pages

    def schedule(self) -> Optional[ScheduledStep]:
        """The group's next step. While a restore runs nothing new is admitted (the paper's first
        restore step: stop admitting into the extension pages): a request admitted then would need
        room on a member page space the restore has already handed out, which can be too small
        (the simulator found a restore failing that way, OutOfPages in RestoreRouting.table); queued
        requests move to the members when the group splits. Requests preempted meanwhile go back to
        the head of the queue, as always."""
        if self.routing is None:
            return super().schedule()
        s = self.scheduler
        held, s.waiting = s.waiting, collections.deque()
        try:
            return super().schedule()
        finally:
            s.waiting.extend(held)

    def micro_batches(self, step: ScheduledStep) -> list[list[Row]]:
        rows = step.rows
        cap = self.buckets.max_prefill_rows if step.prefill else self.buckets.max_rows
        depth = self.pipeline_depth or len(self.members)
        k = min(len(rows), max(-(-len(rows) // cap), depth))
        if self.cost_model is not None and k > 1:
            from kunjax.control.lookahead import form_micro_batches

            plan = form_micro_batches(rows, len(self.members), self.cost_model, self.page_size,
                                      max(st.num_layers for st in self.plan.stages), self.tpot_slo_ms,
                                      num_batches=k, max_rows=cap, cut_rows=self.cut_prefill_rows)
            if plan.batches and all(len(b) <= cap for b in plan.batches):
                return [list(b) for b in plan.batches]
        size = -(-len(rows) // k)
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    def parts(self, step: ScheduledStep) -> list[tuple[int, list[Row], Optional[dict]]]:
        """The step's micro-batches as (target member, rows, member page tables): member -1 and no
        tables outside a restore; during one, one micro-batch per target member with each row's
        page table there (grown as its group one grows). `step.rows` is put in their order (the
        order `finish` reads the tokens in)."""
        parts = (self.routing.partition(step.rows) if self.routing is not None
                 else [(-1, rows) for rows in self.micro_batches(step)])
        step.rows = [r for _, rows in parts for r in rows]
        return [(j, rows, self.routing.tables_of(rows) if j >= 0 else None) for j, rows in parts]

    def shaped_parts(self, step: ScheduledStep, ready) -> list[tuple[int, list[Row], Optional[dict], StepShape]]:
        """`parts` with the shape each micro-batch runs at (`ready(shape, member)`: compiled for it).
        With `defer_padded_prefill`, prefill micro-batches padded past `max_prefill_padding` leave
        the step (their rows stay scheduled: the scheduler gives them to a later step, by when their
        shape may be compiled), unless none would run, then the cheapest of them runs; decodes never
        wait, nor does anything during a restore or when a request's rows span micro-batches.
        `step.rows` follows what runs."""
        out = []
        for member, rows, tables in self.parts(step):
            needed = self.buckets.needed(rows, step.prefill)
            shape = self.pick(needed, lambda sh, m=member: ready(sh, m))
            if shape is None:
                raise RuntimeError(f"no compiled shape covers {needed} on every stage of group {self.id}; a drop "
                                   f"waits for the covering shapes, so this is a bug")
            out.append((member, rows, tables, shape, needed))
        if step.prefill and self.defer_padded_prefill and self.routing is None and len(out) > 1:
            ids = [r.request.request_id for p in out for r in p[1]]
            run = [p for p in out if p[3].cost() <= self.max_prefill_padding * p[4].cost()]
            if len(set(ids)) == len(ids) and len(run) < len(out):
                run = run or [min(out, key=lambda p: p[3].cost())]
                out = [p for p in out if any(p is q for q in run)]
                step.rows = [r for p in out for r in p[1]]
        return [p[:4] for p in out]

    def pick(self, needed: StepShape, ready) -> Optional[StepShape]:
        """The cheapest ready shape covering `needed` (batch.pick_shape). When that is not `needed`
        itself, the step runs padded: `on_padded` hears of the shape it wanted, so the cluster can
        compile it (or one covering it and others) in the background for later steps (a group's
        pools start with the pool ladder's first shapes only, and padding a decode to the covering
        shape costs its largest batch over its longest context)."""
        shape = pick_shape(needed, self.buckets, ready)
        if shape != needed and self.on_padded is not None:
            self.on_padded(self, needed, shape)
        return shape

    def configure(self, cluster) -> None:
        """Takes the cluster's cost model and TPOT bound (lookahead micro-batches) where it has them,
        and its wish list of group shapes (`want_group_shape`: compiled on demand)."""
        self.cost_model = getattr(cluster, "cost_model", None)
        self.tpot_slo_ms = getattr(cluster, "tpot_slo_ms", None)
        self.on_padded = getattr(cluster, "want_group_shape", None)
        self.defer_padded_prefill = getattr(cluster, "group_shapes", "first") == "on_demand"

    def group_status(self, instance_ids: Sequence[int]) -> dict:
        return {"id": self.id, "instances": list(instance_ids), "state": self.state, "num_pages": self.num_pages,
                "stages": [{"instance": i, "start": st.start, "stop": st.stop, "embed": st.embed, "head": st.head}
                           for i, st in zip(instance_ids, self.plan.stages)],
                **self.host_status()}
