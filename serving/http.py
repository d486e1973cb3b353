"""The OpenAI-compatible HTTP front: Starlette routes on uvicorn, in the gRPC server's event loop.

    GET  /v1/models             the served model (--served_model_name, default --model)
    POST /v1/completions        prompt as text or token ids
    POST /v1/chat/completions   messages through the model's chat template
    GET  /health                200 while serving, 503 while draining (open, no key)
    GET  /metrics               the server's Prometheus metrics (open, as --metrics_port is)

Why Starlette and not FastAPI: the request checks are the serving core's and serving.openai_api's,
shared with gRPC; FastAPI's pydantic models would be a second validator answering 422 in its own
shape. Starlette is the small, well-kept ASGI toolkit FastAPI itself is built on; uvicorn serves it
(h11, TLS through Python's ssl). The server runs as a task of the same asyncio loop as grpc.aio, so
both fronts hand requests to the one executor the same way.

Every request goes through ServingCore.submit; a refusal is the OpenAI error body with the status
of serving.errors' table. A stream whose client disconnects is cancelled on the executor (its pages
freed before the next step): `_EventStream` closes its call however the response ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serving import openai_api as api
from serving.core import Call, ServingCore
from serving.errors import ServingError
from serving.metrics import Metrics
from serving.options import ServerOptions
from serving.security import GENERATION, KeyCheck, tls_enabled

log = logging.getLogger(__name__)


def error_response(e: ServingError) -> JSONResponse:
    return JSONResponse(e.openai_body(), status_code=e.http_status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _EventStream(StreamingResponse):
    """A server-sent-event response that closes its call however it ends (finished, the client
    disconnected, the task cancelled): an unfinished call is cancelled on the executor."""

    def __init__(self, content, call: Call):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.call = call

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.close()


class HttpFront:
    def __init__(self, options: ServerOptions, metrics: Metrics):
        self.options = options
        self.metrics = metrics
        self.keys = KeyCheck.from_options(options)
        self.core: Optional[ServingCore] = None
        self.port: Optional[int] = None
        self._sockets: list[socket.socket] = []
        self._server = None
        self._task: Optional[asyncio.Task] = None
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_route, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_error, Exception: self._bug})

    # ---- sockets and the server ----------------------------------------------------------------
    def bind(self) -> int:
        """Binds --http_port on every address of --host now (before the model loads); returns the port."""
        if self._sockets:
            return self.port
        from serving.server import PortUnavailable, probe_bind

        host, port = self.options.host, self.options.http_port
        probe_bind(host, port)
        name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in infos:
            if self._sockets:  # every further address on the port the first one got
                addr = (addr[0], self.port) + tuple(addr[2:])
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if addr[0] == "::" else 1)
            try:
                sock.bind(addr)
            except OSError as e:
                sock.close()
                if self._sockets:
                    continue  # the same port taken on a second address: serve the first ones
                raise PortUnavailable(f"cannot listen on {host}:{port}: {e.strerror}") from None
            sock.listen(1024)
            sock.setblocking(False)
            self._sockets.append(sock)
            self.port = sock.getsockname()[1]
            if family == socket.AF_INET6 and addr[0] == "::":
                break  # dual-stack: the IPv4 wildcard is covered
        if not self._sockets:
            raise PortUnavailable(f"cannot listen on {host}:{port}: no usable address")
        return self.port

    async def start(self, core: ServingCore) -> int:
        import uvicorn

        self.core = core
        self.bind()
        o = self.options
        ssl_kw = {}
        if tls_enabled(o):
            import ssl

            ssl_kw = dict(ssl_certfile=o.tls_cert_file, ssl_keyfile=o.tls_key_file)
            if o.tls_client_ca_file:
                ssl_kw.update(ssl_ca_certs=o.tls_client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, **ssl_kw)
        self._server = _Uvicorn(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=self._sockets))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on port %d (%s)", self.port, "https" if tls_enabled(o) else "http")
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        for s in self._sockets:
            s.close()

    # ---- routes ------------------------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}.get(exc.status_code,
                                                                                      "INVALID_ARGUMENT")
        e = ServingError(code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(e.openai_body(), status_code=exc.status_code)

    async def _bug(self, request: Request, exc: Exception) -> JSONResponse:
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(ServingError("INTERNAL", f"internal error: {type(exc).__name__}"))

    def _authorize(self, request: Request) -> None:
        self.keys.check(GENERATION, request.headers.get("authorization"))

    async def health(self, request: Request) -> Response:
        if self.core is None or self.core.draining or not self.core.executor.alive:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_route(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ServingError as e:
            return error_response(e)
        core = self.core
        return JSONResponse({"object": "list", "data": [{
            "id": core.model_name, "object": "model", "created": int(self.started_at), "owned_by": "kunjax",
            "max_model_len": core.cluster.max_model_len}]})

    started_at = time.time()

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        received = time.monotonic()
        try:
            self._authorize(request)
            try:
                body = api.Body(json.loads(await request.body()))
            except (ValueError, UnicodeDecodeError) as e:
                raise ServingError("INVALID_ARGUMENT", f"the request body is not valid JSON: {e}") from None
            api.check_model(body, self.core.model_name)
            inp = api.chat_input(body) if chat else api.completion_input(body)
            stream, include_usage = api.stream_options(body)
            token_ids = body.get("return_token_ids", "bool", False)
            call = self.core.submit(inp, received)
        except ServingError as e:
            return error_response(e)
        shaper = api.Shaper(chat, call.request_id, self.core.model_name, self._token_text, inp.logprobs)
        if stream:
            return _EventStream(self._stream(call, shaper, include_usage, token_ids), call)
        try:
            text, lps = [], []
            async for ev in call.events():
                out = ev.output
                text.append(out.text_delta)
                lps.extend(out.new_logprobs)
                if out.finished:
                    return JSONResponse(shaper.whole("".join(text), lps, out.finish_reason, call.usage(ev),
                                                     out.token_ids if token_ids else None))
        except ServingError as e:
            return error_response(e)
        finally:
            call.close()
        return error_response(ServingError("INTERNAL", "request ended without a final output"))

    async def _stream(self, call: Call, shaper: api.Shaper, include_usage: bool, token_ids: bool = False):
        usage = {"usage": None} if include_usage else {}
        try:
            if shaper.chat:  # the role first, as the API does
                yield _sse(shaper.chunk([shaper.choice("", [], None, delta=True, first=True)], **usage))
            async for ev in call.events():
                out = ev.output
                if out.text_delta or out.new_logprobs or (token_ids and out.new_token_ids):
                    c = shaper.choice(out.text_delta, out.new_logprobs, None, delta=True)
                    if token_ids:  # vLLM's return_token_ids
                        c["token_ids"] = out.new_token_ids
                    yield _sse(shaper.chunk([c], **usage))
                if out.finished:
                    yield _sse(shaper.chunk([shaper.choice("", [], out.finish_reason, delta=True)], **usage))
                    if include_usage:
                        yield _sse(shaper.chunk([], api.usage_dict(call.usage(ev))))
                    else:
                        call.usage(ev)  # recorded in the metrics
        except ServingError as e:  # failed after the stream began: the error as the last event
            yield _sse(e.openai_body())
        yield "data: [DONE]\n\n"

    def _token_text(self, token_id: int) -> str:
        tok = self.core.cluster.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)


class _Uvicorn:
    """uvicorn.Server without its signal handling: the launcher owns SIGTERM/SIGINT (graceful drain
    of both fronts), uvicorn must not replace its handlers."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield
        return Server(config)
