"""Parameter drop: g instances become one pipeline group, and their freed weights become KV pages.

Three parts, so that a multi-host cluster runs the device part identically on every process:

1. `prepare_drop` (controller, host only): from the members' running requests, the page moves of the
   KV exchange. The first member's requests keep their page ids; every other member's requests get
   fresh ids in the group's page space. Waiting requests hold no pages and simply move.
2. `execute_drop` (every process, a logged device operation): each member deletes the weights it
   gives up (real frees: the arrays are deleted now); then layer by layer, in the plan's interleaved
   order, the layer's owner allocates the group pools of that layer, every member's pages of that
   layer move into them (only pages that hold data, in chunks, device to device), and every member
   deletes its old pools of that layer. The freed room is what the group pools are made of, and at
   no moment are a pool and the room that replaces it both alive beyond the one layer in flight
   (kunjax.control.plan simulates that peak; the report carries the measured one). The member
   instances' stages now hold the group's layer ranges, and a PipelineGroup unit replaces the
   members in the cluster's unit list.
3. `adopt_after_drop` (controller): the requests move into the group's scheduler with their new page
   tables; a request whose KV could not be moved (a failed copy) finishes with an error, every
   other one keeps running (no request is restarted or recomputed).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import jax
import numpy as np

from kunjax.control.ops import DeviceOp
from kunjax.control.pages import PageAllocator
from kunjax.control.request import FinishReason, RequestOutput
from kunjax.control.scheduler import Scheduler
from kunjax.memory import measure
from kunjax.memory.exchange import ExchangeStats, copy_pages, delete_arrays
from kunjax.memory.group import PipelineGroup, group_scheduler_config
from kunjax.control.plan import DropPlan, GroupPlan
from kunjax.runtime import compile_stats

log = logging.getLogger(__name__)

DROP = "drop"


class DropError(ValueError):
    """The drop cannot be applied as asked (names why); nothing was changed."""


@dataclasses.dataclass
class TransitionReport:
    """What a drop or a restore did, measured."""

    kind: str
    groups: list[int]
    seconds: float = 0.0
    freed_weight_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # device -> bytes
    exchange: ExchangeStats = dataclasses.field(default_factory=ExchangeStats)
    live_before: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_live: dict[str, int] = dataclasses.field(default_factory=dict)  # sampled at every layer
    live_after: dict[str, int] = dataclasses.field(default_factory=dict)
    compiles: int = 0
    failed_pages: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # group -> page ids lost

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["failed_pages"] = {str(k): v for k, v in self.failed_pages.items()}
        return d


def _live(devices) -> dict[str, int]:
    live = measure.live_bytes_by_device()
    return {str(d): live.get(d, 0) for d in devices}


def _sample_peak(report: TransitionReport, devices) -> None:
    for d, n in _live(devices).items():
        report.peak_live[d] = max(report.peak_live.get(d, 0), n)


def check_members(cluster, gp: GroupPlan) -> list:
    """The member instances in stage order; each must be serving on its own."""
    members = []
    for st in gp.stages:
        if not 0 <= st.instance < len(cluster.engines):
            raise DropError(f"group_size: instance {st.instance} does not exist")
        eng = cluster.engines[st.instance]
        if eng not in cluster.units:
            raise DropError(f"instance {st.instance} is already in a pipeline group")
        members.append(eng)
    return members


def prepare_drop(cluster, plan: DropPlan) -> DeviceOp:
    """The logged device operation of a drop: the plan and, per group member, the pages to move
    (old ids in the member's space -> new ids in the group's)."""
    arrays, moves = {}, []
    for gi, gp in enumerate(plan.groups):
        members = check_members(cluster, gp)
        taken = {p for r in members[0].scheduler.running for p in r.pages}
        fresh = (p for p in range(1, gp.num_pages) if p not in taken)
        for j, m in enumerate(members):
            src = [p for r in m.scheduler.running for p in r.pages]
            dst = src if j == 0 else [next(fresh) for _ in src]
            arrays[f"{gi}/{j}/src"] = np.asarray(src, np.int32)
            arrays[f"{gi}/{j}/dst"] = np.asarray(dst, np.int32)
        moves.append(len(members))
    return DeviceOp(DROP, -1, {"plan": plan.to_dict(), "chunk": cluster.chunk_pages}, arrays)


def execute_drop(cluster, op: DeviceOp) -> TransitionReport:
    """Every process: the device part of a drop, and the new unit structure."""
    plan = DropPlan.from_dict(op.args["plan"])
    chunk = int(op.args["chunk"])
    t0 = time.perf_counter()
    c0 = compile_stats.compile_count()
    report = TransitionReport("drop", [])
    all_members = [cluster.engines[st.instance] for gp in plan.groups for st in gp.stages]
    devices = [d for m in all_members for d in m.devices if d.process_index == jax.process_index()]
    report.live_before = _live(devices)
    report.peak_live = dict(report.live_before)
    for gi, gp in enumerate(plan.groups):
        members = check_members(cluster, gp)
        src = [op.arrays[f"{gi}/{j}/src"].tolist() for j in range(len(members))]
        dst = [op.arrays[f"{gi}/{j}/dst"].tolist() for j in range(len(members))]
        group_id = cluster.next_group_id()
        report.groups.append(group_id)
        lost: set[int] = set()
        for st_plan, m in zip(gp.stages, members):
            freed = _drop_weights(m.stage, st_plan)
            for d in m.devices:
                report.freed_weight_bytes[str(d)] = report.freed_weight_bytes.get(str(d), 0) + freed
        _sample_peak(report, devices)
        for l in gp.layer_order:
            owner = members[gp.owner_index(l)].stage
            pools = owner.exes.new_pools(gp.num_pages)
            _sample_peak(report, devices)
            for j, m in enumerate(members):
                pools = copy_pages(m.stage, m.stage.pools[l], owner, pools, src[j], dst[j], chunk, report.exchange,
                                   "drop", {"group": group_id, "layer": l, "member": j}, lost)
                _sample_peak(report, devices)
            for m in members:
                delete_arrays(m.stage.pools.pop(l))
            owner.pools[l] = pools
        for m in members:
            m.stage.num_pages = gp.num_pages
        if lost:
            report.failed_pages[group_id] = sorted(lost)
        group = PipelineGroup(group_id, gp, members, Scheduler(
            group_scheduler_config(members[0].config.scheduler, len(members)), PageAllocator(gp.num_pages),
            members[0].page_size, members[0].max_model_len, members[0].scheduler.policy), members[0].eos_ids)
        if all(d.platform == "cpu" for m in members for d in m.devices):
            group.pipeline_depth = 1  # virtual CPU devices share the cores: stages never overlap there
        cluster.replace_units(members, [group])
    report.live_after = _live(devices)
    report.seconds = time.perf_counter() - t0
    report.compiles = compile_stats.compile_count() - c0
    cluster.last_transition = report
    return report


def _drop_weights(stage, st_plan) -> int:
    """Deletes what this stage no longer holds; returns the bytes per device freed."""
    freed = 0
    for l in [l for l in stage.layers if not st_plan.holds(l)]:
        freed += delete_arrays(stage.layers.pop(l))
    keep = set()
    if st_plan.embed:
        keep.add(id(stage.embed))
    if st_plan.head:
        keep.update(id(a) for a in jax.tree.leaves(stage.head))
    if not st_plan.head and stage.head is not None:
        freed += delete_arrays([a for a in jax.tree.leaves(stage.head) if id(a) not in keep])
        stage.head = None
    if not st_plan.embed and stage.embed is not None:
        if id(stage.embed) not in keep:
            freed += delete_arrays(stage.embed)
        stage.embed = None
    return freed


def adopt_after_drop(cluster, op: DeviceOp, report: TransitionReport) -> list[RequestOutput]:
    """Controller: the members' requests move into their group with the new page tables. Returns the
    final outputs of requests that failed (their KV was lost in a failed copy)."""
    plan = DropPlan.from_dict(op.args["plan"])
    failed_out: list[RequestOutput] = []
    for gi, (gp, group_id) in enumerate(zip(plan.groups, report.groups)):
        group = cluster.group(group_id)
        lost = set(report.failed_pages.get(group_id, ()))
        sched = group.scheduler
        moved = []
        running, waiting = [], []
        for j, m in enumerate(group.members):
            new_ids = iter(op.arrays[f"{gi}/{j}/dst"].tolist())
            for r in m.scheduler.running:
                r.pages = [next(new_ids) for _ in r.pages]
                running.append(m.take(r.request_id))
            waiting += [m.take(r.request_id) for r in m.scheduler.waiting]
            m.scheduler.running.clear()
            m.scheduler.waiting.clear()
            m.scheduler.allocator = PageAllocator(m.scheduler.allocator.num_pages)
        used = [p for r, _ in running for p in r.pages]
        sched.allocator = PageAllocator(gp.num_pages, used)
        for r, detok in sorted(running, key=lambda x: x[0].arrival_time):
            group.adopt(r, detok)
            sched.running.append(r)
            moved.append(r.request_id)
        for r, detok in sorted(waiting, key=lambda x: x[0].arrival_time):
            group.adopt(r, detok)
            sched.waiting.append(r)
            moved.append(r.request_id)
        cluster.move_requests(moved, group)
        for r in [r for r, _ in running if lost & set(r.pages)]:
            sched.abort(r, FinishReason.ERROR)
            failed_out.append(group.output(r, []))
            cluster.forget(r.request_id)
        if lost:
            log.warning("drop: %d requests failed (their KV could not be moved); group %d serves the rest",
                        len(failed_out), group_id)
    return failed_out
