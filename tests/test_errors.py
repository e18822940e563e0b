"""Hostile use of the ``biograd`` command: every error one line and exit 2, nothing written
before the input is known to be good, one writer per run directory, damaged files, moved runs,
divergence in a multi-rule run.

Most cases call ``main([...])`` in-process; the lock tests need real second processes.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

import biograd
from biograd.cli import main
from biograd.experiment.config import load_config
from biograd.experiment.table import write_results
from biograd.experiment.trainer import checkpoint_path, run

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["data.subset=160", "data.test_subset=80", "model.widths=[16]"]
CONFIG = {
    "data": {"name": "digits", "subset": 160, "test_subset": 80},
    "model": {"name": "mlp", "widths": [16]},
    "rules": ["bp", "fa"],
    "epochs": 1,
    "plots": False,
}


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (``.lock`` aside: it holds the last writer's pid)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def one_line_error(capsys, argv: list[str], status: int = 2) -> str:
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == status, err
    assert err.count("\n") == 1 and err.startswith("biograd: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A finished train run (``run``), a config (``c.yaml``), damaged files and odd paths."""
    w = tmp_path_factory.mktemp("hostile")
    (w / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    assert main(["train", str(w / "c.yaml"), f"out={w / 'run'}"]) == 0
    (w / "file").write_text("a file, not a folder\n")
    (w / "binary.yaml").write_bytes(b"\x00\xff\xfe binary")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "badyaml.yaml").write_text("epochs: [1\n")
    for name, metrics in [
        ("binary_metrics", b"\x89PNG\r\n\x1a\n\x00\xff"),
        ("junk_metrics", b"rule,seed,epoch,step,train_loss,train_acc,test_loss,test_acc,"
         b"epoch_time_s,lr\nbp,0,x,1,2,3,4,5,6,7\nbp,0,2,1,2,3,4,5,6,7\n"),
        ("header_metrics", b"a,b\n1,2\n"),
    ]:  # fmt: skip
        (w / name).mkdir()
        (w / name / "metrics.csv").write_bytes(metrics)
    (w / "grid_nospec").mkdir()
    (w / "grid_nospec" / "grid.yaml").write_text("scale: smoke\n")
    (w / "grid_binary").mkdir()
    (w / "grid_binary" / "grid.yaml").write_bytes(b"\x00\xff")
    (w / "fake_grid").mkdir()
    (w / "fake_grid" / "grid.yaml").write_text("scale: smoke\nspec: {}\n")
    (w / "mnist" / "train-images-idx3-ubyte.gz").mkdir(parents=True)  # a folder, not a file
    shutil.copytree(w / "run", w / "badcfg")
    (w / "badcfg" / "config.yaml").write_bytes(b"\x00\xff")
    shutil.copytree(w / "run", w / "badrng")
    ckpt = checkpoint_path(w / "badrng", "bp", 0)
    state = torch.load(ckpt, weights_only=True)
    state["rng"]["torch"] = state["rng"]["torch"].float()  # the wrong dtype
    torch.save(state, ckpt)
    return w


# Each case: argv from the world's folder, and a fragment of the expected message.
CASES: list[tuple[str, Callable[[Path], list[str]], str]] = []


def case(name: str, expected: str, argv: Callable[[Path], list[str]]) -> None:
    CASES.append((name, argv, expected))


