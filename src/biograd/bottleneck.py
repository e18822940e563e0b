"""The bottleneck study of Launay, Poli, Krzakala 2019 (Sec. 4): a narrow layer keeps direct
feedback alignment from aligning, and the accuracy drops with it.

Three ways to make one layer of a network narrow:

- ``filter`` (their method, ``bottleneck.py`` and ``dfatools/models.py`` of their code): the
  layer keeps its width, but only a fixed random ``keep / width`` of its weights and biases learn.
  Each element's gradient is multiplied by a 0/1 mask drawn once from the seed (their
  ``weight_filters``). Their backward hook also masked the gradient of the layer's *input*, at
  fixed (batch position, unit) entries, which changes backprop below the layer; we mask the
  parameters' gradients only.
- ``mask``: only the layer's first ``keep`` units learn: the delta at the layer's output is
  multiplied by a 0/1 mask, so the other units' weights receive no gradient (and, under backprop,
  no error flows below through them). The network's capacity is unchanged; only the number of
  units that must align shrinks.
- ``narrow``: the layer really has ``keep`` units (the next layer's inputs shrink with it).

:func:`apply_bottleneck` does either to a model, :func:`bottleneck_sweep` trains one model per
width and rule and returns rows ``(rule, mode, width, seed, angle, network_angle, test_acc,
...)`` for :func:`biograd.experiment.plots.plot_bottleneck`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .alignment import NETWORK, gradient_alignment
from .convert import convert, needs_targets, set_targets
from .direct import DirectFeedback
from .nn.layers import FeedbackLayer

MODES = ("filter", "mask", "narrow")


def _feature_dim(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return -1
    if isinstance(layer, nn.modules.conv._ConvNd):
        return 1
    raise TypeError(
        f"a bottleneck needs an nn.Linear or nn.ConvNd layer, got {type(layer).__name__}"
    )


def _width(layer: nn.Module) -> int:
    weight = layer.weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[0])


def _mask_hook(keep: int, dim: int) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if not (isinstance(out, Tensor) and out.requires_grad):
            return
        shape = [1] * out.dim()
        shape[dim] = out.shape[dim]
        mask = torch.zeros(shape, dtype=out.dtype, device=out.device)
        mask.narrow(dim, 0, keep).fill_(1)
        out.register_hook(lambda g: g * mask)

    return hook


class _Handles:
    """The hooks of one bottleneck, removed together."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _filter_hook(mask: Tensor) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        nonlocal mask  # follows the gradient's device (the model moved after the bottleneck)
        if mask.device != grad.device:
            mask = mask.to(grad.device)
        return grad * mask

    return hook


def _filter_hooks(module: nn.Module, keep: int, width: int, seed: int) -> _Handles:
    params = [p for p in (module.weight, getattr(module, "bias", None)) if isinstance(p, Tensor)]
    if any(p.is_meta for p in params):
        raise ValueError(
            "a 'filter' bottleneck hooks the layer's parameters, which materialising a meta "
            "model replaces: apply it after to_empty"
        )
    gen = torch.Generator().manual_seed(seed)
    handles = []
    for p in params:
        mask = torch.rand(p.shape, generator=gen) < keep / width  # on the CPU: any device
        handles.append(p.register_hook(_filter_hook(mask)))
    return _Handles(handles)


def remove_bottleneck(model: nn.Module, layer: str) -> None:
    """Remove a ``filter`` or ``mask`` bottleneck from ``layer`` (nothing happens if it has none)."""
    module = model.get_submodule(layer)
    handle = module.__dict__.pop("_biograd_bottleneck", None)
    if handle is not None:
        handle.remove()


