"""Plots from run-directory CSV files, including ones written by the real AlignmentMonitor."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import biograd
from biograd.alignment import AlignmentMonitor
from biograd.experiment.plots import plot_alignment, plot_bottleneck, plot_metrics, read_csv

METRICS = (
    "rule", "seed", "epoch", "step", "train_loss", "train_acc",
    "test_loss", "test_acc", "epoch_time_s", "lr",
)  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_plot_metrics(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS)
        w.writeheader()
        for rule in ("bp", "fa", "dfa"):
            for seed in (0, 1):
                for epoch in (1, 2, 3):
                    w.writerow(
                        {
                            "rule": rule, "seed": seed, "epoch": epoch, "step": 10 * epoch,
                            "train_loss": 1.0 / epoch, "train_acc": 0.3 * epoch,
                            "test_loss": 1.1 / epoch, "test_acc": 0.25 * epoch + 0.01 * seed,
                            "epoch_time_s": 0.1, "lr": 0.1,
                        }
                    )  # fmt: skip
    written = plot_metrics(path, tmp_path / "plots")
    assert [p.name for p in written] == ["accuracy.png", "loss.png"]
    assert all(_is_png(p) for p in written)


def test_missing_or_empty_csv_plots_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    assert plot_metrics(tmp_path / "nope.csv", tmp_path) == []
    assert plot_alignment(tmp_path / "empty.csv", tmp_path) == []
    assert read_csv(tmp_path / "nope.csv") == []


def _train_with_monitor(rule: str, path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    biograd.convert(model, rule, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = AlignmentMonitor(
        model, F.cross_entropy, every=2, csv_path=path, tags={"rule": rule, "seed": seed}
    )
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for step in range(7):
        if rule == "drtp":
            biograd.set_targets(model, y)
        monitor.maybe_measure(step, 1, x, y)
        if rule == "drtp":
            biograd.set_targets(model, y)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    monitor.close()


def test_plot_alignment_from_monitor_rows(tmp_path: Path) -> None:
    path = tmp_path / "alignment.csv"
    for rule in ("bp", "fa", "dfa", "shallow"):
        for seed in (0, 1):
            _train_with_monitor(rule, path, seed)
    written = plot_alignment(path, tmp_path / "plots")
    assert sorted(p.name for p in written) == [
        "alignment_delta.png",
        "alignment_gradient.png",
        "alignment_network.png",
        "alignment_weight.png",
    ]
    assert all(_is_png(p) for p in written)


def test_plot_alignment_skips_figures_without_data(tmp_path: Path) -> None:
    path = tmp_path / "alignment.csv"
    with path.open("w", newline="") as f:
        f.write("rule,seed,epoch,step,layer,kind,angle,norm_ratio,delta_cos_mean,delta_cos_std\n")
        f.write("fa,0,1,0,fc1,weight,88.5,1.1,,\n")
        f.write("fa,0,1,5,fc1,weight,80.0,1.2,,\n")
    written = plot_alignment(path, tmp_path)
    assert [p.name for p in written] == ["alignment_weight.png"]


def test_plot_bottleneck(tmp_path: Path) -> None:
    rows = [
        {"rule": rule, "mode": "mask", "width": w, "seed": s, "angle": 80 - 5 * math.log2(w),
         "test_acc": 0.5 + 0.05 * math.log2(w)}
        for rule in ("bp", "dfa") for w in (1, 2, 4, 8) for s in (0, 1)
    ]  # fmt: skip
    path = plot_bottleneck(rows, tmp_path / "sub" / "bottleneck.png")
    assert _is_png(path)
    with pytest.raises(ValueError, match="no rows"):
        plot_bottleneck([], tmp_path / "x.png")
