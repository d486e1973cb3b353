"""Simulated step units: an instance and a pipeline group whose device half advances simulated time
by a device model (kunjax.sim.hardware) instead of running JAX.

Their host half is the real one: `SimInstance` is a UnitCore (the real scheduler, page allocator,
overload policy, request table), `SimGroup` a GroupCore (the real group scheduler, micro-batches,
lookahead, restore routing). Only `execute` differs: it computes when the step would land, from the
padded shape the real engine would run (`Buckets.needed`: every shape compiled, as once a server's
background compiler is done) and the rows' contexts, and returns that time as the handle; the
simulated cluster (kunjax.sim.cluster) completes the step when its clock gets there. A unit's device
is busy until its last step (or a transition piece, a migration copy) ends: `free_at`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from kunjax.control.batch import Buckets, ScheduledStep, StepShape, pick_shape
from kunjax.control.group import GroupCore
from kunjax.control.ops import STEP, DeviceOp
from kunjax.control.overload import OverloadPolicy
from kunjax.control.pages import PageAllocator, pages_for
from kunjax.control.request import RequestOutput
from kunjax.control.scheduler import Scheduler, SchedulerConfig
from kunjax.control.unit import UnitCore
from kunjax.model.config import ModelConfig
from kunjax.sim.hardware import DeviceModel

TOKEN = 11  # the token every simulated step samples (requests run with ignore_eos to their length)


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    """What the control plane reads of an instance's configuration (LLMEngine's EngineConfig)."""

    scheduler: SchedulerConfig
    page_size: int
    max_model_len: int
    swap_space_bytes: int = 1 << 30
    warmup: bool = True  # every shape compiled (the launcher's background compiler done); else only first_shapes
    # What a pipeline group's pools have compiled (MechanismCluster.group_shapes, the launcher's
    # --group_shapes): the pool ladder's first shapes ("first"), those and each shape the control plane
    # asks for, `group_compile_s` after each member's compiler gets to it ("on_demand"), or every
    # shape from the start ("all").
    group_shapes: str = "first"
    group_compile_s: float = 2.0
    paged_attention: bool = False  # what-if: attention costs each row's own context (a paged kernel), not the gather's


@dataclasses.dataclass(frozen=True)
class SimHandle:
    """A step in flight: when it starts, its seconds run alone, and when it lands (simulated
    seconds); `end` None while it shares the host's cores with other steps (SimCluster.host), which
    decides its landing as the steps around it start and end."""

    start: float
    seconds: float
    end: Optional[float]


def shape_of(op_args: dict) -> StepShape:
    return StepShape(*op_args["shape"])


def real_rows(config: InstanceConfig, op_args: dict):
    """(query tokens, context tokens) of each row when attention is costed per row, else None."""
    return [(n, s + n) for s, n in op_args["rows"]] if config.paged_attention else None


class SimInstance(UnitCore):
    def __init__(self, index: int, cfg: ModelConfig, device: DeviceModel, config: InstanceConfig, num_pages: int,
                 policy: OverloadPolicy, clock, cluster=None):
        self.index = index
        self.cfg = cfg
        self.device = device
        self.config = config
        self.tp = device.tp
        self.page_size = config.page_size
        self.max_model_len = config.max_model_len
        sc = config.scheduler
        self.buckets = Buckets(max_rows=sc.max_num_seqs, max_prefill_rows=sc.max_prefill_rows,
                               max_chunk=sc.max_num_batched_tokens,
                               max_pages_per_seq=pages_for(self.max_model_len, self.page_size), page_size=self.page_size)
        # The shapes compiled: every one once the launcher's background compiler is done (warmup), else
        # those the launcher compiles before serving (first_shapes; a group's pools get only these).
        self.compiled = set(self.buckets.all_shapes() if config.warmup else self.buckets.first_shapes())
        self.group_compiled = set(self.buckets.all_shapes() if config.group_shapes == "all"
                                  else self.buckets.first_shapes())
        self.num_pages = num_pages  # pages of its pools now (a group's count while it is a member)
        self.kept_layers = (0, cfg.num_layers)  # the layers it holds (a member of a group: its stage's)
        super().__init__(Scheduler(sc, PageAllocator(num_pages), self.page_size, self.max_model_len, policy,
                                   clock=clock), ())
        self.clock = clock
        self.cluster = cluster  # the controller: its pieces hold every dispatch (SimCluster.controller_free_at)
        self.free_at = 0.0
        self.compiler_free_at = 0.0  # its group compiler (on-demand group shapes): when its queue is done
        self.group_ready_at: dict = {}  # (group pool pages, shape) -> when its layer executable is compiled here
        self.route = None  # set while a drop forms its group (UnitView.transitioning)
        self.kv_page_bytes = device.page_layer_bytes(self.page_size) * cfg.num_layers * self.tp  # all devices
        if policy.name == "swap":
            self.scheduler.swap_capacity_pages = config.swap_space_bytes // self.kv_page_bytes
        self.swapped_out_bytes = 0
        self.swapped_in_bytes = 0
        self.busy_s = 0.0

    # ---- the step-unit interface -----------------------------------------------------------
    def prepare(self, step: ScheduledStep) -> DeviceOp:
        shape = pick_shape(self.buckets.needed(step.rows, step.prefill), self.buckets, self.compiled.__contains__)
        args = {"shape": [shape.rows, shape.query, shape.pages], "num_rows": len(step.rows),
                "rows": [(r.start, r.n) for r in step.rows]}
        moves = self.scheduler.take_moves()
        if moves:
            args["moves"] = moves
        return DeviceOp(STEP, 0, args)

    def start_time(self) -> float:
        c = self.cluster
        return max(self.clock(), self.free_at, c.controller_free_at if c is not None else 0.0)

    def execute(self, op: DeviceOp) -> SimHandle:
        t = self.device.step_time(shape_of(op.args), self.page_size, rows=real_rows(self.config, op.args))
        t += self._moves_time(op.args.get("moves", ()))
        return self.occupy(t)

    def occupy(self, seconds: float) -> SimHandle:
        """The device works `seconds` (alone) from when it is next free (a step, a copy). On shared
        cores the cluster's host lands it and then sets `free_at`."""
        start = self.start_time()
        self.busy_s += seconds
        if self.cluster is not None and self.cluster.host is not None:
            self.free_at = start
            return SimHandle(start, seconds, None)
        self.free_at = start + seconds
        return SimHandle(start, seconds, self.free_at)

    def _moves_time(self, moves) -> float:
        """Swaps the scheduler decided, carried out before the step: pages over the host link."""
        out = inn = 0
        for m in moves:
            if m["kind"] == "swap_out":
                out += len(m["pages"]) * self.kv_page_bytes
            elif m["kind"] == "swap_in":
                inn += len(m["pages"]) * self.kv_page_bytes
        self.swapped_out_bytes += out
        self.swapped_in_bytes += inn
        # every device of the instance moves its own shard over its own link
        return self.device.transfer_time((out + inn) / self.tp, "host")

    def finish(self, step: ScheduledStep, handle: SimHandle) -> list[RequestOutput]:
        return self.apply(step, [TOKEN] * len(step.rows))

    def host_status(self) -> dict:
        return {**super().host_status(), "swapped_out_bytes": self.swapped_out_bytes,
                "swapped_in_bytes": self.swapped_in_bytes}

    def status(self) -> dict:
        return {"tp": self.tp, **self.host_status()}

    # ---- memory ----------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Weights per device it holds now (the timeline's parameter bytes)."""
        d = self.device
        a, b = self.kept_layers
        full = (a, b) == (0, self.cfg.num_layers)
        return (b - a) * d.layer_bytes() + (d.embed_bytes() + d.head_bytes() if full else self.embed_head_kept)

    embed_head_kept = 0  # a member of a group: the embedding / head bytes its stage keeps


