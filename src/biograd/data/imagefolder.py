"""Image folders in the ImageNet layout (``root/train/<class>/<image>``, ``root/val/<class>/<image>``),
streamed from disk: images are decoded with Pillow in DataLoader workers, never held in memory.

Training crops follow the scale augmentation of Szegedy et al. 2015 ("Going deeper with
convolutions", sec. 6), as used for ResNets (He et al. 2016, sec. 3.4): a random box covering
8-100% of the image with aspect ratio in [3/4, 4/3], resized to ``image_size``. Evaluation resizes
the short side to ``image_size / 0.875`` and takes the central ``image_size`` square. Horizontal
flips and normalisation are applied to whole batches by :class:`biograd.data.Augment`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from biograd.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
_SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}
_EVAL_CROP_FRACTION = 0.875
_SCALE = (0.08, 1.0)
_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class DecodeFailure:
    """Returned (not raised) by a worker that cannot decode an image, so that the main process can
    raise a one-line :class:`DataError` instead of a worker traceback."""

    path: str
    reason: str

    def error(self) -> DataError:
        return DataError(
            f"imagefolder: cannot decode {self.path} ({self.reason}); remove or replace the file"
        )


class ImageFolder(Dataset[tuple[Tensor, int] | DecodeFailure]):
    """One split of an image folder. Items are addressed by ``(index, crop_seed)`` pairs and are
    ``(uint8 tensor (3, S, S), label)``; the crop of a training item depends only on its seed."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        class_names: tuple[str, ...],
        *,
        split: str,
        image_size: int,
    ) -> None:
        self.samples = samples
        self.class_names = class_names
        self.split = split
        self.image_size = image_size
        self.name = "imagefolder"
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

    @classmethod
    def from_root(cls, root: Path, split: str, *, image_size: int = 224) -> ImageFolder:
        """Scan ``root/train`` (split 'train') or ``root/val`` / ``root/test`` (split 'test').
        Class indices follow the sorted class folders of ``root/train`` when it exists."""
        if image_size < 1:
            raise DataError(f"imagefolder: image_size must be positive, got {image_size}")
        folder = next((root / d for d in _SPLIT_DIRS[split] if (root / d).is_dir()), None)
        if folder is None:
            want = " or ".join(str(root / d) for d in _SPLIT_DIRS[split])
            raise DataError(
                f"imagefolder: missing {want}; pass --data-dir DIR holding train/<class>/<image> "
                "and val/<class>/<image> (the ImageNet layout)"
            )
        reference = root / "train" if (root / "train").is_dir() else folder
        class_names = tuple(sorted(e.name for e in os.scandir(reference) if e.is_dir()))
        index = {c: i for i, c in enumerate(class_names)}
        samples: list[tuple[str, int]] = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            if entry.name not in index:
                raise DataError(
                    f"imagefolder: class folder {entry.path} has no counterpart in {reference}; "
                    "give train and val the same class folders"
                )
            files = sorted(
                f.path
                for f in os.scandir(entry.path)
                if f.is_file() and os.path.splitext(f.name)[1].lower() in EXTENSIONS
            )
            samples.extend((p, index[entry.name]) for p in files)
        if not samples:
            raise DataError(
                f"imagefolder: no images ({', '.join(sorted(EXTENSIONS))}) in {folder}/<class>/; "
                "pass --data-dir DIR holding train/<class>/<image> and val/<class>/<image>"
            )
        return cls(samples, class_names, split=split, image_size=image_size)

    @property
    def classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return 3, self.image_size, self.image_size

    @property
    def y(self) -> Tensor:
        """Every label, int64 (N,)."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def select(self, indices: list[int]) -> ImageFolder:
        """The same split restricted to ``indices``."""
        return ImageFolder(
            [self.samples[i] for i in indices],
            self.class_names,
            split=self.split,
            image_size=self.image_size,
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int] | DecodeFailure:  # type: ignore[override]
        index, seed = item
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                pixels = self._crop(img, seed)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return DecodeFailure(path, f"{type(exc).__name__}: {exc}")
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), label

    def _crop(self, img: Image.Image, seed: int) -> np.ndarray:
        """Decode, crop and resize one image to (S, S, 3) uint8."""
        width, height = img.size
        size = self.image_size
        if self.split == "train":
            box = random_resized_box(width, height, np.random.default_rng(seed))
        else:
            side = min(width, height) * _EVAL_CROP_FRACTION
            left, top = (width - side) / 2, (height - side) / 2
            box = (left, top, left + side, top + side)
        # Let JPEG decode at a reduced scale when the box still covers at least `size` pixels.
        need = (
            math.ceil(width * size / (box[2] - box[0])),
            math.ceil(height * size / (box[3] - box[1])),
        )
        if img.format == "JPEG" and need[0] < width and need[1] < height:
            img.draft("RGB", need)
            sx, sy = img.size[0] / width, img.size[1] / height
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        rgb = img.convert("RGB")
        out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return np.array(out, dtype=np.uint8)


def random_resized_box(
    width: int, height: int, rng: np.random.Generator, attempts: int = 10
) -> tuple[float, float, float, float]:
    """A random box (left, top, right, bottom) covering a uniform fraction in [0.08, 1] of the
    image area with a log-uniform aspect ratio in [3/4, 4/3] (Szegedy et al. 2015); after
    ``attempts`` misses, the largest central box with a ratio inside that range."""
    area = width * height
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(attempts):
        target = area * rng.uniform(*_SCALE)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * ratio)
        h = math.sqrt(target / ratio)
        if w <= width and h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return left, top, left + w, top + h
    ratio = min(max(width / height, _RATIO[0]), _RATIO[1])
    w, h = (width, width / ratio) if width / height < ratio else (height * ratio, height)
    w, h = min(w, width), min(h, height)
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


def collate(
    items: list[tuple[Tensor, int] | DecodeFailure],
) -> tuple[Tensor, Tensor] | DecodeFailure:
    """Stack decoded items into (uint8 (B, 3, S, S), int64 (B,)), or pass on the first failure."""
    pairs: list[tuple[Tensor, int]] = []
    for item in items:
        if isinstance(item, DecodeFailure):
            return item
        pairs.append(item)
    images = torch.stack([p[0] for p in pairs])
    labels = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    return images, labels
