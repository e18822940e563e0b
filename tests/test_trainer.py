"""The trainer: run directory contents, checkpoints, kill -9 + resume, divergence."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from biograd.errors import BiogradError, ConfigError, DivergedError
from biograd.experiment.checkpoint import load_checkpoint, save_checkpoint
from biograd.experiment.config import dump, load_config
from biograd.experiment.trainer import METRICS_COLUMNS, checkpoint_path, final_state, run

SMALL = ["data.subset=300", "data.test_subset=120", "model.widths=[32]", "data.batch_size=16"]
ALIGNMENT_COLUMNS = "rule,seed,epoch,step,layer,kind,angle,norm_ratio,delta_cos_mean,delta_cos_std"


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_run_directory_holds_config_metrics_alignment_and_checkpoints(tmp_path):
    cfg = load_config(
        None, [*SMALL, "rules=[bp,kp]", "seeds=[0,1]", "epochs=2", "alignment.every=10"]
    )
    out = tmp_path / "run"
    last = run(cfg, out, progress=False, echo=None)

    assert yaml.safe_load((out / "config.yaml").read_text()) == dump(cfg)
    metrics = rows(out / "metrics.csv")
    assert (out / "metrics.csv").read_text().splitlines()[0] == ",".join(METRICS_COLUMNS)
    assert [(r["rule"], r["seed"], r["epoch"]) for r in metrics] == [
        (rule, seed, epoch) for rule in ("bp", "kp") for seed in "01" for epoch in "12"
    ]
    assert all(float(r["test_acc"]) > 0.5 for r in metrics if r["epoch"] == "2")
    assert [r["test_acc"] for r in last] == [float(r["test_acc"]) for r in metrics[1::2]]

    assert (out / "alignment.csv").read_text().splitlines()[0] == ALIGNMENT_COLUMNS
    align = rows(out / "alignment.csv")
    assert {r["kind"] for r in align} == {"weight", "gradient"}
    kp_fc1 = [
        float(r["angle"])
        for r in align
        if r["rule"] == "kp" and r["layer"] == "fc1" and r["kind"] == "weight"
    ]
    assert kp_fc1[-1] < kp_fc1[0]  # Kolen-Pollack pulls B towards W

    state = torch.load(checkpoint_path(out, "kp", 1), weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "step"} <= set(state)
    assert state["epoch"] == 2 and "fc1.rule.feedback" in state["model"]


def test_a_finished_run_is_not_overwritten_and_resume_skips_it(tmp_path):
    cfg = load_config(None, [*SMALL, "epochs=1"])
    out = tmp_path / "run"
    run(cfg, out, progress=False, echo=None)
    before = (out / "metrics.csv").read_text()
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        run(cfg, out, progress=False, echo=None)
    other = load_config(None, [*SMALL, "epochs=1", "optim.lr=0.2"])
    with pytest.raises(ConfigError, match=r"differs in optim\.lr"):
        run(other, out, resume=True, progress=False, echo=None)
    (again,) = run(cfg, out, resume=True, progress=False, echo=None)
    assert (out / "metrics.csv").read_text() == before
    assert again == {k: type(again[k])(v) for k, v in rows(out / "metrics.csv")[0].items()}
    assert isinstance(again["test_acc"], float) and isinstance(again["epoch"], int)


@pytest.mark.parametrize("rule", ["dfa", "drtp", "brsf"])
def test_rules_on_a_convnet(tmp_path, rule):
    cfg = load_config(
        None,
        ["data.subset=64", "data.test_subset=32", "model.name=lenet", "model.pad_to=16",
         f"rule.name={rule}", "epochs=1", "alignment.every=2"],
    )  # fmt: skip
    (row,) = run(cfg, tmp_path / rule, progress=False, echo=None)
    assert row["epoch"] == 1 and 0.0 <= row["test_acc"] <= 1.0
    assert any(r["layer"] == "conv2" for r in rows(tmp_path / rule / "alignment.csv"))


def test_channels_last_trains_as_the_default_layout_and_is_recorded_only_when_on(tmp_path):
    base = ["data.subset=64", "data.test_subset=32", "model.name=lenet", "model.pad_to=16",
            "rule.name=fa", "epochs=1"]  # fmt: skip
    ((plain,), (last,)) = (
        run(
            load_config(None, [*base, f"channels_last={on}"]),
            tmp_path / on,
            progress=False,
            echo=None,
        )
        for on in ("false", "true")
    )
    assert plain["train_loss"] == pytest.approx(last["train_loss"], rel=1e-4)
    assert plain["test_loss"] == pytest.approx(last["test_loss"], rel=1e-4)
    assert "channels_last" not in yaml.safe_load((tmp_path / "false" / "config.yaml").read_text())
    assert yaml.safe_load((tmp_path / "true" / "config.yaml").read_text())["channels_last"] is True
    for on, fmt in (("false", torch.contiguous_format), ("true", torch.channels_last)):
        state = torch.load(checkpoint_path(tmp_path / on, "fa", 0), weights_only=True)["model"]
        assert state["conv1.weight"].is_contiguous(memory_format=fmt)


def test_data_resize_feeds_the_model_resized_images(tmp_path):
    """data.resize=16 on the 8x8 digits: both splits are 16x16 (so LeNet needs no padding), and
    the run trains and records the key."""
    from biograd.experiment.trainer import load_data

    base = ["data.subset=64", "data.test_subset=32", "model.name=lenet", "model.pad_to=16",
            "epochs=1"]  # fmt: skip
    cfg = load_config(None, [*base, "data.resize=16"])
    train, test = load_data(cfg)
    assert train.shape == test.shape == (1, 16, 16)
    (row,) = run(cfg, tmp_path / "run", progress=False, echo=None)
    assert 0.0 <= row["test_acc"] <= 1.0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["resize"] == 16


def test_schedule_and_optimizer_wrappers(tmp_path):
    cfg = load_config(
        None,
        [*SMALL, "epochs=3", "schedule.name=multistep", "schedule.milestones=[1,2]",
         "schedule.gamma=0.5", "optim.name=adamw", "optim.lr=0.01", "optim.manhattan=true"],
    )  # fmt: skip
    run(cfg, tmp_path / "run", progress=False, echo=None)
    assert [float(r["lr"]) for r in rows(tmp_path / "run" / "metrics.csv")] == [0.01, 0.005, 0.0025]


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    # epoch 1 trains normally, then the rate jumps by 1e30 and the loss overflows
    cfg = load_config(
        None,
        [*SMALL, "epochs=3", "schedule.name=multistep", "schedule.milestones=[1]",
         "schedule.gamma=1e30"],
    )  # fmt: skip
    out = tmp_path / "run"
    with pytest.raises(
        DivergedError, match=r"diverged: loss (nan|inf) at epoch 2.*kept .*bp-seed0\.pt"
    ):
        run(cfg, out, progress=False, echo=None)
    assert load_checkpoint(checkpoint_path(out, "bp", 0))["epoch"] == 1
    assert [r["epoch"] for r in rows(out / "metrics.csv")] == ["1"]


def test_deterministic_mode_runs_and_is_switched_off_afterwards(tmp_path):
    cfg = load_config(None, [*SMALL, "epochs=1", "deterministic=true", "rules=[fa,dfa]"])
    run(cfg, tmp_path / "run", progress=False, echo=None)
    assert not torch.are_deterministic_algorithms_enabled()


def test_threads_apply_during_the_run_and_are_restored(tmp_path):
    before = torch.get_num_threads()
    seen: list[int] = []
    cfg = load_config(None, [*SMALL, "epochs=1", "threads=3"])
    run(
        cfg,
        tmp_path / "run",
        progress=False,
        echo=None,
        on_epoch=lambda row: seen.append(torch.get_num_threads()),
    )
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == before


def test_tensorboard_without_the_package_is_a_config_error(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    cfg = load_config(None, [*SMALL, "epochs=1", "tensorboard=true"])
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        run(cfg, tmp_path / "run", progress=False, echo=None)
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1, "x": torch.ones(3)}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(BiogradError, match="truncated or not a biograd checkpoint"):
        load_checkpoint(path)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_identical_weights(tmp_path):
    # brsf redraws B from a checkpointed generator, kp learns B with momentum, dropout draws
    # from torch's global generator, and the cosine schedule has state: all must resume exactly.
    overrides = [
        "rules=[brsf,kp]", "epochs=3", "data.subset=600", "data.batch_size=8", "model.widths=[64]",
        "model.dropout=0.1", "optim.weight_decay=1e-4", "schedule.name=cosine",
        "alignment.every=20", "data.test_subset=60", "plots=false",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    reference = tmp_path / "reference"
    run(cfg, reference, progress=False, echo=None)

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in dump(cfg).items() if k != "out"}))
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "biograd.cli", "train", str(config), f"out={out}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def in_epoch_2() -> bool:  # an alignment row of epoch 2 is written during that epoch
        path = out / "alignment.csv"
        return path.exists() and any(r["epoch"] == "2" for r in rows(path))

    deadline = time.monotonic() + 120
    while not in_epoch_2() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(checkpoint_path(out, "brsf", 0))["epoch"] == 1
    assert [r["epoch"] for r in rows(out / "metrics.csv")] == ["1"]

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for rule in ("brsf", "kp"):
        want, got = final_state(reference, rule, 0), final_state(out, rule, 0)
        assert want.keys() == got.keys()
        for key in want:
            if isinstance(want[key], torch.Tensor):
                assert torch.equal(want[key], got[key]), f"{rule} {key}"
            else:
                assert want[key] == got[key], f"{rule} {key}"
    columns = ("rule", "seed", "epoch", "step", "train_loss", "test_acc")
    strip = lambda path: [tuple(r[c] for c in columns) for r in rows(path)]  # noqa: E731
    assert strip(out / "metrics.csv") == strip(reference / "metrics.csv")
    columns = ("rule", "seed", "epoch", "step", "layer", "kind", "angle")
    assert strip(out / "alignment.csv") == strip(reference / "alignment.csv")


@pytest.mark.parametrize("error", ["loss", "per_sample"])
def test_rule_error_reaches_the_direct_engine(error: str) -> None:
    from biograd.direct import DirectFeedback
    from biograd.experiment.trainer import build

    cfg = load_config(None, ["rules=[dfa]", f"rule.error={error}", "model.widths=[8]"])
    model = build(cfg.for_rule("dfa"), "dfa", 0, (1, 8, 8), 10)
    (engine,) = [m for m in model.modules() if isinstance(m, DirectFeedback)]
    assert engine.error == error
