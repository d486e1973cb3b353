"""Python client (sync and asyncio) for the kunjax gRPC server, and a small CLI.

    from serving.client import Client
    with Client("localhost:50051") as c:
        for chunk in c.generate("Hello", max_tokens=32):     # streaming iterator
            print(chunk.text, end="", flush=True)
        print(c.complete(prompt_token_ids=[1, 2, 3]).token_ids)
        print(c.status())

    python -m serving.client --prompt "Hello" --stream
    python -m serving.client --chat --prompt "Hi there" --system "Be brief."
    python -m serving.client --status

The CLI prints the generated text on stdout and a JSON summary on stderr; its exit status says how
the request ended (`python -m serving.client --help`: 0 length/stop, 1 RPC error, 2 usage,
3 aborted, 4 error).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import AsyncIterator, Iterator, Optional, Sequence

import grpc
from google.protobuf import json_format

from serving.proto import kunjax_pb2 as pb
from serving.proto import kunjax_pb2_grpc as pb_grpc

FINISH_NAMES = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_ABORT: "abort",
                pb.FINISH_REASON_ERROR: "error", pb.FINISH_REASON_UNSPECIFIED: None}


def make_request(prompt: Optional[str] = None, *, prompt_token_ids: Optional[Sequence[int]] = None,
                 messages: Optional[Sequence[dict]] = None, max_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
                 seed: Optional[int] = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 ignore_eos: bool = False, request_id: Optional[str] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, frequency_penalty: Optional[float] = None,
                 presence_penalty: Optional[float] = None, logprobs: Optional[int] = None) -> pb.GenerateRequest:
    req = pb.GenerateRequest(stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    if prompt is not None:
        req.prompt = prompt
    if prompt_token_ids is not None:
        req.prompt_token_ids.extend(int(t) for t in prompt_token_ids)
    for m in messages or ():
        req.messages.add(role=m["role"], content=m["content"])
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed), ("request_id", request_id), ("min_p", min_p),
                        ("repetition_penalty", repetition_penalty), ("frequency_penalty", frequency_penalty),
                        ("presence_penalty", presence_penalty), ("logprobs", logprobs)):
        if value is not None:
            setattr(req, name, value)
    return req


def _read(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel_credentials(tls_ca_file: Optional[str] = None, tls_cert_file: Optional[str] = None,
                        tls_key_file: Optional[str] = None):
    """TLS credentials: the CA that signed the server's certificate (None: the system's roots), and
    a client certificate for a server that requires one (mutual TLS)."""
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca_file), private_key=_read(tls_key_file),
                                        certificate_chain=_read(tls_cert_file))


class _KeyMetadata:
    """Adds `authorization: Bearer <key>` to every call of a channel (the key never printed)."""

    def __init__(self, api_key: str):
        self._md = (("authorization", f"Bearer {api_key}"),)

    def _details(self, details):
        return _Details(details, tuple(details.metadata or ()) + self._md)


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")),
               grpc.ClientCallDetails):
    def __new__(cls, details, metadata):
        return super().__new__(cls, details.method, details.timeout, metadata, details.credentials,
                               getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


class _SyncKey(_KeyMetadata, grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class _AsyncKeyUnary(_KeyMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._aio_details(details), request)

    def _aio_details(self, d):
        return grpc.aio.ClientCallDetails(d.method, d.timeout, tuple(d.metadata or ()) + self._md, d.credentials,
                                          d.wait_for_ready)


class _AsyncKeyStream(_AsyncKeyUnary, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._aio_details(details), request)


def make_channel(target: str, api_key: Optional[str] = None, tls_ca_file: Optional[str] = None,
                 tls_cert_file: Optional[str] = None, tls_key_file: Optional[str] = None, aio: bool = False):
    """A channel to the server: TLS when a CA (or a client certificate) is given, and the API key on
    every call."""
    secure = bool(tls_ca_file or tls_cert_file)
    mod = grpc.aio if aio else grpc
    if aio:
        inter = [_AsyncKeyStream(api_key)] if api_key else None
        return (mod.secure_channel(target, channel_credentials(tls_ca_file, tls_cert_file, tls_key_file),
                                   interceptors=inter) if secure else mod.insecure_channel(target, interceptors=inter))
    ch = (grpc.secure_channel(target, channel_credentials(tls_ca_file, tls_cert_file, tls_key_file)) if secure
          else grpc.insecure_channel(target))
    return grpc.intercept_channel(ch, _SyncKey(api_key)) if api_key else ch


def _drop_request(cls, group_size: Optional[int]):
    return cls() if group_size is None else cls(group_size=group_size)


class Client:
    """Blocking client. `generate` streams GenerateResponse chunks; breaking out of the loop (or
    `cancel()` on the returned iterator) cancels the call, which frees the request's KV pages."""

    def __init__(self, target: str = "localhost:50051", channel: Optional[grpc.Channel] = None,
                 api_key: Optional[str] = None, tls_ca_file: Optional[str] = None,
                 tls_cert_file: Optional[str] = None, tls_key_file: Optional[str] = None):
        self.channel = channel or make_channel(target, api_key, tls_ca_file, tls_cert_file, tls_key_file)
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def generate(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kw) -> Iterator[pb.GenerateResponse]:
        return self.generation.Generate(make_request(prompt, **kw), timeout=timeout)

    def complete(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kw) -> pb.CompleteResponse:
        return self.generation.Complete(make_request(prompt, **kw), timeout=timeout)

    def status(self, skip_memory: bool = False, timeout: Optional[float] = None,
               events_after: int = 0) -> pb.StatusResponse:
        """`events_after`: only the overload events with a larger seq (a poller passes the last one it saw)."""
        return self.admin.Status(pb.StatusRequest(skip_memory=skip_memory, events_after=events_after), timeout=timeout)

    def plan_drop(self, group_size: Optional[int] = None, timeout: Optional[float] = None) -> pb.PlanDropResponse:
        """A dry run of a parameter drop (nothing changes)."""
        return self.admin.PlanDrop(_drop_request(pb.PlanDropRequest, group_size), timeout=timeout)

    def drop(self, group_size: Optional[int] = None, timeout: Optional[float] = None) -> pb.DropResponse:
        """Merges instances into pipeline groups now (group_size None/0: the server's choice)."""
        return self.admin.Drop(_drop_request(pb.DropRequest, group_size), timeout=timeout)

    def restore(self, group_ids: Sequence[int] = (), timeout: Optional[float] = None) -> pb.RestoreResponse:
        """Splits pipeline groups back into instances (every group when `group_ids` is empty)."""
        return self.admin.Restore(pb.RestoreRequest(group_ids=list(group_ids)), timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """asyncio client: `async for chunk in client.generate(...)`."""

    def __init__(self, target: str = "localhost:50051", channel: Optional[grpc.aio.Channel] = None,
                 api_key: Optional[str] = None, tls_ca_file: Optional[str] = None,
                 tls_cert_file: Optional[str] = None, tls_key_file: Optional[str] = None):
        self.channel = channel or make_channel(target, api_key, tls_ca_file, tls_cert_file, tls_key_file, aio=True)
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def generate(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kw) -> AsyncIterator[pb.GenerateResponse]:
        return self.generation.Generate(make_request(prompt, **kw), timeout=timeout)

    async def complete(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kw) -> pb.CompleteResponse:
        return await self.generation.Complete(make_request(prompt, **kw), timeout=timeout)

    async def status(self, skip_memory: bool = False, timeout: Optional[float] = None,
                     events_after: int = 0) -> pb.StatusResponse:
        return await self.admin.Status(pb.StatusRequest(skip_memory=skip_memory, events_after=events_after),
                                       timeout=timeout)

    async def plan_drop(self, group_size: Optional[int] = None, timeout: Optional[float] = None) -> pb.PlanDropResponse:
        return await self.admin.PlanDrop(_drop_request(pb.PlanDropRequest, group_size), timeout=timeout)

    async def drop(self, group_size: Optional[int] = None, timeout: Optional[float] = None) -> pb.DropResponse:
        return await self.admin.Drop(_drop_request(pb.DropRequest, group_size), timeout=timeout)

    async def restore(self, group_ids: Sequence[int] = (), timeout: Optional[float] = None) -> pb.RestoreResponse:
        return await self.admin.Restore(pb.RestoreRequest(group_ids=list(group_ids)), timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


EXIT_OK = 0  # finish_reason length or stop (and --status)
EXIT_RPC_ERROR = 1  # the call failed: server unreachable, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, deadline...
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_ABORTED = 3  # the server ended the request early: finish_reason abort (shutdown, cancel)
EXIT_FAILED = 4  # finish_reason error, or a stream that ended without a finish reason
EXIT_CODES = {"length": EXIT_OK, "stop": EXIT_OK, "abort": EXIT_ABORTED, "error": EXIT_FAILED}

EPILOG = """output: the generated text goes to stdout; a one-line JSON summary goes to stderr:
  {"finish_reason": ..., "usage": {...}} (plus "token_ids" with --show_token_ids).

exit status:
  0  finished: finish_reason length or stop (or --status answered)
  1  RPC error (server unreachable, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, deadline, ...)
  2  usage error (e.g. --chat without --prompt)
  3  aborted: finish_reason abort (the server shut down or cancelled the request)
  4  failed: finish_reason error, or the stream ended without a finish reason"""


def _json(msg) -> str:
    """An admin reply as JSON: zeros printed (stage 0's layer_start, instance 0), 64-bit counts as numbers."""
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True,
                                     unquote_int64_if_possible=True)


def _summary(finish_reason, usage, token_ids, show_token_ids: bool) -> str:
    d = {"finish_reason": finish_reason, "usage": json_format.MessageToDict(usage, preserving_proto_field_name=True)}
    if show_token_ids:
        d["token_ids"] = list(token_ids)
    return json.dumps(d)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.split("\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--prompt", help="prompt text (the user message with --chat)")
    ap.add_argument("--token_ids", help="comma-separated prompt token ids instead of --prompt")
    ap.add_argument("--chat", action="store_true", help="send --prompt as a chat message (model's template)")
    ap.add_argument("--system", help="system message for --chat")
    ap.add_argument("--stream", action="store_true", help="print text as it is generated")
    ap.add_argument("--status", action="store_true", help="print the server status as JSON and exit")
    ap.add_argument("--plan_drop", type=int, metavar="G", help="dry run of a parameter drop into groups of G "
                    "instances (0: the server's choice); prints the plan as JSON")
    ap.add_argument("--drop", type=int, metavar="G", help="drop parameters now: groups of G instances (0: the "
                    "server's choice); prints the report as JSON")
    ap.add_argument("--restore", nargs="*", type=int, metavar="GROUP", help="restore these pipeline groups "
                    "(none given: all); prints the reports as JSON")
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top_p", type=float)
    ap.add_argument("--top_k", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--min_p", type=float)
    ap.add_argument("--repetition_penalty", type=float, help="> 1 discourages repeating prompt and output tokens")
    ap.add_argument("--frequency_penalty", type=float, help="OpenAI's, -2..2: minus penalty x count in the output")
    ap.add_argument("--presence_penalty", type=float, help="OpenAI's, -2..2: minus penalty if in the output")
    ap.add_argument("--ignore_eos", action="store_true", help="generate max_tokens even past end-of-sequence")
    ap.add_argument("--show_token_ids", action="store_true", help="add the generated token ids to the summary")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--api_key", default=os.environ.get("KUNJAX_API_KEY"),
                    help="API key sent as 'authorization: Bearer <key>' (default $KUNJAX_API_KEY)")
    ap.add_argument("--tls_ca_file", help="PEM CA that signed the server's certificate: connect over TLS")
    ap.add_argument("--tls_cert_file", help="client certificate for a server that requires one (mutual TLS)")
    ap.add_argument("--tls_key_file", help="private key of --tls_cert_file")
    args = ap.parse_args(argv)
    token_ids = None
    admin_call = args.status or args.plan_drop is not None or args.drop is not None or args.restore is not None
    if not admin_call:
        if args.chat:
            if not args.prompt:
                ap.error("--chat needs --prompt (the user message)")
            if args.token_ids:
                ap.error("--chat sends --prompt as a message; --token_ids cannot go with it")
        elif args.prompt is not None and args.token_ids:
            ap.error("give --prompt or --token_ids, not both")
        elif args.token_ids:
            try:
                token_ids = [int(t) for t in args.token_ids.split(",")]
            except ValueError:
                ap.error(f"--token_ids takes comma-separated integers, got {args.token_ids!r}")
        elif not args.prompt:
            ap.error("--prompt is missing or empty (or give --token_ids, or an admin call: --status, --plan_drop, "
                     "--drop, --restore)")
        if args.system and not args.chat:
            ap.error("--system goes with --chat")
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        ap.error("--tls_cert_file and --tls_key_file go together")
    try:
        return _run(args, token_ids, admin_call)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): end quietly, as command-line tools do. Python
        # would print a second BrokenPipeError when it flushes stdout at exit; point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _run(args, token_ids, admin_call) -> int:
    with Client(args.target, api_key=args.api_key, tls_ca_file=args.tls_ca_file, tls_cert_file=args.tls_cert_file,
                tls_key_file=args.tls_key_file) as c:
        try:
            if args.status:
                print(_json(c.status(timeout=args.timeout)))
                return EXIT_OK
            admin = None
            if args.plan_drop is not None:
                admin = c.plan_drop(args.plan_drop, timeout=args.timeout)
            elif args.drop is not None:
                admin = c.drop(args.drop, timeout=args.timeout)
            elif args.restore is not None:
                admin = c.restore(args.restore, timeout=args.timeout)
            if admin is not None:
                print(_json(admin))
                return EXIT_OK
            kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos, timeout=args.timeout,
                      min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                      frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)
            prompt = None
            if args.chat:
                msgs = ([{"role": "system", "content": args.system}] if args.system else [])
                msgs.append({"role": "user", "content": args.prompt})
                kw["messages"] = msgs
            elif token_ids is not None:
                kw["prompt_token_ids"] = token_ids
            else:
                prompt = args.prompt
            if args.stream:
                last = None
                ids: list[int] = []
                for chunk in c.generate(prompt, **kw):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    ids.extend(chunk.token_ids)
                    last = chunk
                sys.stdout.write("\n")
                sys.stdout.flush()
                finish = FINISH_NAMES[last.finish_reason] if last is not None else None
                usage = last.usage if last is not None else pb.Usage()
            else:
                r = c.complete(prompt, **kw)
                print(r.text, flush=True)
                finish, usage, ids = FINISH_NAMES[r.finish_reason], r.usage, r.token_ids
            print(_summary(finish, usage, ids, args.show_token_ids), file=sys.stderr)
            if finish is None:
                print("error: the response ended without a finish reason", file=sys.stderr)
            return EXIT_CODES.get(finish, EXIT_FAILED)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return EXIT_RPC_ERROR


if __name__ == "__main__":
    sys.exit(main())
