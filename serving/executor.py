"""The one thread that owns every device array: it runs the cluster loop and nothing else touches JAX.

A front (gRPC or HTTP, through serving.core) validates a request, then hands it over through a
bounded inbox (full -> the caller answers RESOURCE_EXHAUSTED); cancellations go through an unbounded side queue so they are never
refused. Each iteration the executor (1) admits everything in the inbox, (2) runs the calls queued
for it (status, starting a drop or a restore), (3) applies cancellations, so a cancelled request's
pages are free before its unit's next step is scheduled, (4) polls the cluster: every unit whose
step has landed is finished and dispatched again at once, each at its own pace, and transitions
advance piece by piece between their own units' steps, (5) hands the outputs back to the requests'
asyncio queues with one `call_soon_threadsafe` per event loop. When nothing landed it sleeps until a
step lands (the cluster's waiters wake it) or a request, a call or a cancellation arrives. Nothing
that goes wrong in a step brings the thread down: the affected requests fail with an error and
serving goes on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Optional

from kunjax.runtime.cluster import ServingCluster as Cluster
from kunjax.control.request import RequestOutput, SamplingParams
from kunjax.control.scheduler import QueueFull

log = logging.getLogger(__name__)


class ShuttingDown(Exception):
    """The executor takes no new requests (graceful shutdown under way); the front answers UNAVAILABLE."""


class RequestError(Exception):
    """Delivered to a request's queue instead of an output; `code` is a key of serving.errors.CODES
    (which maps it to a gRPC code and an HTTP status)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class Event:
    output: Optional[RequestOutput]  # None with an error
    time: float  # time.monotonic() when the executor produced it
    instance: int = -1
    error: Optional[RequestError] = None


@dataclasses.dataclass
class Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # receives lists of Event
    received: float = dataclasses.field(default_factory=time.monotonic)
    instance: int = -1  # set when admitted


@dataclasses.dataclass
class LoopTiming:
    """Executor time split: admission/cancel handling, cluster.step (itself split in its timing),
    delivering outputs to the front, and idle waiting."""

    admin_s: float = 0.0
    step_s: float = 0.0
    deliver_s: float = 0.0
    idle_s: float = 0.0
    tokens: int = 0


