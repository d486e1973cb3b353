"""The controller's half of a parameter drop and a restore (plain Python, no JAX): the cluster
tasks that decide each piece, the reports, the request moves into a group and back out.

A transition is a cluster Task (kunjax.control.cluster): one piece per iteration, only while none of
its units has a step in flight. Each piece is a logged device operation (`DROP_*`, `RESTORE_*`,
kunjax.control.ops) whose handler the runtime registers: kunjax.memory.drop / kunjax.memory.restore
move real weights and KV pages on devices; the simulator (kunjax.sim) registers handlers that
advance simulated time by bytes / link bandwidth instead. Everything decided here (which layers a
piece moves, which pages hold data, where each request goes on a restore, the page ids it gets) is
the same for both: kunjax/memory/drop.py and restore.py describe the mechanism in full.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import numpy as np

from kunjax.control.ops import DeviceOp
from kunjax.control.pages import PageAllocator, pages_for
from kunjax.control.plan import (DropPlan, GroupPlan, assign_requests, layer_rounds, memory_limit, member_offsets,
                                 restore_rounds, simulate_restore)
from kunjax.control.request import FinishReason, RequestOutput

log = logging.getLogger(__name__)

DROP_BEGIN, DROP_LAYERS, DROP_FINISH, DROP_ROLLBACK = "drop_begin", "drop_layers", "drop_finish", "drop_rollback"

RESTORE_BEGIN, RESTORE_LAYERS, RESTORE_FINISH = "restore_begin", "restore_layers", "restore_finish"


class DropError(ValueError):
    """The drop cannot be applied as asked (names why); nothing was changed."""


class PieceFailed(RuntimeError):
    """A piece of a transition failed; the layer it was moving is back where it was."""


class RestoreError(ValueError):
    """The group cannot split now (names why); nothing was changed."""


@dataclasses.dataclass
class ExchangeStats:
    """Bytes of pages that hold data, moved between meshes and within one, and the padding the
    fixed chunk size adds on top (moved too: counted apart, so nothing is understated)."""

    bytes_between_devices: int = 0  # pages that crossed from one mesh to another (summed over devices)
    bytes_local: int = 0  # pages copied within a mesh (the owner's own pages into its group pool)
    bytes_padding: int = 0  # null pages that pad the last chunk of a list (gathered, moved, scattered)
    seconds: float = 0.0
    chunks: int = 0
    # Fresh pools the move needed (a group's pools on a drop, the members' own on a restore): JAX
    # has no uninitialised allocation, so each is written once (zeros) before pages land in it; on
    # a CPU that is also the kernel's first touch of newly mapped memory.
    bytes_allocated: int = 0  # summed over devices
    allocate_seconds: float = 0.0

    def add(self, other: "ExchangeStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass
class TransitionReport:
    """What a drop or a restore did, measured."""

    kind: str
    groups: list[int]
    seconds: float = 0.0  # from the first piece to the last (the members step in between)
    pieces: int = 0
    piece_seconds_max: float = 0.0  # the longest piece: how long the members' requests wait at most
    piece_seconds_total: float = 0.0  # the pieces alone (the members' steps in between excluded)
    sampling_seconds: float = 0.0  # of which measuring live bytes (the peaks reported)
    freed_weight_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # device -> bytes
    exchange: ExchangeStats = dataclasses.field(default_factory=ExchangeStats)
    live_before: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_live: dict[str, int] = dataclasses.field(default_factory=dict)  # sampled at every layer
    live_after: dict[str, int] = dataclasses.field(default_factory=dict)
    compiles: int = 0  # compilations while it ran, the background compilers' excluded (compile_stats)
    failed_pages: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # group -> page ids lost
    state: str = "running"  # running | done | rolled_back
    error: str = ""

    def add_piece(self, seconds: float, since_start: float) -> None:
        """One piece done: it took `seconds`; the transition has run `since_start` so far."""
        self.pieces += 1
        self.piece_seconds_max = max(self.piece_seconds_max, seconds)
        self.piece_seconds_total += seconds
        self.seconds = since_start

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["failed_pages"] = {str(k): v for k, v in self.failed_pages.items()}
        return d


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


PIECE_STEPS = 0.5  # a piece may take about this share of the time its units take to step


class PiecePacer:
    """Sizes a transition's pieces by time. The plan cuts the move into atoms, the smallest moves
    that are memory-safe on their own (a drop's single layers or whole rounds,
    kunjax.control.plan.drop_atoms; a restore's rounds), each one logged device operation (every
    process of a multi-host cluster runs the same ones). A piece runs atoms one after the other
    while its units wait, until one more, if it took as long as the last, would run past PIECE_STEPS
    of the time the units took to step since the last piece; the first piece runs one; while the
    units have nothing to step, a piece runs every atom left. So where an atom is quick next to a
    step (a GPU: milliseconds against tens of them), a transition takes a few pieces and ends
    within a few steps; where it is slow (a CPU host paging fresh memory in), a piece runs one
    atom, or about half a step's worth, and overruns by at most the atom that turned slow: a
    member's request waits about one step plus one piece between two tokens. The clock is the
    cluster's `work_clock` (a simulated cluster's includes the pieces it has simulated)."""

    def __init__(self):
        self.last_end: Optional[float] = None

    def deadline(self, now: float, busy: bool) -> float:
        if not busy:
            return float("inf")
        if self.last_end is None:
            return now  # one atom
        return now + PIECE_STEPS * max(now - self.last_end, 0.0)

    @staticmethod
    def more(now: float, atom_seconds: float, deadline: float) -> bool:
        return now + atom_seconds <= deadline

    def ended(self, end: float) -> None:
        self.last_end = end

    def run(self, cluster, busy: bool, run_atom: Callable[[], bool]) -> None:
        """One piece: `run_atom()` runs the next atom and says whether any is left."""
        deadline = self.deadline(cluster.work_clock(), busy)
        while True:
            a0 = cluster.work_clock()
            left = run_atom()
            now = cluster.work_clock()
            if not left or not self.more(now, now - a0, deadline):
                break
        self.ended(now)


class DropTask:
    """The controller's side of one drop (a kunjax.control.cluster Task): decides each piece, logs
    it, and on the last one moves the requests into the group."""

    def __init__(self, cluster, plan: DropPlan):
        self.cluster = cluster
        self.plan = plan
        self.groups = []  # per group plan: its members
        for gp in plan.groups:
            self.groups.append(check_members(cluster, gp))
        self.units = [m for ms in self.groups for m in ms]
        self.report = TransitionReport("drop", [])
        self.outputs: list[RequestOutput] = []  # requests that failed (their KV was lost)
        self._todo = [gp.drop_atoms() for gp in plan.groups]  # atoms left per group
        self._pacers = [PiecePacer() for _ in plan.groups]
        self._moved: list[list[int]] = [[] for _ in plan.groups]
        self._begun = False
        self._t0 = 0.0
        self.done = False

    def holds(self, unit) -> bool:
        return False  # the members step between pieces

    def _atom(self, gi: int) -> list[int]:
        """Group gi's next atom (GroupPlan.drop_atoms), the owners with the fewest pages that hold
        data first (their chunks wait least for their pool)."""
        members = self.groups[gi]
        gp = self.plan.groups[gi]
        used = [sum(len(r.pages) for r in m.scheduler.running) for m in members]
        return sorted(self._todo[gi][0], key=lambda l: (used[gp.owner_index(l)], l))

    def _pages(self, gi: int) -> dict[str, np.ndarray]:
        arrays = {}
        for j, m in enumerate(self.groups[gi]):
            arrays[f"{j}"] = np.asarray(sorted({p for r in m.scheduler.running for p in r.pages}), np.int32)
        return arrays

    def _waits_for_shapes(self, cluster) -> bool:
        """Every layer has moved, but the group's first shape is not compiled yet while its members
        have work (MechanismCluster.group_prewarmed): they serve on as instances meanwhile."""
        return (self._begun and not any(self._todo) and any(m.has_unfinished() for m in self.units)
                and not all(cluster.group_prewarmed(gp) for gp in self.plan.groups))

    def advance(self, cluster) -> bool:
        if self._waits_for_shapes(cluster):
            return False  # not a piece: nothing runs
        t = cluster.clock()
        try:
            if not self._begun:
                self._t0 = t
                self.report = cluster.run_op(DeviceOp(DROP_BEGIN, -1, {"plan": self.plan.to_dict()}))
                self._begun = True
                return False
            for gi in range(len(self.plan.groups)):
                if self._todo[gi]:
                    pages = self._pages(gi)  # no step runs within a piece: the same for each of its atoms

                    def run_atom(gi=gi) -> bool:
                        layers = self._atom(gi)
                        cluster.run_op(DeviceOp(DROP_LAYERS, -1, {"group": gi, "layers": layers,
                                                                   "chunk": cluster.chunk_pages}, pages))
                        self._todo[gi].pop(0)
                        self._moved[gi] += layers
                        return bool(self._todo[gi])

                    self._pacers[gi].run(cluster, any(m.has_unfinished() for m in self.groups[gi]), run_atom)
                    return False
            self.report = report = cluster.run_op(DeviceOp(DROP_FINISH, -1, {}))
            self.outputs += adopt_after_drop(cluster, self.plan, report)
            cluster.emit(self.outputs)
            cluster.count_transition(report)
            self.done = True
            return True
        except PieceFailed as e:
            log.error("drop failed (%s); rolling back the %d layers moved", e, sum(map(len, self._moved)))
            arrays = {f"{gi}/{k}": v for gi in range(len(self.plan.groups)) for k, v in self._pages(gi).items()}
            self.report = cluster.run_op(DeviceOp(DROP_ROLLBACK, -1, {"error": str(e)}, arrays))
            cluster.count_transition(self.report)
            self.done = True
            return True
        finally:
            self.report.add_piece(cluster.clock() - t, cluster.clock() - self._t0)


def adopt_after_drop(cluster, plan: DropPlan, report: TransitionReport) -> list[RequestOutput]:
    """Controller: the members' requests move into their group; a request's page p of member j
    becomes offset_j + p (its KV is already there). Returns the final outputs of requests whose KV
    was lost in a failed copy."""
    failed_out: list[RequestOutput] = []
    for gp, group_id in zip(plan.groups, report.groups):
        group = cluster.group(group_id)
        offs = member_offsets(gp)
        lost = set(report.failed_pages.get(group_id, ()))
        sched = group.scheduler
        moved, running, waiting = [], [], []
        for j, m in enumerate(group.members):
            for r in m.scheduler.running:
                r.pages = [offs[j] + p for p in r.pages]
                running.append(m.take(r.request_id))
            waiting += [m.take(r.request_id) for r in m.scheduler.waiting]
            m.scheduler.running.clear()
            m.scheduler.waiting.clear()
            m.scheduler.allocator = PageAllocator(m.scheduler.allocator.num_pages)
        # Each member's null page sits at its offset in the group space: never handed out.
        sched.allocator = PageAllocator(gp.num_pages, [p for r, _ in running for p in r.pages],
                                        reserved=[o for o in offs if o])
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
    over = {i: p for i, p in peak.items() if p > memory_limit(infos[i])}
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
        self._todo = restore_rounds(group.plan)  # rounds left: the atoms of its pieces
        self._pacer = PiecePacer()
        self._begun = False
        self._t0 = 0.0
        self.done = False

    def holds(self, unit) -> bool:
        return False  # the group decodes between pieces

    def advance(self, cluster) -> bool:
        t = cluster.clock()
        try:
            if not self._begun:
                self._t0 = t
                self.group.routing = self.routing
                self.report = cluster.run_op(DeviceOp(RESTORE_BEGIN, -1, {"group": self.group.id,
                                                                           "chunk": cluster.chunk_pages}))
                self._begun = True
                return False
            if self._todo:
                arrays = self.routing.moves()  # no step runs within a piece: the same for each of its atoms

                def run_atom() -> bool:
                    cluster.run_op(DeviceOp(RESTORE_LAYERS, -1, {"group": self.group.id, "layers": self._todo.pop(0)},
                                            arrays))
                    return bool(self._todo)

                self._pacer.run(cluster, self.group.has_unfinished(), run_atom)
                return False
            self.report = cluster.run_op(DeviceOp(RESTORE_FINISH, -1, {"group": self.group.id}))
            self.outputs += adopt_after_restore(cluster, self.group, self.routing, self.report)
            cluster.emit(self.outputs)
            cluster.count_transition(self.report)
            self.done = True
            return True
        finally:
            self.report.add_piece(cluster.clock() - t, cluster.clock() - self._t0)


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
    members[0].scheduler.absorb_counters(group.scheduler)  # the group's preemptions etc. outlive it
    for m in members:
        m.scheduler.running.sort(key=lambda r: r.arrival_time)
    return failed_out
