"""Training throughput (images/s) of every learning rule against backprop, on a GPU.

Workloads: CIFAR ResNet-20 on CIFAR-shaped batches (3x32x32, 10 classes, batch 128) and
ResNet-18 on ImageNet-shaped batches (3x224x224, 1000 classes, batch 256), each in every
combination of execution mode (``eager``, ``compile`` = ``torch.compile`` of the model) and
precision (``fp32``; ``bf16`` autocast; ``fp16`` autocast with a ``GradScaler``), channels_last.
One *group* is one (workload, mode, precision); within a group every rule gets its own copy of
the same initial model (``biograd.convert``; ``bp`` is the plain, unconverted torch model), its
own SGD optimizer and the same fixed random batch already on the device, so the numbers are the
compute throughput of a training step (forward, cross-entropy, backward, optimizer step), data
loading excluded. DFA uses the dense feedback layout on ResNet-20 and the hashed one on ResNet-18
(a dense one would need gigabytes; ``docs/direct.md``).

Timing: every rule first runs ``--warmup`` untimed steps (compilation happens there and is
reported separately). Then, for each of ``--reps`` repetitions, every rule runs ``--inner`` timed
steps, the order rotating by one per repetition. On CUDA each step is timed with CUDA events
(``torch.cuda.synchronize`` before and after each block); on the CPU with ``time.perf_counter``.
images/s = batch / median step time; "x bp" = images/s of the rule over images/s of ``bp`` in the
same group, with the 10th-90th percentile of the per-repetition ratios. Peak memory (CUDA only):
``torch.cuda.max_memory_allocated`` during one untimed step, minus what was allocated before it,
plus the model's own parameters, gradients, buffers and optimizer state, i.e. the peak of that
rule alone (the other rules' models live on the device too and are not counted).

A configuration that fails (conversion, compilation, out of memory, ...) is reported as an error
in the tables and the run goes on. Results are rewritten after every group, so a run stopped by
a time limit keeps what it measured.

    python benchmarks/gpu_throughput.py --out runs/gpu                     # full grid on CUDA
    python benchmarks/gpu_throughput.py --modes eager --out runs/gpu       # no compilation
    python benchmarks/gpu_throughput.py --quick --device cpu --out /tmp/g  # CPU smoke run

See docs/scaling.md ("GPU benchmark") for the command to run on the lent GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.utils
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import biograd
from biograd.models import build_model
from common import persistent_bytes, sync

BASE = "bp"
"""The baseline: the plain torch model, not converted."""
CONVERTED_BP = "bp-converted"
"""``bp`` through ``biograd.convert``: what the conversion itself costs."""
SKIPPED = "time budget (--max-minutes) spent before it started"
DEFAULT_RULES = ("bp", "fa", "usf", "frsf", "brsf", "kp", "dfa")
MODES = ("eager", "compile")
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Autocast dtype per precision; ``fp16`` also scales the loss with a ``GradScaler``."""


@dataclass(frozen=True)
class Workload:
    """A model with the input shape, classes and batch it is benchmarked at (full and --quick)."""

    name: str
    model: str
    title: str
    in_shape: tuple[int, int, int]
    classes: int
    batch: int
    dfa_layout: str
    quick_shape: tuple[int, int, int]
    quick_batch: int


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "resnet20", "resnet20", "CIFAR ResNet-20, 3x32x32, 10 classes",
            (3, 32, 32), 10, 128, "dense", (3, 16, 16), 4,
        ),
        Workload(
            "resnet18", "resnet18", "ResNet-18, 3x224x224, 1000 classes",
            (3, 224, 224), 1000, 256, "hashed", (3, 32, 32), 2,
        ),
    )
}  # fmt: skip


