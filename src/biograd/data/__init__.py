"""Data sets and loaders: the embedded UCI digits, MNIST, Fashion-MNIST, CIFAR-10/100 (held in
memory as tensors) and ImageNet-layout image folders (streamed), with official checksums, optional
download, and batched augmentation that is deterministic given (seed, epoch). See docs/data.md."""

from biograd.data.datasets import (
    DATASETS,
    Dataset,
    ImageDataset,
    data_label,
    load_dataset,
    load_digits,
    read_idx,
    resized,
    subset,
    validation_split,
)
from biograd.data.files import DATA_DIR_ENV, MIRROR_ENV, default_root, md5sum
from biograd.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder
from biograd.data.loader import Augment, Loader, epoch_generator

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIRROR_ENV",
    "Augment",
    "Dataset",
    "ImageDataset",
    "ImageFolder",
    "Loader",
    "data_label",
    "default_root",
    "epoch_generator",
    "load_dataset",
    "load_digits",
    "md5sum",
    "read_idx",
    "resized",
    "subset",
    "validation_split",
]
