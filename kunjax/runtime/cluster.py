"""The serving cluster: the control-plane loop (kunjax.control.cluster) over instances on device meshes.

`ServingCluster.build` places one replica per instance on its own ("tp",) mesh, sizes every
instance's KV cache from measured memory (the activation reserve measured once, on the first
instance, and shared: the instances are alike), and compiles the shapes that cover every step before
it returns. The remaining, cheaper shapes compile in the background (`compile_in_background`) or
at once (`warmup`); a step never compiles on the request path, it takes the cheapest compiled shape
that covers it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from typing import Optional, Sequence

import jax

from kunjax.control.cluster import Cluster, DispatchPolicy, OpLog
from kunjax.io.loader import LoadedModel
from kunjax.memory import measure as memory
from kunjax.runtime import compile_stats
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.runtime.executables import BackgroundCompiler

log = logging.getLogger(__name__)


class ServingCluster(Cluster):
    """A Cluster whose units are LLMEngine instances (and, after a drop, pipeline groups)."""

    def __init__(self, engines: Sequence[LLMEngine], policy: Optional[DispatchPolicy] = None,
                 oplog: Optional[OpLog] = None):
        super().__init__(engines, engines[0], policy, oplog)
        self.engines: list[LLMEngine] = list(engines)  # the instances, whatever units they form
        self.compiler = BackgroundCompiler()

    @classmethod
    def build(cls, model: LoadedModel, config: EngineConfig, num_instances: int = 1, tp: int = 1,
              devices: Optional[Sequence[jax.Device]] = None, policy: Optional[DispatchPolicy] = None,
              oplog: Optional[OpLog] = None) -> "ServingCluster":
        """`model` params may be host (numpy) arrays: each instance places its own replica, sharded
        over its own ("tp",) mesh."""
        from sharding.mesh import instance_meshes
        from sharding.rules import validate_tp

        validate_tp(model.config, tp)
        meshes = instance_meshes(num_instances, tp, devices)
        if config.num_pages is None and config.hbm_bytes is None:
            local = [d for m in meshes for d in m.devices.flat if d.process_index == jax.process_index()]
            if local and local[0].platform == "cpu":  # the host's RAM is shared by the devices in use only
                config = dataclasses.replace(config, hbm_bytes=memory.cpu_default_budget(len(local)))
        engines: list[LLMEngine] = []
        reserve = None
        for i, mesh in enumerate(meshes):
            t0 = time.monotonic()
            eng = LLMEngine(model, config, mesh=mesh, reserve_bytes=reserve)
            reserve = getattr(eng, "reserve_bytes", None)
            engines.append(eng)
            log.info("instance %d on %s: %d KV pages, ready in %.1fs", i,
                     [str(d) for d in mesh.devices.flat], eng.num_pages, time.monotonic() - t0)
        return cls(engines, policy, oplog)

    # ---- compilation -----------------------------------------------------------------------
    def warmup(self, parallel: bool = True) -> int:
        """Compiles every bucket on every instance now; returns the compilations done. In one process
        the instances compile on threads (XLA compiles without the GIL). Multi-process runs go
        instance by instance, so every process compiles in the same order."""
        before = compile_stats.compile_count()
        if parallel and len(self.engines) > 1 and jax.process_count() == 1:
            workers = min(len(self.engines), os.cpu_count() or 1)
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="kunjax-warmup") as pool:
                list(pool.map(lambda e: e.warmup(), self.engines))
        else:
            for e in self.engines:
                e.warmup()
        return compile_stats.compile_count() - before

    def compile_in_background(self) -> None:
        """Queues every shape not compiled yet, cheapest first and instance by instance, on the
        background compiler; steps take them as they become ready."""
        for shape in self.engines[0].buckets.all_shapes():
            for e in self.engines:
                keys = [k for k in e.shape_keys([shape]) if not e.exes.is_ready(k)]
                if keys:
                    self.compiler.submit(e.exes, keys)

    # ---- status ----------------------------------------------------------------------------
    def devices(self) -> list[jax.Device]:
        return [d for e in self.engines for d in e.devices]

    def status(self, with_memory: bool = True) -> dict:
        out = super().status(with_memory)
        out["compiles"] = compile_stats.compile_count()
        out["compiling"] = not self.compiler.idle()
        if with_memory:
            local = [d for d in self.devices() if d.process_index == jax.process_index()]
            out["memory"] = [dataclasses.asdict(m) for m in memory.snapshot(local)]
        return out
