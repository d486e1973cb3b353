"""Chat templates: a model's Jinja2 template turned into a prompt string, like HF's apply_chat_template.

Templates are rendered in a sandboxed, immutable Jinja2 environment with the same settings and
helpers Hugging Face gives them (`trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension,
`raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that keeps non-ASCII text and
accepts `indent` / `separators` / `sort_keys`, and a no-op `{% generation %}` block), so a
template that works with transformers renders the same string here.

Messages are validated first: a list of dicts, each with a `role` in {system, user, assistant,
tool} and a string `content` (other keys such as `name` or `tool_call_id` are passed through to
the template). Anything else raises ValueError naming the message and the problem.

A model without a chat template takes no `messages` (the engine refuses them): any format made up
here would be one the model was never trained on.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Sequence

ROLES = ("system", "user", "assistant", "tool")


class TemplateError(ValueError):
    """Raised by a template's `raise_exception(...)` or when a template fails to compile or render."""


def validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        if "content" not in m:
            raise ValueError(f"messages[{i}].content is missing")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append(dict(m))
    return out


def _raise_exception(message: str):
    raise TemplateError(f"chat template error: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask marker in some templates): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().from_string(template)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: {e}") from e


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:
    """Renders `messages` with the model's chat template. Extra keyword arguments (e.g. `tools`) go
    to the template."""
    msgs = validate_messages(messages)
    from jinja2.exceptions import TemplateError as JinjaError

    try:
        return _compile(template).render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **kwargs)
    except TemplateError:
        raise
    except JinjaError as e:
        raise TemplateError(f"chat template failed to render: {e}") from e


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A plain text prompt's token ids (the model's tokenizer; None: the model has none)."""
    if tokenizer is None:
        raise ValueError("prompt: this model has no tokenizer (no tokenizer.json); send prompt_token_ids")
    return tokenizer.encode(prompt)


def encode_chat(tokenizer, template: str | None, messages) -> list[int]:
    """Renders chat messages with the model's template and tokenizes the result without adding
    special tokens again, as Hugging Face's apply_chat_template does. Needs only the tokenizer and
    template (an offline tool tokenizes its rows before it sizes an engine)."""
    validate_messages(messages)  # a malformed conversation is named as such on any model
    if tokenizer is None:
        raise ValueError("messages: this model has no tokenizer")
    if not template:
        raise ValueError("messages: this model has no chat template; send prompt or prompt_token_ids")
    text = render_chat(template, messages, add_generation_prompt=True,
                       bos_token=_token_str(tokenizer, tokenizer.bos_token_id),
                       eos_token=_token_str(tokenizer, (tokenizer.eos_token_ids or (None,))[0]))
    return tokenizer.encode(text, add_special_tokens=False)


def _token_str(tokenizer, token_id) -> str:
    backend = getattr(tokenizer, "backend", None)
    if token_id is None or backend is None:
        return ""
    return backend.id_to_token(token_id) or ""
