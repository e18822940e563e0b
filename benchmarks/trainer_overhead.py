"""Overhead of ``biograd train`` over a minimal hand-written PyTorch loop (target: at most 1.05x).

Both train the same MLP on the same data with SGD + momentum, batch 32, for ``--epochs``
epochs, and evaluate on the test split after every epoch. The biograd side is the real
trainer (``biograd.experiment.trainer.run`` with rule ``bp``: conversion, progress bar, per-epoch
``metrics.csv`` row and atomic checkpoint, alignment off); the minimal loop indexes the same
in-memory tensors with a fresh permutation per epoch. Per-epoch cost is the process CPU time
between the ends of consecutive epochs, over epochs 2..E of ``--repeats`` interleaved repeats;
one torch thread. The headline is the minimum (other processes on a shared machine can only add
time, through caches and memory bandwidth), the median is printed next to it.

    python benchmarks/trainer_overhead.py [--data digits|mnist] [--data-dir DIR] [--epochs 6]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import platform
import statistics
import subprocess
import tempfile
import time

import torch
from torch.nn import functional as F

from biograd.data import load_dataset
from biograd.experiment.config import load_config
from biograd.experiment.trainer import run
from biograd.models import build_model


def biograd_epochs(args: argparse.Namespace) -> list[float]:
    """Per-epoch CPU times of the biograd trainer."""
    cfg = load_config(
        None,
        [
            f"data.name={args.data}",
            f"data.root={args.data_dir}" if args.data_dir else "data.root=null",
            f"data.batch_size={args.batch_size}",
            f"data.test_batch_size={args.batch_size * 32}",
            f"model.widths={args.widths}",
            "rule.name=bp",
            f"epochs={args.epochs}",
        ],
    )
    marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        marks.append(time.process_time())
        run(
            cfg,
            f"{tmp}/run",
            progress=True,
            echo=None,
            on_epoch=lambda _: marks.append(time.process_time()),
        )
    return [b - a for a, b in itertools.pairwise(marks[1:])]


def minimal_epochs(args: argparse.Namespace) -> list[float]:
    """Per-epoch CPU times of a minimal training loop on the same model and data."""
    train = load_dataset(args.data, root=args.data_dir, split="train")
    test = load_dataset(args.data, root=args.data_dir, split="test")
    mean = torch.tensor(train.mean)[None, :, None, None]
    std = torch.tensor(train.std)[None, :, None, None]
    x, y = (train.x - mean) / std, train.y
    xt, yt = (test.x - mean) / std, test.y
    torch.manual_seed(0)
    model = build_model(
        "mlp", in_shape=train.shape, classes=train.classes, widths=eval(args.widths)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    marks = [time.process_time()]
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(xt[i : i + 1024]).argmax(1) == yt[i : i + 1024]).sum())
                for i in range(0, len(yt), 1024)
            )
        assert correct > 0
        marks.append(time.process_time())
    return [b - a for a, b in itertools.pairwise(marks[1:])]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--widths", default="[256,256]")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)

    ours: list[float] = []
    plain: list[float] = []
    for _ in range(args.repeats):
        ours += biograd_epochs(args)
        plain += minimal_epochs(args)
    a, b = min(ours), min(plain)
    ma, mb = statistics.median(ours), statistics.median(plain)
    print(f"machine: {cpu_model()}, torch {torch.__version__}, 1 thread")
    print(
        f"data {args.data}, mlp {args.widths}, batch {args.batch_size}, {args.epochs} epochs x {args.repeats}"
    )
    print(
        f"biograd train (bp): min {a * 1e3:.1f} ms/epoch, median {ma * 1e3:.1f} ({len(ours)} epochs)"
    )
    print(
        f"minimal loop:       min {b * 1e3:.1f} ms/epoch, median {mb * 1e3:.1f} ({len(plain)} epochs)"
    )
    print(f"ratio: {a / b:.3f} on the minimum, {ma / mb:.3f} on the median (target <= 1.05)")


if __name__ == "__main__":
    main()
