"""Your own model and data: factories in the config and on the command line, and
``biograd.compare`` from Python (the same trainer, table and plots)."""

from __future__ import annotations

import csv
import os
import runpy
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import biograd
from biograd.cli import main
from biograd.data import ImageDataset
from biograd.errors import ConfigError
from biograd.experiment import factory, trainer
from biograd.experiment.factory import as_splits

PNG = b"\x89PNG\r\n\x1a\n"
RULES = "bp,fa,dfa"
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "own_model.py"

USER_CODE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_shape, classes, hidden):
        super().__init__()
        self.fc1 = nn.Linear(in_shape[0], hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.fc1(x)))


def make_net(in_shape, classes, hidden=16):
    return Net(in_shape, classes, hidden)


def load(n_train=200, n_test=100, dim=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, 3, generator=g)

    def split(n):
        x = torch.randn(n, dim, generator=g)
        return x, (x @ w).argmax(1)

    return split(n_train), split(n_test)


def not_a_model():
    return 42


def one_pair():
    return torch.randn(10, 4), torch.zeros(10, dtype=torch.long)


def two_classes(in_shape):
    return nn.Linear(in_shape[0], 2)
"""


@pytest.fixture
def user(tmp_path, monkeypatch) -> Iterator[Path]:
    """A directory holding ``userfx.py`` (the user's model and data factories), made the current
    directory; the module is forgotten before and after the test."""
    (tmp_path / "userfx.py").write_text(USER_CODE)
    (tmp_path / "broken.py").write_text('raise RuntimeError("boom")\n')
    monkeypatch.chdir(tmp_path)
    for name in ("userfx", "broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("userfx", "broken"):
        sys.modules.pop(name, None)


def call(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def user_error(capsys, *argv: str) -> str:
    status, _, err = call(capsys, *argv)
    assert status == 2, err
    assert err.startswith("biograd: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def final_acc(run_dir: Path) -> dict[str, list[float]]:
    """Rule -> the test accuracy after the last epoch of each seed, from metrics.csv."""
    last: dict[tuple[str, str], dict[str, str]] = {}
    for row in metrics(run_dir):
        key = (row["rule"], row["seed"])
        if key not in last or int(row["epoch"]) > int(last[key]["epoch"]):
            last[key] = row
    out: dict[str, list[float]] = {}
    for (rule, _), row in last.items():
        out.setdefault(rule, []).append(float(row["test_acc"]))
    return out


# --- the command line -------------------------------------------------------------------------


def test_compare_with_model_and_data_factories(user, capsys):
    out = user / "cmp"
    status, stdout, _ = call(
        capsys, "compare", "--model", "userfx:make_net", "--data", "userfx:load", "--rules", RULES,
        "--epochs", "2", "--seeds", "1", "--out", str(out), "model.kwargs.hidden=12",
        "data.kwargs.n_train=160",
    )  # fmt: skip
    assert status == 0
    for rule in RULES.split(","):
        assert f"| {rule} | " in stdout
    assert "∠ fc1 (°)" in stdout and "∠ out (°)" in stdout
    plots = sorted(out.glob("plots/*.png"))
    assert {p.name for p in plots} >= {"accuracy.png", "loss.png", "alignment_gradient.png"}
    assert all(p.read_bytes().startswith(PNG) for p in plots)
    rows = metrics(out)
    assert [(r["rule"], r["epoch"]) for r in rows] == [
        (rule, epoch) for rule in RULES.split(",") for epoch in ("1", "2")
    ]
    assert int(rows[0]["step"]) == 5  # 160 examples / batch 32: the factory's kwargs were used
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == {
        "name": "make_net",
        "factory": "userfx:make_net",
        "kwargs": {"hidden": 12},
    }
    assert cfg["data"]["factory"] == "userfx:load" and cfg["data"]["kwargs"] == {"n_train": 160}
    state = torch.load(out / "checkpoints" / "fa-seed0.pt", weights_only=True)["model"]
    assert state["fc1.weight"].shape == (12, 10)
    # the same comparison again resumes (nothing to train, the same table)
    table = (out / "results.md").read_text()
    status, _, _ = call(
        capsys, "compare", "--model", "userfx:make_net", "--data", "userfx:load", "--rules", RULES,
        "--epochs", "2", "--seeds", "1", "--out", str(out), "model.kwargs.hidden=12",
        "data.kwargs.n_train=160",
    )  # fmt: skip
    assert status == 0 and (out / "results.md").read_text() == table
    assert len(metrics(out)) == len(rows)


def _write_config(path: Path, out: Path, **extra) -> Path:
    cfg = {
        "data": {"factory": "./userfx.py:load", "kwargs": {"n_train": 96, "n_test": 32}},
        "model": {"factory": "./userfx.py:make_net", "kwargs": {"hidden": 8}},
        "rules": RULES.split(","),
        "epochs": 2,
        "alignment": {"every": 2},
        "plots": False,
        "out": str(out),
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_with_file_factories_resumes_and_reruns_from_its_own_config(
    user, capsys, monkeypatch
):
    whole, cut = user / "whole", user / "cut"
    assert call(capsys, "train", str(_write_config(user / "whole.yaml", whole)))[0] == 0

    # Interrupt the second run in its second epoch (bp), then resume it.
    real, calls = trainer.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", interrupted)
    config = _write_config(user / "cut.yaml", cut)
    status, _, err = call(capsys, "train", str(config))
    assert status == 130 and "--resume" in err
    assert [r["epoch"] for r in metrics(cut)] == ["1"]
    monkeypatch.setattr(trainer, "evaluate", real)
    assert call(capsys, "train", str(config), "--resume")[0] == 0
    assert [(r["rule"], r["epoch"]) for r in metrics(cut)] == [
        (r["rule"], r["epoch"]) for r in metrics(whole)
    ]
    for rule in RULES.split(","):
        a = trainer.final_state(cut, rule, 0)
        b = trainer.final_state(whole, rule, 0)
        assert a.keys() == b.keys()
        for key, value in a.items():  # bit-identical on the CPU
            same = (
                torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]
            )
            assert same, (rule, key)

    # The resolved config.yaml alone re-runs the experiment.
    again = user / "again"
    assert call(capsys, "train", str(whole / "config.yaml"), f"out={again}")[0] == 0
    assert final_acc(again) == final_acc(whole)
    for row_a, row_b in zip(metrics(again), metrics(whole), strict=True):
        assert row_a["train_loss"] == row_b["train_loss"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--model", "nosuchmodule_fx:make", "no module named 'nosuchmodule_fx'"),
        ("--model", "userfx:make_nett", "userfx has no attribute 'make_nett'; did you mean 'make_net'?"),
        ("--model", "broken:make", "importing broken raised RuntimeError: boom (broken.py:1)"),
        ("--model", "./nope.py:make", "no file ./nope.py"),
        ("--model", "userfx:not_a_model", "returned an int, not a torch.nn.Module"),
        ("--model", "userfx:Net", "raised TypeError"),
        ("--model", "userfx:two_classes", "logits of shape (batch, 3)"),
        ("--data", "userfx:not_a_model", "returned an int; expected (train, test)"),
        ("--data", "userfx:one_pair", "one (x, y) pair"),
        ("--data", "userfx:loadd", "did you mean 'load'?"),
        ("--model", "userfx:", "is not of the form 'package.module:function'"),
    ],
)  # fmt: skip
def test_factory_errors_are_one_line_and_write_nothing(user, capsys, option, value, message):
    other = {"--model": ["--data", "userfx:load"], "--data": ["--model", "userfx:make_net"]}
    out = user / "run"
    err = user_error(
        capsys, "compare", option, value, *other[option], "--rules", "bp,fa", "--epochs", "1",
        "--seeds", "1", "--out", str(out),
    )  # fmt: skip
    assert message in err
    assert not out.exists()


def test_config_keys_of_factories_are_checked(user, capsys):
    config = user / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "mlp", "factory": "userfx:make_net"}}))
    assert "'mlp' is a built-in model" in user_error(capsys, "train", str(config))
    config.write_text(yaml.safe_dump({"model": {"factory": "userfx:make_net", "hidden": 4}}))
    assert "go under model.kwargs" in user_error(capsys, "train", str(config))
    config.write_text(yaml.safe_dump({"data": {"factory": "userfx:load", "root": "/data"}}))
    assert "root and download are for built-in data sets" in user_error(
        capsys, "train", str(config)
    )
    config.write_text(yaml.safe_dump({"data": {"kwargs": {"n": 1}}}))
    assert "data.factory, which is not set" in user_error(capsys, "train", str(config))
    config.write_text(
        yaml.safe_dump({"data": {"factory": "userfx:load", "augment": {"hflip": True}}})
    )
    assert "crops and flips need images" in user_error(capsys, "train", str(config))


# --- from Python ------------------------------------------------------------------------------


def tiny_net(in_shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_shape[0], 16), nn.Tanh(), nn.Linear(16, classes)
    )


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) + 2 * nn.functional.one_hot(y, 6).float()
    return x, y


def test_python_compare_returns_the_table_of_its_metrics(tmp_path):
    train, test = _blobs(192, 0), _blobs(96, 1)
    out = tmp_path / "py"
    with pytest.warns(UserWarning, match="cannot be re-run from the file alone"):
        result = biograd.compare(
            tiny_net, train, test, rules=["bp", "fa", "dfa"], epochs=2, seeds=2, out=out,
            optim={"lr": 0.1}, alignment={"every": 3},
        )  # fmt: skip
    assert [row["rule"] for row in result.rows] == ["bp", "fa", "dfa"]
    finals = final_acc(out)
    for row in result.rows:
        assert row["seeds"] == [0, 1] and row["epochs"] == 2
        assert row["test_acc_per_seed"] == finals[row["rule"]]
        assert row["test_acc"] == pytest.approx(statistics.fmean(finals[row["rule"]]))
        assert row["test_acc_std"] == pytest.approx(statistics.stdev(finals[row["rule"]]))
        assert set(row["angles"]) >= {"1", "3"}
        assert f"| {row['rule']} | {100 * row['test_acc']:.1f} ± " in result.markdown()
    assert result.markdown() in (out / "results.md").read_text()
    assert result.plots and all(p.read_bytes().startswith(PNG) for p in result.plots)
    assert set(result.plots) == set(out.glob("plots/*.png"))
    assert float(result.config.optim.lr) == 0.1 and result.config.alignment.every == 3
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["factory"] == f"{__name__}:tiny_net"  # importable: recorded so
    assert cfg["data"]["factory"].startswith("python:data-")  # tensors: this process only
    assert result.reproducible is False

    # Again with the same data: resumed, nothing trained; with other data: refused.
    with pytest.warns(UserWarning):
        again = biograd.compare(
            tiny_net, train, test, rules=["bp", "fa", "dfa"], epochs=2, seeds=2, out=out,
            optim={"lr": 0.1}, alignment={"every": 3},
        )  # fmt: skip
    assert again.rows == result.rows and len(metrics(out)) == 3 * 2 * 2
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match=r"data\.factory"):
        biograd.compare(
            tiny_net, _blobs(192, 5), test, rules=["bp", "fa", "dfa"], epochs=2, seeds=2,
            out=out, optim={"lr": 0.1}, alignment={"every": 3},
        )  # fmt: skip


def test_python_compare_with_a_lambda_is_not_reproducible_from_its_file(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "lam"
    with pytest.warns(UserWarning):
        result = biograd.compare(
            lambda classes: nn.Linear(6, classes), _blobs(64, 0), _blobs(32, 1), rules="bp,dfa",
            epochs=1, seeds=1, out=out,
        )  # fmt: skip
    spec = result.config.model.factory
    assert spec is not None and spec.startswith("python:") and spec.endswith("<lambda>")
    monkeypatch.setattr(factory, "_SESSION_OBJECTS", {})  # as in a new process
    err = user_error(capsys, "train", str(out / "config.yaml"), f"out={tmp_path / 'x'}")
    assert "cannot be re-created from the file" in err
    with pytest.raises(ConfigError, match="not a model instance"):
        biograd.compare(nn.Linear(6, 3), _blobs(64, 0), _blobs(32, 1), out=tmp_path / "m")


def test_python_compare_takes_zoo_names_as_the_command_does(tmp_path):
    result = biograd.compare(
        "mlp", "digits", rules="fa", epochs=1, seeds=1, out=tmp_path / "zoo",
        model={"widths": [8]}, data={"subset": 96, "test_subset": 48},
    )  # fmt: skip
    assert result.reproducible and result.config.model.name == "mlp"
    assert result.config.model.kwargs() == {"widths": [8]} and result.config.data.name == "digits"
    assert [row["rule"] for row in result.rows] == ["fa"]
    assert result.config.optim.lr == 0.02  # the command's defaults


def test_documented_example_runs_from_python_and_the_command_line(tmp_path, capsys):
    # The file spec loads docs/examples/own_model.py; its functions are recorded by that spec.
    make_net = factory.resolve(f"{EXAMPLE}:make_net", "model.factory")
    make_data = factory.resolve(f"{EXAMPLE}:make_data", "data.factory")
    result = biograd.compare(
        make_net, make_data, rules=["bp", "dfa"], epochs=1, seeds=1, out=tmp_path / "ex",
        model_kwargs={"width": 4}, data_kwargs={"n_train": 128, "n_test": 64}, plots=False,
    )  # fmt: skip
    assert result.reproducible
    assert result.config.model.factory == f"{EXAMPLE}:make_net"
    assert [row["rule"] for row in result.rows] == ["bp", "dfa"]
    assert "∠ conv1 (°)" in result.markdown() and "∠ conv2 (°)" in result.markdown()
    status, stdout, _ = call(
        capsys, "compare", "--model", f"{EXAMPLE}:make_net", "--data", f"{EXAMPLE}:make_data",
        "--rules", "fa", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path / "cli"), "plots=false",
        "model.kwargs.width=4", "data.kwargs.n_train=128", "data.kwargs.n_test=64",
    )  # fmt: skip
    assert status == 0 and "| fa | " in stdout


def test_a_script_run_as_main_records_its_file(tmp_path, capsys, monkeypatch):
    script = tmp_path / "exp.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            import biograd

            def net(in_shape, classes):
                return nn.Sequential(nn.Linear(in_shape[0], 8), nn.Tanh(), nn.Linear(8, classes))

            def data():
                g = torch.Generator().manual_seed(0)
                x = torch.randn(96, 5, generator=g)
                return biograd.DataSplits(train=(x[:64], (x[:64, 0] > 0).long()),
                                          test=(x[64:], (x[64:, 0] > 0).long()))

            if __name__ == "__main__":
                RESULT = biograd.compare(net, data, rules=["bp", "fa"], epochs=1, seeds=1,
                                         out="runs/exp", plots=False)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(script), run_name="__main__")
    result = namespace["RESULT"]
    assert result.reproducible and result.config.model.factory == "exp.py:net"
    assert result.config.data.factory == "exp.py:data"
    # As in a new process: the file is loaded again, without running its __main__ block.
    monkeypatch.setattr(factory, "_FILE_MODULES", {})
    assert call(capsys, "train", "runs/exp/config.yaml", "out=runs/again")[0] == 0
    assert final_acc(tmp_path / "runs/again") == final_acc(tmp_path / "runs/exp")


# --- what a data factory may return -----------------------------------------------------------


def test_data_forms():
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.arange(20) % 4
    pair = (x[:12], y[:12]), (x[12:], y[12:])
    train, test = as_splits(pair)
    assert isinstance(train, ImageDataset)
    assert train.x.dtype == torch.float32 and train.shape == (3,) and train.classes == 4
    ds = torch.utils.data.TensorDataset(x, y)
    items = [(x[i], int(y[i])) for i in range(20)]

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    forms: list[Any] = [
        {"train": ds, "test": Items()},
        biograd.DataSplits(train=Items(), test=pair[1], classes=7),
        (x[:12].numpy(), y[:12].numpy()),
    ]
    for form in forms:
        if isinstance(form, tuple):
            form = (form, pair[1])
        train, test = as_splits(form)
        assert torch.equal(test.y, y[12:] if len(test) == 8 else y)
        assert train.classes == (7 if isinstance(form, biograd.DataSplits) else 4)
    for bad, message in [
        ((x, y), "one (x, y) pair"),
        (((x, y.float()), pair[1]), "labels must be integer"),
        (((x, y[:5]), pair[1]), "holds 20 examples but y 5"),
        (((x[:, :2], y), pair[1]), "test examples (3,)"),
        ((pair[0], (x[12:], y[12:] - 5)), "class indices >= 0"),
        (biograd.DataSplits(train=pair[0], test=pair[1], classes=2), "outside 0..1"),
        (((x.long(), y), pair[1]), "inputs must be floating-point"),
        ("data", "expected (train, test)"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            as_splits(bad)


@pytest.mark.slow
def test_train_with_factories_under_torchrun_matches_one_process(user, capsys):
    """The factories resolve on every rank: 2 gloo ranks train the single-process weights."""
    config = user / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"factory": "userfx:load", "kwargs": {"n_train": 128, "n_test": 64}},
                "model": {"factory": "userfx:make_net", "kwargs": {"hidden": 8}},
                "rules": ["fa"],
                "epochs": 1,
                "plots": False,
            }
        )
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launch, "-m", "biograd.cli", "train", str(config), "out=two"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=user)
    assert done.returncode == 0, done.stderr[-3000:]
    assert call(capsys, "train", str(config), "out=one")[0] == 0
    two, one = (
        torch.load(user / f"{out}/checkpoints/fa-seed0.pt", weights_only=True)
        for out in ("two", "one")
    )
    assert two["step"] == one["step"] == 4  # 128 examples / global batch 32
    for key, value in one["model"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
