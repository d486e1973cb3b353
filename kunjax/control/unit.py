"""The step-unit interface the cluster loop drives, and the host half every unit shares.

A step unit is whatever runs one step at a time over one KV page space: a serving instance today, a
pipeline group of merged instances after a parameter drop. The cluster loop (kunjax.control.cluster)
reaches a unit only through this interface:

    schedule()            -> the next ScheduledStep, or None          (host: scheduler + pages)
    prepare(step)         -> DeviceOp: the step as data                (host: padded batch arrays)
    execute(op)           -> an in-flight handle                       (device: every process runs it)
    finish(step, handle)  -> RequestOutputs                            (host: waits for tokens, applies)
    view() / status()     -> plain numbers for dispatch, policies and Admin.Status

`UnitCore` is the host half: scheduler, request table and streaming detokenizers. It imports no JAX,
so a unit whose device half is a fake (tests) or a cost model (a simulator) runs the very same
scheduling and bookkeeping.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Protocol, Sequence

from kunjax.control.batch import ScheduledStep
from kunjax.control.ops import DeviceOp
from kunjax.control.pages import pages_for
from kunjax.control.request import FinishReason, Request, RequestOutput, TokenLogprob
from kunjax.control.scheduler import Scheduler


@dataclasses.dataclass(frozen=True)
class UnitView:
    """What dispatch and the overload policies see of a unit."""

    index: int
    pages_total: int
    pages_free: int
    queued_pages: int  # pages the waiting requests need for their (re)prompts
    running: int
    waiting: int
    page_size: int
    # Pages the unfinished requests (running and waiting) are still expected to take as they
    # generate: to their max_tokens, or to the unit's typical output length when that is shorter
    # (UnitCore.expected_remaining). The overload monitor looks ahead with it.
    growth_pages: int = 0
    instances: tuple[int, ...] = ()  # the instances this unit is made of (a group: its members in stage order)
    group: Optional[int] = None  # the pipeline group's id; None for a single instance
    base_pages: int = 0  # a group: the pages its members have once split again (0: pages_total)
    transitioning: bool = False  # a drop or restore of this unit is under way

    @property
    def members(self) -> tuple[int, ...]:
        """Instance ids of the unit (a unit built without them: its index)."""
        return self.instances or (self.index,)

    @property
    def is_group(self) -> bool:
        return self.group is not None

    @property
    def pages_used(self) -> int:
        return self.pages_total - self.pages_free

    @property
    def demand_pages(self) -> int:
        """Pages the unit's requests hold, wait for and are expected to grow into."""
        return self.pages_used + self.queued_pages + self.growth_pages


TYPICAL_OUTPUT_WEIGHT = 0.1  # weight of each finished request in UnitCore.typical_output


class StepUnit(Protocol):
    def add(self, request: Request, detokenizer: Any = None) -> None: ...
    def abort(self, request_id: str) -> Optional[RequestOutput]: ...
    def has_unfinished(self) -> bool: ...
    def schedule(self) -> Optional[ScheduledStep]: ...
    def prepare(self, step: ScheduledStep) -> DeviceOp: ...
    def execute(self, op: DeviceOp) -> Any: ...
    def finish(self, step: ScheduledStep, handle: Any) -> list[RequestOutput]: ...
    def view(self, index: int = 0, **identity) -> UnitView: ...
    def status(self) -> dict: ...