# ----------------------------------------------------------------------------- one rule
@dataclass
class Runner:
    """One rule's model, optimizer and measurements within a group."""

    rule: str
    module: nn.Module
    forward: Callable[[Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    needs_targets: bool
    times: list[float] = field(default_factory=list)
    rep_medians: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    warmup_s: float = 0.0
    graphs: int | None = None
    graph_breaks: int | None = None
    recompiles_timed: int | None = None
    peak_bytes: int | None = None
    peak_allocated_bytes: int | None = None


def train_step(r: Runner, x: Tensor, y: Tensor, amp: torch.dtype | None) -> None:
    """Forward (under autocast when ``amp`` is a dtype), cross-entropy, backward, SGD step."""
    r.optimizer.zero_grad(set_to_none=True)
    if r.needs_targets:
        biograd.set_targets(r.module, y)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        out = r.forward(x)
    loss = F.cross_entropy(out.float(), y)
    if r.scaler is not None:
        r.scaler.scale(loss).backward()
        r.scaler.step(r.optimizer)
        r.scaler.update()
    else:
        loss.backward()
        r.optimizer.step()


def timed_steps(
    r: Runner, x: Tensor, y: Tensor, amp: torch.dtype | None, steps: int
) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` training steps (CUDA events on CUDA, ``perf_counter``
    elsewhere) and the wall-clock seconds of the whole block, synchronized at both ends."""
    device = x.device
    sync(device)
    start = time.perf_counter()
    times: list[float] = []
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    for _ in range(steps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            train_step(r, x, y, amp)
            end.record()
            events.append((begin, end))
        else:
            t0 = time.perf_counter()
            train_step(r, x, y, amp)
            times.append(time.perf_counter() - t0)
    sync(device)
    wall = time.perf_counter() - start
    if events:
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    return times, wall


# ----------------------------------------------------------------------------- compilation
def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled so far, graph breaks so far) from dynamo's counters (process-wide)."""
    counters = torch._dynamo.utils.counters
    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def _raise_recompile_limits(limit: int) -> None:
    """Let dynamo compile every converted layer of every rule in a group: converted layers share
    one ``forward`` code object, and past the per-code-object limit dynamo silently runs it
    eagerly, which would time a half-compiled model under the name "compile"."""
    cfg: Any = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), 8 * limit))


def _private_forward(model: nn.Module, tag: str) -> nn.Module:
    """Give ``model`` a subclass of its class whose ``forward`` has its own code object.

    Dynamo caches compiled frames per code object. All rules' models in a group share their
    class's ``forward``, and the cache entry of a rule whose graph breaks (brsf) guards so little
    that another rule's model can match it and then runs frame by frame, recompiling while it is
    timed. With a private top-level code object per rule each model is compiled as it would be
    alone in its process.
    """
    cls = type(model)
    fn: Any = cls.forward
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    forward = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    forward.__qualname__ = f"{fn.__qualname__}_{tag}"
    model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return model


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:240]


# ----------------------------------------------------------------------------- one group
@dataclass
class Group:
    """One (workload, mode, precision) with its settings."""

    workload: Workload
    mode: str
    precision: str
    in_shape: tuple[int, int, int]
    batch: int


def _build(g: Group, rule: str, base: nn.Module, x: Tensor, args: argparse.Namespace) -> Runner:
    """Copy ``base``, put it on ``rule`` (``bp``: left plain), channels_last, optimizer, compile."""
    model = copy.deepcopy(base)
    name = rule.split("-")[0]
    spec = biograd.get_rule(name)
    if rule != BASE:
        if spec.direct:
            biograd.convert(
                model, name, seed=0, layout=g.workload.dfa_layout, example_input=x[:2].float()
            )
        else:
            biograd.convert(model, name, seed=0)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(x.device.type) if g.precision == "fp16" else None
    forward: Callable[[Tensor], Tensor] = model
    if g.mode == "compile":
        _private_forward(model, rule.replace("-", "_"))
        forward = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode)
    return Runner(
        rule, model, forward, optimizer, scaler, bool(getattr(spec, "needs_targets", False))
    )


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_group(
    g: Group,
    rules: list[str],
    args: argparse.Namespace,
    device: torch.device,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Build, warm up, measure the memory of, and time every rule of group ``g``; one row each.
    Rules not yet built when ``time.perf_counter()`` passes ``deadline`` are skipped."""
    amp = PRECISIONS[g.precision]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((g.batch, *g.in_shape), generator=gen).to(device)
    y = torch.randint(0, g.workload.classes, (g.batch,), generator=gen).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if g.mode == "compile":
        torch._dynamo.reset()
    torch.manual_seed(0)
    base = build_model(g.workload.model, in_shape=g.in_shape, classes=g.workload.classes)
    base = base.to(device)

    runners: list[Runner] = []
    failed: dict[str, str] = {}
    skipped: set[str] = set()
    for rule in rules:
        if deadline is not None and time.perf_counter() > deadline:
            skipped.add(rule)
            continue
        label = f"{g.workload.name}/{g.mode}/{g.precision}/{rule}"
        print(f"  {label}: build and warm up", file=sys.stderr, flush=True)
        try:
            r = _build(g, rule, base, x, args)
            graphs0, breaks0 = _dynamo_counts()
            start = time.perf_counter()
            for _ in range(args.warmup):
                train_step(r, x, y, amp)
            sync(device)
            r.warmup_s = time.perf_counter() - start
            if g.mode == "compile":
                graphs1, breaks1 = _dynamo_counts()
                r.graphs, r.graph_breaks = graphs1 - graphs0, breaks1 - breaks0
                r.recompiles_timed = 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                train_step(r, x, y, amp)
                torch.cuda.synchronize(device)
                r.peak_allocated_bytes = torch.cuda.max_memory_allocated(device)
                own = persistent_bytes(r.module, r.optimizer)
                r.peak_bytes = r.peak_allocated_bytes - before + own
            runners.append(r)
        except Exception as exc:  # one configuration failing must not end the run
            traceback.print_exc(file=sys.stderr)
            failed[rule] = _short(exc)
            _release(device)

    for rep in range(args.reps):
        n = len(runners)
        for r in [runners[(rep + i) % n] for i in range(n)]:
            try:
                graphs0, _ = _dynamo_counts()
                times, wall = timed_steps(r, x, y, amp, args.inner)
                if r.recompiles_timed is not None:
                    r.recompiles_timed += _dynamo_counts()[0] - graphs0
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                failed[r.rule] = _short(exc)
                runners.remove(r)  # frees its model and optimizer state
                del r
                _release(device)
                continue
            r.times.extend(times)
            r.rep_medians.append(statistics.median(times))
            r.wall_s += wall
        print(
            f"  {g.workload.name}/{g.mode}/{g.precision}: repetition {rep + 1}/{args.reps}",
            file=sys.stderr,
            flush=True,
        )

    by_rule = {r.rule: r for r in runners}
    base_runner = by_rule.get(BASE)
    rows = []
    for rule in rules:
        row: dict[str, Any] = _head(g, rule)
        done = by_rule.get(rule)
        if done is None or not done.times:
            if rule in skipped:
                rows.append({**row, "status": "skipped", "error": SKIPPED})
            else:
                rows.append({**row, "status": "error", "error": failed.get(rule, "no timed steps")})
            continue
        row.update(_measurements(done, base_runner, g.batch))
        rows.append(row)
    del runners, by_rule, base_runner, base
    _release(device)
    return rows


def _measurements(r: Runner, base: Runner | None, batch: int) -> dict[str, Any]:
    """The numbers of one rule, with ratios to ``base`` when it ran."""
    median_s = statistics.median(r.times)
    out: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "images_per_s": batch / median_s,
        "ms_per_step": 1e3 * median_s,
        "wall_images_per_s": batch * len(r.times) / r.wall_s if r.wall_s > 0 else None,
        "steps": len(r.times),
        "warmup_s": r.warmup_s,
        "peak_mib": None if r.peak_bytes is None else r.peak_bytes / 2**20,
        "peak_allocated_mib": (
            None if r.peak_allocated_bytes is None else r.peak_allocated_bytes / 2**20
        ),
        "dynamo_graphs": r.graphs,
        "graph_breaks": r.graph_breaks,
        "graphs_compiled_while_timed": r.recompiles_timed,
        "x_bp": None,
        "x_bp_p10": None,
        "x_bp_p90": None,
    }
    if base is not None:
        out["x_bp"] = statistics.median(base.times) / median_s
        paired = sorted(b / t for t, b in zip(r.rep_medians, base.rep_medians, strict=False))
        if paired:
            lo, hi = _deciles(paired)
            out["x_bp_p10"], out["x_bp_p90"] = lo, hi
    return out


def _deciles(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return q[0], q[-1]


# ----------------------------------------------------------------------------- report
def environment(device: torch.device) -> dict[str, Any]:
    """Device name, torch/CUDA/cuDNN versions and the numerics settings that change the speed."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            device_memory_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    return info


def _fmt(value: float | None, spec: str) -> str:
    return (
        ""
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _rate(images_per_s: float) -> str:
    """Images/s with three significant digits or more."""
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def markdown(record: dict[str, Any]) -> str:
    """Summary (x bp per rule and configuration) and detailed tables per group."""
    env, settings, rows = record["environment"], record["settings"], record["rows"]
    lines = [
        f"Device: {env['device_name']} ({env['device']}), torch {env['torch']}"
        + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else "")
        + f"; {env['date_utc']}.",
        f"Settings: warm-up {settings['warmup']} steps, {settings['reps']} repetitions x "
        f"{settings['inner']} timed steps per rule (interleaved), channels_last "
        f"{settings['channels_last']}, compile backend {settings['compile_backend']}"
        + (f" mode {settings['compile_mode']}" if settings["compile_mode"] else "")
        + (", --quick (small images, not representative)" if settings["quick"] else "")
        + ".",
        "",
    ]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["mode"], row["precision"]), []).append(row)
    for workload in dict.fromkeys(row["workload"] for row in rows):
        configs = [k for k in groups if k[0] == workload]
        rules = list(dict.fromkeys(row["rule"] for row in rows if row["workload"] == workload))
        first = groups[configs[0]][0]
        lines += [
            f"**{WORKLOADS[workload].title}** (run at {'x'.join(map(str, first['in_shape']))}, "
            f"batch {first['batch']}): images/s relative to bp in the same configuration",
            "",
            "| rule | " + " | ".join(f"{m} {p}" for _, m, p in configs) + " |",
            "|---|" + "---:|" * len(configs),
        ]
        for rule in rules:
            cells = []
            for key in configs:
                row = next((r for r in groups[key] if r["rule"] == rule), None)
                if row is None:
                    cells.append("")
                elif row["status"] != "ok":
                    cells.append("error" if row["status"] == "error" else row["status"])
                else:
                    ratio = _fmt(row["x_bp"], ".2f")
                    cells.append(f"{ratio} ({_rate(row['images_per_s'])}/s)")
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines.append("")
    for (workload, mode, precision), group in groups.items():
        lines += [
            f"**{workload}, {mode}, {precision}**",
            "",
            "| rule | images/s | x bp | p10-p90 x bp | ms/step | peak MiB | warm-up s "
            "| graphs (breaks) | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in group:
            if row["status"] != "ok":
                note = row["error"] or row["status"]
                lines.append(f"| {row['rule']} | {row['status']} |  |  |  |  |  |  | {note} |")
                continue
            spread = ""
            if row["x_bp_p10"] is not None:
                spread = f"{row['x_bp_p10']:.2f}-{row['x_bp_p90']:.2f}"
            graphs = ""
            if row["dynamo_graphs"] is not None:
                graphs = f"{row['dynamo_graphs']} ({row['graph_breaks']})"
            note = ""
            if row["graphs_compiled_while_timed"]:
                note = f"{row['graphs_compiled_while_timed']} graphs compiled while timed"
            lines.append(
                f"| {row['rule']} | {_rate(row['images_per_s'])} | {_fmt(row['x_bp'], '.3f')} | "
                f"{spread} | {row['ms_per_step']:.2f} | {_fmt(row['peak_mib'], '.0f')} | "
                f"{row['warmup_s']:.1f} | {graphs} | {note} |"
            )
        lines.append("")
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save(record: dict[str, Any], out: Path | None) -> str:
    """Markdown of ``record``; written with the JSON to ``out`` when given."""
    text = markdown(record)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "gpu_throughput.md", text + "\n")
        _write(out / "gpu_throughput.json", json.dumps(record, indent=2) + "\n")
    return text


# ----------------------------------------------------------------------------- command line
def _csv(choices: tuple[str, ...] | None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if choices is not None and s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"invalid {', '.join(bad) or 'empty list'}; choose from {', '.join(choices or ())}"
            )
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rules = (*biograd.RULES, CONVERTED_BP)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--models", type=_csv(tuple(WORKLOADS)), default=list(WORKLOADS))
    parser.add_argument(
        "--rules",
        type=_csv(rules),
        default=list(DEFAULT_RULES),
        help=f"comma-separated, from {', '.join(rules)} (bp is always run as the baseline)",
    )
    parser.add_argument(
        "--modes", type=_csv(MODES), default=None, help="eager,compile (--quick: eager)"
    )
    parser.add_argument(
        "--precisions",
        type=_csv(tuple(PRECISIONS)),
        default=["fp32", "bf16"],
        help="fp32, bf16 (autocast), fp16 (autocast + GradScaler)",
    )
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: per model)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--inner", type=int, default=None, help="timed steps per rule and rep (4)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW"
    )
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    parser.add_argument(
        "--recompile-limit", type=int, default=64, help="dynamo per-code-object recompile limit"
    )
    parser.add_argument(
        "--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
        help="leave torch.backends.cudnn.benchmark off",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="build no new rule after this many minutes (0: no limit); the rest is 'skipped'",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small images and batches, 1 warm-up, 2 reps x 1 step, eager only",
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for gpu_throughput.*")
    args = parser.parse_args(argv)
    if args.modes is None:
        args.modes = ["eager"] if args.quick else list(MODES)
    for name, full, quick in (("warmup", 3, 1), ("reps", 5, 2), ("inner", 4, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.reps < 1 or args.inner < 1 or args.warmup < 0:
        parser.error("--reps and --inner must be >= 1, --warmup >= 0")
    args.rules = [BASE, *[r for r in dict.fromkeys(args.rules) if r != BASE]]
    return args


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if "compile" in args.modes:
        _raise_recompile_limits(args.recompile_limit)
    settings = {
        k: getattr(args, k)
        for k in (
            "models", "rules", "modes", "precisions", "batch", "warmup", "reps", "inner", "lr",
            "channels_last", "compile_backend", "compile_mode", "recompile_limit", "quick",
        )
    }  # fmt: skip
    settings["argv"] = sys.argv[1:] if argv is None else list(argv)
    started = time.perf_counter()
    deadline = started + 60 * args.max_minutes if args.max_minutes > 0 else None
    text = ""
    with _cudnn_benchmark(args.cudnn_benchmark and device.type == "cuda"):
        record: dict[str, Any] = {
            "environment": environment(device),
            "settings": settings,
            "rows": [],
        }
        for mode in args.modes:
            for name in args.models:
                w = WORKLOADS[name]
                for precision in args.precisions:
                    g = Group(
                        w,
                        mode,
                        precision,
                        w.quick_shape if args.quick else w.in_shape,
                        args.batch or (w.quick_batch if args.quick else w.batch),
                    )
                    print(f"{name} {mode} {precision}", file=sys.stderr, flush=True)
                    if deadline is not None and time.perf_counter() > deadline:
                        rows = [_skipped(g, rule) for rule in args.rules]
                    else:
                        try:
                            rows = run_group(g, args.rules, args, device, deadline)
                        except Exception as exc:  # e.g. the model does not build
                            traceback.print_exc(file=sys.stderr)
                            rows = [_skipped(g, rule, "error", _short(exc)) for rule in args.rules]
                            _release(device)
                    record["rows"].extend(rows)
                    record["elapsed_s"] = time.perf_counter() - started
                    text = save(record, args.out)
    print(text)
    return 0


def _head(g: Group, rule: str) -> dict[str, Any]:
    """The columns that name one configuration of the grid."""
    return {
        "workload": g.workload.name,
        "model": g.workload.model,
        "mode": g.mode,
        "precision": g.precision,
        "rule": rule,
        "batch": g.batch,
        "in_shape": list(g.in_shape),
        "classes": g.workload.classes,
    }


def _skipped(g: Group, rule: str, status: str = "skipped", error: str = SKIPPED) -> dict[str, Any]:
    return {
        **_head(g, rule),
        "status": status,
        "error": error,
    }


if __name__ == "__main__":
    sys.exit(main())
