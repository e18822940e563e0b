"""Grids of cells: ``biograd reproduce --list / --cell K / --jobs N / --export / --results-from``
on a tiny digits spec (seconds), including a grid interrupted mid-cell that resumes without
rerunning finished cells."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from biograd.cli import main
from biograd.errors import ConfigError
from biograd.experiment.grid import _sweep_choice, grid_cells, run_cell, status
from biograd.experiment.runner import Spec, load_spec
from biograd.experiment.trainer import prepare, read_rows

SPEC = {
    "title": "tiny grid",
    "paper": "none",
    "base": {
        "data": {"name": "digits", "batch_size": 64, "subset": 256, "test_subset": 128},
        "model": {"name": "mlp", "widths": [16]},
        "optim": {"lr": 0.05},
        "epochs": 3,
        "threads": 1,
        "plots": False,
    },
    "rules": ["bp", "fa"],
    "settings": {"narrow": {"model.widths": [8]}, "wide": {"model.widths": [32], "rules": ["fa"]}},
    "seeds": [0],
    "rule_seeds": {"fa": [0, 1]},
    "published": {"narrow": {"bp": 5.0}},
    "scales": {"one": {"overrides": {"epochs": 1}}, "narrow": {"settings": ["narrow"]}},
}


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def metrics(folder: Path) -> list[dict[str, str]]:
    return read_rows(folder / "metrics.csv")


def test_cells_are_numbered_and_settings_restrict_rules(spec_path: Path) -> None:
    cells = grid_cells(load_spec(spec_path), "full")
    names = [c.name for c in cells]
    assert names == [
        "narrow/bp-seed0",
        "narrow/fa-seed0",
        "narrow/fa-seed1",
        "wide/fa-seed0",
        "wide/fa-seed1",
    ]  # setting, then seed, then rule
    assert [c.index for c in cells] == list(range(5))
    assert all(c.config.run_rules() == [c.rule] and c.config.seeds == [c.seed] for c in cells)


def test_list_and_one_cell(
    spec_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grid"
    args = ["reproduce", str(spec_path), "--out", str(out)]
    assert main([*args, "--list"]) == 0
    listing = capsys.readouterr().out
    assert "5 todo" in listing and "narrow" in listing
    assert main([*args, "--cell", "2"]) == 0
    (cell,) = [c for c in grid_cells(load_spec(spec_path), "full") if c.index == 2]
    rows = metrics(cell.dir(out))
    assert [(r["rule"], r["seed"], r["epoch"]) for r in rows] == [
        ("fa", "1", str(e)) for e in (1, 2, 3)
    ]
    assert yaml.safe_load((cell.dir(out) / "cell.yaml").read_text())["status"] == "done"
    assert not (out / "narrow" / "bp-seed0").exists()  # only cell 2 ran
    capsys.readouterr()
    assert main([*args, "--list"]) == 0
    listing = capsys.readouterr().out
    line = next(x for x in listing.splitlines() if x.strip().startswith("2 "))
    assert "done" in line
    assert "1 done, 4 todo" in listing
    assert main([*args, "--cell", "9"]) == 2  # out of range: one-line error
    assert "--cell 9" in capsys.readouterr().err


def test_jobs_2_end_to_end_and_resume_after_a_kill(
    spec_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grid"
    spec = load_spec(spec_path)
    cells = grid_cells(spec, "narrow")  # 3 cells: one finished, one killed, one to run
    # cell 0 finishes; cell 1 is interrupted after its first epoch (as a SIGKILL would leave it:
    # a checkpoint, one metrics row, no cell.yaml)
    assert run_cell(cells[0], out, echo=None) == "done"
    finished_rows = (cells[0].dir(out) / "metrics.csv").read_bytes()
    finished_record = (cells[0].dir(out) / "cell.yaml").read_bytes()

    def kill_after_first_epoch(row: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cell(cells[1], out, echo=None, on_epoch=kill_after_first_epoch)
    assert status(cells[1], out).state == "partial" and status(cells[1], out).epochs == 1
    first = metrics(cells[1].dir(out))

    assert (
        main(["reproduce", str(spec_path), "--scale", "narrow", "--out", str(out), "--jobs", "2"])
        == 0
    )
    for c in cells:
        assert status(c, out).state == "done", c.name
        epochs = [int(r["epoch"]) for r in metrics(c.dir(out))]
        assert epochs == [1, 2, 3], c.name  # every epoch exactly once
    # the finished cell was not run again, the partial one continued from its checkpoint
    assert (cells[0].dir(out) / "metrics.csv").read_bytes() == finished_rows
    assert (cells[0].dir(out) / "cell.yaml").read_bytes() == finished_record
    assert metrics(cells[1].dir(out))[0] == first[0]
    log = (cells[1].dir(out) / "log.txt").read_text()
    assert "test accuracy" in log
    table = (out / "results.md").read_text()
    assert "3 of 3 cells finished" in table
    assert "| narrow | fa |" in table and "| narrow | bp |" in table
    assert "| narrow | bp | 5.00 |" in table
    capsys.readouterr()
    assert (
        main(["reproduce", str(spec_path), "--scale", "narrow", "--out", str(out), "--jobs", "2"])
        == 0
    )
    assert "3 of 3 cells finished, 0 to run" in capsys.readouterr().out


def test_export_then_finish_on_another_machine(
    spec_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, exported = tmp_path / "a", tmp_path / "b", tmp_path / "exported"
    base = ["reproduce", str(spec_path), "--scale", "one"]
    assert main([*base, "--out", str(first), "--cell", "0"]) == 0
    assert main([*base, "--out", str(first), "--cell", "3"]) == 0
    assert main([*base, "--out", str(first), "--export", str(exported)]) == 0
    files = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert "narrow/bp-seed0/metrics.csv" in files and "wide/fa-seed0/cell.yaml" in files
    assert not any("checkpoints" in f or f.endswith(".pt") for f in files)
    readme = (exported / "README.md").read_text()
    assert "commit" in readme and "| 2 |" in readme
    assert "2 of 5 cells finished" in (exported / "results.md").read_text()

    capsys.readouterr()
    assert main([*base, "--out", str(second), "--results-from", str(exported), "--list"]) == 0
    assert "2 done, 3 todo" in capsys.readouterr().out
    assert main([*base, "--out", str(second), "--results-from", str(exported)]) == 0
    assert not (second / "narrow" / "bp-seed0").exists()  # taken from the export, not rerun
    assert (second / "narrow" / "fa-seed0" / "cell.yaml").exists()
    assert "5 of 5 cells finished" in (second / "results.md").read_text()

    # the second machine's export holds the cells it took from the first: alone, it is the grid
    both = tmp_path / "both"
    again = [*base, "--out", str(second), "--results-from", str(exported)]
    assert main([*again, "--export", str(both)]) == 0
    assert (both / "narrow" / "bp-seed0" / "metrics.csv").is_file()
    assert "5 of 5 cells finished" in (both / "results.md").read_text()
    assert "| 5 |" in (both / "README.md").read_text()  # one commit and machine here


def test_a_key_added_since_an_export_takes_its_default_there(
    spec_path: Path, tmp_path: Path
) -> None:
    cell = grid_cells(load_spec(spec_path), "one")[0]
    assert run_cell(cell, tmp_path / "old", echo=None) == "done"
    saved = cell.dir(tmp_path / "old") / "config.yaml"
    written = yaml.safe_load(saved.read_text())
    del written["rule"]["error"], written["diverge_factor"]  # as before those keys existed
    written["bottleneck"]["mode"] = "narrow"  # an old default of a key that does nothing here
    saved.write_text(yaml.safe_dump(written))
    assert status(cell, tmp_path / "new", [tmp_path / "old"]).state == "done"
    prepare(cell.config, saved.parent, resume=True)  # a run resumes across it too
    written["bottleneck"]["layer"] = "fc1"  # with a layer, the mode does something
    saved.write_text(yaml.safe_dump(written))
    assert status(cell, tmp_path / "new", [tmp_path / "old"]).state == "todo"
    with pytest.raises(ConfigError, match=r"bottleneck\.layer, bottleneck\.mode"):
        prepare(cell.config, saved.parent, resume=True)
    written["bottleneck"] = {"layer": None, "keep": 1, "mode": "filter"}
    written["rule_overrides"] = {"fa": {"optim.lr": 0.3}}  # another rule's: inert in this cell
    saved.write_text(yaml.safe_dump(written))
    assert status(cell, tmp_path / "new", [tmp_path / "old"]).state == "done"

    written["optim"]["lr"] = 0.5  # a value that differs is a different cell
    saved.write_text(yaml.safe_dump(written))
    assert status(cell, tmp_path / "new", [tmp_path / "old"]).state == "todo"
    written["optim"]["lr"], written["removed_key"] = 0.05, 1  # so is a key no longer known
    saved.write_text(yaml.safe_dump(written))
    assert status(cell, tmp_path / "new", [tmp_path / "old"]).state == "todo"


def test_a_diverged_cell_is_finished_and_reported(spec_path: Path, tmp_path: Path) -> None:
    spec = dict(SPEC, settings={"hot": {"optim.lr": 1.0e6}}, rules=["bp"], rule_seeds={})
    spec["sweep"] = True
    path = tmp_path / "hot.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "hot"
    assert main(["reproduce", str(path), "--out", str(out)]) == 0
    (cell,) = grid_cells(load_spec(path), "full")
    assert status(cell, out).state == "diverged"
    assert "diverged" in (out / "results.md").read_text()


def test_a_cell_records_the_commit_it_started_on(
    spec_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from biograd.experiment import grid

    head = ["started-here"]
    monkeypatch.setattr(grid, "commit", lambda: head[0])
    cell = grid_cells(load_spec(spec_path), "one")[0]

    def checkout_moves(row: dict[str, object]) -> None:
        head[0] = "checkout-moved"

    assert run_cell(cell, tmp_path / "out", echo=None, on_epoch=checkout_moves) == "done"
    info = yaml.safe_load((cell.dir(tmp_path / "out") / "cell.yaml").read_text())
    assert info["commit"] == "started-here"


def test_sweep_names_the_best_setting_per_rule(tmp_path: Path) -> None:
    spec = dict(
        SPEC,
        settings={"lr_0.3": {"optim.lr": 0.3}, "lr_1e-5": {"optim.lr": 1.0e-5}},
        rules=["bp"],
        rule_seeds={},
        published={},
        sweep=True,
    )
    spec["base"] = dict(SPEC["base"], data=dict(SPEC["base"]["data"], validation=64))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    assert main(["reproduce", str(path), "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "validation" in text and "not the test set" in text
    assert "| bp | lr_0.3 |" in text
    assert "rule_overrides:" in text and "optim.lr: 0.3" in text


def test_sweep_overrides_carry_only_the_swept_key() -> None:
    """A group's settings share ``optim.manhattan`` and their ``rules``; the override to paste
    holds the rate they vary, nothing else (no ``rules`` key, no YAML anchors)."""
    shared = {"optim.manhattan": True, "rules": ["fa", "usf"]}
    spec = Spec.model_validate(
        dict(
            SPEC,
            rules=["fa", "usf"],
            rule_seeds={},
            published={},
            sweep=True,
            settings={
                "lr_0.1": {"optim.lr": 0.1},
                "manhattan_lr_1e-3": {**shared, "optim.lr": 1.0e-3},
                "manhattan_lr_1e-4": {**shared, "optim.lr": 1.0e-4},
            },
        )
    )
    rows = [
        {"setting": st, "rule": rule, "ours": err, "seeds": 1, "diverged": []}
        for st, rule, err in [
            ("lr_0.1", "fa", 50.0), ("lr_0.1", "usf", 40.0),
            ("manhattan_lr_1e-3", "fa", 30.0), ("manhattan_lr_1e-3", "usf", 45.0),
            ("manhattan_lr_1e-4", "fa", 35.0), ("manhattan_lr_1e-4", "usf", 20.0),
        ]
    ]  # fmt: skip
    text = _sweep_choice(spec, rows)
    manhattan = text[text.index("manhattan:\n") :]
    assert "fa: {optim.lr: 0.001}" in manhattan and "usf: {optim.lr: 0.0001}" in manhattan
    assert "rules" not in manhattan and "manhattan: true" not in manhattan and "&" not in text
    assert "fa: {optim.lr: 0.1}" in text[: text.index("manhattan:\n")]


def test_results_angles_are_the_late_training_mean(tmp_path: Path) -> None:
    """The export's per-layer angle is each layer's mean over the last quarter of its
    measurements (then over seeds), not the last measurement: one batch's angle is noisy."""
    spec = {**SPEC, "base": {**SPEC["base"], "alignment": {"every": 1}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "grid"
    for cell in (1, 2):  # narrow fa, seeds 0 and 1: 3 epochs of 4 steps, 12 measurements each
        assert main(["reproduce", str(path), "--out", str(out), "--cell", str(cell)]) == 0
    late, last = [], []
    for seed in (0, 1):
        rows = read_rows(out / "narrow" / f"fa-seed{seed}" / "alignment.csv")
        fc = [float(r["angle"]) for r in rows if r["kind"] == "gradient" and r["layer"] == "fc1"]
        assert len(fc) == 12
        late.append(sum(fc[-3:]) / 3)
        last.append(fc[-1])
    text = (out / "results.md").read_text().split("late in training")[1]
    row = next(x for x in text.splitlines() if x.startswith("| narrow | fa |"))
    header = next(x for x in text.splitlines() if x.startswith("| setting | rule |"))
    value = row.split(" | ")[header.split(" | ").index("fc1")]
    assert value == f"{sum(late) / 2:.1f}" != f"{sum(last) / 2:.1f}"
