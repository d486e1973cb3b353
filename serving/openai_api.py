"""The OpenAI API's wire format: request bodies -> GenerateInput, outputs -> response objects.

No transport here (serving.http serves it): this module checks every field it reads (a wrong type
or value is a ServingError naming the field, an HTTP 400), refuses what kunjax does not do (n > 1,
best_of, echo, suffix, logit_bias, tools) with a clear 400 instead of ignoring it, and builds the
`text_completion` / `chat.completion` objects and their streaming chunks as the API defines them.
Fields beyond OpenAI's, as vLLM takes them: top_k, min_p, repetition_penalty, stop_token_ids,
ignore_eos.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

from serving.core import GenerateInput, Usage
from serving.errors import ServingError

MAX_TOP_LOGPROBS = 5


def bad(param: str, message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", f"{param}: {message}", param)


class Body:
    """A request's JSON object with typed reads: each names the field it refuses."""

    def __init__(self, data: Any):
        if not isinstance(data, dict):
            raise ServingError("INVALID_ARGUMENT", "the request body must be a JSON object")
        self.data = data

    def get(self, name: str, kind: str, default=None):
        v = self.data.get(name)
        if v is None:
            return default
        ok = {"int": isinstance(v, int) and not isinstance(v, bool),
              "number": isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": isinstance(v, bool), "str": isinstance(v, str), "list": isinstance(v, list),
              "object": isinstance(v, dict)}[kind]
        if not ok:
            raise bad(name, f"expected {_KIND_NAMES[kind]}, got {type(v).__name__}")
        if kind == "number":
            v = float(v)
            if not math.isfinite(v):
                raise bad(name, "must be a finite number")
        return v

    def refuse_unless(self, name: str, allowed) -> None:
        """`name` may only be absent or one of `allowed` (features kunjax does not have)."""
        v = self.data.get(name)
        if v is not None and v not in allowed:
            raise bad(name, f"{v!r} is not supported by this server (supported: {', '.join(map(repr, allowed))})")


_KIND_NAMES = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
               "list": "an array", "object": "an object"}


def check_model(body: Body, served: str) -> None:
    model = body.get("model", "str")
    if model is not None and model != served:
        raise ServingError("NOT_FOUND", f"The model `{model}` does not exist (this server serves `{served}`)",
                           "model")


def _stop(body: Body) -> tuple[str, ...]:
    v = body.data.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise bad("stop", "expected a string or an array of strings")


