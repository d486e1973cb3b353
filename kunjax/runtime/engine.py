"""One serving instance: a step unit holding a full replica of the model on one mesh.

Host half (kunjax.control.unit.UnitCore): scheduler, page allocator, requests, detokenizers. Device
half (kunjax.runtime.runner.Stage): the instance's own copy of the weights, its KV pools, and the
compiled executables of its mesh. `LLMEngine` is also the offline engine (`generate`).

Memory sizing is one documented formula, from what XLA measures:

    KV pages = (budget - live bytes on the device - activation reserve) / bytes per page

- budget: `hbm_bytes` per device, else `hbm_fraction` x the allocator's bytes_limit (GPU), else on CPU
  a share of host RAM (kunjax.memory.measure.cpu_default_budget);
- live bytes: every live array on the device after the weights are placed (jax.live_arrays());
- activation reserve: the largest transient need of the compiled step pieces that cover every step,
  read from XLA's memory_analysis() (scratch + non-aliased outputs + per-step inputs).
The split is logged at start-up and kept in `memory_split`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kunjax.control.batch import Buckets, ScheduledStep, StepShape, build_batch, pow2_bucket
from kunjax.control.cluster import run_to_completion
from kunjax.control.ops import STEP, DeviceOp
from kunjax.control.overload import OverloadPolicy, unit_policy
from kunjax.control.pages import PageAllocator, pages_for
from kunjax.control.request import Request, RequestOutput, SamplingParams, validate_prompt
from kunjax.control.scheduler import Scheduler, SchedulerConfig
from kunjax.control.unit import UnitCore
from kunjax.io.loader import LoadedModel
from kunjax.memory import measure as memory
from kunjax.model.config import ModelConfig
from kunjax.model.transformer import head_params
from kunjax.runtime.executables import StepExecutables, executables_for, keys_for
from kunjax.runtime.kv_pools import allocate_pools, page_bytes
from kunjax.runtime.runner import InFlight, Stage, pick_shape, route_ready, run_route
from kunjax.text.chat import encode_chat, encode_prompt
from kunjax.text.tokenizer import IncrementalDetokenizer
from sharding.rules import TP, param_shardings, validate_tp
from sharding.transfer import put_tree

log = logging.getLogger(__name__)


# Offline runs compile a needed step shape instead of running it padded when the compiled shape it
# would run at computes at least twice its tokens (rows x query) and it is needed the
# OFFLINE_COMPILE[1][prefill]-th time, or (prefill) OFFLINE_COMPILE[0] times its tokens: a prefill step
# is dear and few, a decode step recurs every iteration and costs little each (a compile pays for
# itself over tens of them). Padded context pages are not counted: paged attention stops after the
# longest row's context, whatever the page bucket.
OFFLINE_COMPILE = (4, {True: 2, False: 32})


# Packed prefill for offline runs (SchedulerConfig.prefill_segment): rows of this many tokens, the
# smallest query bucket (Buckets.min_chunk), so a prompt pads at most 31 tokens.
OFFLINE_SEGMENT = 32

# The smallest KV pool an offline run sizes for itself (offline_kv_pages), in pages.
OFFLINE_MIN_POOL = 16


def offline_scheduler_config(sc: SchedulerConfig) -> SchedulerConfig:
    """A scheduler config for throughput (generate, the batch tool): packed prefill, every prompt
    prefilled before decoding; the rest as given."""
    # a row never longer than the step's token budget: a segment above it would never fit a step
    seg = min(sc.prefill_segment or OFFLINE_SEGMENT, sc.max_num_batched_tokens)
    return dataclasses.replace(sc, prefill_segment=seg, prefill_first=True)


def offline_kv_pages(lengths: Sequence[int], max_running: int, page_size: int) -> int:
    """KV pages (with the null page) that hold the `max_running` longest of these sequences (prompt +
    max tokens) at once, so none is ever preempted, rounded up to a power of two (at least
    OFFLINE_MIN_POOL): the pool size is part of every layer executable's key, so an exact count would
    make each new input file a cold start; with the rounding, workloads within 2x of each other share
    their executables (and the store's), for at most twice the pages' zero-fill."""
    need = sorted((pages_for(n, page_size) for n in lengths), reverse=True)[:max_running]
    return pow2_bucket(1 + max(1, sum(need)), OFFLINE_MIN_POOL, 1 << 62)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: Optional[int] = None  # explicit pool size (pages incl. the null page); else from memory
    # At most this many pages when sized from memory (incl. the null page): what an offline batch
    # can hold at once (offline_kv_pages). Every page is written when the pools are made, and on a
    # machine where fresh memory is dear that is seconds for pages no request will use.
    max_pages: Optional[int] = None
    hbm_bytes: Optional[int] = None  # per-device memory budget (CPU default: memory.cpu_default_budget)
    hbm_fraction: float = 0.85  # of bytes_limit, when the device reports one
    max_model_len: Optional[int] = None  # default: min(model context, 4096)
    scheduler: SchedulerConfig = SchedulerConfig()
    warmup: bool = False  # compile every bucket shape at start (else the shapes that cover every step)
    # Also compile the smallest decode shape and the one-row prefill shapes before serving (a server
    # answering its first short requests while the other shapes compile in the background).
    compile_small_first: bool = False
    # Compile a step's exact shape when it keeps being needed (OFFLINE_COMPILE), instead of running
    # it padded to a larger compiled one for ever: for offline batch runs, where a short compile (or
    # a load from the executable store) beats many oversized steps. A server leaves this off
    # (nothing compiles on its request path); `generate` always does it (nothing else runs on the
    # engine meanwhile).
    compile_on_demand: bool = False
    overload_policy: str = "recompute"  # the per-unit policy (kunjax.control.overload.unit_policy)
    swap_space_bytes: int = 1 << 30  # host memory bound of the swap policy, per instance


@dataclasses.dataclass(frozen=True)
class MemorySplit:
    """Per-device bytes at start-up: what the KV page count was derived from."""

    budget: int
    weights: int  # this instance's parameter shards on the device (measured from its arrays)
    other: int  # other live arrays on the device before the pools were allocated
    reserve: int  # activation reserve from XLA's memory analysis
    kv: int  # the pools allocated
    page_bytes: int  # one page over all layers, per device

    @property
    def free(self) -> int:
        return self.budget - self.weights - self.other - self.reserve - self.kv


def single_device_mesh(device: jax.Device) -> Mesh:
    return Mesh(np.array([device]), (TP,))


def place_params(params, mesh: Mesh, cfg: ModelConfig):
    """This instance's own copy of the weights on its mesh, each placed by its module's logical axes
    and the sharding rules. Never aliases the caller's arrays: the instance deletes layers it drops,
    and the loaded model's copy (if it is on a device) must stay intact."""
    shardings = param_shardings(cfg, mesh)
    if all(isinstance(a, np.ndarray) for a in jax.tree.leaves(params)):
        return put_tree(params, shardings)  # host weights: each process places its own shards
    return jax.device_put(params, shardings, may_alias=False)


def shard_bytes(arrays, device: jax.Device) -> int:
    """Bytes of the shards of `arrays` that live on `device` (read from their shardings)."""
    total = 0
    for a in jax.tree.leaves(arrays):
        if device in a.sharding.device_set:
            total += int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
    return total


class LLMEngine(UnitCore):
    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig(),
                 device: Optional[jax.Device] = None, mesh: Optional[Mesh] = None,
                 executables: Optional[StepExecutables] = None, reserve_bytes: Optional[int] = None,
                 policy: Optional[OverloadPolicy] = None):
        """`mesh`: a 1-D ("tp",) mesh to shard this instance over (tensor parallel, sharding.rules).
        None: one device (`device`, else where the model's weights are, else the first device).
        `reserve_bytes`: a measured activation reserve to reuse (instances of one cluster share it)."""
        self.model = model
        self.cfg = model.config
        self.config = config
        self.tokenizer = model.tokenizer
        if mesh is None:
            first = jax.tree.leaves(model.params)[0]
            dev = device or (next(iter(first.devices())) if isinstance(first, jax.Array) else jax.devices()[0])
            mesh = single_device_mesh(dev)
        self.mesh = mesh
        self.tp = mesh.size
        validate_tp(self.cfg, self.tp)
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        self.device = local[0]  # a device this process can measure (multi-process meshes span hosts)
        leaves = jax.tree.leaves(model.params)
        self.dtype = jnp.dtype(leaves[0].dtype)
        self.max_model_len = min(config.max_model_len or 4096, self.cfg.max_position_embeddings)
        self.page_size = config.page_size
        sc = config.scheduler
        self.buckets = self.buckets_for(sc)
        self.exes = executables or executables_for(self.cfg, mesh, self.dtype, self.page_size)
        params = place_params(model.params, mesh, self.cfg)
        self.memory_split: Optional[MemorySplit] = None
        self.reserve_bytes = reserve_bytes
        self.budget = memory.device_budget(self.device, config.hbm_bytes, config.hbm_fraction,
                                           cpu_share=len(mesh.local_devices))
        num_pages = config.num_pages or self._pages_from_memory(params)
        pools = allocate_pools(self.exes, num_pages, range(self.cfg.num_layers))
        self.stage = Stage(self.exes, dict(enumerate(params["layers"])), pools, num_pages,
                           embed=params["embed"], head=head_params(params))
        self.num_pages = num_pages
        eos = tuple(self.cfg.eos_token_ids) or tuple(getattr(self.tokenizer, "eos_token_ids", ()))
        policy = policy or unit_policy(config.overload_policy)
        super().__init__(Scheduler(sc, PageAllocator(num_pages), self.page_size, self.max_model_len, policy), eos)
        self.swap = self._swap_space() if policy.name == "swap" else None
        self._ids = itertools.count()
        # While a drop forms this instance's group, each layer of a step runs where its KV is
        # (kunjax.memory.drop sets it; None: everything on this instance's own stage).
        self.route = None
        self.page_layer_bytes = page_bytes(self.cfg, self.page_size, self.dtype, 1) // self.tp
        self.last_logits: Optional[jax.Array] = None
        # Keep the last step's logits on device, one row per request that sampled, in row order (tests
        # compare them; a packed prefill step holds a prompt in several rows, only its last samples).
        self.keep_logits = False
        self._offline = False  # inside generate(): compile the shapes steps keep needing
        self._padded: dict[StepShape, int] = {}  # offline: steps that needed a shape not compiled
        t = time.perf_counter()
        n = self.compile(self.buckets.all_shapes() if config.warmup else self.first_shapes())
        if n:
            log.info("compiled %d executables in %.1fs on %s", n, time.perf_counter() - t, self.device)

    def buckets_for(self, sc: SchedulerConfig) -> Buckets:
        """The step shapes a scheduler config produces: one row per prompt (max_prefill_rows x the
        budget), or with packed prefill (budget / prefill_segment) rows of prefill_segment tokens."""
        seg = sc.prefill_segment
        return Buckets(max_rows=sc.max_num_seqs,
                       max_prefill_rows=max(1, sc.max_num_batched_tokens // seg) if seg else sc.max_prefill_rows,
                       max_chunk=seg or sc.max_num_batched_tokens,
                       max_pages_per_seq=pages_for(self.max_model_len, self.page_size), page_size=self.page_size)

    def _swap_space(self):
        from kunjax.runtime import swap

        per_page = swap.host_page_bytes(page_bytes(self.cfg, self.page_size, self.dtype), self.tp,
                                        len(self.mesh.local_devices))
        self.scheduler.swap_capacity_pages = swap.capacity_pages(self.config.swap_space_bytes, per_page)
        return swap.SwapSpace(self.stage, self.scheduler.events, self.device)

    def first_shapes(self) -> list:
        """The shapes this instance needs before it serves (a pipeline group it joins needs the same
        ones at its page count): those covering every step, plus the small ones when the config asks."""
        return self.buckets.first_shapes() if self.config.compile_small_first else self.buckets.covering_shapes()

    # ---- sizing ----------------------------------------------------------------------------
    def measure_reserve(self, pool_pages: int) -> int:
        """The activation reserve: the largest transient need of the executables that cover every
        step, from XLA's memory analysis. The transient need does not depend on the pool size, so
        sizing the pools measures executables compiled for a 2-page pool; afterwards the instance's
        own (already compiled) executables are measured."""
        need = 0
        for shape in self.buckets.covering_shapes():
            keys = keys_for(shape, pool_pages)
            self.exes.compile(keys)
            need = max(need, max(self.exes.transient_bytes(k) for k in keys))
        return need

    def reserve(self) -> int:
        """The activation reserve (measured on first use when the pool size was given)."""
        if self.reserve_bytes is None:
            self.reserve_bytes = self.measure_reserve(self.stage.num_pages)
        return self.reserve_bytes

    def _pages_from_memory(self, params) -> int:
        budget = self.budget
        if budget is None:
            raise ValueError("cannot size the KV cache: this device reports no memory limit; "
                             "pass num_pages or hbm_bytes (--hbm_bytes on the command line)")
        weights = shard_bytes(params, self.device)
        live = memory.device_live_bytes(self.device)
        if self.reserve_bytes is None:
            self.reserve_bytes = self.measure_reserve(2)
        reserve = self.reserve_bytes
        per_page = page_bytes(self.cfg, self.page_size, self.dtype) // self.tp  # kv heads split over tp
        pages = (budget - live - reserve) // per_page
        # More pages than max_num_seqs full-length sequences can never be used at once.
        useful = self.config.scheduler.max_num_seqs * pages_for(self.max_model_len, self.page_size) + 1
        useful = min(useful, self.config.max_pages or useful)
        pages = int(min(pages, useful))
        if pages < 2:
            raise ValueError(f"memory budget {budget / 2**20:.0f} MiB per device leaves no room for KV pages: "
                             f"weights take {weights / 2**20:.0f} MiB, other arrays {(live - weights) / 2**20:.0f} "
                             f"MiB and the activation reserve (XLA's measure of the largest step) "
                             f"{reserve / 2**20:.0f} MiB; raise --hbm_bytes or lower --max_num_seqs / "
                             f"--max_num_batched_tokens / --max_model_len")
        self.memory_split = MemorySplit(budget, weights, live - weights, reserve, pages * per_page, per_page)
        s = self.memory_split
        log.info("memory per device on %s: budget %.0f MiB = weights %.0f + other %.0f + activation reserve %.0f "
                 "+ KV %.0f (%d pages x %d tokens) + free %.0f", self.device, s.budget / 2**20, s.weights / 2**20,
                 s.other / 2**20, s.reserve / 2**20, s.kv / 2**20, pages, self.page_size, s.free / 2**20)
        return pages

    # ---- compilation -----------------------------------------------------------------------
    def shape_keys(self, shapes: Sequence[StepShape]):
        return [k for s in shapes for k in self.stage.keys(s)]

    def compile(self, shapes: Sequence[StepShape]) -> int:
        """Compiles what these step shapes need on this instance's mesh (blocking)."""
        return self.exes.compile(self.shape_keys(shapes))

    def warmup(self) -> int:
        """Compiles every bucket shape now; returns the compilations done."""
        n = self.compile(self.buckets.all_shapes())
        log.info("warm-up compiled %d executables", n)
        return n

    def _worth_compiling(self, needed: StepShape, padded: Optional[StepShape]) -> bool:
        """Offline policy (OFFLINE_COMPILE): compile `needed` now when no compiled shape covers it,
        when the padded shape computes several times its tokens, or when it keeps coming back at
        twice its tokens (a one-off tail shape does not pay for its compile)."""
        self._padded[needed] = self._padded.get(needed, 0) + 1
        if padded is None:
            return True
        at_once, again = OFFLINE_COMPILE
        ratio = (padded.rows * padded.query) / (needed.rows * needed.query)
        return (needed.prefill and ratio >= at_once) or (ratio >= 2 and self._padded[needed] >= again[needed.prefill])

    # ---- requests --------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def encode_chat(self, messages) -> list[int]:
        """Renders chat messages with the model's template (kunjax.text.chat) and tokenizes them."""
        return encode_chat(self.tokenizer, self.model.chat_template, messages)

    def detokenizer(self, prompt_token_ids: Sequence[int]) -> Optional[IncrementalDetokenizer]:
        return IncrementalDetokenizer(self.tokenizer, list(prompt_token_ids)) if self.tokenizer is not None else None

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError naming the field for anything this engine can never serve."""
        validate_prompt(prompt_token_ids, self.cfg.vocab_size)
        params.validate()
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; the context is {self.max_model_len}")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens {params.max_tokens} + prompt {len(prompt_token_ids)} tokens exceeds "
                             f"the context of {self.max_model_len} tokens")
        if pages_for(len(prompt_token_ids) + params.max_tokens, self.page_size) > self.num_pages - 1:
            raise ValueError(f"prompt + max_tokens needs more KV pages than this instance has "
                             f"({self.num_pages - 1} pages of {self.page_size} tokens)")
        for t in params.stop_token_ids:
            if not 0 <= t < self.cfg.vocab_size:
                raise ValueError(f"stop_token_ids: {t} outside the vocabulary")

    def add_request(self, prompt: Union[str, Sequence[int]], params: SamplingParams = SamplingParams(),
                    request_id: Optional[str] = None) -> Request:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.validate(ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        req = Request(request_id, ids, params)
        self.add(req, self.detokenizer(ids))
        return req

    # ---- the step-unit interface -----------------------------------------------------------
    def prepare(self, step: ScheduledStep) -> DeviceOp:
        """The step as data: the cheapest compiled shape that covers it, and its padded batch."""
        needed = self.buckets.needed(step.rows, step.prefill)
        shape = pick_shape(needed, self.buckets, self.shape_ready)
        offline = self.config.compile_on_demand or self._offline
        if shape != needed and offline and self._worth_compiling(needed, shape):
            self.compile([needed])
            shape = needed
        if shape is None:
            raise RuntimeError(f"no compiled step shape covers {needed}; the covering shapes are compiled at "
                               f"start-up, so this is a bug")
        args = {"shape": [shape.rows, shape.query, shape.pages], "num_rows": len(step.rows)}
        moves = self.scheduler.take_moves()
        if moves:  # swaps the scheduler decided: carried out before the step, on every process
            args["moves"] = moves
        return DeviceOp(STEP, 0, args, build_batch(step.rows, shape, self.page_size))

    def set_route(self, segments, embed_stage=None, head_stage=None) -> None:
        """Layer by layer where this instance's steps run (a drop under way), and the stages that
        embed and sample; None: everything here."""
        self.route = None if segments is None else (segments, embed_stage or self.stage, head_stage or self.stage)

    def shape_ready(self, shape: StepShape) -> bool:
        if self.route is None:
            return self.stage.ready(shape)
        return route_ready(*self.route, shape)

    def execute(self, op: DeviceOp) -> InFlight:
        shape = StepShape(*op.args["shape"])
        if self.route is not None:
            return run_route(*self.route, op.arrays, shape, op.args["num_rows"], self.page_size)
        if not self.stage.ready(shape):  # a follower process that has not compiled it yet
            self.exes.compile(self.stage.keys(shape))
        if op.args.get("moves"):
            self.swap.apply(op.args["moves"])
        return self.stage.run(op.arrays, shape, op.args["num_rows"])

    @staticmethod
    def wait(handle: InFlight) -> None:
        handle.wait()

    def finish(self, step: ScheduledStep, handle: InFlight) -> list[RequestOutput]:
        if self.keep_logits and handle.logits is not None:
            self.last_logits = handle.logits[np.array([i for i, r in enumerate(step.rows) if r.samples])]
        t = time.perf_counter()
        tokens = handle.result()
        self.last_wait_s = time.perf_counter() - t
        return self.apply(step, tokens, handle.host_logprobs())

    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: one step, one host sync. Returns outputs of requests that got
        tokens or finished."""
        step = self.schedule()
        if step is None:
            return []
        return self.finish(step, self.execute(self.prepare(step)))

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]],
                 params: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams()) -> list[RequestOutput]:
        """Runs prompts to completion (offline use); outputs in input order. Nothing else runs on the
        engine meanwhile, so a step whose shape is not compiled compiles it at once (from the
        executable store when it holds it) rather than running padded to a larger compiled shape:
        a 4 x 128-token prefill padded to 4 x 512 costs 4x its compute at every such step."""
        serving, buckets = self.scheduler.config, self.buckets
        offline = offline_scheduler_config(serving)
        self._offline = True
        self.scheduler.reconfigure(offline)
        self.buckets = self.buckets_for(offline)
        try:
            return run_to_completion(lambda p, sp: self.add_request(p, sp).request_id, self.step,
                                     self.has_unfinished, prompts, params)
        finally:
            self._offline = False
            self.scheduler.reconfigure(serving)
            self.buckets = buckets

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        out = super().abort(request_id)
        if self.swap is not None:  # a host copy of a cancelled request is freed now (again, idempotently,
            for m in self.scheduler.moves:  # when the next step's moves replay on every process)
                if m["kind"] == "discard":
                    self.swap.discard(m["request_id"])
        return out

    def host_status(self) -> dict:
        return {**super().host_status(), **(self.swap.status() if self.swap is not None else {})}

    # ---- status ----------------------------------------------------------------------------
    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

    def status(self) -> dict:
        """Host-side state of this instance (no device reads; memory is the cluster's snapshot)."""
        return {"devices": [str(d) for d in self.devices], "tp": self.tp, **self.host_status()}