class Executor:
    def __init__(self, cluster: Cluster, max_queue: int = 1024, metrics: Any = None,
                 memory_interval_s: float = 1.0):
        self.cluster = cluster
        self.max_queue = max_queue
        self.metrics = metrics
        self.memory_interval_s = memory_interval_s
        self._inbox: queue.Queue = queue.Queue(maxsize=max_queue)
        self._cancels: collections.deque[str] = collections.deque()
        self._calls: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._wake = threading.Event()
        self._subs: dict[str, Submission] = {}
        self._stop = False
        self._closed = False  # no new submissions (graceful shutdown)
        self._abort_all = False
        self._abort_requested = False  # abort every in-flight request with a clean final output
        self.waiting = 0  # published after each iteration (read by the front for admission)
        self.timing = LoopTiming()
        self._thread = threading.Thread(target=self._run, name="kunjax-executor", daemon=True)
        self._last_memory = 0.0
        cluster.on_ready = self._wake.set  # a landed step wakes the loop
        cluster.before_dispatch = self._apply_cancels  # cancelled mid-transition: in no later step

    # ---- called from other threads ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def inbox_size(self) -> int:
        return self._inbox.qsize()

    def queued(self) -> int:
        return self._inbox.qsize() + self.waiting

    def submit(self, sub: Submission) -> None:
        """Raises QueueFull when the bounded queue is full, ShuttingDown when the server is stopping."""
        if self._stop or self._closed:
            raise ShuttingDown("server is shutting down")
        if self.queued() >= self.max_queue:
            raise QueueFull(f"queue full ({self.max_queue} requests waiting)")
        try:
            self._inbox.put_nowait(sub)
        except queue.Full:
            raise QueueFull(f"queue full ({self.max_queue} requests waiting)") from None
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        self._cancels.append(request_id)
        self._wake.set()

    def close(self) -> None:
        """Refuses new submissions from now on; what is in flight keeps running."""
        self._closed = True

    @property
    def accepting(self) -> bool:
        """New submissions are taken (not draining, not stopped)."""
        return not (self._stop or self._closed)

    def abort_all(self) -> None:
        """Aborts every in-flight request before the next step: each stream gets a last output with
        finish_reason "abort" (its usage included) and its pages are freed."""
        self._abort_requested = True
        self._wake.set()

    def call(self, fn: Callable[[Cluster], Any]) -> concurrent.futures.Future:
        """Runs fn(cluster) on the executor thread between steps (status, later: memory controls)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.append((fn, fut))
        self._wake.set()
        return fut

    def transition(self, fn: Callable[[Cluster], tuple]) -> concurrent.futures.Future:
        """Runs fn(cluster) -> (result, outputs) on the executor thread (starting a drop or a
        restore: the transition itself then advances piece by piece inside the loop) and delivers the
        outputs (requests it ended, e.g. with an error) to their streams; the future gets result."""
        def run(cluster):
            result, outs = fn(cluster)
            self._deliver_outputs(outs)
            self._publish()
            return result
        return self.call(run)

    def stop(self, abort_inflight: bool = True, timeout: Optional[float] = 30.0) -> None:
        """Stops after aborting (or, with abort_inflight=False, finishing) every request."""
        self._stop = True
        self._abort_all = abort_inflight
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the executor thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                t0 = time.perf_counter()
                self._admit()
                # Calls (status, a drop, a restore) run before the cancellations are applied, so a
                # request cancelled while a transition runs is freed before the next step.
                self._run_calls()
                self._apply_cancels()
                if self._abort_requested or (self._stop and self._abort_all):
                    self._abort_requested = False
                    self._abort_inflight()
                if self._stop and (self._abort_all or not self.cluster.has_unfinished()):
                    break
                t1 = time.perf_counter()
                self.timing.admin_s += t1 - t0
                if not self.cluster.has_unfinished():
                    self._publish()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    self.timing.idle_s += time.perf_counter() - t1
                    continue
                self._wake.clear()
                if not self._step() and (self.cluster.num_inflight() or not self.cluster.tasks):
                    self._wake.wait(0.05)  # nothing landed: until a step lands or work arrives
                    self.timing.idle_s += time.perf_counter() - t1
        except BaseException:  # pragma: no cover - last resort: never leave clients hanging
            log.exception("executor loop died")
        finally:
            self._fail_all("ABORTED", "server is shutting down")
            for fn, fut in list(self._calls):
                fut.cancel()

    def _admit(self) -> None:
        while True:
            try:
                sub = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self.cluster.add_request(sub.prompt_token_ids, sub.params, sub.request_id)
                sub.instance = self.cluster.instance_of(sub.request_id)
                self._subs[sub.request_id] = sub
            except QueueFull as e:
                self._send(sub, [Event(None, time.monotonic(), error=RequestError("RESOURCE_EXHAUSTED", str(e)))])
            except ValueError as e:
                self._send(sub, [Event(None, time.monotonic(), error=RequestError("INVALID_ARGUMENT", str(e)))])
            except Exception as e:  # never let one request take the loop down
                log.exception("add_request failed for %s", sub.request_id)
                self._send(sub, [Event(None, time.monotonic(), error=RequestError("INTERNAL", str(e)))])

    def _apply_cancels(self) -> None:
        while self._cancels:
            rid = self._cancels.popleft()
            out = self.cluster.abort(rid)
            if out is None and self.cluster.is_known(rid):
                continue  # its unit has a step in flight: the abort's output comes with that step
            sub = self._subs.pop(rid, None)
            if sub is not None and out is not None:
                self._send(sub, [Event(out, time.monotonic(), sub.instance)])

    def _abort_inflight(self) -> None:
        """Every in-flight request ends now with its last output (finish_reason "abort"); shutdown path."""
        try:
            self._deliver_outputs(self.cluster.drain())  # steps in flight land first
        except Exception:
            log.exception("waiting for the steps in flight failed")
        now = time.monotonic()
        for rid, sub in list(self._subs.items()):
            try:
                out = self.cluster.abort(rid)
                ev = (Event(out, now, sub.instance) if out is not None  # None: finished but undelivered
                      else Event(None, now, error=RequestError("ABORTED", "server is shutting down")))
            except Exception as e:  # never leave a client hanging
                log.exception("abort of %s failed", rid)
                ev = Event(None, now, error=RequestError("INTERNAL", str(e)))
            self._send(sub, [ev])
        if self._subs:
            log.info("aborted %d in-flight requests", len(self._subs))
        self._subs.clear()
        self._publish()

    def _run_calls(self) -> None:
        while self._calls:
            fn, fut = self._calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.cluster))
                except Exception as e:
                    fut.set_exception(e)

    def _step(self) -> bool:
        """One poll of the cluster; False when no step landed (nothing to deliver)."""
        t0 = time.perf_counter()
        try:
            outs = self.cluster.poll()
        except Exception as e:
            log.exception("cluster step failed; failing its requests")
            try:
                self.cluster.drain()
            except Exception:
                log.exception("waiting for the steps in flight failed")
            self._fail_all("INTERNAL", f"step failed: {e}")
            return True
        if not outs:
            return False
        t1 = time.perf_counter()
        self._deliver_outputs(outs)
        t2 = time.perf_counter()
        self.timing.step_s += t1 - t0
        self.timing.deliver_s += t2 - t1
        if self.metrics is not None:
            self.metrics.step.observe(t1 - t0)
        self._publish()
        return True

    def _deliver_outputs(self, outs) -> None:
        """Hands outputs to their streams, one call_soon_threadsafe per event loop."""
        now = time.monotonic()
        per_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for out in outs:
            sub = self._subs.get(out.request_id)
            if sub is None:
                continue
            self.timing.tokens += len(out.new_token_ids)
            per_loop[sub.loop].append((sub.queue, Event(out, now, sub.instance)))
            if out.finished:
                del self._subs[out.request_id]
        for loop, items in per_loop.items():
            self._deliver(loop, items)

    def _publish(self) -> None:
        """The waiting count for admission, and the metrics gauges (device memory at most every
        `memory_interval_s`: reading it walks every live array)."""
        self.waiting = self.cluster.num_waiting()
        if self.metrics is None:
            return
        now = time.monotonic()
        with_memory = now - self._last_memory >= self.memory_interval_s
        if with_memory:
            self._last_memory = now
        self.metrics.update_instances(self.cluster.status(with_memory=with_memory), self._inbox.qsize())

    def _fail_all(self, code: str, message: str) -> None:
        try:
            self.cluster.drain()
        except Exception:
            log.exception("waiting for the steps in flight failed")
        now = time.monotonic()
        for rid, sub in list(self._subs.items()):
            try:
                self.cluster.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            self._send(sub, [Event(None, now, error=RequestError(code, message))])
        self._subs.clear()
        while True:
            try:
                sub = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._send(sub, [Event(None, now, error=RequestError(code, message))])

    @staticmethod
    def _send(sub: Submission, events: list) -> None:
        Executor._deliver(sub.loop, [(sub.queue, e) for e in events])

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, items: list) -> None:
        def put_all():
            for q, ev in items:
                q.put_nowait(ev)
        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the loop is closed: the client side is gone
            pass
