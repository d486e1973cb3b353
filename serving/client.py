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
"""

from __future__ import annotations

import argparse
import json
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
                 ignore_eos: bool = False, request_id: Optional[str] = None) -> pb.GenerateRequest:
    req = pb.GenerateRequest(stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    if prompt is not None:
        req.prompt = prompt
    if prompt_token_ids is not None:
        req.prompt_token_ids.extend(int(t) for t in prompt_token_ids)
    for m in messages or ():
        req.messages.add(role=m["role"], content=m["content"])
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed), ("request_id", request_id)):
        if value is not None:
            setattr(req, name, value)
    return req


def _drop_request(cls, group_size: Optional[int]):
    return cls() if group_size is None else cls(group_size=group_size)


class Client:
    """Blocking client. `generate` streams GenerateResponse chunks; breaking out of the loop (or
    `cancel()` on the returned iterator) cancels the call, which frees the request's KV pages."""

    def __init__(self, target: str = "localhost:50051", channel: Optional[grpc.Channel] = None):
        self.channel = channel or grpc.insecure_channel(target)
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def generate(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kw) -> Iterator[pb.GenerateResponse]:
        return self.generation.Generate(make_request(prompt, **kw), timeout=timeout)

    def complete(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kw) -> pb.CompleteResponse:
        return self.generation.Complete(make_request(prompt, **kw), timeout=timeout)

    def status(self, skip_memory: bool = False, timeout: Optional[float] = None) -> pb.StatusResponse:
        return self.admin.Status(pb.StatusRequest(skip_memory=skip_memory), timeout=timeout)

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

    def __init__(self, target: str = "localhost:50051", channel: Optional[grpc.aio.Channel] = None):
        self.channel = channel or grpc.aio.insecure_channel(target)
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def generate(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kw) -> AsyncIterator[pb.GenerateResponse]:
        return self.generation.Generate(make_request(prompt, **kw), timeout=timeout)

    async def complete(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kw) -> pb.CompleteResponse:
        return await self.generation.Complete(make_request(prompt, **kw), timeout=timeout)

    async def status(self, skip_memory: bool = False, timeout: Optional[float] = None) -> pb.StatusResponse:
        return await self.admin.Status(pb.StatusRequest(skip_memory=skip_memory), timeout=timeout)

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.split("\n")[0])
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
    ap.add_argument("--timeout", type=float, default=None)
    args = ap.parse_args(argv)
    with Client(args.target) as c:
        try:
            if args.status:
                print(json_format.MessageToJson(c.status(timeout=args.timeout), preserving_proto_field_name=True))
                return 0
            admin = None
            if args.plan_drop is not None:
                admin = c.plan_drop(args.plan_drop, timeout=args.timeout)
            elif args.drop is not None:
                admin = c.drop(args.drop, timeout=args.timeout)
            elif args.restore is not None:
                admin = c.restore(args.restore, timeout=args.timeout)
            if admin is not None:
                print(json_format.MessageToJson(admin, preserving_proto_field_name=True))
                return 0
            kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      seed=args.seed, stop=args.stop, timeout=args.timeout)
            if args.chat:
                msgs = ([{"role": "system", "content": args.system}] if args.system else [])
                msgs.append({"role": "user", "content": args.prompt or ""})
                kw["messages"] = msgs
                prompt = None
            elif args.token_ids:
                kw["prompt_token_ids"] = [int(t) for t in args.token_ids.split(",")]
                prompt = None
            else:
                prompt = args.prompt
            if args.stream:
                last = None
                for chunk in c.generate(prompt, **kw):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    last = chunk
                sys.stdout.write("\n")
                if last is not None:
                    print(json.dumps({"finish_reason": FINISH_NAMES[last.finish_reason],
                                      "usage": json_format.MessageToDict(last.usage, preserving_proto_field_name=True)}),
                          file=sys.stderr)
            else:
                r = c.complete(prompt, **kw)
                print(r.text)
                print(json.dumps({"finish_reason": FINISH_NAMES[r.finish_reason], "token_ids": list(r.token_ids),
                                  "usage": json_format.MessageToDict(r.usage, preserving_proto_field_name=True)}),
                      file=sys.stderr)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
