"""Drop and restore plans: which instances merge, who keeps which layers, how many KV pages the group
gets, and the memory of every device through the transition (plain Python, no JAX).

A group of g instances becomes one pipeline of g stages. Stage s keeps a contiguous layer range
(given explicitly, e.g. balanced by the cost model (kunjax.control.planner), or by default sizes as
equal as possible; the layers the division leaves over go to the last stages, since the first one
also keeps the embedding), the first stage keeps the embedding, the head (final norm + LM
head) stays on the last stage, or on the first when it is the tied embedding (one copy of every
weight per group, as KunServe intends). The group serves one page-id space: stage s holds, for each
of its layers, a pool of `num_pages` pages.

The page count is the largest for which (1) every member fits its budget in the steady state, with
the activation reserve kept free, and (2) the predicted peak of the transition fits the budget on
every device (no step runs during the transition, so the reserve is usable then). The transition
is simulated event by event, in the order `kunjax.memory.drop` carries it out:

    drop:    each member frees the weights it gives up; then, layer by layer (interleaved over the
             stages), the owner allocates the layer's group pools, every member copies its requests'
             pages of that layer into them (in chunks of `chunk_pages` pages), and every member
             deletes its old pools of that layer.
    restore: first every group pool shrinks, layer by layer, to the pages the split instances can
             hold together (the room beyond is released before any restored layer arrives); then
             layer by layer every member allocates the layer's instance pools (and receives the
             weights it lacks), the owner copies each request's pages into its target member's
             pools and deletes its compact pool of that layer; embedding and head last.

Numbers are bytes per device (an instance's devices are alike: tp shards are equal).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence


@dataclasses.dataclass(frozen=True)
class MemberInfo:
    """What the planner knows of one instance, per device (from the ledger: measured arrays)."""

    index: int
    budget: int
    layer_bytes: tuple[int, ...]  # weights of each layer
    embed_bytes: int
    head_bytes: int  # final norm + lm_head (the final norm only when tied to the embedding)
    other_bytes: int  # live bytes that are neither weights nor KV pools
    reserve: int  # activation reserve of a step
    page_layer_bytes: int  # one page of one layer, K and V
    num_pages: int  # pages of its pools now (incl. the null page)
    used_pages: int  # pages its requests hold


@dataclasses.dataclass(frozen=True)
class StagePlan:
    instance: int
    start: int  # first layer
    stop: int  # one past the last layer
    embed: bool
    head: bool

    @property
    def num_layers(self) -> int:
        return self.stop - self.start

    def holds(self, layer: int) -> bool:
        return self.start <= layer < self.stop


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    instances: tuple[int, ...]
    stages: tuple[StagePlan, ...]
    num_pages: int  # pages of every group pool (the group's page space, incl. the null page)
    pages_before: dict[int, int]  # member -> pages of its pools before (every layer)
    peak_bytes: dict[int, int]  # member -> predicted peak bytes per device during the drop
    steady_bytes: dict[int, int]  # member -> bytes per device once grouped (reserve excluded)
    layer_order: tuple[int, ...]  # the order the transition handles the layers in
    tied: bool
    atoms: tuple[tuple[int, ...], ...] = ()  # the drop's atoms (drop_atoms); () = whole rounds

    def drop_atoms(self) -> list[list[int]]:
        """The layers each atom of the drop moves, in order (a piece runs one or more of them,
        kunjax.control.transition.PiecePacer)."""
        return [list(a) for a in self.atoms] or layer_rounds(self.layer_order, self.stages)

    def owner_index(self, layer: int) -> int:
        """The stage (= member position) that keeps `layer`: where its KV lives in the group and
        where a restore takes it back from."""
        return next(j for j, s in enumerate(self.stages) if s.holds(layer))

    def owner(self, layer: int) -> StagePlan:
        return self.stages[self.owner_index(layer)]

    @property
    def head_stage(self) -> StagePlan:
        return next(s for s in self.stages if s.head)

    def to_dict(self) -> dict:
        return {"instances": list(self.instances), "num_pages": self.num_pages, "tied": self.tied,
                "stages": [dataclasses.asdict(s) for s in self.stages], "layer_order": list(self.layer_order),
                "atoms": [list(a) for a in self.atoms], "pages_before": {str(k): v for k, v in self.pages_before.items()},
                "peak_bytes": {str(k): v for k, v in self.peak_bytes.items()},
                "steady_bytes": {str(k): v for k, v in self.steady_bytes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "GroupPlan":
        return cls(tuple(d["instances"]), tuple(StagePlan(**s) for s in d["stages"]), d["num_pages"],
                   {int(k): v for k, v in d["pages_before"].items()}, {int(k): v for k, v in d["peak_bytes"].items()},
                   {int(k): v for k, v in d["steady_bytes"].items()}, tuple(d["layer_order"]), d["tied"],
                   tuple(tuple(a) for a in d.get("atoms", ())))


@dataclasses.dataclass(frozen=True)
class DropPlan:
    groups: tuple[GroupPlan, ...]
    alone: tuple[int, ...]  # instances that stay as they are

    def to_dict(self) -> dict:
        return {"groups": [g.to_dict() for g in self.groups], "alone": list(self.alone)}

    @classmethod
    def from_dict(cls, d: dict) -> "DropPlan":
        return cls(tuple(GroupPlan.from_dict(g) for g in d["groups"]), tuple(d["alone"]))


class PlanError(ValueError):
    """The plan asked for cannot be made (names the reason). `code` is the gRPC status a front
    answers with: INVALID_ARGUMENT for a request no state of the cluster can satisfy,
    FAILED_PRECONDITION for one the present state refuses."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.code = code


