"""Restore: a pipeline group splits back into its instances, every weight back on every member.

Each request still running goes to one member (largest first onto the member with the most room,
kunjax.control.plan.assign_requests) and its KV of every layer is copied once, from the stage that
owns the layer into that member's restored pools. We chose this over letting requests finish in the
group because a long generation would otherwise hold the whole group (and its pipeline overhead)
until it ends.

A restore is a cluster Task (kunjax.control.cluster) run in pieces, each a logged device operation,
and the group keeps decoding between them; units outside the group never notice it.

- Page tables: a request gets a page table on its target member whose k-th page stands for its
  k-th group page (`RestoreRouting`, controller side). It grows with the group one, so a token the
  group writes between two pieces lands in the right place on either side.
- `restore_begin`: the group gets its routing; nothing moves yet.
- `restore_layers` (repeated, one round of the drop's a piece, the rounds in reverse order): the owners gather the round's layers' pages that hold data
  (chunks) and delete their group pools (room first); then for each layer every member, the owner
  last, allocates its instance pool, receives the layer's weights when it lacks them (device to
  device, never from disk) and its chunks, scattered at its requests' member page ids (only the
  pages of requests going to another member cross devices); each chunk is freed once scattered. From then on that layer of a request's step runs on its member
  (kunjax.memory.group: one micro-batch per target member).
- `restore_finish`: embedding and head back where they are missing, the members replace the group,
  requests move to their members' schedulers with their member page tables.
A failure inside a piece (an allocation, a copy) fails only the requests whose pages were lost; the
restore goes on and completes, so the cluster always ends split and serving.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from kunjax.control.ops import DeviceOp
from kunjax.control.pages import PageAllocator, pages_for
from kunjax.control.plan import assign_requests, layer_rounds, restore_rounds, simulate_restore
from kunjax.control.request import FinishReason, RequestOutput
from kunjax.memory.drop import TransitionReport, _live, _sample_peak
from kunjax.memory.exchange import delete_arrays, new_pools, pages_in, pages_out
from kunjax.runtime import compile_stats
from sharding.transfer import move_tree

log = logging.getLogger(__name__)

RESTORE_BEGIN, RESTORE_LAYERS, RESTORE_FINISH = "restore_begin", "restore_layers", "restore_finish"


class RestoreError(ValueError):
    """The group cannot split now (names why); nothing was changed."""


class RestoreRouting:
    """Controller side of a restore: each request's target member and its page table there."""

    def __init__(self, group, assign: dict[str, int], allocators: dict[int, PageAllocator]):
        self.group = group
        self.assign = dict(assign)
        self.allocators = allocators  # member position -> its instance page space
        self.tables: dict[str, list[int]] = {}

    def member_of(self, req) -> int:
        """A request admitted after the restore began goes to the member with the most free pages."""
        j = self.assign.get(req.request_id)
        if j is None:
            j = max(self.allocators, key=lambda k: (self.allocators[k].num_free, -k))
            self.assign[req.request_id] = j
        return j

    def table(self, req) -> list[int]:
        """Its member page table, grown to as many pages as its group one (positionally)."""
        t = self.tables.setdefault(req.request_id, [])
        if len(t) < len(req.pages):
            t += self.allocators[self.member_of(req)].allocate(len(req.pages) - len(t))
        return t

    def tables_of(self, rows) -> dict[str, list[int]]:
        return {r.request.request_id: self.table(r.request)[:len(r.request.pages)] for r in rows}

    def partition(self, rows) -> list[tuple[int, list]]:
        """Micro-batches by target member, each at most one instance bucket."""
        cap = self.group.buckets.max_rows
        by: dict[int, list] = {}
        for r in rows:
            by.setdefault(self.member_of(r.request), []).append(r)
        return [(j, part[i:i + cap]) for j, part in sorted(by.items()) for i in range(0, len(part), cap)]

    def moves(self) -> dict[str, np.ndarray]:
        """Per member, the running requests' group pages and where they go on the member."""
        src = {j: [] for j in self.allocators}
        dst = {j: [] for j in self.allocators}
        for r in self.group.scheduler.running:
            if r.pages:
                j = self.member_of(r)
                src[j] += r.pages
                dst[j] += self.table(r)[:len(r.pages)]
        arrays = {}
        for j in self.allocators:
            arrays[f"{j}/src"] = np.asarray(src[j], np.int32)
            arrays[f"{j}/dst"] = np.asarray(dst[j], np.int32)
        return arrays


