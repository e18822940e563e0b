"""The data sets: the embedded UCI digits, MNIST, Fashion-MNIST, CIFAR-10/100 and image folders.

Small data sets are read from their official files into memory as float32 tensors in [0, 1]; an
image folder (ImageNet layout) is streamed from disk by :class:`biograd.data.ImageFolder`.
"""

from __future__ import annotations

import difflib
import gzip
import math
import pickle
import tarfile
import zlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

from biograd.data.files import (
    Remote,
    default_root,
    fetch_verified,
    fix_hint,
    locate,
    md5sum,
    verify,
)
from biograd.data.imagefolder import ImageFolder
from biograd.errors import DataError

DATASETS = (
    "digits",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "cifar10-jpeg",
    "imagefolder",
)
ROOT_INDEPENDENT = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")
"""Data sets whose content does not depend on ``root``: embedded (``digits`` reads no file) or
read only from files verified against their official checksums. Where their files lie cannot
change a run's result, so ``data.root`` is not part of a run's identity for them."""

#: How tables name a data set whose numbers are not those of the official benchmark.
LABELS = {"cifar10-jpeg": "CIFAR-10 (JPEG proxy)"}

#: The CIFAR-10 JPEG proxy: the official 50,000/10,000 split re-encoded as JPEG quality 75, in
#: image-folder layout (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg); see docs/data.md.
CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
CIFAR10_JPEG_SHA256: str | None = "45b041e867f5a40f79bfde38d3dd1fd511103d50068c1afecf6445e25234d4db"
_CIFAR10_JPEG_CLASSES = 10


def data_label(name: str) -> str:
    """The name tables must print for data set ``name`` (e.g. 'CIFAR-10 (JPEG proxy)')."""
    key = name.lower().replace("_", "-")
    return LABELS.get(key, key)


SPLITS = ("train", "test")

#: The embedded digits set is split once, by this seed, into 1437 training and 360 test images.
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


@dataclass
class ImageDataset:
    """A labelled image data set held in memory.

    ``x`` is float32 (N, C, H, W) in [0, 1]; ``y`` is int64 (N,); ``mean``/``std`` are the
    per-channel statistics of the official *training* split (used for normalisation of every split).
    """

    x: Tensor
    y: Tensor
    classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split: str = "train"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's shape (C, H, W), e.g. the ``in_shape`` of a model."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)


