"""Restore: a pipeline group splits back into its instances, every weight back on every member.

Requests still running are gathered back: each goes to one member (largest first onto the member
with the most room, kunjax.control.plan.assign_requests) and its KV of every layer is copied once,
from the stage that owns the layer into that member's restored pools. We chose this over letting them
finish in the group because a long generation would otherwise hold the whole group (and its
pipeline overhead) until it ends.

A restore is a cluster Task (kunjax.control.cluster) that runs in pieces, each a logged device
operation; units outside the group step between the pieces and never notice it. The group itself
does not step until it has split (its KV of a layer is mid-move between two page spaces), so the
pieces are bounded (`ServingCluster.piece_bytes` of KV each) and the group's activation reserve is
usable as transition room.

1. `prepare_restore` (controller): the assignment and the page moves; refused (RestoreError) when
   the running requests do not fit the split instances or the transition would not fit memory.
2. `restore_layers` (repeated): for each layer of the piece, the owner gathers the layer's pages
   that hold data (chunks), deletes its group pool (room first), every member allocates its
   instance pool and receives the layer's weights from the owner when it lacks them (device to
   device, never from disk), and the chunks are scattered into each member's pool at its new ids.
   Only the pages of requests going to another member cross devices.
3. `restore_finish`: embedding and head back where they are missing, the members replace the group;
   on the controller requests move to their members' schedulers, queued ones to the member with
   the most free pages.
A failure inside a piece (an allocation, a copy) fails only the requests whose pages were lost;
the restore goes on with the next layer and completes, so the cluster always ends split and serving.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from kunjax.control.ops import DeviceOp
from kunjax.control.pages import PageAllocator
from kunjax.control.request import RequestOutput
from kunjax.memory.drop import TransitionReport, _live, _sample_peak
from kunjax.memory.exchange import delete_arrays, pages_in, pages_out
from kunjax.control.plan import assign_requests, simulate_restore
from kunjax.runtime import compile_stats
from sharding.transfer import move, move_tree

log = logging.getLogger(__name__)

RESTORE_BEGIN, RESTORE_LAYERS, RESTORE_FINISH = "restore_begin", "restore_layers", "restore_finish"
RESTORE = RESTORE_BEGIN


class RestoreError(ValueError):
    """The group cannot split now (names why); nothing was changed."""


def prepare_restore(cluster, group, infos: dict) -> DeviceOp:
    """The first operation of a restore, with its page moves (`infos`: MemberInfo of each member,
    for the memory check)."""
    members = group.members
    before = {j: group.plan.pages_before[cluster.engines.index(m)] for j, m in enumerate(members)}
    running = [r for r in group.scheduler.running if r.pages]
    assign = assign_requests({r.request_id: len(r.pages) for r in running}, {j: before[j] - 1 for j in before})
    if assign is None:
        used = sum(len(r.pages) for r in running)
        raise RestoreError(f"group {group.id}: its running requests hold {used} pages, more than its {len(members)} "
                           f"instances can hold once split ({', '.join(str(before[j] - 1) for j in before)} each); "
                           f"restore when the load has fallen")
    used_after = {cluster.engines.index(m): sum(len(r.pages) for r in running if assign[r.request_id] == j)
                  for j, m in enumerate(members)}
    peak = simulate_restore(infos, group.plan, cluster.chunk_pages, used_after)
    over = {i: p for i, p in peak.items() if p > infos[i].budget}
    if over:
        raise RestoreError(f"group {group.id}: the restore would peak above the memory budget on instances "
                           f"{sorted(over)} ({', '.join(f'{p / 2**20:.0f} MiB' for p in over.values())})")
    arrays, nxt = {}, {j: 1 for j in before}
    src = {j: [] for j in before}
    dst = {j: [] for j in before}
    for r in running:
        j = assign[r.request_id]
        src[j] += r.pages
        dst[j] += list(range(nxt[j], nxt[j] + len(r.pages)))
        nxt[j] += len(r.pages)
    for j in before:
        arrays[f"{j}/src"] = np.asarray(src[j], np.int32)
        arrays[f"{j}/dst"] = np.asarray(dst[j], np.int32)
    order = [r.request_id for r in running]
    return DeviceOp(RESTORE_BEGIN, -1, {"group": group.id, "chunk": cluster.chunk_pages, "order": order,
                                        "assign": [assign[rid] for rid in order]}, arrays)


class RestoreTask:
    """The controller's side of one restore (a kunjax.control.cluster Task)."""

    def __init__(self, cluster, group, begin: DeviceOp):
        self.group = group
        self.units = [group]
        self.begin = begin
        self.report = TransitionReport("restore", [group.id])
        self.outputs: list[RequestOutput] = []
        self._todo = list(group.plan.layer_order)
        self._begun = False
        self._t0 = 0.0
        self.done = False

    def holds(self, unit) -> bool:
        return unit is self.group

    def advance(self, cluster) -> bool:
        t = time.perf_counter()
        try:
            if not self._begun:
                self._t0 = t
                self.report = cluster.run_op(self.begin)
                self._begun = True
                return False
            if self._todo:
                used = sum(len(v) for k, v in self.begin.arrays.items() if k.endswith("/src"))
                per_layer = max(1, used * self.group.members[0].page_layer_bytes)
                layers = self._todo[:max(1, int(cluster.piece_bytes // per_layer))]
                cluster.run_op(DeviceOp(RESTORE_LAYERS, -1, {"group": self.group.id, "layers": layers}))
                del self._todo[:len(layers)]
                return False
            self.report = cluster.run_op(DeviceOp(RESTORE_FINISH, -1, {"group": self.group.id}))
            self.outputs += adopt_after_restore(cluster, self.group, self.begin, self.report)
            cluster.emit(self.outputs)
            self.done = True
            return True
        finally:
            self.report.pieces += 1
            self.report.piece_seconds_max = max(self.report.piece_seconds_max, time.perf_counter() - t)
            self.report.seconds = time.perf_counter() - self._t0


def execute_restore_begin(cluster, op: DeviceOp) -> TransitionReport:
    group = cluster.group(int(op.args["group"]))
    members = group.members
    devices = [d for m in members for d in m.devices if d.process_index == jax.process_index()]
    report = TransitionReport("restore", [group.id])
    report.live_before = _live(devices)
    report.peak_live = dict(report.live_before)
    group.restoring = {"op": op, "report": report, "devices": devices, "c0": compile_stats.compile_count(),
                       "lost": {j: set() for j in range(len(members))}}
    group.state = "restoring"
    return report


def execute_restore_layers(cluster, op: DeviceOp) -> None:
    group = cluster.group(int(op.args["group"]))
    st8 = group.restoring
    begin, report, devices = st8["op"], st8["report"], st8["devices"]
    plan, members = group.plan, group.members
    chunk = int(begin.args["chunk"])
    src = {j: begin.arrays[f"{j}/src"].tolist() for j in range(len(members))}
    dst = {j: begin.arrays[f"{j}/dst"].tolist() for j in range(len(members))}
    for l in op.args["layers"]:
        l = int(l)
        o = plan.owner_index(l)
        owner = members[o].stage
        held = {j: pages_out(owner, owner.pools[l], src[j], chunk, report.exchange) for j in src}
        _sample_peak(report, devices)
        delete_arrays(owner.pools.pop(l))
        for j, m in enumerate(members):
            st = m.stage
            if j != o:
                lp = owner.layers[l]
                st.layers[l] = move_tree(lp, {n: st.exes.layer_sh[n] for n in lp})
            size = plan.pages_before[cluster.engines.index(m)]
            try:
                from kunjax.memory import exchange

                if exchange.FAULT_HOOK is not None:
                    exchange.FAULT_HOOK("restore", {"group": group.id, "layer": l, "member": j})
                pools = pages_in(st, st.exes.new_pools(size), held[j], dst[j], chunk, report.exchange,
                                 src_mesh=owner.mesh)
            except Exception:
                log.exception("restore: layer %d into member %d failed; the requests whose pages it held fail", l, j)
                st8["lost"][j].update(dst[j])
                pools = st.exes.new_pools(size)
            st.pools[l] = pools
            _sample_peak(report, devices)
        del held


def execute_restore_finish(cluster, op: DeviceOp) -> TransitionReport:
    group = cluster.group(int(op.args["group"]))
    st8 = group.restoring
    report, devices = st8["report"], st8["devices"]
    plan, members = group.plan, group.members
    embed_holder = next(m.stage for m, st in zip(members, plan.stages) if st.embed)
    head_holder = next(m.stage for m, st in zip(members, plan.stages) if st.head)
    for m in members:
        st = m.stage
        if st.embed is None:
            st.embed = move(embed_holder.embed, st.exes.embed_sh)
        if st.head is None:
            st.head = {n: (st.embed if n == "embed" else move(a, st.exes.head_sh[n]))
                       for n, a in head_holder.head.items()}
        st.num_pages = plan.pages_before[cluster.engines.index(m)]
        _sample_peak(report, devices)
    for j, pages_lost in st8["lost"].items():  # restore: keyed by instance, that instance's page ids
        if pages_lost:
            report.failed_pages[cluster.engines.index(members[j])] = sorted(pages_lost)
    cluster.replace_units([group], members)
    report.live_after = _live(devices)
    report.compiles = compile_stats.compile_count() - st8["c0"]
    report.state = "done"
    group.state = "split"
    group.restoring = None
    cluster.last_transition = report
    return report


def adopt_after_restore(cluster, group, op: DeviceOp, report: TransitionReport) -> list[RequestOutput]:
    """Controller: every request of the group moves to a member; returns the outputs of requests
    that failed (their KV could not be moved back)."""
    from kunjax.control.request import FinishReason

    members = group.members
    by_id = {r.request_id: r for r in group.scheduler.running}
    new_pages: dict[int, list] = {j: [] for j in range(len(members))}
    nxt = {j: iter(op.arrays[f"{j}/dst"].tolist()) for j in range(len(members))}
    placed: dict[str, int] = {}
    for rid, j in zip(op.args["order"], op.args["assign"]):
        r = by_id[rid]
        r.pages = [next(nxt[j]) for _ in r.pages]
        new_pages[j] += r.pages
        placed[rid] = j
    for j, m in enumerate(members):
        m.scheduler.allocator = PageAllocator(m.scheduler.allocator.num_pages, new_pages[j])
    failed_out: list[RequestOutput] = []
    for r in list(group.scheduler.running):
        req, detok = group.take(r.request_id)
        if r.request_id in placed:
            m = members[placed[r.request_id]]
        else:  # running without pages (a prompt admitted this very step): to the freest member
            m = max(members, key=lambda e: e.allocator.num_free)
        m.adopt(req, detok)
        m.scheduler.running.append(req)
        cluster.move_requests([req.request_id], m)
        failed_ids = set(report.failed_pages.get(cluster.engines.index(m), ()))
        if r.request_id in placed and failed_ids & set(req.pages):
            m.scheduler.abort(req, FinishReason.ERROR)
            failed_out.append(m.output(req, []))
            cluster.forget(req.request_id)
    for r in list(group.scheduler.waiting):
        req, detok = group.take(r.request_id)
        m = max(members, key=lambda e: (e.allocator.num_free - e.view().queued_pages, -members.index(e)))
        m.adopt(req, detok)
        m.scheduler.waiting.append(req)
        cluster.move_requests([req.request_id], m)
    group.scheduler.running.clear()
    group.scheduler.waiting.clear()
    for m in members:
        m.scheduler.running.sort(key=lambda r: r.arrival_time)
    return failed_out
