"""The results table of a run directory, rebuilt from ``metrics.csv`` and ``alignment.csv`` alone:
per rule, the final test accuracy (mean ± sample std over seeds), the final gradient-alignment
angle of each layer with backprop (mean over seeds), and the training time per epoch."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .config import read_yaml
from .trainer import read_diverged, read_rows


@dataclass
class RuleSummary:
    """What one rule reached over its seeds."""

    rule: str
    seeds: list[int]
    epochs: int
    test_acc: list[float]
    epoch_time_s: float
    angles: dict[str, float] = field(default_factory=dict)
    diverged: list[int] = field(default_factory=list)
    """Seeds whose last attempt diverged (their row is the last epoch before it)."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_acc)

    @property
    def std(self) -> float:
        return statistics.stdev(self.test_acc) if len(self.test_acc) > 1 else 0.0


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """``"97.2 ± 0.4"`` (the sample std; the mean alone for one value)."""
    m = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.1f}"
    return f"{m:.1f} ± {scale * statistics.stdev(values):.1f}"


LATE_FRACTION = 0.25
"""The share of a run's alignment measurements averaged into its late-training angle."""


def gradient_curves(path: Path) -> dict[tuple[str, str, str], list[tuple[int, float]]]:
    """The gradient angle with backprop over training of every (rule, seed, layer) in an
    ``alignment.csv``: ``[(step, angle), ...]`` in step order (rows without an angle skipped)."""
    curves: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for row in read_rows(path):
        if row["kind"] == "gradient" and row["angle"] != "":
            key = (row["rule"], row["seed"], row["layer"])
            curves.setdefault(key, []).append((int(row["step"]), float(row["angle"])))
    for curve in curves.values():
        curve.sort(key=lambda point: point[0])
    return curves


def late_angle(curve: list[tuple[int, float]], fraction: float = LATE_FRACTION) -> float:
    """The mean angle over the last ``fraction`` of a curve's measurements (at least one).

    One batch's angle is a noisy reading: in the first convolutions of a ResNet-20 it scatters
    by tens of degrees between consecutive measurements (docs/results.md, section 3), so the
    last measurement alone does not say how aligned a layer ended."""
    tail = curve[-max(int(len(curve) * fraction), 1) :]
    return statistics.fmean(angle for _, angle in tail)


def summarize(run_dir: str | Path) -> list[RuleSummary]:
    """One summary per rule, in the order the rules appear in ``metrics.csv``."""
    run_dir = Path(run_dir)
    last: dict[tuple[str, str], dict[str, str]] = {}
    times: dict[tuple[str, str], list[float]] = {}
    for row in read_rows(run_dir / "metrics.csv"):
        key = (row["rule"], row["seed"])
        if key not in last or int(row["epoch"]) >= int(last[key]["epoch"]):
            last[key] = row
        times.setdefault(key, []).append(float(row["epoch_time_s"]))

    curves = gradient_curves(run_dir / "alignment.csv")

    diverged: dict[str, list[int]] = {}
    for row in read_diverged(run_dir):
        diverged.setdefault(row["rule"], []).append(int(float(row["seed"])))

    out: list[RuleSummary] = []
    for rule in dict.fromkeys(r for r, _ in last):
        seeds = [s for r, s in last if r == rule]
        rows = [last[(rule, s)] for s in seeds]
        layers: dict[str, list[float]] = {}
        for (r, s, layer), curve in curves.items():
            if r == rule and s in seeds:
                layers.setdefault(layer, []).append(curve[-1][1])
        out.append(
            RuleSummary(
                rule=rule,
                seeds=[int(s) for s in seeds],
                epochs=min(int(r["epoch"]) for r in rows),
                test_acc=[float(r["test_acc"]) for r in rows],
                epoch_time_s=statistics.fmean(t for s in seeds for t in times[(rule, s)]),
                angles={k: statistics.fmean(v) for k, v in layers.items()},
                diverged=sorted(diverged.get(rule, [])),
            )
        )
    return out


def markdown(summaries: list[RuleSummary]) -> str:
    """The summaries as a Markdown table (one row per rule)."""
    layers: list[str] = []
    for s in summaries:
        layers.extend(k for k in s.angles if k not in layers)
    seeds = max((len(s.seeds) for s in summaries), default=0)
    acc = "test acc. (%)" + (f", {seeds} seeds" if seeds > 1 else "")
    header = ["rule", acc, *(f"∠ {layer} (°)" for layer in layers), "s/epoch"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    for s in summaries:
        angles = [
            f"{s.angles[k]:.1f}" if k in s.angles and math.isfinite(s.angles[k]) else "-"
            for k in layers
        ]
        name = s.rule + (" (diverged)" if s.diverged else "")
        cells = [name, mean_std(s.test_acc), *angles, f"{s.epoch_time_s:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def early_stops(run_dir: str | Path) -> list[str]:
    """One line per (rule, seed) of the run's ``config.yaml`` that did not reach its last
    epoch: diverged (from ``diverged.csv``), or stopped (interrupted, or still running)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        return []
    cfg = read_yaml(path)
    epochs = cfg.get("epochs")
    rules = cfg.get("rules") or [(cfg.get("rule") or {}).get("name", "bp")]
    seeds = cfg.get("seeds") or [0]
    if not isinstance(epochs, int) or not isinstance(rules, list) or not isinstance(seeds, list):
        return []
    reached: dict[tuple[str, str], int] = {}
    for row in read_rows(run_dir / "metrics.csv"):
        key = (row["rule"], row["seed"])
        reached[key] = max(reached.get(key, 0), int(float(row["epoch"])))
    why = {(r["rule"], r["seed"]): r for r in read_diverged(run_dir)}
    lines = []
    for rule in rules:
        for seed in seeds:
            key = (str(rule), str(seed))
            done = reached.get(key, 0)
            if key in why:
                d = why[key]
                lines.append(
                    f"{rule} seed {seed} diverged in epoch {d['epoch']} (loss {float(d['loss']):.4g},"
                    f" limit {float(d['limit']):.4g}) after {done} of {epochs} epochs"
                )
            elif done < epochs:
                lines.append(
                    f"{rule} seed {seed} stopped after {done} of {epochs} epochs "
                    "(interrupted, or still running)"
                )
    return lines


def title(run_dir: Path) -> str:
    """A heading from the run's ``config.yaml`` (data, model, epochs, seeds)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return run_dir.name
    cfg = read_yaml(path)
    data, model = cfg.get("data", {}), cfg.get("model", {})
    options = ", ".join(f"{k}={v}" for k, v in model.items() if k != "name")
    seeds = cfg.get("seeds", [])
    return (
        f"{run_dir.name}: {data.get('name')}, {model.get('name')}"
        + (f" ({options})" if options else "")
        + f", {cfg.get('epochs')} epochs, {len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    )


def write_results(run_dir: str | Path) -> str:
    """Write ``results.md`` for ``run_dir`` and return the table."""
    run_dir = Path(run_dir)
    table = markdown(summarize(run_dir))
    note = (
        "Test accuracy after the last epoch; ∠ is the angle between the rule's weight update and "
        "backprop's on the last measured batch (0° = backprop; `<network>` = all layers at once)."
    )
    stops = early_stops(run_dir)
    if stops:
        table += "\n\nThis run stopped early: " + "; ".join(stops) + "."
    text = f"# {title(run_dir)}\n\n{table}\n\n{note}\n"
    (run_dir / "results.md").write_text(text)
    return table
