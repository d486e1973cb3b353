"""Compiled step pieces for one placement (a device mesh): embed, one decoder layer, head + sample.

A step of an instance, or of one pipeline stage, is a short sequence of compiled calls: embed (on
the stage that holds the embedding), one call per held layer, head (on the stage that holds the LM
head). Each piece is a Flax NNX module (kunjax.model.transformer): the executable takes the
module's state as leaves (a flat dict of arrays) and rebuilds the module inside the trace from its
static graph definition, so the compiled code is the plain math over the arrays. The layer
executable takes the layer's weights and KV pools as arguments, so ONE executable
per (shape bucket, pool size) serves every layer and any contiguous layer range: a pipeline stage
made of layers [a, b) runs on the executables its devices already have. Compared with one executable
holding all L layers unrolled per bucket, this compiles ~L times less code per instance (and keeps
the LLVM code mapped in memory ~L times smaller); the price is one executable launch per layer.

Everything is compiled ahead of time (`jit(...).lower(abstract args).compile()`) and called through
the `Compiled` object: a call with a shape or sharding that was not compiled raises instead of
compiling on the request path. `compile()` may run on a background thread while steps run. Where
the executable store is on (kunjax.runtime.exe_store, turned on by the command-line tools),
`compile()` loads a valid serialized executable instead: a warm start traces and compiles nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from kunjax.control.batch import PENALTY_FIELDS, StepShape
from kunjax.model.config import ModelConfig
from kunjax.model.sampling import apply_penalties, sample, token_logprobs
from kunjax.model.transformer import StateSpec, model_spec
from kunjax.runtime import exe_store
from kunjax.runtime.kv_pools import K, V, pool_shape, storage_dtype
from sharding.rules import kv_sharding, replicated, state_shardings

log = logging.getLogger(__name__)

EMBED, LAYER, HEAD = "embed", "layer", "head"
# The head's penalty variant (penalties, min_p, logprobs): a separate executable, so the plain head a
# step without them runs is exactly today's. It reads each row's token history, as wide as the
# step's gathered context (pages x page size covers every sampling row's tokens), hence its key has pages.
HEAD_X = "head_x"
HEAD_X_FIELDS = PENALTY_FIELDS  # its batch arrays beyond the plain head's, in argument order
ZEROS, GATHER, SCATTER = "zeros", "gather", "scatter"  # KV pool construction and page moves (kunjax.memory)


@dataclasses.dataclass(frozen=True, order=True)
class ExeKey:
    kind: str
    rows: int  # step rows; pages moved per call (gather / scatter)
    query: int
    pages: int = 0  # gathered context pages per row (layer, head_x)
    pool_pages: int = 0  # pages of the KV pool it reads or writes (layer, zeros, gather, scatter)
    part: str = ""  # "k" or "v": which pool (zeros, gather, scatter; their shapes differ)


def pool_keys(pool_pages: int, chunk_pages: int) -> list[ExeKey]:
    """What creating K and V pools of this size and moving pages in and out of them needs."""
    return [ExeKey(kind, rows, 0, 0, pool_pages, part) for part in (K, V)
            for kind, rows in ((ZEROS, 0), (GATHER, chunk_pages), (SCATTER, chunk_pages))]


def keys_for(shape: StepShape, pool_pages: int, embed: bool = True, head: bool = True) -> list[ExeKey]:
    """The executables a step of `shape` needs on a placement holding pools of `pool_pages` pages."""
    keys = [ExeKey(LAYER, shape.rows, shape.query, shape.pages, pool_pages)]
    if embed:
        keys.insert(0, ExeKey(EMBED, shape.rows, shape.query))
    if head:
        keys += [ExeKey(HEAD, shape.rows, shape.query), ExeKey(HEAD_X, shape.rows, shape.query, shape.pages)]
    return keys


# ---- the functions that get compiled: modules merged from their state (graph definition static) ----
def _embed(embed_w, tokens, *, spec: StateSpec):
    return spec.merge({"embed": embed_w})(tokens)


def _layer(lp, k_pool, v_pool, h, positions, slots, block_tables, ctx_lens, *, spec: StateSpec):
    h, (k_pool, v_pool) = spec.merge(lp)((k_pool, v_pool), h, positions, slots, block_tables, ctx_lens)
    return h, k_pool, v_pool


def _head(hp, h, last_idx, temperature, top_k, top_p, seeds, counters, *, spec: StateSpec):
    rows = jnp.arange(h.shape[0])
    logits = spec.merge(hp)(h[rows, last_idx])
    return sample(logits, temperature, top_k, top_p, seeds, counters), logits


def _head_x(hp, h, last_idx, temperature, top_k, top_p, seeds, counters, history, prompt_lens, repetition,
            frequency, presence, min_p, *, spec: StateSpec):
    """The head with penalties and min_p applied before sampling, and the sampled tokens' logprobs."""
    rows = jnp.arange(h.shape[0])
    logits = spec.merge(hp)(h[rows, last_idx])
    penalised = apply_penalties(logits, history, prompt_lens, repetition, frequency, presence)
    tokens = sample(penalised, temperature, top_k, top_p, seeds, counters, min_p)
    return (tokens, logits) + token_logprobs(logits, tokens)


