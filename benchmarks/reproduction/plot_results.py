"""Plots of docs/results.md from the grid directories under runs/reproduce/."""

import csv
import re
import sys
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from biograd.experiment.config import read_yaml
from biograd.experiment.grid import grid_cells
from biograd.experiment.runner import Spec, grid_rows
from biograd.experiment.table import gradient_curves, late_angle

R, IMG = Path("runs/reproduce"), Path("docs/img")


def _folder(name):
    """A grid folder: a path (runs/reproduce/NAME-SCALE or an exported results folder), or a
    folder name under runs/reproduce/."""
    return Path(name) if Path(name).is_dir() else R / name


def rows_of(name):
    out = _folder(name)
    grid = read_yaml(out / "grid.yaml")
    return grid_rows(out, Spec.model_validate(grid["spec"]), str(grid["scale"]))


def lenet():
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    for ax, (name, title) in zip(
        fig.subplots(1, 2),
        [("lenet_mnist-cpu", "MNIST"), ("lenet_fashion_mnist-cpu", "Fashion-MNIST")],
    ):
        rows = rows_of(name)
        if (R / f"{name}_kp").exists():  # kp ran afterwards (--scale cpu_kp)
            rows += rows_of(f"{name}_kp")
        xs = range(len(rows))
        ax.bar(
            [x - 0.2 for x in xs],
            [r["published"] or 0 for r in rows],
            0.4,
            label="published (100 epochs)",
            color="0.6",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [r["ours"] for r in rows],
            0.4,
            yerr=[r["std"] for r in rows],
            label=f"ours ({rows[0]['epochs']} epoch, {rows[0]['seeds']} seeds)",
            color="tab:blue",
        )
        ax.set_xticks(list(xs), [r["rule"] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"LeNet, {title}")
        ax.legend(fontsize="small")
    fig.savefig(IMG / "results_lenet.png", dpi=100)


def _undated(folder):
    """A grid folder's name without an export's date prefix (``2026-12-02-``)."""
    return re.sub(r"^\d{4}-\d{2}-\d{2}-", "", folder.name)


def lenet_full(folder):
    """A committed 100-epoch LeNet grid (``benchmarks/results/...-cpu_full``): published vs ours
    (mean, std, and every seed as a dot) and the test-error curve of every finished cell."""
    folder = Path(folder)
    grid = read_yaml(folder / "grid.yaml")
    rows = rows_of(folder)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_bar, ax_curve = fig.subplots(1, 2)
    xs = range(len(rows))
    ax_bar.bar([x - 0.2 for x in xs], [r["published"] or 0 for r in rows], 0.4,
               label="published", color="0.6")  # fmt: skip
    ax_bar.bar([x + 0.2 for x in xs], [r["ours"] for r in rows], 0.4,
               yerr=[r["std"] or 0 for r in rows], label="ours (mean, std)", color="tab:blue")  # fmt: skip
    for x, r in zip(xs, rows):
        seeds = sorted(folder.glob(f"{r['setting']}/{r['rule']}-seed*/metrics.csv"))
        errs = [100 * (1 - float(list(csv.DictReader(p.open()))[-1]["test_acc"])) for p in seeds]
        ax_bar.plot([x + 0.2] * len(errs), errs, "k.", ms=4)
        for p in seeds:
            metrics = list(csv.DictReader(p.open()))
            ax_curve.plot([int(m["epoch"]) for m in metrics],
                          [100 * (1 - float(m["test_acc"])) for m in metrics],
                          lw=0.8, label=r["rule"] if p == seeds[0] else None,
                          color=f"C{x}")  # fmt: skip
    ax_bar.set_xticks(list(xs), [r["rule"] for r in rows])
    ax_bar.set_ylabel("test error (%) after 100 epochs")
    ax_bar.legend(fontsize="small")
    ax_curve.set_yscale("log")
    ax_curve.set_xlabel("epoch (lr / 10 at 50 and 75)")
    ax_curve.set_ylabel("test error (%)")
    ax_curve.legend(fontsize="small", ncol=2)
    name = grid["spec"]["title"].split(": ")[-1]
    fig.suptitle(f"{name}, the published protocol ({len(rows)} rules finished)")
    fig.savefig(IMG / f"results_{_undated(folder)}.png", dpi=100)


def _gradient_angles(run):
    """Per-layer gradient angle with backprop over training of a cell's run folder (one rule,
    one seed): {layer: [(step, angle), ...]} in step order."""
    return {layer: c for (_, _, layer), c in gradient_curves(run / "alignment.csv").items()}


def alignment(folder, setting="plain"):
    """Per-layer gradient angle with backprop over training, one panel per rule (seed 0 of
    ``setting`` in a grid folder: runs/reproduce/NAME-SCALE or an exported results folder), and
    a table of the last quarter of training (mean over those measurements and over every seed):
    first layer, each stage's mean, the last layer, the network."""
    folder = Path(folder)
    grid = read_yaml(folder / "grid.yaml")
    cells = grid_cells(Spec.model_validate(grid["spec"]), str(grid["scale"]))  # the spec's order
    cells = [c for c in cells if c.setting == setting and c.rule != "bp"]
    done = [c for c in cells if (c.dir(folder) / "alignment.csv").exists()]
    every = [(c, _gradient_angles(c.dir(folder))) for c in done]
    plotted = [(c, curves) for c, curves in every if c.seed == 0]
    fig = Figure(figsize=(max(3.2 * len(plotted), 7), 3.6), layout="constrained")
    axes = fig.subplots(1, len(plotted), sharey=True, squeeze=False)[0]
    for ax, (cell, curves) in zip(axes, plotted):
        layers = [k for k in curves if k != "<network>"]
        cmap = matplotlib.colormaps["viridis"]
        for i, layer in enumerate(layers):
            steps, angles = zip(*curves[layer])
            ax.plot(steps, angles, lw=0.8, color=cmap(i / max(len(layers) - 1, 1)))
        if "<network>" in curves:
            steps, angles = zip(*curves["<network>"])
            ax.plot(steps, angles, "k", lw=2, label="whole network")
        ax.set_title(cell.rule)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gradient angle with bp (deg)")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{folder.name}, {setting}: gradient angle of every layer (dark: first layers)")
    fig.savefig(IMG / f"results_{_undated(folder)}_{setting}_alignment.png", dpi=100)
    late: dict[str, list[dict[str, float]]] = {}
    for c, curves in every:
        late.setdefault(c.rule, []).append({k: late_angle(v) for k, v in curves.items()})
    stages: list[str] = []
    rows = []
    for rule, seeds in late.items():
        mean = {k: sum(s[k] for s in seeds) / len(seeds) for k in seeds[0]}
        layers = [k for k in mean if k != "<network>"]
        stages = sorted({k.split(".")[0] for k in layers if k.startswith("layer")})
        means = [
            sum(v for k, v in mean.items() if k.startswith(st + "."))
            / sum(1 for k in mean if k.startswith(st + "."))
            for st in stages
        ]
        values = [mean[layers[0]], *means, mean[layers[-1]], mean.get("<network>")]
        rows.append((f"{rule} ({len(seeds)})", values))
    print("last quarter of training, mean over measurements and seeds (seeds in brackets):")
    print("| rule | first layer | " + " | ".join(f"{st} (mean)" for st in stages)
          + " | last layer | network |")  # fmt: skip
    print("|---|" + "---:|" * (len(stages) + 3))
    for rule, values in rows:
        print(f"| {rule} | " + " | ".join("-" if v is None else f"{v:.0f}" for v in values) + " |")


