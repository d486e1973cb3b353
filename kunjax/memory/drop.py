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
2. `drop_layers` (repeated; one atom of the plan's each, GroupPlan.drop_atoms: a single
   layer where memory allows, else a whole round of one layer per stage; a piece of the task runs
   as many as its pacer gives it, kunjax.control.transition.PiecePacer): for
   the atom's layers every member gathers the pages that
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

import jax

from kunjax.control.ops import DeviceOp
from kunjax.control.transition import (DROP_BEGIN, DROP_FINISH, DROP_LAYERS, DROP_ROLLBACK,  # noqa: F401
                                       DropError, DropTask, PieceFailed, TransitionReport, adopt_after_drop,
                                       check_members)
from kunjax.memory import measure
from kunjax.memory.exchange import ExchangeStats, delete_arrays, new_pools, pages_in, pages_out
from kunjax.control.group import group_scheduler
from kunjax.memory.group import PipelineGroup
from kunjax.control.plan import DropPlan, GroupPlan, member_offsets
from kunjax.runtime import compile_stats
from kunjax.runtime.runner import Segment
from sharding.transfer import move_tree

log = logging.getLogger(__name__)


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
                                   compile_stats.foreground_compile_count())
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
        group = PipelineGroup(group_id, gp, members, group_scheduler(members, gp), members[0].eos_ids)
        if all(d.platform == "cpu" for m in members for d in m.devices):
            group.pipeline_depth = 1  # virtual CPU devices share the cores: stages never overlap there
        group.configure(cluster)  # lookahead micro-batches when the cluster has a cost model
        cluster.replace_units(members, [group])
    _sample_peak(report, state.devices)
    report.live_after = _live(state.devices)
    report.compiles = compile_stats.foreground_compile_count() - state.c0
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
    report.compiles = compile_stats.foreground_compile_count() - state.c0
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


