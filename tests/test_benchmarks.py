"""The CPU benchmark scripts run end to end in their quick mode and write their tables (the
numbers themselves are measured by hand and recorded in docs/performance.md)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from benchmark_scripts import load


def test_step_time_quick(tmp_path: Path) -> None:
    step_time = load("step_time")
    argv = ["--quick", "--cases", "mlp,resnet20", "--rules", "usf,dfa", "--out", str(tmp_path)]
    assert step_time.main(argv) == 0
    text = (tmp_path / "step_time.md").read_text()
    for rule in ("bp", "bp (2nd copy)", "bp (converted)", "usf", "dfa", "dfa floor"):
        assert f"| {rule} |" in text
    assert text.count("dfa / dfa floor:") == 2
    record = json.loads((tmp_path / "step_time.json").read_text())
    for case in record["results"]:
        rows = {r["rule"]: r for r in case["rows"]}
        assert rows["bp"]["peak_ratio"] == 1.0
        assert rows["bp (2nd copy)"]["peak_bytes"] == rows["bp"]["peak_bytes"]
        for r in rows.values():
            assert r["peak_bytes"] >= r["state_bytes"] > 0
        assert case["dfa_over_floor"]["ratio"] > 0


def test_peak_memory_counts_the_step_and_the_state() -> None:
    """The CPU peak is the state at the start plus what the step allocates: at least every
    gradient (allocated in the step, alive at its end), at most a few times the step's tensors."""
    common = load("common")
    torch.manual_seed(0)
    model = common.mlp([64, 256, 256, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    t = common.Trainee("bp", model, opt)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    common.train_step(t, x, y)  # momentum buffers exist from here on
    mem = common.peak_bytes(t, x, y)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert mem["start"] == 2 * params  # parameters + momentum; gradients were freed
    activations = 32 * (256 + 256 + 10) * 4 * 3  # outputs, activations, their gradients
    assert params <= mem["increment"] <= 2 * params + 4 * activations
    assert mem["peak"] == mem["start"] + mem["increment"]


def test_direct_memory_quick(tmp_path: Path) -> None:
    direct_memory = load("direct_memory")
    assert direct_memory.main(["--quick", "--reps", "2", "--out", str(tmp_path)]) == 0
    text = next(tmp_path.glob("direct_memory*.md")).read_text()
    assert "hashed" in text and "dense" in text


def test_fa_family_peak_is_backprops_plus_the_rules_state() -> None:
    """Issue 16, item 2, on a small MLP: a rule's peak exceeds plain backprop's by at most its
    own persistent state, plus brsf's transient bytes of one draw (a quarter of the largest
    weight). A B saved from the forward pass to the backward pass would add every layer's."""
    import copy

    import biograd

    common = load("common")
    torch.manual_seed(0)
    base = common.mlp([64, 512, 512, 10])
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    largest = 512 * 512 * 4

    def measure(rule: str) -> tuple[int, int]:
        model = copy.deepcopy(base)
        if rule != "bp":
            biograd.convert(model, rule, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        t = common.Trainee(rule, model, opt)
        common.train_step(t, x, y)
        peak = common.peak_bytes(t, x, y)["peak"]
        return peak, common.persistent_bytes(model, opt)

    bp_peak, bp_state = measure("bp")
    for rule in ("fa", "usf", "frsf", "brsf", "kp"):
        peak, state = measure(rule)
        assert peak - bp_peak <= state - bp_state + largest // 4, rule


def _finished_grid(tmp_path: Path, monkeypatch, name: str, spec: dict) -> tuple[Path, Any]:
    """``spec`` run to the end by ``biograd reproduce`` into ``tmp_path/name``, and
    plot_results.py loaded with its images going to ``tmp_path``."""
    import yaml

    from biograd.cli import main

    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    grid = tmp_path / name
    assert main(["reproduce", str(tmp_path / f"{name}.yaml"), "--out", str(grid)]) == 0
    plots = load("reproduction/plot_results")
    monkeypatch.setattr(plots, "IMG", tmp_path)
    return grid, plots


def test_result_plots_of_a_finished_grid(tmp_path: Path, monkeypatch, capsys) -> None:
    """benchmarks/reproduction/plot_results.py draws docs/results.md's grid plots (published vs
    ours with every seed and the test-error curves; per-layer alignment over training) and
    prints the alignment table, from a grid folder as `biograd reproduce` leaves it."""
    spec = {
        "title": "tiny: digits",
        "paper": "none",
        "base": {
            "data": {"name": "digits", "batch_size": 64, "subset": 256, "test_subset": 128},
            "model": {"name": "mlp", "widths": [16, 16]},
            "optim": {"lr": 0.05},
            "epochs": 2,
            "alignment": {"every": 1},
            "plots": False,
        },
        "rules": ["bp", "usf", "fa"],
        "seeds": [0],
        "rule_seeds": {"fa": [0, 1]},
        "published": {"default": {"bp": 5.0, "fa": 9.0}},
    }
    grid, plots = _finished_grid(tmp_path, monkeypatch, "tiny-full", spec)
    capsys.readouterr()
    plots.main([f"lenet_full:{grid}", f"alignment:{grid},default"])
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "results_tiny-full.png",
        "results_tiny-full_default_alignment.png",
    }
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("last quarter of training")
    table = out[1:]
    assert table[0].startswith("| rule | first layer |") and len(table) == 4
    # The spec's order, with the number of seeds averaged.
    assert [row.split(" | ")[0] for row in table[2:]] == ["| usf (1)", "| fa (2)"]
    assert all(float(c) >= 0 for row in table[2:] for c in row.strip("| ").split(" | ")[1:])
    # fa's network angle: the mean over its two seeds of the last quarter of its 8 measurements.
    late = []
    for seed in (0, 1):
        rows = csv.DictReader((grid / "default" / f"fa-seed{seed}" / "alignment.csv").open())
        net = [
            float(r["angle"]) for r in rows if r["kind"] == "gradient" and r["layer"] == "<network>"
        ]
        tail = net[-max(len(net) // 4, 1) :]
        late.append(sum(tail) / len(tail))
    assert table[3].strip("| ").split(" | ")[-1] == f"{sum(late) / 2:.0f}"


def test_grid_and_bottleneck_plots_of_a_finished_sweep(tmp_path: Path, monkeypatch, capsys) -> None:
    """plot_results.py's `grid:` and `bottleneck:` jobs read a grid folder (a run directory or an
    export): one bar per rule and setting; dfa's final angle of every layer and the test error
    by width, and a table with one `error / angle` cell per width and rule, then dfa's final
    angle of every layer."""
    spec = {
        "title": "tiny bottleneck: digits",
        "paper": "none",
        "base": {
            "data": {"name": "digits", "batch_size": 64, "subset": 256, "test_subset": 128},
            "model": {"name": "mlp", "widths": [16, 16]},
            "optim": {"lr": 0.05},
            "bottleneck": {"layer": "fc2", "mode": "mask"},
            "alignment": {"every": 2},
            "epochs": 1,
            "plots": False,
        },
        "rules": ["bp", "dfa"],
        "settings": {"b2": {"bottleneck.keep": 2}, "b16": {"bottleneck.keep": 16}},
        "seeds": [0],
    }
    grid, plots = _finished_grid(tmp_path, monkeypatch, "2026-01-01-tinyb-full", spec)
    capsys.readouterr()
    plots.main([f"bottleneck:{grid}"])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| feedback | rule | b=2 | b=16 |"
    assert [row.split(" | ")[1] for row in table[2:]] == [
        "bp", "dfa", "dfa, angle of fc1", "dfa, angle of fc2", "dfa, angle of out"
    ]  # fmt: skip
    bp_angles = [float(c.split(" / ")[1]) for c in table[2].strip("| ").split(" | ")[2:]]
    assert bp_angles == [0.0, 0.0]
    fc2 = [float(c.split(" / ")[1]) for c in table[3].strip("| ").split(" | ")[2:]]
    assert [float(c) for c in table[5].strip("| ").split(" | ")[2:]] == fc2  # every layer's
    assert (tmp_path / "results_tinyb.png").is_file()
    (tmp_path / "results_tinyb.png").unlink()
    plots.main([f"grid:{grid}"])
    assert (tmp_path / "results_tinyb-full.png").is_file()
