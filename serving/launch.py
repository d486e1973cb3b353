"""Launcher: `python -m serving.launch --model=smollm2-135m --num_instances=4 --tp=2 --port=50051`.

Flags are parsed into typed frozen dataclasses, one per concern (model, cache, scheduler, server,
memory policy, distributed). JAX is imported only after the flags are read, because the number of
virtual CPU devices (--cpu_devices) must be in XLA_FLAGS before the first `import jax`.

Multi-host: run the same command on every process with --coordinator_address, --num_processes and
--process_id. Process 0 serves gRPC and runs the control plane; the others follow its steps
(sharding.multihost).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Optional

from absl import app, flags

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
flags.DEFINE_string("compilation_cache_dir", None, "JAX persistent compilation cache directory "
                    "(default ~/.cache/kunjax/jax or $KUNJAX_COMPILE_CACHE)")
# memory policy
flags.DEFINE_enum("overload_policy", "none", ["none"], "what to do when KV runs out (more policies to come)")
# server
flags.DEFINE_integer("port", 50051, "gRPC port")
flags.DEFINE_string("host", "[::]", "gRPC bind address")
flags.DEFINE_integer("metrics_port", None, "Prometheus /metrics port (off when unset)")
flags.DEFINE_float("shutdown_grace_s", 10.0, "seconds in-flight streams get to finish on SIGTERM; then (or at "
                   "a second SIGTERM/SIGINT) they end with finish_reason ABORT")
flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "log level of the server")
flags.DEFINE_integer("default_max_tokens", 256, "max_tokens when a request sets none (capped by the context "
                     "left after the prompt)")
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


def options_from_flags() -> LaunchOptions:
    server = ServerOptions(port=FLAGS.port, host=FLAGS.host, max_queue=FLAGS.max_queue,
                           shutdown_grace_s=FLAGS.shutdown_grace_s, default_max_tokens=FLAGS.default_max_tokens,
                           overload_policy=FLAGS.overload_policy)
    cluster = _pick(ClusterOptions, devices=_device_ids(FLAGS.devices))
    return LaunchOptions(model=_pick(ModelOptions), cluster=cluster, cache=_pick(CacheOptions),
                         scheduler=_pick(SchedulerOptions), memory=_pick(MemoryPolicyOptions), server=server,
                         metrics_port=FLAGS.metrics_port, distributed=_pick(DistributedOptions))


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
                        hbm_fraction=c.hbm_fraction, max_model_len=c.max_model_len, scheduler=sched, warmup=False)


def build_cluster(opts: LaunchOptions, oplog=None):
    """Loads the model once into host memory and places one sharded replica per instance."""
    import jax
    import numpy as np

    from kunjax.runtime.cluster import ServingCluster
    from kunjax.io.loader import load_model, parse_dtype

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
    host = load_model(opts.model.model, dtype, place=lambda a: np.asarray(a).astype(dtype))
    cluster = ServingCluster.build(host, engine_config(opts), opts.cluster.num_instances, opts.cluster.tp,
                                   devices=devices, oplog=oplog)
    if opts.scheduler.warmup:  # the covering shapes are compiled; the cheaper ones follow while serving
        cluster.compile_in_background()
    return cluster


async def serve(opts: LaunchOptions, cluster, follower_channel=None) -> None:
    import asyncio
    import signal

    from serving.metrics import Metrics
    from serving.server import KunjaxServer

    metrics = Metrics()
    if opts.metrics_port:
        metrics.serve(opts.metrics_port)
        logging.info("metrics on port %d", opts.metrics_port)
    server = KunjaxServer(cluster, opts.server, metrics, model_name=opts.model.model)
    port = await server.start()
    print(f"kunjax serving {opts.model.model} on port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.info("shutting down (grace %.1fs; a second SIGTERM/SIGINT aborts in-flight requests now)",
                 opts.server.shutdown_grace_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.abort_inflight)
    await server.stop()
    if follower_channel is not None:
        follower_channel.close()
    print("kunjax server stopped", flush=True)


def main(argv) -> None:
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(FLAGS.log_level)
    opts = options_from_flags()
    configure_devices(opts.cluster, opts.distributed)
    import jax

    from kunjax.runtime.jax_setup import configure_jax

    configure_jax(opts.scheduler.compilation_cache_dir)
    d = opts.distributed
    if d.enabled:
        from sharding import multihost

        multihost.initialize(d.coordinator_address, d.num_processes, d.process_id, d.cpu_collectives)
    logging.info("devices: %s", jax.devices())
    import asyncio

    if not d.enabled:
        cluster = build_cluster(opts)
        asyncio.run(serve(opts, cluster))
        return
    from sharding import multihost

    port = d.control_port or multihost.default_control_port(d.coordinator_address)
    if d.process_id == 0:
        channel = multihost.ControllerChannel(port, d.num_processes - 1)
        cluster = build_cluster(opts, oplog=channel)
        channel.accept()
        asyncio.run(serve(opts, cluster, channel))
    else:
        channel = multihost.FollowerChannel(d.coordinator_address.rsplit(":", 1)[0], port)
        cluster = build_cluster(opts)
        multihost.follow(cluster, channel)
        print("kunjax follower stopped", flush=True)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