def apply_bottleneck(
    model: nn.Module,
    layer: str,
    keep: int,
    mode: str = "filter",
    *,
    next_layer: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """Make ``layer`` of ``model`` a bottleneck of ``keep`` units, in place; returns ``model``.

    Args:
        model: the network; for ``narrow``, an unconverted model of ``nn.Linear`` layers
            (convert it afterwards).
        layer: module name of the layer to narrow.
        keep: ``filter``: the layer learns ``keep / width`` of its weights, as many as ``keep``
            units have; ``mask``: the number of output units (channels for a convolution) that
            learn; ``narrow``: the number that exist.
        mode: ``filter`` (Launay et al. 2019's code: a fixed random ``keep / width`` of the
            weights and biases receive gradient, drawn from ``seed``) or ``mask`` (only the first
            ``keep`` units receive gradient); both work on converted models and convolutions, and
            applying either again replaces the previous one. ``narrow``: the layer is rebuilt
            with ``keep`` outputs and default initialisation.
        next_layer: ``narrow`` only: the layer that reads ``layer``'s output (default: the next
            ``nn.Linear`` in module order); a ``BatchNorm1d`` of the old width between the two is
            rebuilt too.
        seed: ``filter`` only: seeds the draw of which weights learn (the same on every device).
    """
    if mode not in MODES:
        raise ValueError(f"unknown bottleneck mode {mode!r}; choose one of {', '.join(MODES)}")
    module = model.get_submodule(layer)
    dim = _feature_dim(module)
    width = _width(module)
    if not 1 <= keep <= width:
        raise ValueError(f"keep={keep} units of {layer!r}, which has {width}")
    if mode in ("filter", "mask"):
        remove_bottleneck(model, layer)
        hooks = (
            _filter_hooks(module, keep, width, seed)
            if mode == "filter"
            else module.register_forward_hook(_mask_hook(keep, dim))
        )
        module.__dict__["_biograd_bottleneck"] = hooks
        return model

    if any(isinstance(m, (FeedbackLayer, DirectFeedback)) for m in model.modules()):
        raise ValueError("apply a 'narrow' bottleneck before biograd.convert (it rebuilds layers)")
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"mode='narrow' rebuilds nn.Linear layers; {layer!r} is {type(module).__name__}"
        )
    names = [n for n, _ in model.named_modules()]
    modules = dict(model.named_modules())
    after = names[names.index(layer) + 1 :]
    if next_layer is None:
        next_layer = next((n for n in after if isinstance(modules[n], nn.Linear)), None)
        if next_layer is None:
            raise ValueError(f"no nn.Linear after {layer!r} to feed from the narrowed layer")
    nxt = modules[next_layer]
    if not isinstance(nxt, nn.Linear) or nxt.in_features != width:
        raise ValueError(f"{next_layer!r} does not read the {width} outputs of {layer!r}")
    between = after[: after.index(next_layer)] if next_layer in after else []
    ref = module.weight
    kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype}
    _replace(model, layer, nn.Linear(module.in_features, keep, module.bias is not None, **kw))
    _replace(model, next_layer, nn.Linear(keep, nxt.out_features, nxt.bias is not None, **kw))
    for name in between:
        m = modules[name]
        if isinstance(m, nn.BatchNorm1d) and m.num_features == width:
            _replace(
                model,
                name,
                nn.BatchNorm1d(keep, m.eps, m.momentum, m.affine, m.track_running_stats, **kw),
            )
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# --------------------------------------------------------------------------- training and sweep
@dataclass
class TensorData:
    """A classification problem held as tensors (small data sets: digits, MNIST subsets)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @classmethod
    def from_datasets(cls, train: Any, test: Any) -> TensorData:
        """From two ``biograd.data`` data sets (anything with ``x`` and ``y`` tensors)."""
        return cls(train.x, train.y, test.x, test.y)


def _needs_targets(model: nn.Module) -> bool:
    return needs_targets(model)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (eval mode, restored after)."""
    mode = model.training
    model.eval()
    try:
        correct = sum(
            int((model(xb).argmax(-1) == yb).sum())
            for xb, yb in zip(x.split(batch_size), y.split(batch_size))
        )
    finally:
        model.train(mode)
    return correct / max(len(y), 1)


