"""Training-step time and peak memory of every learning rule relative to plain backprop.

For each benchmark network, one process holds one copy per rule (same initial weights, same
batch), converted with ``biograd.convert``, each with its own SGD optimizer. The rules are timed
interleaved (round-robin, rotating order) after a warm-up; the reported time is the median over all
timed steps (forward + cross-entropy + backward + optimizer step). The baseline ``bp`` is the
plain, unconverted torch model; ``bp (2nd copy)`` is a second plain copy (an A/A control: its
ratio shows the noise floor of the measurement); ``bp (converted)`` is ``convert(model, "bp")``,
the cost of the conversion machinery alone. Where ``dfa`` runs, ``dfa floor`` is the plain model
doing only the work DFA cannot avoid (``common.cut_inputs``: every feedback point's input
detached, autograd from the loss and from each point with a fixed gradient): the ratio
``dfa / floor`` is the DFA engine's own overhead.

    .venv/bin/python benchmarks/step_time.py                  # all cases, CPU, 1 thread
    .venv/bin/python benchmarks/step_time.py --threads 2      # 2 threads (wall clock)
    .venv/bin/python benchmarks/step_time.py --quick          # smoke run, seconds
    .venv/bin/python benchmarks/step_time.py --cases mlp,cnn --out runs/bench

Memory (``common.peak_bytes``): the peak of one step, on every device the trainee's own state
at the start of the step (parameters, buffers, optimizer state) plus the largest amount
allocated during the step and not yet freed: on CUDA from ``torch.cuda.max_memory_allocated``,
on the CPU from the allocator's events recorded by ``torch.profiler(profile_memory=True)``.
Also: the bytes autograd saves from the forward pass for the backward pass
(``common.saved_tensor_bytes``) and the persistent bytes after a step (parameters, gradients,
buffers, optimizer state).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import biograd
from common import (
    Trainee,
    cut_inputs,
    interleaved_times,
    library_model,
    machine,
    mib,
    mlp,
    peak_bytes,
    persistent_bytes,
    ratio_stats,
    saved_tensor_bytes,
    small_cnn,
    train_step,
)

FA_FAMILY = ("fa", "usf", "frsf", "kp")
ALL_RULES = ("bp", "fa", "usf", "frsf", "brsf", "kp", "dfa")
BASE = "bp"
CONVERTED_BP = "bp (converted)"
CONTROL = "bp (2nd copy)"  # a second plain model: its ratio shows the noise floor (A/A control)
FLOOR = "dfa floor"  # the work DFA cannot avoid (common.cut_inputs)


@dataclass
class Case:
    """One benchmark network with its batch, the rules to time and their targets (x bp)."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    batch: int
    rules: tuple[str, ...]
    targets: dict[str, float] = field(default_factory=dict)
    reps: int = 30
    inner: int = 1


def _targets(dfa: float | None) -> dict[str, float]:
    t = dict.fromkeys(FA_FAMILY, 1.03)
    t["brsf"] = 1.15
    if dfa is not None:
        t["dfa"] = dfa
    return t


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case(
            "mlp",
            "MLP 784-1024-1024-10 (ReLU)",
            lambda: mlp([784, 1024, 1024, 10]),
            (784,),
            256,
            ALL_RULES,
            _targets(None),
        ),
        Case(
            "cnn",
            "small CNN (conv32-conv64-fc256-fc10) on 3x32x32",
            small_cnn,
            (3, 32, 32),
            128,
            ALL_RULES,
            _targets(1.0),
        ),
        Case(
            "resnet20",
            "CIFAR ResNet-20 on 3x32x32",
            lambda: library_model("resnet20", (3, 32, 32), 10),
            (3, 32, 32),
            128,
            ALL_RULES,
            _targets(1.0),
            reps=10,
        ),
        Case(
            "dfa_mlp",
            "tanh MLP 784-8x1024-10",
            lambda: mlp([784] + [1024] * 8 + [10], act=nn.Tanh),
            (784,),
            256,
            ALL_RULES,
            {"dfa": 0.8},
        ),
    )
}


