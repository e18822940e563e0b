"""The rule-parametrised layer: one mixin that turns an ``nn.Linear`` or ``nn.Conv{1,2,3}d`` into a
layer whose backward follows a learning rule, while it stays an instance of its torch class.

The rule and all its state are the child module ``layer.rule`` (state-dict keys
``<layer>.rule.<tensor>``), the way ``torch.nn.utils.parametrize`` keeps
``module.parametrizations``. ``biograd.convert`` swaps a module's class for ``Feedback<Class>`` (a
subclass of both this mixin and the original class) and adds the rule; the module keeps its
Parameter objects, so its weights stay bit-for-bit and an optimizer built before conversion still
holds them. ``biograd.nn.Linear(3, 4, rule="fa")`` builds one directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..rules.base import Rule, get_rule
from . import functional as BF

CONVERTIBLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_STOCK_FORWARD = {cls.forward for cls in CONVERTIBLE}


def convertible(name: str, module: nn.Module, parents: dict[str, nn.Module]) -> str | None:
    """None if ``module`` (named ``name`` among ``parents``) can be converted, else why not."""
    if not isinstance(module, CONVERTIBLE):
        return "not a Linear or Conv layer"
    cls = original_class(module) if isinstance(module, FeedbackLayer) else type(module)
    if cls.forward not in _STOCK_FORWARD:
        return f"{cls.__name__} overrides forward"
    if isinstance(parents.get(name.rpartition(".")[0]), nn.MultiheadAttention):
        return "used inside MultiheadAttention's fused kernel (exact)"
    return None


def set_rule(
    layer: nn.Module, rule: str, seed: int | None = None, scale: str = "xavier",
    options: dict[str, Any] | None = None,
) -> Rule:  # fmt: skip
    """Give ``layer`` a fresh ``rule`` as ``layer.rule`` with the rule's keyword ``options``;
    ``seed=None`` draws one from torch's global RNG (as torch's own initialisation does)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    r = get_rule(rule).for_layer(layer, seed, scale, **(options or {}))
    layer.rule = r
    return r


class FeedbackLayer(nn.Module):
    """Mixin for a rule-parametrised layer.

    ``rule`` is the layer's :class:`biograd.rules.Rule` (its state included);
    ``feedback_rule`` its name; ``feedback_exact`` (a mode, like ``training``) makes the layer
    compute exact backprop (``biograd.exact``). Constructed directly it takes the torch class's
    arguments plus ``rule`` (default ``"bp"``), ``seed`` (default: from torch's RNG), ``scale``
    (``biograd.rules.SCALES``) and ``options`` (the rule's own, ``Rule.options``); direct rules
    need ``biograd.convert`` (they act on the model).
    """

    rule: Rule
    weight: Tensor
    feedback_exact: bool = False

    def __init__(
        self, *args: Any, rule: str = "bp", seed: int | None = None, scale: str = "xavier",
        options: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        if get_rule(rule).direct:
            raise ValueError(f"{rule!r} is a direct rule: use biograd.convert(model, {rule!r})")
        set_rule(self, rule, seed, scale, options)

    @property
    def feedback_rule(self) -> str:
        return self.rule.name

    def forward(self, x: Tensor) -> Tensor:
        rule = self.rule
        if self.feedback_exact or rule.exact_input_grad:
            return self._op(x, None, ())
        return self._op(x, rule, rule.pass_state(self.training and torch.is_grad_enabled()))

    def _op(self, x: Tensor, rule: Rule | None, state: tuple[Tensor, ...]) -> Tensor:
        layer: Any = self
        if isinstance(self, nn.Linear):
            return BF.linear(x, layer.weight, layer.bias, rule, state)
        conv = layer
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0,) * len(conv.kernel_size)
        elif isinstance(padding, str):
            rev = conv._reversed_padding_repeated_twice
            left, right = rev[0::2], rev[1::2]
            if left == right:
                padding = tuple(reversed(left))
            else:
                x = F.pad(x, rev)
                padding = (0,) * len(conv.kernel_size)
        args = (conv.stride, padding, conv.dilation, conv.groups)
        return BF.conv(x, conv.weight, conv.bias, rule, *args, state=state)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Feedback<UserClass> is made at run time: rebuild it from the user's class (pickle,
        # deepcopy, multiprocessing spawn).
        return _rebuild, (original_class(self),), self.__dict__.copy()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule.name}"


def _rebuild(cls: type[nn.Module]) -> nn.Module:
    """An empty instance of the converted class of ``cls`` (its state comes from pickle)."""
    made: nn.Module = object.__new__(feedback_class(cls))
    return made


class FeedbackLinear(FeedbackLayer, nn.Linear):
    """``nn.Linear`` following a learning rule (any input rank); also ``biograd.nn.Linear``."""


class FeedbackConv1d(FeedbackLayer, nn.Conv1d):
    """``nn.Conv1d`` following a learning rule; also ``biograd.nn.Conv1d``."""


class FeedbackConv2d(FeedbackLayer, nn.Conv2d):
    """``nn.Conv2d`` following a learning rule; also ``biograd.nn.Conv2d``."""


class FeedbackConv3d(FeedbackLayer, nn.Conv3d):
    """``nn.Conv3d`` following a learning rule; also ``biograd.nn.Conv3d``."""


_CLASSES: dict[type[nn.Module], type[FeedbackLayer]] = {
    nn.Linear: FeedbackLinear,
    nn.Conv1d: FeedbackConv1d,
    nn.Conv2d: FeedbackConv2d,
    nn.Conv3d: FeedbackConv3d,
}


def feedback_class(cls: type[nn.Module]) -> type[FeedbackLayer]:
    """The converted class for ``cls`` (a subclass of ``cls``), made once per class."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"Feedback{cls.__name__}", (FeedbackLayer, cls), {"__module__": cls.__module__}
        )
    return _CLASSES[cls]


def original_class(layer: nn.Module) -> type[nn.Module]:
    """The torch (or user) class a converted layer was made from."""
    for base in type(layer).__mro__[1:]:
        if issubclass(base, nn.Module) and not issubclass(base, FeedbackLayer):
            return base
    raise TypeError(f"{type(layer).__name__} has no original class")
