"""The trainer: every (rule, seed) pair of a config, trained and evaluated once per epoch.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per rule,
seed and epoch), ``alignment.csv`` (written by ``biograd.experiment.monitor.AlignmentMonitor``) and
``checkpoints/<rule>-seed<seed>.pt``. A checkpoint is written atomically at the end of every
epoch and holds ``state_dict``s and generator states only; ``resume=True`` restarts each pair
from its last checkpoint, and on the CPU the final weights are bit-identical to those of an
uninterrupted run. A non-finite loss raises ``DivergedError`` at once; the last checkpoint and
every row already written stay as they are.

Under ``torchrun`` the same code trains with DistributedDataParallel: ``data.batch_size`` is the
global batch, split evenly over the ranks (each rank takes every ``world``-th example of the
shared permutation, so an unaugmented run sees the same batches as on one process); losses and
accuracies are summed over ranks; rank 0 writes every file; a checkpoint holds the plain model's
``state_dict`` and resumes on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from .. import distributed
from ..convert import convert, needs_targets, set_targets, update_feedback
from ..errors import BiogradError, ConfigError, DivergedError
from ..rules import get_rule
from . import csvlog
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, config_changes, read_yaml, save_config

METRICS_COLUMNS = (
    "rule",
    "seed",
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "epoch_time_s",
    "lr",
)


DIVERGED_CSV = "diverged.csv"
DIVERGED_COLUMNS = ("rule", "seed", "epoch", "step", "loss", "limit")
"""``diverged.csv``: the (rule, seed) pairs whose loss diverged, where, and the limit it passed."""

append_row = csvlog.append_row


def checkpoint_path(run_dir: Path, rule: str, seed: int) -> Path:
    """Where the checkpoint of one (rule, seed) pair lives."""
    return run_dir / "checkpoints" / f"{rule}-seed{seed}.pt"


# --- building blocks --------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch; ``deterministic`` also asks torch for deterministic
    kernels (slower on GPUs; CPU runs are deterministic without it)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def load_data(cfg: Config) -> tuple[Any, Any]:
    """The train and test splits named by ``cfg.data`` (subsets drawn with seed 0, so that every
    seed and rule sees the same examples), normalised once here when no random crop follows.
    ``data.factory`` loads them from the user's code instead (``biograd.experiment.factory``).
    With ``data.validation`` the "test" split is that many held-out training examples."""
    from ..data import ImageDataset, load_dataset, resized, subset, validation_split

    d = cfg.data
    if d.factory is not None:
        from .factory import load_factory_data

        train, test = load_factory_data(cfg)
    else:
        train = load_dataset(
            d.name, root=d.root, split="train", download=d.download, in_memory=d.in_memory
        )
        test = (
            None
            if d.validation is not None
            else load_dataset(
                d.name, root=d.root, split="test", download=d.download, in_memory=d.in_memory
            )
        )
    if d.resize is not None:
        if not isinstance(train, ImageDataset) or not isinstance(test, (ImageDataset, type(None))):
            raise ConfigError(
                "data.resize needs an in-memory data set (not a streamed image folder)"
            )
        train = resized(train, d.resize)
        test = None if test is None else resized(test, d.resize)
    if d.validation is not None:  # evaluate on held-out training examples, never the test set
        train, test = validation_split(train, d.validation)
    if d.subset is not None:
        train = subset(train, d.subset, seed=0)
    if d.test_subset is not None:
        test = subset(test, d.test_subset, seed=0)
    if _normalize_once(cfg, train):
        train, test = _normalized(train), _normalized(test)
    return train, test


def _normalize_once(cfg: Config, ds: Any) -> bool:
    # Per-channel normalisation commutes with flips but not with zero-padded crops; an in-memory
    # set without crops is normalised once instead of batch by batch (the same numbers, faster).
    from ..data import ImageDataset

    a = cfg.data.augment
    return isinstance(ds, ImageDataset) and _has_stats(ds) and a.normalize and a.crop_padding == 0


def _has_stats(ds: Any) -> bool:
    # A factory's tensors carry no statistics (empty mean): they are used as returned.
    return bool(getattr(ds, "mean", ()))


def _normalized(ds: Any) -> Any:
    mean = torch.tensor(ds.mean, dtype=ds.x.dtype)[None, :, None, None]
    std = torch.tensor(ds.std, dtype=ds.x.dtype)[None, :, None, None]
    return dataclasses.replace(ds, x=(ds.x - mean) / std)


def loaders(cfg: Config, train: Any, test: Any, seed: int) -> tuple[Any, Any]:
    """Shuffled, augmented training batches (order fixed by ``seed`` and the epoch; this rank's
    share of each global batch under DDP) and test batches (the whole test set on every rank)."""
    from ..data import Augment, Loader

    a = cfg.data.augment
    normalize = a.normalize and _has_stats(train) and not _normalize_once(cfg, train)
    world = distributed.world_size()
    train_loader = Loader(
        train,
        cfg.data.batch_size // world,
        shuffle=True,
        seed=seed,
        augment=Augment(crop_padding=a.crop_padding, hflip=a.hflip, normalize=normalize),
        device=cfg.device,
        rank=distributed.rank(),
        world_size=world,
    )
    test_loader = Loader(
        test,
        cfg.data.test_batch_size,
        shuffle=False,
        augment=Augment(normalize=normalize) if normalize else None,
        device=cfg.device,
    )
    return train_loader, test_loader


def build(cfg: Config, rule: str, seed: int, in_shape: tuple[int, ...], classes: int) -> nn.Module:
    """The model of ``cfg.model`` (the zoo's, or ``model.factory``'s) on ``cfg.device``, converted
    to ``rule`` (plain ``bp`` with no alignment measurements keeps the torch layers: their autograd
    backward is backprop)."""
    from ..models import build_model

    m = cfg.model
    if m.factory is not None:
        from .factory import make_model

        model = make_model(m.factory, m.factory_kwargs(), in_shape, classes).to(cfg.device)
    else:
        try:
            model = build_model(m.name, in_shape=in_shape, classes=classes, **m.kwargs())
            model = model.to(cfg.device)
        except (TypeError, ValueError, RuntimeError) as e:  # a model argument it rejects
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"model {m.name!r} with {m.kwargs()}: {reason}") from None
    b = cfg.bottleneck
    if b.layer is not None:
        from ..bottleneck import apply_bottleneck

        try:
            apply_bottleneck(model, b.layer, b.keep, b.mode, seed=seed)
        except (AttributeError, TypeError, ValueError) as e:
            raise ConfigError(f"bottleneck: {e}") from None
    r = cfg.rule
    spec = get_rule(rule)
    if spec.exact_input_grad and not spec.direct and not r.overrides and cfg.alignment.every == 0:
        return model  # autograd is backprop; converting would only add Python to every step
    # direct feedback is drawn at the first forward pass; draw it now, before DDP wraps the model
    example = torch.zeros(2, *in_shape, device=cfg.device) if spec.direct else None
    try:
        return convert(
            model,
            rule,
            seed=seed if r.seed is None else r.seed,
            overrides=r.overrides,
            exclude=r.exclude,
            scale=r.scale,
            output=r.output,
            layout=r.layout,
            norm=r.norm,
            error=r.error,
            example_input=example,
            options=r.options,
        )
    except ValueError as e:  # convert's message names the bad option and the valid ones
        raise ConfigError(f"rule: {e}") from None


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optim`` over every parameter (kp's feedback included), wrapped by
    ``biograd.optim.wrap`` when a wrapper is asked for."""
    from ..optim import wrap

    o = cfg.optim
    return wrap(
        base_optimizer(cfg, list(model.parameters())),
        manhattan=o.manhattan,
        no_sign_change=o.no_sign_change,
        norm_constraint=model if o.weight_norm else None,
    )


