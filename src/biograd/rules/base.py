"""The rule interface, the registry, and the scale schemes for feedback weights."""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..nn.layers import FeedbackLayer

_REGISTRY: dict[str, Rule] = {}

SCALES = ("xavier", "kaiming", "xiao", "weight")
"""Feedback scale schemes (the standard deviation of the random feedback entries):

- ``xavier`` (default): ``sqrt(2 / (fan_in + fan_out))``, Glorot & Bengio 2010; BioTorch's choice,
  used for the reference benchmark of Sanfiz & Akrout 2021.
- ``kaiming``: ``sqrt(2 / fan_in)``, He et al. 2015.
- ``xiao``: ``sqrt(2 / fan_out)``, for a convolution ``sqrt(2 / (k*k*C_out))``; the scale used by
  Xiao et al. 2018 for sign-symmetric feedback.
- ``weight``: the standard deviation of the layer's weight at conversion time.

``fan_in = in_features * prod(kernel)`` and ``fan_out = out_features * prod(kernel)`` (per group).
"""


def feedback_std(weight: Tensor, scheme: str) -> float:
    """Standard deviation of the feedback entries for a weight of this shape under ``scheme``."""
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    if scheme == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "kaiming":
        return math.sqrt(2.0 / fan_in)
    if scheme == "xiao":
        return math.sqrt(2.0 / fan_out)
    if scheme == "weight":
        return float(weight.detach().float().std()) if weight.numel() > 1 else 1.0
    raise ValueError(f"unknown feedback scale {scheme!r}; choose one of {', '.join(SCALES)}")


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed from the model seed and the layer's qualified name (stable across runs,
    processes and DDP ranks)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def uniform_like(weight: Tensor, std: float, seed: int) -> Tensor:
    """Entries ~ U(-sqrt(3) std, sqrt(3) std), drawn on the CPU from ``seed`` so that every device
    and every rank gets the same values, then moved to the weight's device and dtype."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    r = torch.rand(weight.shape, generator=gen, dtype=dtype)
    return ((2 * r - 1) * (math.sqrt(3.0) * std)).to(weight.device, weight.dtype)


class Rule:
    """A learning rule for one converted layer.

    ``setup`` registers the rule's state on the layer (buffers; never inside ``forward``),
    ``feedback`` returns the B that carries the error to the layer's input in this forward pass
    (``None`` means the exact transpose, i.e. backprop), ``teardown`` removes the state again.
    """

    name: ClassVar[str]
    direct: ClassVar[bool] = False
    paper: ClassVar[str] = ""

    def setup(self, layer: FeedbackLayer, seed: int, scale: str) -> None:
        """Register the rule's buffers on ``layer``."""

    def feedback(self, layer: FeedbackLayer) -> Tensor | None:
        """The feedback matrix for this forward pass, shaped like ``layer.weight``."""
        return None

    def teardown(self, layer: FeedbackLayer) -> None:
        """Remove what ``setup`` registered."""
        for key in ("feedback", "feedback_magnitude", "feedback_scale"):
            layer._buffers.pop(key, None)
            layer._parameters.pop(key, None)


def register(rule: Rule) -> Rule:
    """Add a rule to the registry under ``rule.name``."""
    _REGISTRY[rule.name] = rule
    return rule


def get_rule(name: str) -> Rule:
    """The rule registered as ``name``; ``ValueError`` naming the available rules otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown rule {name!r}; available rules: {', '.join(_REGISTRY)}"
        ) from None


def rule_names() -> tuple[str, ...]:
    """Names of all registered rules, in registration order."""
    return tuple(_REGISTRY)
