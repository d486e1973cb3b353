"""A pipeline group: g instances that dropped layers, serving as one step unit over one page space.

Stage s runs on member s's mesh and holds a contiguous layer range, the KV pools of those layers
(every pool has the group's page count) and, for the first stage, the embedding; the head sits on
the last stage (on the first when it is the tied embedding). A page id means the same slots in every
stage's pools, so a request has one page table for the whole group.

A step of the group is split into micro-batches of at most one instance bucket each (the group
schedules for g instances' worth of requests, so each micro-batch reuses the instances' compiled
shapes). Each micro-batch runs stage by stage: the batch is put on each stage's mesh, the hidden
states go device to device between stages, the head stage samples. Every call is asynchronous, so
while stage k works on micro-batch i, stage k-1 already works on micro-batch i+1; the host waits
once per group step, for all micro-batches' tokens.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from kunjax.control.batch import Row, ScheduledStep, StepShape, build_batch
from kunjax.control.ops import STEP, DeviceOp
from kunjax.control.request import RequestOutput
from kunjax.control.scheduler import Scheduler, SchedulerConfig
from kunjax.control.unit import UnitCore
from kunjax.control.plan import GroupPlan
from kunjax.runtime.runner import InFlight, Stage, host_logprobs, launched, pick_shape
from sharding.transfer import move


def group_scheduler_config(base: SchedulerConfig, g: int) -> SchedulerConfig:
    """g instances' worth of requests, with each prefill row capped at one instance chunk, so every
    micro-batch fits the instances' buckets."""
    return SchedulerConfig(max_num_seqs=g * base.max_num_seqs, max_num_batched_tokens=g * base.max_num_batched_tokens,
                           max_prefill_rows=g * base.max_prefill_rows, max_queue=g * base.max_queue,
                           max_chunk_tokens=base.max_chunk_tokens or base.max_num_batched_tokens)


class PipelineGroup(UnitCore):
    def __init__(self, group_id: int, plan: GroupPlan, members: Sequence, scheduler: Scheduler, eos_ids=()):
        """`members`: the LLMEngine instances in stage order; their `stage` objects now hold the
        group's layer ranges (kunjax.memory.drop made them so)."""
        super().__init__(scheduler, eos_ids)
        self.id = group_id
        self.plan = plan
        self.members = list(members)
        self.buckets = self.members[0].buckets
        self.page_size = self.members[0].page_size
        self.state = "grouped"

    @property
    def stages(self) -> list[Stage]:
        return [m.stage for m in self.members]

    @property
    def num_pages(self) -> int:
        return self.plan.num_pages

    # ---- shapes ----------------------------------------------------------------------------
    def ready(self, shape: StepShape) -> bool:
        return all(st.ready(shape) for st in self.stages)

    # Micro-batches a step is split into (at least; each also fits one instance bucket): None = one
    # per stage, so every stage has work while the next works on the previous micro-batch. Where the
    # stages cannot run at the same time (virtual CPU devices sharing cores) 1 avoids re-reading
    # every layer's weights once per micro-batch.
    pipeline_depth: Optional[int] = None

    def micro_batches(self, step: ScheduledStep) -> list[list[Row]]:
        rows = step.rows
        cap = self.buckets.max_prefill_rows if step.prefill else self.buckets.max_rows
        depth = self.pipeline_depth or len(self.members)
        k = min(len(rows), max(-(-len(rows) // cap), depth))
        size = -(-len(rows) // k)
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    # ---- the step-unit interface -----------------------------------------------------------
    def prepare(self, step: ScheduledStep) -> DeviceOp:
        mbs, arrays = [], {}
        for j, rows in enumerate(self.micro_batches(step)):
            needed = self.buckets.needed(rows, step.prefill)
            shape = pick_shape(needed, self.buckets, self.ready)
            if shape is None:
                raise RuntimeError(f"no compiled shape covers {needed} on every stage of group {self.id}; a drop "
                                   f"waits for the covering shapes, so this is a bug")
            for k, v in build_batch(rows, shape, self.page_size).items():
                arrays[f"{j}/{k}"] = v
            mbs.append([shape.rows, shape.query, shape.pages, len(rows)])
        return DeviceOp(STEP, 0, {"micro_batches": mbs}, arrays)

    def execute(self, op: DeviceOp) -> list[InFlight]:
        out = []
        for j, (R, Q, Pb, n) in enumerate(op.args["micro_batches"]):
            shape = StepShape(R, Q, Pb)
            for st in self.stages:  # a follower that has not compiled a shape yet does so here
                if not st.ready(shape):
                    st.exes.compile(st.keys(shape))
            prefix = f"{j}/"
            batch = {k[len(prefix):]: v for k, v in op.arrays.items() if k.startswith(prefix)}
            out.append(self.run_micro_batch(batch, shape, n))
        return out

    def run_micro_batch(self, batch: dict, shape: StepShape, num_rows: int) -> InFlight:
        devs = []
        h = None
        for s, st in enumerate(self.stages):
            dev = st.put(batch)
            devs.append(dev)
            h = st.run_embed(dev, shape) if s == 0 else move(h, st.exes.rep)
            h = st.run_layers(h, dev, shape)
        head = next(i for i, st in enumerate(self.stages) if st.head is not None)
        if head != len(self.stages) - 1:  # tied embedding: the head is the first stage's
            h = move(h, self.stages[head].exes.rep)
        return launched(*self.stages[head].run_head(h, devs[head], shape), num_rows=num_rows)

    def finish(self, step: ScheduledStep, handles: list[InFlight]) -> list[RequestOutput]:
        t = time.perf_counter()
        tokens = np.concatenate([h.result() for h in handles]) if handles else np.zeros((0,), np.int32)
        self.last_wait_s = time.perf_counter() - t
        return self.apply(step, tokens, host_logprobs(handles))

    # ---- status ----------------------------------------------------------------------------
    @property
    def devices(self) -> list:
        return [d for m in self.members for d in m.devices]

    def status(self) -> dict:
        return {"devices": [str(d) for d in self.devices], "tp": self.members[0].tp, **self.host_status()}

    def group_status(self, instance_ids: Sequence[int]) -> dict:
        return {"id": self.id, "instances": list(instance_ids), "state": self.state, "num_pages": self.num_pages,
                "stages": [{"instance": i, "start": st.start, "stop": st.stop, "embed": st.embed, "head": st.head}
                           for i, st in zip(instance_ids, self.plan.stages)],
                **self.host_status()}
