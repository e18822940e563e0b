"""A stand-in for the parts of torchvision that BioTorch's LeNet/MNIST path runs (torchvision has
no working CPU build here): ``transforms`` (Compose, Resize, ToTensor, Normalize) and
``datasets.MNIST``, with torchvision's semantics; ``models`` only names what BioTorch imports."""

from . import datasets, models, transforms

__all__ = ["datasets", "models", "transforms"]