def split_layers(num_layers: int, g: int) -> list[tuple[int, int]]:
    """g contiguous ranges covering [0, num_layers), sizes differing by at most one, the larger ones
    last (the first stage also holds the embedding)."""
    if not 2 <= g <= num_layers:
        raise PlanError(f"group_size {g} must be between 2 and the layer count {num_layers}")
    base, extra = divmod(num_layers, g)
    sizes = [base + (1 if s >= g - extra else 0) for s in range(g)]
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out


def interleaved_order(ranges: Sequence[tuple[int, int]]) -> list[int]:
    """Layers in rounds: the i-th layer of every stage, stage by stage, so that frees and allocations
    alternate on every member instead of piling up."""
    order, i = [], 0
    while len(order) < sum(b - a for a, b in ranges):
        for a, b in ranges:
            if a + i < b:
                order.append(a + i)
        i += 1
    return order


def check_ranges(ranges: Sequence[tuple[int, int]], num_layers: int, g: int) -> list[tuple[int, int]]:
    """Explicit stage layer ranges (e.g. balanced by the cost model): g non-empty contiguous ranges
    that partition [0, num_layers) in order; else a PlanError naming the field."""
    ranges = [(int(a), int(b)) for a, b in ranges]
    if len(ranges) != g:
        raise PlanError(f"ranges: {len(ranges)} layer ranges for a group of {g}")
    edge = 0
    for a, b in ranges:
        if a != edge or b <= a:
            raise PlanError(f"ranges: {ranges} must be non-empty and partition the layers [0, {num_layers}) in order")
        edge = b
    if edge != num_layers:
        raise PlanError(f"ranges: {ranges} must partition the layers [0, {num_layers}) in order")
    return ranges


def stage_plans(members: Sequence[int], num_layers: int, tied: bool,
                ranges: Optional[Sequence[tuple[int, int]]] = None) -> list[StagePlan]:
    """Stage s of `members[s]` keeps `ranges[s]` (default: split_layers, as even as possible)."""
    ranges = (split_layers(num_layers, len(members)) if ranges is None
              else check_ranges(ranges, num_layers, len(members)))
    last = len(members) - 1
    return [StagePlan(m, a, b, embed=(s == 0), head=(s == 0) if tied else (s == last))
            for s, (m, (a, b)) in enumerate(zip(members, ranges))]