def base_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer of ``cfg.optim`` (``ConfigError`` for settings torch rejects)."""
    o = cfg.optim
    try:
        if o.name == "sgd":
            return torch.optim.SGD(
                params,
                lr=o.lr,
                momentum=o.momentum,
                nesterov=o.nesterov,
                weight_decay=o.weight_decay,
            )
        if o.name == "adam":
            return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    except ValueError as e:  # e.g. nesterov without momentum, a beta outside [0, 1)
        raise ConfigError(f"optim: {e}") from None


def make_scheduler(cfg: Config, opt: torch.optim.Optimizer) -> Any:
    """The learning-rate schedule of ``cfg.schedule`` (stepped once per epoch), or None."""
    s = cfg.schedule
    if s.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=s.milestones, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return None


def placed(x: Tensor, device: str, channels_last: bool = False) -> Tensor:
    """A batch on ``device``, a 4-D one in channels_last memory format if asked for."""
    if channels_last and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Any], device: str, targets: bool,
    channels_last: bool = False,
) -> tuple[float, float]:  # fmt: skip
    """Mean cross-entropy and accuracy over ``batches``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in batches:
        x, y = placed(x, device, channels_last), y.to(device, non_blocking=True)
        if targets:
            set_targets(model, y)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)


def drop_rows(path: Path, rule: str, seed: int, after_epoch: int) -> None:
    """Remove the rows of (``rule``, ``seed``) with an epoch above ``after_epoch`` (rows of an
    epoch that a killed run did not finish) and a torn last line, atomically."""
    csvlog.drop_rows(
        path,
        lambda r: r["rule"] == rule and r["seed"] == str(seed) and float(r["epoch"]) > after_epoch,
        numeric=("epoch",),
    )


