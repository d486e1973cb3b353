"""Several engine instances on disjoint device groups, stepped together from one controller.

One `Cluster.step()` first *dispatches* the next step of every instance that has work (JAX returns
at once: the step runs asynchronously on that instance's devices) and only then *collects* the
sampled tokens of each, so the instances compute concurrently while this Python thread does the
scheduling and the bookkeeping of the others. Scheduling, dispatching requests to instances and
status stay plain Python over the instances' host state.

A `DispatchPolicy` picks the instance for each new request; the default sends it where the most KV
pages are free once the queued prompts are counted. Multi-host runs attach a `StepBroadcaster` so
that other processes run the very same programs in the same order (see sharding.multihost).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import logging
import time
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import jax
import numpy as np

from kunjax.runtime import compile_stats
from kunjax.memory import measure as memory
from kunjax.runtime.engine import EngineConfig, LLMEngine, run_to_completion
from kunjax.runtime.kv_pools import pages_for
from kunjax.io.loader import LoadedModel
from kunjax.control.request import RequestOutput, SamplingParams
from kunjax.control.scheduler import QueueFull

log = logging.getLogger(__name__)


class DispatchPolicy(Protocol):
    def choose(self, engines: Sequence[LLMEngine], num_tokens: int) -> int: ...


def queued_demand(eng: LLMEngine) -> int:
    """Pages the waiting requests of an instance need for their (re)prompts."""
    return sum(pages_for(r.num_tokens, eng.page_size) for r in eng.scheduler.waiting)


class MostFreePages:
    """The instance with the most free KV pages after its queued prompts; ties -> fewest requests."""

    def choose(self, engines: Sequence[LLMEngine], num_tokens: int) -> int:
        def key(i):
            e = engines[i]
            free = e.allocator.num_free - queued_demand(e)
            return (free, -(len(e.scheduler.running) + len(e.scheduler.waiting)), -i)
        return max(range(len(engines)), key=key)


class RoundRobin:
    def __init__(self):
        self._next = itertools.count()

    def choose(self, engines: Sequence[LLMEngine], num_tokens: int) -> int:
        return next(self._next) % len(engines)


class StepBroadcaster(Protocol):
    """Sends one iteration's batches {instance: batch} to the other processes before they run."""

    def send_steps(self, batches: dict[int, tuple[dict[str, np.ndarray], int]]) -> None: ...


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


