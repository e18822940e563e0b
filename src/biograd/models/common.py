"""Pieces shared by the model builders: activations, weight initialisation, shape arithmetic."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError

ACTIVATIONS = ("relu", "tanh", "leaky_relu", "sigmoid")
"""Activation names accepted by the ``activation`` option of every model that has one."""

INITS = ("default", "xavier", "kaiming")
"""Weight initialisations (the ``init`` option of :func:`biograd.models.build_model`):

- ``default``: PyTorch's own initialisation of each layer.
- ``xavier``: Glorot & Bengio 2010, ``xavier_uniform_`` on the weights of every Linear and Conv
  layer, biases zero; the initialisation of the BioTorch benchmark (Sanfiz & Akrout 2021).
- ``kaiming``: He et al. 2015, ``kaiming_normal_`` (fan-in, ReLU gain), biases zero.

Batch-norm layers always start at weight 1 and bias 0.
"""


def activation(name: str, negative_slope: float = 0.01) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`); ``negative_slope`` is the
    slope of ``leaky_relu`` for negative inputs (Launay et al. 2019 use 0.5, 0.1 and 0.01)."""
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise the weights of every ``nn.Linear`` and ``nn.ConvNd`` of ``model`` in place
    with ``scheme`` (one of :data:`INITS`); returns ``model``."""
    if scheme not in INITS:
        raise ConfigError(f"unknown init {scheme!r}; choose one of {', '.join(INITS)}")
    if scheme == "default":
        return model
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def check_dropout(name: str, p: float) -> float:
    """``p`` if it is a valid dropout probability, else a :class:`ConfigError` naming ``name``."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def image_shape(model: str, in_shape: Sequence[int]) -> tuple[int, int, int]:
    """``in_shape`` as ``(C, H, W)``, or a :class:`ConfigError` saying that ``model`` needs images."""
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"{model} needs images: in_shape=(C, H, W), got {tuple(in_shape)}")
    return shape  # type: ignore[return-value]


def features(in_shape: Sequence[int]) -> int:
    """Number of input features of one sample of shape ``in_shape`` (flattened)."""
    if not in_shape or min(in_shape) < 1:
        raise ConfigError(f"in_shape must be a non-empty tuple of positive sizes, got {in_shape}")
    return math.prod(int(s) for s in in_shape)


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or pooling window along one axis (no dilation)."""
    return (size + 2 * padding - kernel) // stride + 1
