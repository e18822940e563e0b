"""Extra training time of the alignment monitor (target: under 2% when measuring every 100 steps).

An MLP on the embedded digits set, trained with the step of biograd's trainer
(``biograd.data.Loader`` batches, ``loss.item()``, running accuracy, SGD with momentum).

1. Components (the headline number): the CPU time of one training step, of one measurement
   (``AlignmentMonitor.measure``: weight and gradient alignment, CSV row writing) and of one
   ``reuse_step=True`` measurement (what it adds to the step it reads), each the minimum over
   ``--blocks`` blocks of repeated calls (the kinds of block alternate), so that other
   processes on a shared machine can only be filtered out, never counted.
   Overhead = measurement / (every x step).
2. End to end: ``--steps`` training steps with the monitor off and on, interleaved
   ``--repeats`` times; median CPU time and the spread of the "off" runs, which shows how much
   noise the machine adds to a direct comparison.

    python benchmarks/alignment_overhead.py [--every 100] [--rules fa,brsf,dfa]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import biograd
from biograd.alignment import AlignmentMonitor
from biograd.data import Dataset, Loader, load_dataset


def make_model(rule: str, d_in: int, hidden: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, classes),
    )
    return biograd.convert(model, rule, seed=0)


def train(
    rule: str, ds: Dataset, args: argparse.Namespace, every: int, reuse: bool = False
) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to train ``args.steps`` steps, measuring every ``every``."""
    model = make_model(rule, ds.x[0].numel(), args.hidden, ds.classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = Loader(ds, args.batch, shuffle=True, drop_last=True, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        monitor = AlignmentMonitor(
            model,
            F.cross_entropy,
            every=every,
            csv_path=Path(tmp) / "alignment.csv",
            reuse_step=reuse,
        )
        cpu, wall = time.process_time(), time.perf_counter()
        step, epoch, correct, seen, loss_sum = 0, 0, 0, 0, 0.0
        while step < args.steps:
            loader.set_epoch(epoch)
            for x, y in loader:
                if rule == "drtp":
                    biograd.set_targets(model, y)
                monitor.maybe_measure(step, epoch, x, y)
                out = model(x)
                loss = F.cross_entropy(out, y)
                loss_sum += loss.item() * len(y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct += int((out.argmax(1) == y).sum())
                seen += len(y)
                step += 1
                if step == args.steps:
                    break
            epoch += 1
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        monitor.close()
    return cpu, wall


def components(rule: str, ds: Dataset, args: argparse.Namespace) -> tuple[float, float, float]:
    """CPU seconds of a training step, of a measurement, and of a ``reuse_step`` measurement
    (what it adds to the step it reads); minima over blocks."""
    model = make_model(rule, ds.x[0].numel(), args.hidden, ds.classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = Loader(ds, args.batch, shuffle=True, drop_last=True, seed=0)
    batches = list(loader)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "a.csv"
        separate = AlignmentMonitor(model, F.cross_entropy, every=1, csv_path=csv_path)
        reused = AlignmentMonitor(
            model, F.cross_entropy, every=1, csv_path=csv_path, reuse_step=True
        )

        def step(i: int) -> None:
            x, y = batches[i % len(batches)]
            if rule == "drtp":
                biograd.set_targets(model, y)
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            int((out.argmax(1) == y).sum())

        def measure(i: int) -> None:
            x, y = batches[i % len(batches)]
            separate.measure(i, 0, x, y)

        def measure_reused(i: int) -> None:  # a measurement, the step it reads, and its rows
            x, y = batches[i % len(batches)]
            if rule == "drtp":
                biograd.set_targets(model, y)
            reused.measure(i, 0, x, y)
            step(i)
            reused._finish()

        # blocks of the three kinds alternate, so that all see the same load
        kinds = ((step, 50), (measure, 5), (measure_reused, 5))
        for fn, _ in kinds:
            fn(0)
        per_call = [math.inf] * len(kinds)
        for _ in range(args.blocks):
            for k, (fn, calls) in enumerate(kinds):
                t = time.process_time()
                for i in range(calls):
                    fn(i)
                per_call[k] = min(per_call[k], (time.process_time() - t) / calls)
        separate.close()
        reused.close()
    return per_call[0], per_call[1], per_call[2] - per_call[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rules", default="fa,brsf,dfa")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ds = load_dataset("digits", split="train")
    d_in = ds.x[0].numel()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}; MLP {d_in}-"
        f"{args.hidden}-{args.hidden}-{ds.classes} on digits, batch {args.batch}, "
        f"measure every {args.every} steps"
    )
    print("\n1. components (CPU time, minimum over blocks)\n")
    print(
        "| rule | step (ms) | measurement (ms) | overhead | reuse_step measurement (ms) "
        "| overhead |"
    )
    print("|---|---|---|---|---|---|")
    for rule in args.rules.split(","):
        t_step, t_meas, t_reuse = components(rule, ds, args)
        print(
            f"| {rule} | {1e3 * t_step:.3f} | {1e3 * t_meas:.3f} "
            f"| {100 * t_meas / (args.every * t_step):.2f}% | {1e3 * t_reuse:.3f} "
            f"| {100 * t_reuse / (args.every * t_step):.2f}% |"
        )
    if args.repeats <= 0:
        return
    print(f"\n2. end to end ({args.steps} steps, median CPU time of {args.repeats} repeats)\n")
    print("| rule | off (s) | on (s) | overhead | on, reuse_step (s) | overhead | spread of off |")
    print("|---|---|---|---|---|---|---|")
    for rule in args.rules.split(","):
        runs: dict[str, list[float]] = {"off": [], "on": [], "reuse": []}
        for _ in range(args.repeats):
            runs["off"].append(train(rule, ds, args, 0)[0])
            runs["on"].append(train(rule, ds, args, args.every)[0])
            runs["reuse"].append(train(rule, ds, args, args.every, reuse=True)[0])
        off, on, reuse = (statistics.median(runs[k]) for k in ("off", "on", "reuse"))
        spread = 100 * (max(runs["off"]) - min(runs["off"])) / off
        print(
            f"| {rule} | {off:.3f} | {on:.3f} | {100 * (on - off) / off:+.2f}% | {reuse:.3f} "
            f"| {100 * (reuse - off) / off:+.2f}% | {spread:.1f}% |"
        )


if __name__ == "__main__":
    main()
