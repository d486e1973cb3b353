"""Parameter drop: g instances become one pipeline group, and their freed weights become KV pages.

The drop is a cluster Task (kunjax.control.cluster): it advances one bounded piece at a time, only
while none of the members has a step in flight, and the members keep decoding between pieces. Only
the members notice it; every other unit steps as usual.

Pages keep their ids. Member j's page p lives, once its layer has moved, at id `offset_j + p` of the
group's pools (offset_0 = 0, offset_j = the pages of the members before j), so a request's group page
table is a pure function of its instance page table: nothing is renumbered while it runs, and a page
a member allocates between two pieces already has its place in the group.

Pieces, each a logged device operation (every process of a multi-host cluster runs it):
1. `drop_begin`: the embedding and head copies the plan does not keep are deleted (the first
   room), and the members get a route (kunjax.runtime.runner.Segment): each layer of a step runs
   where that layer's KV is: on the member itself until the layer has moved, then on the stage that
   owns it, at the member's page offset; embedding and head on the stages that keep them.
2. `drop_layers` (repeated; one round of the plan's layer order a piece, one layer per stage): for
   the round's layers every member gathers the pages that
   hold data (chunks, the transient) and deletes its pools of them; then each layer's owner
   allocates its group pool and the chunks are scattered in at their offset ids (device to device
   for the members that are not the owner: (g-1)/g of the KV crosses; the owner's own pages are
   copied locally, reported apart); the members that give a layer up delete its weights. The
   routes move the layers to their owners.
   A failure inside a piece (an allocation, a copy) puts the piece's layers back from their chunks;
   the drop then rolls back the layers already moved (`drop_rollback`) and the members serve on.
3. `drop_finish`: a PipelineGroup replaces the members; on the controller their requests move into
   it with their offset page ids.
The memory of each piece and of the steady state between pieces (where the members step, so the
activation reserve stays free) is simulated by kunjax.control.plan before a plan is offered.
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
from kunjax.memory.exchange import ExchangeStats, delete_arrays, new_pools, pages_in, pages_out
from kunjax.memory.group import PipelineGroup, group_scheduler_config
from kunjax.control.plan import DropPlan, GroupPlan, layer_rounds, member_offsets
from kunjax.runtime import compile_stats
from kunjax.runtime.runner import Segment
from sharding.transfer import move_tree

log = logging.getLogger(__name__)

DROP_BEGIN, DROP_LAYERS, DROP_FINISH, DROP_ROLLBACK = "drop_begin", "drop_layers", "drop_finish", "drop_rollback"


class DropError(ValueError):
    """The drop cannot be applied as asked (names why); nothing was changed."""


class PieceFailed(RuntimeError):
    """A piece of a transition failed; the layer it was moving is back where it was."""


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
    compiles: int = 0
    failed_pages: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # group -> page ids lost
    state: str = "running"  # running | done | rolled_back
    error: str = ""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["failed_pages"] = {str(k): v for k, v in self.failed_pages.items()}
        return d


def _live(devices) -> dict[str, int]:
    live = measure.live_bytes_by_device()
    return {str(d): live.get(d, 0) for d in devices}


def _sample_peak(report: TransitionReport, devices) -> None:
    """Live bytes per device now, into the report's peaks. On CPU this walks every live array, so
    transitions sample only where the simulation puts their peaks; the time it takes is reported."""
    t = time.perf_counter()
    for d, n in _live(devices).items():
        report.peak_live[d] = max(report.peak_live.get(d, 0), n)
    report.sampling_seconds += time.perf_counter() - t


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


def member_route(members, gp: GroupPlan, j: int, moved: set) -> list[Segment]:
    """Where each layer of member j's step runs while its group forms: layers not moved yet on the
    member, moved ones on their owner at the member's page offset."""
    off = member_offsets(gp)[j]
    segs: list[Segment] = []
    for l in range(gp.stages[-1].stop):
        stage, o = (members[gp.owner_index(l)].stage, off) if l in moved else (members[j].stage, 0)
        if segs and segs[-1].stage is stage and segs[-1].page_offset == o:
            segs[-1] = Segment(stage, segs[-1].layers + (l,), o)
        else:
            segs.append(Segment(stage, (l,), o))
    return segs


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
        self._todo = [list(gp.layer_order) for gp in plan.groups]
        self._moved: list[list[int]] = [[] for _ in plan.groups]
        self._begun = False
        self._t0 = 0.0
        self.done = False

    def holds(self, unit) -> bool:
        return False  # the members step between pieces

    def _piece_layers(self, gi: int) -> list[int]:
        """The next round of group gi (kunjax.control.plan.layer_rounds: one layer per stage), the
        owners with the fewest pages that hold data first (their chunks wait least for their pool)."""
        members = self.groups[gi]
        gp = self.plan.groups[gi]
        rnd = layer_rounds(self._todo[gi], gp.stages)[0]
        used = [sum(len(r.pages) for r in m.scheduler.running) for m in members]
        return sorted(rnd, key=lambda l: (used[gp.owner_index(l)], l))

    def _pages(self, gi: int) -> dict[str, np.ndarray]:
        arrays = {}
        for j, m in enumerate(self.groups[gi]):
            arrays[f"{j}"] = np.asarray(sorted({p for r in m.scheduler.running for p in r.pages}), np.int32)
        return arrays

    def advance(self, cluster) -> bool:
        t = time.perf_counter()
        try:
            if not self._begun:
                self._t0 = t
                cluster.run_op(DeviceOp(DROP_BEGIN, -1, {"plan": self.plan.to_dict()}))
                self._begun = True
                return False
            for gi in range(len(self.plan.groups)):
                if self._todo[gi]:
                    layers = self._piece_layers(gi)
                    cluster.run_op(DeviceOp(DROP_LAYERS, -1, {"group": gi, "layers": layers,
                                                               "chunk": cluster.chunk_pages}, self._pages(gi)))
                    self._todo[gi] = [l for l in self._todo[gi] if l not in layers]
                    self._moved[gi] += layers
                    return False
            report = cluster.run_op(DeviceOp(DROP_FINISH, -1, {}))
            self.outputs += adopt_after_drop(cluster, self.plan, report)
            cluster.emit(self.outputs)
            cluster.count_transition(report)
            self.done = True
            return True
        except PieceFailed as e:
            log.error("drop failed (%s); rolling back the %d layers moved", e, sum(map(len, self._moved)))
            arrays = {f"{gi}/{k}": v for gi in range(len(self.plan.groups)) for k, v in self._pages(gi).items()}
            cluster.count_transition(cluster.run_op(DeviceOp(DROP_ROLLBACK, -1, {"error": str(e)}, arrays)))
            self.done = True
            return True
        finally:
            self.report = cluster.drop_state.report if cluster.drop_state is not None else self.report
            dt = time.perf_counter() - t
            self.report.pieces += 1
            self.report.piece_seconds_max = max(self.report.piece_seconds_max, dt)
            self.report.piece_seconds_total += dt
            self.report.seconds = time.perf_counter() - self._t0