def _int_list(body: Body, name: str) -> list[int]:
    v = body.get(name, "list", [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad(name, "expected an array of integers")
    return v


def _common(body: Body, max_tokens: Optional[int]) -> dict:
    """The sampling fields completions and chat share."""
    body.refuse_unless("n", (1,))
    if body.data.get("logit_bias"):
        raise bad("logit_bias", "is not supported by this server")
    return dict(max_tokens=max_tokens, temperature=body.get("temperature", "number"),
                top_p=body.get("top_p", "number"), top_k=body.get("top_k", "int"), min_p=body.get("min_p", "number"),
                seed=body.get("seed", "int"), stop=_stop(body), stop_token_ids=tuple(_int_list(body, "stop_token_ids")),
                ignore_eos=body.get("ignore_eos", "bool", False),
                frequency_penalty=body.get("frequency_penalty", "number"),
                presence_penalty=body.get("presence_penalty", "number"),
                repetition_penalty=body.get("repetition_penalty", "number"))


def _top_logprobs(name: str, v: Optional[int]) -> Optional[int]:
    if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
        raise bad(name, f"must be in 0..{MAX_TOP_LOGPROBS}, got {v}")
    return v


def stream_options(body: Body) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", "bool", False)
    opts = body.get("stream_options", "object")
    if opts is not None and not stream:
        raise bad("stream_options", "only goes with stream: true")
    include = Body(opts).get("include_usage", "bool", False) if opts else False
    return stream, include


def completion_input(body: Body) -> GenerateInput:
    """POST /v1/completions: prompt as text or token ids (one prompt)."""
    for name in ("echo",):
        body.refuse_unless(name, (False,))
    body.refuse_unless("best_of", (1,))
    if body.data.get("suffix"):
        raise bad("suffix", "is not supported by this server")
    p = body.data.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    kw: dict = {}
    if isinstance(p, str):
        kw["prompt"] = p
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        kw["prompt_token_ids"] = p
    elif isinstance(p, list) and p and all(isinstance(t, (str, list)) for t in p):
        raise bad("prompt", f"a batch of {len(p)} prompts is not supported; send one prompt per request")
    elif p is None:
        raise bad("prompt", "is required")
    else:
        raise bad("prompt", "expected a string or an array of token ids")
    lp = _top_logprobs("logprobs", body.get("logprobs", "int"))
    return GenerateInput(**kw, **_common(body, body.get("max_tokens", "int")), logprobs=lp)


def chat_input(body: Body) -> GenerateInput:
    """POST /v1/chat/completions: messages through the model's chat template."""
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.data.get(name):
            raise bad(name, "is not supported by this server")
    fmt = body.get("response_format", "object")
    if fmt is not None and fmt.get("type", "text") != "text":
        raise bad("response_format", f"type {fmt.get('type')!r} is not supported (only 'text')")
    msgs = body.get("messages", "list")
    if not msgs:
        raise bad("messages", "is required and must not be empty")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad("messages", f"[{i}] must be an object with a string 'role'")
        messages.append({"role": m["role"], "content": _content(m.get("content"), i)})
    want_lp = body.get("logprobs", "bool", False)
    top = _top_logprobs("top_logprobs", body.get("top_logprobs", "int"))
    if top is not None and not want_lp:
        raise bad("top_logprobs", "needs logprobs: true")
    max_tokens = body.get("max_completion_tokens", "int")
    if max_tokens is None:
        max_tokens = body.get("max_tokens", "int")
    return GenerateInput(messages=messages, **_common(body, max_tokens), logprobs=(top or 0) if want_lp else None)


def _content(c, i: int) -> str:
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad("messages", f"[{i}].content: only text parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise bad("messages", f"[{i}].content: expected a string or an array of text parts")


# ---- responses --------------------------------------------------------------------------------
# finish_reason: the engine's "length" and "stop" are the API's; "abort" (the server shut down or
# cancelled the request) and "error" pass through as vLLM does.


def usage_dict(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


class Shaper:
    """Builds the response objects of one request (completion or chat, whole or chunked)."""

    def __init__(self, chat: bool, request_id: str, model: str, token_text, logprobs: Optional[int]):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.token_text = token_text
        self.logprobs = logprobs
        self._offset = 0  # text offset of the next token (completions' logprobs.text_offset)

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprob_part(self, lps: Sequence) -> Optional[dict]:
        """The logprobs of some generated tokens in the API's shape (None when not asked for)."""
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_lp(lp) for lp in lps], "refusal": None}
        tokens = [self.token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in lps],
                "text_offset": offsets}

    def _chat_lp(self, lp) -> dict:
        def entry(token_id, value):
            text = self.token_text(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
        return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    def choice(self, text: str, lps: Sequence, finish: Optional[str], delta: bool, first: bool = False) -> dict:
        c: dict = {"index": 0}
        if self.chat:
            if delta:
                c["delta"] = ({"role": "assistant", "content": text} if first else
                              {"content": text} if text or finish is None else {})
            else:
                c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        c["logprobs"] = self.logprob_part(lps)
        c["finish_reason"] = finish or None
        return c

    def whole(self, text: str, lps: Sequence, finish: str, usage: Usage, token_ids: Optional[list] = None) -> dict:
        c = self.choice(text, lps, finish, delta=False)
        if token_ids is not None:  # vLLM's return_token_ids
            c["token_ids"] = token_ids
        return {**self._base("chat.completion" if self.chat else "text_completion"), "choices": [c],
                "usage": usage_dict(usage)}

    def chunk(self, choices: list, usage: Any = ...) -> dict:
        d = {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices}
        if usage is not ...:
            d["usage"] = usage
        return d
