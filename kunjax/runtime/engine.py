"""One serving instance: scheduler + runner + detokenizer behind add_request / step / generate.

Memory sizing is one documented formula: KV pages = (budget - measured parameter bytes - activation
reserve) / bytes per page, where budget is `hbm_bytes` (CPU; or an explicit GPU cap) or
`hbm_fraction` x the device allocator's bytes_limit (GPU). Parameter bytes are read from the live
arrays on the device after loading, not computed from the config.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from kunjax.memory import measure as memory
from kunjax.runtime.kv_pools import PageAllocator, allocate_pools, page_bytes, pages_for
from kunjax.io.loader import LoadedModel
from kunjax.control.request import FinishReason, Request, RequestOutput, SamplingParams, Status, validate_prompt
from kunjax.runtime.runner import Buckets, ModelRunner
from kunjax.control.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from kunjax.text.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: Optional[int] = None  # explicit pool size (pages incl. the null page); else from memory
    hbm_bytes: Optional[int] = None  # per-device memory budget (CPU default: memory.cpu_default_budget)
    hbm_fraction: float = 0.85  # of bytes_limit, when the device reports one
    max_model_len: Optional[int] = None  # default: min(model context, 4096)
    scheduler: SchedulerConfig = SchedulerConfig()
    warmup: bool = False  # compile every bucket shape at start


def activation_reserve(cfg, ec: EngineConfig, max_model_len: int, itemsize: int) -> int:
    """Upper estimate of the transient memory of the largest step (activations, scores, logits)."""
    sc = ec.scheduler
    tokens = max(sc.max_num_seqs, sc.max_prefill_rows * sc.max_num_batched_tokens)
    ctx = max_model_len
    act = tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4
    scores = tokens * cfg.num_heads * ctx * 4 * 2
    gathered = max(sc.max_num_seqs, sc.max_prefill_rows) * ctx * cfg.kv_size * itemsize * 2
    logits = max(sc.max_num_seqs, sc.max_prefill_rows) * cfg.vocab_size * 4 * 4
    return int(1.5 * (act + scores + gathered + logits))


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


class LLMEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig(),
                 device: Optional[jax.Device] = None, mesh: Optional[jax.sharding.Mesh] = None):
        """`mesh`: a 1-D ("tp",) mesh to shard this instance over (tensor parallel, sharding.rules);
        the params are placed on it if they are not already. None: one device, as loaded."""
        self.model = model
        self.cfg = model.config
        self.config = config
        self.tokenizer = model.tokenizer
        self.mesh = mesh
        self.tp = 1
        step = None
        params = model.params
        if mesh is not None:
            from sharding import rules, step as sharded_step

            self.tp = mesh.size
            params = rules.shard_params(params, mesh, self.cfg)  # the model object stays untouched
            step = sharded_step.make_step_fn(mesh, params, self.cfg)
        leaves = jax.tree.leaves(params)
        if mesh is not None:  # a device this process can measure (multi-process meshes span hosts)
            local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
            self.device = device or local[0]
        else:
            self.device = device or next(iter(leaves[0].devices()))
        self.dtype = leaves[0].dtype
        self.max_model_len = min(config.max_model_len or 4096, self.cfg.max_position_embeddings)
        self.page_size = config.page_size
        self.num_pages = config.num_pages or self._pages_from_memory()
        max_pages_per_seq = pages_for(self.max_model_len, self.page_size)
        sc = config.scheduler
        self.buckets = Buckets(max_rows=sc.max_num_seqs, max_prefill_rows=sc.max_prefill_rows,
                               max_chunk=sc.max_num_batched_tokens, max_pages_per_seq=max_pages_per_seq,
                               page_size=self.page_size)
        if mesh is not None:
            from sharding.rules import kv_sharding

            kv_place = kv_sharding(mesh)  # split on kv heads
        else:
            kv_place = jax.sharding.SingleDeviceSharding(self.device)
        kv = allocate_pools(self.cfg, self.num_pages, self.page_size, self.dtype, range(self.cfg.num_layers),
                            sharding=kv_place)
        self.runner = ModelRunner(self.cfg, params, kv, self.page_size, self.buckets, step=step)
        self.allocator = PageAllocator(self.num_pages)
        self.scheduler = Scheduler(sc, self.allocator, self.page_size, self.max_model_len)
        self.eos_ids = tuple(self.cfg.eos_token_ids) or tuple(getattr(self.tokenizer, "eos_token_ids", ()))
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        if config.warmup:
            self.warmup()

    # ---- sizing ----------------------------------------------------------------------------
    def _pages_from_memory(self) -> int:
        budget = memory.device_budget(self.device, self.config.hbm_bytes, self.config.hbm_fraction)
        if budget is None:
            raise ValueError("cannot size the KV cache: this device reports no memory limit; "
                             "pass num_pages or hbm_bytes (--hbm_bytes on the command line)")
        used = memory.device_live_bytes(self.device)  # parameters, measured
        reserve = activation_reserve(self.cfg, self.config, self.max_model_len, jnp.dtype(self.dtype).itemsize)
        per_page = page_bytes(self.cfg, self.page_size, self.dtype) // self.tp  # kv heads split over tp
        pages = (budget - used - reserve) // per_page
        # More pages than max_num_seqs full-length sequences can never be used at once.
        useful = self.config.scheduler.max_num_seqs * pages_for(self.max_model_len, self.page_size) + 1
        pages = min(pages, useful)
        if pages < 2:
            raise ValueError(f"memory budget {budget / 2**20:.0f} MiB leaves no room for KV pages: parameters "
                             f"take {used / 2**20:.0f} MiB and the activation reserve {reserve / 2**20:.0f} MiB")
        log.info("KV cache: %d pages x %d tokens (%.1f MiB/page); budget %.0f MiB, params %.0f MiB, reserve %.0f MiB",
                 pages, self.page_size, per_page / 2**20, budget / 2**20, used / 2**20, reserve / 2**20)
        return int(pages)

    def warmup(self) -> int:
        n = self.runner.warmup()
        log.info("warm-up compiled %d executables", n)
        return n

    # ---- requests --------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer (no tokenizer.json); send prompt_token_ids")
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages) -> list[int]:
        """Renders chat messages with the model's template (kunjax.text.chat) and tokenizes the result
        without adding special tokens again, as Hugging Face's apply_chat_template does."""
        from kunjax.text.chat import render_chat, validate_messages

        validate_messages(messages)  # a malformed conversation is named as such on any model
        if self.tokenizer is None:
            raise ValueError("messages: this model has no tokenizer")
        if not self.model.chat_template:
            raise ValueError("messages: this model has no chat template; send prompt or prompt_token_ids")
        text = render_chat(self.model.chat_template, messages, add_generation_prompt=True,
                           bos_token=self._token_str(self.tokenizer.bos_token_id),
                           eos_token=self._token_str((self.tokenizer.eos_token_ids or (None,))[0]))
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _token_str(self, token_id) -> str:
        backend = getattr(self.tokenizer, "backend", None)
        if token_id is None or backend is None:
            return ""
        return backend.id_to_token(token_id) or ""

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError naming the field for anything this engine can never serve."""
        validate_prompt(prompt_token_ids, self.cfg.vocab_size)
        params.validate()
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; the context is {self.max_model_len}")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens {params.max_tokens} + prompt {len(prompt_token_ids)} tokens exceeds "
                             f"the context of {self.max_model_len} tokens")
        if pages_for(len(prompt_token_ids) + params.max_tokens, self.page_size) > self.allocator.num_usable:
            raise ValueError(f"prompt + max_tokens needs more KV pages than this instance has "
                             f"({self.allocator.num_usable} pages of {self.page_size} tokens)")
        for t in params.stop_token_ids:
            if not 0 <= t < self.cfg.vocab_size:
                raise ValueError(f"stop_token_ids: {t} outside the vocabulary")

    def add_request(self, prompt: Union[str, Sequence[int]], params: SamplingParams = SamplingParams(),
                    request_id: Optional[str] = None) -> Request:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.validate(ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, ids, params)
        self.scheduler.add(req)
        self.requests[request_id] = req
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, ids)
        return req

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self.scheduler.abort(req, FinishReason.ABORT)
        return self._output(req, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: one jitted step, one host sync. Returns outputs of requests
        that got tokens or finished."""
        step = self.scheduler.schedule()
        if step is None:
            return []
        return self.apply_step(step, self.runner.step(step.rows, step.prefill))

    def apply_step(self, step: ScheduledStep, tokens: np.ndarray) -> list[RequestOutput]:
        """Applies a step's sampled tokens (host side only)."""
        self.num_steps += 1
        updated = self.scheduler.postprocess(step, tokens, self.eos_ids)
        return [self._output(req, [req.output_token_ids[-1]]) for req in updated]

    def _output(self, req: Request, new_ids: list[int]) -> RequestOutput:
        delta = ""
        detok = self._detok.get(req.request_id)
        if detok is not None:
            visible = [t for t in new_ids if not (req.is_finished and req.finish_reason == FinishReason.STOP
                                                  and t in self.eos_ids + req.params.stop_token_ids)]
            delta = detok.add(visible) if visible else ""
            if req.is_finished:
                delta += detok.flush()
            if req.params.stop and not (req.is_finished and req.finish_reason == FinishReason.STOP):
                delta = self._apply_stop_strings(req, detok, delta)
        out = RequestOutput(
            request_id=req.request_id, new_token_ids=list(new_ids), token_ids=list(req.output_token_ids),
            finished=req.is_finished, finish_reason=req.finish_reason.value if req.finish_reason else None,
            text=detok.text if detok else "", text_delta=delta, prompt_tokens=len(req.prompt_token_ids),
            ttft_s=(req.first_token_time - req.arrival_time) if req.first_token_time else None)
        if req.is_finished:
            self._detok.pop(req.request_id, None)
            self.requests.pop(req.request_id, None)
        return out

    def _apply_stop_strings(self, req: Request, detok: IncrementalDetokenizer, delta: str) -> str:
        """Finishes the request at the first stop string; the stop string itself is not returned."""
        text = detok.text
        start = max(0, len(text) - len(delta) - max(len(s) for s in req.params.stop))
        hits = [i for s in req.params.stop if (i := text.find(s, start)) >= 0]
        if not hits:
            return delta
        cut = min(hits)
        emitted_before = len(text) - len(delta)
        detok.text = text[:cut]
        if not req.is_finished:
            self.scheduler.abort(req, FinishReason.STOP)
        else:
            req.finish_reason = FinishReason.STOP
        return text[emitted_before:cut] if cut > emitted_before else ""

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]],
                 params: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams()) -> list[RequestOutput]:
        """Runs prompts to completion (offline use); outputs in input order."""
        return run_to_completion(lambda p, sp: self.add_request(p, sp).request_id, self.step, self.has_unfinished,
                                 prompts, params)

    # ---- status ----------------------------------------------------------------------------
    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat) if self.mesh is not None else [self.device]

    def status(self) -> dict:
        """Host-side state of this instance (no device reads; memory is the cluster's snapshot)."""
        return {
            "devices": [str(d) for d in self.devices], "tp": self.tp,
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "pages_total": self.allocator.num_usable, "pages_free": self.allocator.num_free,
            "pages_used": self.allocator.num_used, "page_size": self.page_size, "steps": self.num_steps,
            "preemptions": self.scheduler.num_preemptions,
        }
