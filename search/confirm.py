"""Confirmations: who trains on in the idle capacity of a search's tail, as pure functions (no Ray).

Synchronous halving leaves capacity idle at its end, where the last kept arms train alone: the
leader then reaches its judging step with no other unit beside it (the `unopposed` finding). With
`scheduler.confirm: tail` (or `full`) the scheduler trains *challengers* on from the checkpoint of
the rung where they were cut, to the leader's judging step (train.max_steps), in this order:

1. **the near miss**: the cheapest unit, cheaper than the leader, that was cut at a rung with at
   least NEAR_MISS_SHARE of the best gain there (close to adequacy): if it catches up, the verdict
   moves to a cheaper adapter;
2. **the strongest costlier unit**: among the units costlier than the leader, the one that got
   furthest (deepest rung), best loss there: so that the leader is compared with an opponent at its
   own step.

One of each at a time. A role is given again when a unit qualifies for it at a later rung (cut
there, nearer the leader's step): the newer challenger can reach the step beside the leader, where
one resumed from an early rung would still be far behind when the leader ends. The one it replaces
stops and is judged where it got. They only use *free* capacity: a slot no kept arm is
waiting for (a kept trial pending, or paused and ready to go on, always comes first) and, on a Ray
cluster, room for one trial on a node that already runs a trial of this search (`free_slots`):
a confirmation never asks the autoscaler for a node and never keeps an otherwise idle node busy.
With `tail` they stop when the search's last kept arm finishes (a challenger that has not reached
the step is then judged where it got; one within TAIL_FINISH_SHARE of it trains on to it); with
`full` a started challenger runs to max_steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection, Hashable, Mapping, Optional, Sequence, Union

# A cheaper unit cut at a rung with at least this share of the best unit's gain over the base there is
# a near miss. Halving already keeps a cheaper unit at KEEP_SHARE (80%) of the best gain unless a kept
# unit that costs no more is as good, so the cheaper units it cuts sit below 80% or were cut for that
# cheaper one: 70% is the band just below, where a unit of exactly the needed rank sits at an early
# rung (it learns more slowly than a larger one). Without a base loss: within 3% of the best loss.
NEAR_MISS_SHARE = 0.70
NEAR_MISS_RELATIVE = 0.03
NEAR_MISS, COSTLIER = "near miss", "strongest costlier"
# With `tail`, a challenger that has at most this share of its confirmation (from its rung to the
# leader's step) left when the last kept arm ends runs on to the step: one resumed from a checkpoint
# starts a little after the leader's tail began (a new worker loads the model), and stopping it a
# report short of the step would waste the confirmation. At most a third of the tail is added.
TAIL_FINISH_SHARE = 1 / 3


@dataclass(frozen=True)
class Challenger:
    """A unit to confirm: `arm` (its best arm where it was cut) trains on from the rung `rung`
    (an index into the rungs) to the leader's judging step. `role`: NEAR_MISS or COSTLIER."""

    arm: Hashable
    unit: Hashable
    role: str
    rung: int
    loss: float  # its loss at that rung (nats/token)


def leader_of(table: Mapping[int, Mapping[Hashable, float]], survivors: Mapping[int, Sequence[Hashable]]) -> Optional[Hashable]:
    """The leading kept arm: the best (lowest loss) of the arms that passed the last decided rung."""
    if not survivors:
        return None
    last = max(survivors)
    alive = list(survivors[last])
    if not alive:
        return None
    losses = table.get(last, {})
    return min(alive, key=lambda a: (losses.get(a, math.inf) if _finite(losses.get(a)) else math.inf, str(a)))


def cut_units(table: Mapping[int, Mapping[Hashable, float]], survivors: Mapping[int, Sequence[Hashable]],
              unit: Mapping[Hashable, Hashable]) -> dict:
    """unit -> (rung index, loss, arm) for every unit cut whole at a decided rung: the deepest rung
    where it was cut, and its best arm there (the arm a confirmation resumes)."""
    alive_units = {unit[a] for a in survivors[max(survivors)]} if survivors else set()
    out: dict = {}
    for k in sorted(survivors):
        for a, loss in table.get(k, {}).items():
            if a in survivors[k] or not _finite(loss) or unit[a] in alive_units:
                continue
            u = unit[a]
            prev = out.get(u)
            if prev is None or k > prev[0] or (k == prev[0] and (loss, str(a)) < (prev[1], str(prev[2]))):
                out[u] = (k, float(loss), a)
    return out


