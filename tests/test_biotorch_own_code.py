"""The driver that runs BioTorch's own code on LeNet/MNIST and Fashion-MNIST
(benchmarks/reproduction/biotorch_own_code, docs/results.md 1.2 and 1.3): its torchvision
stand-in keeps torchvision's semantics, its config carries the published protocol, and its
summary reads BioTorch's log as BioTorch selects (the first best epoch)."""

from __future__ import annotations

import gzip
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from benchmark_scripts import load
from biograd.data import ImageDataset
from biograd.errors import DataError

HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduction" / "biotorch_own_code"


@pytest.fixture
def tv() -> Iterator[ModuleType]:
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "torchvision"}
    sys.path.insert(0, str(HERE / "stub"))
    try:
        yield importlib.import_module("torchvision")
    finally:
        sys.path.remove(str(HERE / "stub"))
        for k in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_transforms_are_torchvisions_on_pil_images(tv: ModuleType) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    t = tv.transforms
    resized = t.Resize((32, 32))(img)
    assert resized.size == (32, 32)
    assert np.array_equal(np.array(resized), np.array(img.resize((32, 32), Image.BILINEAR)))
    x = t.ToTensor()(resized)
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.from_numpy(np.array(resized)).float() / 255)
    y = t.Compose([t.Resize((32, 32)), t.ToTensor(), t.Normalize((0.1307,), (0.3081,))])(img)
    assert torch.allclose(y, (x - 0.1307) / 0.3081)
    with pytest.raises(NotImplementedError):
        t.RandomCrop(32)


@pytest.mark.parametrize(("cls", "name"), [("MNIST", "mnist"), ("FashionMNIST", "fashion-mnist")])
def test_mnist_gives_the_original_bytes_and_only_official_files(tv: ModuleType, tmp_path,
                                                              monkeypatch, cls: str,
                                                              name: str) -> None:  # fmt: skip
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    ds = ImageDataset(torch.from_numpy(images).float().unsqueeze(1) / 255.0,
                      torch.tensor([7, 2, 1]), 10, name, (0.1307,), (0.3081,), "test")  # fmt: skip
    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(tv.datasets, "load_dataset",
                        lambda n, root, split: asked.append((n, split)) or ds)  # fmt: skip
    mnist = getattr(tv.datasets, cls)(str(tmp_path), train=False)
    assert asked == [(name, "test")]
    assert np.array_equal(mnist.data, images) and len(mnist) == 3
    img, label = mnist[1]
    assert img.mode == "L" and np.array_equal(np.array(img), images[1]) and label == 2
    monkeypatch.undo()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not mnist"))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not mnist"))
    with pytest.raises(DataError, match="md5"):
        getattr(tv.datasets, cls)(str(tmp_path), train=False)
    with pytest.raises(DataError, match="missing"):
        getattr(tv.datasets, cls)(str(tmp_path), train=True, download=True)


def test_config_carries_the_published_protocol(tmp_path: Path, monkeypatch) -> None:
    gen = load("reproduction/biotorch_own_code/gen_config")
    argv = ["gen_config.py", "brsf", "0.01", "2021", "100", str(tmp_path / "c"), str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    gen.main()
    cfg = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert cfg["model"]["mode"]["type"] == "brsf"
    assert cfg["model"]["mode"]["options"]["init"] == "xavier"
    assert cfg["data"]["target_size"] == 32
    train = cfg["training"]
    assert train["hyperparameters"] == {"epochs": 100, "batch_size": 64}
    assert train["optimizer"] == {"type": "SGD", "lr": 0.01, "weight_decay": 1e-3, "momentum": 0.9}
    assert train["lr_scheduler"]["milestones"] == [50, 75]
    assert cfg["experiment"] == {"name": "run", "output_dir": str(tmp_path / "c"), "seed": 2021,
                                 "deterministic": True}  # fmt: skip
    assert cfg["data"]["dataset"] == "mnist"
    monkeypatch.setattr(sys, "argv", [*argv, "--dataset", "fashion_mnist"])
    gen.main()
    cfg = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert cfg["data"] == {"dataset": "fashion_mnist", "dataset_path": str(tmp_path.resolve()),
                           "target_size": 32, "num_workers": 0}  # fmt: skip


def test_summary_takes_the_first_best_epoch_and_leaves_out_the_final_evaluation(tmp_path) -> None:
    summarize = load("reproduction/biotorch_own_code/summarize")
    log = "".join(f" * Acc@1 {a} Acc@5 100.000\n" for a in ("98.000", "99.300", "99.100", "99.300"))
    log += " * Acc@1 99.300 Acc@5 100.000\nTest Results saved in: x\nwall_seconds 12\n"
    (tmp_path / "train.log").write_text(log)
    s = summarize.summarize(tmp_path)
    assert s["per_epoch_test_error"] == [2.0, 0.7, 0.9, 0.7]
    assert (s["best_epoch"], s["best_test_error"], s["last_epoch_test_error"]) == (2, 0.7, 0.7)
    assert s["final_evaluation_test_error"] == 0.7 and s["wall_seconds"] == 12
    assert json.loads((tmp_path / "summary.json").read_text()) == s
