"""Continuous batching with chunked prefill: plain Python over requests and a page allocator.

Each call of `schedule()` returns the rows of exactly one step, either a prefill step (chunks of
prompts under a token budget) or a decode step (one token for every running request). Prefill and
decode alternate while both have work, so a burst of prompts cannot stall running streams for more
than one step. When pages run out during decode, the unit's overload policy (kunjax.control.overload) picks a victim and how to free its
pages: by recompute (its pages are freed and it goes back to the head of the queue with its
generated tokens, which are recomputed as part of its prompt: the vLLM baseline) or by a swap (its
KV is copied to host memory; it waits in `swapped` and comes back, before any new admission, once
its pages fit again). A swap is device work: the scheduler queues it in `moves` (page ids, in
order), and the unit carries the moves out at the start of its next step, before that step writes
into the freed pages (`take_moves`).

The scheduler knows nothing about JAX; the same object drives the real runner and a simulator.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Optional

from kunjax.control.batch import Row, ScheduledStep, split_rows
from kunjax.control.clock import UNIX, WALL, Clock
from kunjax.control.events import EventLog
from kunjax.control.overload import OverloadPolicy, Preempt, RecomputePolicy, Stall
from kunjax.control.pages import OutOfPages, PageAllocator, pages_for
from kunjax.control.request import FinishReason, Request, Status

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32  # running requests (decode batch) at most
    max_num_batched_tokens: int = 512  # prefill token budget per step
    max_prefill_rows: int = 4  # prompts chunked into one prefill step at most
    max_queue: int = 4096  # waiting requests; beyond this add_request refuses
    max_chunk_tokens: Optional[int] = None  # prefill tokens of one row per step (default: the step budget)
    # Packed prefill (offline runs): > 0 splits every prefill chunk into rows of at most this many
    # tokens, charged to the budget in whole rows, so a step is (budget / prefill_segment) rows of
    # prefill_segment tokens whatever the prompts' lengths, padded by at most one partial row per
    # prompt (one row per prompt pads every prompt to the step's longest, rounded up to a power of
    # two: 2.5x the tokens of 32 prompts of 16-200 tokens). 0: one row per prompt (a server).
    prefill_segment: int = 0
    # Prefill every prompt that can be admitted before decoding (offline throughput: every decode step
    # runs the whole batch); False alternates prefill and decode steps (streams keep flowing).
    prefill_first: bool = False

    def __post_init__(self):
        if not 0 <= self.prefill_segment <= self.max_num_batched_tokens:
            # a longer row would never fit a step: the scheduler would schedule nothing, for ever
            raise ValueError(f"prefill_segment must be between 0 and max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}, got {self.prefill_segment}")


class QueueFull(Exception):
    pass


# The scheduler's cumulative overload counters, as Status names them -> the attribute holding each.
COUNTERS = {"preemptions": "num_preemptions", "recomputed_tokens": "num_recomputed_tokens",
            "swap_outs": "num_swap_outs", "swap_ins": "num_swap_ins", "migrations_out": "num_migrations_out",
            "migrations_in": "num_migrations_in", "migrated_bytes": "migrated_bytes"}


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, page_size: int, max_model_len: int,
                 policy: Optional[OverloadPolicy] = None, clock: Optional[Clock] = None,
                 event_clock: Optional[Clock] = None):
        """`clock`: where every timestamp comes from (kunjax.control.clock; default the wall clock;
        the overload event log then stamps Unix time, otherwise the same clock); `event_clock`: the
        event log's own, when it differs (a group's scheduler takes its members' Unix-time log clock,
        so its events land on the same time axis as theirs)."""
        self.config = config
        self.clock = clock or WALL
        self.policy = policy or RecomputePolicy()
        self.allocator = allocator
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._last_was_prefill = False
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0
        self.out_of_pages_events = 0  # times a running request found no free page
        self.swapped: collections.deque[Request] = collections.deque()  # KV in host memory, oldest first
        self.moves: list[dict] = []  # device work the next step carries out first (swap out / in / discard)
        self.swap_capacity_pages = 0  # host pool bound, in pages (0: no swapping, recompute instead)
        self.host_pages = 0  # pages held in host memory now (by the requests in `swapped`)
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.num_migrations_out = 0  # live migrations off / onto this unit (kunjax.control.migration)
        self.num_migrations_in = 0
        self.migrated_bytes = 0
        # One entry per overload decision (Admin.Status returns them).
        self.events = EventLog(clock=event_clock or clock or UNIX)

    # ---- admission -------------------------------------------------------------------------
    def max_tokens_fit(self, req: Request) -> bool:
        """Could this request ever run to its max_tokens with the whole cache to itself?"""
        total = len(req.prompt_token_ids) + req.params.max_tokens
        return pages_for(total, self.page_size) <= self.allocator.num_usable

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"queue full ({self.config.max_queue} waiting requests)")
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def abort(self, req: Request, reason: FinishReason = FinishReason.ABORT) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.swapped:
            self.swapped.remove(req)
            self._release_host(req)
        self.finish(req, reason)

    def _release_host(self, req: Request) -> None:
        """Its host copy is no longer needed: a swap out not carried out yet is dropped, else the
        copy is discarded (the unit frees it)."""
        self.host_pages -= req.host_pages
        req.host_pages = 0
        pending = [m for m in self.moves if m["kind"] == "swap_out" and m["request_id"] == req.request_id]
        if pending:
            self.moves.remove(pending[0])
        else:
            self.moves.append({"kind": "discard", "request_id": req.request_id})

    def finish(self, req: Request, reason: FinishReason) -> None:
        if req.pages:
            self.allocator.free(req.pages)
            req.pages = []
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = self.clock()

    # ---- pages -----------------------------------------------------------------------------
    def _grow(self, req: Request, num_tokens: int) -> bool:
        need = pages_for(num_tokens, self.page_size) - len(req.pages)
        if need <= 0:
            return True
        try:
            req.pages.extend(self.allocator.allocate(need))
            return True
        except OutOfPages:
            return False

    # ---- counters --------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The cumulative overload counters (COUNTERS' names)."""
        return {name: int(getattr(self, attr)) for name, attr in COUNTERS.items()}

    def absorb_counters(self, other: "Scheduler") -> None:
        """Adds `other`'s cumulative counters to this one's: a pipeline group's, into its first
        member's when the group splits, so the cluster's totals survive the group."""
        for attr in COUNTERS.values():
            setattr(self, attr, getattr(self, attr) + getattr(other, attr))

    def preempt(self, victim: Request) -> None:
        """Recompute preemption: the victim's pages are freed, its KV is forgotten."""
        self.running.remove(victim)
        self.allocator.free(victim.pages)
        victim.pages = []
        self.num_recomputed_tokens += victim.num_computed
        victim.num_computed = 0
        victim.num_preemptions += 1
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        self.events.record("preempt", victim.request_id, tokens=victim.num_tokens)
        log.info("preempted %s (recompute %d tokens); free pages %d/%d", victim.request_id,
                 victim.num_tokens, self.allocator.num_free, self.allocator.num_usable)

    def swap_out(self, victim: Request) -> bool:
        """Swap preemption: the victim's pages are queued to be copied to host memory and freed now.
        False (nothing done) when the host pool cannot hold them."""
        n = len(victim.pages)
        if self.host_pages + n > self.swap_capacity_pages:
            log.info("swap of %s (%d pages) does not fit the host pool (%d of %d pages held); recompute instead",
                     victim.request_id, n, self.host_pages, self.swap_capacity_pages)
            return False
        self.running.remove(victim)
        self.moves.append({"kind": "swap_out", "request_id": victim.request_id, "pages": list(victim.pages)})
        self.allocator.free(victim.pages)
        victim.pages = []
        victim.host_pages = n
        self.host_pages += n
        victim.num_preemptions += 1
        victim.status = Status.SWAPPED
        self.swapped.append(victim)
        self.num_preemptions += 1
        self.num_swap_outs += 1
        log.info("swapped out %s (%d pages, %d tokens of KV); free pages %d/%d, host pool %d/%d pages",
                 victim.request_id, n, victim.num_computed, self.allocator.num_free, self.allocator.num_usable,
                 self.host_pages, self.swap_capacity_pages)
        return True

    def _swap_in(self) -> None:
        """Brings swapped requests back, oldest first, while their pages fit with one spare page per
        running request (so the next decode step does not swap them straight out again)."""
        while self.swapped and len(self.running) < self.config.max_num_seqs:
            req = self.swapped[0]
            if req.host_pages + len(self.running) > self.allocator.num_free:
                return
            self.swapped.popleft()
            req.pages = self.allocator.allocate(req.host_pages)
            self.moves.append({"kind": "swap_in", "request_id": req.request_id, "pages": list(req.pages)})
            self.host_pages -= req.host_pages
            req.host_pages = 0
            req.status = Status.RUNNING
            self.running.append(req)
            self.num_swap_ins += 1
            log.info("swapping in %s (%d pages); free pages %d/%d", req.request_id, len(req.pages),
                     self.allocator.num_free, self.allocator.num_usable)

    def reconfigure(self, config: SchedulerConfig) -> None:
        """Another config from the next step on (an offline run packs its prefill while it lasts)."""
        self.config = config

    def take_moves(self) -> list[dict]:
        """The queued device work, in order; the unit runs it before the step it prepares."""
        moves, self.moves = self.moves, []
        return moves

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> Optional[ScheduledStep]:
        if self.swapped:
            self._swap_in()
        decode_ready = [r for r in self.running if r.num_pending == 1]
        has_prefill = any(r.num_pending > 1 for r in self.running) or bool(self.waiting)
        if has_prefill and not (decode_ready and self._last_was_prefill and not self.config.prefill_first):
            step = self._schedule_prefill()
            if step is not None:
                self._last_was_prefill = True
                return step
        if decode_ready:
            self._last_was_prefill = False
            return self._schedule_decode()
        return None

    def _schedule_prefill(self) -> Optional[ScheduledStep]:
        seg = self.config.prefill_segment
        budget = self.config.max_num_batched_tokens
        cap = self.config.max_chunk_tokens or budget
        rows: list[Row] = []
        # With packed prefill the budget is spent in whole rows of `seg` tokens and caps the rows by
        # itself; otherwise a row is a prompt and max_prefill_rows caps them.
        full = lambda: not seg and len(rows) >= self.config.max_prefill_rows  # noqa: E731
        for req in [r for r in self.running if r.num_pending > 1]:
            if self._room(budget) <= 0 or full():
                break
            n = min(req.num_pending, self._room(budget), cap)
            if not self._grow(req, req.num_computed + n):
                n = min(n, len(req.pages) * self.page_size - req.num_computed)
                if n <= 0:
                    continue
            rows.append(Row(req, req.num_computed, n))
            budget -= self._cost(n)
        while (self.waiting and not self.swapped and self._room(budget) > 0 and not full()
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            # Admit only when the whole (re)prompt fits, so an admitted prompt never stalls half-way.
            if pages_for(req.num_tokens, self.page_size) > self.allocator.num_free:
                break
            self.waiting.popleft()
            n = min(req.num_pending, self._room(budget), cap)
            self._grow(req, req.num_computed + n)
            req.status = Status.RUNNING
            if req.scheduled_time is None:
                req.scheduled_time = self.clock()
            self.running.append(req)
            rows.append(Row(req, req.num_computed, n))
            budget -= self._cost(n)
        if seg:
            rows = split_rows(rows, seg)
        return ScheduledStep(rows, prefill=True) if rows else None

    def _room(self, budget: int) -> int:
        """Prefill tokens one more row may take out of what is left of the budget (packed prefill:
        whole rows of prefill_segment tokens)."""
        seg = self.config.prefill_segment
        return budget - budget % seg if seg else budget

    def _cost(self, n: int) -> int:
        """What n prefill tokens take from the budget: packed, their rows' padded tokens."""
        seg = self.config.prefill_segment
        return -(-n // seg) * seg if seg else n

    def _schedule_decode(self) -> Optional[ScheduledStep]:
        ready = sorted((r for r in self.running if r.num_pending == 1), key=lambda r: r.arrival_time)
        rows: list[Row] = []
        for req in ready:
            if req.status != Status.RUNNING:
                continue  # preempted below as a victim
            stalled = False
            while not self._grow(req, req.num_tokens):
                self.out_of_pages_events += 1
                action = self.policy.on_out_of_pages(list(self.running), req)
                if isinstance(action, Stall):
                    if action.request is not req:
                        raise ValueError(f"overload policy {self.policy.name!r} stalled {action.request.request_id}, "
                                         f"not the request that needs a page ({req.request_id})")
                    stalled = True
                    break
                if not isinstance(action, Preempt) or action.how not in ("recompute", "swap"):
                    raise ValueError(f"overload policy {self.policy.name!r} returned {action!r}, which this "
                                     f"scheduler cannot carry out")
                if action.how != "swap" or not self.swap_out(action.victim):
                    self.preempt(action.victim)
                rows = [r for r in rows if r.request is not action.victim]
                if action.victim is req:
                    break
            if req.status == Status.RUNNING and not stalled:
                rows.append(Row(req, req.num_computed, 1))
        return ScheduledStep(rows, prefill=False) if rows else None

    # ---- after the step --------------------------------------------------------------------
    def postprocess(self, step: ScheduledStep, tokens, eos_ids: tuple[int, ...]) -> list[Request]:
        """Appends sampled tokens; finishes requests on length / EOS / stop ids. Returns the rows'
        requests that got a new token."""
        now = self.clock()
        updated = []
        for row, tok in zip(step.rows, tokens):
            req = row.request
            req.num_computed = row.start + row.n
            if not row.samples or req.status != Status.RUNNING:
                continue
            tok = int(tok)
            req.output_token_ids.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
            updated.append(req)
            p = req.params
            if (not p.ignore_eos and tok in eos_ids) or tok in p.stop_token_ids:
                self._finish_running(req, FinishReason.STOP)
            elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
                self._finish_running(req, FinishReason.LENGTH)
        return updated

    def _finish_running(self, req: Request, reason: FinishReason) -> None:
        if req in self.running:
            self.running.remove(req)
        self.finish(req, reason)
