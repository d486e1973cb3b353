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

from kunjax.control.cluster import DispatchPolicy, OpLog
from kunjax.control.mechanism import MechanismCluster
from kunjax.control.ops import DeviceOp
from kunjax.io.loader import LoadedModel
from kunjax.memory import measure as memory
from kunjax.runtime import compile_stats
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.runtime.executables import BackgroundCompiler

log = logging.getLogger(__name__)

COMPILE_PLAN = "compile_plan"
COMPILE_GROUP_SHAPE = "compile_group_shape"


class ServingCluster(MechanismCluster):
    """A Cluster whose units are LLMEngine instances and, after a parameter drop, pipeline groups
    (kunjax.memory): `plan_drop` / `drop` / `restore` drive the mechanism."""

    def __init__(self, engines: Sequence[LLMEngine], policy: Optional[DispatchPolicy] = None,
                 oplog: Optional[OpLog] = None):
        from kunjax.memory import drop, restore

        super().__init__(engines, engines[0], policy, oplog)
        self.engines: list[LLMEngine]
        self.compiler = BackgroundCompiler()
        # One more per placement for the group shapes steps ask for (compile_group_shape): they do not
        # wait behind the start-up queue of `compiler`, and a group's stages compile side by side.
        self.group_compilers: dict[int, BackgroundCompiler] = {}
        self.drop_state = None  # the device side of a drop under way (kunjax.memory.drop.DropState)
        for kind, fn in ((drop.DROP_BEGIN, drop.execute_drop_begin), (drop.DROP_LAYERS, drop.execute_drop_layers),
                         (drop.DROP_FINISH, drop.execute_drop_finish), (drop.DROP_ROLLBACK, drop.execute_drop_rollback),
                         (restore.RESTORE_BEGIN, restore.execute_restore_begin),
                         (restore.RESTORE_LAYERS, restore.execute_restore_layers),
                         (restore.RESTORE_FINISH, restore.execute_restore_finish),
                         (COMPILE_PLAN, ServingCluster._execute_compile_plan),
                         (COMPILE_GROUP_SHAPE, ServingCluster._execute_compile_group_shape)):
            self.register_op(kind, fn)

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

    def close(self) -> None:
        """Before the process exits: stops the background compiler (queued work dropped, the compile
        in progress finished)."""
        for c in [self.compiler, *self.group_compilers.values()]:
            c.shutdown()

    # ---- the mechanism: plan, compile, drop, restore ---------------------------------------
    def member_infos(self) -> dict:
        """What the planner knows of each instance, per device, from the memory ledger."""
        from kunjax.memory.ledger import device_ledgers
        from kunjax.control.plan import MemberInfo
        from kunjax.runtime.kv_pools import page_bytes

        first = {}
        for led in device_ledgers(self.engines):
            first.setdefault(led.instance, led)
        infos = {}
        for i, e in enumerate(self.engines):
            led = first[i]
            if e.budget is None:
                raise ValueError("the memory budget of this device is unknown; start with --hbm_bytes")
            infos[i] = MemberInfo(
                index=i, budget=e.budget,
                layer_bytes=tuple(led.layers.get(l, 0) for l in range(e.cfg.num_layers)),
                embed_bytes=led.embed, head_bytes=led.head, other_bytes=led.other, reserve=led.reserve,
                page_layer_bytes=page_bytes(e.cfg, e.page_size, e.dtype, 1) // e.tp,
                num_pages=e.stage.num_pages, used_pages=e.allocator.num_used)
        return infos

    def ladder_keys(self, all_shapes: bool = False) -> list[tuple]:
        """(executables, keys) of every ladder size on every instance: the first shapes' layer
        executables (`all_shapes`: every shape's) and the page moves in and out of both pool sizes.
        Only a layer's executable depends on the pool size; embedding and head are the instance's."""
        from kunjax.runtime.executables import keys_for, pool_keys

        out = []
        for e in self.engines:
            keys = []
            for p in self.ladder():
                shapes = e.buckets.all_shapes() if all_shapes else e.first_shapes()
                keys += [k for sh in shapes for k in keys_for(sh, p, False, False)]
                keys += pool_keys(p, self.chunk_pages)
            keys += pool_keys(e.num_pages, self.chunk_pages)
            out.append((e.exes, list(dict.fromkeys(keys))))
        return out

    def compile_ladder(self, background: bool = True, all_shapes: bool = False) -> None:
        """Compiles every ladder size (the launcher does so in the background after start-up);
        `all_shapes`: then every shape at every ladder size (--group_shapes=all), after the first
        shapes of every size, so a drop is possible as early as without it, and on each
        placement's own group compiler, so the instances compile theirs side by side."""
        for rnd in ((False, True) if all_shapes else (False,)):
            for ex, keys in self.ladder_keys(all_shapes=rnd):
                keys = [k for k in keys if not ex.is_ready(k)]
                if not keys:
                    continue
                if not background:
                    ex.compile(keys)
                else:
                    (self.group_compilers.setdefault(id(ex), BackgroundCompiler()) if rnd else self.compiler).submit(
                        ex, keys)

    def group_shape_keys(self, gp, shape) -> list[tuple]:
        """(executables, keys) a step of `shape` needs on each stage of the group of GroupPlan `gp`
        at its page count (the stage's member's placement), the ones not compiled yet."""
        from kunjax.runtime.executables import keys_for

        out = []
        for st in gp.stages:
            ex = self.engines[st.instance].exes
            keys = [k for k in keys_for(shape, gp.num_pages, st.embed, st.head) if not ex.is_ready(k)]
            if keys:
                out.append((ex, keys))
        return out

    def group_shape_ready(self, gp, shape) -> bool:
        return not self.group_shape_keys(gp, shape)

    def compile_group_shape(self, gp, shape) -> None:
        """MechanismCluster's on-demand group shapes, device half: on each stage's own group compiler
        (a stage's compile never waits for another's, nor for the start-up queue of `compiler`). A
        logged operation, so every process of a multi-host cluster queues the same compiles on its
        own compilers (a follower that reaches a step before its compile is done compiles the
        shape there, in PipelineGroup.execute, as for any shape the controller had ready first)."""
        self.run_op(DeviceOp(COMPILE_GROUP_SHAPE, -1, {"group_plan": gp.to_dict(),
                                                       "shape": [shape.rows, shape.query, shape.pages]}))

    def _execute_compile_group_shape(self, op: DeviceOp) -> None:
        from kunjax.control.batch import StepShape
        from kunjax.control.plan import GroupPlan

        gp = GroupPlan.from_dict(op.args["group_plan"])
        for ex, keys in self.group_shape_keys(gp, StepShape(*op.args["shape"])):
            self.group_compilers.setdefault(id(ex), BackgroundCompiler()).submit(ex, keys)

    def group_compiling(self, gp) -> bool:
        return any(not c.idle() for c in (self.group_compilers.get(id(self.engines[i].exes)) for i in gp.instances)
                   if c is not None)

    def compilers_idle(self) -> bool:
        return all(c.idle() for c in [self.compiler, *self.group_compilers.values()])

    def plan_keys(self, plan, shapes=None) -> list[tuple]:
        """(executables, keys) every process needs before it can apply `plan`, serve grouped, and
        restore: the group's step pieces at its page count (`shapes`: default the covering ones) and
        the page moves in and out of both pool sizes."""
        from kunjax.runtime.executables import keys_for, pool_keys

        out = []
        for gp in plan.groups:
            for st in gp.stages:
                e = self.engines[st.instance]
                keys = [k for sh in (shapes or e.first_shapes())
                        for k in keys_for(sh, gp.num_pages, st.embed, st.head)]
                keys += pool_keys(gp.num_pages, self.chunk_pages) + pool_keys(e.stage.num_pages, self.chunk_pages)
                out.append((e.exes, keys))
        return out

    def plan_ready(self, plan) -> tuple[int, int]:
        """(ready, total) executables of the plan."""
        pairs = self.plan_keys(plan)
        total = sum(len(k) for _, k in pairs)
        return sum(1 for ex, keys in pairs for k in keys if ex.is_ready(k)), total

    def compile_plan(self, plan, background: bool = True, all_shapes: bool = False) -> None:
        """Compiles what `plan` needs: on the background compiler (the server keeps answering), or now.
        A logged operation, so every process of a multi-host cluster compiles the same executables."""
        self.run_op(DeviceOp(COMPILE_PLAN, -1, {"plan": plan.to_dict(), "background": background,
                                                "all_shapes": all_shapes}))

    def _execute_compile_plan(self, op: DeviceOp) -> None:
        from kunjax.control.plan import DropPlan

        plan = DropPlan.from_dict(op.args["plan"])
        shapes = self.engines[0].buckets.all_shapes() if op.args["all_shapes"] else None
        for ex, keys in self.plan_keys(plan, shapes):
            keys = [k for k in keys if not ex.is_ready(k)]
            if not keys:
                continue
            if op.args["background"]:
                self.compiler.submit(ex, keys)
            else:
                ex.compile(keys)

    def enable_kunserve(self, config, cost_model=None) -> None:
        """MechanismCluster.enable_kunserve; a cost model also observes every instance step."""
        super().enable_kunserve(config, cost_model)
        if cost_model is not None:
            self.on_step = self._observe_step

    def calibrate(self):
        """The cost model of these devices, fitted from timed null steps of instance 0 (and the
        bandwidth to instance 1): kunjax.runtime.calibrate."""
        from kunjax.runtime.calibrate import calibrate

        peer = self.engines[1].stage.exes.rep if len(self.engines) > 1 else None
        return calibrate(self.engines[0], peer=peer)

    def _observe_step(self, unit, op, seconds: float) -> None:
        """The cost model's prediction for an instance's step at its padded shape, against the time
        the step took from dispatch to landing (its running error: Status and metrics)."""
        from kunjax.control.batch import StepShape

        if unit in self.engines and op is not None and "shape" in op.args:
            self.cost_model.observe(self.cost_model.shape_time(StepShape(*op.args["shape"]), unit.cfg.num_layers),
                                    seconds)

    # ---- status ----------------------------------------------------------------------------
    def devices(self) -> list[jax.Device]:
        return [d for e in self.engines for d in e.devices]

    def status(self, with_memory: bool = True) -> dict:
        units = [u.status() for u in self.units]
        group_of = {}
        groups = []
        for g in self.groups():
            ids = [self.engines.index(m) for m in g.members]
            groups.append(g.group_status(ids))
            group_of.update({i: (g, len(groups) - 1) for i in ids})
        inst = []
        for i, e in enumerate(self.engines):
            g = group_of.get(i)
            host = (g[0] if g else e).host_status()
            if g:  # a member's counters: its own, and the group's once (on its first member)
                own = e.scheduler.counters()
                host.update({k: v + host[k] for k, v in own.items()} if e is g[0].members[0] else own)
            st = e.stage
            inst.append({"id": i, "devices": [str(d) for d in e.devices], "tp": e.tp, **host,
                         "group": g[0].id if g else -1,
                         "layers": [min(st.layers), max(st.layers) + 1] if st.layers else [0, 0]})
        out = {
            "instances": inst, "groups": groups,
            "running": sum(s["running"] for s in units), "waiting": sum(s["waiting"] for s in units),
            "pages_total": sum(s["pages_total"] for s in units), "pages_free": sum(s["pages_free"] for s in units),
            "pages_used": sum(s["pages_used"] for s in units), "timing": self.timing.as_dict(),
            "compiles": compile_stats.compile_count(), "compiling": not self.compilers_idle(),
            "transitions": [{"kind": t.report.kind, "groups": list(t.report.groups), "pieces": t.report.pieces,
                             "seconds": t.report.seconds} for t in self.transitions()],
            "transition_counts": dict(self.transition_counts),
            "events": self.events,
            "overload_policy": self.kunserve.status() if self.kunserve is not None else {"overload_policy": "recompute"},
        }
        if with_memory:
            from kunjax.memory.ledger import device_ledgers

            out["memory"] = [led.as_dict() for led in device_ledgers(self.engines)]
        return out
