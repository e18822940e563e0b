"""Image folders of small images decode once into a cached uint8 tensor (invalidated when the
folder changes); the CIFAR-10 JPEG proxy loads from its folder or straight from its tarball; a
validation split is carved from the training set."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biograd.data import cache, data_label, load_dataset, validation_split
from biograd.data import datasets as ds_module
from biograd.errors import DataError
from biograd.experiment.config import validate
from biograd.experiment.trainer import load_data

CLASSES = ("cat", "dog", "frog")


def write_folder(root: Path, per_class: int = 4, size: int = 8, fmt: str = "png") -> Path:
    """root/{train,test}/<class>/NNNN.<fmt>: class c has its channel c at 200, the rest random."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
                pixels[:, :, c] = 200
                Image.fromarray(pixels).save(folder / f"{i:04d}.{fmt}")
    return root


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(folder))
    return folder


def test_folder_decodes_once_into_a_cached_uint8_tensor(tmp_path: Path, cache_dir: Path) -> None:
    root = write_folder(tmp_path / "imgs")
    x, y, classes = cache.decoded_folder(root / "train")
    assert x.dtype == torch.uint8 and x.shape == (12, 3, 8, 8)
    assert classes == list(CLASSES) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    png = np.array(Image.open(root / "train" / "dog" / "0002.png"))
    assert torch.equal(x[6], torch.from_numpy(png).permute(2, 0, 1))  # lossless: exact pixels
    (entry,) = list(cache_dir.iterdir())
    # a second load reads the cache, not the images
    for p in (root / "train").rglob("*.png"):
        p.chmod(0)
    try:
        x2, _, _ = cache.decoded_folder(root / "train")
    finally:
        for p in (root / "train").rglob("*.png"):
            p.chmod(0o644)
    assert torch.equal(x, x2) and list(cache_dir.iterdir()) == [entry]


def test_cache_is_invalidated_when_the_folder_changes(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs")
    before = cache.fingerprint(root / "train")
    x, _, _ = cache.decoded_folder(root / "train")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "train" / "cat" / "0000.png")
    after = cache.fingerprint(root / "train")
    assert after != before
    x2, _, _ = cache.decoded_folder(root / "train")
    assert int(x2[0].max()) == 0 and not torch.equal(x, x2)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "train" / "cat" / "0009.png")
    x3, _, _ = cache.decoded_folder(root / "train")
    assert len(x3) == 13


def test_mixed_sizes_are_a_one_line_error(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(root / "train" / "cat" / "0005.png")
    with pytest.raises(DataError, match="one size"):
        cache.decoded_folder(root / "train")


def test_imagefolder_in_memory_is_an_image_dataset(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs")
    train = load_dataset("imagefolder", root=root, split="train", in_memory=True)
    test = load_dataset("imagefolder", root=root, split="test", in_memory=True)
    assert train.x.dtype == torch.float32 and train.x.shape == (12, 3, 8, 8)
    assert test.mean == train.mean  # the training split's statistics
    assert train.mean[0] == pytest.approx(float(train.x[:, 0].mean()), abs=1e-6)
    assert train.std[1] == pytest.approx(float(train.x[:, 1].std(unbiased=False)), abs=1e-6)


def test_cifar10_jpeg_from_its_tarball_and_from_the_unpacked_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = write_folder(tmp_path / "imgs", per_class=2, size=32, fmt="jpg")
    data = tmp_path / "data"
    (data / "cifar10-jpeg").mkdir(parents=True)
    archive = data / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(images / split, arcname=split)
    monkeypatch.setattr(ds_module, "CIFAR10_JPEG_SHA256", None)
    monkeypatch.setattr(ds_module, "_CIFAR10_JPEG_CLASSES", 3)
    from_tar = load_dataset("cifar10_jpeg", root=data, split="train")
    assert from_tar.name == "cifar10-jpeg" and from_tar.x.shape == (6, 3, 32, 32)
    unpacked = tmp_path / "unpacked"
    (unpacked / "cifar10-jpeg").mkdir(parents=True)
    for split in ("train", "test"):
        (images / split).rename(unpacked / "cifar10-jpeg" / split)
    from_folder = load_dataset("cifar10_jpeg", root=unpacked, split="test")
    assert from_folder.x.shape == (6, 3, 32, 32) and from_folder.mean == from_tar.mean
    assert data_label("cifar10_jpeg") == "CIFAR-10 (JPEG proxy)"


def test_cifar10_jpeg_checks_the_archive_sha256(tmp_path: Path) -> None:
    (tmp_path / "cifar10-jpeg").mkdir()
    (tmp_path / "cifar10-jpeg" / "cifar10-jpeg.tar.gz").write_bytes(b"not it")
    with pytest.raises(DataError, match="sha256"):
        load_dataset("cifar10_jpeg", root=tmp_path, split="train")
    with pytest.raises(DataError, match="cifar10-jpeg"):
        load_dataset("cifar10_jpeg", root=tmp_path / "nothing", split="train")


def test_validation_split_holds_out_training_examples() -> None:
    train = load_dataset("digits", split="train")
    rest, held = validation_split(train, 100)
    assert len(rest) == len(train) - 100 and len(held) == 100 and held.split == "validation"
    both = torch.cat([rest.x, held.x]).reshape(len(train), -1)
    assert (
        torch.unique(both, dim=0).shape[0]
        == torch.unique(train.x.reshape(len(train), -1), dim=0).shape[0]
    )
    assert len(set(held.y.tolist())) > 5  # a random draw, not one class
    cfg = validate({"data": {"name": "digits", "validation": 100}})
    a, b = load_data(cfg)
    assert len(a) == len(train) - 100 and len(b) == 100
    with pytest.raises(DataError):
        validation_split(train, len(train))
