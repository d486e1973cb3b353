"""Launcher: `python -m serving.launch --model=smollm2-135m --num_instances=4 --tp=2 --port=50051`.

Flags are parsed into typed frozen dataclasses, one per concern (model, cache, scheduler, server,
memory policy, distributed). JAX is imported only after the flags are read, because the number of
virtual CPU devices (--cpu_devices) must be in XLA_FLAGS before the first `import jax`.

HTTP: --http_port adds the OpenAI-compatible API (serving.http) beside gRPC in the same process;
--api_key / --api_key_file / --admin_api_key and --tls_cert_file / --tls_key_file /
--tls_client_ca_file apply to both fronts (serving.security).

Multi-host: run the same command on every process with --coordinator_address, --num_processes and
--process_id. Process 0 serves gRPC and runs the control plane; the others follow its steps
(sharding.multihost).

Start-up checks what it can before anything slow: the --model value (a missing path or a directory
without a checkpoint), then the gRPC port (bound before JAX starts and the model loads), then the
metrics and control ports. Errors are one line on stderr.

Stopping: SIGTERM or SIGINT during start-up (loading, warm-up, joining the other processes, waiting
for followers) exits within moments, having served nothing. While serving, the first SIGTERM/SIGINT
turns health NOT_SERVING, refuses new calls and gives in-flight streams --shutdown_grace_s to finish;
the rest end with FINISH_REASON_ABORT (at once on a second signal). A follower keeps replaying the
controller's steps until it stops, and exits on its own --shutdown_grace_s + 15 s after a signal.

Exit status: 0 stopped after serving; 1 start-up failed (port in use, the model does not load);
2 bad flag value (e.g. --model names nothing loadable); 143 / 130 SIGTERM / SIGINT during start-up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

from absl import app, flags

from kunjax.control.cluster import DISPATCH_POLICIES
from kunjax.control.mechanism import GROUP_SHAPES, resolve_group_shapes
from serving.options import ServerOptions

FLAGS = flags.FLAGS

# model
flags.DEFINE_string("model", "smollm2-135m", "embedded model name (tiny, smollm2-135m), HF/orbax dir or .gguf")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "serving dtype (auto: f32 on CPU, bf16 else)")
# cluster
flags.DEFINE_integer("num_instances", 1, "serving instances (full replicas)")
flags.DEFINE_integer("tp", 1, "devices per instance (tensor parallel)")
flags.DEFINE_integer("cpu_devices", None, "virtual CPU devices to create (sets XLA_FLAGS before jax starts; "
                     "only the CPU backend is affected); default num_instances*tp (per process)")
flags.DEFINE_list("devices", None, "ids of the devices to serve on, in order (default: all, in jax.devices() "
                  "order); instance i takes the i-th group of tp of them")
flags.DEFINE_enum("dispatch", "fewest_queued", list(DISPATCH_POLICIES),
                  "where a new request goes (kunjax.control.cluster.DISPATCH_POLICIES): the unit with the fewest "
                  "waiting requests per instance it is made of, then the most free pages (fewest_queued); the most "
                  "free KV pages after its queue (most_free_pages); or, among the units whose free pages hold the "
                  "prompt now, the fewest requests per instance (least_loaded)")
flags.DEFINE_enum("group_shapes", "auto", ["auto", *GROUP_SHAPES],
                  "step shapes a pipeline group's pools get (kunserve): auto is on_demand on GPU/TPU devices and "
                  "first on CPU devices, where a background compile takes the cores the instances step on "
                  "(kunjax.control.mechanism.resolve_group_shapes); the pool ladder's first shapes (first); those, "
                  "and each shape a group step ran padded for, compiled in the background once asked (on_demand); or "
                  "every shape of every ladder size, compiled in the background from start-up (all: worth it on a GPU; "
                  "on a CPU it takes about an hour)")
# cache
flags.DEFINE_integer("page_size", 16, "tokens per KV page")
flags.DEFINE_integer("num_pages", None, "KV pages per instance (incl. the null page); default: from memory")
flags.DEFINE_integer("hbm_bytes", None, "memory budget per device in bytes (CPU default: half the host RAM "
                     "shared among the devices, at most 4 GiB each)")
flags.DEFINE_float("hbm_fraction", 0.85, "fraction of the device's bytes_limit to use (GPU)")
flags.DEFINE_integer("max_model_len", None, "context length served (default min(model, 4096))")
# scheduler
flags.DEFINE_integer("max_num_seqs", 32, "running requests per instance")
flags.DEFINE_integer("max_num_batched_tokens", 512, "prefill tokens per step")
flags.DEFINE_integer("max_prefill_rows", 4, "prompts per prefill step")
flags.DEFINE_integer("max_queue", 1024, "requests waiting across the cluster before RESOURCE_EXHAUSTED")
flags.DEFINE_bool("warmup", True, "compile every shape bucket: the shapes that cover every step before "
                  "serving, the cheaper ones in the background while serving (--nowarmup: covering shapes only)")
flags.DEFINE_string("compilation_cache_dir", None, "compilation cache directory: compiled executables "
                    "(kunjax-executables/; JAX's persistent cache in multi-process jobs) "
                    "(default ~/.cache/kunjax/jax or $KUNJAX_COMPILE_CACHE)")
# memory policy (kunjax.control.kunserve.KunserveConfig; the monitor's thresholds: kunjax.control.monitor)
flags.DEFINE_enum("overload_policy", "recompute", ["recompute", "swap", "migrate", "kunserve"],
                  "when KV runs out: recompute (preempt the latest arrival and recompute it later, vLLM-style), "
                  "swap (its KV goes to host memory and comes back when room returns), migrate (running requests "
                  "move to the instance with the most free pages, Llumnix-style) or kunserve (drop parameters into "
                  "pipeline groups where the overload is, restore when it passes; recompute where no plan covers "
                  "the demand)")
flags.DEFINE_integer("swap_space_bytes", 1 << 30, "host memory per instance for swapped-out KV (--overload_policy=swap)")
flags.DEFINE_float("drop_demand", 1.0, "kunserve: committed KV demand (held + queued + expected growth) / an "
                   "instance's pages at which it is overloaded")
flags.DEFINE_float("drop_dwell_s", 0.5, "kunserve: ... continuously for this long before a drop")
flags.DEFINE_float("drop_surge", 1.5, "kunserve: ... or at once when the committed demand is this many times the "
                   "pages (a sudden overload)")
flags.DEFINE_float("restore_demand", 0.5, "kunserve: committed demand / the members' own pages at which a group "
                   "may split (below drop_demand: the gap is the hysteresis)")
flags.DEFINE_float("restore_dwell_s", 5.0, "kunserve: ... with nothing queued and demand not rising, for this long")
flags.DEFINE_float("transition_cooldown_s", 5.0, "kunserve: no new drop or restore of an instance this soon after "
                   "its last one")
flags.DEFINE_integer("max_group_size", 4, "kunserve: stages of a pipeline group at most")
flags.DEFINE_float("min_partial_gain", 0.25, "kunserve: when no group covers an overload (the instances around are "
                   "overloaded too), drop into the group adding the most pages if it adds at least this share of its "
                   "members' own; 0: fall back to recompute instead")
flags.DEFINE_float("tpot_slo_ms", 200.0, "kunserve: lookahead micro-batches keep the time between tokens of a "
                   "group within this")
# server
flags.DEFINE_integer("port", 50051, "gRPC port")
flags.DEFINE_string("host", "[::]", "gRPC bind address")
flags.DEFINE_integer("metrics_port", None, "Prometheus /metrics port (off when unset)")
flags.DEFINE_float("shutdown_grace_s", 10.0, "seconds in-flight streams get to finish on SIGTERM; then (or at "
                   "a second SIGTERM/SIGINT) they end with finish_reason ABORT")
flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "log level of the server")
flags.DEFINE_integer("default_max_tokens", 256, "max_tokens when a request sets none (capped by the context "
                     "left after the prompt)")
# HTTP front, API keys, TLS (serving.http, serving.security)
flags.DEFINE_integer("http_port", None, "OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, "
                     "/v1/models, /health, /metrics) beside gRPC, same --host; off when unset")
flags.DEFINE_string("served_model_name", None, "model name the APIs report and requests name (default: --model)")
flags.DEFINE_multi_string("api_key", [], "API key that opens Generation on both fronts (repeatable; "
                          "'Authorization: Bearer <key>'); none: open")
flags.DEFINE_string("api_key_file", None, "file of API keys, one a line ('#' comments), added to --api_key")
flags.DEFINE_multi_string("admin_api_key", [], "API key that opens Admin (and Generation); with --api_key set and "
                          "no admin key, Admin is closed")
flags.DEFINE_string("tls_cert_file", None, "PEM certificate chain: serve both fronts over TLS (with --tls_key_file)")
flags.DEFINE_string("tls_key_file", None, "PEM private key of --tls_cert_file")
flags.DEFINE_string("tls_client_ca_file", None, "PEM CA bundle: require client certificates it signed (mutual TLS)")


def front_options() -> dict:
    """The ServerOptions fields of the block above; a UsageError names a bad flag."""
    from serving.security import check_tls_options, read_key_file

    keys = list(FLAGS.api_key)
    if FLAGS.api_key_file:
        try:
            keys += read_key_file(FLAGS.api_key_file)
        except OSError as e:
            raise app.UsageError(f"--api_key_file={FLAGS.api_key_file}: {e.strerror}") from None
    if any(not k.strip() for k in keys + list(FLAGS.admin_api_key)):
        raise app.UsageError("--api_key / --admin_api_key: an empty key")
    if FLAGS.http_port is not None and not 0 <= FLAGS.http_port < 65536:
        raise app.UsageError(f"--http_port={FLAGS.http_port} is not a port number")
    kw = dict(http_port=FLAGS.http_port, served_model_name=FLAGS.served_model_name or FLAGS.model,
              api_keys=tuple(keys), admin_api_keys=tuple(FLAGS.admin_api_key), tls_cert_file=FLAGS.tls_cert_file,
              tls_key_file=FLAGS.tls_key_file, tls_client_ca_file=FLAGS.tls_client_ca_file)
    try:
        check_tls_options(ServerOptions(**kw))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return kw


# distributed
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
flags.DEFINE_integer("num_processes", 1, "processes in the multi-host job")
flags.DEFINE_integer("process_id", 0, "this process's index")
flags.DEFINE_integer("control_port", None, "port of process 0's step channel (default coordinator port + 1)")
flags.DEFINE_string("cpu_collectives", "gloo", "CPU collectives implementation for multi-process CPU runs")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    model: str
    dtype: str


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    num_instances: int
    tp: int
    cpu_devices: Optional[int]
    devices: Optional[tuple[int, ...]]
    dispatch: str
    group_shapes: str


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    page_size: int
    num_pages: Optional[int]
    hbm_bytes: Optional[int]
    hbm_fraction: float
    max_model_len: Optional[int]


@dataclasses.dataclass(frozen=True)
class SchedulerOptions:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_prefill_rows: int
    max_queue: int
    warmup: bool
    compilation_cache_dir: Optional[str]


@dataclasses.dataclass(frozen=True)
class MemoryPolicyOptions:
    overload_policy: str
    drop_demand: float
    drop_dwell_s: float
    drop_surge: float
    restore_demand: float
    restore_dwell_s: float
    transition_cooldown_s: float
    max_group_size: int
    tpot_slo_ms: float
    swap_space_bytes: int = 1 << 30
    min_partial_gain: float = 0.25


def kunserve_config(memory: MemoryPolicyOptions):
    """The kunserve policy's config from the flags (the cluster receives it); a bad value is a
    UsageError naming the flag."""
    from kunjax.control.kunserve import KunserveConfig
    from kunjax.control.monitor import MonitorConfig
    from kunjax.control.planner import PlannerConfig

    cfg = KunserveConfig(
        monitor=MonitorConfig(drop_demand=memory.drop_demand, drop_dwell_s=memory.drop_dwell_s,
                              drop_surge=memory.drop_surge, restore_demand=memory.restore_demand,
                              restore_dwell_s=memory.restore_dwell_s, transition_cooldown_s=memory.transition_cooldown_s),
        planner=PlannerConfig(max_group_size=memory.max_group_size, min_partial_gain=memory.min_partial_gain),
        tpot_slo_ms=memory.tpot_slo_ms)
    try:
        cfg.validate()
    except ValueError as e:
        raise app.UsageError(f"--{e}") from None
    return cfg


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    coordinator_address: Optional[str]
    num_processes: int
    process_id: int
    control_port: Optional[int]
    cpu_collectives: str

    @property
    def enabled(self) -> bool:
        return self.num_processes > 1


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    model: ModelOptions
    cluster: ClusterOptions
    cache: CacheOptions
    scheduler: SchedulerOptions
    memory: MemoryPolicyOptions
    server: "ServerOptions"
    metrics_port: Optional[int]
    distributed: DistributedOptions


def _pick(cls, **extra):
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
    return cls(**{n: FLAGS[n].value for n in names}, **extra)


def _device_ids(value) -> Optional[tuple[int, ...]]:
    if not value:
        return None
    try:
        ids = tuple(int(v) for v in value)
    except ValueError:
        raise app.UsageError(f"--devices takes comma-separated integer device ids, got {','.join(value)}") from None
    if len(set(ids)) != len(ids):
        raise app.UsageError(f"--devices lists a device twice: {','.join(value)}")
    return ids


def _check_distributed(d: DistributedOptions) -> None:
    if d.num_processes < 1:
        raise app.UsageError(f"--num_processes must be at least 1, got {d.num_processes}")
    if d.enabled:
        if not d.coordinator_address or ":" not in d.coordinator_address:
            raise app.UsageError(f"--num_processes={d.num_processes} needs --coordinator_address=host:port "
                                 f"(process 0's address), got {d.coordinator_address!r}")
        if not d.coordinator_address.rsplit(":", 1)[1].isdigit():
            raise app.UsageError(f"--coordinator_address={d.coordinator_address}: the port is not a number")
    if not 0 <= d.process_id < d.num_processes:
        raise app.UsageError(f"--process_id={d.process_id} is outside 0..{d.num_processes - 1}")


def options_from_flags() -> LaunchOptions:
    server = ServerOptions(port=FLAGS.port, host=FLAGS.host, max_queue=FLAGS.max_queue,
                           shutdown_grace_s=FLAGS.shutdown_grace_s, default_max_tokens=FLAGS.default_max_tokens,
                           overload_policy=FLAGS.overload_policy, **front_options())
    cluster = _pick(ClusterOptions, devices=_device_ids(FLAGS.devices))
    distributed = _pick(DistributedOptions)
    _check_distributed(distributed)
    memory = _pick(MemoryPolicyOptions)
    kunserve_config(memory)  # every flag checked before anything slow
    return LaunchOptions(model=_pick(ModelOptions), cluster=cluster, cache=_pick(CacheOptions),
                         scheduler=_pick(SchedulerOptions), memory=memory, server=server,
                         metrics_port=FLAGS.metrics_port, distributed=distributed)


def configure_devices(cluster: ClusterOptions, distributed: DistributedOptions) -> None:
    """Sets XLA_FLAGS for virtual CPU devices; must run before jax is imported."""
    if "jax" in sys.modules:
        logging.warning("jax already imported; --cpu_devices has no effect")
    n = cluster.cpu_devices
    if n is None:
        # Harmless where an accelerator serves (only the CPU backend gets the devices), and makes
        # `--num_instances=4 --tp=2` work out of the box on a CPU-only host.
        n = -(-cluster.num_instances * cluster.tp // max(1, distributed.num_processes))
        if cluster.devices and distributed.num_processes == 1:
            n = max(n, max(cluster.devices) + 1)
    if n:
        flags_now = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags_now:
            os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={n}".strip()


def engine_config(opts: LaunchOptions):
    from kunjax.runtime.engine import EngineConfig
    from kunjax.control.scheduler import SchedulerConfig

    s = opts.scheduler
    sched = SchedulerConfig(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                            max_prefill_rows=s.max_prefill_rows, max_queue=s.max_queue)
    c = opts.cache
    return EngineConfig(page_size=c.page_size, num_pages=c.num_pages, hbm_bytes=c.hbm_bytes,
                        hbm_fraction=c.hbm_fraction, max_model_len=c.max_model_len, scheduler=sched, warmup=False,
                        compile_small_first=True, overload_policy=opts.memory.overload_policy,
                        swap_space_bytes=opts.memory.swap_space_bytes)


class LaunchError(Exception):
    """A start-up failure the user can act on (port in use, a model that does not load): `main`
    prints the message as one line and exits with EXIT_STARTUP."""


EXIT_STARTUP = 1  # start-up failed: port in use, the model does not load
EXIT_USAGE = 2  # a bad flag value: --model names nothing loadable, --devices, too few devices
# SIGTERM / SIGINT before serving began: 128 + the signal number (143 / 130), see StartupSignals.


class StartupSignals:
    """SIGTERM and SIGINT during start-up (loading, warm-up, connecting to the other processes,
    waiting for followers) end the process within moments: one line on stderr naming the phase,
    exit status 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as if the signal's
    default action had killed it. Nothing has been served yet, so there is nothing to drain; the
    exit skips atexit handlers (a jax.distributed shutdown barrier would wait for the other
    processes).

    Python runs signal handlers only on the main thread between bytecodes, not while it is inside
    an XLA compilation or a blocking runtime call (jax.distributed.initialize waiting for its
    peers). So the handler is Python's C-level one, which writes the signal number to a wake-up
    pipe at once (`signal.set_wakeup_fd`), and a watcher thread reading that pipe ends the process.
    `done()` hands the signals over to serving, whose own handlers drain gracefully."""

    def __init__(self):
        self.phase = "starting"
        self.pending: Optional[int] = None  # a signal that arrived after done(), before serving's handlers
        self._active = True
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="kunjax-startup-signals", daemon=True).start()

    def _handler(self, signum, frame) -> None:
        del frame
        if not self._active:
            self.pending = signum
        # while active, the watcher thread has the byte and ends the process

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._r, 16)
            except OSError:
                return
            if not data:  # done() closed the write end
                os.close(self._r)
                return
            for signum in data:
                if self._active and signum in (signal.SIGTERM, signal.SIGINT):
                    self._exit(signum)

    def _exit(self, signum: int) -> None:
        name = signal.Signals(signum).name
        msg = (f"kunjax: {name} during start-up ({self.phase}): exiting now (status {128 + signum}), "
               f"nothing was served\n")
        # Straight to fd 2, no flush of sys.stdout: the main thread may hold its lock (start-up
        # prints nothing to stdout; logging writes each record through at once).
        os.write(2, msg.encode())
        os._exit(128 + signum)

    def enter(self, phase: str) -> None:
        self.phase = phase
        logging.info("start-up: %s", phase)

    def done(self) -> Optional[int]:
        """Start-up is over: from now on SIGTERM/SIGINT go to serving's handlers. Returns a signal
        that arrived in between (the caller acts on it as if it came after its handlers)."""
        self._active = False
        signal.set_wakeup_fd(-1)
        os.close(self._w)  # the watcher reads EOF and ends
        return self.pending


_startup: Optional[StartupSignals] = None


def startup_phase(phase: str) -> None:
    """Names the start-up phase (logged; and in the line printed if SIGTERM ends start-up there)."""
    if _startup is not None:
        _startup.enter(phase)
    else:
        logging.info("start-up: %s", phase)


def quiet_absent_tpu_probe() -> None:
    """JAX tries every known backend and logs, at INFO, "Unable to initialize backend 'tpu'" on any
    host without libtpu, i.e. on every CPU or GPU host. Drop exactly that record when no TPU library
    is installed (nothing to report); everything else JAX logs, and the TPU message where libtpu is
    present, stays. The backends JAX picks are unchanged (a GPU is still found and preferred)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is not None or os.environ.get("TPU_LIBRARY_PATH"):
        return

    class _NoAbsentTpu(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Unable to initialize backend 'tpu'")

    logging.getLogger("jax._src.xla_bridge").addFilter(_NoAbsentTpu())


def check_model(spec: str) -> None:
    """The --model value names something loadable (no JAX, no weights read); else a UsageError."""
    from kunjax.io.model_spec import ModelSpecError, check_model_spec

    try:
        check_model_spec(spec)
    except ModelSpecError as e:
        raise app.UsageError(str(e)) from None


def build_cluster(opts: LaunchOptions, oplog=None):
    """Loads the model once into host memory and places one sharded replica per instance."""
    import jax

    from kunjax.runtime.cluster import ServingCluster
    from kunjax.io.loader import host_place, load_model, parse_dtype

    devices = jax.devices()
    if opts.cluster.devices:
        by_id = {d.id: d for d in devices}
        missing = [i for i in opts.cluster.devices if i not in by_id]
        if missing:
            raise app.UsageError(f"--devices: no device with id {missing}; this host has ids "
                                 f"{sorted(by_id)}")
        devices = [by_id[i] for i in opts.cluster.devices]
    need = opts.cluster.num_instances * opts.cluster.tp
    if len(devices) < need:
        hint = ""
        if devices[0].platform == "cpu":
            hint = (f" On CPU pass --cpu_devices={need} (or set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{need} before starting Python).")
        raise app.UsageError(f"num_instances={opts.cluster.num_instances} x tp={opts.cluster.tp} needs {need} "
                             f"devices; this host has {len(devices)}.{hint}")
    dtype = parse_dtype(opts.model.dtype)
    startup_phase(f"loading {opts.model.model}")
    try:
        host = load_model(opts.model.model, dtype, place=host_place(dtype))
    except (OSError, ValueError) as e:  # the loader's messages name the file and the problem
        logging.debug("loading %s failed", opts.model.model, exc_info=True)
        raise LaunchError(f"cannot load model {opts.model.model}: {e}") from e
    startup_phase("warm-up: placing the instances, compiling the shapes that cover every step")
    cluster = ServingCluster.build(host, engine_config(opts), opts.cluster.num_instances, opts.cluster.tp,
                                   devices=devices, policy=DISPATCH_POLICIES[opts.cluster.dispatch](), oplog=oplog)
    cluster.group_shapes = resolve_group_shapes(opts.cluster.group_shapes,
                                                accelerator=any(d.platform != "cpu" for d in cluster.devices()))
    # Every instance placed its own replica; the host copy of the weights is no longer needed (a
    # restore brings dropped layers back from the peers that kept them, never from the host).
    host.params = None
    if opts.memory.overload_policy == "migrate":  # live KV migration between instances (every process)
        from kunjax.runtime import migrate

        migrate.install(cluster)
    if opts.scheduler.warmup:  # the cheaper shapes compile in the background while the server answers
        cluster.compile_in_background()
    if cluster.engines and len(cluster.engines) > 1:
        # The group pool sizes a drop may use, compiled in the background: no drop waits a compile.
        cluster.max_group_size = opts.memory.max_group_size
        cluster.compile_ladder(background=True, all_shapes=cluster.group_shapes == "all")
    if opts.memory.overload_policy == "kunserve":
        t = time.monotonic()
        cost_model = cluster.calibrate()
        logging.info("kunserve: cost model calibrated in %.1fs on %s", time.monotonic() - t, cluster.engines[0].device)
        cluster.enable_kunserve(kunserve_config(opts.memory), cost_model)
    return cluster


async def bind_server(opts: LaunchOptions, metrics):
    """The gRPC server object with its port bound, before there is a cluster (nothing slow has
    started, so a port in use is reported at once); `serve` attaches the cluster and starts it."""
    from serving.server import KunjaxServer, PortUnavailable

    server = KunjaxServer(None, opts.server, metrics, model_name=opts.model.model)
    try:
        server.bind()
    except PortUnavailable as e:
        raise LaunchError(f"{e} (--port, --http_port, --host)") from None
    return server


async def serve(opts: LaunchOptions, server, cluster, follower_channel=None, startup=None) -> None:
    """Starts `server` (bound by bind_server) on `cluster` and serves until SIGTERM/SIGINT: health
    turns NOT_SERVING, in-flight streams get --shutdown_grace_s, a second signal aborts them."""
    import asyncio

    port = await server.start(cluster)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if startup is not None:
        startup.done()  # before the loop's handlers: it clears the wake-up fd they set
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if startup is not None and startup.pending is not None:
        stop.set()  # the signal came between the end of start-up and the handlers above
    # From this line on a signal drains gracefully (tests and scripts wait for it).
    print(f"kunjax serving {opts.model.model} on port {port}", flush=True)
    if server.http_port is not None:
        print(f"kunjax OpenAI-compatible HTTP API on port {server.http_port}", flush=True)
    await stop.wait()
    logging.info("shutting down (grace %.1fs; a second SIGTERM/SIGINT aborts in-flight requests now)",
                 opts.server.shutdown_grace_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.abort_inflight)
    await server.stop()
    if follower_channel is not None:
        follower_channel.close()
    print("kunjax server stopped", flush=True)


def start_jax(opts: LaunchOptions) -> None:
    """Persistent compilation cache; joins the multi-process job (waits for every process)."""
    import jax

    from kunjax.runtime.jax_setup import configure_jax

    d = opts.distributed
    configure_jax(opts.scheduler.compilation_cache_dir, multi_process=d.enabled)  # warm start: kunjax.runtime.exe_store
    if d.enabled:
        from sharding import multihost

        startup_phase(f"joining the {d.num_processes}-process job at {d.coordinator_address} "
                      f"as process {d.process_id}")
        multihost.initialize(d.coordinator_address, d.num_processes, d.process_id, d.cpu_collectives)
    logging.info("devices: %s", jax.devices())


def run_controller(opts: LaunchOptions, startup: StartupSignals) -> None:
    """Process 0 (or the only process): binds the gRPC port (and metrics), then starts JAX, loads,
    warms up, waits for the followers, and serves."""
    import asyncio

    from serving.metrics import Metrics

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        metrics = Metrics()
        server = loop.run_until_complete(bind_server(opts, metrics))
        if opts.metrics_port:
            try:
                metrics.serve(opts.metrics_port)
            except OSError as e:
                raise LaunchError(f"cannot serve metrics on port {opts.metrics_port}: {e.strerror} "
                                  f"(--metrics_port)") from None
            logging.info("metrics on port %d", opts.metrics_port)
        start_jax(opts)
        d = opts.distributed
        channel = None
        if d.enabled:
            from sharding import multihost

            port = d.control_port or multihost.default_control_port(d.coordinator_address)
            try:
                channel = multihost.ControllerChannel(port, d.num_processes - 1)
            except OSError as e:
                raise LaunchError(f"cannot listen on control port {port}: {e.strerror} (--control_port)") from None
        cluster = build_cluster(opts, oplog=channel)
        if channel is not None:
            startup_phase(f"waiting for {d.num_processes - 1} follower(s) on port {port}")
            channel.accept()
        loop.run_until_complete(serve(opts, server, cluster, channel, startup))
        cluster.close()
    finally:
        loop.close()


def run_follower(opts: LaunchOptions, startup: StartupSignals) -> None:
    """Processes > 0: join the job, connect to process 0's step channel, build the same cluster and
    replay its steps until it stops. A SIGTERM while following does not stop the steps at once (the
    controller's collectives need this process until it has drained): the follower keeps going
    until the controller says stop, and exits by itself --shutdown_grace_s + FOLLOWER_MARGIN_S
    after the signal at the latest."""
    from sharding import multihost

    start_jax(opts)
    d = opts.distributed
    port = d.control_port or multihost.default_control_port(d.coordinator_address)
    startup_phase(f"connecting to the controller's step channel on port {port}")
    channel = multihost.FollowerChannel(d.coordinator_address.rsplit(":", 1)[0], port)
    cluster = build_cluster(opts)
    limit = opts.server.shutdown_grace_s + FOLLOWER_MARGIN_S
    deadline: list = []

    def on_signal(signum, frame=None):
        del frame
        if deadline:
            return
        name = signal.Signals(signum).name
        logging.warning("%s: following the controller's steps until it stops; exiting in %.0fs at the latest",
                        name, limit)

        def give_up():
            os.write(2, f"kunjax follower: the controller did not stop within {limit:.0f}s of {name}; "
                        f"exiting\n".encode())
            os._exit(128 + signum)
        timer = threading.Timer(limit, give_up)
        timer.daemon = True
        timer.start()
        deadline.append(timer)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    pending = startup.done()
    if pending is not None:
        on_signal(pending)
    multihost.follow(cluster, channel)
    cluster.close()
    print("kunjax follower stopped", flush=True)


FOLLOWER_MARGIN_S = 15.0  # past the grace period: the controller's abort margin and its last steps


def _exit(code: int, message: str) -> None:
    """One line on stderr, then exit now: stdio flushed, atexit handlers skipped (after
    jax.distributed.initialize a normal exit waits in a shutdown barrier for the other processes)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os.write(2, f"serving.launch: error: {message}\n".encode())
    os._exit(code)


def main(argv) -> None:
    del argv
    global _startup
    from absl import logging as absl_logging

    absl_logging.set_verbosity(FLAGS.log_level)
    _startup = StartupSignals()
    try:
        opts = options_from_flags()
        check_model(opts.model.model)
    except app.UsageError as e:
        _exit(EXIT_USAGE, str(e))
    configure_devices(opts.cluster, opts.distributed)
    quiet_absent_tpu_probe()
    try:
        if opts.distributed.enabled and opts.distributed.process_id > 0:
            run_follower(opts, _startup)
        else:
            run_controller(opts, _startup)
    except app.UsageError as e:
        _exit(EXIT_USAGE, str(e))
    except LaunchError as e:
        _exit(EXIT_STARTUP, str(e))


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