def parse_row(row: dict[str, str]) -> dict[str, Any]:
    """A ``metrics.csv`` row with numbers for its numeric columns."""
    out: dict[str, Any] = dict(row)
    for key in ("seed", "epoch", "step"):
        out[key] = int(float(row[key]))
    for key in METRICS_COLUMNS[4:]:
        out[key] = float(row[key])
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (empty when it does not exist; a torn last line dropped;
    ``DataError`` for a damaged file). ``metrics.csv`` rows are checked column by column."""
    if path.name == "metrics.csv":
        return csvlog.read_rows(path, numeric=METRICS_COLUMNS[1:], required=METRICS_COLUMNS)
    if path.name == "alignment.csv":
        from .monitor import CSV_COLUMNS

        return csvlog.read_rows(path, numeric=CSV_COLUMNS[6:], required=CSV_COLUMNS)
    return csvlog.read_rows(path)


def read_diverged(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``diverged.csv``: one per (rule, seed) whose last attempt diverged."""
    return csvlog.read_rows(run_dir / DIVERGED_CSV, required=DIVERGED_COLUMNS)


# --- one (rule, seed) pair --------------------------------------------------------------------


def train_one(
    cfg: Config,
    rule: str,
    seed: int,
    run_dir: Path,
    data: tuple[Any, Any],
    *,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``rule`` with ``seed``, continuing from its checkpoint if there is one; returns the
    last epoch's metrics row."""
    from .monitor import AlignmentMonitor

    cfg = cfg.for_rule(rule)
    seed_everything(seed, cfg.deterministic)
    train, test = data
    device = cfg.device
    model = build(cfg, rule, seed, tuple(train.shape), train.classes)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    main = distributed.is_main()
    net = distributed.wrap(model, torch.device(device))  # DDP under torchrun, else model itself
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    train_loader, test_loader = loaders(cfg, train, test, seed)
    targets = needs_targets(model)

    ckpt = checkpoint_path(run_dir, rule, seed)
    metrics_csv, alignment_csv = run_dir / "metrics.csv", run_dir / "alignment.csv"
    epoch, step = 0, 0
    initial: float | None = None  # the first step's loss: the divergence guard's reference
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            epoch, step = int(state["epoch"]), int(state["step"])
            initial = state.get("initial_loss")
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BiogradError(
                f"checkpoint {ckpt} does not fit this run ({reason}); delete it to restart"
            ) from None
    if main:
        drop_rows(metrics_csv, rule, seed, epoch)
        drop_rows(alignment_csv, rule, seed, epoch)
        csvlog.drop_rows(
            run_dir / DIVERGED_CSV, lambda r: r["rule"] == rule and r["seed"] == str(seed)
        )
    if epoch >= cfg.epochs:
        rows = [r for r in read_rows(metrics_csv) if r["rule"] == rule and r["seed"] == str(seed)]
        return parse_row(rows[-1]) if rows else {}

    monitor = AlignmentMonitor(  # rank 0 measures on its own batch, outside DDP
        model,
        F.cross_entropy,
        every=cfg.alignment.every if main else 0,
        csv_path=alignment_csv,
        tensorboard_dir=run_dir / "tensorboard" / f"{rule}-seed{seed}" if cfg.tensorboard else None,
        tags={"rule": rule, "seed": seed},
        reuse_step=True,  # backprop's pass only; the rule's side is read off the training step
    )
    writer = _tensorboard(run_dir, rule, seed) if cfg.tensorboard and main else None
    steps_per_epoch = len(train_loader)
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        initial=epoch * steps_per_epoch,
        desc=f"{rule:>6} seed {seed}",
        unit="step",
        disable=not (progress and main),
        dynamic_ncols=True,
        file=sys.stderr,
    )
    row: dict[str, Any] = {}
    shown: dict[str, Any] = {}  # the progress bar's postfix
    model.train()
    try:
        while epoch < cfg.epochs:
            train_loader.set_epoch(epoch)
            lr = opt.param_groups[0]["lr"]
            loss_sum, seen, measuring = 0.0, 0, 0.0
            correct = torch.zeros((), dtype=torch.int64, device=device)
            shown["epoch"] = f"{epoch + 1}/{cfg.epochs}"
            start = time.perf_counter()
            for x, y in train_loader:
                x, y = placed(x, device, cfg.channels_last), y.to(device, non_blocking=True)
                if targets:
                    set_targets(model, y)
                if monitor.enabled and step % monitor.every == 0:
                    t = time.perf_counter()
                    monitor.measure(step, epoch + 1, x, y)
                    measuring += time.perf_counter() - t
                out = net(x)
                loss = F.cross_entropy(out, y)
                value = _global_mean(loss)
                if initial is None and math.isfinite(value):
                    initial = value
                limit = cfg.diverge_factor * initial if cfg.diverge_factor and initial else math.inf
                if not math.isfinite(value) or value > limit:
                    if main:
                        append_row(
                            run_dir / DIVERGED_CSV,
                            {"rule": rule, "seed": seed, "epoch": epoch + 1, "step": step,
                             "loss": value, "limit": limit},
                            DIVERGED_COLUMNS,
                        )  # fmt: skip
                    raise DivergedError(
                        _diverged(
                            rule, seed, value, limit, cfg.diverge_factor, epoch + 1, step, ckpt
                        )
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                update_feedback(model)  # rules that learn after the step (wm's mirror step)
                step += 1
                loss_sum += value * len(y)
                correct += (out.argmax(1) == y).sum()
                seen += len(y)
                bar.update()
                if step % 10 == 0:
                    shown.update(loss=f"{value:.3f}", acc=f"{float(correct) / seen:.3f}")
                    bar.set_postfix(shown, refresh=False)
            epoch_time = time.perf_counter() - start - measuring  # training only
            monitor.flush()  # before the checkpoint, so that a resumed run loses no rows
            totals = distributed.all_reduce_sum(
                torch.tensor(
                    [loss_sum, float(correct), float(seen)], dtype=torch.float64, device=device
                )
            )
            loss_sum, n_correct, n_seen = float(totals[0]), float(totals[1]), float(totals[2])
            if sched is not None:
                sched.step()
            epoch += 1
            test_loss, test_acc = evaluate(model, test_loader, device, targets, cfg.channels_last)
            row = {
                "rule": rule,
                "seed": seed,
                "epoch": epoch,
                "step": step,
                "train_loss": loss_sum / n_seen,
                "train_acc": n_correct / n_seen,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "epoch_time_s": epoch_time,
                "lr": lr,
            }
            if main:
                append_row(metrics_csv, row, METRICS_COLUMNS)
                save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else {},
                        "rng": rng_state(),
                        "epoch": epoch,
                        "step": step,
                        "rule": rule,
                        "seed": seed,
                        "initial_loss": initial,
                    },
                    ckpt,
                )
            shown["test_acc"] = f"{test_acc:.3f}"
            bar.set_postfix(shown)
            if writer is not None:
                for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
                    writer.add_scalar(key, row[key], epoch)
            if on_epoch is not None:
                on_epoch(row)
    finally:
        bar.close()
        monitor.close()
        if writer is not None:
            writer.close()
    return row