class UnitCore:
    """Scheduler, requests and detokenizers of one unit (host side, no JAX)."""

    def __init__(self, scheduler: Scheduler, eos_ids: Sequence[int] = ()):
        self.scheduler = scheduler
        self.eos_ids = tuple(eos_ids)
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, Any] = {}
        self.num_steps = 0
        self.last_wait_s = 0.0  # how long `finish` of the last step waited for the device
        self.typical_output: Optional[float] = None  # moving average of finished requests' output tokens
        # Steps per needed shape (a unit with `buckets`): what a pipeline group these instances form is
        # likely to need first (MechanismCluster compiles those for it as its drop starts).
        self.shape_counts: collections.Counter = collections.Counter()

    @property
    def allocator(self):
        return self.scheduler.allocator

    def add(self, request: Request, detokenizer: Any = None) -> None:
        """Queues a validated request (its `detokenizer`, if any, turns its tokens into text)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.scheduler.add(request)
        self.requests[request.request_id] = request
        if detokenizer is not None:
            self._detok[request.request_id] = detokenizer

    def take(self, request_id: str) -> tuple[Request, Any]:
        """Removes a request from this unit's tables (not from its scheduler) and returns it with
        its detokenizer: it moves to another unit (a drop, a restore)."""
        return self.requests.pop(request_id), self._detok.pop(request_id, None)

    def adopt(self, request: Request, detokenizer: Any = None) -> None:
        """Takes a request that another unit ran (its scheduler state is set by the caller)."""
        self.requests[request.request_id] = request
        if detokenizer is not None:
            self._detok[request.request_id] = detokenizer

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self.scheduler.abort(req, FinishReason.ABORT)
        return self.output(req, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def schedule(self) -> Optional[ScheduledStep]:
        step = self.scheduler.schedule()
        buckets = getattr(self, "buckets", None)
        if step is not None and buckets is not None:
            self.shape_counts[buckets.needed(step.rows, step.prefill)] += 1
        return step

    def apply(self, step: ScheduledStep, tokens: Sequence[int], logprobs: Optional[tuple] = None) -> list[RequestOutput]:
        """Applies a step's sampled tokens: appends, finishes, detokenizes. `logprobs`: the penalty
        head's (chosen, top values, top ids) per row, for the requests that asked for them."""
        self.num_steps += 1
        row_of = {row.request.request_id: i for i, row in enumerate(step.rows)} if logprobs is not None else {}
        updated = self.scheduler.postprocess(step, tokens, self.eos_ids)
        outs = []
        for req in updated:
            lps = []
            k = req.params.logprobs
            if k is not None and req.request_id in row_of:
                i = row_of[req.request_id]
                chosen, vals, ids = logprobs
                lps = [TokenLogprob(req.output_token_ids[-1], float(chosen[i]),
                                    tuple((int(t), float(v)) for t, v in zip(ids[i][:k], vals[i][:k])))]
            outs.append(self.output(req, [req.output_token_ids[-1]], lps))
        return outs

    def output(self, req: Request, new_ids: list[int], new_logprobs: Sequence = ()) -> RequestOutput:
        delta = ""
        detok = self._detok.get(req.request_id)
        if detok is not None:
            visible = [t for t in new_ids if not (req.is_finished and req.finish_reason == FinishReason.STOP
                                                  and t in self.eos_ids + req.params.stop_token_ids)]
            delta = detok.add(visible) if visible else ""
            if req.is_finished:
                delta += detok.flush()
            if req.params.stop and not (req.is_finished and req.finish_reason == FinishReason.STOP):
                delta = self._apply_stop_strings(req, detok, delta)
        out = RequestOutput(
            request_id=req.request_id, new_token_ids=list(new_ids), token_ids=list(req.output_token_ids),
            finished=req.is_finished, finish_reason=req.finish_reason.value if req.finish_reason else None,
            text=detok.text if detok else "", text_delta=delta, prompt_tokens=len(req.prompt_token_ids),
            ttft_s=(req.first_token_time - req.arrival_time) if req.first_token_time else None,
            queue_s=(req.scheduled_time - req.arrival_time) if req.scheduled_time else None,
            new_logprobs=list(new_logprobs))
        if req.is_finished:
            self._detok.pop(req.request_id, None)
            self.requests.pop(req.request_id, None)
            if req.finish_reason in (FinishReason.LENGTH, FinishReason.STOP):
                n = len(req.output_token_ids)
                self.typical_output = n if self.typical_output is None else (
                    (1 - TYPICAL_OUTPUT_WEIGHT) * self.typical_output + TYPICAL_OUTPUT_WEIGHT * n)
        return out

    def _apply_stop_strings(self, req: Request, detok: Any, delta: str) -> str:
        """Finishes the request at the first stop string; the stop string itself is not returned."""
        text = detok.text
        start = max(0, len(text) - len(delta) - max(len(s) for s in req.params.stop))
        hits = [i for s in req.params.stop if (i := text.find(s, start)) >= 0]
        if not hits:
            return delta
        cut = min(hits)
        emitted_before = len(text) - len(delta)
        detok.text = text[:cut]
        if not req.is_finished:
            self.scheduler.abort(req, FinishReason.STOP)
        else:
            req.finish_reason = FinishReason.STOP
        return text[emitted_before:cut] if cut > emitted_before else ""

    def expected_remaining(self, req: Request) -> int:
        """Output tokens `req` is still expected to generate: up to its max_tokens, or to the typical
        output length of the requests this unit finished when that comes first (a request already
        past it is expected to end soon: nothing more is counted, later views correct it)."""
        left = req.params.max_tokens - len(req.output_token_ids)
        if self.typical_output is not None:
            left = min(left, int(self.typical_output) - len(req.output_token_ids))
        return max(0, left)

    def growth_pages(self) -> int:
        """Pages the unfinished requests are expected to grow into (UnitView.growth_pages)."""
        ps = self.scheduler.page_size
        return sum(pages_for(r.num_tokens + self.expected_remaining(r), ps) - pages_for(r.num_tokens, ps)
                   for reqs in (self.scheduler.running, self.scheduler.waiting) for r in reqs)

    def view(self, index: int = 0, instances: tuple[int, ...] = (), group: Optional[int] = None,
             base_pages: int = 0, transitioning: bool = False) -> UnitView:
        """Plain numbers of this unit; the cluster knows (and passes) which instances it is made of."""
        s = self.scheduler
        return UnitView(index=index, pages_total=s.allocator.num_usable, pages_free=s.allocator.num_free,
                        queued_pages=sum(pages_for(r.num_tokens, s.page_size) for r in s.waiting),
                        running=len(s.running), waiting=len(s.waiting), page_size=s.page_size,
                        growth_pages=self.growth_pages(), instances=tuple(instances), group=group,
                        base_pages=base_pages, transitioning=transitioning)

    def host_status(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "pages_total": s.allocator.num_usable,
                "pages_free": s.allocator.num_free, "pages_used": s.allocator.num_used, "page_size": s.page_size,
                "steps": self.num_steps, **s.counters(), "swapped": len(s.swapped), "events": s.events}