class Cluster:
    def __init__(self, engines: Sequence[LLMEngine], policy: Optional[DispatchPolicy] = None,
                 broadcaster: Optional[StepBroadcaster] = None):
        if not engines:
            raise ValueError("a cluster needs at least one instance")
        self.engines = list(engines)
        self.policy = policy or MostFreePages()
        self.broadcaster = broadcaster
        self._where: dict[str, int] = {}  # request id -> instance
        self._ids = itertools.count()
        self.timing = StepTiming()

    @classmethod
    def build(cls, model: LoadedModel, config: EngineConfig, num_instances: int = 1, tp: int = 1,
              devices: Optional[Sequence[jax.Device]] = None, policy: Optional[DispatchPolicy] = None,
              broadcaster: Optional[StepBroadcaster] = None) -> "Cluster":
        """`model` params may be host (numpy) arrays: each instance places its own replica, sharded
        over its own ("tp",) mesh."""
        from sharding.mesh import instance_meshes
        from sharding.rules import validate_tp

        validate_tp(model.config, tp)
        meshes = instance_meshes(num_instances, tp, devices)
        engines = []
        for i, mesh in enumerate(meshes):
            t0 = time.monotonic()
            engines.append(LLMEngine(model, config, mesh=mesh))
            log.info("instance %d on %s: %d KV pages, ready in %.1fs", i,
                     [str(d) for d in mesh.devices.flat], engines[-1].num_pages, time.monotonic() - t0)
        return cls(engines, policy, broadcaster)

    # ---- requests --------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engines[0].tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engines[0].max_model_len

    def encode(self, prompt: str) -> list[int]:
        return self.engines[0].encode(prompt)

    def encode_chat(self, messages) -> list[int]:
        return self.engines[0].encode_chat(messages)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError naming the field. Reads only constants of the instances, so the gRPC
        front may call it from its own thread."""
        self.engines[0].validate(prompt_token_ids, params)

    def add_request(self, prompt: Union[str, Sequence[int]], params: SamplingParams = SamplingParams(),
                    request_id: Optional[str] = None) -> str:
        """Places the request on an instance (the policy's choice). Raises ValueError (bad request,
        duplicate id) or QueueFull."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._where:
            raise ValueError(f"request_id {request_id!r} is already in use")
        idx = self.policy.choose(self.engines, len(ids))
        self.engines[idx].add_request(ids, params, request_id)
        self._where[request_id] = idx
        return request_id

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        idx = self._where.pop(request_id, None)
        if idx is None:
            return None
        return self.engines[idx].abort(request_id)

    def instance_of(self, request_id: str) -> Optional[int]:
        return self._where.get(request_id)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: dispatch every instance's step, then collect them in order."""
        t0 = time.perf_counter()
        pending = []
        batches = {}
        for i, eng in enumerate(self.engines):
            step = eng.scheduler.schedule()
            if step is None:
                continue
            batch = eng.runner.build_batch(step.rows, step.prefill)
            batches[i] = (batch, len(step.rows))
            pending.append((i, step))
        if self.broadcaster is not None and batches:
            self.broadcaster.send_steps(batches)
        inflight = [(i, step, self.engines[i].runner.dispatch_batch(*batches[i])) for i, step in pending]
        t1 = time.perf_counter()
        outs: list[RequestOutput] = []
        wait = 0.0
        for i, step, fl in inflight:
            tw = time.perf_counter()
            tokens = self.engines[i].runner.collect(fl)
            wait += time.perf_counter() - tw
            outs.extend(self.engines[i].apply_step(step, tokens))
        for o in outs:
            if o.finished:
                self._where.pop(o.request_id, None)
        t2 = time.perf_counter()
        if pending:
            self.timing.iterations += 1
            self.timing.steps += len(pending)
            self.timing.schedule_dispatch_s += t1 - t0
            self.timing.wait_device_s += wait
            self.timing.postprocess_s += (t2 - t1) - wait
        return outs

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]],
                 params: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams()) -> list[RequestOutput]:
        return run_to_completion(self.add_request, self.step, self.has_unfinished, prompts, params)

    def warmup(self, parallel: bool = True) -> int:
        """Compiles every bucket on every instance; returns the compilations done. In one process
        the instances compile on threads (XLA compiles without the GIL; each instance warms its own
        params and pools, so nothing is shared). Multi-process runs go instance by instance, in
        order, so that every process launches the same programs in the same order."""
        before = compile_stats.compile_count()
        if parallel and len(self.engines) > 1 and jax.process_count() == 1:
            workers = min(len(self.engines), os.cpu_count() or 1)
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="kunjax-warmup") as pool:
                list(pool.map(lambda e: e.warmup(), self.engines))
        else:
            for e in self.engines:
                e.warmup()
        return compile_stats.compile_count() - before

    # ---- status ----------------------------------------------------------------------------
    def devices(self) -> list[jax.Device]:
        return [d for e in self.engines for d in e.devices]

    def status(self, with_memory: bool = True) -> dict:
        inst = [{"id": i, **e.status()} for i, e in enumerate(self.engines)]
        out = {
            "instances": inst,
            "groups": [],  # pipeline groups of merged instances (memory policies, later)
            "running": sum(s["running"] for s in inst),
            "waiting": sum(s["waiting"] for s in inst),
            "pages_total": sum(s["pages_total"] for s in inst),
            "pages_free": sum(s["pages_free"] for s in inst),
            "pages_used": sum(s["pages_used"] for s in inst),
            "compiles": compile_stats.compile_count(),
            "timing": self.timing.as_dict(),
        }
        if with_memory:
            local = [d for d in self.devices() if d.process_index == jax.process_index()]
            out["memory"] = [dataclasses.asdict(m) for m in memory.snapshot(local)]
        return out