def _global_mean(loss: Tensor) -> float:
    """The loss averaged over ranks (every rank then sees the same value and stops together when
    it is not finite); the plain value on one process."""
    if distributed.world_size() == 1:
        return loss.item()
    return distributed.all_reduce_sum(loss.detach().reshape(1)).item() / distributed.world_size()


def _diverged(
    rule: str,
    seed: int,
    value: float,
    limit: float,
    factor: float,
    epoch: int,
    step: int,
    ckpt: Path,
) -> str:
    kept = f"kept {ckpt}" if ckpt.exists() else "no checkpoint was written yet"
    why = (
        ""
        if not math.isfinite(value)
        else f" (above {limit:.4g} = diverge_factor {factor:g} x its first loss)"
    )
    return (
        f"{rule} seed {seed} diverged: loss {value:.4g} at epoch {epoch}, step {step}{why}; "
        f"{kept}; try a smaller optim.lr"
    )


def _tensorboard(run_dir: Path, rule: str, seed: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard" / f"{rule}-seed{seed}"))


# --- a whole run ------------------------------------------------------------------------------


# Keys that cannot change what a run computes: a run resumes when only these differ.
_RESULT_FREE = ("out", "plots", "tensorboard", "data.download")


def _result_free(key: str, cfg: Config) -> bool:
    from ..data.datasets import ROOT_INDEPENDENT

    return key in _RESULT_FREE or (key == "data.root" and cfg.data.name in ROOT_INDEPENDENT)


def prepare(cfg: Config, run_dir: Path, *, resume: bool) -> None:
    """Check that ``run_dir`` can take this run and write ``config.yaml`` (before anything else
    is written): a fresh run needs an unused directory; a resumed one the same config, keys that
    cannot change the result aside (``out``, ``plots``, the data root of a data set whose files
    are embedded or checksum-verified, ...). Call with the run's lock held."""
    saved = run_dir / "config.yaml"
    if (run_dir / "grid.yaml").exists():
        raise ConfigError(
            f"{run_dir} holds a reproduction grid (biograd reproduce), not a run; choose another "
            "output directory"
        )
    if saved.exists():
        if not resume:
            raise ConfigError(
                f"{run_dir} already holds a run; continue it with --resume, or choose another "
                "output directory"
            )
        changes = config_changes(read_yaml(saved), cfg)
        changed = sorted(k for k in changes if not _result_free(k, cfg))
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with another config (it differs in {', '.join(changed)}); "
                "choose another output directory"
            )
        return
    if (run_dir / "metrics.csv").exists():
        raise ConfigError(
            f"{run_dir} holds metrics.csv but no config.yaml; choose another directory"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)


