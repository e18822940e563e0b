"""torchvision.datasets.MNIST and FashionMNIST over biograd's loader (``biograd.data.load_dataset``:
the official idx files under ``root`` or ``root/mnist`` / ``root/fashion-mnist``, md5-checked,
never downloaded here); items are (mode-'L' PIL image of the original bytes, int label), as
torchvision's."""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from biograd.data import ImageDataset, load_dataset


class MNIST(torch.utils.data.Dataset):
    name = "mnist"

    def __init__(
        self, root: str, train: bool = True, transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None, download: bool = False,
    ) -> None:  # fmt: skip
        ds = load_dataset(self.name, root=root, split="train" if train else "test")
        assert isinstance(ds, ImageDataset)
        # x = bytes / 255 in float32: * 255 and rounding gives the bytes back exactly
        self.data = (ds.x[:, 0] * 255).round().to(torch.uint8).numpy()
        self.targets: np.ndarray = ds.y.numpy()
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


class FashionMNIST(MNIST):
    name = "fashion-mnist"


class _Unavailable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "torchvision stub: only the LeNet MNIST / Fashion-MNIST path is available"
        )


CIFAR10 = CIFAR100 = ImageFolder = _Unavailable
