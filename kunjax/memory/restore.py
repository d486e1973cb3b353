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
- `restore_layers` (repeated, one round of the drop's each, the rounds in reverse order; a piece
  of the task runs as many as its pacer gives it, kunjax.control.transition.PiecePacer): the
  owners gather the round's layers' pages that hold data
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

import jax

from kunjax.control.ops import DeviceOp
from kunjax.control.transition import (RESTORE_BEGIN, RESTORE_FINISH, RESTORE_LAYERS,  # noqa: F401
                                       RestoreError, RestoreRouting, RestoreTask, adopt_after_restore,
                                       prepare_restore)
from kunjax.memory.drop import TransitionReport, _live, _sample_peak
from kunjax.memory.exchange import delete_arrays, new_pools, pages_in, pages_out
from kunjax.runtime import compile_stats
from sharding.transfer import move_tree

log = logging.getLogger(__name__)


def execute_restore_begin(cluster, op: DeviceOp) -> TransitionReport:
    group = cluster.group(int(op.args["group"]))
    devices = [d for m in group.members for d in m.devices if d.process_index == jax.process_index()]
    report = TransitionReport("restore", [group.id])
    report.live_before = _live(devices)
    report.peak_live = dict(report.live_before)
    group.restoring = {"report": report, "devices": devices, "c0": compile_stats.foreground_compile_count(),
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
    report.compiles = compile_stats.foreground_compile_count() - st8["c0"]
    report.state = "done"
    group.state = "split"
    group.restoring = None
    group.restored = set()
    cluster.last_transition = report
    return report