def choose_challengers(
    table: Mapping[int, Mapping[Hashable, float]],
    survivors: Mapping[int, Sequence[Hashable]],
    unit: Mapping[Hashable, Hashable],
    free: int,
    cost: Optional[Mapping[Hashable, float]] = None,
    base: Optional[float] = None,
    kept_waiting: bool = False,
    filled: Union[Mapping[str, int], Collection[str]] = (),
) -> list[Challenger]:
    """The challengers to start now, in order (at most `free`; none while a kept arm waits).

    Args:
        table: rung index -> {arm: its loss there (mean over seeds, best so far)} for the arms that
            reported at that rung.
        survivors: rung index -> the arms that passed it (decided rungs only: `Decision.survivors`).
        unit: arm -> its unit (what the verdict recommends).
        free: arms that fit in capacity nothing kept is waiting for (`free_slots` // seeds per arm).
        cost: unit -> trainable parameters (what "cheaper" means). Default: the unit's order (a
            smaller rank is cheaper).
        base: the untouched model's eval loss (gain shares); None: a relative gap of the loss.
        kept_waiting: a kept trial is pending or paused ready to go on: nothing is free.
        filled: roles already given: role -> the rung index its challenger was cut at (the role is
            given again to a unit cut at a later rung), or a collection of roles closed for good.
    """
    if free <= 0 or kept_waiting:
        return []
    lead = leader_of(table, survivors)
    if lead is None:
        return []
    lead_unit = unit[lead]
    cost = cost or {}

    def price(u) -> tuple:
        return (cost[u], u) if u in cost else (math.inf, u)

    def cheaper(u, v) -> bool:
        if u in cost and v in cost:
            return cost[u] < cost[v]
        return u < v

    def open_role(role: str, rung: int) -> bool:
        if isinstance(filled, Mapping):
            return role not in filled or rung > filled[role]
        return role not in filled

    cut = cut_units(table, survivors, unit)
    out: list[Challenger] = []
    near = [u for u, (k, loss, _) in cut.items() if cheaper(u, lead_unit) and _near(loss, table.get(k, {}), base)]
    if near:
        u = min(near, key=price)
        k, loss, arm = cut[u]
        if open_role(NEAR_MISS, k):
            out.append(Challenger(arm, u, NEAR_MISS, k, loss))
    dearer = [u for u in cut if cheaper(lead_unit, u) and all(c.unit != u for c in out)]
    if dearer:
        u = min(dearer, key=lambda u: (-cut[u][0], cut[u][1], price(u)))
        k, loss, arm = cut[u]
        if open_role(COSTLIER, k):
            out.append(Challenger(arm, u, COSTLIER, k, loss))
    return out[:free]


def finishes_in_tail(step: int, from_step: int, target: int) -> bool:
    """A challenger at `step` (confirming from `from_step` to `target`) is close enough to the step,
    when the last kept arm ends, to train on to it with `confirm: tail` (TAIL_FINISH_SHARE)."""
    span = max(1, target - from_step)
    return step > from_step and target - step <= TAIL_FINISH_SHARE * span + 1e-9


def _near(loss: float, at_rung: Mapping[Hashable, float], base: Optional[float]) -> bool:
    """Within a few points of adequacy at its rung: NEAR_MISS_SHARE of the best gain there."""
    finite = [float(v) for v in at_rung.values() if _finite(v)]
    if not finite:
        return False
    best = min(finite)
    if base is not None and _finite(base) and base - best > 0:
        return (base - loss) / (base - best) >= NEAR_MISS_SHARE
    return loss <= best + NEAR_MISS_RELATIVE * abs(best)