def _convert(model: nn.Module, rule: str, x: torch.Tensor) -> nn.Module:
    if biograd.get_rule(rule).direct:
        return biograd.convert(model, rule, seed=0, example_input=x[:2])
    return biograd.convert(model, rule, seed=0)


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time and measure every rule of ``case``; return one JSON-able record."""
    batch = args.batch or case.batch
    if args.quick:
        batch = max(2, batch // 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *case.in_shape), generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    torch.manual_seed(0)
    base_model = case.build().to(device)

    rules = [r for r in case.rules if args.rules is None or r in args.rules or r == BASE]
    labels = [BASE, CONTROL, CONVERTED_BP, *[r for r in rules if r != BASE]]
    models: dict[str, nn.Module] = {}
    for label in labels:
        model = copy.deepcopy(base_model)
        models[label] = model if label in (BASE, CONTROL) else _convert(model, label.split()[0], x)
    backward: dict[str, Callable[[torch.Tensor], None]] = {}
    if "dfa" in models:
        points = biograd.conversion_report(models["dfa"]).feedback_points
        models[FLOOR] = copy.deepcopy(base_model)
        backward[FLOOR] = cut_inputs(models[FLOOR], points)
        labels.insert(labels.index("dfa") + 1, FLOOR)
    trainees: list[Trainee] = []
    for label in labels:
        rule = biograd.get_rule(label.split()[0])
        model = models[label]
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        trainees.append(
            Trainee(
                label,
                model,
                opt,
                needs_targets=label != FLOOR and getattr(rule, "needs_targets", False),
                backward=backward.get(label),
            )
        )

    memory: dict[str, dict[str, int]] = {}
    for t in trainees:
        train_step(t, x, y)  # creates gradients and optimizer state
        peak = peak_bytes(t, x, y)
        memory[t.label] = {
            "peak": peak["peak"],
            "peak_increment": peak["increment"],
            "state": persistent_bytes(t.model, t.optimizer),
            "saved": saved_tensor_bytes(t, x, y),
        }

    reps = args.reps or (2 if args.quick else case.reps)
    inner = args.inner or (1 if args.quick else case.inner)
    warmup = 0 if args.quick else args.warmup

    def progress(rep: int) -> None:
        print(f"  {case.name}: repetition {rep + 1}/{reps}", file=sys.stderr, flush=True)

    interleaved_times(trainees, x, y, warmup=warmup, reps=reps, inner=inner, on_rep=progress)

    base = trainees[0]
    base_mem = memory[BASE]
    rows = []
    for t in trainees:
        stats = ratio_stats(t, base, args.clock)
        target = case.targets.get(t.label)
        mem = memory[t.label]
        rows.append(
            {
                "rule": t.label,
                "median_ms": 1e3 * statistics.median(t.times[args.clock]),
                "wall_ms": 1e3 * statistics.median(t.times["wall"]),
                "cpu_ms": 1e3 * statistics.median(t.times["cpu"]),
                "wall_ratio": ratio_stats(t, base, "wall")["ratio"],
                **stats,
                "target": target,
                "met": None if target is None else stats["ratio"] <= target,
                "steps": len(t.times["wall"]),
                "times_s": t.times,
                **{f"{k}_bytes": v for k, v in mem.items()},
                "peak_ratio": mem["peak"] / base_mem["peak"],
                "peak_over_bp_bytes": mem["peak"] - base_mem["peak"],
                "state_over_bp_bytes": mem["state"] - base_mem["state"],
            }
        )
    by_label = {t.label: t for t in trainees}
    floor = None
    if FLOOR in by_label:
        floor = ratio_stats(by_label["dfa"], by_label[FLOOR], args.clock)
    return {
        "case": case.name,
        "title": case.title,
        "batch": batch,
        "reps": reps,
        "inner": inner,
        "warmup": warmup,
        "clock": args.clock,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "dfa_over_floor": floor,
    }


def markdown(results: list[dict[str, Any]], info: dict[str, Any], device: torch.device) -> str:
    """The results as markdown tables, one per network."""
    lines = [
        f"Machine: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
        f"{info['threads']} thread(s), device {device}"
        + (f" ({info['gpu']})" if device.type == "cuda" and "gpu" in info else "")
        + f"; started {info['date_utc']}, 1-minute load average {info['load_average_1min']:.1f}.",
        "",
    ]
    for res in results:
        lines += [
            f"**{res['title']}** (batch {res['batch']}; {res['reps']} repetitions x "
            f"{res['inner']} steps per rule, {res['warmup']} warm-up; {res['clock']} time)",
            "",
            "| rule | median step ms | x bp | p10-p90 of x bp | target | met | x bp (wall) "
            "| x bp (fastest steps) | peak MiB | peak x bp | peak - bp's MiB "
            "| state - bp's MiB | saved for backward MiB |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            target = "" if r["target"] is None else f"<= {r['target']:.2f}"
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            lines.append(
                f"| {r['rule']} | {r['median_ms']:.1f} | {r['ratio']:.3f} | "
                f"{r['ratio_p10']:.3f}-{r['ratio_p90']:.3f} | {target} | {met} | "
                f"{r['wall_ratio']:.3f} | {r['ratio_min']:.3f} | {mib(r['peak_bytes'])} | "
                f"{r['peak_ratio']:.3f} | {mib(r['peak_over_bp_bytes'])} | "
                f"{mib(r['state_over_bp_bytes'])} | {mib(r['saved_bytes'])} |"
            )
        floor = res.get("dfa_over_floor")
        if floor is not None:
            lines += [
                "",
                f"dfa / dfa floor: {floor['ratio']:.3f} (p10-p90 of the per-repetition ratios "
                f"{floor['ratio_p10']:.3f}-{floor['ratio_p90']:.3f}; fastest steps "
                f"{floor['ratio_min']:.3f})",
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES)
    )
    parser.add_argument(
        "--rules", default=None, help="comma-separated subset of rules (bp is always run)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default: per case)")
    parser.add_argument("--inner", type=int, default=0, help="timed steps per rule and repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: per case)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="time the ratios use (default: cpu time on the CPU with 1 thread, else wall)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: batch/32, 2 repetitions")
    parser.add_argument("--out", type=Path, default=None, help="directory for step_time.{md,json}")
    args = parser.parse_args(argv)
    args.rules = None if args.rules is None else set(args.rules.split(","))

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals would slow some rules' steps for numeric reasons
    device = torch.device(args.device)
    if args.clock is None:
        args.clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    info = machine()
    info["flush_denormal"] = True

    results = []
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"unknown case {name!r}; choose from {', '.join(CASES)}")
        print(f"{name}: {CASES[name].title}", file=sys.stderr, flush=True)
        try:
            results.append(run_case(CASES[name], args, device))
        except RuntimeError as exc:
            if "build_model" not in str(exc):
                raise
            print(f"  skipped: {exc}", file=sys.stderr)
    text = markdown(results, info, device)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_time.md").write_text(text + "\n")
        record = {"machine": info, "device": str(device), "argv": sys.argv, "results": results}
        (args.out / "step_time.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