Dataset = ImageDataset | ImageFolder


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    split: str = "train",
    download: bool = False,
    mirror: str | None = None,
    image_size: int = 224,
    in_memory: bool = False,
) -> Dataset:
    """Load one split of a data set.

    ``root`` is the data directory (default ``$BIOGRAD_DATA_DIR`` or ``~/.cache/biograd/data``);
    files are looked up in ``root/<name>/`` and then in ``root/`` itself. ``download`` fetches
    missing or corrupt official files into ``root/<name>/`` from ``mirror`` (or
    ``$BIOGRAD_DATA_MIRROR``, a base URL) or else the official mirrors. ``image_size`` is the side
    of the square crops an image folder yields; ``in_memory`` decodes an image folder of
    same-size images once into a cached tensor instead (``biograd.data.cache``) and returns an
    in-memory set. ``cifar10-jpeg`` is always in memory. ``digits`` is embedded and ignores all of
    these.
    """
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        close = difflib.get_close_matches(key, DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {key}; choose 'train' or 'test'")
    if key == "digits":
        return load_digits(split)
    base = Path(root).expanduser() if root is not None else default_root()
    if key == "imagefolder":
        if download:
            raise DataError(
                "imagefolder: image folders cannot be downloaded; fetch the images yourself and "
                "pass --data-dir DIR holding train/<class>/<image> and val/<class>/<image>"
            )
        if in_memory:
            return _load_folder_in_memory(base, split, "imagefolder")
        return ImageFolder.from_root(base, split, image_size=image_size)
    if key == "cifar10-jpeg":
        if download:
            raise DataError(
                "cifar10-jpeg cannot be downloaded; pass --data-dir DIR holding "
                f"cifar10-jpeg/{CIFAR10_JPEG_ARCHIVE} or its unpacked train/ and test/ folders"
            )
        return _load_cifar10_jpeg(base, split)
    if key in _IDX:
        return _load_idx(key, base, split, download, mirror)
    return _load_cifar(key, base, split, download, mirror)


@overload
def subset(ds: ImageDataset, n: int, seed: int = 0) -> ImageDataset: ...
@overload
def subset(ds: ImageFolder, n: int, seed: int = 0) -> ImageFolder: ...
def subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` samples of ``ds`` drawn without replacement by ``seed``, in their original order
    (all of ``ds`` when it has at most ``n``). For smoke runs."""
    if n >= len(ds):
        return ds
    if n < 1:
        raise DataError(f"subset size must be at least 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=gen)[:n].sort().values
    if isinstance(ds, ImageFolder):
        return ds.select(idx.tolist())
    return replace(ds, x=ds.x[idx], y=ds.y[idx])


def validation_split(ds: Dataset, n: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(the rest, ``n`` held-out examples) of a training split: the held-out ones are a fixed
    random draw (``seed``), both parts keep their original order. The held-out part is labelled
    split 'validation'; choose hyperparameters on it, never on the test set."""
    if not 0 < n < len(ds):
        raise DataError(
            f"data.validation={n} must be between 1 and {len(ds) - 1} (the train size - 1)"
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds), generator=gen)
    held, rest = perm[:n].sort().values, perm[n:].sort().values
    if isinstance(ds, ImageFolder):
        return ds.select(rest.tolist()), ds.select(held.tolist())
    return replace(ds, x=ds.x[rest], y=ds.y[rest]), replace(
        ds, x=ds.x[held], y=ds.y[held], split="validation"
    )


def resized(ds: ImageDataset, size: int) -> ImageDataset:
    """Every image of ``ds`` resized to ``size`` x ``size`` once: bilinear with half-pixel
    centres (``align_corners=False``, antialiased when shrinking), rounded to 8 bits: within one
    8-bit level of PIL's bilinear resize, which torchvision's ``Resize((size, size))`` applies to
    the PIL images of its MNIST (PIL computes in fixed point). The BioTorch benchmark feeds its
    LeNet 28x28 MNIST resized this way to 32x32 (its ``target_size``); biograd's LeNet pads
    instead unless the data are resized. ``mean``/``std`` stay those of the original split."""
    if size < 1:
        raise DataError(f"resize must be a positive size, got {size}")
    if ds.shape[1:] == (size, size):
        return ds
    x = torch.nn.functional.interpolate(
        ds.x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return replace(ds, x=x.mul_(255).round_().clamp_(0, 255).div_(255))


# --- image folders in memory (CIFAR-10 JPEG proxy, users' small images) -----------------------


def _in_memory(
    x: Tensor, y: Tensor, classes: list[str], train_x: Tensor, name: str, split: str
) -> ImageDataset:
    """An ImageDataset from decoded uint8 images, normalised by ``train_x``'s channel stats
    (computed exactly from per-channel histograms of the 256 byte values)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for c in range(train_x.shape[1]):
        counts = torch.bincount(train_x[:, c].reshape(-1), minlength=256).to(torch.float64)
        m = float((counts * levels).sum() / counts.sum())
        mean.append(m)
        std.append(math.sqrt(float((counts * (levels - m) ** 2).sum() / counts.sum())))
    return ImageDataset(
        x.to(torch.float32) / 255.0, y, len(classes), name, tuple(mean), tuple(std), split
    )


def _split_folder(root: Path, split: str) -> Path | None:
    return next(
        (root / d for d in (split, *(("val",) if split == "test" else ())) if (root / d).is_dir()),
        None,
    )


def _load_folder_in_memory(root: Path, split: str, name: str) -> ImageDataset:
    from biograd.data.cache import decoded_folder

    folder, train_folder = _split_folder(root, split), _split_folder(root, "train")
    if folder is None or train_folder is None:
        raise DataError(
            f"{name}: missing {root / 'train'} or {root / split}; pass --data-dir DIR holding "
            "train/<class>/<image> and test/<class>/<image>"
        )
    x, y, classes = decoded_folder(folder)
    train_x, _, train_classes = (
        decoded_folder(train_folder) if split != "train" else (x, y, classes)
    )
    if classes != train_classes:
        raise DataError(f"{name}: {folder} and {train_folder} hold different class folders")
    return _in_memory(x, y, classes, train_x, name, split)


def _load_cifar10_jpeg(root: Path, split: str) -> ImageDataset:
    """The CIFAR-10 JPEG proxy from an unpacked folder (``root/cifar10-jpeg/{train,test}`` or
    ``root/{train,test}``) or, failing that, straight from ``cifar10-jpeg.tar.gz`` (in
    ``root/cifar10-jpeg/`` or ``root/``); decoded once into the cache either way."""
    from biograd.data.cache import decoded_archive

    name = "cifar10-jpeg"
    for folder in (root / name, root):
        if _split_folder(folder, "train") and _split_folder(folder, split):
            ds = _load_folder_in_memory(folder, split, name)
            break
    else:
        archive = next(
            (
                p
                for p in (root / name / CIFAR10_JPEG_ARCHIVE, root / CIFAR10_JPEG_ARCHIVE)
                if p.is_file()
            ),
            None,
        )
        if archive is None:
            raise DataError(
                f"{name}: missing {root / name / CIFAR10_JPEG_ARCHIVE} (or its unpacked train/ and "
                "test/ folders); pass --data-dir DIR holding it (see docs/data.md)"
            )
        x, y, classes = decoded_archive(archive, split, CIFAR10_JPEG_SHA256)
        train_x = (
            x if split == "train" else decoded_archive(archive, "train", CIFAR10_JPEG_SHA256)[0]
        )
        ds = _in_memory(x, y, classes, train_x, name, split)
    if ds.shape != (3, 32, 32) or ds.classes != _CIFAR10_JPEG_CLASSES:
        raise DataError(
            f"{name}: expected {_CIFAR10_JPEG_CLASSES} classes of 3x32x32 images, got {ds.classes} of {ds.shape}"
        )
    return ds


# --- digits -----------------------------------------------------------------------------------


def load_digits(split: str = "train") -> ImageDataset:
    """The UCI optical recognition of handwritten digits test set (Alpaydin & Kaynak 1998) as
    bundled with scikit-learn: 1797 8x8 images with 17 grey levels, scaled to [0, 1]. A fixed
    stratified split (seed 0) gives 1437 training and 360 test images."""
    ref = resources.files("biograd.data").joinpath("digits.csv.gz")
    with ref.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if table.shape != (1797, 65):
        raise DataError(
            f"digits: embedded digits.csv.gz has shape {table.shape}; reinstall biograd"
        )
    images = torch.from_numpy(table[:, :64].astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(table[:, 64])
    train_idx, test_idx = digits_split(table[:, 64])
    train = images[train_idx]
    mean = (float(train.mean()),)
    std = (float(train.std(unbiased=False)),)
    idx = train_idx if split == "train" else test_idx
    return ImageDataset(images[idx], labels[idx], 10, "digits", mean, std, split)


def digits_split(labels: np.ndarray) -> tuple[Tensor, Tensor]:
    """Stratified train/test indices: each class gives its share of the DIGITS_TEST_SIZE test
    images (largest-remainder rounding), drawn by a generator seeded with DIGITS_SPLIT_SEED."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * DIGITS_TEST_SIZE / counts.sum()
    take = np.floor(quota).astype(np.int64)
    short = DIGITS_TEST_SIZE - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    gen = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    test: list[Tensor] = []
    for c, k in zip(classes, take):
        members = torch.from_numpy(np.flatnonzero(labels == c))
        test.append(members[torch.randperm(len(members), generator=gen)[:k]])
    test_idx = torch.cat(test).sort().values
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test_idx] = True
    return torch.nonzero(~is_test).flatten(), test_idx


# --- MNIST and Fashion-MNIST (idx files) --------------------------------------------------------


@dataclass(frozen=True)
class _IdxSpec:
    remote: Remote
    files: dict[str, tuple[str, str]]  # split -> (images, labels)
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _idx_files() -> dict[str, tuple[str, str]]:
    return {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }


# md5 of the official files (LeCun, Cortes & Burges; Xiao, Rasul & Vollgraf 2017). mean/std are
# those of the 60000 training images, measured on the official files.
_IDX: dict[str, _IdxSpec] = {
    "mnist": _IdxSpec(
        Remote(
            {
                "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
            },
            (
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
                "http://yann.lecun.com/exdb/mnist/",
            ),
        ),
        _idx_files(),
        (0.1307,),
        (0.3081,),
    ),
    "fashion-mnist": _IdxSpec(
        Remote(
            {
                "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
            },
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        ),
        _idx_files(),
        (0.2860,),
        (0.3530,),
    ),
}


def _load_idx(
    name: str, root: Path, split: str, download: bool, mirror: str | None
) -> ImageDataset:
    spec = _IDX[name]
    image_file, label_file = spec.files[split]
    paths = [
        fetch_verified(root, name, f, spec.remote, download_missing=download, mirror=mirror)
        for f in (image_file, label_file)
    ]
    images = read_idx(paths[0], name)
    labels = read_idx(paths[1], name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{name}: {paths[0]} {tuple(images.shape)} and {paths[1]} {tuple(labels.shape)} do not "
            "hold matching images and labels; replace them with the official files"
        )
    if labels.size and int(labels.max()) >= 10:
        raise DataError(f"{name}: {paths[1]} has labels above 9; replace it with the official file")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(x, y, 10, name, spec.mean, spec.std, split)


def read_idx(path: Path, name: str = "idx") -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes (magic 0x0000 08 ndim, big-endian int32 sizes,
    then the data; LeCun et al., the MNIST database page)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{name}: {path} is truncated or not gzip ({exc}); delete it and rerun with "
            "--download (download=True), or replace it with the official file"
        ) from None
    problem = _idx_problem(raw)
    if problem:
        raise DataError(
            f"{name}: {path} is not a valid idx file ({problem}); replace it with the official file"
        )
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_problem(raw: bytes) -> str:
    """Why ``raw`` is not an idx file of unsigned bytes, or '' when it is one."""
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        return "bad magic number"
    if raw[2] != 0x08:
        return f"element type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)"
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        return "header cut short"
    size = math.prod(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + size:
        return f"{len(raw) - header} data bytes, header promises {size}"
    return ""


# --- CIFAR-10 / CIFAR-100 (python pickles) ------------------------------------------------------


@dataclass(frozen=True)
class _CifarSpec:
    remote: Remote  # the archive
    folder: str  # what the archive unpacks to
    members: dict[str, dict[str, str]]  # split -> {file: md5}
    label_key: str
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_TORONTO = ("https://www.cs.toronto.edu/~kriz/",)

# md5 of the official archives and the batches inside them (Krizhevsky 2009,
# https://www.cs.toronto.edu/~kriz/cifar.html). mean/std are the commonly quoted per-channel
# statistics of the 50000 training images (not re-measured here: no CIFAR files on the build host).
_CIFAR: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        Remote({"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}, _TORONTO),
        "cifar-10-batches-py",
        {
            "train": {
                "data_batch_1": "c99cafc152244af753f735de768cd75f",
                "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                "data_batch_4": "634d18415352ddfa80567beed471001a",
                "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            },
            "test": {"test_batch": "40351d587109b95175f43aff81a1287e"},
        },
        "labels",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarSpec(
        Remote({"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}, _TORONTO),
        "cifar-100-python",
        {
            "train": {"train": "16019d7e3df5f24257cddd939b257f8d"},
            "test": {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        },
        "fine_labels",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}


def _load_cifar(
    name: str, root: Path, split: str, download: bool, mirror: str | None
) -> ImageDataset:
    spec = _CIFAR[name]
    members = spec.members[split]
    folder = _cifar_folder(name, root, spec, members, download, mirror)
    xs, ys = [], []
    for member, md5 in members.items():
        path = folder / member
        verify(path, md5, name)
        batch = _read_cifar_batch(path, name, spec.label_key)
        xs.append(batch[0])
        ys.append(batch[1])
    data = np.concatenate(xs)
    labels = np.concatenate(ys)
    if labels.size and (labels.min() < 0 or labels.max() >= spec.classes):
        raise DataError(f"{name}: labels outside 0..{spec.classes - 1} in {folder}; replace it")
    x = torch.from_numpy(data.astype(np.float32) / 255.0).reshape(-1, 3, 32, 32)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(x, y, spec.classes, name, spec.mean, spec.std, split)


def _cifar_folder(
    name: str,
    root: Path,
    spec: _CifarSpec,
    members: dict[str, str],
    download: bool,
    mirror: str | None,
) -> Path:
    """The unpacked batch folder holding ``members``, unpacking (and with ``download``, fetching)
    the official archive when no such folder exists yet, or, with ``download``, when a batch in it
    has the wrong md5."""
    for parent in (root / name, root):
        folder = parent / spec.folder
        if all((folder / m).is_file() for m in members) and (
            not download or all(md5sum(folder / m) == md5 for m, md5 in members.items())
        ):
            return folder
    (archive_name,) = spec.remote.files
    if locate(root, name, archive_name) is None and not download:
        first = next(iter(members))
        raise DataError(
            f"{name}: missing {root / name / spec.folder / first} (or {archive_name}); "
            f"{fix_hint(archive_name, name)}"
        )
    archive = fetch_verified(
        root, name, archive_name, spec.remote, download_missing=download, mirror=mirror
    )
    _unpack(archive, name)
    folder = archive.parent / spec.folder
    missing = [m for m in members if not (folder / m).is_file()]
    if missing:
        raise DataError(f"{name}: {archive} lacks {spec.folder}/{missing[0]}; replace the archive")
    return folder


def _unpack(archive: Path, name: str) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(archive.parent, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{name}: cannot unpack {archive} ({exc}); delete it and rerun with --download"
        ) from None


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, strings and numpy arrays), so that a
    tampered file cannot run code even when its checksum was trusted by mistake."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # written by Python 3 / numpy pickling (bytes at protocol 2, arrays at protocol 5)
            ("_codecs", "encode"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, name: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels (N,)) from one python-pickled CIFAR batch (a dict written by
    Python 2, hence ``encoding='latin1'``, which numpy arrays need)."""
    try:
        with path.open("rb") as f:
            raw = _BatchUnpickler(f, encoding="latin1").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, ValueError) as exc:
        raise DataError(
            f"{name}: {path} is not a CIFAR python batch ({type(exc).__name__}: {exc}); "
            "replace it with the official file"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(
            f"{name}: {path} holds data {data.shape} and {len(labels)} labels, expected (N, 3072) "
            "and N; replace it with the official file"
        )
    return data, labels
