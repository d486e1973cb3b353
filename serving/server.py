"""gRPC front (grpc.aio), and the server that runs both fronts; never touches a device array.

    client -> Generate -> serving.core (validate, tokenize) -> Executor inbox (bounded) -> executor thread
           <- per-request asyncio.Queue                     <- outputs of each cluster step

The servicer is a thin adapter over serving.core, which the HTTP front (serving.http, on
`http_port`) shares in the same event loop; API keys (an interceptor) and TLS as serving.security
says. Validation errors are INVALID_ARGUMENT with the engine's message (it names the field); a full queue
is RESOURCE_EXHAUSTED; a cancelled call or an expired deadline aborts the request on the executor,
which frees its pages before it schedules the next step. TTFT is measured from the moment the
handler received the call. Also served: grpc.health.v1 and server reflection.

Graceful shutdown (`KunjaxServer.stop`, SIGTERM in the launcher): health turns NOT_SERVING, new calls
are refused (UNAVAILABLE), in-flight streams get the grace period to finish; those still running
then are aborted cleanly: their stream ends with a last message with FINISH_REASON_ABORT and usage,
and the call ends with status OK.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
import threading
import time
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kunjax.runtime.cluster import ServingCluster as Cluster
from serving.core import GenerateInput, ServingCore
from serving.errors import ServingError
from serving.executor import Executor
from serving.metrics import Metrics
from serving.options import ServerOptions
from serving.security import (ADMIN, GENERATION, OPEN, KeyCheck, grpc_server_credentials, tls_enabled,
                              warn_plaintext_keys)
from serving.proto import kunjax_pb2 as pb
from serving.proto import kunjax_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name

FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "abort": pb.FINISH_REASON_ABORT,
          "error": pb.FINISH_REASON_ERROR}


class PortUnavailable(OSError):
    """The gRPC address cannot be bound; the message is one line meant for the user."""


def probe_bind(host: str, port: int) -> None:
    """Raises PortUnavailable, with the operating system's reason, when `host:port` cannot be bound
    (the port in use, a host that is not an address of this machine). gRPC's own failure is a
    C-core log line plus a bare "Failed to bind"; this says why, before gRPC tries."""
    if not port:
        return  # any free port
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PortUnavailable(f"cannot listen on {host}:{port}: unknown host ({e.strerror})") from None
    for family, kind, proto, _, addr in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # an address family this host lacks (no IPv6): gRPC skips it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            if family == socket.AF_INET6 and addr[0] == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "[::]" is dual-stack in gRPC
            try:
                sock.bind(addr)
            except OSError as e:
                if e.errno == errno.EAFNOSUPPORT:
                    continue
                reason = ("the port is in use by another process" if e.errno == errno.EADDRINUSE
                          else e.strerror)
                raise PortUnavailable(f"cannot listen on {host}:{port}: {reason}") from None


class GenerationServicer(pb_grpc.GenerationServicer):
    """The gRPC adapter over serving.core: GenerateRequest -> GenerateInput, Events -> responses."""

    def __init__(self, core: ServingCore):
        self.core = core

    @staticmethod
    def to_input(req: pb.GenerateRequest) -> GenerateInput:
        opt = lambda name: getattr(req, name) if req.HasField(name) else None  # noqa: E731
        return GenerateInput(
            prompt=req.prompt or None, prompt_token_ids=list(req.prompt_token_ids) or None,
            messages=[{"role": m.role, "content": m.content} for m in req.messages] or None,
            stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos,
            **{n: opt(n) for n in OPTIONAL_FIELDS})

    async def Generate(self, request, context):
        received = time.monotonic()
        call = None
        try:
            call = self.core.submit(self.to_input(request), received)
            async for ev in call.events():
                out = ev.output
                msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.new_token_ids, text=out.text_delta)
                for lp in out.new_logprobs:
                    m = msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
                    for t, v in lp.top:
                        m.top.add(token_id=t, logprob=v)
                if out.finished:
                    msg.finish_reason = FINISH.get(out.finish_reason, pb.FINISH_REASON_ERROR)
                    u = call.usage(ev)
                    msg.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                                ttft_ms=1e3 * u.ttft_s if u.ttft_s is not None else 0.0,
                                                e2e_ms=1e3 * u.e2e_s, instance=u.instance,
                                                queue_ms=1e3 * u.queue_s if u.queue_s is not None else 0.0))
                yield msg
        except ServingError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)
        finally:  # cancelled, deadline, or the client went away: the call frees its pages
            if call is not None:
                call.close()

    async def Complete(self, request, context):
        """The whole completion in one message: the Generate stream, gathered."""
        ids, text, lps = [], [], []
        async for msg in self.Generate(request, context):
            ids.extend(msg.token_ids)
            text.append(msg.text)
            lps.extend(msg.logprobs)
            if msg.HasField("usage"):  # the last message
                return pb.CompleteResponse(request_id=msg.request_id, token_ids=ids, text="".join(text),
                                           finish_reason=msg.finish_reason, usage=msg.usage, logprobs=lps)
        await context.abort(grpc.StatusCode.INTERNAL, "request ended without a final output")


# GenerateRequest's optional scalars, each a GenerateInput field of the same name.
OPTIONAL_FIELDS = ("request_id", "max_tokens", "temperature", "top_p", "top_k", "seed", "min_p", "repetition_penalty",
                   "frequency_penalty", "presence_penalty", "logprobs")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """API keys on gRPC: Generation and Admin calls need the `authorization` metadata
    (serving.security); health and reflection stay open. A refused call ends UNAUTHENTICATED or
    PERMISSION_DENIED before its handler runs."""

    SCOPES = {GENERATION_SERVICE: GENERATION, ADMIN_SERVICE: ADMIN}

    def __init__(self, keys: KeyCheck):
        self.keys = keys

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        service = details.method.lstrip("/").split("/", 1)[0]
        scope = self.SCOPES.get(service, OPEN)
        if handler is None or scope == OPEN:
            return handler
        auth = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        try:
            self.keys.check(scope, auth)
        except ServingError as e:
            return _refusal(handler, getattr(grpc.StatusCode, e.code), e.message)
        return handler


def _refusal(handler, code, message):
    """A handler of the same kind as `handler` that only aborts with (code, message)."""
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - an async generator, as a server-streaming handler is

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class AdminServicer(pb_grpc.AdminServicer):
    """Status, and the memory mechanism by hand: PlanDrop (dry run), Drop, Restore. Every cluster
    call runs on the executor thread between steps; a drop or a restore pauses the units it
    touches for its duration, the others keep their place in the loop."""

    DEFAULT_GROUP_SIZE = None  # group_size unset or 0: the group planner chooses (ServingCluster.plan_drop)

    def __init__(self, executor: Executor, model_name: str, options: ServerOptions, metrics: Optional[Metrics] = None):
        self.executor = executor
        self.model_name = model_name
        self.options = options
        self.metrics = metrics
        self._transition: Optional[str] = None  # "drop" / "restore" while one runs

    async def _call(self, fn, context):
        if not self.executor.alive:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "executor is not running")
        return await asyncio.wrap_future(self.executor.call(fn))

    async def Status(self, request, context):
        st = await self._call(lambda c: c.status(with_memory=not request.skip_memory), context)
        return status_to_proto(st, self.model_name, self.executor, self.options, request.events_after)

    async def _group_size(self, request, context) -> int:
        """The request's group size; 0 or unset: None, the group planner's choice. Negative values are
        refused here (the planner names the bounds of positive ones)."""
        if not request.HasField("group_size") or request.group_size == 0:
            return self.DEFAULT_GROUP_SIZE
        if request.group_size < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"group_size must be >= 2 (or 0 for the "
                                                                  f"planner's choice), got {request.group_size}")
        return request.group_size

    async def _begin_transition(self, kind: str, context) -> None:
        """One drop or restore at a time: a second one is refused while the first runs."""
        if self._transition is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"a {self._transition} is running; retry when "
                                                                     f"it has finished")
        self._transition = kind

    async def _abort_for(self, e: Exception, context):
        from kunjax.memory.drop import DropError
        from kunjax.control.plan import PlanError
        from kunjax.memory.restore import RestoreError

        if isinstance(e, PlanError):
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
        if isinstance(e, (DropError, RestoreError)):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if isinstance(e, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        raise e

    async def _plan(self, g: int, context):
        """(plan, (executables ready, total), member infos), planned on the executor thread."""
        def plan(c):
            p = c.plan_drop(g)
            return p, c.plan_ready(p), c.member_infos()

        try:
            return await self._call(plan, context)
        except Exception as e:
            await self._abort_for(e, context)

    async def PlanDrop(self, request, context):
        plan, (ready, total), infos = await self._plan(await self._group_size(request, context), context)
        return plan_to_proto(plan, ready, total, infos)

    async def Drop(self, request, context):
        from kunjax.memory.drop import DropError

        g = await self._group_size(request, context)
        await self._begin_transition("drop", context)

        def drop_now(c):
            """On the executor thread: plan against the state of this very moment and start it (it
            then runs piece by piece inside the executor's loop)."""
            plan = c.plan_drop(g)
            return (plan, c.start_drop(plan)), []

        try:
            submitted = False
            while True:
                plan, (ready, total), infos = await self._plan(g, context)
                if ready < total:  # compile what the plan needs in the background; serving goes on
                    if not submitted:
                        await self._call(lambda c, p=plan: c.compile_plan(p), context)
                        submitted = True
                    await asyncio.sleep(0.1)
                    continue
                try:
                    plan, task = await asyncio.wrap_future(self.executor.transition(drop_now))
                    await _until_done([task])
                    rep, failed = task.report, task.outputs
                    break
                except DropError as e:
                    if "not compiled" not in str(e):
                        await self._abort_for(e, context)
                    submitted = False  # the plan changed between planning and applying: compile it
                except Exception as e:
                    await self._abort_for(e, context)
            if self.metrics is not None:
                self.metrics.observe_transition(rep)
            st = await self._call(lambda c: c.status(with_memory=False), context)
            resp = pb.DropResponse(plan=plan_to_proto(plan, total, total, infos), report=report_to_proto(rep, failed))
            for gs in st["groups"]:
                if gs["id"] in rep.groups:
                    add_group(resp.groups, gs)
            return resp
        finally:
            self._transition = None

    async def Restore(self, request, context):
        await self._begin_transition("restore", context)
        try:
            ids = list(request.group_ids)

            def run(c):
                if not c.groups():
                    raise NothingToRestore("no pipeline group to restore")
                return c.start_restore(ids or None), []
            try:
                tasks = await asyncio.wrap_future(self.executor.transition(run))
                await _until_done(tasks)
                reports, failed = [t.report for t in tasks], [o for t in tasks for o in t.outputs]
            except NothingToRestore as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except Exception as e:
                await self._abort_for(e, context)
            resp = pb.RestoreResponse()
            for rep in reports:
                if self.metrics is not None:
                    self.metrics.observe_transition(rep)
                resp.reports.append(report_to_proto(rep, failed))
            return resp
        finally:
            self._transition = None


class NothingToRestore(Exception):
    pass


async def _until_done(tasks, poll_s: float = 0.01) -> None:
    """Waits (without blocking the event loop or the executor) until transition tasks are done."""
    while not all(t.done for t in tasks):
        await asyncio.sleep(poll_s)


def plan_to_proto(plan, ready: int, total: int, infos: dict) -> pb.PlanDropResponse:
    msg = pb.PlanDropResponse(alone=list(plan.alone), executables_ready=ready, executables_total=total)
    for gp in plan.groups:
        g = msg.groups.add(instances=list(gp.instances), num_pages=gp.num_pages)
        for st in gp.stages:
            g.stages.add(instance=st.instance, layer_start=st.start, layer_stop=st.stop, embed=st.embed, head=st.head)
        for i in gp.instances:
            g.pages_before[i] = gp.pages_before[i]
            g.pages_gained[i] = gp.num_pages - gp.pages_before[i]
            g.peak_bytes[i] = gp.peak_bytes[i]
            g.steady_bytes[i] = gp.steady_bytes[i]
            g.budget_bytes[i] = infos[i].budget
    return msg


def report_to_proto(rep, failed) -> pb.TransitionReport:
    msg = pb.TransitionReport(kind=rep.kind, groups=list(rep.groups), seconds=rep.seconds, compiles=rep.compiles,
                              exchange_bytes_between_devices=rep.exchange.bytes_between_devices,
                              exchange_bytes_local=rep.exchange.bytes_local, exchange_seconds=rep.exchange.seconds,
                              failed_requests=len(failed), pieces=rep.pieces, piece_seconds_max=rep.piece_seconds_max,
                              piece_seconds_total=rep.piece_seconds_total,
                              exchange_bytes_padding=rep.exchange.bytes_padding, state=rep.state)
    for name in ("freed_weight_bytes", "live_before", "peak_live", "live_after"):
        for k, v in getattr(rep, name).items():
            getattr(msg, name)[k] = int(v)
    return msg


def add_group(container, gs: dict) -> None:
    g = container.add(id=gs["id"], instances=gs["instances"], state=gs["state"], num_pages=gs["num_pages"],
                      running=gs["running"], waiting=gs["waiting"], pages_total=gs["pages_total"],
                      pages_free=gs["pages_free"])
    for st in gs["stages"]:
        g.stages.add(instance=st["instance"], layer_start=st["start"], layer_stop=st["stop"], embed=st["embed"],
                     head=st["head"])


def status_to_proto(st: dict, model_name: str, executor: Executor, options: ServerOptions,
                    events_after: int = 0) -> pb.StatusResponse:
    msg = pb.StatusResponse(model=model_name, running=st["running"], waiting=st["waiting"],
                            queued=executor.inbox_size(),
                            pages_total=st["pages_total"], pages_free=st["pages_free"], compiles=st["compiles"],
                            overload_policy=options.overload_policy, compiling=st.get("compiling", False),
                            max_model_len=executor.cluster.max_model_len)
    for k, v in st.get("timing", {}).items():
        msg.timing[k] = float(v)
    for k, v in dataclasses.asdict(executor.timing).items():
        msg.timing[k] = float(v)
    fields = {f.name for f in pb.InstanceStatus.DESCRIPTOR.fields}
    for s in st["instances"]:
        i = msg.instances.add(**{k: v for k, v in s.items() if k in fields})
        i.layer_start, i.layer_stop = s.get("layers", (0, 0))
    for g in st["groups"]:
        add_group(msg.groups, g)
    for k, v in st.get("transition_counts", {}).items():
        msg.transitions[k] = float(v)
    pol = st.get("overload_policy", {})
    for k in ("drops", "restores", "fallbacks", "partial_drops"):
        if k in pol:
            msg.transitions[f"policy_{k}"] = float(pol[k])
    if "cost_model" in pol:
        msg.transitions["cost_model_error_pct"] = float(pol["cost_model"]["mean_abs_pct_error"])
        msg.transitions["cost_model_observed_steps"] = float(pol["cost_model"]["observed_steps"])
    for t in st.get("transitions", []):
        msg.in_progress.add(kind=t["kind"], groups=t["groups"], pieces=t["pieces"], seconds=t["seconds"])
    from kunjax.control.events import merge

    logs = [(s["id"], s["events"]) for s in st["instances"] if "events" in s]
    if "events" in st:  # the cluster's own: drops and restores, decided and done (instance -1)
        logs.append((-1, st["events"]))
    for ev in merge(logs, events_after, limit=1000):
        msg.events.add(**ev)
    for m in st.get("memory", []):
        d = msg.memory.add(device=m["device"], live_bytes=m["live"], instance=m["instance"], budget=m["budget"] or 0,
                           weights=m["weights"], embed=m["embed"], head=m["head"], kv=m["kv"], reserve=m["reserve"],
                           other=m["other"], free=m["free"] if m["budget"] else 0)
        if m.get("bytes_in_use") is not None:
            d.bytes_in_use = m["bytes_in_use"]
        for layer, n in m["layers"].items():
            d.layers[int(layer)] = n
    return msg


class KunjaxServer:
    """The gRPC server plus its executor; start/stop inside a running asyncio loop.

    `bind()` creates the gRPC server and takes its port at once, before there is a cluster, so a
    launcher finds a port in use before it loads and compiles anything; `start(cluster)` attaches
    the cluster (when the constructor had none), registers the services and starts serving."""

    def __init__(self, cluster: Optional[Cluster] = None, options: ServerOptions = ServerOptions(),
                 metrics: Optional[Metrics] = None, model_name: str = ""):
        self.options = options
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        self.server: Optional[grpc.aio.Server] = None
        self.health = health.aio.HealthServicer()
        self.port: Optional[int] = None
        self.http = None  # serving.http.HttpFront when options.http_port is set
        self._abort_now = threading.Event()
        self.cluster: Optional[Cluster] = None
        self.core: Optional[ServingCore] = None
        if cluster is not None:
            self.attach(cluster)

    def attach(self, cluster: Cluster) -> None:
        """The cluster to serve (once, before `start`)."""
        if self.cluster is not None:
            raise RuntimeError("KunjaxServer already has a cluster")
        self.cluster = cluster
        self.core = ServingCore(cluster, self.options, self.metrics, self.model_name)
        self.model_name = self.core.model_name
        self.generation = GenerationServicer(self.core)

    @property
    def executor(self) -> Executor:
        return self.core.executor

    @property
    def http_port(self) -> Optional[int]:
        return self.http.port if self.http is not None else None

    def bind(self) -> int:
        """Creates the gRPC server and binds its port now (inside the event loop that will serve),
        and the HTTP front's port when there is one. Raises PortUnavailable when an address cannot be
        bound (in use, or not an address of this host)."""
        if self.server is None:
            address = f"{self.options.host}:{self.options.port}"
            probe_bind(self.options.host, self.options.port)
            keys = KeyCheck.from_options(self.options)
            # so_reuseport off: a second server on the same port must fail here, not share it.
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                                     interceptors=[AuthInterceptor(keys)] if keys.enabled else None)
            try:
                port = (server.add_secure_port(address, grpc_server_credentials(self.options))
                        if tls_enabled(self.options) else server.add_insecure_port(address))
            except RuntimeError:  # grpc >= 1.60 raises "Failed to bind to address ..."
                port = 0
            if not port:
                raise PortUnavailable(f"cannot listen on {address}: gRPC could not bind it")
            self.server, self.port = server, port
        if self.options.http_port is not None and self.http is None:
            from serving.http import HttpFront

            http = HttpFront(self.options, self.metrics)
            http.bind()
            self.http = http
        return self.port

    ABORT_MARGIN_S = 5.0  # after the grace period, time for aborted streams to send their last message

    async def start(self, cluster: Optional[Cluster] = None) -> int:
        if cluster is not None:
            self.attach(cluster)
        if self.cluster is None:
            raise RuntimeError("KunjaxServer.start needs a cluster (constructor or start(cluster))")
        self.bind()
        self.executor.start()
        pb_grpc.add_GenerationServicer_to_server(self.generation, self.server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(self.executor, self.model_name, self.options, self.metrics),
                                            self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (GENERATION_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        await self.server.start()
        if self.http is not None:
            await self.http.start(self.core)
        for svc in ("", GENERATION_SERVICE, ADMIN_SERVICE):
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        warn_plaintext_keys(self.options)
        log.info("serving %s on port %d%s", self.model_name, self.port,
                 f" (gRPC), {self.http.port} (HTTP)" if self.http is not None else "")
        return self.port

    async def stop(self, grace: Optional[float] = None) -> None:
        """Graceful: health goes NOT_SERVING, new calls are refused, in-flight streams get `grace`
        seconds to finish. Streams still running then (or at once after `abort_inflight()`) are
        aborted cleanly: each gets a last message with FINISH_REASON_ABORT and its usage, the call
        ends OK, and the pages are freed. Then the executor stops."""
        grace = self.options.shutdown_grace_s if grace is None else grace
        loop = asyncio.get_running_loop()
        self.executor.close()
        await self.health.enter_graceful_shutdown()
        stopping = None
        if self.server is not None:
            # grpc refuses new calls at once and cancels what is left after its grace; ours ends the
            # streams itself first, so gRPC's deadline is only a backstop.
            stopping = asyncio.ensure_future(self.server.stop(grace + self.ABORT_MARGIN_S))
        deadline = loop.time() + grace
        while self.core.active and loop.time() < deadline and not self._abort_now.is_set():
            await asyncio.sleep(0.02)
        if self.core.active:
            log.info("shutdown: aborting %d in-flight calls", self.core.active)
            self.executor.abort_all()
        if stopping is not None:
            await stopping
        if self.http is not None:
            await self.http.stop()
        await loop.run_in_executor(None, self.executor.stop)

    def abort_inflight(self) -> None:
        """End the grace period of `stop()` now (a second SIGTERM in the launcher); thread-safe."""
        self._abort_now.set()

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


class ServerThread:
    """Runs a KunjaxServer on its own event loop in a background thread (tests, notebooks)."""

    def __init__(self, cluster: Cluster, options: ServerOptions = ServerOptions(), metrics: Optional[Metrics] = None):
        self.server = KunjaxServer(cluster, options, metrics)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, name="kunjax-grpc", daemon=True)

    def _main(self):
        asyncio.set_event_loop(self.loop)

        async def boot():
            try:
                await self.server.start()
            except BaseException as e:
                self._error = e
            finally:
                self._started.set()
        self.loop.run_until_complete(boot())
        if self._error is None:
            self.loop.run_forever()

    def start(self) -> "ServerThread":
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def executor(self) -> Executor:
        return self.server.executor

    @property
    def http_port(self):
        return self.server.http_port

    def stop(self, grace: float = 1.0) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop)
        fut.result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