@dataclasses.dataclass
class DropState:
    """The device side of a drop under way, the same on every process."""

    plan: DropPlan
    groups: list  # members per group plan
    moved: list  # layers moved per group plan
    report: TransitionReport
    devices: list
    c0: int


def execute_drop_begin(cluster, op: DeviceOp) -> TransitionReport:
    plan = DropPlan.from_dict(op.args["plan"])
    groups = [check_members(cluster, gp) for gp in plan.groups]
    devices = [d for ms in groups for m in ms for d in m.devices if d.process_index == jax.process_index()]
    report = TransitionReport("drop", [])
    report.live_before = _live(devices)
    report.peak_live = dict(report.live_before)
    cluster.drop_state = DropState(plan, groups, [set() for _ in groups], report, devices,
                                   compile_stats.compile_count())
    for gp, members in zip(plan.groups, groups):
        for st_plan, m in zip(gp.stages, members):  # first room: the embedding and head copies
            freed = _drop_embed_head(m.stage, st_plan)
            for d in m.devices:
                report.freed_weight_bytes[str(d)] = report.freed_weight_bytes.get(str(d), 0) + freed
        _set_routes(members, gp, set())
    _sample_peak(report, devices)
    return report


def _set_routes(members, gp: GroupPlan, moved: set) -> None:
    """Every member's route for the layers moved so far; embedding and head where the plan keeps
    them (a member that gave its copies up embeds and samples on the keeper)."""
    embed = next(m.stage for m, st in zip(members, gp.stages) if st.embed)
    head = next(m.stage for m, st in zip(members, gp.stages) if st.head)
    for j, m in enumerate(members):
        m.set_route(member_route(members, gp, j, moved), embed, head)