def grid(name):
    """Test error of every setting, one bar per rule (mean over seeds, std as the error bar)."""
    folder = _folder(name)
    rows = rows_of(folder)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax = fig.subplots()
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    for i, rule in enumerate(rules):
        mine = {r["setting"]: r for r in rows if r["rule"] == rule}
        shown = [j for j, s in enumerate(settings) if s in mine]
        ax.bar(
            [j + (i - (len(rules) - 1) / 2) * 0.35 for j in shown],
            [mine[settings[j]]["ours"] for j in shown],
            0.35,
            yerr=[mine[settings[j]]["std"] or 0 for j in shown],
            label=rule,
        )
        for j in shown:
            if mine[settings[j]]["diverged"] and not mine[settings[j]]["seeds"]:
                x = j + (i - (len(rules) - 1) / 2) * 0.35
                ax.text(x, 1, "diverged", rotation=90, ha="center", va="bottom", fontsize="small")
    ax.set_xticks(range(len(settings)), settings, rotation=20)
    ax.set_ylabel("test error (%)")
    title = read_yaml(folder / "grid.yaml")["spec"]["title"]
    epochs = max(r["epochs"] for r in rows)
    ax.set_title(
        f"{title}\n{epochs} epochs, {len(rows)} cells; bars: std over seeds", fontsize="medium"
    )
    ax.legend()
    fig.savefig(IMG / f"results_{_undated(folder).removesuffix('-cpu')}.png", dpi=100)


def _bottleneck_rows(folder, mode):
    rows = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and p.name[1:].isdigit()):
        for run in sorted(p for p in d.iterdir() if (p / "alignment.csv").exists()):
            metrics = list(csv.DictReader((run / "metrics.csv").open()))
            curves = _gradient_angles(run)
            angles = {k: late_angle(v) for k, v in curves.items() if k != "<network>"}
            rows.append({
                "rule": metrics[-1]["rule"], "mode": mode, "width": int(d.name[1:]),
                "epochs": int(metrics[-1]["epoch"]), "test_acc": float(metrics[-1]["test_acc"]),
                "angle": angles.get("fc2"), "angles": angles,
            })  # fmt: skip
    return rows


