"""The simulated cluster: the real control plane (kunjax.control.mechanism over kunjax.control.cluster)
driven by a discrete-event clock, with simulated instances, groups, transitions and migrations.

Everything that decides is the serving code, unchanged: dispatch, the schedulers and their overload
policies (recompute, swap), the migration controller, the kunserve policy (monitor, planner, plan.py's
drop and restore planning), the drop and restore tasks (which layers a piece moves, which pages hold
data, where a request goes on a restore), lookahead micro-batches. What executes is simulated:

- a step lands at the time its unit's device model says (kunjax.sim.units); the loop advances the
  clock to the next landing or arrival and completes those steps (`Cluster.poll` then finishes them);
- a transition piece (the cluster operations `drop_*` / `restore_*` of kunjax.control.transition)
  moves the bytes the real piece would move, in the time they take on the link: the members' KV pages
  of the round's layers ((g-1)/g of them device to device, the owner's own copied locally) and, on a
  restore, the weights each member receives; like the real controller, which runs a piece
  synchronously, no unit is dispatched until the piece is done (`controller_free_at`);
- a migration copy (`migrate_copy`) moves its pages over the link between the two instances.

Links: "d2d" between devices of one node (NVLink), "network" between nodes (the devices of instance
i are i*tp .. i*tp+tp-1, `devices_per_node` a node).
"""

from __future__ import annotations

import collections

import concurrent.futures
import dataclasses
import heapq
import itertools
import logging
from typing import Optional, Sequence

from kunjax.control.clock import SimClock
from kunjax.control.cluster import DISPATCH_POLICIES
from kunjax.control.events import merge
from kunjax.control.group import group_scheduler
from kunjax.control.mechanism import MechanismCluster
from kunjax.control.migration import MIGRATE_COPY
from kunjax.control.ops import DeviceOp
from kunjax.control.overload import unit_policy
from kunjax.control.plan import DropPlan, MemberInfo
from kunjax.control.request import validate_prompt
from kunjax.control.transition import (DROP_BEGIN, DROP_FINISH, DROP_LAYERS, DROP_ROLLBACK, RESTORE_BEGIN,
                                       RESTORE_FINISH, RESTORE_LAYERS, TransitionReport, check_members)
from kunjax.model.config import ModelConfig
from kunjax.sim.hardware import Calibration, DeviceModel
from kunjax.sim.sharing import HostShare
from kunjax.sim.units import InstanceConfig, SimGroup, SimInstance, instance_pages

log = logging.getLogger(__name__)


