"""Batching and batched augmentation.

An in-memory :class:`ImageDataset` is batched by indexing its tensors with a permutation; an
:class:`ImageFolder` is decoded by DataLoader workers. Either way, the order and every random
augmentation of a pass depend only on ``(seed, epoch)``, so a run resumed at an epoch boundary sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from biograd.data.datasets import Dataset, ImageDataset
from biograd.data.imagefolder import DecodeFailure, ImageFolder, collate
from biograd.errors import DataError

# Standard training augmentation per data set: CIFAR pads by 4 and flips (He et al. 2016,
# sec. 4.2); image folders flip (their crops are drawn while decoding); digit sets do neither.
_TRAIN_AUGMENT = {
    "cifar10": (4, True),
    "cifar100": (4, True),
    "cifar10-jpeg": (4, True),
    "imagefolder": (0, True),
}


@dataclass(frozen=True)
class Augment:
    """Batched augmentation on float tensors (N, C, H, W) in [0, 1], in this order: random crop
    after zero-padding each side by ``crop_padding`` pixels, random horizontal flip with
    probability 1/2, and per-channel normalisation ``(x - mean) / std``. ``Augment()`` only
    normalises (for evaluation)."""

    crop_padding: int = 0
    hflip: bool = False
    normalize: bool = True

    @classmethod
    def standard(cls, name: str, train: bool) -> Augment:
        """The usual augmentation for data set ``name``: crop and flip for training where the
        literature uses them, normalisation only otherwise."""
        padding, flip = _TRAIN_AUGMENT.get(name, (0, False)) if train else (0, False)
        return cls(crop_padding=padding, hflip=flip)

    def __call__(
        self,
        x: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        generator: torch.Generator,
    ) -> Tensor:
        """Augment one batch; random draws come from ``generator`` (a CPU generator). Without
        crops and flips, and without normalisation, any shape (N, ...) passes through."""
        if self.crop_padding > 0:
            n, c, h, w = x.shape
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p)).reshape(n, c, -1)
            stride = w + 2 * p
            dy = torch.randint(0, 2 * p + 1, (n, 1), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n, 1), generator=generator).to(x.device)
            rows = torch.arange(h, device=x.device)[:, None] * stride
            window = (rows + torch.arange(w, device=x.device)).reshape(1, -1)
            index = (dy * stride + dx + window)[:, None, :].expand(n, c, h * w)
            x = padded.gather(2, index).reshape(n, c, h, w)
        if self.hflip:
            flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.normalize:
            m = torch.tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
            s = torch.tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
            x = (x - m) / s
        return x


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch)`` by numpy's SeedSequence, so nearby seeds and
    epochs give unrelated streams."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class Loader:
    """Iterates ``(x, y)`` batches of a data set: x float32 (B, C, H, W), augmented by
    ``augment`` (raw [0, 1] pixels when None), y int64 (B,).

    Each pass uses the loader's current epoch and then advances it by one; ``set_epoch(e)`` picks
    the epoch of the next pass. Everything random in a pass depends only on ``(seed, epoch)``.
    With ``world_size > 1`` every rank draws the same permutation, pads it by wrapping to a
    multiple of ``world_size`` and keeps every ``world_size``-th index from ``rank``.
    ``device`` moves an in-memory data set there once and yields batches there. ``workers``
    decoding processes serve an image folder (default: up to 8, one per available core).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        device: torch.device | str | None = None,
        workers: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.augment = augment
        self.device = torch.device(device) if device is not None else None
        self.workers = workers if workers is not None else min(8, _available_cores())
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._x: Tensor | None = None
        self._y: Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass that of ``epoch``."""
        self.epoch = epoch

    def _per_rank(self) -> int:
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self, generator: torch.Generator) -> Tensor:
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            total = self._per_rank() * self.world_size
            order = order.repeat(math.ceil(total / n))[:total][self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        order = self._order(generator)
        batches = list(order[: len(self) * self.batch_size].split(self.batch_size))
        if isinstance(self.dataset, ImageFolder):
            return self._stream(self.dataset, batches, generator)
        return self._in_memory(self.dataset, batches, generator)

    def _in_memory(
        self, ds: ImageDataset, batches: list[Tensor], generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        if self._x is None or self._y is None:
            self._x = ds.x if self.device is None else ds.x.to(self.device)
            self._y = ds.y if self.device is None else ds.y.to(self.device)
        x_all, y_all = self._x, self._y
        for idx in batches:
            idx = idx.to(x_all.device)
            x = x_all[idx]
            if self.augment is not None:
                x = self.augment(x, ds.mean, ds.std, generator)
            yield x, y_all[idx]

    def _stream(
        self, ds: ImageFolder, batches: list[Tensor], generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        # Every sample's crop seed is drawn here, in the main process, so the batches do not
        # depend on the number of workers.
        seeds = torch.randint(0, 2**62, (len(ds),), generator=generator).tolist()
        requests = [[(i, seeds[i]) for i in idx.tolist()] for idx in batches]
        pin = self.device is not None and self.device.type == "cuda"
        loader = DataLoader(
            ds,
            batch_sampler=requests,
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=pin,
        )
        for batch in loader:
            if isinstance(batch, DecodeFailure):
                raise batch.error()
            images, labels = batch
            if self.device is not None:
                images = images.to(self.device, non_blocking=pin)
                labels = labels.to(self.device, non_blocking=pin)
            x = images.float().div_(255.0)
            if self.augment is not None:
                x = self.augment(x, ds.mean, ds.std, generator)
            yield x, labels
