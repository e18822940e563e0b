"""The ``biograd`` command end to end: compare, report, train, reproduce, and user errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from biograd.cli import main

TINY = ["data.subset=240", "data.test_subset=120", "model.widths=[32]"]
PNG = b"\x89PNG\r\n\x1a\n"


def call(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def user_error(capsys, *argv: str) -> str:
    """Run a command that must fail as a user error: status 2 and one line on stderr."""
    status, _, err = call(capsys, *argv)
    assert status == 2
    assert err.startswith("biograd: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_compare_then_report_rebuilds_table_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    status, stdout, _ = call(
        capsys, "compare", "--rules", "bp,fa", "--epochs", "2", "--seeds", "2", "--out", str(out),
        *TINY,
    )  # fmt: skip
    assert status == 0
    assert "| bp | " in stdout and "| fa | " in stdout and "∠ fc1 (°)" in stdout
    results = (out / "results.md").read_text()
    plots = sorted(out.glob("plots/*.png"))
    assert plots and all(p.read_bytes().startswith(PNG) for p in plots)
    with (out / "metrics.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 2  # rules x seeds x epochs
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["rules"] == ["bp", "fa"] and cfg["seeds"] == [0, 1] and cfg["epochs"] == 2

    (out / "results.md").unlink()
    for p in plots:
        p.unlink()
    status, stdout, _ = call(capsys, "report", str(out))
    assert status == 0 and "| bp | " in stdout
    assert (out / "results.md").read_text() == results
    assert sorted(out.glob("plots/*.png")) == plots

    # the same comparison again resumes (nothing to train); another one is refused
    status, _, _ = call(
        capsys, "compare", "--rules", "bp,fa", "--epochs", "2", "--seeds", "2", "--out", str(out),
        *TINY,
    )  # fmt: skip
    assert status == 0 and (out / "results.md").read_text() == results
    err = user_error(capsys, "compare", "--rules", "bp", "--epochs", "2", "--out", str(out), *TINY)
    assert "differs in" in err and "rules" in err


def test_train_from_yaml_with_overrides(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "digits", "subset": 240, "test_subset": 120},
                "model": {"name": "mlp", "widths": [32]},
                "rule": {"name": "fa"},
                "epochs": 1,
            }
        )
    )
    out = tmp_path / "run"
    status, stdout, _ = call(capsys, "train", str(config), "optim.lr=0.1", f"out={out}")
    assert status == 0 and "| fa | " in stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.1 and saved["rule"]["name"] == "fa"
    assert (out / "checkpoints" / "fa-seed0.pt").exists()
    err = user_error(capsys, "train", str(config), "optim.lr=0.1", f"out={out}")
    assert "--resume" in err
    assert call(capsys, "train", str(config), "optim.lr=0.1", f"out={out}", "--resume")[0] == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        (["epochs=ten"], "epochs: Input should be a valid integer"),
        (
            ["model.width=[8]"],
            "unknown config key 'model.width' for model 'mlp'; did you mean 'model.widths'?",
        ),
        (["rule.name=fb"], "unknown rule 'fb'"),
        (["model.name=resnet"], "unknown model 'resnet'"),
        (["optim.nesterov=true", "optim.momentum=0"], "optim: Nesterov momentum requires"),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, args, expected):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 1\n")
    out = tmp_path / "run"
    err = user_error(capsys, "train", str(config), f"out={out}", *args)
    assert expected in err
    assert not out.exists()


def test_missing_data_file_is_one_line(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "run"
    err = user_error(
        capsys, "compare", "--data", "mnist", "--data-dir", str(empty), "--out", str(out)
    )
    assert "train-images-idx3-ubyte.gz" in err
    assert not out.exists()


def test_other_user_errors(tmp_path, capsys):
    assert "unknown rule 'qq'" in user_error(
        capsys, "compare", "--rules", "bp,qq", "--out", str(tmp_path / "a")
    )
    assert "cannot read config" in user_error(capsys, "train", str(tmp_path / "missing.yaml"))
    assert "not a biograd run directory" in user_error(capsys, "report", str(tmp_path))
    assert "no reproduction named 'nope'" in user_error(capsys, "reproduce", "nope")
    assert "unknown scale 'huge'" in user_error(
        capsys, "reproduce", "example/digits-tiny", "--scale", "huge"
    )
    assert "invalid int value" in user_error(capsys, "compare", "--epochs", "ten")
    bad = tmp_path / "run"
    (bad / "checkpoints").mkdir(parents=True)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"epochs": 1, "out": str(bad)}))
    assert call(capsys, "train", str(config))[0] == 0
    torch.save({"model": {"out.weight": torch.zeros(1)}}, bad / "checkpoints" / "bp-seed0.pt")
    assert "does not fit this run" in user_error(capsys, "train", str(config), "--resume")
    (bad / "checkpoints" / "bp-seed0.pt").write_bytes(b"not a checkpoint")
    assert "truncated or not a biograd checkpoint" in user_error(
        capsys, "train", str(config), "--resume"
    )


def test_divergence_exits_with_status_2_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    err = user_error(
        capsys, "compare", "--rules", "bp", "--epochs", "3", "--seeds", "1", "--out", str(out),
        *TINY, "schedule.name=multistep", "schedule.milestones=[1]", "schedule.gamma=1e30",
    )  # fmt: skip
    assert "diverged" in err and "bp-seed0.pt" in err
    assert (out / "checkpoints" / "bp-seed0.pt").exists()
    assert (out / "config.yaml").exists() and (out / "metrics.csv").exists()


def test_reproduce_smoke_example_and_published_differences(tmp_path, capsys):
    out = tmp_path / "repro"
    status, stdout, _ = call(
        capsys, "reproduce", "example/digits-tiny", "--scale", "smoke", "--out", str(out)
    )
    assert status == 0
    assert {p.name for p in out.iterdir()} >= {"narrow", "wide", "results.md", "grid.yaml"}
    for rule in ("bp", "fa", "dfa"):
        assert f"| narrow | {rule} | - |" in stdout

    spec = yaml.safe_load(Path("configs/example/digits-tiny.yaml").read_text())
    spec["published"] = {"wide": {"bp": 5.0}}
    spec["settings"] = {"wide": spec["settings"]["wide"]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out2 = tmp_path / "repro2"
    assert call(capsys, "reproduce", str(path), "--scale", "smoke", "--out", str(out2))[0] == 0
    # resumed from the finished cells without training again
    (out2 / "results.md").unlink()
    status, stdout, _ = call(capsys, "reproduce", str(path), "--scale", "smoke", "--out", str(out2))
    line = next(x for x in stdout.splitlines() if x.startswith("| wide | bp |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "5.00" and float(cells[4]) == pytest.approx(float(cells[3]) - 5.0, abs=0.011)
    assert call(capsys, "report", str(out2))[1].splitlines()[2] == line