def check_device(name: str) -> None:
    """``ConfigError`` unless torch can train on device ``name`` here."""
    device = torch.device(name)
    kind = device.type
    if kind == "cpu":
        return
    backend = getattr(torch, kind, None) if kind in ("cuda", "xpu", "mps") else None
    if backend is None:
        raise ConfigError(f"device={name}: biograd trains on cpu, cuda, xpu or mps")
    available = getattr(backend, "is_available", lambda: False)()
    if kind == "mps":
        available = torch.backends.mps.is_available()
    if not available:
        raise ConfigError(f"device={name}: torch sees no {kind} device here")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device={name}: torch sees {count} {kind} device(s) here")


def check(cfg: Config) -> None:
    """Errors that need no data: an unknown model or model option, a rule option that
    ``convert`` rejects, a device torch does not have."""
    from ..models import model_options

    for key, spec in (("model.factory", cfg.model.factory), ("data.factory", cfg.data.factory)):
        if spec is not None:  # a missing module or attribute fails before any data is read
            from .factory import resolve

            resolve(spec, key)
    valid = model_options(cfg.model.name) if cfg.model.factory is None else {}
    for key in cfg.model.kwargs() if cfg.model.factory is None else ():
        if key not in valid:
            import difflib

            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean 'model.{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key 'model.{key}' for model {cfg.model.name!r}{hint}"
            )
    for rule in cfg.run_rules():
        base_optimizer(cfg.for_rule(rule), [nn.Parameter(torch.zeros(1))])
    check_device(cfg.device)
    if cfg.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise ConfigError(
                "tensorboard=true needs the tensorboard package: pip install tensorboard"
            ) from None