def prepare_restore(cluster, group, infos: dict) -> RestoreRouting:
    """The routing of a restore; refused (RestoreError) when the running requests, with room to grow
    through the restore, do not fit the split instances or the transition would not fit memory."""
    members = group.members
    before = {j: group.plan.pages_before[cluster.engines.index(m)] for j, m in enumerate(members)}
    rounds = len(layer_rounds(group.plan.layer_order, group.plan.stages))
    grow = {r.request_id: pages_for(r.num_tokens + rounds + 2, group.page_size) for r in group.scheduler.running}
    assign = assign_requests(grow, {j: before[j] - 1 for j in before})
    if assign is None:
        used = sum(len(r.pages) for r in group.scheduler.running)
        raise RestoreError(f"group {group.id}: its running requests hold {used} pages, more than its {len(members)} "
                           f"instances can hold once split ({', '.join(str(before[j] - 1) for j in before)} each); "
                           f"restore when the load has fallen")
    used_after = {cluster.engines.index(m): sum(grow[rid] for rid, k in assign.items() if k == j)
                  for j, m in enumerate(members)}
    peak = simulate_restore(infos, group.plan, cluster.chunk_pages, used_after)
    over = {i: p for i, p in peak.items() if p > infos[i].budget}
    if over:
        raise RestoreError(f"group {group.id}: the restore would peak above the memory budget on instances "
                           f"{sorted(over)} ({', '.join(f'{p / 2**20:.0f} MiB' for p in over.values())})")
    return RestoreRouting(group, assign, {j: PageAllocator(before[j]) for j in before})


class RestoreTask:
    """The controller's side of one restore (a kunjax.control.cluster Task)."""

    def __init__(self, cluster, group, routing: RestoreRouting):
        self.group = group
        self.units = [group]
        self.routing = routing
        self.report = TransitionReport("restore", [group.id])
        self.outputs: list[RequestOutput] = []
        self._todo = restore_rounds(group.plan)  # rounds left
        self._begun = False
        self._t0 = 0.0
        self.done = False

    def holds(self, unit) -> bool:
        return False  # the group decodes between pieces

    def advance(self, cluster) -> bool:
        t = time.perf_counter()
        try:
            if not self._begun:
                self._t0 = t
                self.group.routing = self.routing
                self.report = cluster.run_op(DeviceOp(RESTORE_BEGIN, -1, {"group": self.group.id,
                                                                           "chunk": cluster.chunk_pages}))
                self._begun = True
                return False
            if self._todo:
                arrays = self.routing.moves()
                layers = self._todo.pop(0)
                cluster.run_op(DeviceOp(RESTORE_LAYERS, -1, {"group": self.group.id, "layers": layers}, arrays))
                return False
            self.report = cluster.run_op(DeviceOp(RESTORE_FINISH, -1, {"group": self.group.id}))
            self.outputs += adopt_after_restore(cluster, self.group, self.routing, self.report)
            cluster.emit(self.outputs)
            cluster.count_transition(self.report)
            self.done = True
            return True
        finally:
            self.report.pieces += 1
            dt = time.perf_counter() - t
            self.report.piece_seconds_max = max(self.report.piece_seconds_max, dt)
            self.report.piece_seconds_total += dt
            self.report.seconds = time.perf_counter() - self._t0


def execute_restore_begin(cluster, op: DeviceOp) -> TransitionReport:
    group = cluster.group(int(op.args["group"]))
    devices = [d for m in group.members for d in m.devices if d.process_index == jax.process_index()]
    report = TransitionReport("restore", [group.id])
    report.live_before = _live(devices)
    report.peak_live = dict(report.live_before)
    group.restoring = {"report": report, "devices": devices, "c0": compile_stats.compile_count(),
                       "chunk": int(op.args["chunk"]), "lost": {j: set() for j in range(len(group.members))}}
    group.restored = set()
    group.state = "restoring"
    return report


