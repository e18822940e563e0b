"""Data sets and loaders on small files generated in every official format (idx gz, CIFAR python
pickles and archives, ImageNet-layout folders), downloads from a local HTTP server, and the
determinism of batching and augmentation."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biograd.data import (
    DATASETS,
    MIRROR_ENV,
    Augment,
    ImageDataset,
    ImageFolder,
    Loader,
    load_dataset,
    read_idx,
    resized,
    subset,
)
from biograd.data import datasets as ds_module
from biograd.data.datasets import digits_split, load_digits
from biograd.errors import DataError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SIZES = {"train": 12, "test": 5}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- generators of official formats ---------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file: magic 0x00 0x00 0x08 ndim, big-endian int32 sizes, unsigned bytes; gzipped."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_set(folder: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official file names with random 28x28 images; returns split -> (images, labels)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, (image_file, label_file) in IDX_FILES.items():
        images = rng.integers(0, 256, (SIZES[split], 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, SIZES[split], dtype=np.uint8)
        write_idx(folder / image_file, images)
        write_idx(folder / label_file, labels)
        arrays[split] = (images, labels)
    return arrays


def trust_idx(monkeypatch: pytest.MonkeyPatch, name: str, folder: Path) -> None:
    """Make the checksum table accept the generated files in ``folder``."""
    table = ds_module._IDX[name].remote.files
    for filename in table:
        if (folder / filename).exists():
            monkeypatch.setitem(table, filename, md5(folder / filename))


def cifar_batch(n: int, rng: np.random.Generator, labels: dict[str, int]) -> dict[bytes, object]:
    """A batch dict as the official Python 2 pickles hold it (bytes keys, uint8 (N, 3072))."""
    batch: dict[bytes, object] = {
        b"batch_label": b"generated",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    for key, classes in labels.items():
        batch[key.encode()] = [int(v) for v in rng.integers(0, classes, n)]
    return batch


def make_cifar(parent: Path, name: str, seed: int = 0) -> dict[str, dict[bytes, object]]:
    """The unpacked batch folder of ``name`` under ``parent``; returns member -> batch."""
    rng = np.random.default_rng(seed)
    spec = ds_module._CIFAR[name]
    folder = parent / spec.folder
    folder.mkdir(parents=True)
    labels = {"labels": 10} if name == "cifar10" else {"fine_labels": 100, "coarse_labels": 20}
    written = {}
    for split in ("train", "test"):
        for member in spec.members[split]:
            batch = cifar_batch(3 if split == "train" else 4, rng, labels)
            (folder / member).write_bytes(pickle.dumps(batch, protocol=2))
            written[member] = batch
    meta = "batches.meta" if name == "cifar10" else "meta"
    (folder / meta).write_bytes(pickle.dumps({b"label_names": [b"a"]}, protocol=2))
    return written


def trust_cifar(monkeypatch: pytest.MonkeyPatch, name: str, folder: Path) -> None:
    spec = ds_module._CIFAR[name]
    for members in spec.members.values():
        for member in members:
            if (folder / member).exists():
                monkeypatch.setitem(members, member, md5(folder / member))


def make_archive(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def make_image_folder(root: Path) -> None:
    """root/{train,val}/{cat,dog}/ with solid-colour PNGs (cat red, dog blue) of odd sizes."""
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    counts = {"train": 5, "val": 2}
    for split, count in counts.items():
        for cls, colour in colours.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                size = (20 + 3 * i, 14 + i)
                Image.new("RGB", size, colour).save(root / split / cls / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served on 127.0.0.1 (random free port) and its base URL."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- digits -----------------------------------------------------------------------------------


def test_digits_fixed_stratified_split() -> None:
    train, test = load_digits("train"), load_digits("test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.shape == test.shape == (1, 8, 8)
    assert train.classes == 10 and train.name == "digits"
    for d in (train, test):
        assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64
        assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    # Pixel values are the 17 grey levels 0..16 scaled by 1/16.
    assert torch.equal(train.x * 16, (train.x * 16).round())
    labels = np.concatenate([train.y.numpy(), test.y.numpy()])
    train_idx, test_idx = digits_split(labels)
    assert len(set(train_idx.tolist()) | set(test_idx.tolist())) == len(labels)
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    counts = torch.bincount(test.y, minlength=10).float()
    share = torch.bincount(torch.cat([train.y, test.y]), minlength=10).float() * 360 / 1797
    assert torch.all((counts - share).abs() < 1)
    again = load_dataset("digits", split="test")
    assert isinstance(again, ImageDataset)
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    assert again.mean == train.mean and again.std == train.std
    normalised = (train.x - train.mean[0]) / train.std[0]
    assert abs(float(normalised.mean())) < 1e-5 and abs(float(normalised.std()) - 1) < 1e-3


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(DataError) as exc:
        load_dataset("mnsit")
    assert "'mnist'" in one_line(exc)
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", split="val")
    assert set(DATASETS) == {
        "digits",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "cifar10-jpeg",
        "imagefolder",
    }


# --- idx ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loads_generated_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    arrays = make_idx_set(tmp_path / name)
    trust_idx(monkeypatch, name, tmp_path / name)
    for split in ("train", "test"):
        d = load_dataset(name, root=tmp_path, split=split)
        assert isinstance(d, ImageDataset)
        images, labels = arrays[split]
        assert d.x.shape == (SIZES[split], 1, 28, 28) and d.shape == (1, 28, 28)
        assert torch.equal(d.x, torch.from_numpy(images).float().unsqueeze(1) / 255)
        assert torch.equal(d.y, torch.from_numpy(labels).long())
        assert d.classes == 10 and d.split == split and len(d.mean) == 1


def test_idx_files_directly_under_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_idx_set(tmp_path)
    trust_idx(monkeypatch, "mnist", tmp_path)
    assert len(load_dataset("mnist", root=tmp_path, split="test")) == SIZES["test"]


def test_read_idx_layout(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)


def test_missing_file_names_it_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", root=tmp_path)
    message = one_line(exc)
    assert "train-images-idx3-ubyte.gz" in message
    assert "--data-dir" in message and "--download" in message


def test_checksum_mismatch_is_an_error(tmp_path: Path) -> None:
    make_idx_set(tmp_path / "mnist")  # generated files do not have the official md5
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", root=tmp_path)
    message = one_line(exc)
    assert "train-images-idx3-ubyte.gz" in message and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in message


def test_truncated_file_fails_the_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mnist"
    make_idx_set(folder)
    trust_idx(monkeypatch, "mnist", folder)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", root=tmp_path, split="test")
    assert "t10k-images-idx3-ubyte.gz" in one_line(exc) and "md5" in one_line(exc)


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (lambda raw: raw[: len(raw) // 2], "truncated"),
        (lambda raw: gzip.compress(gzip.decompress(raw)[:-7]), "header promises"),
        (lambda raw: gzip.compress(b"\x00\x00\x0d\x03" + gzip.decompress(raw)[4:]), "0x0d"),
        (lambda raw: b"not gzip at all", "not gzip"),
    ],
)
def test_corrupt_idx_with_matching_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: object, expect: str
) -> None:
    # A file damaged before its checksum was recorded must still not be parsed as data.
    folder = tmp_path / "mnist"
    make_idx_set(folder)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    trust_idx(monkeypatch, "mnist", folder)
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", root=tmp_path, split="test")
    assert "t10k-images-idx3-ubyte.gz" in one_line(exc) and expect in one_line(exc)


def test_mismatched_images_and_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mnist"
    make_idx_set(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    trust_idx(monkeypatch, "mnist", folder)
    with pytest.raises(DataError, match="matching"):
        load_dataset("mnist", root=tmp_path, split="test")


# --- CIFAR ------------------------------------------------------------------------------------


def expected_cifar(batches: list[dict[bytes, object]], key: bytes) -> tuple[torch.Tensor, ...]:
    data = np.concatenate([np.asarray(b[b"data"]) for b in batches])
    labels = np.concatenate([np.asarray(b[key]) for b in batches])
    return torch.from_numpy(data).float().div(255).reshape(-1, 3, 32, 32), torch.from_numpy(labels)


def test_cifar10_from_batch_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = make_cifar(tmp_path / "cifar10", "cifar10")
    trust_cifar(monkeypatch, "cifar10", tmp_path / "cifar10" / "cifar-10-batches-py")
    train = load_dataset("cifar10", root=tmp_path)
    assert isinstance(train, ImageDataset)
    x, y = expected_cifar([written[f"data_batch_{i}"] for i in range(1, 6)], b"labels")
    assert train.x.shape == (15, 3, 32, 32) and train.classes == 10 and len(train.mean) == 3
    assert torch.equal(train.x, x) and torch.equal(train.y, y)
    # Row-major channel planes: pixel (c, i, j) is byte c*1024 + i*32 + j of a row.
    row = np.asarray(written["data_batch_1"][b"data"])[0]
    assert round(float(train.x[0, 2, 5, 7]) * 255) == row[2 * 1024 + 5 * 32 + 7]
    test = load_dataset("cifar10", root=tmp_path, split="test")
    assert len(test) == 4


def test_cifar100_from_archive_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    written = make_cifar(work, "cifar100")
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "cifar-100-python.tar.gz"
    make_archive(work / "cifar-100-python", archive)
    trust_cifar(monkeypatch, "cifar100", work / "cifar-100-python")
    monkeypatch.setitem(ds_module._CIFAR["cifar100"].remote.files, archive.name, md5(archive))
    test = load_dataset("cifar100", root=root, split="test")
    x, y = expected_cifar([written["test"]], b"fine_labels")
    assert isinstance(test, ImageDataset)
    assert test.classes == 100 and torch.equal(test.x, x) and torch.equal(test.y, y)
    assert (root / "cifar-100-python" / "train").is_file()  # unpacked next to the archive


def test_cifar_wrong_archive_checksum(tmp_path: Path) -> None:
    work = tmp_path / "work"
    make_cifar(work, "cifar10")
    (tmp_path / "cifar10").mkdir()
    make_archive(work / "cifar-10-batches-py", tmp_path / "cifar10" / "cifar-10-python.tar.gz")
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", root=tmp_path)
    assert "cifar-10-python.tar.gz" in one_line(exc) and "md5" in one_line(exc)


def test_cifar_batch_checksum_mismatch(tmp_path: Path) -> None:
    make_cifar(tmp_path, "cifar10")
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", root=tmp_path, split="test")
    assert "test_batch" in one_line(exc) and "40351d587109b95175f43aff81a1287e" in one_line(exc)


def test_cifar_pickle_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    trust_cifar(monkeypatch, "cifar10", folder)
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", root=tmp_path, split="test")
    assert "test_batch" in one_line(exc) and not marker.exists()


# --- download ---------------------------------------------------------------------------------


def test_download_from_local_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_root: tuple[Path, str]
) -> None:
    served, url = http_root
    arrays = make_idx_set(served)
    trust_idx(monkeypatch, "fashion-mnist", served)
    root = tmp_path / "data"
    d = load_dataset("fashion-mnist", root=root, split="test", download=True, mirror=url)
    assert torch.equal(d.y, torch.from_numpy(arrays["test"][1]).long())
    stored = sorted(p.name for p in (root / "fashion-mnist").iterdir())
    assert stored == sorted(IDX_FILES["test"])  # no partial files left behind
    # A corrupt local copy is replaced when downloading, via the environment variable.
    (root / "fashion-mnist" / IDX_FILES["test"][0]).write_bytes(b"junk")
    monkeypatch.setenv(MIRROR_ENV, url)
    again = load_dataset("fashion-mnist", root=root, split="test", download=True)
    assert isinstance(again, ImageDataset) and isinstance(d, ImageDataset)
    assert torch.equal(again.x, d.x)


def test_download_of_wrong_or_absent_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_root: tuple[Path, str]
) -> None:
    served, url = http_root
    make_idx_set(served)  # checksums are the official ones: the served files do not match
    root = tmp_path / "data"
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", root=root, split="test", download=True, mirror=url)
    assert "t10k-images-idx3-ubyte.gz" in one_line(exc) and "md5" in one_line(exc)
    assert list((root / "mnist").iterdir()) == []
    (served / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", root=root, split="test", download=True, mirror=url)
    assert "404" in one_line(exc) or "Not Found" in one_line(exc)


def test_download_cifar_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_root: tuple[Path, str]
) -> None:
    served, url = http_root
    work = tmp_path / "work"
    written = make_cifar(work, "cifar10")
    make_archive(work / "cifar-10-batches-py", served / "cifar-10-python.tar.gz")
    trust_cifar(monkeypatch, "cifar10", work / "cifar-10-batches-py")
    archive_md5 = md5(served / "cifar-10-python.tar.gz")
    monkeypatch.setitem(
        ds_module._CIFAR["cifar10"].remote.files, "cifar-10-python.tar.gz", archive_md5
    )
    root = tmp_path / "data"
    test = load_dataset("cifar10", root=root, split="test", download=True, mirror=url)
    assert torch.equal(test.y, torch.tensor(written["test_batch"][b"labels"]))
    batches = root / "cifar10" / "cifar-10-batches-py"
    assert (batches / "data_batch_5").is_file()
    # With download allowed, a damaged batch is restored from the archive.
    (batches / "test_batch").write_bytes(b"damaged")
    again = load_dataset("cifar10", root=root, split="test", download=True, mirror=url)
    assert isinstance(again, ImageDataset) and isinstance(test, ImageDataset)
    assert torch.equal(again.x, test.x)
    (batches / "test_batch").write_bytes(b"damaged")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", root=root, split="test")


# --- image folders ----------------------------------------------------------------------------


def test_image_folder_scan_and_decode(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    train = load_dataset("imagefolder", root=tmp_path, image_size=8)
    val = load_dataset("imagefolder", root=tmp_path, split="test", image_size=8)
    assert isinstance(train, ImageFolder) and isinstance(val, ImageFolder)
    assert train.class_names == ("cat", "dog") and train.classes == 2
    assert (len(train), len(val)) == (10, 4) and train.shape == (3, 8, 8)
    assert train.y.tolist() == [0] * 5 + [1] * 5
    for x, y in Loader(val, 3, shuffle=False, workers=0):
        assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32
        for image, label in zip(x, y):
            colour = image.mean(dim=(1, 2))
            want = [1.0, 0.0, 0.0] if label == 0 else [0.0, 0.0, 1.0]
            assert torch.allclose(colour, torch.tensor(want))


def test_image_folder_loader_is_deterministic_across_workers(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    for i in range(5):  # varied content so that crops differ visibly
        pixels = np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "train" / "dog" / f"noise{i}.png")
    train = load_dataset("imagefolder", root=tmp_path, image_size=6)
    aug = Augment(hflip=True)
    runs = []
    for workers in (0, 2):
        loader = Loader(train, 4, seed=3, augment=aug, workers=workers)
        loader.set_epoch(1)
        runs.append([(x.clone(), y.clone()) for x, y in loader])
    assert len(runs[0]) == len(runs[1]) == 4
    for (xa, ya), (xb, yb) in zip(*runs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sorted(torch.cat([y for _, y in runs[0]]).tolist()) == sorted(train.y.tolist())
    other = Loader(train, 4, seed=3, augment=aug, workers=0)
    other.set_epoch(2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(runs[0], other))


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_dataset("imagefolder", root=tmp_path)
    assert str(tmp_path / "train") in one_line(exc)
    with pytest.raises(DataError, match="cannot be downloaded"):
        load_dataset("imagefolder", root=tmp_path, download=True)
    make_image_folder(tmp_path)
    bad = tmp_path / "val" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    val = load_dataset("imagefolder", root=tmp_path, split="test", image_size=4)
    with pytest.raises(DataError) as exc:
        list(Loader(val, 2, workers=2))
    assert "broken.png" in one_line(exc)
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DataError, match="bird"):
        load_dataset("imagefolder", root=tmp_path, split="test")


# --- augmentation and batching ------------------------------------------------------------------


def test_augment_crop_flip_normalise() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 6, 5, generator=gen)
    p = 2
    out = Augment(crop_padding=p, normalize=False)(x, (0,) * 3, (1,) * 3, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 5])
        ]
        assert hits, "every output is a window of the zero-padded input"
        offsets.add(hits[0])
    assert len(offsets) > 10  # the offsets vary over the batch
    flipped = Augment(hflip=True, normalize=False)(x, (0,) * 3, (1,) * 3, gen)
    is_flip = [torch.equal(f, s.flip(2)) for f, s in zip(flipped, x)]
    assert all(a or torch.equal(f, s) for a, f, s in zip(is_flip, flipped, x))
    assert 16 <= sum(is_flip) <= 48
    mean, std = (0.1, 0.5, 0.9), (0.5, 0.25, 2.0)
    normed = Augment()(x, mean, std, gen)
    for c in range(3):
        assert torch.allclose(normed[:, c], (x[:, c] - mean[c]) / std[c])


def test_augment_is_deterministic_given_generator() -> None:
    x = torch.rand(32, 1, 8, 8)
    aug = Augment(crop_padding=3, hflip=True)
    a = aug(x, (0.5,), (0.2,), torch.Generator().manual_seed(7))
    b = aug(x, (0.5,), (0.2,), torch.Generator().manual_seed(7))
    c = aug(x, (0.5,), (0.2,), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_standard_augment() -> None:
    assert Augment.standard("cifar10", train=True) == Augment(crop_padding=4, hflip=True)
    assert Augment.standard("cifar10", train=False) == Augment()
    assert Augment.standard("mnist", train=True) == Augment()


def indexed(n: int) -> ImageDataset:
    """A data set whose label is the sample index, to track coverage."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ImageDataset(x, torch.arange(n), n, "indexed", (0.0,), (1.0,))


