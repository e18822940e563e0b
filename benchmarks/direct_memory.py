"""Memory and time of the feedback layouts of the direct rules (dense, shared, hashed).

Part 1: feedback memory of DFA for ResNet-18 on ImageNet shapes (3x224x224 inputs, 1000 classes),
per feedback point and in total, against the model's parameter memory. The sizes come from
``biograd.direct.feedback_sizes`` (one pass on the ``meta`` device), so the dense matrices are
never allocated; the hashed layout is then built for real (``biograd.convert`` with
``layout="hashed"``) and its buffers counted, and one DFA training step at batch 2 checks that it
runs at this scale.

Part 2: median training-step time of DFA in each layout on the small 32x32 CNN of
``step_time.py`` (batch 128), relative to plain backprop, timed interleaved in one process.

    .venv/bin/python benchmarks/direct_memory.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import biograd
from biograd.direct import LAYOUTS, DirectFeedback, feedback_memory, feedback_sizes
from common import (
    Trainee,
    interleaved_times,
    library_model,
    machine,
    mib,
    ratio_stats,
    small_cnn,
    train_step,
)

FLOAT_BYTES = 4


def engine_bytes(model: torch.nn.Module) -> int:
    """Bytes of the feedback buffers of every direct-feedback engine in ``model``."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, DirectFeedback))


def resnet18_memory(hashed_rows: int, step: bool) -> dict[str, Any]:
    """Feedback memory per layout for ResNet-18 at 224x224 with 1000 classes."""
    torch.manual_seed(0)
    model = library_model("resnet18", (3, 224, 224), 1000)
    shape = (1, 3, 224, 224)
    sizes, classes = feedback_sizes(model, shape)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    computed = {
        "dense": classes * sum(sizes.values()) * FLOAT_BYTES,
        "shared": classes * max(sizes.values()) * FLOAT_BYTES,
        "hashed": classes * hashed_rows * FLOAT_BYTES,
    }
    library = {
        layout: feedback_memory(model, shape, classes, layout, hashed_rows=hashed_rows)
        for layout in LAYOUTS
    }
    if library != computed:
        raise RuntimeError(f"feedback_memory {library} disagrees with the sizes {computed}")

    biograd.convert(
        model, "dfa", layout="hashed", hashed_rows=hashed_rows, example_input=torch.zeros(shape)
    )
    measured_hashed = engine_bytes(model)
    step_s = None
    if step:
        x = torch.randn(2, 3, 224, 224)
        y = torch.tensor([3, 999])
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        t = Trainee("dfa-hashed", model, opt)
        train_step(t, x, y)  # warm-up
        interleaved_times([t], x, y, warmup=0, reps=1, inner=1)
        step_s = t.times["wall"][0]
    return {
        "classes": classes,
        "param_bytes": param_bytes,
        "points": sizes,
        "bytes": computed,
        "measured_hashed_bytes": measured_hashed,
        "hashed_rows": hashed_rows,
        "dfa_hashed_step_s_batch2": step_s,
    }


def layout_times(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved step times of bp and DFA in each layout on the small CNN."""
    batch = 16 if args.quick else 128
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 3, 32, 32), generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    torch.manual_seed(0)
    base = small_cnn()
    trainees = []
    for label in ("bp", *(f"dfa-{layout}" for layout in LAYOUTS)):
        model = copy.deepcopy(base)
        if label != "bp":
            biograd.convert(model, "dfa", layout=label.split("-")[1], example_input=x[:2])
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        trainees.append(Trainee(label, model, opt))
    reps = 2 if args.quick else args.reps
    inner = 1
    interleaved_times(trainees, x, y, warmup=1 if args.quick else 3, reps=reps, inner=inner)
    rows = []
    for t in trainees:
        rows.append(
            {
                "rule": t.label,
                "median_ms": 1e3 * statistics.median(t.times[args.clock]),
                **ratio_stats(t, trainees[0], args.clock),
                "feedback_bytes": engine_bytes(t.model),
                "param_bytes": sum(p.numel() * 4 for p in t.model.parameters()),
            }
        )
    return {"batch": batch, "reps": reps, "inner": inner, "clock": args.clock, "rows": rows}


def _share(nbytes: int, of: int) -> str:
    return f"{nbytes / of:.1%}" if nbytes < of else f"{nbytes / of:.1f}x"


def markdown(mem: dict[str, Any], times: dict[str, Any], info: dict[str, Any]) -> str:
    """Both parts as markdown tables."""
    c, pbytes, b = mem["classes"], mem["param_bytes"], mem["bytes"]
    lines = [
        f"Machine: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
        f"{info['threads']} thread(s); {info['date_utc']}.",
        "",
        f"**DFA feedback memory, ResNet-18, 3x224x224 inputs, {c} classes** (float32; "
        f"parameters {mib(pbytes)} MiB; feedback points are the inputs of every converted layer "
        "but the first)",
        "",
        "| layout | entries | MiB | x parameter memory |",
        "|---|---:|---:|---:|",
    ]
    for layout in LAYOUTS:
        extra = f" (R = {mem['hashed_rows']} rows)" if layout == "hashed" else ""
        lines.append(
            f"| {layout}{extra} | {b[layout] // FLOAT_BYTES:,} | {mib(b[layout])} "
            f"| {_share(b[layout], pbytes)} |"
        )
    lines += [
        "",
        f"Hashed layout built for real: {mib(mem['measured_hashed_bytes'])} MiB of buffers"
        + (
            f"; one DFA step at batch 2 took {mem['dfa_hashed_step_s_batch2']:.1f} s."
            if mem["dfa_hashed_step_s_batch2"] is not None
            else "."
        ),
        "",
        "Per feedback point (dense layout: one (d_k, C) matrix each; the shared layout's single "
        "matrix is as large as the largest point's; the hashed layout has no per-point memory):",
        "",
        "| point (input of) | d_k | dense MiB | share of dense total |",
        "|---|---:|---:|---:|",
    ]
    total = b["dense"]
    for key, d in mem["points"].items():
        nbytes = d * c * FLOAT_BYTES
        lines.append(f"| {key} | {d:,} | {mib(nbytes)} | {nbytes / total:.1%} |")
    lines += [
        "",
        f"**DFA step time per layout, small CNN on 3x32x32, batch {times['batch']}** "
        f"({times['reps']} repetitions x {times['inner']} steps, {times['clock']} time)",
        "",
        "| rule | median step ms | x bp | p10-p90 of x bp | feedback KiB | parameters KiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in times["rows"]:
        lines.append(
            f"| {r['rule']} | {r['median_ms']:.1f} | {r['ratio']:.3f} | "
            f"{r['ratio_p10']:.3f}-{r['ratio_p90']:.3f} | {r['feedback_bytes'] / 1024:.0f} | "
            f"{r['param_bytes'] / 1024:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--hashed-rows", type=int, default=1024)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run (no ResNet-18 step)")
    parser.add_argument("--out", type=Path, default=None, help="directory for direct_memory.*")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    info = machine()

    print("ResNet-18 feedback memory ...", file=sys.stderr, flush=True)
    mem = resnet18_memory(args.hashed_rows, step=not args.quick)
    print("layout step times on the small CNN ...", file=sys.stderr, flush=True)
    times = layout_times(args)
    text = markdown(mem, times, info)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "direct_memory.md").write_text(text)
        record = {"machine": info, "argv": sys.argv, "resnet18": mem, "layout_times": times}
        (args.out / "direct_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
