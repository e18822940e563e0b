"""Plots of a run directory, drawn from its CSV files alone (matplotlib, Agg; no pyplot state).

- :func:`plot_metrics`: accuracy and loss per epoch, one line per rule (mean over seeds, band
  of +- one standard deviation when there are several seeds).
- :func:`plot_alignment`: alignment per layer over training, one panel per rule: the gradient
  angle, the weight angle, the delta cosine (Launay, Poli, Krzakala 2019, Fig. 2-3), and the
  whole-network gradient angle of every rule on one axis.
- :func:`plot_bottleneck`: final alignment and accuracy against the width of one layer (the
  bottleneck effect of Launay et al. 2019, Sec. 4).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

NETWORK = "<network>"
_RULE_ORDER = ("bp", "fa", "usf", "frsf", "brsf", "kp", "dfa", "sdfa", "drtp", "shallow")


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file with a header; an empty list for a missing or empty file (a torn last
    line dropped, ``DataError`` for a damaged file: see :mod:`biograd.experiment.csvlog`)."""
    from .csvlog import read_rows

    return read_rows(path)


def _num(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _rules(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    seen = list(dict.fromkeys(str(r.get("rule", "")) for r in rows))
    known = [r for r in _RULE_ORDER if r in seen]
    return known + [r for r in seen if r not in known]


def rule_color(rule: str) -> Any:
    """A fixed colour per rule, the same in every plot of the project."""
    cmap = colormaps["tab10"]
    index = _RULE_ORDER.index(rule) if rule in _RULE_ORDER else hash(rule) % 10
    return cmap(index % 10)


def _mean_std(
    rows: Iterable[Mapping[str, Any]], x_key: str, y_key: str
) -> tuple[list[float], list[float], list[float]]:
    """x, mean of y over the rows sharing x (seeds), and its population std."""
    groups: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        x, y = _num(r.get(x_key)), _num(r.get(y_key))
        if math.isfinite(x) and math.isfinite(y):
            groups[x].append(y)
    xs = sorted(groups)
    means = [statistics.fmean(groups[x]) for x in xs]
    stds = [statistics.pstdev(groups[x]) if len(groups[x]) > 1 else 0.0 for x in xs]
    return xs, means, stds


def _line(ax: Axes, xs: list[float], ys: list[float], sd: list[float], **kw: Any) -> None:
    ax.plot(xs, ys, **kw)
    if any(s > 0 for s in sd):
        lo = [y - s for y, s in zip(ys, sd)]
        hi = [y + s for y, s in zip(ys, sd)]
        ax.fill_between(xs, lo, hi, alpha=0.2, color=kw.get("color"), linewidth=0)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_metrics(metrics_csv: str | Path, out_dir: str | Path) -> list[Path]:
    """``accuracy.png`` (train and test accuracy per epoch) and ``loss.png`` (train and test loss
    per epoch) from ``metrics.csv``; one line per rule, mean over seeds with a +-1 std band.
    Returns the files written (none when the CSV has no rows)."""
    rows = read_csv(metrics_csv)
    if not rows:
        return []
    out = Path(out_dir)
    written = []
    for name, keys, label in (
        ("accuracy.png", ("train_acc", "test_acc"), "accuracy"),
        ("loss.png", ("train_loss", "test_loss"), "loss"),
    ):
        fig = Figure(figsize=(10, 4), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, key in zip(axes, keys):
            for rule in _rules(rows):
                xs, ys, sd = _mean_std((r for r in rows if r["rule"] == rule), "epoch", key)
                if xs:
                    _line(ax, xs, ys, sd, color=rule_color(rule), label=rule, marker=".")
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(label)
        if label == "loss":
            positive = all(_num(r.get(k)) > 0 for r in rows for k in keys if r.get(k))
            if positive:
                axes[0].set_yscale("log")
        axes[-1].legend(fontsize="small")
        written.append(_save(fig, out / name))
    return written


def _layer_colors(layers: Sequence[str]) -> dict[str, Any]:
    cmap = colormaps["viridis"]
    n = max(len(layers) - 1, 1)
    return {layer: cmap(0.9 * i / n) for i, layer in enumerate(layers)}


def _rule_grid(n: int) -> tuple[Figure, list[Axes]]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _layer_panels(
    rows: list[dict[str, str]], kind: str, key: str, ylabel: str, path: Path
) -> Path | None:
    rows = [r for r in rows if r["kind"] == kind and math.isfinite(_num(r.get(key)))]
    if not rows:
        return None
    rules = _rules(rows)
    layers = [x for x in dict.fromkeys(r["layer"] for r in rows) if x != NETWORK]
    colors = _layer_colors(layers)
    fig, axes = _rule_grid(len(rules))
    for ax, rule in zip(axes, rules):
        mine = [r for r in rows if r["rule"] == rule]
        for layer in [*layers, NETWORK]:
            xs, ys, sd = _mean_std((r for r in mine if r["layer"] == layer), "step", key)
            if not xs:
                continue
            style: dict[str, Any] = (
                {"color": "black", "linestyle": "--", "label": "network"}
                if layer == NETWORK
                else {"color": colors[layer], "label": layer}
            )
            _line(ax, xs, ys, sd, **style)
        ax.set_title(rule)
        ax.grid(alpha=0.3)
        if key == "angle":
            ax.axhline(90, color="grey", linewidth=0.8, linestyle=":")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if len(labels) > 12:  # deep nets: first, middle, last layer and the network
        keep = {layers[0], layers[len(layers) // 2], layers[-1], "network"}
        pairs = [(h, lab) for h, lab in zip(handles, labels) if lab in keep]
        handles, labels = [h for h, _ in pairs], [lab for _, lab in pairs]
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", title="layer")
    return _save(fig, path)


def plot_alignment(alignment_csv: str | Path, out_dir: str | Path) -> list[Path]:
    """Alignment per layer over training from ``alignment.csv``; one panel per rule, one line per
    layer (mean over seeds; dark = first layer, light = last), the network angle dashed:

    - ``alignment_gradient.png``: angle between the rule's and backprop's weight gradients;
    - ``alignment_weight.png``: angle between W and B (direct rules: B_k and the linear path);
    - ``alignment_delta.png``: mean per-sample cosine of the rule's and backprop's deltas;
    - ``alignment_network.png``: the whole-network gradient angle of every rule on one axis.

    Returns the files written (a figure without data is skipped).
    """
    rows = read_csv(alignment_csv)
    if not rows:
        return []
    out = Path(out_dir)
    written = [
        _layer_panels(rows, kind, key, label, out / name)
        for kind, key, label, name in (
            ("gradient", "angle", "gradient angle (deg)", "alignment_gradient.png"),
            ("weight", "angle", "angle(W, B) (deg)", "alignment_weight.png"),
            ("gradient", "delta_cos_mean", "delta cosine", "alignment_delta.png"),
        )
    ]
    net = [r for r in rows if r["layer"] == NETWORK and math.isfinite(_num(r.get("angle")))]
    if net:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for rule in _rules(net):
            xs, ys, sd = _mean_std((r for r in net if r["rule"] == rule), "step", "angle")
            _line(ax, xs, ys, sd, color=rule_color(rule), label=rule)
        ax.axhline(90, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("step")
        ax.set_ylabel("network gradient angle with backprop (deg)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
        written.append(_save(fig, out / "alignment_network.png"))
    return [p for p in written if p is not None]


def plot_bottleneck(rows: Sequence[Mapping[str, Any]], out_path: str | Path) -> Path:
    """Final alignment and accuracy against the width of the bottleneck layer.

    ``rows``: dicts with ``width``, ``angle`` (degrees), ``test_acc`` and optionally ``rule``,
    ``mode``, ``measured`` (the layer the angle is of) and ``network_angle`` (as returned by
    ``biograd.bottleneck.bottleneck_sweep``);
    several seeds per width are averaged (band: +-1 std). The width axis is logarithmic.
    """
    if not rows:
        raise ValueError("plot_bottleneck: no rows to plot")
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_angle, ax_acc = fig.subplots(1, 2, sharex=True)
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(str(r.get("rule", "")), str(r.get("mode", "")))].append(r)
    widths = sorted({w for r in rows if math.isfinite(w := _num(r.get("width")))})
    for (rule, mode), mine in groups.items():
        label = " ".join(x for x in (rule, mode) if x) or None
        style = {"color": rule_color(rule), "marker": "o", "label": label}
        style["linestyle"] = "--" if mode == "narrow" else "-"
        xs, ys, sd = _mean_std(mine, "width", "angle")
        _line(ax_angle, xs, ys, sd, **style)
        xs, ys, sd = _mean_std(mine, "width", "test_acc")
        _line(ax_acc, xs, ys, sd, **style)
    measured = {str(r["measured"]) for r in rows if r.get("measured")}
    what = f"layer {measured.pop()}" if len(measured) == 1 else "measured layer"
    ax_angle.set_ylabel(f"{what}: gradient angle with backprop (deg)")
    ax_acc.set_ylabel("test accuracy")
    for ax in (ax_angle, ax_acc):
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [f"{w:g}" for w in widths])
        ax.set_xlabel("width of the bottleneck layer (units that learn)")
        ax.grid(alpha=0.3)
    if any(rule or mode for rule, mode in groups):
        ax_acc.legend(fontsize="small")
    return _save(fig, Path(out_path))