class SimGroup(GroupCore):
    """A pipeline group of SimInstances: each micro-batch runs stage after stage; with
    `overlap_stages` stage s works on micro-batch m while stage s+1 works on m-1."""

    def __init__(self, group_id: int, plan, members, scheduler: Scheduler, overlap_stages: bool = True):
        super().__init__(group_id, plan, members, scheduler, ())
        self.overlap = overlap_stages
        self.free_at = max(m.free_at for m in members)
        self.clock = members[0].clock
        self.cluster = members[0].cluster
        self.device = members[0].device
        self.tp = members[0].tp
        self.busy_s = 0.0

    start_time = SimInstance.start_time
    occupy = SimInstance.occupy

    def prepare(self, step: ScheduledStep) -> DeviceOp:
        mbs = []
        for member, rows, _tables, shape in self.shaped_parts(step, lambda sh, _m: self.ready(sh)):
            mbs.append({"shape": [shape.rows, shape.query, shape.pages], "rows": [(r.start, r.n) for r in rows],
                        "member": member})
        return DeviceOp(STEP, 0, {"micro_batches": mbs})

    def ready(self, shape: StepShape) -> bool:
        """Compiled for this group's pools: the ladder's shapes, or one compiled on demand by now."""
        return self.cluster.group_shape_ready(self.plan, shape)

    def stage_times(self, mb: dict) -> list[float]:
        """Seconds of one micro-batch on each stage (its layers; the head where the stage holds it)."""
        rows = real_rows(self.members[0].config, mb)
        return [self.device.step_time(shape_of(mb), self.page_size, layers=st.num_layers, head=st.head,
                                      overhead=False, rows=rows) for st in self.plan.stages]

    def hop_time(self, mb: dict) -> float:
        """Hidden states of one micro-batch from one stage to the next."""
        shape = shape_of(mb)
        nbytes = shape.rows * shape.query * self.device.cfg.hidden_size * self.device.dtype_bytes / self.tp
        return self.device.transfer_time(nbytes, "d2d")

    def execute(self, op: DeviceOp) -> SimHandle:
        mbs = op.args["micro_batches"]
        g = len(self.plan.stages)
        done = [0.0] * g  # when each stage finished its last micro-batch
        total = 0.0
        for mb in mbs:
            ts, hop = self.stage_times(mb), self.hop_time(mb)
            if self.overlap:
                ready = 0.0
                for s in range(g):
                    done[s] = max(done[s], ready) + ts[s]
                    ready = done[s] + hop
                total = done[-1]
            else:
                total += sum(ts) + hop * (g - 1)
        return self.occupy(total + self.device.eff.step_overhead_s)

    def finish(self, step: ScheduledStep, handle: SimHandle) -> list[RequestOutput]:
        return self.apply(step, [TOKEN] * len(step.rows))

    def status(self) -> dict:
        return {"tp": self.tp, **self.host_status()}


def instance_pages(device: DeviceModel, config: InstanceConfig, budget: int, reserve: int,
                   explicit: Optional[int] = None) -> int:
    """KV pages of an instance: `explicit`, or what the budget leaves after the weights and the
    activation reserve (capped at max_num_seqs full-length sequences, as LLMEngine sizes them)."""
    useful = config.scheduler.max_num_seqs * pages_for(config.max_model_len, config.page_size) + 1
    if explicit:
        return explicit
    weights = device.cfg.num_layers * device.layer_bytes() + device.embed_bytes() + device.head_bytes()
    pages = (budget - weights - reserve) // device.page_layer_bytes(config.page_size) // device.cfg.num_layers
    if pages < 2:
        raise ValueError(f"the model's weights ({weights / 2**30:.1f} GiB per device) and activation reserve "
                         f"({reserve / 2**30:.1f} GiB) leave no room for KV pages in {budget / 2**30:.1f} GiB: "
                         f"raise --tp or pick a larger --gpu")
    return int(min(pages, useful))
