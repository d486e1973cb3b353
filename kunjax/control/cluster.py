"""The cluster loop: step units driven together from one controller (plain Python, no JAX).

One `Cluster.step()` schedules every unit that has work, writes the steps as device operations
(sent first to the other processes of a multi-host cluster), *executes* all of them (JAX returns at
once: each step runs asynchronously on its unit's devices) and only then *finishes* each, so the
units compute concurrently while this thread does the bookkeeping of the others.

A `DispatchPolicy` picks the unit for each new request from plain views of the units; the default
sends it where the most KV pages are free once the queued prompts are counted. Operations other than
steps (a parameter drop, a restore) are registered by the runtime with `register_op` and go through
the same ordered log (`run_op`), so every process applies them at the same point.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable, Optional, Protocol, Sequence, Union

from kunjax.control.ops import STEP, DeviceOp
from kunjax.control.request import Request, RequestOutput, SamplingParams
from kunjax.control.unit import StepUnit, UnitView


class DispatchPolicy(Protocol):
    def choose(self, views: Sequence[UnitView], num_tokens: int) -> int: ...


class MostFreePages:
    """The unit with the most free KV pages after its queued prompts; ties -> fewest requests."""

    def choose(self, views: Sequence[UnitView], num_tokens: int) -> int:
        best = max(views, key=lambda v: (v.pages_free - v.queued_pages, -(v.running + v.waiting), -v.index))
        return best.index


class RoundRobin:
    def __init__(self):
        self._next = itertools.count()

    def choose(self, views: Sequence[UnitView], num_tokens: int) -> int:
        return views[next(self._next) % len(views)].index


class OpLog(Protocol):
    """Sends device operations to the other processes before this one executes them."""

    def send(self, ops: Sequence[DeviceOp]) -> None: ...


class Frontend(Protocol):
    """Model-level services: tokenizing, validating, detokenizers (an instance provides them)."""

    tokenizer: Any
    max_model_len: int

    def encode(self, prompt: str) -> list[int]: ...
    def encode_chat(self, messages) -> list[int]: ...
    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None: ...
    def detokenizer(self, prompt_token_ids: Sequence[int]) -> Any: ...


@dataclasses.dataclass
class StepTiming:
    """Where the controller's time goes (seconds, cumulative): host scheduling + batch building +
    dispatch, waiting for the device, and postprocessing (sampling bookkeeping, detokenize)."""

    iterations: int = 0
    steps: int = 0
    schedule_dispatch_s: float = 0.0
    wait_device_s: float = 0.0
    postprocess_s: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_to_completion(add: Callable[[Union[str, Sequence[int]], SamplingParams], str],
                      step: Callable[[], list[RequestOutput]], has_unfinished: Callable[[], bool],
                      prompts: Sequence[Union[str, Sequence[int]]],
                      params: Union[SamplingParams, Sequence[SamplingParams]]) -> list[RequestOutput]:
    """Adds every prompt (one SamplingParams for all, or one each), steps until all finish, and
    returns the final outputs in input order: the offline loop of an engine or a cluster."""
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    ids = [add(p, sp) for p, sp in zip(prompts, plist)]
    final: dict[str, RequestOutput] = {}
    while has_unfinished():
        for out in step():
            if out.finished:
                final[out.request_id] = out
    return [final[i] for i in ids]


class Cluster:
    def __init__(self, units: Sequence[StepUnit], frontend: Frontend, policy: Optional[DispatchPolicy] = None,
                 oplog: Optional[OpLog] = None):
        if not units:
            raise ValueError("a cluster needs at least one unit")
        self.units: list[StepUnit] = list(units)
        self.frontend = frontend
        self.policy = policy or MostFreePages()
        self.oplog = oplog
        self._where: dict[str, StepUnit] = {}  # request id -> unit
        self._ids = itertools.count()
        self._op_handlers: dict[str, Callable[["Cluster", DeviceOp], Any]] = {}
        self.timing = StepTiming()

    # ---- requests --------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.frontend.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.frontend.max_model_len

    def encode(self, prompt: str) -> list[int]:
        return self.frontend.encode(prompt)

    def encode_chat(self, messages) -> list[int]:
        return self.frontend.encode_chat(messages)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError naming the field. Reads only constants of the model, so the gRPC front
        may call it from its own thread."""
        self.frontend.validate(prompt_token_ids, params)

    def views(self) -> list[UnitView]:
        return [u.view(i) for i, u in enumerate(self.units)]

    def add_request(self, prompt: Union[str, Sequence[int]], params: SamplingParams = SamplingParams(),
                    request_id: Optional[str] = None) -> str:
        """Places the request on a unit (the policy's choice). Raises ValueError (bad request,
        duplicate id) or QueueFull."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._where:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.validate(ids, params)
        unit = self.units[self.policy.choose(self.views(), len(ids))]
        unit.add(Request(request_id, ids, params), self.frontend.detokenizer(ids))
        self._where[request_id] = unit
        return request_id

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        unit = self._where.pop(request_id, None)
        return unit.abort(request_id) if unit is not None else None

    def instance_of(self, request_id: str) -> Optional[int]:
        unit = self._where.get(request_id)
        return self.units.index(unit) if unit is not None else None

    def move_requests(self, request_ids: Sequence[str], unit: StepUnit) -> None:
        """Records that these requests now live on `unit` (after a drop or a restore)."""
        for rid in request_ids:
            self._where[rid] = unit

    def has_unfinished(self) -> bool:
        return bool(self.tasks) or any(u.has_unfinished() for u in self.units)

    def num_waiting(self) -> int:
        return sum(v.waiting for v in self.views())

    # ---- device operations -----------------------------------------------------------------
    def register_op(self, kind: str, handler: Callable[["Cluster", DeviceOp], Any]) -> None:
        """`handler(cluster, op)` runs a cluster operation of this kind on every process."""
        self._op_handlers[kind] = handler

    def execute(self, op: DeviceOp) -> Any:
        """Runs one device operation here (the controller after sending it; a follower replaying)."""
        if op.kind == STEP:
            return self.units[op.target].execute(op)
        if op.kind not in self._op_handlers:
            raise ValueError(f"no handler for device operation {op.kind!r}")
        return self._op_handlers[op.kind](self, op)

    def run_op(self, op: DeviceOp) -> Any:
        """The controller's way to run a cluster operation: logged for the followers, then run."""
        if self.oplog is not None:
            self.oplog.send([op])
        return self.execute(op)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule and execute every unit's step, then finish them in order."""
        self._advance_tasks()
        t0 = time.perf_counter()
        pending = []
        for i, unit in enumerate(self.units):
            if any(t.holds(unit) for t in self.tasks):
                continue
            step = unit.schedule()
            if step is not None:
                pending.append((unit, step, unit.prepare(step)))
        if not pending:
            return []
        for unit, _, op in pending:
            op.target = self.units.index(unit)
        if self.oplog is not None:
            self.oplog.send([op for _, _, op in pending])
        inflight = [(unit, step, self.execute(op)) for unit, step, op in pending]
        t1 = time.perf_counter()
        outs: list[RequestOutput] = []
        for unit, step, handle in inflight:
            outs.extend(unit.finish(step, handle))
        for o in outs:
            if o.finished:
                self._where.pop(o.request_id, None)
        t2 = time.perf_counter()
        wait = sum(getattr(unit, "last_wait_s", 0.0) for unit, _, _ in inflight)
        self.timing.iterations += 1
        self.timing.steps += len(pending)
        self.timing.schedule_dispatch_s += t1 - t0
        self.timing.wait_device_s += wait
        self.timing.postprocess_s += (t2 - t1) - wait
        return outs

    # ---- tasks: a minimal stand-in for the lead's Task protocol (the lead's version wins at merge) --
    # A task has `units`, `advance(cluster) -> bool` (one bounded piece; True when done) and
    # `holds(unit)`; here every step of every unit has landed when `step()` begins, so the tasks
    # advance there, between the units' steps.
    @property
    def tasks(self) -> list:
        if "_tasks" not in self.__dict__:
            self._tasks = []
        return self._tasks

    def start_task(self, task) -> None:
        self.tasks.append(task)

    def _advance_tasks(self) -> None:
        for task in list(self.tasks):
            try:
                done = task.advance(self)
            except Exception:
                import logging

                logging.getLogger(__name__).exception("task %s failed; it is dropped", type(task).__name__)
                done = True
            if done:
                self.tasks.remove(task)

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]],
                 params: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams()) -> list[RequestOutput]:
        return run_to_completion(self.add_request, self.step, self.has_unfinished, prompts, params)

    # ---- status ----------------------------------------------------------------------------
    def status(self, with_memory: bool = True) -> dict:
        inst = []
        for i, u in enumerate(self.units):
            inst.append({"id": i, **u.status()})
        return {
            "instances": inst,
            "groups": [],
            "running": sum(s["running"] for s in inst),
            "waiting": sum(s["waiting"] for s in inst),
            "pages_total": sum(s["pages_total"] for s in inst),
            "pages_free": sum(s["pages_free"] for s in inst),
            "pages_used": sum(s["pages_used"] for s in inst),
            "timing": self.timing.as_dict(),
        }