def _kept_weights(info: MemberInfo, st: StagePlan) -> int:
    w = sum(info.layer_bytes[st.start:st.stop])
    if st.embed:
        w += info.embed_bytes
    if st.head:
        w += info.head_bytes
    return w


def _full_weights(info: MemberInfo) -> int:
    return sum(info.layer_bytes) + info.embed_bytes + info.head_bytes


def _instance_bytes(info: MemberInfo) -> int:
    """Bytes per device an instance holds serving on its own: every weight, its pools, `other`."""
    return info.other_bytes + _full_weights(info) + len(info.layer_bytes) * info.num_pages * info.page_layer_bytes


def memory_limit(info: MemberInfo) -> int:
    """Bytes a transition may reach on a member: its budget, or where the instance already stands
    serving on its own (activation reserve kept) when that is higher. An instance's KV pool is sized
    to fill the budget at start-up; small arrays measured later as `other` (page tables, step inputs)
    can put it a few KB above, and a transition that ends where the instance started (a restore) must
    not be refused for it."""
    return max(info.budget, _instance_bytes(info) + info.reserve)


def layer_rounds(order: Sequence[int], stages: Sequence[StagePlan]) -> list[list[int]]:
    """`order` cut into rounds of at most one layer per stage. In a round every member frees the
    pools (and weights) of the layers it gives up as its owned layer grows, so the state at the end
    of a round stays balanced; a drop's atom is a round, or a part of one where memory allows
    (`drop_atoms`)."""
    owner = {l: j for j, st in enumerate(stages) for l in range(st.start, st.stop)}
    rounds: list[list[int]] = []
    seen: set[int] = set()
    for l in order:
        if not rounds or owner[l] in seen:
            rounds.append([])
            seen = set()
        rounds[-1].append(l)
        seen.add(owner[l])
    return rounds


def restore_rounds(plan: "GroupPlan") -> list[list[int]]:
    """A restore undoes the drop: its rounds in reverse order (where the stages are uneven, the
    rounds in which a member only gives room back come first)."""
    return list(reversed(layer_rounds(plan.layer_order, plan.stages)))


