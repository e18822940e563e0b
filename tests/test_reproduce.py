"""Paper reproductions: every spec under configs/ validates at every scale, ``biograd reproduce``
runs the smallest grids at ``--scale smoke`` on generated MNIST files (and resumes), and the
full-scale CIFAR-10 ResNet-20 and ImageNet ResNet-18 configs take a training step."""

from __future__ import annotations

import gzip
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from biograd.cli import main
from biograd.data import datasets
from biograd.experiment.config import Config, validate
from biograd.experiment.runner import cell_configs, find_spec, load_spec
from biograd.experiment.trainer import (
    build,
    check,
    final_state,
    make_optimizer,
    make_scheduler,
    read_rows,
    seed_everything,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPECS = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "example")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped idx file of unsigned bytes (magic 0 0 8 ndim, big-endian int32 sizes, data)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def mnist_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory holding a small generated MNIST (300 train, 200 test images of a class
    dependent bright square) whose checksums the loader is told to trust."""
    root = tmp_path / "data"
    folder = root / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    table = datasets._IDX["mnist"].remote.files
    for split, n in (("train", 300), ("test", 200)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 4 + 10 * r : 12 + 10 * r, 2 + 5 * col : 6 + 5 * col] = 255
        for filename, array in zip(IDX_FILES[split], (images, labels)):
            write_idx(folder / filename, array)
            digest = hashlib.md5((folder / filename).read_bytes()).hexdigest()
            monkeypatch.setitem(table, filename, digest)
    return root


# --- every spec -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_spec_validates_at_every_scale(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    assert spec.title and spec.paper
    for setting, pub in spec.published.items():
        assert setting in spec.settings and set(pub) <= set(spec.rules)
    for scale in {"smoke", "full", *spec.scales}:
        for cfg in cell_configs(spec, scale).values():
            check(cfg.model_copy(update={"device": "cpu"}))
            for rule in cfg.run_rules():
                cfg.for_rule(rule)
    assert cell_configs(spec, "full")  # the published settings are the full scale
    assert find_spec(f"{spec_path.parent.name}/{spec_path.stem}").resolve() == spec_path


def test_biotorch_specs_hold_the_published_table() -> None:
    mnist = load_spec(CONFIGS / "biotorch" / "lenet_mnist.yaml")
    assert mnist.published["default"]["bp"] == 0.91
    assert mnist.published["default"]["dfa"] == 1.61
    full = cell_configs(mnist, "full")["default"]
    assert (full.epochs, full.data.batch_size, full.schedule.milestones) == (100, 64, [50, 75])
    assert (full.optim.momentum, full.optim.weight_decay) == (0.9, 1e-3)
    resnet = cell_configs(load_spec(CONFIGS / "biotorch" / "resnet20_cifar10.yaml"), "full")
    cfg = resnet["default"]
    assert (cfg.epochs, cfg.optim.lr, cfg.for_rule("dfa").optim.lr) == (250, 0.1, 1e-3)
    imagenet = cell_configs(load_spec(CONFIGS / "biotorch" / "resnet18_imagenet.yaml"), "full")
    assert imagenet["default"].for_rule("dfa").optim.name == "adam"


# --- rule overrides and the bottleneck key ----------------------------------------------------


def test_rule_overrides_change_only_their_rule() -> None:
    cfg = validate({"rules": ["bp", "fa"], "rule_overrides": {"fa": {"optim.lr": 0.003}}})
    assert cfg.for_rule("bp").optim.lr == 0.05
    assert cfg.for_rule("fa").optim.lr == 0.003
    assert cfg.for_rule("fa").rule_overrides == {}


@pytest.mark.parametrize(
    "overrides",
    [{"fa": {"optim.lr": -1}}, {"fa": {"data.subset": 10}}, {"nope": {"optim.lr": 0.1}}],
)
def test_bad_rule_overrides_are_config_errors(overrides: dict) -> None:
    from biograd.errors import ConfigError

    with pytest.raises(ConfigError):
        validate({"rule_overrides": overrides})


def test_filter_bottleneck_trains_only_its_share_of_weights(
    mnist_dir: Path, tmp_path: Path
) -> None:
    """Their bottleneck (mode filter): at b = 1, 1/800 of fc2's weights learn, the same ones
    under bp and dfa (drawn from the run's seed)."""
    out = tmp_path / "bottleneck"
    args = ["--scale", "smoke", "--data-dir", str(mnist_dir), "--out", str(out)]
    assert main(["reproduce", "launay2019/bottleneck_fc_mnist", *args]) == 0
    spec = load_spec(CONFIGS / "launay2019" / "bottleneck_fc_mnist.yaml")
    cfg = cell_configs(spec, "smoke", str(mnist_dir))["b1"]
    moved = {}
    for rule in ("bp", "dfa"):
        seed_everything(0)
        start = build(cfg, rule, 0, (1, 28, 28), 10).state_dict()["fc2.weight"]
        end = final_state(out / "b1" / f"{rule}-seed0", rule, 0)["fc2.weight"]
        moved[rule] = end != start  # plain SGD: filtered weights never move
        assert 400 < int(moved[rule].sum()) < 1200  # 800 of 640,000 expected
    # the same entries (up to a few whose small bp step rounds away in float32)
    both = int((moved["bp"] | moved["dfa"]).sum())
    assert both <= max(int(m.sum()) for m in moved.values()) + 5
    alignment = read_rows(out / "b1" / "dfa-seed0" / "alignment.csv")
    assert any(r["layer"] == "fc2" and r["kind"] == "gradient" for r in alignment)


# --- biograd reproduce at --scale smoke -------------------------------------------------------


def test_reproduce_smoke_writes_table_and_resumes(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lenet"
    args = ["reproduce", "biotorch/lenet_mnist", "--scale", "smoke", "--data-dir", str(mnist_dir)]
    assert main([*args, "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    spec = load_spec(CONFIGS / "biotorch" / "lenet_mnist.yaml")
    metrics = [
        row
        for rule in spec.rules
        for row in read_rows(out / "default" / f"{rule}-seed0" / "metrics.csv")
    ]
    assert sorted({r["rule"] for r in metrics}) == sorted(spec.rules)
    for rule in spec.rules:
        (row,) = [r for r in metrics if r["rule"] == rule]
        error = 100 * (1 - float(row["test_acc"]))
        published = spec.published["default"].get(rule)
        line = next(t for t in table.splitlines() if t.startswith(f"| default | {rule} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(error, abs=0.005)
        if published is not None:
            assert cells[2] == f"{published:.2f}"
            assert float(cells[4]) == pytest.approx(error - published, abs=0.01)
    # the bright squares make the task easy: backprop learns it in one epoch of 8 steps
    (bp,) = [r for r in metrics if r["rule"] == "bp"]
    assert float(bp["test_acc"]) > 0.2

    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0  # finished cells are skipped
    assert [
        row
        for rule in spec.rules
        for row in read_rows(out / "default" / f"{rule}-seed0" / "metrics.csv")
    ] == metrics
    assert "| default | bp |" in capsys.readouterr().out


def test_reproduce_unknown_scale_is_one_line_error(
    mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reproduce", "biotorch/lenet_mnist", "--scale", "huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("biograd: error:") and "huge" in err and "\n" not in err


# --- the full-scale GPU configs take a step on generated data -------------------------------


def one_step(cfg: Config, rule: str, shape: tuple[int, int, int], classes: int, n: int) -> None:
    """Build ``rule``'s model, optimizer and schedule from ``cfg`` on the CPU and take one
    training step on a random batch; the loss must be finite and the weights must move."""
    cfg = cfg.for_rule(rule).model_copy(update={"device": "cpu"})
    check(cfg)
    seed_everything(0)
    model = build(cfg, rule, 0, shape, classes)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    assert sched is not None and opt.param_groups[0]["lr"] == cfg.optim.lr
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    x, y = torch.rand(n, *shape), torch.randint(0, classes, (n,))
    loss = F.cross_entropy(model(x), y)
    assert math.isfinite(loss.item())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "usf", "brsf", "frsf"])
def test_cifar10_resnet20_full_config_takes_a_step(rule: str) -> None:
    cfg = cell_configs(load_spec(CONFIGS / "biotorch" / "resnet20_cifar10.yaml"), "full")
    assert cfg["default"].model.name == "resnet20" and cfg["default"].data.name == "cifar10"
    one_step(cfg["default"], rule, (3, 32, 32), 10, n=4)


@pytest.mark.parametrize(
    ("rule", "side"),
    # dfa's dense feedback on 224x224 inputs holds ~2.5e9 random entries (~10 GB, fine on a GPU,
    # minutes on a CPU); its step (Adam, per the spec) runs on 32x32 inputs.
    [("bp", 224), ("usf", 224), ("dfa", 32)],
)
def test_imagenet_resnet18_full_config_takes_a_step(rule: str, side: int) -> None:
    cfg = cell_configs(load_spec(CONFIGS / "biotorch" / "resnet18_imagenet.yaml"), "full")
    assert cfg["default"].data.name == "imagefolder"
    one_step(cfg["default"], rule, (3, side, side), 1000, n=2)
