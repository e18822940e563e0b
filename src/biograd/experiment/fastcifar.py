"""One command for the deep-convnet table on one GPU: BioTorch's ResNet-20 CIFAR-10 protocol for
bp, fa, dfa, usf, brsf and frsf, and the ResNet-56 row (bp, usf, fa), every cell a process on the
same GPU, on the CIFAR-10 JPEG proxy (tables say so).

    python -m biograd.experiment.fastcifar --data-dir DIR --out OUT        # any CUDA machine
    python -m biograd.experiment.fastcifar --data-dir DIR --out OUT --tiny # seconds, on the CPU

``DIR`` holds ``cifar10-jpeg/cifar10-jpeg.tar.gz`` or its unpacked folders (docs/data.md); it is
decoded once into the cache before the cells start. Protocol (Sanfiz & Akrout 2021, BioTorch;
He et al. 2016 for the 160-epoch schedule): 160 epochs, batch 128, SGD momentum 0.9, weight decay
1e-4, lr 0.1 (dfa 1e-3) divided by 10 at epochs 80 and 120, Xavier init of weights and feedback,
random crop (pad 4) and horizontal flip. What makes it fast, none of which changes the recipe:

- the whole data set lives on the device as uint8 (150 MB); shuffling, crops, flips and
  normalisation are done there on whole batches (the permutation and crops come from a device
  generator seeded by the cell's seed, so a cell is reproducible on the same GPU and software);
- channels_last, bf16 autocast (biograd's ops follow autocast like torch's own; weights,
  gradients, feedback and optimizer state stay float32, docs/scaling.md), ``torch.compile`` of
  the converted model (a cell whose compiled first step fails runs eager, and says so);
- every cell is its own process with ``max(1, cores // processes)`` CPU threads: the GPU runs one
  process's kernels while the others launch theirs.

Each cell writes ``OUT/<model>/<rule>-seed<seed>/`` (``metrics.csv`` in the trainer's columns,
one row per evaluated epoch; ``cell.yaml``: status, wall time, compiled or not, machine; and
``log.txt``); a finished cell is skipped when the command is run again. ``OUT/results.md`` puts
the published numbers next to ours. ``--tiny`` shrinks everything (1 epoch on 64 images, the CPU,
no compile, no autocast) for the test suite. See docs/scaling.md ("One-command GPU run").
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.nn import functional as F

#: BioTorch's published top-1 test error (%) on CIFAR-10 (Sanfiz & Akrout 2021).
PUBLISHED = {
    "resnet20": {"bp": 8.63, "fa": 32.16, "dfa": 45.94, "usf": 10.05, "brsf": 11.02, "frsf": 11.2},
    "resnet56": {"bp": 8.3, "usf": 8.2, "fa": 34.88},
}
COLUMNS = ("rule", "seed", "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc",
           "epoch_time_s", "lr")  # fmt: skip


@dataclass(frozen=True)
class Cell:
    model: str
    rule: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.rule}-seed{self.seed}"


def cells_of(args: argparse.Namespace) -> list[Cell]:
    """The cells the arguments ask for: ResNet-20 x ``--rules``, ResNet-56 x ``--deep-rules``."""
    out = []
    for seed in range(args.seeds):
        out += [Cell("resnet20", r, seed) for r in args.rules.split(",") if r]
        out += [Cell("resnet56", r, seed) for r in args.deep_rules.split(",") if r]
    return out


# --- one cell ---------------------------------------------------------------------------------


def gpu_augment(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop after zero-padding by ``pad`` and a random horizontal flip of a uint8 batch
    (B, C, H, W), on its own device."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device, generator=gen)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    flip = torch.rand(b, device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    x = (x.float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def train_cell(cell: Cell, args: argparse.Namespace, folder: Path) -> dict[str, object]:
    """Train one cell to the end; returns its ``cell.yaml`` record."""
    import biograd
    from biograd.data import ImageDataset, load_dataset, subset
    from biograd.models import build_model

    device = torch.device(args.device)
    torch.manual_seed(cell.seed)
    train = load_dataset("cifar10_jpeg", root=args.data_dir, split="train")
    test = load_dataset("cifar10_jpeg", root=args.data_dir, split="test")
    assert isinstance(train, ImageDataset) and isinstance(test, ImageDataset)
    if args.subset:
        train, test = subset(train, args.subset), subset(test, args.subset)
    to_u8 = lambda t: (t * 255).round().to(torch.uint8).to(device)  # noqa: E731 (exact: t = u/255)
    xtr, ytr, xte, yte = to_u8(train.x), train.y.to(device), to_u8(test.x), test.y.to(device)
    mean = torch.tensor(train.mean, device=device)[None, :, None, None]
    std = torch.tensor(train.std, device=device)[None, :, None, None]
    del train, test

    model: nn.Module = build_model(cell.model, in_shape=(3, 32, 32), classes=10, init="xavier")
    model = model.to(device)
    if cell.rule != "bp":
        example = torch.zeros(2, 3, 32, 32, device=device)
        model = biograd.convert(model, cell.rule, seed=cell.seed, scale="xavier",
                                example_input=example)  # fmt: skip
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    lr = args.dfa_lr if cell.rule == "dfa" else args.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    milestones = [args.epochs // 2, args.epochs * 3 // 4]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    amp = args.bf16 and device.type == "cuda"
    step_model = model
    compiled = False
    if args.compile:
        mode = None if args.compile_mode == "default" else args.compile_mode
        step_model = torch.compile(model, mode=mode)  # type: ignore[assignment]
        compiled = True
    gen = torch.Generator(device=device).manual_seed(cell.seed)
    n, batch = len(ytr), args.batch_size
    steps = n // batch + (n % batch > 0)
    metrics = folder / "metrics.csv"
    with metrics.open("w", newline="") as f:
        csv.writer(f).writerow(COLUMNS)
    start, step, status = time.perf_counter(), 0, "done"
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        lr_now = opt.param_groups[0]["lr"]
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            x = _normalise(gpu_augment(xtr[idx], gen), mean, std)
            y = ytr[idx]
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = step_model(x)
                    loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            except Exception as e:  # a compile that fails on the first step: run eager
                if not (compiled and step == 0):
                    raise
                print(f"torch.compile failed ({type(e).__name__}: {e}); running eager", flush=True)
                step_model, compiled = model, False
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = step_model(x)
                    loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach().float() * len(y)
            correct += (out.argmax(1) == y).sum()
        sched.step()
        train_loss = float(loss_sum) / n  # one sync an epoch
        epoch_time = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            status = "diverged"
            print(f"diverged at epoch {epoch + 1}", flush=True)
            break
        last = epoch + 1 == args.epochs
        if last or (epoch + 1) % args.eval_every == 0:
            test_loss, test_acc = evaluate(model, xte, yte, mean, std, amp, device)  # eager
            row = [cell.rule, cell.seed, epoch + 1, step, train_loss, int(correct) / n,
                   test_loss, test_acc, epoch_time, lr_now]  # fmt: skip
            with metrics.open("a", newline="") as f:
                csv.writer(f).writerow(row)
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f}, test acc {test_acc:.4f}, "
                  f"{epoch_time:.2f} s/epoch", flush=True)  # fmt: skip
    return {
        "cell": cell.name,
        "status": status,
        "wall_s": round(time.perf_counter() - start, 1),
        "epochs": args.epochs,
        "compiled": compiled,
        "bf16": amp,
        "device": str(device),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    mean: Tensor,
    std: Tensor,
    amp: bool,
    device: torch.device,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on (x uint8, y), in batches of 1000."""
    model.eval()
    loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(0, len(y), 1000):
        xb = _normalise(x[i : i + 1000], mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(xb)
        loss += F.cross_entropy(out.float(), y[i : i + 1000], reduction="sum")
        correct += (out.argmax(1) == y[i : i + 1000]).sum()
    model.train()
    return float(loss) / len(y), float(correct) / len(y)


# --- the grid ---------------------------------------------------------------------------------


def _folder(out: Path, cell: Cell) -> Path:
    return out / cell.model / f"{cell.rule}-seed{cell.seed}"


def _done(folder: Path) -> bool:
    path = folder / "cell.yaml"
    return path.is_file() and (yaml.safe_load(path.read_text()) or {}).get("status") in (
        "done",
        "diverged",
    )


def _flags(args: argparse.Namespace) -> list[str]:
    flags = ["--data-dir", str(args.data_dir), "--out", str(args.out), "--epochs", str(args.epochs),
             "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--dfa-lr", str(args.dfa_lr),
             "--eval-every", str(args.eval_every), "--device", args.device,
             "--subset", str(args.subset)]  # fmt: skip
    flags += ["--compile"] if args.compile else ["--no-compile"]
    flags += ["--compile-mode", args.compile_mode]
    flags += ["--bf16"] if args.bf16 else ["--no-bf16"]
    return flags


def run_grid(args: argparse.Namespace) -> int:
    """Run every unfinished cell as its own process (all at once, or ``--procs`` at a time),
    then write ``results.md``; returns the exit status."""
    from biograd.data import load_dataset

    from .grid import commit, machine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_dataset("cifar10_jpeg", root=args.data_dir, split="train")  # decode into the cache once
    load_dataset("cifar10_jpeg", root=args.data_dir, split="test")
    cells = [c for c in cells_of(args) if not _done(_folder(out, c))]
    procs = args.procs or max(1, len(cells))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // procs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    pending, failed = list(cells), []
    running: list[tuple[subprocess.Popen[bytes], Cell, Any]] = []
    while pending or running:
        while pending and len(running) < procs:
            cell = pending.pop(0)
            folder = _folder(out, cell)
            folder.mkdir(parents=True, exist_ok=True)
            log = (folder / "log.txt").open("wb")
            cmd = [sys.executable, "-m", "biograd.experiment.fastcifar", *_flags(args),
                   "--cell", cell.model, cell.rule, str(cell.seed), "--threads", str(threads)]  # fmt: skip
            running.append(
                (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), cell, log)
            )
            print(f"{cell.name}: started", flush=True)
        for item in list(running):
            proc, cell, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            ok = proc.returncode == 0 and _done(_folder(out, cell))
            if not ok:
                failed.append(cell)
            print(
                f"{cell.name}: {'finished' if ok else f'failed (exit {proc.returncode})'}",
                flush=True,
            )
        time.sleep(0.5)
    wall = time.perf_counter() - start
    text = results(out, args, wall, machine(), commit())
    (out / "results.md").write_text(text)
    print(text)
    if failed:
        print(f"failed: {', '.join(c.name for c in failed)} (see their log.txt)", file=sys.stderr)
        return 1
    return 0