def train_classifier(
    model: nn.Module,
    data: TensorData,
    *,
    epochs: int = 10,
    lr: float = 0.01,
    momentum: float = 0.9,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``model`` with SGD on cross-entropy, shuffled minibatches drawn from ``seed``; return
    ``{"train_loss": mean loss of the last epoch, "test_acc": ...}``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    targets = _needs_targets(model)
    model.train()
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        order = torch.randperm(len(data.y_train), generator=gen)
        for idx in order.split(batch_size):
            x, y = data.x_train[idx], data.y_train[idx]
            if targets:
                set_targets(model, y)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
    return {
        "train_loss": loss_sum / max(seen, 1),
        "test_acc": accuracy(model, data.x_test, data.y_test),
    }


Trainer = Callable[[nn.Module, TensorData, int], Mapping[str, float]]


def bottleneck_sweep(
    build: Callable[[], nn.Module],
    layer: str,
    widths: Iterable[int],
    data: TensorData,
    *,
    rules: Sequence[str] = ("dfa",),
    mode: str = "filter",
    seeds: Sequence[int] = (0,),
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 64,
    convert_kwargs: Mapping[str, Any] | None = None,
    train: Trainer | None = None,
    probe: int = 512,
    measure: str | None = None,
) -> list[dict[str, Any]]:
    """Train one model per (rule, seed, width) with ``layer`` made a bottleneck of ``width`` units,
    and measure its final alignment (Launay et al. 2019, Sec. 4, Fig. 4).

    Args:
        build: makes a fresh, unconverted model (called after ``torch.manual_seed(seed)``).
        layer: module name of the bottleneck layer.
        widths: the ``keep`` of :func:`apply_bottleneck` (``mode`` as there).
        data: the problem; alignment is measured on the first ``probe`` test samples.
        rules, seeds: every combination is trained.
        train: ``train(model, data, seed) -> {"test_acc": ..., ...}``; default
            :func:`train_classifier` with ``epochs``, ``lr`` and ``batch_size``.
        convert_kwargs: extra arguments of ``biograd.convert`` (e.g. ``example_input``).
        measure: the layer whose gradient angle goes into ``angle`` (default: ``layer``). A
            bottleneck limits the rank of the path from the layers below it to the output, so
            the layer below it is where DFA's alignment suffers; the bottleneck layer's own
            gradient under ``mask`` has only ``width`` rows, whose angle is small for trivial
            reasons.

    Returns:
        One row per run: ``rule, mode, layer, width, seed, measured, angle`` (the ``measure``
        layer's gradient angle with backprop, degrees), ``delta_cos_mean`` (its delta cosine),
        ``network_angle``, ``angles`` (every converted layer's gradient angle, by name) and the
        trainer's metrics (``test_acc``, ``train_loss``).
    """

    def default_train(model: nn.Module, d: TensorData, seed: int) -> Mapping[str, float]:
        return train_classifier(model, d, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)

    fit = train or default_train
    rows: list[dict[str, Any]] = []
    x_probe, y_probe = data.x_test[:probe], data.y_test[:probe]
    for rule in rules:
        for seed in seeds:
            for width in widths:
                torch.manual_seed(seed)
                model = build()
                apply_bottleneck(model, layer, width, mode, seed=seed)
                convert(model, rule, seed=seed, **dict(convert_kwargs or {}))
                metrics = dict(fit(model, data, seed))
                model.eval()
                grad = gradient_alignment(model, F.cross_entropy, x_probe, y_probe)
                values = grad.get(measure or layer, {})
                rows.append(
                    {
                        "rule": rule,
                        "mode": mode,
                        "layer": layer,
                        "width": width,
                        "seed": seed,
                        "measured": measure or layer,
                        "angle": values.get("angle", math.nan),
                        "delta_cos_mean": values.get("delta_cos_mean", math.nan),
                        "network_angle": grad[NETWORK]["angle"],
                        "angles": {k: v["angle"] for k, v in grad.items() if k != NETWORK},
                        **metrics,
                    }
                )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m biograd.bottleneck``: a bottleneck sweep on an MLP, written as CSV and PNG."""
    import argparse
    import csv
    from pathlib import Path

    from .data import load_dataset
    from .experiment.plots import plot_bottleneck
    from .models import build_model

    p = argparse.ArgumentParser(prog="python -m biograd.bottleneck", description=main.__doc__)
    p.add_argument("--data", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--hidden", default="256,256,256", help="widths of the MLP's hidden layers")
    p.add_argument("--layer", default="fc2", help="the bottleneck layer (module name)")
    p.add_argument("--measure", default="fc1", help="the layer whose alignment is reported")
    p.add_argument("--widths", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--rules", default="bp,fa,dfa")
    p.add_argument("--mode", choices=MODES, default="filter")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="runs/bottleneck", help="directory for bottleneck.csv/.png")
    args = p.parse_args(argv)

    train = load_dataset(args.data, root=args.data_dir, split="train")
    test = load_dataset(args.data, root=args.data_dir, split="test")
    data = TensorData.from_datasets(train, test)
    hidden = [int(w) for w in args.hidden.split(",")]

    def build() -> nn.Module:
        return build_model("mlp", in_shape=tuple(train.shape), classes=data.classes, widths=hidden)

    rows = bottleneck_sweep(
        build, args.layer, [int(w) for w in args.widths.split(",")], data,
        rules=args.rules.split(","), mode=args.mode, seeds=range(args.seeds), epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, measure=args.measure,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(rows[0]["angles"]) if rows else []
    for r in rows:
        r.update({f"angle_{k}": v for k, v in r["angles"].items()})
    columns = [
        "rule", "mode", "layer", "width", "seed", "measured", "angle", "delta_cos_mean",
        "network_angle", *(f"angle_{k}" for k in names), "train_loss", "test_acc",
    ]  # fmt: skip
    with (out / "bottleneck.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(
            f"{r['rule']:>6} width {r['width']:>4}: angle {r['angle']:6.1f}  "
            f"test acc {r['test_acc']:.3f}"
        )
    print(f"wrote {plot_bottleneck(rows, out / 'bottleneck.png')} and {out / 'bottleneck.csv'}")


if __name__ == "__main__":
    main()
