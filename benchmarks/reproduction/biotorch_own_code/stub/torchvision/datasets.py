"""torchvision.datasets.MNIST from the official gzipped idx files under ``root`` (or
``root/MNIST/raw``), md5-checked; items are (mode-'L' PIL image, int label). Never downloads."""

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def read_idx(root: Path, name: str, check_md5: bool = True) -> np.ndarray:
    """The array in idx file ``name`` (.gz) under ``root`` or ``root/MNIST/raw``."""
    for path in (root / name, root / "MNIST" / "raw" / name):
        if path.is_file():
            break
    else:
        raise FileNotFoundError(f"{name} not under {root} (the stub does not download)")
    raw = path.read_bytes()
    if check_md5 and hashlib.md5(raw).hexdigest() != MD5[name]:
        raise ValueError(f"{path}: not the official file (md5)")
    data = gzip.decompress(raw)
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


class MNIST(torch.utils.data.Dataset):
    def __init__(
        self, root: str, train: bool = True, transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None, download: bool = False,
    ) -> None:  # fmt: skip
        part = "train" if train else "t10k"
        self.data = read_idx(Path(root), f"{part}-images-idx3-ubyte.gz")
        self.targets = read_idx(Path(root), f"{part}-labels-idx1-ubyte.gz").astype(np.int64)
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        img: Any = Image.fromarray(self.data[i])
        target: Any = int(self.targets[i])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class _Unavailable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("torchvision stub: only the LeNet/MNIST path is available")


FashionMNIST = CIFAR10 = CIFAR100 = ImageFolder = _Unavailable