def _move_layers_in(members, gp: GroupPlan, layers: list[int], src: list, chunk: int,
                    report: TransitionReport) -> None:
    """The piece's layers of every member into their owners' group pools, in phases so that room is
    freed before it is taken: (0) the members that give a layer up delete its weights; (1) layer by
    layer, every member gathers its pages that hold data (the chunks), then deletes its pool of the
    layer; (2) each owner allocates the layer's group pool and the chunks are scattered at
    their offset ids. On a failure every layer of the piece goes back (`_undo_piece`) and
    PieceFailed is raised."""
    from kunjax.memory import exchange

    offs = member_offsets(gp)
    devices = report_devices(members)
    # Phase 0: weights a member gives up go first (no step runs during the piece, and from the
    # next step on those layers run on their owners): the room the gathered pages take comes from
    # them, not from the activation reserve alone.
    freed_w: dict[tuple, int] = {}
    for l in layers:
        o = gp.owner_index(l)
        for j, m in enumerate(members):
            if j != o:
                freed_w[(l, j)] = delete_arrays(m.stage.layers.pop(l))
    held: dict[int, list] = {}
    done: list[int] = []
    pools = None
    old_sizes = [m.stage.pools[layers[0]][0].shape[1] for m in members]
    try:
        for l in layers:  # phase 1, layer by layer: the pages that hold data out, the old pools freed
            held[l] = [pages_out(m.stage, m.stage.pools[l], src[j], chunk, report.exchange)
                       for j, m in enumerate(members)]
            if l == layers[0]:  # the most held on top of the most still allocated
                _sample_peak(report, devices)
            for m in members:
                delete_arrays(m.stage.pools.pop(l))
        for l in layers:  # phase 2: each owner's group pool, the chunks scattered at offset ids
            owner = members[gp.owner_index(l)].stage
            if exchange.FAULT_HOOK is not None:
                exchange.FAULT_HOOK("allocate", {"layer": l})
            pools = new_pools(owner, gp.num_pages, report.exchange)
            for j, m in enumerate(members):
                pools = pages_in(owner, pools, held[l][j], [offs[j] + p for p in src[j]], chunk, report.exchange,
                                 src_mesh=m.stage.mesh)
            owner.pools[l], pools = pools, None
            done.append(l)
            _sample_peak(report, devices)  # the new pool with the chunks still held
            for c in held.pop(l):
                delete_arrays([x[:2] for x in c])
    except Exception as e:
        log.exception("drop: moving layers %s failed; they go back to the members", layers)
        _undo_piece(members, gp, layers, held, done, pools, old_sizes, src, chunk)
        held.clear()
        raise PieceFailed(f"layers {layers}: {e}") from None
    held.clear()
    for (l, j), freed in freed_w.items():
        for d in members[j].devices:
            report.freed_weight_bytes[str(d)] = report.freed_weight_bytes.get(str(d), 0) + freed


def _undo_piece(members, gp: GroupPlan, layers, held, done, pools, old_sizes, src, chunk) -> None:
    """Puts a failed piece's layers back on the members: weights from their owners, pages from the
    chunks (gathered but not yet scattered) or from the owner's group pool (already scattered)."""
    offs = member_offsets(gp)
    if pools is not None:
        delete_arrays(pools)  # a half-filled group pool (the traceback must not keep it alive)
    for l in layers:
        o = gp.owner_index(l)
        owner = members[o].stage
        if l in done:  # its chunks are gone: gather back from the group pool
            held[l] = [pages_out(owner, owner.pools[l], [offs[j] + p for p in src[j]], chunk, ExchangeStats())
                       for j in range(len(members))]
            delete_arrays(owner.pools.pop(l))
        for j, m in enumerate(members):
            st = m.stage
            if l not in st.layers:
                lp = owner.layers[l]
                st.layers[l] = move_tree(lp, {n: st.exes.layer_sh[n] for n in lp})
            if l not in st.pools:
                chunks = held.get(l, [None] * len(members))[j]
                fresh = st.exes.new_pools(old_sizes[j])
                st.pools[l] = (pages_in(st, fresh, chunks, src[j], chunk, ExchangeStats(), src_mesh=owner.mesh)
                               if chunks else fresh)
    for chunks in held.values():
        for c in chunks:
            if c:
                delete_arrays([x[:2] for x in c])