def dry_build(cfg: Config, data: tuple[Any, Any]) -> None:
    """Build (and convert) the model of every rule once, so that a model argument or rule
    option that only the model or ``convert`` can check fails before the run directory is
    written (``ConfigError``)."""
    train = data[0]
    for rule in cfg.run_rules():
        build(cfg.for_rule(rule), rule, cfg.seeds[0], tuple(train.shape), train.classes)


def run(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every (rule, seed) pair of ``cfg`` into ``run_dir``; returns their last metrics rows
    and ``echo``es one summary line per pair; ``on_epoch`` gets every new metrics row.

    Raises ``ConfigError``/``DataError`` before anything is written, and ``RunLockedError``
    when another process writes ``run_dir`` (see :mod:`biograd.experiment.lock`). A pair whose
    loss diverges (not finite, or above ``diverge_factor`` times its first loss) stops and is
    recorded in ``diverged.csv``; the other pairs still train, and then ``DivergedError`` names
    the diverged ones (the run directory keeps everything written until then).
    """
    from .lock import RunLock

    run_dir = Path(run_dir)
    _, world = distributed.init()
    if cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is the global batch: it must divide evenly "
            f"over {world} ranks"
        )
    check(cfg)
    data = distributed.on_main_first(lambda: load_data(cfg))  # rank 0 downloads, then the rest
    assert data is not None
    if cfg.model.factory is not None:
        from .factory import check_model

        check_model(cfg, data[0])
    dry_build(cfg, data)
    lock = RunLock(run_dir)
    if distributed.is_main():
        lock.acquire()
    try:
        distributed.on_main_first(lambda: prepare(cfg, run_dir, resume=resume), others=False)
        lock.mark()
        return _train_all(cfg, run_dir, data, progress, echo, on_epoch)
    finally:
        lock.release()


def _train_all(
    cfg: Config,
    run_dir: Path,
    data: tuple[Any, Any],
    progress: bool,
    echo: Callable[[str], None] | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    if not distributed.is_main():
        echo = on_epoch = None
    results = []
    diverged: list[DivergedError] = []
    flags = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        for rule in cfg.run_rules():
            for seed in cfg.seeds:
                try:
                    row = train_one(
                        cfg, rule, seed, run_dir, data, progress=progress, on_epoch=on_epoch
                    )
                except DivergedError as e:  # this pair stops; the others still train
                    diverged.append(e)
                    if echo is not None:
                        echo(f"{rule:>6} seed {seed}: diverged, {str(e).partition(': ')[2]}")
                    continue
                results.append(row)
                if echo is not None and row:
                    echo(
                        f"{rule:>6} seed {seed}: test accuracy {100 * row['test_acc']:.2f}% "
                        f"after {row['epoch']} epochs ({row['epoch_time_s']:.2f} s/epoch)"
                    )
    finally:  # deterministic=true must not outlive the run in a library caller's process
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.benchmark = flags[1]
        torch.set_num_threads(threads)
    if len(diverged) == 1:
        raise diverged[0]
    if diverged:
        raise DivergedError(
            f"{len(diverged)} runs diverged (the others finished): "
            + "; ".join(str(e) for e in diverged)
        )
    return results


def final_state(run_dir: str | Path, rule: str, seed: int) -> dict[str, Tensor]:
    """The model ``state_dict`` of the last checkpoint of (``rule``, ``seed``)."""
    state: dict[str, Tensor] = load_checkpoint(checkpoint_path(Path(run_dir), rule, seed))["model"]
    return state
