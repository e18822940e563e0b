"""The model zoo, without torchvision: ``build_model(name, in_shape=..., classes=..., **options)``.

Every model is a plain tree of ``nn.Linear``, ``nn.Conv2d``, batch norm, pooling and activation
modules, so ``biograd.convert`` puts any of them on any rule. See docs/models.md for the papers,
shapes and parameter counts.

>>> from biograd.models import build_model
>>> net = build_model("resnet20", in_shape=(3, 32, 32), classes=10, init="xavier")
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from .common import ACTIVATIONS, INITS, activation, init_weights
from .convnets import LaunayCNN, LeNet
from .mlp import MLP, LaunayFC
from .resnet import CIFAR_DEPTHS, BasicBlock, Bottleneck, CifarResNet, PadShortcut, ResNet


def _resnet18(
    in_shape: Sequence[int], classes: int = 10, *, zero_init_residual: bool = False
) -> nn.Module:
    return ResNet(
        BasicBlock, (2, 2, 2, 2), in_shape, classes, zero_init_residual=zero_init_residual
    )


def _resnet50(
    in_shape: Sequence[int],
    classes: int = 10,
    *,
    stride_in_1x1: bool = False,
    zero_init_residual: bool = False,
) -> nn.Module:
    return ResNet(
        Bottleneck, (3, 4, 6, 3), in_shape, classes, stride_in_1x1=stride_in_1x1,
        zero_init_residual=zero_init_residual,
    )  # fmt: skip


# Each builder takes (in_shape, classes, *, options); its keyword-only parameters are the options.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet": LeNet,
    **{f"resnet{d}": functools.partial(CifarResNet, d) for d in CIFAR_DEPTHS},
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "launay_fc": LaunayFC,
    "launay_cnn": LaunayCNN,
}

DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (1, 28, 28),
    "lenet": (1, 28, 28),
    **{f"resnet{d}": (3, 32, 32) for d in CIFAR_DEPTHS},
    "resnet18": (3, 224, 224),
    "resnet50": (3, 224, 224),
    "launay_fc": (3, 32, 32),
    "launay_cnn": (3, 32, 32),
}
"""The input shape each model is built for when ``in_shape`` is not given."""

MODELS: tuple[str, ...] = tuple(_BUILDERS)
"""Names accepted by :func:`build_model`."""


def _check_name(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; choose one of {', '.join(MODELS)}")
    return _BUILDERS[name]


def model_options(name: str) -> dict[str, Any]:
    """The options :func:`build_model` accepts for model ``name`` besides ``in_shape`` and
    ``classes``, with their defaults (``init`` included)."""
    params = inspect.signature(_check_name(name)).parameters
    options = {
        p.name: p.default for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return {**options, "init": "default"}


def build_model(
    name: str,
    *,
    in_shape: Sequence[int] | None = None,
    classes: int = 10,
    init: str = "default",
    **options: Any,
) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) for inputs of shape ``in_shape`` (one sample,
    e.g. ``(C, H, W)``; default :data:`DEFAULT_SHAPES`) and ``classes`` outputs.

    ``init`` is one of :data:`biograd.models.common.INITS`; ``options`` are the model's own
    (:func:`model_options` lists them with their defaults). The model is returned in training
    mode on the CPU with float32 parameters.

    Raises:
        ConfigError: an unknown model or option (naming the closest valid one), or an invalid
            value (activation, dropout, depth, an input too small for the model).
    """
    builder = _check_name(name)
    valid = model_options(name)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown option {key!r} for model {name!r}{hint}; valid: {', '.join(valid)}"
            )
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if int(classes) < 1:
        raise ConfigError(f"classes must be a positive integer, got {classes}")
    shape = DEFAULT_SHAPES[name] if in_shape is None else tuple(int(s) for s in in_shape)
    model = builder(shape, int(classes), **options)
    return init_weights(model, init)


__all__ = [
    "ACTIVATIONS",
    "CIFAR_DEPTHS",
    "DEFAULT_SHAPES",
    "INITS",
    "MLP",
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "LaunayCNN",
    "LaunayFC",
    "LeNet",
    "PadShortcut",
    "ResNet",
    "activation",
    "build_model",
    "init_weights",
    "model_options",
]
