"""Where a rule's training step spends its time, next to plain backprop.

For one network of ``step_time.py`` (same model and data for every rule):

1. phases: the median CPU time (``time.process_time``, one thread) of the forward pass with the
   loss, the backward pass and the optimizer step of each rule, timed interleaved as in
   ``step_time.py``;
2. ops (``torch.profiler``, ``--steps`` steps per rule): per rule, the aten ops whose self time
   per step differs most from plain backprop's (profiler times are wall-clock times).

This is how a miss of a ``step_time.py`` target is explained. The pseudo-rule ``floor`` is
``step_time.py``'s ``dfa floor``, the work DFA cannot avoid (``common.cut_inputs``); profile
``dfa`` next to it to see where the DFA engine's own time goes.

    .venv/bin/python benchmarks/profile_rules.py --case mlp --rules usf,frsf,brsf,kp
    .venv/bin/python benchmarks/profile_rules.py --case dfa_mlp --rules floor,dfa
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

import biograd
from common import Trainee, cut_inputs, train_step
from step_time import CASES


def op_times(t: Trainee, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    """Self CPU time per step (ms) of every op, summed over calls, over ``steps`` steps."""
    for _ in range(3):
        train_step(t, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(t, x, y)
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        out[event.key] += event.self_cpu_time_total / 1e3 / steps
    return dict(out)


PHASES = ("forward", "backward", "optimizer")


def phase_times(
    trainees: list[Trainee], x: torch.Tensor, y: torch.Tensor, reps: int
) -> dict[str, dict[str, float]]:
    """Median CPU time (ms) of each phase of a step, per trainee, interleaved over ``reps``."""
    samples: dict[str, dict[str, list[float]]] = {
        t.label: {p: [] for p in PHASES} for t in trainees
    }
    for rep in range(reps + 2):
        for i in range(len(trainees)):
            t = trainees[(rep + i) % len(trainees)]
            t.optimizer.zero_grad(set_to_none=True)
            c0 = time.process_time()
            loss = F.cross_entropy(t.model(x), y)
            c1 = time.process_time()
            if t.backward is None:
                loss.backward()
            else:
                t.backward(loss)
            c2 = time.process_time()
            t.optimizer.step()
            c3 = time.process_time()
            if rep >= 2:  # the first two rounds warm up
                for p, v in zip(PHASES, (c1 - c0, c2 - c1, c3 - c2)):
                    samples[t.label][p].append(1e3 * v)
    return {k: {p: statistics.median(v) for p, v in d.items()} for k, d in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="mlp", choices=list(CASES))
    parser.add_argument("--rules", default="fa,usf,frsf,brsf,kp,dfa")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the case's)")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (0: phases only)")
    parser.add_argument("--reps", type=int, default=20, help="repetitions of the phase timing")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    case = CASES[args.case]
    gen = torch.Generator().manual_seed(0)
    batch = args.batch or case.batch
    x = torch.randn((batch, *case.in_shape), generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    torch.manual_seed(0)
    base = case.build()

    def trainee(rule: str) -> Trainee:
        model = copy.deepcopy(base)
        if rule == "floor":
            dfa = biograd.convert(copy.deepcopy(base), "dfa", seed=0, example_input=x[:2])
            points = biograd.conversion_report(dfa).feedback_points
            backward = cut_inputs(model, points)
        else:
            backward = None
            if rule != "bp":
                example = x[:2] if biograd.get_rule(rule).direct else None
                biograd.convert(model, rule, seed=0, example_input=example)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        return Trainee(rule, model, opt, backward=backward)

    rules = args.rules.split(",")
    if "floor" in rules:
        print("floor: the work DFA cannot avoid (step_time.py's 'dfa floor')\n")
    phases = phase_times([trainee(r) for r in ["bp", *rules]], x, y, args.reps)
    print(f"{case.title}, batch {batch}: median CPU ms per phase ({args.reps} repetitions)")
    print(f"  {'rule':<6} {'forward':>8} {'backward':>9} {'optimizer':>10} {'sum':>8} {'x bp':>6}")
    ref_sum = sum(phases["bp"].values())
    for rule, ph in phases.items():
        total = sum(ph.values())
        cells = " ".join(f"{ph[p]:>{w}.2f}" for p, w in zip(PHASES, (8, 9, 10)))
        print(f"  {rule:<6} {cells} {total:8.2f} {total / ref_sum:6.3f}")
    print()
    if args.steps == 0:
        return 0

    ref = op_times(trainee("bp"), x, y, args.steps)
    ref_total = sum(ref.values())
    print(f"{case.title}: plain bp {ref_total:.1f} ms/step of profiled self CPU time")
    for rule in rules:
        times = op_times(trainee(rule), x, y, args.steps)
        total = sum(times.values())
        print(f"\n{rule}: {total:.1f} ms/step ({total / ref_total:.3f} x bp)")
        print(f"  {'op':<40} {'bp ms':>8} {rule + ' ms':>9} {'diff':>8}")
        keys = sorted(
            set(ref) | set(times), key=lambda k: -abs(times.get(k, 0.0) - ref.get(k, 0.0))
        )
        for k in keys[: args.top]:
            a, b = ref.get(k, 0.0), times.get(k, 0.0)
            print(f"  {k[:40]:<40} {a:8.2f} {b:9.2f} {b - a:+8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
