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
from kunjax.control.events import EventLog
from kunjax.control.ops import DeviceOp
from kunjax.io.loader import LoadedModel
from kunjax.memory import measure as memory
from kunjax.runtime import compile_stats
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.runtime.executables import BackgroundCompiler

log = logging.getLogger(__name__)

COMPILE_PLAN = "compile_plan"


class ServingCluster(Cluster):
    """A Cluster whose units are LLMEngine instances and, after a parameter drop, pipeline groups
    (kunjax.memory): `plan_drop` / `drop` / `restore` drive the mechanism."""

    chunk_pages = 64  # pages moved per compiled gather / scatter call during a KV exchange
    max_group_size = 4  # the largest pipeline group the pool ladder is compiled for

    def __init__(self, engines: Sequence[LLMEngine], policy: Optional[DispatchPolicy] = None,
                 oplog: Optional[OpLog] = None):
        from kunjax.memory import drop, restore

        super().__init__(engines, engines[0], policy, oplog)
        self.engines: list[LLMEngine] = list(engines)  # the instances, whatever units they form
        self.compiler = BackgroundCompiler()
        self._group_ids = 0
        self.last_transition = None  # the report of the last drop or restore
        self.drop_state = None  # the device side of a drop under way (kunjax.memory.drop.DropState)
        self.kunserve = None  # the automatic overload policy (enable_kunserve), None: recompute only
        self.cost_model = None  # kunjax.control.cost_model.CostModel of these devices (calibrated), if any
        self.tpot_slo_ms = None  # the lookahead micro-batches' bound on the time between tokens
        self.transition_counts = {"drops": 0, "restores": 0, "rolled_back": 0, "exchanged_bytes": 0,
                                  "local_bytes": 0, "padding_bytes": 0}
        # The cluster's own decisions and transitions (drop_decided, drop, restore_decided, restore,
        # rolled_back), beside each unit's overload log in Admin.Status, so a benchmark sees when an
        # overload was acted on and when the memory it freed became usable.
        self.events = EventLog()
        for kind, fn in ((drop.DROP_BEGIN, drop.execute_drop_begin), (drop.DROP_LAYERS, drop.execute_drop_layers),
                         (drop.DROP_FINISH, drop.execute_drop_finish), (drop.DROP_ROLLBACK, drop.execute_drop_rollback),
                         (restore.RESTORE_BEGIN, restore.execute_restore_begin),
                         (restore.RESTORE_LAYERS, restore.execute_restore_layers),
                         (restore.RESTORE_FINISH, restore.execute_restore_finish),
                         (COMPILE_PLAN, ServingCluster._execute_compile_plan)):
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
        self.compiler.shutdown()

    # ---- units and groups ------------------------------------------------------------------
    def next_group_id(self) -> int:
        self._group_ids += 1
        return self._group_ids - 1

    def replace_units(self, old: Sequence, new: Sequence) -> None:
        """`new` units take the place of `old` ones (a drop merges, a restore splits)."""
        at = min(self.units.index(u) for u in old)
        self.units = [u for u in self.units if u not in old]
        self.units[at:at] = list(new)

    def groups(self) -> list:
        from kunjax.memory.group import PipelineGroup

        return [u for u in self.units if isinstance(u, PipelineGroup)]

    def group(self, group_id: int):
        for g in self.groups():
            if g.id == group_id:
                return g
        raise ValueError(f"group: no pipeline group {group_id} (groups now: {[g.id for g in self.groups()]})")

    def forget(self, request_id: str) -> None:
        self._where.pop(request_id, None)

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

    def plan_drop(self, group_size: Optional[int] = 2):
        """A dry run: which instances merge, each stage's layer range, the group page count and the
        predicted peak per device. Changes nothing. `group_size` None: the group planner's choice
        (kunjax.control.planner: the smallest group around the most loaded instance whose pages cover
        its demand, stage ranges balanced by the cost model), groups of 2 when no plan covers it."""
        from kunjax.control.plan import PlanError, plan_drop

        if group_size is None:
            chosen = self._planner_choice()
            if chosen is not None:
                return chosen
            group_size = 2
        if not 2 <= group_size <= len(self.engines):
            raise PlanError(f"group_size must be between 2 and the number of instances ({len(self.engines)}), "
                            f"got {group_size}")
        alone = [i for i, e in enumerate(self.engines) if e in self.units]
        if len(alone) < group_size:
            raise PlanError(f"group_size {group_size}: only {len(alone)} instances serve on their own (the others are "
                            f"in pipeline groups); restore first", "FAILED_PRECONDITION")
        e0 = self.engines[0]
        useful = self.useful_pages()
        infos = self.member_infos()
        for i in alone:
            if any(b == 0 for b in infos[i].layer_bytes):
                raise PlanError(f"instance {i} is missing layers; restore first", "FAILED_PRECONDITION")
        return plan_drop([infos[i] for i in alone], group_size, e0.cfg.tie_word_embeddings, useful,
                         chunk_pages=self.chunk_pages, ladder=self.ladder())

    def useful_pages(self) -> int:
        """Pages an instance can ever use at once (max_num_seqs full-length sequences + the null page):
        the cap on what a plan gives a member."""
        e0 = self.engines[0]
        return e0.config.scheduler.max_num_seqs * e0.buckets.max_pages_per_seq + 1

    def _planner_choice(self):
        """The group planner's plan around the most loaded single instance, or None."""
        from kunjax.control.kunserve import KunserveConfig
        from kunjax.control.planner import GroupPlanner

        planner = self.kunserve.planner if self.kunserve is not None else None
        if planner is None:
            e0 = self.engines[0]
            useful = self.useful_pages()
            cfg = KunserveConfig().planner
            planner = GroupPlanner(dataclasses.replace(cfg, chunk_pages=self.chunk_pages, max_pages_per_instance=useful),
                                   e0.cfg.tie_word_embeddings, self.member_infos, ladder=self.ladder())
        views = self.views()
        singles = [v for v in views if not v.is_group]
        if len(singles) < 2:
            return None
        seed = max(singles, key=lambda v: (v.demand_pages - v.pages_total, -v.index))
        choice, _ = planner.plan(views, seed)
        return choice.plan if choice is not None else None

    def ladder(self) -> list[int]:
        """The group pool sizes a plan may use: compiled ahead (`compile_ladder`), so no drop ever
        waits for a compile. Fixed on first use from the instances' memory layout (at start-up)."""
        if getattr(self, "_ladder", None) is None:
            from kunjax.control.plan import pool_ladder

            e0 = self.engines[0]
            useful = self.useful_pages()
            infos = self.member_infos()
            self._ladder = pool_ladder([infos[i] for i in sorted(infos)], e0.cfg.tie_word_embeddings,
                                       self.max_group_size, useful, self.chunk_pages)
        return self._ladder

    def ladder_keys(self) -> list[tuple]:
        """(executables, keys) of every ladder size on every instance: the first shapes' layer
        executables and the page moves in and out of both pool sizes."""
        from kunjax.runtime.executables import keys_for, pool_keys

        out = []
        for e in self.engines:
            keys = []
            for p in self.ladder():
                keys += [k for sh in e.first_shapes() for k in keys_for(sh, p, False, False)]
                keys += pool_keys(p, self.chunk_pages)
            keys += pool_keys(e.num_pages, self.chunk_pages)
            out.append((e.exes, list(dict.fromkeys(keys))))
        return out

    def compile_ladder(self, background: bool = True) -> None:
        """Compiles every ladder size (the launcher does so in the background after start-up)."""
        for ex, keys in self.ladder_keys():
            keys = [k for k in keys if not ex.is_ready(k)]
            if keys:
                self.compiler.submit(ex, keys) if background else ex.compile(keys)

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

    def start_drop(self, plan):
        """Starts a drop: a Task that runs piece by piece between the members' steps (they keep
        decoding; other units never notice). Returns the kunjax.memory.drop.DropTask."""
        from kunjax.memory.drop import DropError, DropTask

        ready, total = self.plan_ready(plan)
        if ready < total:
            raise DropError(f"the executables of this plan are not compiled yet ({ready} of {total} ready); "
                            f"compile_plan() first, or retry once the background compiler has them")
        if self.transitions():
            raise DropError("a drop or a restore is under way; one transition at a time")
        members = {id(self.engines[st.instance]) for gp in plan.groups for st in gp.stages}
        if any(id(u) in members for t in self.tasks for u in t.units):
            raise DropError("an instance of this plan is in a migration; retry when it has finished")
        for gp in plan.groups:
            for st in gp.stages:
                if getattr(self.engines[st.instance].scheduler, "swapped", None):
                    raise DropError(f"instance {st.instance} has requests swapped out to host memory; retry when "
                                    f"they are back")
        task = DropTask(self, plan)
        self.start_task(task)
        return task

    def start_restore(self, group_ids: Optional[Sequence[int]] = None) -> list:
        """Starts splitting groups back (all by default): one RestoreTask per group; the group keeps
        decoding between the pieces, every other unit never notices."""
        from kunjax.memory.drop import DropError
        from kunjax.memory.restore import RestoreTask, prepare_restore

        if self.transitions():
            raise DropError("a drop or a restore is under way; one transition at a time")
        tasks = []
        ids = list(group_ids) if group_ids is not None else [g.id for g in self.groups()]
        groups = [self.group(gid) for gid in ids]
        infos = self.member_infos()
        for group in groups:
            tasks.append(RestoreTask(self, group, prepare_restore(self, group, infos)))
        for t in tasks:
            self.start_task(t)
        return tasks

    def transitions(self) -> list:
        from kunjax.memory.drop import DropTask
        from kunjax.memory.restore import RestoreTask

        return [t for t in self.tasks if isinstance(t, (DropTask, RestoreTask))]

    def run_until_done(self, tasks) -> None:
        """Offline: steps the cluster until `tasks` are done; the outputs of the steps taken meanwhile
        come out of the next `step`/`poll`."""
        held = []
        while not all(t.done for t in tasks):
            held += self.step()
        self._ready_outputs = held + self._ready_outputs

    def drop(self, plan):
        """Offline: applies a drop plan (steps run meanwhile): returns (report, failed outputs)."""
        task = self.start_drop(plan)
        self.run_until_done([task])
        return task.report, task.outputs

    def restore(self, group_ids: Optional[Sequence[int]] = None):
        """Offline: splits groups back (all by default): returns (reports, failed outputs)."""
        tasks = self.start_restore(group_ids)
        self.run_until_done(tasks)
        return [t.report for t in tasks], [o for t in tasks for o in t.outputs]

    # ---- the automatic policy --------------------------------------------------------------
    def views(self):
        """The units' views with which instances each is made of (a group: its members and the
        pages they have once split), for dispatch and the overload policy."""
        from kunjax.control.kunserve import group_identity
        from kunjax.memory.group import PipelineGroup

        out = []
        for i, u in enumerate(self.units):
            if isinstance(u, PipelineGroup):
                out.append(u.view(i, **group_identity(u.plan, u.id), transitioning=u.routing is not None))
            else:
                out.append(u.view(i, instances=(self.engines.index(u),), transitioning=u.route is not None))
        return out

    def calibrate(self):
        """The cost model of these devices, fitted from timed null steps of instance 0 (and the
        bandwidth to instance 1): kunjax.runtime.calibrate."""
        from kunjax.runtime.calibrate import calibrate

        peer = self.engines[1].stage.exes.rep if len(self.engines) > 1 else None
        return calibrate(self.engines[0], peer=peer)

    def enable_kunserve(self, config, cost_model=None) -> None:
        """Turns the kunserve policy on: at every iteration it reads the views and starts drops and
        restores (one transition at a time; a plan is only offered once its executables, on the pool
        ladder, are compiled). Without a plan that covers the demand the schedulers' recompute
        preemption goes on (counted as a fallback)."""
        from kunjax.control.kunserve import KunservePolicy

        e0 = self.engines[0]
        useful = self.useful_pages()
        planner = dataclasses.replace(config.planner, chunk_pages=self.chunk_pages,
                             max_pages_per_instance=min(config.planner.max_pages_per_instance, useful))
        config = dataclasses.replace(config, planner=planner)

        def ready(plan) -> bool:
            done, total = self.plan_ready(plan)
            return done == total

        self.cost_model = cost_model
        self.tpot_slo_ms = config.tpot_slo_ms
        if cost_model is not None:
            self.on_step = self._observe_step
        self.kunserve = KunservePolicy.build(config, e0.cfg.tie_word_embeddings, self.member_infos, cost_model, ready)
        self.kunserve.planner.ladder = self.ladder()
        self.policy_hook = self._kunserve_tick

    def _observe_step(self, unit, op, seconds: float) -> None:
        """The cost model's prediction for an instance's step at its padded shape, against the time
        the step took from dispatch to landing (its running error: Status and metrics)."""
        from kunjax.control.batch import StepShape

        if unit in self.engines and op is not None and "shape" in op.args:
            self.cost_model.observe(self.cost_model.shape_time(StepShape(*op.args["shape"]), unit.cfg.num_layers),
                                    seconds)

    def _kunserve_tick(self) -> None:
        from kunjax.control.kunserve import DropDecision, RestoreDecision
        from kunjax.control.plan import PlanError
        from kunjax.memory.drop import DropError
        from kunjax.memory.restore import RestoreError

        if self.transitions():
            return  # one transition at a time; the policy decides again once it is done
        for d in self.kunserve.decide(self.views(), time.monotonic()):
            try:
                if isinstance(d, DropDecision) and d.plan is not None:
                    self.start_drop(d.plan)
                    self.events.record("drop_decided", seconds=float(d.numbers.get("over_s", 0.0)),
                                       tokens=int(d.numbers.get("group_demand_pages", 0)),
                                       target=d.plan.groups[0].instances[0])
                elif isinstance(d, RestoreDecision):
                    self.start_restore([d.group_id])
                    self.events.record("restore_decided", target=d.group_id)
            except (DropError, RestoreError, PlanError) as e:
                log.info("kunserve: %s not applied now: %s", type(d).__name__, e)
            if self.transitions():
                break

    def count_transition(self, report) -> None:
        """A finished drop or restore's figures, summed for Status and the metrics."""
        key = "rolled_back" if report.state == "rolled_back" else ("drops" if report.kind == "drop" else "restores")
        self.transition_counts[key] += 1
        self.events.record(report.kind if key != "rolled_back" else key, bytes=report.exchange.bytes_between_devices,
                           seconds=report.seconds, target=report.groups[0] if report.groups else -1)
        self.transition_counts["exchanged_bytes"] += report.exchange.bytes_between_devices
        self.transition_counts["local_bytes"] += report.exchange.bytes_local
        self.transition_counts["padding_bytes"] += report.exchange.bytes_padding

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
            st = e.stage
            inst.append({"id": i, "devices": [str(d) for d in e.devices], "tp": e.tp, **host,
                         "group": g[0].id if g else -1,
                         "layers": [min(st.layers), max(st.layers) + 1] if st.layers else [0, 0]})
        out = {
            "instances": inst, "groups": groups,
            "running": sum(s["running"] for s in units), "waiting": sum(s["waiting"] for s in units),
            "pages_total": sum(s["pages_total"] for s in units), "pages_free": sum(s["pages_free"] for s in units),
            "pages_used": sum(s["pages_used"] for s in units), "timing": self.timing.as_dict(),
            "compiles": compile_stats.compile_count(), "compiling": not self.compiler.idle(),
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