def execute_restore_layers(cluster, op: DeviceOp) -> None:
    from kunjax.memory import exchange

    group = cluster.group(int(op.args["group"]))
    st8 = group.restoring
    report, devices, chunk = st8["report"], st8["devices"], st8["chunk"]
    plan, members = group.plan, group.members
    src = {j: op.arrays[f"{j}/src"].tolist() for j in range(len(members))}
    dst = {j: op.arrays[f"{j}/dst"].tolist() for j in range(len(members))}
    layers = [int(l) for l in op.args["layers"]]
    held = {}
    for l in layers:  # phase 1: the pages that hold data out, the group pools freed (room first)
        owner = members[plan.owner_index(l)].stage
        held[l] = {j: pages_out(owner, owner.pools[l], src[j], chunk, report.exchange) for j in src}
        if l == layers[0]:
            _sample_peak(report, devices)
        delete_arrays(owner.pools.pop(l))
    for l in layers:  # phase 2: every member (the owner last) gets its pool, the weights, its pages
        o = plan.owner_index(l)
        owner = members[o].stage
        for j in sorted(range(len(members)), key=lambda k: k == o):
            m = members[j]
            st = m.stage
            if j != o:
                lp = owner.layers[l]
                st.layers[l] = move_tree(lp, {n: st.exes.layer_sh[n] for n in lp})
            size = plan.pages_before[cluster.engines.index(m)]
            try:
                if exchange.FAULT_HOOK is not None:
                    exchange.FAULT_HOOK("restore", {"group": group.id, "layer": l, "member": j})
                pools = pages_in(st, new_pools(st, size, report.exchange), held[l][j], dst[j], chunk, report.exchange,
                                 src_mesh=owner.mesh)
            except Exception:
                log.exception("restore: layer %d into member %d failed; the requests whose pages it held fail", l, j)
                st8["lost"][j].update(dst[j])
                pools = st.exes.new_pools(size)
            st.pools[l] = pools
            if j == o:  # the layer's last member: every new pool of it is there
                _sample_peak(report, devices)
            delete_arrays([c[:2] for c in held[l].pop(j)])
        group.restored.add(l)
    held.clear()


def execute_restore_finish(cluster, op: DeviceOp) -> TransitionReport:
    group = cluster.group(int(op.args["group"]))
    st8 = group.restoring
    report, devices = st8["report"], st8["devices"]
    plan, members = group.plan, group.members
    embed_holder = next(m.stage for m, st in zip(members, plan.stages) if st.embed)
    head_holder = next(m.stage for m, st in zip(members, plan.stages) if st.head)
    for m in members:
        st = m.stage
        st.restore_embed_head(embed_holder, head_holder)
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
    group.restored = set()
    cluster.last_transition = report
    return report


def adopt_after_restore(cluster, group, routing: RestoreRouting, report: TransitionReport) -> list[RequestOutput]:
    """Controller: every request of the group moves to its member with its member page table;
    queued ones to the member with the most free pages. Returns the outputs of requests that failed
    (their KV could not be moved back)."""
    members = group.members
    group.routing = None
    kept: dict[int, list[int]] = {j: [] for j in range(len(members))}
    failed_out: list[RequestOutput] = []
    placed = []
    for r in list(group.scheduler.running):
        req, detok = group.take(r.request_id)
        j = routing.member_of(req)
        req.pages = routing.table(req)[:len(req.pages)]
        kept[j] += req.pages
        placed.append((j, req, detok))
    for j, m in enumerate(members):
        m.scheduler.allocator = PageAllocator(m.scheduler.allocator.num_pages, kept[j])
    for j, req, detok in placed:
        m = members[j]
        m.adopt(req, detok)
        m.scheduler.running.append(req)
        cluster.move_requests([req.request_id], m)
        if set(report.failed_pages.get(cluster.engines.index(m), ())) & set(req.pages):
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