def epoch_batches(loader: Loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_covers_every_sample_once_per_epoch() -> None:
    ds = indexed(103)
    loader = Loader(ds, 10, seed=1)
    assert len(loader) == 11
    for epoch in range(3):
        batches = epoch_batches(loader, epoch)
        assert [len(y) for _, y in batches] == [10] * 10 + [3]
        seen = torch.cat([y for _, y in batches])
        assert sorted(seen.tolist()) == list(range(103))
        for x, y in batches:
            assert torch.equal(x[:, 0, 0, 0], y.float())
    assert len(Loader(ds, 10, drop_last=True)) == 10
    assert sum(len(y) for _, y in Loader(ds, 10, drop_last=True)) == 100
    in_order = torch.cat([y for _, y in Loader(ds, 10, shuffle=False)])
    assert torch.equal(in_order, torch.arange(103))


def test_loader_is_deterministic_per_seed_and_epoch() -> None:
    ds = indexed(50)
    aug = Augment(crop_padding=1, hflip=True)
    a = epoch_batches(Loader(ds, 8, seed=5, augment=aug), 4)
    b = epoch_batches(Loader(ds, 8, seed=5, augment=aug), 4)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    order = lambda batches: torch.cat([y for _, y in batches]).tolist()  # noqa: E731
    assert order(a) != order(epoch_batches(Loader(ds, 8, seed=5), 5))
    assert order(a) != order(epoch_batches(Loader(ds, 8, seed=6), 4))
    # Each pass advances the epoch, and set_epoch replays any pass.
    loader = Loader(ds, 8, seed=5)
    first, second = order(list(loader)), order(list(loader))
    assert first != second and second == order(epoch_batches(Loader(ds, 8, seed=5), 1))


def test_loader_shards_over_ranks() -> None:
    ds = indexed(23)
    shards = [epoch_batches(Loader(ds, 4, seed=2, rank=r, world_size=3), 1) for r in range(3)]
    lengths = [sum(len(y) for _, y in s) for s in shards]
    assert lengths == [8, 8, 8]
    seen = torch.cat([y for s in shards for _, y in s]).tolist()
    assert set(seen) == set(range(23)) and len(seen) == 24


def test_subset() -> None:
    ds = load_digits("train")
    small = subset(ds, 100, seed=1)
    assert isinstance(small, ImageDataset) and len(small) == 100
    assert small.classes == 10 and small.mean == ds.mean
    again = subset(ds, 100, seed=1)
    assert isinstance(again, ImageDataset) and torch.equal(again.x, small.x)
    other = subset(ds, 100, seed=2)
    assert isinstance(other, ImageDataset) and not torch.equal(other.y, small.y)
    rows = {bytes(r.numpy().tobytes()) for r in ds.x}
    assert all(bytes(r.numpy().tobytes()) in rows for r in small.x)
    assert subset(ds, 10_000) is ds


def test_resized_is_pils_bilinear_resize_to_one_level() -> None:
    """data.resize (BioTorch's 28 -> 32 MNIST inputs): each image as PIL's bilinear resize of
    its 8-bit pixels gives it, to within one 8-bit level (PIL computes in fixed point), growing
    and shrinking; labels and statistics kept."""
    pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    ds = ImageDataset(
        torch.tensor(pixels[:, None]).float() / 255, torch.arange(4), 10, "t", (0.5,), (0.2,)
    )
    for size in (32, 20):
        pil = np.stack(
            [np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in pixels]
        )
        out = resized(ds, size)
        assert out.shape == (1, size, size) and out.mean == ds.mean and torch.equal(out.y, ds.y)
        levels = (out.x[:, 0] * 255).round().to(torch.int64).numpy()
        assert np.abs(levels - pil.astype(np.int64)).max() <= 1
        assert torch.equal(out.x * 255, (out.x * 255).round())
    assert resized(ds, 28) is ds


def test_subset_of_image_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    train = load_dataset("imagefolder", root=tmp_path, image_size=4)
    small = subset(train, 3, seed=0)
    assert isinstance(small, ImageFolder) and len(small) == 3 and small.classes == 2


def test_cifar_batch_with_str_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches re-pickled by Python 3 carry str keys; they are read like the official bytes keys.
    make_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    batch = cifar_batch(6, np.random.default_rng(1), {"labels": 10})
    as_str = {k.decode(): v for k, v in batch.items()}
    (folder / "test_batch").write_bytes(pickle.dumps(as_str))
    trust_cifar(monkeypatch, "cifar10", folder)
    test = load_dataset("cifar10", root=tmp_path, split="test")
    assert test.y.tolist() == batch[b"labels"]
