"""Where a rule's training step spends its time, next to plain backprop (``torch.profiler``).

For one network of ``step_time.py`` it profiles ``--steps`` training steps of plain backprop and
of each rule (same model and data), and prints, per rule, the aten ops whose self CPU time per step
differs most from backprop's. This is how a miss of a ``step_time.py`` target is explained.

    .venv/bin/python benchmarks/profile_rules.py --case mlp --rules usf,frsf,brsf,kp
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import biograd
from common import Trainee, train_step
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="mlp", choices=list(CASES))
    parser.add_argument("--rules", default="fa,usf,frsf,brsf,kp,dfa")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    case = CASES[args.case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((case.batch, *case.in_shape), generator=gen)
    y = torch.randint(0, 10, (case.batch,), generator=gen)
    torch.manual_seed(0)
    base = case.build()

    def trainee(rule: str) -> Trainee:
        model = copy.deepcopy(base)
        if rule != "bp":
            kwargs = {"example_input": x[:2]} if biograd.get_rule(rule).direct else {}
            biograd.convert(model, rule, seed=0, **kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        return Trainee(rule, model, opt)

    ref = op_times(trainee("bp"), x, y, args.steps)
    ref_total = sum(ref.values())
    print(f"{case.title}: plain bp {ref_total:.1f} ms/step of profiled self CPU time")
    for rule in args.rules.split(","):
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