def results(out: Path, args: argparse.Namespace, wall: float, where: dict, sha: str) -> str:
    """The table of ``out``: BioTorch's error next to ours (mean ± std over seeds)."""
    lines = [
        "# ResNet-20 / ResNet-56 on CIFAR-10 (JPEG proxy): BioTorch protocol on one GPU",
        "",
        f"Protocol: {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, wd 1e-4, lr "
        f"{args.lr} (dfa {args.dfa_lr}) /10 at epochs {args.epochs // 2} and {args.epochs * 3 // 4}, "
        f"Xavier, crop+flip; bf16 autocast: {args.bf16}, torch.compile: {args.compile}"
        + (f"; subset of {args.subset} images" if args.subset else "")
        + ".",
        f"Machine: {where.get('gpu', 'no GPU')} ({where.get('cpu')}, {where.get('cores')} cores), "
        f"torch {where.get('torch')}, commit {sha}. Wall time of this command: {wall / 60:.1f} min.",
        "Published: Sanfiz & Akrout 2021 (BioTorch), CIFAR-10 (official, not the JPEG proxy).",
        "",
        "| model | rule | published error (%) | ours (%) | difference | seeds | cell wall (min) | compiled |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    groups: dict[tuple[str, str], list[tuple[float, float, bool]]] = {}
    for cell in cells_of(args):
        folder = _folder(out, cell)
        if not _done(folder):
            continue
        info = yaml.safe_load((folder / "cell.yaml").read_text())
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        err = (
            100 * (1 - float(rows[-1]["test_acc"]))
            if rows and info["status"] == "done"
            else math.nan
        )
        groups.setdefault((cell.model, cell.rule), []).append(
            (err, info["wall_s"] / 60, info["compiled"])
        )
    for (model, rule), vals in groups.items():
        errs = [v[0] for v in vals]
        mean = sum(errs) / len(errs)
        std = (
            (sum((e - mean) ** 2 for e in errs) / (len(errs) - 1)) ** 0.5 if len(errs) > 1 else 0.0
        )
        pub = PUBLISHED.get(model, {}).get(rule)
        ours = (
            "diverged"
            if math.isnan(mean)
            else f"{mean:.2f}" + (f" ± {std:.2f}" if len(errs) > 1 else "")
        )
        diff = f"{mean - pub:+.2f}" if pub is not None and not math.isnan(mean) else "-"
        lines.append(
            f"| {model} | {rule} | {pub if pub is not None else '-'} | {ours} | {diff} | {len(errs)} | "
            f"{max(v[1] for v in vals):.1f} | {all(v[2] for v in vals)} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m biograd.experiment.fastcifar", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data-dir", required=True, help="folder holding cifar10-jpeg/ (docs/data.md)")
    p.add_argument("--out", required=True, help="output folder (tables, per-cell metrics)")
    p.add_argument("--epochs", type=int, default=160)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--rules", default="bp,fa,dfa,usf,brsf,frsf", help="ResNet-20 rules")
    p.add_argument("--deep-rules", default="bp,usf,fa", help="ResNet-56 rules ('' for none)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--dfa-lr", type=float, default=1e-3)
    p.add_argument(
        "--eval-every", type=int, default=20, help="test every N epochs (and at the end)"
    )
    p.add_argument("--procs", type=int, default=0, help="cells at once (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        help="torch.compile mode (reduce-overhead: CUDA graphs)",
    )
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--subset", type=int, default=0, help="train and test on this many images")
    p.add_argument("--tiny", action="store_true", help="1 epoch on 64 images on the CPU (tests)")
    p.add_argument("--cell", nargs=3, metavar=("MODEL", "RULE", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.epochs, args.subset, args.device, args.batch_size = 1, 64, "cpu", 32
        args.compile, args.bf16, args.eval_every = False, False, 1
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.cell is None:
        return run_grid(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .grid import commit, machine

    cell = Cell(args.cell[0], args.cell[1], int(args.cell[2]))
    folder = _folder(Path(args.out), cell)
    folder.mkdir(parents=True, exist_ok=True)
    record = train_cell(cell, args, folder)
    record.update(commit=commit(), machine=machine(), threads=torch.get_num_threads())
    (folder / "cell.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
