"""Restore: a pipeline group splits back into its instances, every weight back on every member.

Requests still running are gathered back: each goes to one member (largest first onto the member
with the most room, kunjax.control.plan.assign_requests) and its KV of every layer is copied from the
stage that owns the layer into that member's restored pools. We chose this over letting them finish
in the group because a long generation would otherwise hold the whole group (and its pipeline
overhead) until it ends; a restore costs one copy of the pages that hold data, the same bytes a drop
moved. Three parts, as for a drop:

1. `prepare_restore` (controller): the assignment and the page moves; refused (RestoreError) when
   the running requests do not fit the split instances or the transition would not fit memory.
2. `execute_restore` (every process, a logged device operation): layer by layer, in the plan's
   order, every member allocates the layer's instance pools and receives the layer's weights from
   the stage that kept them (device to device, never from disk), the owner's pages move to the
   members that now hold each request, and the owner deletes its group pools of that layer, so the
   group room is released as the restored layers arrive; embedding and head last.
3. `adopt_after_restore` (controller): requests move to their members' schedulers, queued ones to
   the member with the most free pages.
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
from kunjax.memory.exchange import copy_pages, delete_arrays, pages_in, pages_out
from kunjax.control.plan import assign_requests, compact_pages, simulate_restore
from kunjax.runtime import compile_stats
from sharding.transfer import move, move_tree

log = logging.getLogger(__name__)

RESTORE = "restore"


class RestoreError(ValueError):
    """The group cannot split now (names why); nothing was changed."""


def prepare_restore(cluster, group, infos: dict) -> DeviceOp:
    """The logged device operation of a restore (`infos`: MemberInfo of each member, for the memory
    check)."""
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
    return DeviceOp(RESTORE, -1, {"group": group.id, "chunk": cluster.chunk_pages, "order": order,
                                  "assign": [assign[rid] for rid in order]}, arrays)


def execute_restore(cluster, op: DeviceOp) -> TransitionReport:
    group = cluster.group(int(op.args["group"]))
    chunk = int(op.args["chunk"])
    plan = group.plan
    members = group.members
    t0 = time.perf_counter()
    c0 = compile_stats.compile_count()
    report = TransitionReport("restore", [group.id])
    devices = [d for m in members for d in m.devices if d.process_index == jax.process_index()]
    report.live_before = _live(devices)
    report.peak_live = dict(report.live_before)
    pages = {j: plan.pages_before[cluster.engines.index(m)] for j, m in enumerate(members)}
    src = {j: op.arrays[f"{j}/src"].tolist() for j in pages}
    dst = {j: op.arrays[f"{j}/dst"].tolist() for j in pages}
    lost: dict[int, set] = {j: set() for j in pages}
    # Phase 1: every group pool shrinks to the compact size; the running requests' pages move to
    # compact ids 1..n in member order, and the room beyond is freed before any layer comes back.
    small = compact_pages(plan)
    group_ids = [p for j in pages for p in src[j]]
    compact = {p: i + 1 for i, p in enumerate(group_ids)}
    for l in plan.layer_order:
        owner = members[plan.owner_index(l)].stage
        held = pages_out(owner, owner.pools[l], group_ids, chunk, report.exchange)  # only pages with data
        _sample_peak(report, devices)
        delete_arrays(owner.pools.pop(l))
        owner.pools[l] = pages_in(owner, owner.exes.new_pools(small), held, [compact[p] for p in group_ids], chunk,
                                  report.exchange)
        _sample_peak(report, devices)
        del held
        owner.num_pages = small
    src = {j: [compact[p] for p in src[j]] for j in src}
    # Phase 2: layer by layer, every member rebuilds the layer from its owner's compact pool.
    for l in plan.layer_order:
        o = plan.owner_index(l)
        owner = members[o].stage
        group_pools = owner.pools[l]
        for j, m in enumerate(members):
            st = m.stage
            if j != o:
                lp = owner.layers[l]
                st.layers[l] = move_tree(lp, {n: st.exes.layer_sh[n] for n in lp})
            pools = st.exes.new_pools(pages[j])
            _sample_peak(report, devices)
            pools = copy_pages(owner, group_pools, st, pools, src[j], dst[j], chunk, report.exchange, "restore",
                               {"group": group.id, "layer": l, "member": j}, lost[j])
            if j == o:
                new_own = pools
            else:
                st.pools[l] = pools
            _sample_peak(report, devices)
        delete_arrays(group_pools)
        owner.pools[l] = new_own
    embed_holder = next(m.stage for m, st in zip(members, plan.stages) if st.embed)
    head_holder = next(m.stage for m, st in zip(members, plan.stages) if st.head)
    for m in members:
        st = m.stage
        if st.embed is None:
            st.embed = move(embed_holder.embed, st.exes.embed_sh)
        if st.head is None:
            st.head = {n: (st.embed if n == "embed" else move(a, st.exes.head_sh[n]))
                       for n, a in head_holder.head.items()}
        st.num_pages = pages[members.index(m)]
        _sample_peak(report, devices)
    for j, pages_lost in lost.items():  # restore: keyed by instance, that instance's page ids
        if pages_lost:
            report.failed_pages[cluster.engines.index(members[j])] = sorted(pages_lost)
    cluster.replace_units([group], members)
    report.live_after = _live(devices)
    report.seconds = time.perf_counter() - t0
    report.compiles = compile_stats.compile_count() - c0
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