class SimFrontend:
    """The model-level services a cluster needs, without a tokenizer (prompts are token ids)."""

    tokenizer = None

    def __init__(self, cfg: ModelConfig, max_model_len: int, usable_pages: int, page_size: int):
        self.cfg, self.max_model_len, self.usable_pages, self.page_size = cfg, max_model_len, usable_pages, page_size

    def encode(self, prompt: str) -> list[int]:
        raise ValueError("prompt: the simulator takes prompt token ids")

    encode_chat = encode

    def validate(self, prompt_token_ids, params) -> None:
        validate_prompt(prompt_token_ids, self.cfg.vocab_size)
        params.validate()
        n = len(prompt_token_ids) + params.max_tokens
        if n > self.max_model_len:
            raise ValueError(f"max_tokens {params.max_tokens} + prompt {len(prompt_token_ids)} tokens exceeds the "
                             f"context of {self.max_model_len} tokens")
        if -(-n // self.page_size) > self.usable_pages:
            raise ValueError(f"prompt + max_tokens needs more KV pages than an instance has ({self.usable_pages})")

    def detokenizer(self, ids):
        return None


@dataclasses.dataclass
class _DropState:
    plan: DropPlan
    groups: list
    report: TransitionReport


class SimCluster(MechanismCluster):
    def __init__(self, cfg: ModelConfig, calibration: Calibration, config: InstanceConfig, num_instances: int,
                 tp: int = 1, policy: str = "recompute", num_pages: Optional[int] = None,
                 hbm_bytes: Optional[int] = None, dtype_bytes: int = 2, hbm_fraction: float = 0.9,
                 dispatch: str = "most_free_pages"):
        """`num_instances` instances of `cfg` on tp devices each; `num_pages` per instance, else from the
        device's memory (`hbm_bytes`, default `hbm_fraction` of the device's HBM)."""
        clock = SimClock()
        self.device = DeviceModel(cfg, calibration, tp, dtype_bytes)
        self.budget = int(hbm_bytes or hbm_fraction * calibration.spec.hbm_bytes)
        sc = config.scheduler
        self.reserve = self.device.reserve_bytes(sc.max_num_batched_tokens, max(sc.max_num_seqs, sc.max_prefill_rows))
        pages = instance_pages(self.device, config, self.budget, self.reserve, num_pages)
        self.controller_free_at = 0.0
        # Virtual CPU devices: every step shares the host's cores with those in flight with it.
        self.host = HostShare(calibration.host_capacity) if calibration.shared_devices else None
        instances = [SimInstance(i, cfg, self.device, config, pages, unit_policy(policy), clock, self)
                     for i in range(num_instances)]
        if dispatch not in DISPATCH_POLICIES:
            raise ValueError(f"dispatch: {dispatch!r} is not one of {', '.join(DISPATCH_POLICIES)}")
        super().__init__(instances, SimFrontend(cfg, config.max_model_len, pages - 1, config.page_size),
                         DISPATCH_POLICIES[dispatch](), clock=clock)
        self.overlap_stages = calibration.overlap_stages
        self.group_shapes = config.group_shapes
        self.group_compile_s = config.group_compile_s
        self.all_groups: list[SimGroup] = []
        self.drop_state: Optional[_DropState] = None
        self._landings: list = []  # heap of (end, seq, future)
        self._seq = itertools.count()
        for kind, fn in ((DROP_BEGIN, SimCluster._drop_begin), (DROP_LAYERS, SimCluster._drop_layers),
                         (DROP_FINISH, SimCluster._drop_finish), (DROP_ROLLBACK, SimCluster._no_rollback),
                         (RESTORE_BEGIN, SimCluster._restore_begin), (RESTORE_LAYERS, SimCluster._restore_layers),
                         (RESTORE_FINISH, SimCluster._restore_finish), (MIGRATE_COPY, SimCluster._migrate_copy)):
            self.register_op(kind, fn)

    # ---- what the planner knows ----------------------------------------------------------------
    def member_infos(self) -> dict:
        d = self.device
        ps = self.engines[0].page_size
        return {e.index: MemberInfo(index=e.index, budget=self.budget,
                                    layer_bytes=tuple([d.layer_bytes()] * e.cfg.num_layers),
                                    embed_bytes=d.embed_bytes(), head_bytes=d.head_bytes(), other_bytes=0,
                                    reserve=self.reserve, page_layer_bytes=d.page_layer_bytes(ps),
                                    num_pages=e.num_pages, used_pages=e.allocator.num_used)
                for e in self.engines}

    def plan_ready(self, plan) -> tuple[int, int]:
        return 1, 1  # the ladder's first shapes: compiled at start-up, before the burst

    def group_compiling(self, gp) -> bool:
        return any(self.engines[i].compiler_free_at > self.clock() for i in gp.instances)

    def group_shape_ready(self, gp, shape) -> bool:
        return self.group_shape_ready_at(gp, shape) <= self.clock()

    def group_shape_ready_at(self, gp, shape) -> float:
        """When `shape` is compiled for GroupPlan `gp`'s pools on every member (0: the pool ladder's
        shapes, compiled at start-up; inf: not asked for)."""
        members = [self.engines[i] for i in gp.instances]
        if shape in members[0].group_compiled:
            return 0.0
        return max(m.group_ready_at.get((gp.num_pages, shape), float("inf")) for m in members)

    def compile_group_shape(self, gp, shape) -> None:
        """Each stage's group compiler (one per placement, as ServingCluster's) takes `group_compile_s`
        for the shape's layer executable at the group's page count, after what it has queued, unless
        that member has it already (from an earlier group of the same size)."""
        key = (gp.num_pages, shape)
        for i in gp.instances:
            m = self.engines[i]
            if key not in m.group_ready_at:
                m.compiler_free_at = max(self.clock(), m.compiler_free_at) + self.group_compile_s
                m.group_ready_at[key] = m.compiler_free_at

    # ---- links -------------------------------------------------------------------------------
    def link(self, a: int, b: int) -> str:
        """The link between instances a and b: "local" (the same), "d2d" (one node), "network"."""
        if a == b:
            return "local"
        per = self.device.spec.devices_per_node
        tp = self.device.tp
        return "d2d" if a * tp // per == b * tp // per else "network"

    def hold_controller(self, seconds: float) -> None:
        """A piece or a copy runs on the controller thread: no unit is dispatched until it is done."""
        self.controller_free_at = max(self.controller_free_at, self.clock()) + seconds

    def work_clock(self) -> float:
        """Past the pieces simulated so far: a piece holds the controller until it would be done."""
        return max(self.clock(), self.controller_free_at)

    def _piece(self, units, seconds: float, report: Optional[TransitionReport]) -> None:
        start = max([self.clock(), self.controller_free_at] + [u.free_at for u in units])
        for u in units:
            u.free_at = start + seconds
        self.controller_free_at = start + seconds
        if report is not None:
            report.exchange.seconds += seconds

    # ---- drop ----------------------------------------------------------------------------------
    def _drop_begin(self, op: DeviceOp) -> TransitionReport:
        plan = DropPlan.from_dict(op.args["plan"])
        groups = [check_members(self, gp) for gp in plan.groups]
        report = TransitionReport("drop", [])
        self.drop_state = _DropState(plan, groups, report)
        for members in groups:
            for m in members:
                m.route = "forming"
        return report

    def _drop_layers(self, op: DeviceOp) -> None:
        st = self.drop_state
        gi = int(op.args["group"])
        gp, members = st.plan.groups[gi], st.groups[gi]
        plb = self.device.page_layer_bytes(members[0].page_size)
        seconds = 0.0
        for l in op.args["layers"]:
            o = gp.owner_index(l)
            for j, m in enumerate(members):
                nbytes = len(op.arrays[f"{j}"]) * plb  # per device; the tp devices copy their shards at once
                link = self.link(m.index, members[o].index)
                seconds += self.device.transfer_time(nbytes, link)
                if link == "local":
                    st.report.exchange.bytes_local += nbytes * self.device.tp
                else:
                    st.report.exchange.bytes_between_devices += nbytes * self.device.tp
        self._piece(members, seconds, st.report)

    def _drop_finish(self, op: DeviceOp) -> TransitionReport:
        st = self.drop_state
        d = self.device
        for gp, members in zip(st.plan.groups, st.groups):
            gid = self.next_group_id()
            st.report.groups.append(gid)
            for sp, m in zip(gp.stages, members):
                m.num_pages = gp.num_pages
                m.kept_layers = (sp.start, sp.stop)
                m.embed_head_kept = (d.embed_bytes() if sp.embed else 0) + (d.head_bytes() if sp.head else 0)
                m.route = None
            group = SimGroup(gid, gp, members, group_scheduler(members, gp), self.overlap_stages)
            group.configure(self)
            self.all_groups.append(group)
            self.replace_units(members, [group])
        st.report.state = "done"
        self.last_transition, self.drop_state = st.report, None
        return st.report

    def _no_rollback(self, op: DeviceOp) -> TransitionReport:
        raise RuntimeError("a simulated drop piece never fails, so it never rolls back")

    # ---- restore -------------------------------------------------------------------------------
    def _restore_begin(self, op: DeviceOp) -> TransitionReport:
        group = self.group(int(op.args["group"]))
        report = TransitionReport("restore", [group.id])
        group.restoring = {"report": report}
        group.state = "restoring"
        return report

    def _restore_layers(self, op: DeviceOp) -> None:
        group = self.group(int(op.args["group"]))
        report = group.restoring["report"]
        plan, members = group.plan, group.members
        plb = self.device.page_layer_bytes(group.page_size)
        seconds = 0.0
        for l in op.args["layers"]:
            o = plan.owner_index(l)
            for j, m in enumerate(members):
                link = self.link(members[o].index, m.index)
                nbytes = len(op.arrays[f"{j}/src"]) * plb + (self.device.layer_bytes() if j != o else 0)
                seconds += self.device.transfer_time(nbytes, link)
                key = "bytes_local" if link == "local" else "bytes_between_devices"
                setattr(report.exchange, key, getattr(report.exchange, key) + nbytes * self.device.tp)
            group.restored.add(int(l))
        self._piece([group], seconds, report)

    def _restore_finish(self, op: DeviceOp) -> TransitionReport:
        group = self.group(int(op.args["group"]))
        report = group.restoring["report"]
        for m in group.members:
            m.num_pages = group.plan.pages_before[m.index]
            m.kept_layers = (0, m.cfg.num_layers)
            m.free_at = max(m.free_at, group.free_at)
        self.replace_units([group], group.members)
        group.state, group.restoring, group.restored = "split", None, set()
        report.state = "done"
        self.last_transition = report
        return report

    # ---- migration -----------------------------------------------------------------------------
    def _migrate_copy(self, op: DeviceOp) -> dict:
        src, dst = self.units[op.args["src"]], self.units[op.args["dst"]]
        nbytes = len(op.args["src_pages"]) * src.kv_page_bytes
        seconds = self.device.transfer_time(nbytes / self.device.tp, self.link(src.index, dst.index))
        self._piece([src, dst], seconds, None)
        return {"bytes": nbytes, "seconds": seconds}

    # ---- the loop ------------------------------------------------------------------------------
    def _watch(self, unit, handle) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if handle.end is None:  # on the shared cores: the host lands it
            self.host.add((unit, fut), handle.start, handle.seconds)
        else:
            heapq.heappush(self._landings, (handle.end, next(self._seq), fut))
        return fut

    def next_landing(self) -> Optional[float]:
        """When the next step lands (or, on shared cores, the next start that changes the landings)."""
        times = [self._landings[0][0]] if self._landings else []
        shared = self.host.next_event() if self.host is not None else None
        return min(times + ([] if shared is None else [shared]), default=None)

    def advance_to(self, t: float) -> None:
        """Moves the clock to `t` and lands every step that ends by then."""
        self.clock.advance_to(max(t, self.clock()))
        while self._landings and self._landings[0][0] <= self.clock():
            end, _, fut = heapq.heappop(self._landings)
            fut.set_result(end)
        if self.host is not None:
            for (unit, fut), end in self.host.advance(self.clock()):
                unit.free_at = max(unit.free_at, end)
                fut.set_result(end)

    # ---- what the benchmark's files show ---------------------------------------------------------
    def schedulers(self) -> list:
        """(instance id, scheduler) of every unit that ever ran: the instances, and every group."""
        out = [(e.index, e.scheduler) for e in self.engines]
        return out + [(g.members[0].index, g.scheduler) for g in self.all_groups]

    def counters(self) -> dict:
        """The schedulers' counters (Scheduler.counters), summed over the instances and the live
        groups (a split group's went into its first member's), and the bytes the swaps moved."""
        total = collections.Counter()
        for sch in [e.scheduler for e in self.engines] + [g.scheduler for g in self.groups()]:
            total.update(sch.counters())
        return {**{k: total[k] for k in ("preemptions", "recomputed_tokens", "swap_outs", "swap_ins",
                                          "migrations_out", "migrated_bytes")},
                "swapped_out_bytes": sum(e.swapped_out_bytes for e in self.engines),
                "swapped_in_bytes": sum(e.swapped_in_bytes for e in self.engines)}

    def event_rows(self, after: int = 0) -> list[dict]:
        """Every unit's overload log and the cluster's own (decisions, drops, restores), in order."""
        logs = [(i, sch.events) for i, sch in self.schedulers()] + [(-1, self.events)]
        return merge(logs, after)

    def sample(self) -> dict:
        views = self.views()
        return {"running": sum(v.running for v in views), "waiting": sum(v.waiting for v in views), "queued": 0,
                "pages_free": sum(v.pages_free for v in views), "pages_total": sum(v.pages_total for v in views),
                "swapped": sum(len(e.scheduler.swapped) for e in self.engines), "groups": len(self.groups()),
                "weights_bytes_per_device": [e.weight_bytes() for e in self.engines for _ in range(e.tp)][:64],
                **self.counters()}


def build(cfg: ModelConfig, calibration: Calibration, config: InstanceConfig, num_instances: int,
          tp: int, policy: str, num_pages: Optional[int] = None, hbm_bytes: Optional[int] = None,
          dtype_bytes: int = 2, kunserve=None, dispatch: str = "most_free_pages") -> SimCluster:
    """A simulated cluster running `policy` (recompute, swap, migrate, kunserve) the way the launcher
    sets it up: migrate installs the migration controller, kunserve the policy with a cost model
    fitted to the simulated devices (as the launcher calibrates the real ones)."""
    from kunjax.control import migration

    cluster = SimCluster(cfg, calibration, config, num_instances, tp, policy, num_pages, hbm_bytes, dtype_bytes,
                         dispatch=dispatch)
    if policy == "migrate":
        migration.install(cluster)
    if policy == "kunserve":
        cluster.max_group_size = kunserve.planner.max_group_size
        cluster.enable_kunserve(kunserve, fitted_cost_model(cluster))
    return cluster


def fitted_cost_model(cluster: SimCluster):
    """The control plane's linear cost model (kunjax.control.cost_model), fitted to the simulated
    device on every shape an instance can run, as kunjax.runtime.calibrate fits it to real steps."""
    from kunjax.control.cost_model import StepSample, fit, shape_work

    e0 = cluster.engines[0]
    d = cluster.device
    samples = []
    for shape in e0.buckets.all_shapes():
        work = shape_work(shape.rows, shape.query, shape.pages)
        full = [(shape.query, shape.pages * e0.page_size)] * shape.rows  # rows of the shape's whole context
        rows = full if e0.config.paged_attention else None
        for layers, head in ((d.cfg.num_layers, True), (max(1, d.cfg.num_layers // 2), True),
                             (d.cfg.num_layers, False)):
            samples.append(StepSample(**work, layers=layers, head=head,
                                      seconds=d.step_time(shape, e0.page_size, layers=layers, head=head,
                                                          rows=rows)))
    links = {k: d.link_bandwidth(k) for k in ("d2d", "local", "host", "network")}
    return fit(samples, links)


def replay(cluster: SimCluster, arrivals: Sequence, sample_interval: float = 0.25, memory_every: int = 8):
    """Sends every arrival at its time (prompt token ids of its length, ignore_eos, max_tokens its
    output length) and runs the cluster until every request has finished. Returns the per-request
    results (tools.load_gen.Result, as the real benchmark's client records them), the timeline
    samples and the duration, all in simulated seconds from the first arrival."""
    from kunjax.control.request import SamplingParams
    from kunjax.control.scheduler import QueueFull
    from tools.load_gen import Result

    results = [Result(ok=False, input_len=a.input_len, index=i, max_tokens=a.output_len) for i, a in enumerate(arrivals)]
    by_id: dict[str, Result] = {}
    samples = []
    clock = cluster.clock
    i, next_sample, k, idle = 0, 0.0, 0, 0
    while True:
        now = clock()
        while i < len(arrivals) and arrivals[i].t <= now:
            a, r = arrivals[i], results[i]
            r.send_t, r.request_id = a.t, f"sim-{i}"
            try:
                cluster.add_request([TOKEN_ID] * a.input_len, SamplingParams(max_tokens=a.output_len, ignore_eos=True),
                                    request_id=r.request_id, arrival_time=a.t)
                r.instance = cluster.instance_of(r.request_id)
                by_id[r.request_id] = r
            except (ValueError, QueueFull) as e:
                r.error, r.error_message, r.finish_t = type(e).__name__, str(e), a.t
            i += 1
        outs = cluster.poll()
        for o in outs:
            r = by_id.get(o.request_id)
            if r is None:
                continue
            r.token_times += [now] * len(o.new_token_ids)
            if o.queue_s is not None:
                r.server_queue_ms = 1e3 * o.queue_s
            if o.ttft_s is not None and r.server_ttft_ms is None:
                r.server_ttft_ms = 1e3 * o.ttft_s
            if o.finished:
                r.finish_t, r.finish_reason = now, o.finish_reason or ""
                r.ok = o.finish_reason in ("length", "stop")
                del by_id[o.request_id]
        busy = cluster.has_unfinished() or i < len(arrivals)
        if now >= next_sample:
            samples.append({"t_s": round(now, 4), **cluster.sample()})
            if memory_every > 1 and k % memory_every:
                samples[-1]["weights_bytes_per_device"] = None
            k += 1
            next_sample = now + sample_interval
        if not busy:
            break
        candidates = [t for t in (cluster.next_landing(), arrivals[i].t if i < len(arrivals) else None,
                                  next_sample) if t is not None]
        if cluster.tasks and not cluster.num_inflight():
            nxt = max(now, cluster.controller_free_at)  # a task advances at the next poll
        elif cluster.next_landing() is None and i >= len(arrivals):
            idle += 1
            if idle > 3:  # nothing in flight, nothing to come, yet work left: nothing can move it
                for r in by_id.values():
                    r.error, r.error_message, r.finish_t = "STALLED", "the simulated cluster stalled", now
                break
            nxt = now
        else:
            nxt = min(candidates)
        if cluster.num_inflight() or i < len(arrivals):
            idle = 0
        cluster.advance_to(nxt)
    eff = cluster.device.eff  # what the serving path adds to what a client sees (calibrated)
    for r in results:
        if r.token_times:
            r.token_times = [t + eff.first_token_latency_s for t in r.token_times]
            r.finish_t = r.token_times[-1]
        r.set_derived()
    end = max([r.finish_t or 0.0 for r in results] + [0.0])
    return results, samples, end


TOKEN_ID = 11  # prompt token ids of a simulated request (any id of the vocabulary does)