def _chunked(pages: int, chunk_pages: int) -> int:
    """Pages a list of `pages` takes once gathered in chunks of `chunk_pages` (the last one padded)."""
    return -(-pages // chunk_pages) * chunk_pages if pages else 0


def _drop_start(infos: dict[int, MemberInfo], stages: Sequence[StagePlan]) -> dict[int, int]:
    """Bytes per device of each member once the drop has begun: everything an instance holds, less
    the embedding and head copies the plan does not keep (the first room)."""
    return {st.instance: _instance_bytes(infos[st.instance]) - (0 if st.embed else infos[st.instance].embed_bytes)
            - (0 if st.head else infos[st.instance].head_bytes) for st in stages}


def _drop_atom(infos: dict[int, MemberInfo], stages: Sequence[StagePlan], layers: Sequence[int], num_pages: int,
                chunk_pages: int, cur: dict[int, int]) -> tuple[dict[int, int], dict[int, int]]:
    """(bytes after, peak inside) per member of one drop atom moving `layers` from `cur`, event
    by event as kunjax.memory.drop runs it: the members that give a layer up delete its weights,
    every member gathers its pages that hold data of the atom's layers and deletes its pools of
    them, then the owners allocate the group pools (the chunks arrive one at a time and are freed
    layer by layer)."""
    owner = {l: st.instance for st in stages for l in range(st.start, st.stop)}
    cur = dict(cur)
    peak = dict(cur)
    chunk = min(chunk_pages, max(i.used_pages for i in infos.values()))
    for l in layers:
        for m in cur:
            if m != owner[l]:
                cur[m] -= infos[m].layer_bytes[l]
    part = {m: _chunked(infos[m].used_pages, chunk_pages) * infos[m].page_layer_bytes for m in cur}
    held = {m: 0 for m in cur}
    for _ in layers:  # layer by layer: pages out, old pool freed
        for m in cur:
            held[m] += part[m]
            peak[m] = max(peak[m], cur[m] + held[m])
            cur[m] -= infos[m].num_pages * infos[m].page_layer_bytes
    # the owners with the fewest pages that hold data first (kunjax.control.transition does the same)
    for l in sorted(layers, key=lambda l: (infos[owner[l]].used_pages, l)):
        s = owner[l]
        cur[s] += num_pages * infos[s].page_layer_bytes
        peak[s] = max(peak[s], cur[s] + held[s] + chunk * infos[s].page_layer_bytes)
        for m in cur:
            held[m] -= part[m]
    return cur, peak


def simulate_drop(infos: dict[int, MemberInfo], stages: Sequence[StagePlan], order: Sequence[int],
                  num_pages: int, chunk_pages: int, atoms: Optional[Sequence[Sequence[int]]] = None
                  ) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """(peak, final, between) bytes per device of each member through the drop, atom by atom
    (`atoms`, default the rounds of `layer_rounds`; each as `_drop_atom` says); the embedding and
    head copies the plan does not keep go first. `between` is the largest state between two atoms
    (the members may step there, so their activation reserve must stay free); `peak` the largest
    transient inside one."""
    peak = {st.instance: _instance_bytes(infos[st.instance]) for st in stages}
    cur = _drop_start(infos, stages)
    between = dict(cur)
    for atom in (layer_rounds(order, stages) if atoms is None else atoms):
        cur, inside = _drop_atom(infos, stages, atom, num_pages, chunk_pages, cur)
        for m in cur:
            peak[m] = max(peak[m], inside[m])
            between[m] = max(between[m], cur[m])
    return peak, cur, between


def drop_atoms(infos: dict[int, MemberInfo], stages: Sequence[StagePlan], order: Sequence[int], num_pages: int,
               chunk_pages: int) -> list[list[int]]:
    """The atoms of a drop, the smallest moves a piece can end after: each round of `layer_rounds`,
    cut into single layers where memory allows.

    A piece holds back the members' steps while it runs (its layers' KV is in flight), and on a
    host where fresh memory is slow a layer's new group pool alone can take most of a step; so the
    fewer layers an atom moves, the shorter a piece can be. A single layer is taken when the state
    after it (where the members may step: the activation reserve kept free) and its transient both
    fit every member's limit, the owner with the most room first (what one owner takes, the others
    free as they give the layer up, which makes room for the next owner). A round that cannot be
    cut so stays whole: its states are those `plan_group` checked. The state at the end of a round
    is the same however it was cut."""
    limit = {st.instance: memory_limit(infos[st.instance]) for st in stages}
    owner = {l: st.instance for st in stages for l in range(st.start, st.stop)}

    def fits(after: dict[int, int], inside: dict[int, int]) -> bool:
        return all(after[m] + infos[m].reserve <= limit[m] and inside[m] <= limit[m] for m in after)

    cur = _drop_start(infos, stages)
    atoms: list[list[int]] = []
    for rnd in layer_rounds(order, stages):
        state, cut, left = cur, [], sorted(rnd, key=lambda l: (infos[owner[l]].used_pages, l))
        while left:
            room = sorted(left, key=lambda l: (-(limit[owner[l]] - state[owner[l]]), left.index(l)))
            for l in room:
                after, inside = _drop_atom(infos, stages, [l], num_pages, chunk_pages, state)
                if fits(after, inside):
                    cut.append([l])
                    left.remove(l)
                    state = after
                    break
            else:  # no single layer fits here: the rest of the round in one atom, if that fits
                after, inside = _drop_atom(infos, stages, left, num_pages, chunk_pages, state)
                if fits(after, inside):
                    cut.append(list(left))
                    left = []
                else:
                    cut = None  # the round stays whole
                    break
        atoms += cut if cut is not None else [list(rnd)]
        cur, _ = _drop_atom(infos, stages, rnd, num_pages, chunk_pages, cur)
    return atoms


def plan_group(infos: dict[int, MemberInfo], members: Sequence[int], tied: bool, max_pages: int,
               chunk_pages: int = 64, ladder: Optional[Sequence[int]] = None,
               ranges: Optional[Sequence[tuple[int, int]]] = None) -> GroupPlan:
    """The largest group page count whose steady state and transition fit every member's budget
    (with `ladder`: the largest such count on the ladder of pool sizes compiled ahead; `ranges`: each
    stage's layers, default as even as possible)."""
    num_layers = len(infos[members[0]].layer_bytes)
    stages = stage_plans(members, num_layers, tied, ranges)
    order = interleaved_order([(s.start, s.stop) for s in stages])
    # Every member's page ids keep their place at an offset of the group's space (member_offsets).
    need = sum(infos[m].num_pages for m in members)
    limit = {m: memory_limit(infos[m]) for m in members}

    def fits(p: int) -> bool:
        """Drop peak, the states between pieces (members step there) and the grouped steady state
        within budget, and the group can be restored (once its requests are few enough) too."""
        peak, final, between = simulate_drop(infos, stages, order, p, chunk_pages)
        if not all(peak[m] <= limit[m] and final[m] + infos[m].reserve <= limit[m]
                   and between[m] + infos[m].reserve <= limit[m] for m in members):
            return False
        trial = GroupPlan(tuple(members), tuple(stages), p, {m: infos[m].num_pages for m in members}, peak, final,
                          tuple(order), tied)
        # Splittable again once its requests are gone (a restore under load is checked when it is asked).
        back = simulate_restore(infos, trial, chunk_pages, {m: 0 for m in members})
        return all(back[m] <= limit[m] for m in members)

    if not fits(need):
        raise PlanError(f"a group of instances {list(members)} cannot hold the {need} pages of its members' "
                        f"page spaces within the memory budget", "FAILED_PRECONDITION")
    lo, hi = need, max(need, max_pages)
    while lo < hi:  # largest p with fits(p); fits is monotone in p
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    if ladder is not None:  # only page counts whose executables are compiled ahead
        fitting = [p for p in ladder if need <= p <= lo]
        if not fitting:
            raise PlanError(f"no compiled group pool size fits instances {list(members)} (need {need}..{lo} pages, "
                            f"ladder {list(ladder)})", "FAILED_PRECONDITION")
        lo = max(fitting)
    atoms = drop_atoms(infos, stages, order, lo, chunk_pages)
    peak, final, _ = simulate_drop(infos, stages, order, lo, chunk_pages, atoms)
    return GroupPlan(tuple(members), tuple(stages), lo, {m: infos[m].num_pages for m in members},
                     peak, final, tuple(order), tied, tuple(tuple(a) for a in atoms))


def plan_drop(infos: Sequence[MemberInfo], group_size: int, tied: bool, max_pages_per_instance: int,
              eligible: Optional[Sequence[int]] = None, chunk_pages: int = 64,
              ladder: Optional[Sequence[int]] = None,
              ranges: Optional[Sequence[tuple[int, int]]] = None) -> DropPlan:
    """Groups of `group_size` consecutive eligible instances (those left over stay alone); `ranges`:
    every group's stage layer ranges (default as even as possible)."""
    by_index = {i.index: i for i in infos}
    pool = list(eligible if eligible is not None else sorted(by_index))
    if not 2 <= group_size <= len(pool):
        raise PlanError(f"group_size must be between 2 and the number of instances that can merge "
                        f"({len(pool)}), got {group_size}")
    groups = []
    while len(pool) >= group_size:
        members, pool = pool[:group_size], pool[group_size:]
        groups.append(plan_group(by_index, members, tied, group_size * max_pages_per_instance, chunk_pages, ladder,
                                 ranges))
    return DropPlan(tuple(groups), tuple(pool))


def member_offsets(plan: GroupPlan) -> list[int]:
    """Where each member's page ids start in the group's page space (stage order): member j's page
    p is group page offset_j + p, so the group needs at least the members' pages together."""
    offs, a = [], 0
    for st in plan.stages:
        offs.append(a)
        a += plan.pages_before[st.instance]
    return offs


def pool_ladder(infos: Sequence[MemberInfo], tied: bool, max_group: int, max_pages_per_instance: int,
                chunk_pages: int = 64, fractions: Sequence[float] = (1.0, 0.9, 0.8)) -> list[int]:
    """Group pool sizes to compile ahead (a pool size is part of every layer executable's key): for
    each group size g up to `max_group`, the largest page count a group of g of these instances can
    hold with nothing running (`plan_group`), and `fractions` of it, for groups whose transition
    leaves less room (pages in use, an uneven split). The memory layout of the instances is fixed at
    start-up, so these are the sizes the planner will ask for; nothing rounds a group's room down by
    more than the gap between two fractions."""
    idle = {i.index: dataclasses.replace(i, used_pages=0) for i in infos}
    members = [i.index for i in infos]
    sizes: set[int] = set()
    for g in range(2, min(max_group, len(members)) + 1):
        try:
            best = plan_group(idle, members[:g], tied, g * max_pages_per_instance, chunk_pages).num_pages
        except PlanError:
            continue
        need = sum(idle[m].num_pages for m in members[:g])
        sizes.update(p for p in (int(best * f) for f in fractions) if p >= need)
    return sorted(sizes)


def simulate_restore(infos: dict[int, MemberInfo], plan: GroupPlan, chunk_pages: int,
                     used_after: dict[int, int]) -> dict[int, int]:
    """Peak bytes per device of each member through a restore of `plan`'s group, starting from the
    grouped steady state; `used_after` are the pages each member's share of the requests takes.

    One round of `restore_rounds` after the other (the atoms of its pieces), as
    kunjax.memory.restore runs it: the owners gather the round's layers' pages that hold data and delete their group pools, then every member allocates
    its instance pools of those layers (and receives the weights it lacks) and the chunks are
    scattered in; embedding and head last. The group may step after any round: there the
    activation reserve is counted in, so the returned peak is what must fit the budget."""
    cur = dict(plan.steady_bytes)
    peak = {m: cur[m] + infos[m].reserve for m in cur}
    part = {m: _chunked(used_after.get(m, 0), chunk_pages) * infos[m].page_layer_bytes for m in cur}
    for rnd in restore_rounds(plan):
        held = {m: 0 for m in cur}
        for l in rnd:  # phase 1: the owners gather the pages that hold data, then free the group pools
            s = plan.owner(l).instance
            held[s] += sum(part.values())
            peak[s] = max(peak[s], cur[s] + held[s])
            cur[s] -= plan.num_pages * infos[s].page_layer_bytes
        for l in rnd:  # phase 2: every member (the owner last) gets its pool, weights, pages
            s = plan.owner(l).instance
            for m in sorted(cur, key=lambda k: k == s):
                i = infos[m]
                cur[m] += plan.pages_before[m] * i.page_layer_bytes + (0 if m == s else i.layer_bytes[l])
                chunk = min(chunk_pages, used_after.get(m, 0)) * i.page_layer_bytes
                peak[m] = max(peak[m], cur[m] + held[m] + (chunk if m != s else 0))
                held[s] -= part[m]
        for m in cur:
            peak[m] = max(peak[m], cur[m] + infos[m].reserve)
    for st in plan.stages:  # embedding and head back where they are missing
        i = infos[st.instance]
        cur[st.instance] += (0 if st.embed else i.embed_bytes) + (0 if st.head else i.head_bytes)
        peak[st.instance] = max(peak[st.instance], cur[st.instance] + i.reserve)
    return peak


def assign_requests(request_pages: dict[str, int], capacity: dict[int, int]) -> Optional[dict[str, int]]:
    """Requests (pages each) onto members (free pages each), largest first onto the member with the
    most room left; None when they do not fit (the group cannot split yet)."""
    room = dict(capacity)
    out = {}
    for rid, n in sorted(request_pages.items(), key=lambda kv: (-kv[1], kv[0])):
        m = max(room, key=lambda k: (room[k], -k))
        if room[m] < n:
            return None
        out[rid] = m
        room[m] -= n
    return out