def train(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda w: ["train", str(w / "c.yaml"), f"out={w / 'new'}", *overrides]


def compare(*args: str) -> Callable[[Path], list[str]]:
    return lambda w: ["compare", "--epochs", "1", "--seeds", "1", "--out", str(w / "new"), *TINY,
                      *args]  # fmt: skip


# config values that must fail before anything is written
case("bool-for-int", "epochs: Input should be a valid integer", train("epochs=true"))
case("float-for-int", "epochs: Input should be a valid integer", train("epochs=2.0"))
case("negative-seed", "seeds.0: Input should be greater than or equal to 0", train("seeds=[-1]"))
case("huge-seed", "seeds.0: Input should be less than", train(f"seeds=[{2**70}]"))
case("batch-1e20-text", "data.batch_size: Input should be a valid integer", train("data.batch_size=1e20"))  # fmt: skip
case("batch-1e20-int", "data.batch_size: Input should be less than", train(f"data.batch_size={10**20}"))  # fmt: skip
case("batch-zero", "data.batch_size: Input should be greater than 0", train("data.batch_size=0"))
case("subset-zero", "data.subset", train("data.subset=0"))
case("epochs-zero", "epochs: Input should be greater than 0", train("epochs=0"))
case("lr-negative", "optim.lr", train("optim.lr=-1"))
case("threads-huge", "threads", train("threads=100000"))
case("milestone-bool", "schedule.milestones.0", train("schedule.milestones=[true]"))
case("rule-seed-negative", "rule.seed", train("rule.seed=-3"))
case("model-widths-text", "model", train("model.widths=abc"))
case("model-unknown-option", "unknown config key 'model.width'", train("model.width=[8]"))
case("device-mps", "device=mps", train("device=mps"))
case("device-meta", "device=meta", train("device=meta"))
case("device-xpu", "device=xpu", train("device=xpu"))
case("device-cuda-index", "device=cuda:99", train("device=cuda:99"))
case("device-banana", "not a torch device", train("device=banana"))
case("layout-unknown", "unknown layout 'banana'", train("rules=[dfa]", "rule.layout=banana"))
case("layout-unused", "rule.layout is an option of the direct rules", train("rule.layout=shared"))
case("norm-unused", "rule.norm is an option of the direct rules", train("rule.norm=fan_in"))
case("output-unused", "rule.output is an option of the direct rules", train("rule.output=out"))
case("error-unused", "rule.error is an option of the direct rules", train("rule.error=per_sample"))
case("error-unknown", "unknown error 'sum'", train("rules=[dfa]", "rule.error=sum"))
case("scale-unused", "rule.scale is not used by dfa", train("rules=[dfa]", "rule.scale=kaiming"))
case("scale-unknown", "unknown scale 'huge'", train("rule.scale=huge"))
case("output-not-a-layer", "rule: output layer 'fc9'", train("rules=[dfa]", "rule.output=fc9"))
case("overrides-list", "rule.overrides", train("rule.overrides=[fc1]"))
case("overrides-unknown-rule", "unknown rule 'qq'", train("rule.overrides={fc1: qq}"))
case("duplicate-rules", "rules repeat: bp", train("rules=[bp, fa, bp]"))
case("empty-out", "out is empty", train('out=""'))
case("override-no-equals", "not of the form key=value", train("epochs"))
case("override-into-value", "is a value, not a section", train("epochs.x=1"))
case("rule-overrides-unknown-key", "error: rule_overrides.fa: unknown config key 'optim.lrr'",
     train("rule_overrides={fa: {optim.lrr: 1}}"))  # fmt: skip
case("rule-overrides-shared", "is shared by every rule", train("rule_overrides={fa: {seeds: [1]}}"))
case("bottleneck-unknown-layer", "bottleneck", train("bottleneck.layer=nope"))
# command-line arguments
case("compare-duplicate-rules", "rules repeat: bp", compare("--rules", "bp,bp"))
case("compare-no-rules", "rules must name at least one rule", compare("--rules", ","))
case("compare-empty-out", "out is empty", lambda w: ["compare", "--out", ""])
case("compare-epochs-zero", "--epochs and --seeds must be at least 1", compare("--epochs", "0"))
case("compare-unknown-rule", "unknown rule 'qq'", compare("--rules", "bp,qq"))
case("train-no-config", "required: config (see", lambda w: ["train"])
case("no-command", "required: command", lambda w: [])
# files: configs, data, output paths
case("config-missing", "cannot read config", lambda w: ["train", str(w / "missing.yaml")])
case("config-binary", "not a YAML file", lambda w: ["train", str(w / "binary.yaml")])
case("config-list", "expected a mapping", lambda w: ["train", str(w / "list.yaml")])
case("config-bad-yaml", "badyaml.yaml line", lambda w: ["train", str(w / "badyaml.yaml")])
case("out-is-a-file", "file", lambda w: ["train", str(w / "c.yaml"), f"out={w / 'file'}"])
case("out-under-a-file", "Not a directory", lambda w: ["train", str(w / "c.yaml"), f"out={w / 'file' / 'sub'}"])  # fmt: skip
case("data-file-is-a-folder", "train-images-idx3-ubyte", compare("--data", "mnist", "--data-dir", "{w}/mnist"))  # fmt: skip
case("data-dir-is-a-file", "train-images-idx3-ubyte", compare("--data", "mnist", "--data-dir", "{w}/file"))  # fmt: skip
# run directories: identity, other kinds, damaged contents
case("train-again-without-resume", "--resume", lambda w: ["train", str(w / "c.yaml"), f"out={w / 'run'}"])  # fmt: skip
case("resume-other-config", "differs in epochs", lambda w: ["train", str(w / "c.yaml"), f"out={w / 'run'}", "epochs=2", "--resume"])  # fmt: skip
case("train-into-grid", "holds a reproduction grid", lambda w: ["train", str(w / "c.yaml"), f"out={w / 'fake_grid'}", "--resume"])  # fmt: skip
case("reproduce-into-train", "holds a biograd train/compare run", lambda w: ["reproduce", "example/digits-tiny", "--scale", "smoke", "--out", str(w / "run")])  # fmt: skip
case("reproduce-run-config", "is not a reproduction spec (unknown key 'data'", lambda w: ["reproduce", str(w / "c.yaml")])  # fmt: skip
case("reproduce-empty-out", "--out is empty", lambda w: ["reproduce", "example/digits-tiny", "--out", " "])  # fmt: skip
case("checkpoint-rng-dtype", "does not fit this run", lambda w: ["train", str(w / "c.yaml"), f"out={w / 'badrng'}", "--resume"])  # fmt: skip
case("report-missing", "is not a directory", lambda w: ["report", str(w / "nowhere")])
case("report-binary-metrics", "not a text CSV file", lambda w: ["report", str(w / "binary_metrics")])  # fmt: skip
case("report-junk-row", "metrics.csv line 2 is damaged", lambda w: ["report", str(w / "junk_metrics")])  # fmt: skip
case("report-foreign-csv", "no column 'rule'", lambda w: ["report", str(w / "header_metrics")])
case("report-grid-without-spec", "grid.yaml is damaged", lambda w: ["report", str(w / "grid_nospec")])  # fmt: skip
case("report-grid-binary", "not a YAML file", lambda w: ["report", str(w / "grid_binary")])
case("report-binary-config", "not a YAML file", lambda w: ["report", str(w / "badcfg")])


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(world, capsys, argv, expected):
    args = [a.replace("{w}", str(world)) for a in argv(world)]
    before = tree_hash(world)
    err = one_line_error(capsys, args)
    assert expected in err
    assert tree_hash(world) == before
    assert not (world / "new").exists()


def test_the_hostile_section_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), f"out={ro / 'run'}"])
    finally:
        ro.chmod(0o755)
    assert "Permission denied" in err


