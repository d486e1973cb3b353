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

import numpy as np

from kunjax.control.batch import ScheduledStep, StepShape, build_batch
from kunjax.control.group import GroupCore, group_scheduler_config  # noqa: F401
from kunjax.control.ops import STEP, DeviceOp
from kunjax.control.request import RequestOutput
from kunjax.runtime.runner import InFlight, Segment, Stage, host_logprobs, route_ready, run_route


class PipelineGroup(GroupCore):
    """The device half: each member's `stage` object now holds the group's layer ranges
    (kunjax.memory.drop made them so); the host half (scheduler, micro-batches) is GroupCore's."""

    @property
    def stages(self) -> list[Stage]:
        return [m.stage for m in self.members]

    # ---- shapes ----------------------------------------------------------------------------
    def ready(self, shape: StepShape) -> bool:
        return all(st.ready(shape) for st in self.stages)

    # ---- the step-unit interface -----------------------------------------------------------
    def prepare(self, step: ScheduledStep) -> DeviceOp:
        """Micro-batches as data; during a restore one per target member (each with its page
        tables in both spaces), so a layer already restored runs on the member that now holds it.
        A micro-batch whose shape is not compiled for the group runs padded (or, prefill, waits) and
        the cluster hears of it (GroupCore.shaped_parts; the cluster's group_shapes)."""
        mbs, arrays = [], {}
        for j, (member, rows, tables, shape) in enumerate(self.shaped_parts(step, self.shape_ready)):
            for k, v in build_batch(rows, shape, self.page_size).items():
                arrays[f"{j}/{k}"] = v
            if member >= 0:
                for k, v in build_batch(rows, shape, self.page_size, tables).items():
                    arrays[f"{j}@local/{k}"] = v
            mbs.append([shape.rows, shape.query, shape.pages, len(rows), member])
        return DeviceOp(STEP, 0, {"micro_batches": mbs}, arrays)

    def execute(self, op: DeviceOp) -> list[InFlight]:
        out = []
        for j, (R, Q, Pb, n, member) in enumerate(op.args["micro_batches"]):
            shape = StepShape(R, Q, Pb)
            if not self.shape_ready(shape, member):  # a follower that has not compiled a shape yet
                for st in self.stages:
                    st.exes.compile(st.keys(shape))
            batch = {k[len(f"{j}/"):]: v for k, v in op.arrays.items() if k.startswith(f"{j}/")}
            local = {k[len(f"{j}@local/"):]: v for k, v in op.arrays.items() if k.startswith(f"{j}@local/")}
            out.append(run_route(self.segments(member), self.stages[0], self.head_stage, batch, shape, n,
                                 self.page_size, {"local": local}))
        return out

    @property
    def head_stage(self) -> Stage:
        return next(st for st in self.stages if st.head is not None)  # the last stage, or the first when tied

    def segments(self, member: int = -1) -> list[Segment]:
        """Where each layer runs: on its group stage, or, for a layer already restored, on the row's
        member with the member's page tables."""
        if member < 0 or not self.restored:
            return [Segment(st, tuple(st.layer_ids)) for st in self.stages]
        segs: list[Segment] = []
        for l in range(self.plan.stages[-1].stop):
            seg = (Segment(self.stages[member], (l,), 0, "local") if l in self.restored
                   else Segment(self.stages[self.plan.owner_index(l)], (l,)))
            if segs and segs[-1].stage is seg.stage and segs[-1].batch == seg.batch:
                segs[-1] = Segment(seg.stage, segs[-1].layers + (l,), 0, seg.batch)
            else:
                segs.append(seg)
        return segs

    def shape_ready(self, shape: StepShape, member: int = -1) -> bool:
        return route_ready(self.segments(member), self.stages[0], self.head_stage, shape)

    @staticmethod
    def wait(handles: list[InFlight]) -> None:
        for h in handles:
            h.wait()

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
