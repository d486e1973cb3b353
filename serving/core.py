"""The transport-neutral serving core: what both fronts (gRPC, OpenAI-compatible HTTP) share.

    front (gRPC servicer / HTTP route) -> GenerateInput -> ServingCore.submit -> Call
                                          (parse, validate, defaults)  (executor inbox)
    front <- Call.events()  <- Events of the executor's steps; Call.usage() at the end

A front turns its wire request into a `GenerateInput` and its wire response out of `Event`s and a
`Usage`; everything else (prompt forms, the max_tokens default, validation, request ids, admission,
cancellation of a call that ends early, metrics) lives here once. Errors are `ServingError`s
(serving.errors: one table maps them to gRPC codes and HTTP statuses).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import os
import time
from typing import AsyncIterator, Optional, Sequence

from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import QueueFull
from serving.errors import ServingError, invalid
from serving.executor import Event, Executor, ShuttingDown, Submission
from serving.metrics import Metrics
from serving.options import ServerOptions

# Fields a validation message may name (the `param` of an HTTP error).
FIELDS = ("prompt", "prompt_token_ids", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stop_token_ids", "request_id", "frequency_penalty", "presence_penalty", "repetition_penalty",
          "min_p", "logprobs", "top_logprobs")


@dataclasses.dataclass
class GenerateInput:
    """One generation request, whatever front it came from. Exactly one prompt form is set; None
    means "not given" (the server's default)."""

    prompt: Optional[str] = None
    prompt_token_ids: Optional[Sequence[int]] = None
    messages: Optional[Sequence[dict]] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logprobs: Optional[int] = None  # None: off; k: the sampled token's logprob and the top k (0..5)
    request_id: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: Optional[float]  # from receipt to the first token
    e2e_s: float  # from receipt to the last output
    instance: int
    queue_s: Optional[float] = None  # from arrival to first admitted into a step

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Call:
    """One submitted request: its events, then its usage. Ending early (the client went away, a
    deadline, a cancelled task) cancels it on the executor, which frees its pages before the next step."""

    def __init__(self, core: "ServingCore", sub: Submission):
        self.core = core
        self.sub = sub
        self.first: Optional[float] = None  # when the first token was produced
        self.done = False
        self._admitted = False
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.sub.request_id

    async def events(self) -> AsyncIterator[Event]:
        """Events until the finished one; raises ServingError for an error event."""
        try:
            while not self.done:
                ev: Event = await self.sub.queue.get()
                if ev.error is not None:
                    self.done = True
                    self.core.count_error(ev.error.code, self._admitted)
                    raise ServingError(ev.error.code, ev.error.message)
                self._admitted = True
                if ev.output.new_token_ids and self.first is None:
                    self.first = ev.time
                self.core.metrics.tokens.inc(len(ev.output.new_token_ids))
                if ev.output.finished:
                    self.done = True
                yield ev
        finally:
            self.close()

    def close(self) -> None:
        """Idempotent: a call that did not finish is cancelled (its pages freed)."""
        if self._closed:
            return
        self._closed = True
        self.core.active -= 1
        if not self.done:
            self.core.executor.cancel(self.request_id)
            self.core.metrics.requests.labels("abort").inc()

    def usage(self, ev: Event) -> Usage:
        """The usage of the finished event `ev` (recorded in the metrics once)."""
        out, m = ev.output, self.core.metrics
        ttft = (self.first - self.sub.received) if self.first is not None else None
        e2e = ev.time - self.sub.received
        n = len(out.token_ids)
        m.requests.labels(out.finish_reason or "unknown").inc()
        m.e2e.observe(e2e)
        if ttft is not None:
            m.ttft.observe(ttft)
        if self.first is not None and n > 1:
            m.tpot.observe((ev.time - self.first) / (n - 1))
        return Usage(out.prompt_tokens, n, ttft, e2e, self.sub.instance, out.queue_s)


class ServingCore:
    """The executor (the one thread that owns the devices) and the request path both fronts use."""

    def __init__(self, cluster, options: ServerOptions, metrics: Metrics, model_name: str = ""):
        self.cluster = cluster
        self.options = options
        self.metrics = metrics
        self.model_name = options.served_model_name or model_name or cluster.engines[0].model.name
        self.executor = Executor(cluster, options.max_queue, metrics)
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}"
        self.active = 0  # calls between submission and their end (the event loop's thread only)

    # ---- parsing (front thread; reads only constants of the cluster) ------------------------
    def parse(self, inp: GenerateInput) -> tuple[list[int], SamplingParams]:
        """Raises ServingError(INVALID_ARGUMENT) naming the offending field."""
        try:
            return self._parse(inp)
        except ValueError as e:
            raise invalid(e, FIELDS) from None

    def _parse(self, inp: GenerateInput) -> tuple[list[int], SamplingParams]:
        forms = [n for n, present in (("prompt", bool(inp.prompt)), ("prompt_token_ids", bool(inp.prompt_token_ids)),
                                      ("messages", bool(inp.messages))) if present]
        if not forms:
            raise ValueError("prompt: the prompt is empty; set exactly one of prompt (non-empty text), "
                             "prompt_token_ids or messages")
        if len(forms) > 1:
            raise ValueError(f"prompt: set exactly one of prompt, prompt_token_ids, messages "
                             f"(got {' and '.join(forms)})")
        if inp.prompt:
            ids = self.cluster.encode(inp.prompt)
        elif inp.messages:
            ids = self.cluster.encode_chat(list(inp.messages))
        else:
            ids = [int(t) for t in inp.prompt_token_ids]
        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            v = getattr(inp, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number")
        params = SamplingParams(
            # Unset: the server's default, shortened so that it always fits the context left after the prompt.
            max_tokens=inp.max_tokens if inp.max_tokens is not None else max(
                1, min(self.options.default_max_tokens, self.cluster.max_model_len - len(ids))),
            temperature=_or(inp.temperature, 0.0), top_p=_or(inp.top_p, 1.0), top_k=_or(inp.top_k, 0),
            seed=inp.seed, stop_token_ids=tuple(inp.stop_token_ids), stop=tuple(s for s in inp.stop if s),
            ignore_eos=inp.ignore_eos, **self._extra_params(inp))
        self.cluster.validate(ids, params)
        return ids, params

    @staticmethod
    def _extra_params(inp: GenerateInput) -> dict:
        """Penalties, min_p and logprobs, given only when set (SamplingParams' defaults are "off")."""
        names = ("min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "logprobs")
        return {n: getattr(inp, n) for n in names if getattr(inp, n) is not None}

    def request_id(self, given: Optional[str]) -> str:
        if given is not None:
            if not given or len(given) > 256:
                raise ServingError("INVALID_ARGUMENT", "request_id must be 1..256 characters", "request_id")
            return given
        return f"{self._prefix}-{next(self._ids)}"

    # ---- the request path --------------------------------------------------------------------
    def submit(self, inp: GenerateInput, received: Optional[float] = None) -> Call:
        """Parses and hands the request to the executor; raises ServingError (bad input, queue full,
        draining). The returned Call must be iterated (or closed)."""
        received = time.monotonic() if received is None else received
        try:
            rid = self.request_id(inp.request_id)
            ids, params = self.parse(inp)
        except ServingError as e:
            self.metrics.rejected.labels(e.code).inc()
            raise
        sub = Submission(rid, ids, params, asyncio.get_running_loop(), asyncio.Queue(), received=received)
        try:
            self.executor.submit(sub)
        except ShuttingDown as e:
            self.metrics.rejected.labels("UNAVAILABLE").inc()
            raise ServingError("UNAVAILABLE", str(e)) from None
        except QueueFull as e:
            self.metrics.rejected.labels("RESOURCE_EXHAUSTED").inc()
            raise ServingError("RESOURCE_EXHAUSTED", str(e)) from None
        self.active += 1
        return Call(self, sub)

    def count_error(self, code: str, admitted: bool) -> None:
        if admitted or code not in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
            self.metrics.requests.labels("error").inc()
        else:  # refused at admission on the executor (duplicate id, an instance's queue full)
            self.metrics.rejected.labels(code).inc()

    @property
    def draining(self) -> bool:
        return not self.executor.accepting


def _or(value, default):
    return default if value is None else value