def _gather_pages(pool, ids):
    """(KV, P, ps, hd)[ids] -> (KV, C, ps, hd): pages leave a pool."""
    return pool[:, ids]


def _scatter_pages(pool, ids, pages):
    """Writes (KV, C, ps, hd) pages into a (donated) pool at ids; padding ids are the null page."""
    return pool.at[:, ids].set(pages)


class NotCompiled(KeyError):
    pass


_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


def executables_for(cfg: ModelConfig, mesh: Mesh, dtype, page_size: int) -> "StepExecutables":
    """The process-wide StepExecutables of (model config, mesh, dtype, page size): an instance rebuilt
    on the same devices (a restarted cluster, a test suite) reuses every executable compiled there."""
    key = (cfg, mesh, jnp.dtype(dtype), page_size)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = StepExecutables(cfg, mesh, dtype, page_size)
        return _SHARED[key]


class StepExecutables:
    """The compiled pieces of one placement; shared by everything that runs on that mesh (the
    instance, and the pipeline stage it becomes after a drop)."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, dtype, page_size: int):
        self.cfg = cfg
        self.mesh = mesh
        self.dtype = jnp.dtype(dtype)
        self.page_size = page_size
        self.tied = cfg.tie_word_embeddings
        rep = replicated(mesh)
        self.rep = rep
        self.kv_sh = kv_sharding(mesh)
        self.spec = model_spec(cfg)  # the modules' graph definitions and state layouts
        # every weight's placement, from its module's logical axes through sharding.rules
        self.layer_sh = state_shardings(self.spec.layer, mesh)
        self.head_sh = state_shardings(self.spec.head, mesh)
        self.embed_sh = state_shardings(self.spec.embed, mesh)["embed"]
        self._jit = {
            EMBED: jax.jit(functools.partial(_embed, spec=self.spec.embed), in_shardings=(self.embed_sh, rep),
                           out_shardings=rep),
            LAYER: jax.jit(functools.partial(_layer, spec=self.spec.layer), donate_argnums=(1, 2),
                           in_shardings=(self.layer_sh, self.kv_sh, self.kv_sh) + (rep,) * 5,
                           out_shardings=(rep, self.kv_sh, self.kv_sh)),
            HEAD: jax.jit(functools.partial(_head, spec=self.spec.head), in_shardings=(self.head_sh,) + (rep,) * 7,
                          out_shardings=(rep, rep)),
            HEAD_X: jax.jit(functools.partial(_head_x, spec=self.spec.head), in_shardings=(self.head_sh,) + (rep,) * 13,
                            out_shardings=(rep,) * 5),
            GATHER: jax.jit(_gather_pages, in_shardings=(self.kv_sh, rep), out_shardings=self.kv_sh),
            SCATTER: jax.jit(_scatter_pages, donate_argnums=(0,), in_shardings=(self.kv_sh, rep, self.kv_sh),
                             out_shardings=self.kv_sh),
        }
        self._compiled: dict[ExeKey, Any] = {}
        self._lock = threading.Lock()
        self._compile_lock = threading.Lock()
        self.compile_seconds = 0.0

    # ---- abstract arguments ----------------------------------------------------------------
    def _sds(self, shape, dtype, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or self.rep)

    def _pool_sds(self, num_pages: int, part: str):
        return self._sds(pool_shape(self.cfg, num_pages, self.page_size, part), storage_dtype(self.dtype), self.kv_sh)

    def _abstract(self, key: ExeKey) -> tuple:
        cfg, i32 = self.cfg, jnp.int32
        R, Q = key.rows, key.query
        if key.kind == ZEROS:
            return ()
        if key.kind in (GATHER, SCATTER):
            ids = self._sds((key.rows,), i32)
            if key.kind == GATHER:
                return (self._pool_sds(key.pool_pages, key.part), ids)
            return (self._pool_sds(key.pool_pages, key.part), ids, self._pool_sds(key.rows, key.part))
        h = self._sds((R, Q, cfg.hidden_size), self.dtype)
        if key.kind == EMBED:
            return (self._sds((cfg.vocab_size, cfg.hidden_size), self.dtype, self.embed_sh), self._sds((R, Q), i32))
        if key.kind == LAYER:
            lp = self.spec.layer.build(lambda n, shape, _axes: self._sds(shape, self.dtype, self.layer_sh[n]))
            return (lp, self._pool_sds(key.pool_pages, K), self._pool_sds(key.pool_pages, V), h,
                    self._sds((R, Q), i32), self._sds((R, Q), i32),
                    self._sds((R, key.pages), i32), self._sds((R,), i32))
        hp = self.spec.head.build(lambda n, shape, _axes: self._sds(shape, self.dtype, self.head_sh[n]))
        rows = lambda dt: self._sds((R,), dt)  # noqa: E731
        f32 = jnp.float32
        head = (hp, h, rows(i32), rows(f32), rows(i32), rows(f32), rows(jnp.uint32), rows(i32))
        if key.kind == HEAD_X:  # + history, prompt_lens, repetition, frequency, presence, min_p
            return head + (self._sds((R, key.pages * self.page_size), i32), rows(i32)) + (rows(f32),) * 4
        return head

    # ---- compile / look up -------------------------------------------------------------------
    def is_ready(self, key: ExeKey) -> bool:
        return key in self._compiled

    def all_ready(self, keys: Iterable[ExeKey]) -> bool:
        return all(k in self._compiled for k in keys)

    def compile(self, keys: Iterable[ExeKey]) -> int:
        """Compiles the keys not compiled yet (the persistent compilation cache applies); returns how
        many it compiled. Thread-safe; safe to call while steps run on other threads."""
        n = 0
        for key in keys:
            if key in self._compiled:
                continue
            # One compile at a time per placement: the background compiler and an offline run (or a
            # follower) may ask for the same key at once, and tracing one jitted function on two
            # threads at once crashed XLA (a segfault seen in the suite). Placements still compile in
            # parallel (warm-up threads, one per instance).
            with self._compile_lock:
                if key in self._compiled:
                    continue
                t = time.perf_counter()
                compiled = self._load_or_compile(key)
                with self._lock:
                    self._compiled[key] = compiled
                    n += 1
                self.compile_seconds += time.perf_counter() - t
        return n

    def _load_or_compile(self, key: ExeKey):
        """From the executable store when it holds a valid entry (no tracing, lowering or
        compiling), else traced, lowered and compiled here and saved there."""
        store = exe_store.current()
        what = self._identity(key) if store is not None else None
        if store is not None:
            compiled = store.load(what, self.mesh.devices.flat)
            if compiled is not None:
                return compiled
        fn = self._zeros_jit(key.pool_pages, key.part) if key.kind == ZEROS else self._jit[key.kind]
        compiled = fn.lower(*self._abstract(key)).compile()
        if store is not None:
            store.save(what, compiled)
        return compiled

    def _identity(self, key: ExeKey) -> dict:
        """What executable `key` is on this placement (the store's key; exe_store adds what it is
        built with: versions, platform, flags, source)."""
        return {"exe": dataclasses.asdict(key), "model": self.cfg.to_dict(), "dtype": self.dtype.name,
                "page_size": self.page_size, "mesh_axes": list(self.mesh.axis_names),
                "mesh_shape": list(self.mesh.devices.shape),
                "devices": [[d.id, d.device_kind] for d in self.mesh.devices.flat]}

    def _zeros_jit(self, num_pages: int, part: str):
        shape, dt = pool_shape(self.cfg, num_pages, self.page_size, part), storage_dtype(self.dtype)
        return jax.jit(lambda: jnp.zeros(shape, dt), out_shardings=self.kv_sh)

    def new_pools(self, num_pages: int) -> tuple[jax.Array, jax.Array]:
        """A zeroed (K, V) pool pair of this size on this mesh (compiled ahead: pool_keys)."""
        return tuple(self.get(ExeKey(ZEROS, 0, 0, 0, num_pages, part))() for part in (K, V))

    # A follower process of a multi-host cluster replays what the controller decided; when it has not
    # compiled something the controller had ready, it compiles it on the spot (sharding.multihost).
    compile_on_demand = False

    def get(self, key: ExeKey):
        try:
            return self._compiled[key]
        except KeyError:
            if StepExecutables.compile_on_demand:
                self.compile([key])
                return self._compiled[key]
            raise NotCompiled(f"no compiled executable for {key} on {self.mesh.devices.flat[0]}") from None

    def transient_bytes(self, key: ExeKey) -> int:
        """Per-device bytes a call of this executable needs beyond its weights and KV pools, from
        XLA's own accounting: scratch (temp) plus the outputs that do not alias a donated input
        plus the per-step inputs (hidden states, batch arrays)."""
        m = self.get(key).memory_analysis()
        args = self._abstract(key)
        per_step = sum(_shard_bytes(a) for a in jax.tree.leaves(args[1:] if key.kind == EMBED else
                                                                  args[3:] if key.kind == LAYER else args[1:]))
        out = m.output_size_in_bytes - m.alias_size_in_bytes
        return int(m.temp_size_in_bytes + out + per_step)

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)


def _shard_bytes(sds) -> int:
    shape = sds.sharding.shard_shape(sds.shape) if sds.sharding is not None else sds.shape
    n = 1
    for d in shape:
        n *= d
    return n * jnp.dtype(sds.dtype).itemsize


class BackgroundCompiler:
    """One daemon thread that compiles queued (executables, keys) jobs in order, so a server can
    answer with the shapes that cover every step while the cheaper ones follow. Compiling releases
    the GIL for most of its time; the step loop keeps running meanwhile."""

    def __init__(self):
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._busy = 0
        self.errors: list[str] = []
        self.done = 0
        self._stopping = False

    def submit(self, exes: StepExecutables, keys: Sequence[ExeKey], on_done: Optional[Callable[[], None]] = None) -> None:
        with self._cv:
            self._queue.append((exes, list(keys), on_done))
            self._busy += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kunjax-compile", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                exes, keys, on_done = self._queue.popleft()
            try:
                for key in keys:
                    if self._stopping:  # shutdown: only the executable compiling now is waited for
                        break
                    self.done += exes.compile([key])
                else:
                    if on_done is not None:
                        on_done()
            except Exception as e:  # never take the server down; the shape just stays unready
                log.exception("background compilation failed")
                self.errors.append(str(e))
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Drops the queued jobs and the rest of the running one, and waits for the executable
        compiling now: a process must not exit while XLA compiles on this thread (the runtime
        aborts), but it need not finish a job of dozens of shapes (a pool ladder) first: a cold
        server stopped right after start-up waited 17 s for one here."""
        with self._cv:
            self._stopping = True
            self._busy -= len(self._queue)
            self._queue.clear()
        self.wait(timeout)

    def idle(self) -> bool:
        with self._cv:
            return self._busy == 0

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until every submitted job is done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True