def report_devices(members) -> list:
    return [d for m in members for d in m.devices if d.process_index == jax.process_index()]


def execute_drop_layers(cluster, op: DeviceOp) -> None:
    state = cluster.drop_state
    gi = int(op.args["group"])
    gp, members = state.plan.groups[gi], state.groups[gi]
    src = [op.arrays[f"{j}"].tolist() for j in range(len(members))]
    layers = [int(l) for l in op.args["layers"]]
    _move_layers_in(members, gp, layers, src, int(op.args["chunk"]), state.report)
    state.moved[gi].update(layers)
    _set_routes(members, gp, state.moved[gi])


def execute_drop_finish(cluster, op: DeviceOp) -> TransitionReport:
    state = cluster.drop_state
    report = state.report
    for gp, members in zip(state.plan.groups, state.groups):
        group_id = cluster.next_group_id()
        report.groups.append(group_id)
        for st_plan, m in zip(gp.stages, members):
            freed = _drop_weights(m.stage, st_plan)
            for d in m.devices:
                report.freed_weight_bytes[str(d)] = report.freed_weight_bytes.get(str(d), 0) + freed
            m.stage.num_pages = gp.num_pages
            m.set_route(None)
        group = PipelineGroup(group_id, gp, members, Scheduler(
            group_scheduler_config(members[0].config.scheduler, len(members)), PageAllocator(gp.num_pages),
            members[0].page_size, members[0].max_model_len, members[0].scheduler.policy), members[0].eos_ids)
        if all(d.platform == "cpu" for m in members for d in m.devices):
            group.pipeline_depth = 1  # virtual CPU devices share the cores: stages never overlap there
        group.cost_model = getattr(cluster, "cost_model", None)  # lookahead micro-batches when there is one
        group.tpot_slo_ms = getattr(cluster, "tpot_slo_ms", None)
        cluster.replace_units(members, [group])
    _sample_peak(report, state.devices)
    report.live_after = _live(state.devices)
    report.compiles = compile_stats.compile_count() - state.c0
    report.state = "done"
    cluster.last_transition = report
    cluster.drop_state = None
    return report


def execute_drop_rollback(cluster, op: DeviceOp) -> TransitionReport:
    """Every moved layer goes back to the members (weights from the owner, pages from the group pool
    at their offsets), in reverse order; the members serve as before the drop."""
    state = cluster.drop_state
    report = state.report
    for gi, (gp, members, moved) in enumerate(zip(state.plan.groups, state.groups, state.moved)):
        offs = member_offsets(gp)
        src = [op.arrays[f"{gi}/{j}"].tolist() for j in range(len(members))]
        for l in [l for l in reversed(gp.layer_order) if l in moved]:
            o = gp.owner_index(l)
            owner = members[o].stage
            held = [pages_out(owner, owner.pools[l], [offs[j] + p for p in src[j]], cluster.chunk_pages,
                              report.exchange) for j in range(len(members))]
            delete_arrays(owner.pools.pop(l))
            for j, m in enumerate(members):
                st = m.stage
                if j != o:
                    lp = owner.layers[l]
                    st.layers[l] = move_tree(lp, {n: st.exes.layer_sh[n] for n in lp})
                fresh = new_pools(st, gp.pages_before[cluster.engines.index(m)], report.exchange)
                st.pools[l] = pages_in(st, fresh, held[j], src[j], cluster.chunk_pages, report.exchange,
                                       src_mesh=owner.mesh)
            moved.discard(l)
        embed = next(m.stage for m, st in zip(members, gp.stages) if st.embed)
        head = next(m.stage for m, st in zip(members, gp.stages) if st.head)
        for m in members:
            m.stage.restore_embed_head(embed, head)
            m.set_route(None)
    report.state = "rolled_back"
    report.error = op.args.get("error", "")
    report.live_after = _live(state.devices)
    report.compiles = compile_stats.compile_count() - state.c0
    cluster.last_transition = report
    cluster.drop_state = None
    return report


def _drop_weights(stage, st_plan) -> int:
    """Deletes what this stage no longer holds; returns the bytes per device freed."""
    freed = 0
    for l in [l for l in stage.layers if not st_plan.holds(l)]:
        freed += delete_arrays(stage.layers.pop(l))
    return freed + _drop_embed_head(stage, st_plan)


def _drop_embed_head(stage, st_plan) -> int:
    """Deletes the embedding and the head where the plan does not keep them."""
    freed = 0
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
