"""Live KV migration between instances (the Llumnix baseline), decided here, no JAX.

When an instance runs out of KV pages, its overload policy (`MigratePolicy`) asks the cluster's
`MigrationController` for relief before it preempts anyone:

- a running request (the latest arrival that has finished its prefill) is migrated to the instance
  with the most free pages, if that one can hold its pages with room to spare: a `MigrationTask`
  copies its full KV pages in bounded pieces between the two instances' steps while it keeps
  decoding on the source, then, in one last short piece, the few pages written since and the
  partial last page, and the request continues on the destination (same KV, new page ids). The
  source's pages are freed; the request that needed a page is stalled meanwhile (it keeps its pages
  and is scheduled again next step), not preempted;
- queued requests of the source (no KV yet) are re-dispatched to instances with room at once.

When no instance has room, the policy falls back to recompute preemption. The copies are cluster
device operations (`MIGRATE_COPY`, run through `Cluster.run_op`, so a multi-host follower replays
them); kunjax.runtime.migrate registers their handler (it reuses the exchange's compiled page
gather / scatter). The task follows the cluster loop's task protocol: `units`, `advance(cluster)`
(one bounded piece, only while neither unit has a step in flight), `holds(unit)`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

from kunjax.control.ops import DeviceOp
from kunjax.control.overload import Action, Preempt, Stall, latest_arrival
from kunjax.control.pages import OutOfPages, pages_for
from kunjax.control.request import Request, Status

log = logging.getLogger(__name__)

MIGRATE_COPY = "migrate_copy"


class MigratePolicy:
    """The per-instance side of live migration: stall and ask for a migration, else recompute."""

    name = "migrate"

    def __init__(self, relieve: Callable[[], bool]):
        self.relieve = relieve  # starts (or finds) a migration off this instance; False: none possible

    def on_out_of_pages(self, running: Sequence[Request], needing: Request) -> Action:
        if self.relieve():
            return Stall(needing)
        return Preempt(latest_arrival(running), "recompute")


class MigrationTask:
    """Moves one running request's KV from `src` to `dst` (two instances of the cluster)."""

    def __init__(self, controller: "MigrationController", src: Any, dst: Any, req: Request, dst_pages: list[int],
                 piece_pages: int, final_pages: int):
        self.controller = controller
        self.src, self.dst, self.req = src, dst, req
        self.units = (src, dst)
        self.dst_pages = dst_pages  # reserved on dst, in the order of req.pages
        self.copied = 0  # leading pages of req.pages already on dst
        self.piece_pages = piece_pages
        self.final_pages = final_pages
        self.bytes = 0
        self.seconds = 0.0
        self.started = controller.cluster.clock()
        self.preemptions = req.num_preemptions  # a preemption meanwhile abandons the migration
        self.done = False

    def holds(self, unit) -> bool:
        return False  # both instances keep stepping between pieces

    def _copy(self, cluster, src_ids: list[int], dst_ids: list[int]) -> None:
        c = self.controller
        res = cluster.run_op(DeviceOp(MIGRATE_COPY, -1, {"src": c.index(cluster, self.src), "dst": c.index(cluster, self.dst),
                                                         "src_pages": src_ids, "dst_pages": dst_ids}))
        self.bytes += int(res["bytes"])
        self.seconds += float(res["seconds"])

    def _abandon(self, why: str) -> bool:
        self.dst.scheduler.allocator.free(self.dst_pages)
        self.dst_pages = []
        log.info("migration of %s abandoned (%s); its pages on the destination are freed", self.req.request_id, why)
        self.done = True
        return True

    def advance(self, cluster) -> bool:
        req, s_src = self.req, self.src.scheduler
        if req.is_finished or req not in s_src.running or req.num_preemptions != self.preemptions:
            return self._abandon("it left the source's running set")
        full = min(req.num_computed // s_src.page_size, len(req.pages))  # pages that will not change again
        if full - self.copied > self.final_pages:  # a piece while it keeps decoding on the source
            n = min(self.piece_pages, full - self.copied)
            self._copy(cluster, req.pages[self.copied:self.copied + n], self.dst_pages[self.copied:self.copied + n])
            self.copied += n
            return False
        return self._finish(cluster)

    def _finish(self, cluster) -> bool:
        """The last piece: the remaining pages, then the request runs on the destination."""
        req, s_src, s_dst = self.req, self.src.scheduler, self.dst.scheduler
        need = len(req.pages) - len(self.dst_pages)
        if need > 0:
            try:
                self.dst_pages += s_dst.allocator.allocate(need)
            except OutOfPages:
                return self._abandon("the destination ran out of pages")
        if len(s_dst.running) >= s_dst.config.max_num_seqs:
            return self._abandon("the destination runs max_num_seqs requests")
        self._copy(cluster, req.pages[self.copied:], self.dst_pages[self.copied:len(req.pages)])
        extra = self.dst_pages[len(req.pages):]
        if extra:  # reserved for growth that did not happen
            s_dst.allocator.free(extra)
        s_src.running.remove(req)
        s_src.allocator.free(req.pages)
        req.pages = self.dst_pages[:len(req.pages)]
        self.dst_pages = []
        taken, detok = self.src.take(req.request_id)
        self.dst.adopt(taken, detok)
        s_dst.running.append(req)
        cluster.move_requests([req.request_id], self.dst)
        s_src.num_migrations_out += 1
        s_dst.num_migrations_in += 1
        s_src.migrated_bytes += self.bytes
        c = self.controller
        s_src.events.record("migrate", req.request_id, bytes=self.bytes, tokens=req.num_computed, seconds=self.seconds,
                            target=c.index(cluster, self.dst))
        log.info("migrated %s (%d tokens of KV, %.2f MiB in %.1f ms of copies over %.2f s) from instance %d to %d",
                 req.request_id, req.num_computed, self.bytes / 2**20, 1e3 * self.seconds, cluster.clock() - self.started,
                 c.index(cluster, self.src), c.index(cluster, self.dst))
        self.done = True
        return True


class MigrationController:
    """Cluster-wide: picks what to migrate where, starts the tasks, re-dispatches queued requests."""

    def __init__(self, cluster, piece_pages: int = 16, final_pages: int = 2, headroom_pages: int = 2):
        self.cluster = cluster
        self.piece_pages = piece_pages
        self.final_pages = final_pages
        self.headroom = headroom_pages
        self.active: dict[int, MigrationTask] = {}  # id(source unit) -> its migration under way

    @staticmethod
    def index(cluster, unit) -> int:
        return cluster.units.index(unit)

    def policy_for(self, unit) -> MigratePolicy:
        return MigratePolicy(lambda: self.relieve(unit))

    def _migratable(self, unit) -> bool:
        return unit in self.cluster.units and hasattr(unit, "scheduler") and hasattr(unit, "take")

    def relieve(self, src) -> bool:
        """Called by `src`'s scheduler when a running request needs a page and none is free."""
        task = self.active.get(id(src))
        if task is not None and not task.done:
            return True
        if not self._migratable(src):
            return False
        self.redispatch(src)
        s = src.scheduler
        moving = {id(t.req) for t in self.active.values() if not t.done}
        candidates = [r for r in s.running if r.num_pending == 1 and id(r) not in moving and r.pages]
        others = [u for u in self.cluster.units if u is not src and self._migratable(u)
                  and id(u) not in {id(t.dst) for t in self.active.values() if not t.done}]
        if not candidates or not others:
            return False
        req = latest_arrival(candidates)
        dst = max(others, key=lambda u: u.scheduler.allocator.num_free - self._queued_pages(u))
        d = dst.scheduler
        need = len(req.pages) + self.headroom
        if (d.allocator.num_free - self._queued_pages(dst) < need or len(d.running) >= d.config.max_num_seqs
                or d.page_size != s.page_size):
            return False
        pages = d.allocator.allocate(need)
        task = MigrationTask(self, src, dst, req, pages, self.piece_pages, self.final_pages)
        self.active = {k: t for k, t in self.active.items() if not t.done}
        self.active[id(src)] = task
        self.cluster.start_task(task)
        log.info("migrating %s (%d pages) from instance %d to %d", req.request_id, len(req.pages),
                 self.index(self.cluster, src), self.index(self.cluster, dst))
        return True

    @staticmethod
    def _queued_pages(unit) -> int:
        s = unit.scheduler
        return sum(pages_for(r.num_tokens, s.page_size) for r in s.waiting)

    def redispatch(self, src) -> int:
        """Moves queued requests of `src` (newest first) to the instance with the most room left,
        while it can admit them; returns how many moved."""
        s, moved = src.scheduler, 0
        for req in reversed(list(s.waiting)):
            if req.status != Status.WAITING or req.num_computed:
                continue
            others = [u for u in self.cluster.units if u is not src and self._migratable(u)]
            if not others:
                break
            dst = max(others, key=lambda u: u.scheduler.allocator.num_free - self._queued_pages(u))
            need = pages_for(req.num_tokens, s.page_size)
            if dst.scheduler.allocator.num_free - self._queued_pages(dst) < need + self.headroom:
                break
            s.waiting.remove(req)
            taken, detok = src.take(req.request_id)
            dst.adopt(taken, detok)
            dst.scheduler.waiting.append(req)
            self.cluster.move_requests([req.request_id], dst)
            s.events.record("redispatch", req.request_id, tokens=req.num_tokens, target=self.index(self.cluster, dst))
            log.info("re-dispatched queued %s from instance %d to %d", req.request_id, self.index(self.cluster, src),
                     self.index(self.cluster, dst))
            moved += 1
        return moved


def install(cluster, **kw) -> Optional[MigrationController]:
    """Gives every instance of `cluster` the migrate policy, backed by one controller."""
    controller = MigrationController(cluster, **kw)
    for unit in cluster.units:
        if hasattr(unit, "scheduler"):
            unit.scheduler.policy = controller.policy_for(unit)
    return controller