def current_node(result: Mapping[str, Any], alive: Mapping[str, Optional[str]]) -> Optional[str]:
    """The live node (id) a running trial is on, by its last report: the node id it reported; after
    --resume (a new Ray session: new node ids, the old ones still in the reports until each trial
    reports again) the live node with the IP it reported, else the only live node; else None.
    alive: live node id -> its IP."""
    node = result.get("node_id")
    if node in alive:
        return node
    same_ip = [n for n, ip in alive.items() if ip and ip == result.get("node_ip")]
    if len(same_ip) == 1:
        return same_ip[0]
    return next(iter(alive)) if len(alive) == 1 else None


def free_slots(available: Mapping[Any, Mapping[str, float]], held: Collection[Any], demand: Mapping[str, float],
               running: Optional[Mapping[Any, int]] = None, pack: Optional[tuple[int, int]] = None, idle: int = 0) -> int:
    """How many more trials of `demand` (Ray resources, e.g. {'CPU': 1, 'GPU': 0.5}) fit right now on
    the nodes in `held` (nodes already running a trial of this search), given each node's available
    resources. Nodes not held count for nothing: a confirmation never keeps an idle node busy and
    never asks the autoscaler for one.

    pack: (arms per pack N, arms a pack trains at full speed at once p) for packed trials, whose
    demand is 1/N of their pack; running: node -> this search's trials running there. A pack whose
    arms take turns (or stack on CPU, where a stacked pass costs nearly what its arms' passes cost
    one by one) trains p = 1 arm at full speed: a slot beside a running arm in its pack is not free
    capacity, it would slow that arm. A node's full-speed capacity is then its packs x p.

    idle: workers Tune keeps for reuse (`reuse_actors`: a trial ended or paused, its worker waits for
    the next trial): free slots whose resources Ray still counts as taken. They are on nodes of this
    search; they count on the first node held."""
    need = {k: float(v) for k, v in demand.items() if v and float(v) > 0}
    if not need:
        return 0
    total = 0
    for _, fit, busy in _nodes(available, held, need, running, idle):
        capacity = _full_speed(fit, busy, pack)
        total += fit if capacity is None else max(0, min(fit, capacity - busy))
    return total


def pack_room(available: Mapping[Any, Mapping[str, float]], held: Collection[Any], demand: Mapping[str, float],
              running: Mapping[Any, int], pack: Optional[tuple[int, int]], idle: int = 0,
              resting: Optional[Mapping[Any, int]] = None) -> Optional[int]:
    """How many `resting` trials (running, held at a rung: training nothing) can go on in place at
    full speed, where packs limit it (`free_slots`' pack: p < N); None where they do not (a trial
    alone in its worker goes on in its own slot). A node's full-speed capacity is its packs x p;
    the arms training there are its running trials less the resting ones."""
    if _full_speed(0, 0, pack) is None:
        return None
    need = {k: float(v) for k, v in demand.items() if v and float(v) > 0}
    room = 0
    for node, fit, busy in _nodes(available, held, need, running, idle):
        room += max(0, _full_speed(fit, busy, pack) - (busy - int((resting or {}).get(node, 0))))
    return room


def _nodes(available: Mapping[Any, Mapping[str, float]], held: Collection[Any], need: Mapping[str, float],
           running: Optional[Mapping[Any, int]], idle: int) -> list[tuple[Any, int, int]]:
    """(node, trials of `need` that fit there now, this search's trials running there) for each node
    in `held` that Ray reports; workers Tune keeps for reuse (`idle`) count on the first."""
    out = []
    for node, have in available.items():
        if node in held:
            fit = _fit(have, need) if need else 0
            out.append((node, fit + (idle if not out else 0), int((running or {}).get(node, 0))))
    return out


def _full_speed(fit: int, busy: int, pack: Optional[tuple[int, int]]) -> Optional[int]:
    """Arms a node's packs train at full speed (its packs x p: `free_slots`), from the trials that
    fit there now and those running; None where packs do not limit it (no pack, or p = N)."""
    if pack is None or not 0 < pack[1] < pack[0]:
        return None
    return (fit + busy) // pack[0] * pack[1]


def _fit(have: Mapping[str, float], need: Mapping[str, float]) -> int:
    """How many of `need` (a trial's resources, each > 0) fit in `have` (a node's free resources)."""
    return int(min(math.floor(float(have.get(k, 0.0)) / v + 1e-9) for k, v in need.items()))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))