def bottleneck(*names):
    """Bottleneck sweeps in one plot (dfa's late-training gradient angle of every hidden layer, and
    test error, against the bottleneck width b of fc2); a grid whose scale ends in ``nonorm``
    is the unnormalised feedback. A bare sweep name stands for its ``-cpu`` and
    ``-cpu_nonorm`` run folders. The table: test error / fc2's angle per cell, then dfa's
    late-training angle of every layer (mean over the last quarter of its measurements)."""
    if len(names) == 1 and not Path(names[0]).is_dir():
        names = tuple(
            f"{names[0]}-{s}" for s in ("cpu", "cpu_nonorm") if (R / f"{names[0]}-{s}").exists()
        )
    rows = []
    for name in names:
        folder = _folder(name)
        scale = str(read_yaml(folder / "grid.yaml")["scale"])
        rows += _bottleneck_rows(
            folder, "unnormalised" if scale.endswith("nonorm") else "normalised"
        )
    spec = read_yaml(_folder(names[0]) / "grid.yaml")["spec"]
    how = (spec["base"].get("bottleneck") or {}).get("mode", "filter")
    xlabel = {
        "filter": "b (fc2 learns b/800 of its weights)",
        "mask": "units of fc2 that learn (b)",
    }
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_angle, ax_err = fig.subplots(1, 2, sharex=True)
    dfa = sorted((r for r in rows if r["rule"] == "dfa"), key=lambda r: r["width"])
    layers = sorted({k for r in dfa for k in r["angles"] if k != "out"})
    for mode, ls in (("normalised", "-"), ("unnormalised", "--")):
        mine = [r for r in dfa if r["mode"] == mode]
        for i, layer in enumerate(layers):
            pts = [(r["width"], r["angles"][layer]) for r in mine if layer in r["angles"]]
            if pts:
                ax_angle.plot(*zip(*pts), ls, color=f"C{i + 2}", marker="o",
                              label=f"dfa {layer}" + (", unnormalised" if mode == "unnormalised" else ""))  # fmt: skip
    styles = {
        ("bp", "normalised"): ("tab:blue", "-"),
        ("dfa", "normalised"): ("tab:orange", "-"),
        ("dfa", "unnormalised"): ("tab:orange", "--"),
    }
    for (rule, mode), (color, ls) in styles.items():
        mine = sorted(
            (r for r in rows if r["rule"] == rule and r["mode"] == mode), key=lambda r: r["width"]
        )
        if mine:
            label = f"{rule}, feedback {mode}" if rule == "dfa" else rule
            xs = [r["width"] for r in mine]
            errors = [100 * (1 - r["test_acc"]) for r in mine]
            ax_err.plot(xs, errors, ls, color=color, marker="o", label=label)
    ax_angle.set_ylabel("gradient angle with bp, late in training (deg)")
    ax_err.set_ylabel("test error (%)")
    for ax in (ax_angle, ax_err):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel.get(how, "b"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    base = _undated(_folder(names[0])).rsplit("-", 1)[0]
    epochs = sorted({r["epochs"] for r in rows})
    fig.suptitle(
        f"Bottleneck sweep ({how}), launay_fc, {base.removeprefix('bottleneck_fc_')} "
        f"({'/'.join(map(str, epochs))} epochs, seed 0)"
    )
    fig.savefig(IMG / f"results_{base}.png", dpi=100)
    widths = sorted({r["width"] for r in rows})
    print("| feedback | rule | " + " | ".join(f"b={w}" for w in widths) + " |")
    print("|---|---|" + "---:|" * len(widths))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for rule in dict.fromkeys(r["rule"] for r in rows):
            mine = {r["width"]: r for r in rows if r["mode"] == mode and r["rule"] == rule}
            if mine:
                cells = " | ".join(
                    f"{100 * (1 - mine[w]['test_acc']):.1f} / {mine[w]['angle']:.0f}"
                    if w in mine and mine[w]["angle"] is not None else "-" for w in widths
                )  # fmt: skip
                print(f"| {mode} | {rule} | {cells} |")
    for mode in dict.fromkeys(r["mode"] for r in dfa):
        mine = {r["width"]: r for r in dfa if r["mode"] == mode}
        for layer in sorted({k for r in mine.values() for k in r["angles"]}):
            cells = " | ".join(
                f"{mine[w]['angles'][layer]:.0f}" if w in mine and layer in mine[w]["angles"]
                else "-" for w in widths
            )  # fmt: skip
            print(f"| {mode} | dfa, angle of {layer} | {cells} |")


def main(jobs):
    for job in jobs:
        if job == "lenet":
            lenet()
        elif job.startswith("alignment:"):
            alignment(*job.removeprefix("alignment:").split(","))
        elif job.startswith("lenet_full:"):
            lenet_full(job.removeprefix("lenet_full:"))
        elif job.startswith("grid:"):
            grid(job.removeprefix("grid:"))  # e.g. grid:benchmarks/results/DATE-fc_grid_cifar10-cpu
        elif job.startswith("bottleneck:"):
            bottleneck(*job.removeprefix("bottleneck:").split(","))
        elif job.startswith("fc_grid"):
            grid(job)  # a folder under runs/reproduce/, e.g. fc_grid_mnist-cpu
        elif job.startswith("bottleneck"):
            bottleneck(job)  # e.g. bottleneck_fc_mnist


if __name__ == "__main__":
    main(sys.argv[1:])
