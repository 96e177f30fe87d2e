"""Idle share of held slots in synchronous halving on a cluster, without and with confirmations (a simulation).

    .venv/bin/python bench/confirm_sim.py [--arms 36] [--slots 8 16] [--steps 200] [--seeds 20]

A slot-level event simulation (no Ray, no training): `arms` arms on `slots` GPU slots held by the
search for its whole run; successive halving with the search's rungs (`search.halving.halving_rungs`,
grace 25% of the steps, reduction factor 3, keep ceil(n/3) at each rung); an arm's step takes
1 +- `jitter` time units (its own speed, fixed), so arms reach a rung at different times and wait
there. A rung is decided when every live arm reached it; kept arms go on (the queue first), cut ones
stop. With confirmations (`tail`), a slot nothing kept waits for trains up to two cut arms (the
deepest cut first: the search's strongest costlier unit / near miss) from their rung to the end;
they stop when the last kept arm ends, unless a third of their way or less is left
(`search.confirm.TAIL_FINISH_SHARE`). Printed per cluster size (mean over seeds): the idle share of
held slot-time, the makespan ratio tail / off, the confirmations' steps as a share of the grid's,
and how often a confirmation reached the leader's step.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_rank_search.search.confirm import finishes_in_tail  # noqa: E402
from lora_rank_search.search.halving import halving_rungs  # noqa: E402


def simulate(arms: int, slots: int, steps: int, confirm: bool, seed: int, jitter: float = 0.2, rf: float = 3) -> dict:
    rng = random.Random(seed)
    speed = [1 + rng.uniform(-jitter, jitter) for _ in range(arms)]  # time units per step
    quality = [rng.random() for _ in range(arms)]  # the order halving keeps them in
    rungs = halving_rungs(max(1, math.ceil(0.25 * steps)), steps, rf)
    done = [0.0] * arms  # steps trained
    target = [rungs[0] if rungs else steps] * arms
    alive, level = set(range(arms)), 0
    cut: dict[int, int] = {}  # arm -> the step where it was cut
    challengers: dict[int, int] = {}  # arm -> from step
    running: dict[int, float] = {}  # arm -> the time it started its current chunk
    now, busy, kept_over = 0.0, 0.0, False

    def kept_waiting() -> list:
        return [a for a in sorted(alive, key=lambda a: -quality[a]) if a not in running and done[a] < target[a]]

    def fill() -> None:
        for a in kept_waiting():
            if len(running) < slots:
                running[a] = now
        if confirm and not kept_over and not kept_waiting():
            if len(challengers) < 2 and cut:
                for a in sorted(cut, key=lambda a: (-cut[a], -quality[a])):
                    if len(challengers) >= 2 or len(running) >= slots:
                        break
                    if a not in challengers:
                        challengers[a] = cut[a]
                        target[a] = steps
                        running[a] = now
            for a in challengers:  # a preempted challenger comes back when a slot frees
                if a not in running and done[a] < steps and len(running) < slots:
                    running[a] = now

    fill()
    while running:
        a, t_end = min(((a, now + (target[a] - done[a]) * speed[a]) for a in running), key=lambda x: x[1])
        dt = t_end - now
        for b in running:
            done[b] = min(target[b], done[b] + dt / speed[b])
        busy += dt * len(running)
        now = t_end
        done[a] = target[a]
        del running[a]
        if a in alive and level < len(rungs) and all(done[b] >= rungs[level] for b in alive) and len(alive) > 1:
            keep = sorted(alive, key=lambda b: -quality[b])[: max(1, math.ceil(len(alive) / rf))]
            for b in alive - set(keep):
                cut[b] = rungs[level]
            alive = set(keep)
            level += 1
            nxt = rungs[level] if level < len(rungs) and len(alive) > 1 else steps
            for b in alive:
                target[b] = nxt
        if not any(done[b] < steps for b in alive) and not kept_over:
            kept_over = True
            for b in list(running):
                if b in challengers and not finishes_in_tail(int(done[b]), challengers[b], steps):
                    del running[b]  # tail: stops with the last kept arm
        fill()
    extra = sum(done[a] - challengers[a] for a in challengers)
    reached = any(done[a] >= steps for a in challengers)
    return {"makespan": now, "idle": 1 - busy / (slots * now), "extra": extra / (arms * steps), "reached": reached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", type=int, default=36)
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--jitter", type=float, default=0.2, help="spread of the arms' step times (+-)")
    args = parser.parse_args()
    print(f"# synchronous halving, {args.arms} arms, {args.steps} steps, rungs {halving_rungs(math.ceil(0.25 * args.steps), args.steps, 3)}, "
          f"reduction factor 3, step time 1 +- {args.jitter:g}, {args.seeds} seeds")
    for slots in args.slots:
        off = [simulate(args.arms, slots, args.steps, False, s, args.jitter) for s in range(args.seeds)]
        on = [simulate(args.arms, slots, args.steps, True, s, args.jitter) for s in range(args.seeds)]

        def mean(rows, key):
            return sum(float(r[key]) for r in rows) / len(rows)

        print(f"{slots:>3} slots: idle share of held slot-time off {mean(off, 'idle'):.1%} -> tail {mean(on, 'idle'):.1%}; "
              f"makespan tail/off {sum(b['makespan'] / a['makespan'] for a, b in zip(off, on)) / len(on):.3f}; "
              f"confirmation steps {mean(on, 'extra'):.1%} of the grid's; a confirmation reached the leader's step in "
              f"{sum(r['reached'] for r in on)} of {len(on)}")


if __name__ == "__main__":
    main()
