"""The mechanism's host half over a cluster (plain Python, no JAX): groups as units, plans, the drop
and restore tasks, the kunserve policy's loop, the views that name which instances a unit is made of.

`MechanismCluster` is a Cluster whose instances can merge into pipeline groups and split again.
Every decision is made here; what is device work is a cluster operation (kunjax.control.ops) whose
handler a subclass registers: kunjax.runtime.cluster.ServingCluster runs JAX on device meshes and
reads the memory ledger; kunjax.sim.cluster.SimCluster advances simulated time. A subclass provides
`member_infos()` (what the planner knows of each instance) and `plan_ready(plan)` (whether a plan's
executables are compiled; a simulator's always are).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
from typing import Optional, Sequence

from kunjax.control.clock import UNIX
from kunjax.control.batch import StepShape, pick_shape
from kunjax.control.cluster import Cluster
from kunjax.control.events import EventLog
from kunjax.control.group import GroupCore
from kunjax.control.kunserve import DropDecision, KunserveConfig, KunservePolicy, RestoreDecision, group_identity
from kunjax.control.plan import PlanError, plan_drop, pool_ladder
from kunjax.control.planner import GroupPlanner
from kunjax.control.transition import DropError, DropTask, RestoreError, RestoreTask, prepare_restore

log = logging.getLogger(__name__)

GROUP_SHAPES = ("first", "on_demand", "all")  # MechanismCluster.group_shapes, the launcher's --group_shapes


def resolve_group_shapes(choice: str, accelerator: bool) -> str:
    """The launcher's --group_shapes=auto (its default): "on_demand" where the devices are
    accelerators, since a background compile runs on the host's cores while the devices go on
    serving; "first" on CPU devices, where every compile takes the very cores the instances step
    on (a decode-heavy burst on 4 x tp2 instances of a 10M Llama on 2 cores: kunserve's P99 TTFT
    0.54-0.60 s with first, 23.9 s with on_demand, whose 33 group shape compiles ran in the middle
    of the burst). Any other choice is returned as it is."""
    if choice == "auto":
        return "on_demand" if accelerator else "first"
    if choice not in GROUP_SHAPES:
        raise ValueError(f"group_shapes: {choice!r} is not one of auto, {', '.join(GROUP_SHAPES)}")
    return choice


def next_group_shape(needs: dict, buckets, ready, exclude=()) -> Optional[StepShape]:
    """The shape to compile next for a group: among the buckets' shapes neither ready nor in
    `exclude`, the one that saves the most padded work over the group's needs (`needs`: needed
    shape -> steps that ran padded for it; StepShape.cost the measure of work): for every need it
    covers more cheaply than the cheapest ready shape does, those steps x the cost saved. A shape a
    little larger than one need can save more by covering several (a growing decode batch); None
    when nothing would save anything."""
    cur = {}
    for n in needs:
        if not ready(n):
            cover = pick_shape(n, buckets, ready)
            if cover is not None:
                cur[n] = cover.cost()
    best, gain = None, 0
    for s in buckets.all_shapes():
        if s in exclude or ready(s):
            continue
        g = sum(needs[n] * (c - s.cost()) for n, c in cur.items() if s.cost() < c and s.covers(n))
        if g > gain:
            best, gain = s, g
    return best


class MechanismCluster(Cluster, abc.ABC):
    chunk_pages = 64  # pages moved per compiled gather / scatter call during a KV exchange
    max_group_size = 4  # the largest pipeline group the pool ladder is compiled for
    # The step shapes a pipeline group's pools get (GROUP_SHAPES): "first", the pool ladder's first
    # shapes only (a group step needing another runs padded to a covering one); "on_demand", as first,
    # and padded steps make the cluster compile the shapes that save the most padded work, in the
    # background, later steps running them when ready (want_group_shape); "all", the ladder sizes
    # compile every shape in the background from start-up (slow where compiling is: an hour on this
    # CPU). The launcher's
    # --group_shapes sets it (default on_demand); a cluster built in code pads, as it compiles nothing
    # in the background unless asked.
    group_shapes = "first"

    def __init__(self, engines: Sequence, frontend, policy=None, oplog=None, clock=None):
        super().__init__(engines, frontend, policy, oplog, clock)
        self.engines = list(engines)  # the instances, whatever units they form
        self._group_ids = 0
        self.last_transition = None  # the report of the last drop or restore
        self.kunserve = None  # the automatic overload policy (enable_kunserve), None: recompute only
        self.cost_model = None  # kunjax.control.cost_model.CostModel of these devices (calibrated), if any
        self.tpot_slo_ms = None  # the lookahead micro-batches' bound on the time between tokens
        self.transition_counts = {"drops": 0, "restores": 0, "rolled_back": 0, "exchanged_bytes": 0,
                                  "local_bytes": 0, "padding_bytes": 0}
        # The cluster's own decisions and transitions (drop_decided, drop, restore_decided, restore,
        # rolled_back), beside each unit's overload log in Admin.Status, so a benchmark sees when an
        # overload was acted on and when the memory it freed became usable.
        self.events = EventLog(clock=UNIX if clock is None else clock)
        self.wanted_group_shapes: list = []  # (instances, pool pages, StepShape) queued to compile, in order
        self._wanted = set()
        self._group_needs: dict = {}  # (instances, pool pages) -> {needed shape: steps that ran padded for it}
        self._settled: set = set()  # (instances, pool pages) where no shape would save padded work now

    # ---- what a subclass knows of its devices (the runtime's ServingCluster, the simulator's SimCluster)
    @abc.abstractmethod
    def member_infos(self) -> dict:
        """Instance index -> kunjax.control.plan.MemberInfo (per device, as measured or modelled)."""

    @abc.abstractmethod
    def plan_ready(self, plan) -> tuple[int, int]:
        """(ready, total) executables of the plan."""

    @abc.abstractmethod
    def compile_group_shape(self, gp, shape) -> None:
        """Queues what a step of `shape` needs on every stage of the group of GroupPlan `gp` at its
        page count on the background compilers (never on the request path)."""

    @abc.abstractmethod
    def group_compiling(self, gp) -> bool:
        """A shape compile for the members of GroupPlan `gp` is under way."""

    @abc.abstractmethod
    def group_shape_ready(self, gp, shape) -> bool:
        """A step of `shape` can run on the group of GroupPlan `gp` (before the group exists too)."""

    # ---- group shapes on demand ----------------------------------------------------------------
    prewarm_shapes = 8  # shapes compiled for a group as its drop starts, from its members' steps

    def want_group_shape(self, group, needed, padded) -> None:
        """A micro-batch of `group` needing `needed` ran padded to `padded` (GroupCore.pick). With
        group_shapes "on_demand" the cluster counts, per (members, group pool size), the steps each
        needed shape ran padded, and whenever the group's compilers are idle queues the one shape
        that saves the most padded work over those needs (next_group_shape); the group's later
        steps take it once it is ready (pick_shape prefers the cheapest ready covering shape).
        Executables belong to a placement, so another group of the same size on other instances
        needs its own."""
        if self.group_shapes != "on_demand":
            return
        key = (tuple(group.plan.instances), group.num_pages)
        needs = self._group_needs.setdefault(key, collections.Counter())
        if needed not in needs:
            self._settled.discard(key)  # a new need: a shape may save something again
        needs[needed] += 1
        if key not in self._settled and not self.group_compiling(group.plan):
            self._queue_group_shapes(group.plan, needs, 1)

    def prewarm_group(self, gp) -> None:
        """As a drop starts (on_demand): the group it forms will first serve its members' requests,
        so the shapes that save the most padded work over the steps its members ran (their
        `shape_counts`) are queued for it now, `prewarm_shapes` of them; the drop's pieces take
        seconds, in which the first of them compile."""
        if self.group_shapes != "on_demand":
            return
        needs = collections.Counter()
        for i in gp.instances:
            needs.update(getattr(self.engines[i], "shape_counts", {}))
        self._group_needs[(tuple(gp.instances), gp.num_pages)] = needs
        self._queue_group_shapes(gp, needs, self.prewarm_shapes)

    def group_prewarmed(self, gp) -> bool:
        """The first shape `prewarm_group` queued for the group of `gp` (the one its members ran
        most) is ready, or nothing compiles for it any more, or none was queued. A drop forms its
        group only then: its atoms can be over in milliseconds, and a group formed before its first
        shape is compiled would run its members' steps padded or hold its prefills, where the
        members, still instances, serve at full speed meanwhile."""
        key = (tuple(gp.instances), gp.num_pages)
        first = next((w[2] for w in self.wanted_group_shapes if w[:2] == key), None)
        return first is None or self.group_shape_ready(gp, first) or not self.group_compiling(gp)

    def _queue_group_shapes(self, gp, needs, k: int) -> None:
        key = (tuple(gp.instances), gp.num_pages)
        buckets = self.engines[gp.instances[0]].buckets
        chosen: list = []
        queued = {w[2] for w in self._wanted if w[:2] == key}

        def ready(s) -> bool:
            return s in chosen or self.group_shape_ready(gp, s)

        for _ in range(k):
            shape = next_group_shape(needs, buckets, ready, queued)
            if shape is None:  # nothing saves anything: not asked again until a new need comes
                self._settled.add(key)
                break
            chosen.append(shape)
        for shape in chosen:
            self._wanted.add((*key, shape))
            self.wanted_group_shapes.append((*key, shape))
            log.info("pipeline group of instances %s (%d pages): compiling %s in the background", list(gp.instances),
                     gp.num_pages, shape)
            self.compile_group_shape(gp, shape)

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
        return [u for u in self.units if isinstance(u, GroupCore)]

    def group(self, group_id: int):
        for g in self.groups():
            if g.id == group_id:
                return g
        raise ValueError(f"group: no pipeline group {group_id} (groups now: {[g.id for g in self.groups()]})")

    def forget(self, request_id: str) -> None:
        self._where.pop(request_id, None)

    def plan_drop(self, group_size: Optional[int] = 2):
        """A dry run: which instances merge, each stage's layer range, the group page count and the
        predicted peak per device. Changes nothing. `group_size` None: the group planner's choice
        (kunjax.control.planner: the smallest group around the most loaded instance whose pages cover
        its demand, stage ranges balanced by the cost model), groups of 2 when no plan covers it."""
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
            e0 = self.engines[0]
            useful = self.useful_pages()
            infos = self.member_infos()
            self._ladder = pool_ladder([infos[i] for i in sorted(infos)], e0.cfg.tie_word_embeddings,
                                       self.max_group_size, useful, self.chunk_pages)
        return self._ladder

    def start_drop(self, plan):
        """Starts a drop: a Task that runs piece by piece between the members' steps (they keep
        decoding; other units never notice). Returns the kunjax.control.transition.DropTask."""
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
        for gp in plan.groups:
            self.prewarm_group(gp)
        return task

    def start_restore(self, group_ids: Optional[Sequence[int]] = None) -> list:
        """Starts splitting groups back (all by default): one RestoreTask per group; the group keeps
        decoding between the pieces, every other unit never notices."""
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
        out = []
        for i, u in enumerate(self.units):
            if isinstance(u, GroupCore):
                out.append(u.view(i, **group_identity(u.plan, u.id), transitioning=u.routing is not None))
            else:
                out.append(u.view(i, instances=(self.engines.index(u),),
                                  transitioning=getattr(u, "route", None) is not None))
        return out

    def enable_kunserve(self, config, cost_model=None) -> None:
        """Turns the kunserve policy on: at every iteration it reads the views and starts drops and
        restores (one transition at a time; a plan is only offered once its executables, on the pool
        ladder, are compiled). Without a plan that covers the demand the schedulers' recompute
        preemption goes on (counted as a fallback)."""
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
        self.kunserve = KunservePolicy.build(config, e0.cfg.tie_word_embeddings, self.member_infos, cost_model, ready)
        self.kunserve.planner.ladder = self.ladder()
        self.policy_hook = self._kunserve_tick

    def _kunserve_tick(self) -> None:
        if self.transitions():
            return  # one transition at a time; the policy decides again once it is done
        for d in self.kunserve.decide(self.views(), self.clock()):
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
