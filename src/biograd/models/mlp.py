"""Fully connected networks: a configurable MLP and the FC net of Launay, Poli, Krzakala 2019."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError
from .common import activation as make_activation
from .common import check_dropout, features


class MLP(nn.Sequential):
    """A multi-layer perceptron on flattened inputs.

    Each hidden layer ``i`` (1-based) is ``fc{i}`` -> ``bn{i}`` (if ``batch_norm``) -> ``act{i}``
    -> ``drop{i}`` (if ``dropout > 0``); the output layer is ``out`` (no activation: logits).

    Args:
        in_shape: shape of one sample, flattened to ``prod(in_shape)`` features.
        classes: number of outputs.
        widths: hidden layer widths; ``()`` gives a linear classifier.
        activation: one of :data:`biograd.models.common.ACTIVATIONS`.
        negative_slope: slope of ``leaky_relu``.
        batch_norm: a ``BatchNorm1d`` after every hidden Linear, before the activation.
        dropout: dropout probability after every hidden activation.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        classes: int = 10,
        *,
        widths: Sequence[int] = (256, 256),
        activation: str = "relu",
        negative_slope: float = 0.01,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        dropout = check_dropout("dropout", dropout)
        if any(int(w) < 1 for w in widths):
            raise ConfigError(f"mlp widths must be positive integers, got {list(widths)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        d = features(in_shape)
        for i, w in enumerate((int(w) for w in widths), start=1):
            layers[f"fc{i}"] = nn.Linear(d, w)
            if batch_norm:
                layers[f"bn{i}"] = nn.BatchNorm1d(w)
            layers[f"act{i}"] = make_activation(activation, negative_slope)
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            d = w
        layers["out"] = nn.Linear(d, classes)
        super().__init__(layers)


class LaunayFC(nn.Sequential):
    """The fully connected net of Launay, Poli, Krzakala 2019 (*Principled training of neural
    networks with direct feedback alignment*, §3): flattened input (3072 for CIFAR-10), three
    hidden layers of 800 units with tanh, and a linear output.

    Layer order follows the authors' code: ``drop0`` (input dropout, if any) -> ``fc{i}`` ->
    ``drop{i}`` (if ``dropout > 0``) -> ``act{i}`` -> ``bn{i}`` (if ``batch_norm``), then ``out``.
    Batch norm comes *after* the activation, as in their experiments.

    Args:
        in_shape: shape of one sample (flattened).
        classes: number of outputs.
        widths: hidden widths (default three of 800).
        activation, negative_slope: the activation (their grid: tanh, relu, leaky_relu with
            slopes 0.5, 0.1, 0.01).
        batch_norm: ``BatchNorm1d`` after each hidden activation.
        dropout: dropout probability on each hidden layer (their grid: 0.1 and 0.5).
        input_dropout: dropout probability on the input (their grid: 0.1).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        classes: int = 10,
        *,
        widths: Sequence[int] = (800, 800, 800),
        activation: str = "tanh",
        negative_slope: float = 0.01,
        batch_norm: bool = False,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        dropout = check_dropout("dropout", dropout)
        input_dropout = check_dropout("input_dropout", input_dropout)
        if any(int(w) < 1 for w in widths):
            raise ConfigError(f"launay_fc widths must be positive integers, got {list(widths)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        if input_dropout > 0:
            layers["drop0"] = nn.Dropout(input_dropout)
        d = features(in_shape)
        for i, w in enumerate((int(w) for w in widths), start=1):
            layers[f"fc{i}"] = nn.Linear(d, w)
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            layers[f"act{i}"] = make_activation(activation, negative_slope)
            if batch_norm:
                layers[f"bn{i}"] = nn.BatchNorm1d(w)
            d = w
        layers["out"] = nn.Linear(d, classes)
        super().__init__(layers)
