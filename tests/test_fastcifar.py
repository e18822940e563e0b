"""The one-command GPU run (biograd.experiment.fastcifar) end to end on the CPU with --tiny: every
cell is a process, each writes its metrics and cell.yaml, results.md holds the published table
next to ours, and a second run skips the finished cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from biograd.data import cache
from biograd.experiment import fastcifar

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny CIFAR-10 JPEG proxy folder: 4 training and 2 test 32x32 JPEGs per class."""
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / "cifar10-jpeg" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                pixels[: 3 * c + 3] = 255
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")
    return root


def test_gpu_augment_crops_and_flips_within_the_padded_image() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8).to(torch.uint8)
    out = fastcifar.gpu_augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(2):  # every output image is a (possibly flipped) window of the padded input
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(w, out[i]) or torch.equal(w.flip(2), out[i]) for w in windows)


def test_tiny_run_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--data-dir", str(data_dir), "--out", str(out), "--tiny", "--rules", "bp"]
    assert fastcifar.main([*args, "--deep-rules", "fa"]) == 0
    for cell in ("resnet20/bp-seed0", "resnet56/fa-seed0"):
        info = yaml.safe_load((out / cell / "cell.yaml").read_text())
        assert info["status"] == "done" and info["epochs"] == 1 and not info["compiled"]
        rows = (out / cell / "metrics.csv").read_text().splitlines()
        assert rows[0].startswith("rule,seed,epoch") and len(rows) == 2
    table = (out / "results.md").read_text()
    assert "CIFAR-10 (JPEG proxy)" in table
    assert "| resnet20 | bp | 8.63 |" in table and "| resnet56 | fa | 34.88 |" in table
    before = (out / "resnet20" / "bp-seed0" / "cell.yaml").read_text()
    assert fastcifar.main([*args, "--deep-rules", ""]) == 0  # finished cells are skipped
    assert (out / "resnet20" / "bp-seed0" / "cell.yaml").read_text() == before
