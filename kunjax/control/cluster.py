"""The cluster loop: step units driven from one controller, each at its own pace (plain Python, no JAX).

Units step independently: `poll()` dispatches every unit that has no step in flight and has work
(schedule, prepare, write the step to the ordered device-operation log, execute: JAX returns at once),
and finishes the steps whose tokens have arrived. Nothing waits for the slowest unit: a long prefill
on one instance, or a pipeline group's step, never holds back another instance's decode.

Readiness comes from one waiter thread per in-flight step (a small pool): it blocks on the unit's
device result (`unit.wait(handle)`: the wait releases the GIL) and then wakes the controller
(`on_ready`), which applies the tokens on its own thread. We chose waiters over polling
`is_ready()` in a loop: a blocked waiter costs no CPU and wakes the controller the moment a step
lands, where a poll loop either burns a core (which XLA:CPU needs) or adds its interval to every
step. Every device operation is still issued by the controller thread, one at a time, so the
multi-host log stays one well-defined order.

Work that is not a step (a parameter drop, a restore, a migration) runs as a `Task`: the loop
advances it by one bounded piece whenever none of the units it names has a step in flight, and
dispatches those units again right after; units the task does not name never notice it.

A `DispatchPolicy` picks the unit for each new request from plain views of the units; the default
sends it where the most KV pages are free once the queued prompts are counted. Cluster operations
are registered by the runtime with `register_op` and go through the same ordered log (`run_op`), so
every process applies them at the same point.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Optional, Protocol, Sequence, Union

from kunjax.control.clock import WALL, Clock
from kunjax.control.ops import STEP, DeviceOp
from kunjax.control.pages import pages_for
from kunjax.control.request import Request, RequestOutput, SamplingParams
from kunjax.control.unit import StepUnit, UnitView

log = logging.getLogger(__name__)


class DispatchPolicy(Protocol):
    def choose(self, views: Sequence[UnitView], num_tokens: int) -> int: ...


class MostFreePages:
    """The unit with the most free KV pages after its queued prompts; ties -> fewest requests."""

    def choose(self, views: Sequence[UnitView], num_tokens: int) -> int:
        best = max(views, key=lambda v: (v.pages_free - v.queued_pages, -(v.running + v.waiting), -v.index))
        return best.index


class FewestQueued:
    """The unit with the fewest waiting requests per instance it is made of, then the most free
    pages after its queued prompts. MostFreePages sends every request to a pipeline group just
    formed (its pages dwarf a single instance's) however long its queue grows, while its compute is
    that of its few members; this one spreads a burst by queue first (the simulator shows the
    difference: docs/simulator.md)."""

    def choose(self, views: Sequence[UnitView], num_tokens: int) -> int:
        best = min(views, key=lambda v: (v.waiting / len(v.members), -(v.pages_free - v.queued_pages), v.index))
        return best.index


class LeastLoaded:
    """Memory as the constraint, load as the choice: among the units whose free pages (after their
    queued prompts) hold the request's prompt now, the one with the fewest waiting, then running,
    requests per instance it is made of, then the most free pages; where none can admit it, as
    FewestQueued. FewestQueued may queue a request where it cannot start while another unit could
    start it now. In the simulator (docs/simulator.md) it beats FewestQueued in five of nine settings
    without overload and loses to it, for every policy, under a memory-bound one, so the launcher's
    default stays fewest_queued."""

    def choose(self, views: Sequence[UnitView], num_tokens: int) -> int:
        fits = [v for v in views if v.pages_free - v.queued_pages >= pages_for(num_tokens, v.page_size)]
        if not fits:
            return FewestQueued().choose(views, num_tokens)
        best = min(fits, key=lambda v: (v.waiting / len(v.members), v.running / len(v.members),
                                        -(v.pages_free - v.queued_pages), v.index))
        return best.index


DISPATCH_POLICIES = {"most_free_pages": MostFreePages, "fewest_queued": FewestQueued, "least_loaded": LeastLoaded}


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


def _landed(wait: Callable[[Any], None], handle: Any) -> float:
    """A waiter thread's job: wait for the step's result; returns when it landed."""
    wait(handle)
    return time.perf_counter()


class Task(Protocol):
    """Work the cluster loop interleaves with steps: a transition, a migration.

    `units`: the units it touches; `advance(cluster)` runs only while none of them has a step in
    flight (while one has, the others are not dispatched again, so the piece is never starved), does
    one bounded piece (device operations go through `cluster.run_op`) and returns True
    when the task is done. Between two pieces the named units step as usual; `holds(unit)` says a
    unit must not step at all for now (its state is mid-change)."""

    units: Sequence[StepUnit]

    def advance(self, cluster: "Cluster") -> bool: ...
    def holds(self, unit: StepUnit) -> bool: ...


@dataclasses.dataclass
class _InFlight:
    unit: StepUnit
    step: Any
    handle: Any
    ready: concurrent.futures.Future  # its result: perf_counter() when the step landed (None: unknown)
    op: Optional[DeviceOp] = None
    dispatched: float = 0.0


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
                 oplog: Optional[OpLog] = None, clock: Optional[Clock] = None):
        """`clock`: the time the control plane runs on (kunjax.control.clock: the wall clock when
        serving, simulated time in kunjax.sim); the units' schedulers use the same one."""
        if not units:
            raise ValueError("a cluster needs at least one unit")
        self.clock = clock or WALL
        self.units: list[StepUnit] = list(units)
        self.frontend = frontend
        self.policy = policy or MostFreePages()
        self.oplog = oplog
        self._where: dict[str, StepUnit] = {}  # request id -> unit
        self._ids = itertools.count()
        self._op_handlers: dict[str, Callable[["Cluster", DeviceOp], Any]] = {}
        self.timing = StepTiming()
        self.tasks: list[Task] = []
        self._claimed: set[int] = set()  # ids of units a waiting task keeps from being dispatched
        self._inflight: dict[int, _InFlight] = {}  # id(unit) -> its step in flight
        self._deferred_aborts: dict[int, list[str]] = {}  # id(unit) -> requests to abort after its step
        self._ready_outputs: list[RequestOutput] = []  # produced outside a poll (a deferred abort, a task)
        self._waiters: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._waiters_lock = threading.Lock()
        # Called from a waiter thread when a step's result has arrived (the serving executor sets it
        # to wake its loop).
        self.on_ready: Optional[Callable[[], None]] = None
        # Called right before units are dispatched (after tasks advanced): the serving executor applies
        # the cancellations that arrived meanwhile, so a cancelled request is in no later step.
        self.before_dispatch: Optional[Callable[[], None]] = None
        # Called once per iteration before the tasks advance: an overload policy that decides from the
        # views (kunjax.control.kunserve) and starts cluster tasks.
        self.policy_hook: Optional[Callable[[], None]] = None
        # Called with (unit, op, seconds from dispatch to landing) for every finished step (a cost
        # model observes its own error there).
        self.on_step: Optional[Callable[[StepUnit, DeviceOp, float], None]] = None

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
                    request_id: Optional[str] = None, arrival_time: Optional[float] = None) -> str:
        """Places the request on a unit (the policy's choice). `arrival_time`: when it arrived on the
        cluster's clock (a trace sets it; default now). Raises ValueError (bad request, duplicate
        id) or QueueFull."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._where:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.validate(ids, params)
        unit = self.units[self.policy.choose(self.views(), len(ids))]
        now = self.clock() if arrival_time is None else float(arrival_time)
        unit.add(Request(request_id, ids, params, arrival_time=now), self.frontend.detokenizer(ids))
        self._where[request_id] = unit
        return request_id

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Aborts a request now, or, when its unit has a step in flight, right after that step (its
        pages are free before the unit's next step); the output then comes out of the next `poll`."""
        unit = self._where.get(request_id)
        if unit is None:
            return None
        if id(unit) in self._inflight:
            self._deferred_aborts.setdefault(id(unit), []).append(request_id)
            return None
        self._where.pop(request_id, None)
        return unit.abort(request_id)

    def is_known(self, request_id: str) -> bool:
        return request_id in self._where

    def instance_of(self, request_id: str) -> Optional[int]:
        unit = self._where.get(request_id)
        return self.units.index(unit) if unit is not None else None

    def move_requests(self, request_ids: Sequence[str], unit: StepUnit) -> None:
        """Records that these requests now live on `unit` (after a drop or a restore)."""
        for rid in request_ids:
            self._where[rid] = unit

    def has_unfinished(self) -> bool:
        return bool(self._inflight or self.tasks or self._ready_outputs) or any(u.has_unfinished() for u in self.units)

    def num_inflight(self) -> int:
        return len(self._inflight)

    def busy(self, unit: StepUnit) -> bool:
        """The unit has a step in flight."""
        return id(unit) in self._inflight

    def work_clock(self) -> float:
        """The time the controller's own work has reached: now, on a cluster that runs its task
        pieces as they are asked for (kunjax.sim's cluster simulates them ahead of its clock)."""
        return self.clock()

    def start_task(self, task: Task) -> None:
        """Runs `task` piece by piece from the next iteration on (see Task)."""
        self.tasks.append(task)

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
    def poll(self, timeout: float = 0.0) -> list[RequestOutput]:
        """One pass of the independent loop: finish every step whose tokens have arrived, advance the
        tasks whose units are idle, dispatch every idle unit that has work. With `timeout` > 0 and
        nothing finished, waits up to that long for the first step to land."""
        outs = self._collect()
        self._advance_tasks()
        self._dispatch()
        if not outs and timeout > 0 and self._inflight:
            concurrent.futures.wait([f.ready for f in self._inflight.values()], timeout=timeout,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
            outs = self._collect()
            self._advance_tasks()
            self._dispatch()
        return outs

    def step(self) -> list[RequestOutput]:
        """One iteration for offline loops and tests: dispatch every idle unit that has work, wait
        until every step in flight has landed, finish them (tasks advance in between)."""
        outs = self._collect()
        self._advance_tasks()
        self._dispatch()
        if self._inflight:
            concurrent.futures.wait([f.ready for f in self._inflight.values()])
        outs += self._collect()
        return outs

    def _dispatch(self) -> None:
        if self.before_dispatch is not None:
            self.before_dispatch()
        t0 = time.perf_counter()
        launched = 0
        for i, unit in enumerate(self.units):
            if (not unit.has_unfinished() or id(unit) in self._inflight or id(unit) in self._claimed
                    or any(t.holds(unit) for t in self.tasks)):
                continue  # (a unit without work first: the cheapest test, and most units of a large cluster)
            step = unit.schedule()
            if step is None:
                continue
            op = unit.prepare(step)
            op.target = i
            if self.oplog is not None:
                self.oplog.send([op])
            t_op = time.perf_counter()
            handle = self.execute(op)
            self._inflight[id(unit)] = _InFlight(unit, step, handle, self._watch(unit, handle), op, t_op)
            launched += 1
        if launched:
            self.timing.iterations += 1
            self.timing.steps += launched
            self.timing.schedule_dispatch_s += time.perf_counter() - t0

    def _watch(self, unit: StepUnit, handle: Any) -> concurrent.futures.Future:
        """A future that completes when the step's result is on the host side of the device."""
        wait = getattr(unit, "wait", None)
        if wait is None:  # a unit without a device wait (a host-only fake): ready at once
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result(None)
            return fut
        with self._waiters_lock:
            if self._waiters is None:
                self._waiters = concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                                      thread_name_prefix="kunjax-step-waiter")
            fut = self._waiters.submit(_landed, wait, handle)
        if self.on_ready is not None:
            fut.add_done_callback(lambda _f: self.on_ready())
        return fut

    def _collect(self) -> list[RequestOutput]:
        outs, self._ready_outputs = self._ready_outputs, []
        t0 = time.perf_counter()
        wait = 0.0
        for key, fl in list(self._inflight.items()):
            if not fl.ready.done():
                continue
            del self._inflight[key]
            landed = fl.ready.result() if fl.ready.exception() is None else None
            if self.on_step is not None and landed is not None:
                try:
                    self.on_step(fl.unit, fl.op, landed - fl.dispatched)
                except Exception:
                    log.exception("the step observer failed")
            try:
                outs.extend(fl.unit.finish(fl.step, fl.handle))
            finally:
                wait += getattr(fl.unit, "last_wait_s", 0.0)
                for rid in self._deferred_aborts.pop(key, ()):
                    if self._where.get(rid) is fl.unit:
                        self._where.pop(rid, None)
                        out = fl.unit.abort(rid)
                        if out is not None:
                            outs.append(out)
        for o in outs:
            if o.finished:
                self._where.pop(o.request_id, None)
        self.timing.wait_device_s += wait
        self.timing.postprocess_s += time.perf_counter() - t0 - wait
        return outs

    def _advance_tasks(self) -> None:
        if self.policy_hook is not None:
            try:
                self.policy_hook()
            except Exception:
                log.exception("the overload policy failed this iteration; serving goes on")
        self._claimed = set()
        for task in list(self.tasks):
            if any(id(u) in self._inflight for u in task.units):
                # Its idle units wait for the busy ones to land, so the next piece finds them all idle
                # (units that kept being re-dispatched in turn would starve it).
                self._claimed.update(id(u) for u in task.units)
                continue
            try:
                done = task.advance(self)
            except Exception:
                log.exception("task %s failed; it is dropped", type(task).__name__)
                done = True
            if done:
                self.tasks.remove(task)

    def emit(self, outputs: Sequence[RequestOutput]) -> None:
        """Outputs produced outside a step (a task that failed requests) come out of the next poll."""
        self._ready_outputs.extend(outputs)
        for o in outputs:
            if o.finished:
                self._where.pop(o.request_id, None)

    def drain(self) -> list[RequestOutput]:
        """Waits for every step in flight and finishes it (before an operation that needs every
        unit idle)."""
        if self._inflight:
            concurrent.futures.wait([f.ready for f in self._inflight.values()])
        return self._collect()

    def close_waiters(self) -> None:
        with self._waiters_lock:
            if self._waiters is not None:
                self._waiters.shutdown(wait=False)
                self._waiters = None

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