def test_unwritable_checkpoint_folder_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    # what a read-only checkpoints/ folder raises (simulated: root ignores file permissions)
    import biograd.experiment.trainer as trainer

    def refuse(state, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(trainer, "save_checkpoint", refuse)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**CONFIG, "rules": ["bp"]}))
    err = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), f"out={tmp_path / 'run'}"])
    assert (
        err
        == f"biograd: error: {tmp_path / 'run' / 'checkpoints' / 'bp-seed0.pt'}: Permission denied\n"
    )


def test_ctrl_c_is_one_line_with_status_130_and_a_hint_per_command(monkeypatch, capsys, tmp_path):
    import biograd.experiment.trainer as trainer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run", interrupt)
    err = one_line_error(capsys, ["compare", "--out", str(tmp_path / "x")], status=130)
    assert "run the same command again" in err and "--resume" not in err
    (tmp_path / "c.yaml").write_text("epochs: 1\n")
    err = one_line_error(capsys, ["train", str(tmp_path / "c.yaml")], status=130)
    assert "--resume" in err


def test_debug_switch_shows_the_traceback(world, monkeypatch):
    monkeypatch.setenv("BIOGRAD_DEBUG", "1")
    with pytest.raises(biograd.errors.ConfigError):
        main(["train", str(world / "c.yaml"), "epochs=true"])


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    # a SIGINT as soon as the interpreter runs the entry point, i.e. while torch imports
    code = (
        "import os, signal, sys, threading\n"
        "import biograd_entry\n"
        "threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "sys.exit(biograd_entry.main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.run(
        [sys.executable, "-c", code, "report", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode in (130, 2), p.stderr  # 2 if the import won the race
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


# --- one writer per run directory ------------------------------------------------------------


def _command(out: Path, epochs: int) -> list[str]:
    return ["compare", "--rules", "bp,fa", "--epochs", str(epochs), "--seeds", "1", "--out",
            str(out), "data.subset=320", "data.test_subset=80", "model.widths=[16]", "plots=false",
            "alignment.every=0"]  # fmt: skip


def _writer(out: Path, epochs: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "biograd", *_command(out, epochs)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock(out: Path, proc: subprocess.Popen) -> None:
    """Until ``proc`` holds the run's lock and has written a metrics row."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        lock, metrics = out / ".lock", out / "metrics.csv"
        if lock.exists() and lock.read_text().strip() == str(proc.pid) and metrics.exists():
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.005)
    raise AssertionError("the writer never took the lock")


def _metrics_keys(out: Path) -> list[tuple[str, str, str]]:
    with (out / "metrics.csv").open(newline="") as f:
        return [(r["rule"], r["seed"], r["epoch"]) for r in csv.DictReader(f)]


def test_second_writer_is_refused_and_a_killed_writer_leaves_no_stale_lock(tmp_path, capsys):
    """Two writers on one run directory: the second stops with one line naming the first's pid
    and changes nothing; after the first is killed with SIGKILL (mid-run, holding the lock) the
    next run is not blocked and resumes without a duplicated row."""
    out, epochs = tmp_path / "run", 8
    first = _writer(out, epochs)
    try:
        _wait_for_lock(out, first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock for as long as the test needs
        before = tree_hash(out)
        err = one_line_error(capsys, _command(out, epochs))
        assert f"pid {first.pid}" in err and "another biograd process" in err
        assert tree_hash(out) == before
        first.kill()  # SIGKILL, while it holds the lock
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        first.kill()
    assert (out / ".lock").exists()
    assert main(_command(out, epochs)) == 0  # not blocked: the kernel dropped the lock
    keys = _metrics_keys(out)
    assert len(keys) == len(set(keys)) == 2 * epochs  # rules x epochs, no row twice


# --- damaged CSV, moved and respelled runs, divergence ---------------------------------------


def test_torn_last_metrics_line_is_dropped_and_the_run_resumes(tmp_path, capsys):
    cfg = load_config(None, [*TINY, "epochs=2", "rules=[fa]", "alignment.every=3"])
    out = tmp_path / "run"
    ckpt = checkpoint_path(out, "fa", 0)
    saved = tmp_path / "epoch1.pt"
    run(cfg, out, progress=False, echo=None,
        on_epoch=lambda row: row["epoch"] == 1 and shutil.copy(ckpt, saved))  # fmt: skip
    full = (out / "metrics.csv").read_text()
    # a crash while appending epoch 2's row: half a line, and the epoch-1 checkpoint
    lines = full.splitlines(keepends=True)
    (out / "metrics.csv").write_text("".join(lines[:-1]) + lines[-1][:15])
    shutil.copy(saved, ckpt)
    assert "stopped after 1 of 2 epochs" in write_results(out)  # what `report` prints
    assert "stopped after 1 of 2 epochs" in write_results(out)
    assert capsys.readouterr().err.count("torn last line") == 1  # warned once
    run(cfg, out, resume=True, progress=False, echo=None)
    resumed = (out / "metrics.csv").read_text()
    assert resumed.endswith("\n") and resumed.count("\n") == full.count("\n")

    def strip_time(text: str) -> list[list[str]]:
        return [r[:8] for r in csv.reader(text.splitlines())]

    assert strip_time(resumed) == strip_time(full)  # bit-identical resume, no junk row


def test_moved_run_and_other_spellings_of_its_path_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**CONFIG, "rules": ["fa"]}))
    assert main(["train", "c.yaml", "out=r/base"]) == 0
    metrics = (tmp_path / "r" / "base" / "metrics.csv").read_text()
    for spelling in ("./r/base/", str(tmp_path / "r" / "base"), "r//base"):
        assert main(["train", "c.yaml", f"out={spelling}", "--resume"]) == 0, spelling
    # the embedded digits read no files: their data root cannot block a resume
    assert main(["train", "c.yaml", "out=r/base", "data.root=/elsewhere", "--resume"]) == 0
    shutil.move(tmp_path / "r" / "base", tmp_path / "moved")
    assert main(["train", "c.yaml", "out=moved", "--resume"]) == 0
    assert (tmp_path / "moved" / "metrics.csv").read_text() == metrics
    capsys.readouterr()


def test_divergence_stops_one_rule_and_the_others_finish(tmp_path, capsys):
    out = tmp_path / "run"
    # fa at lr 1e4 stays finite (loss ~1e10) but passes diverge_factor x its first loss
    argv = ["compare", "--rules", "fa,bp", "--epochs", "2", "--seeds", "1", "--out", str(out),
            *TINY, "plots=false", "rule_overrides={fa: {optim.lr: 10000}}"]  # fmt: skip
    err = one_line_error(capsys, argv)
    assert "fa seed 0 diverged" in err and "diverge_factor" in err
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["rule"], r["epoch"]) for r in rows] == [("bp", "1"), ("bp", "2")]
    with (out / "diverged.csv").open() as f:
        assert [r["rule"] for r in csv.DictReader(f)] == ["fa"]
    assert main(["report", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| bp | " in stdout and "stopped early: fa seed 0 diverged in epoch 1" in stdout

    # a rule that diverged after some epochs is marked in the table
    out2 = tmp_path / "run2"
    argv = ["compare", "--rules", "bp", "--epochs", "3", "--seeds", "1", "--out", str(out2),
            *TINY, "plots=false", "schedule.name=multistep", "schedule.milestones=[1]",
            "schedule.gamma=1e6"]  # fmt: skip
    assert "bp seed 0 diverged" in one_line_error(capsys, argv)
    assert "| bp (diverged) | " in write_results(out2)


def test_api_footguns_raise_clear_errors():
    from torch import nn

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    m = biograd.convert(mlp(), "fa", exclude="0")  # one name, not the characters '0'
    assert biograd.conversion_report(m).converted == {"2": "fa"}
    with pytest.raises(TypeError, match="overrides must map layer names"):
        biograd.convert(mlp(), "fa", overrides=["0"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int"):
        biograd.convert(mlp(), "fa", seed="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no converted layer"):
        biograd.weight_alignment(mlp())
    with pytest.raises(ValueError, match="no converted layer"):
        biograd.gradient_alignment(mlp(), nn.functional.cross_entropy, torch.zeros(2, 4),
                                   torch.zeros(2, dtype=torch.long))  # fmt: skip
    d = biograd.convert(mlp(), "drtp")
    x, y = torch.randn(2, 4), torch.tensor([0, 3])
    biograd.set_targets(d, y)
    with pytest.raises(biograd.direct.FeedbackError, match=r"target class 3 is outside 0\.\.2"):
        nn.functional.cross_entropy(d(x), y.clamp(max=2)).backward()
