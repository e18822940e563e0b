"""torchvision.transforms (v1) as BioTorch's MNIST path uses them, with torchvision's semantics
for PIL images: ``Resize`` is PIL's bilinear resize (torchvision's default interpolation),
``ToTensor`` maps a mode-'L' uint8 image to a float (1, H, W) tensor in [0, 1], ``Normalize``
subtracts the mean and divides by the std per channel (not in place)."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Any) -> Any:
        for t in self.transforms:
            img = t(img)
        return img


class Resize:
    def __init__(self, size: tuple[int, int], interpolation: int = Image.BILINEAR) -> None:
        if isinstance(size, int) or len(size) != 2:
            raise NotImplementedError("stub Resize: only an (h, w) size")
        self.size, self.interpolation = (int(size[0]), int(size[1])), interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        h, w = self.size
        return img if img.size == (w, h) else img.resize((w, h), self.interpolation)


class ToTensor:
    def __call__(self, pic: Image.Image) -> torch.Tensor:
        if pic.mode != "L":
            raise NotImplementedError("stub ToTensor: only mode 'L' images")
        img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
        return img.unsqueeze(0).to(torch.get_default_dtype()).div(255)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)


class _Unavailable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("torchvision stub: only the LeNet/MNIST path is available")


RandomCrop = RandomHorizontalFlip = RandomResizedCrop = CenterCrop = _Unavailable
