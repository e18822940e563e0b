"""The rule-parametrised layer: a mixin that makes an ``nn.Linear`` or ``nn.Conv{1,2,3}d`` follow
a learning rule while it stays an instance of its torch class. The rule and its state are the
child module ``layer.rule``, as ``torch.nn.utils.parametrize`` keeps ``module.parametrizations``.
``biograd.convert`` swaps a module's class for ``Feedback<Class>`` (a subclass of this mixin and
the original class), so the Parameter objects stay; ``biograd.nn.Linear(3, 4, rule="fa")``
builds one directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import BiogradError
from ..rules.base import Rule, get_rule
from ..tracing import refuse_tracing
from . import functional as BF

CONVERTIBLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_STOCK_FORWARD = {cls.forward for cls in CONVERTIBLE}


@dataclass(frozen=True)
class LinearLike:
    """How a third-party module with ``weight`` and ``bias`` (or None) that computes ``y = x W^T
    + b`` maps onto biograd's linear op: ``W = weight`` (``nn.Linear``'s ``(out, in)``) or, with
    ``transposed``, ``W = weight^T`` (transformers' ``Conv1D`` of GPT-2). The rule sees ``W``
    (its B and scale are a Linear layer's); ``biograd.feedback_weight`` returns B shaped like
    ``weight``."""

    transposed: bool = False


_LINEAR_LIKE: dict[type[nn.Module] | str, LinearLike] = {
    "transformers.pytorch_utils.Conv1D": LinearLike(transposed=True),
}


def register_linear_like(cls: type[nn.Module] | str, spec: LinearLike) -> None:
    """Let ``biograd.convert`` convert instances of ``cls`` (a class, or its qualified name
    ``"package.module.Class"`` so that the package need not be imported) as linear layers, as
    ``spec`` describes. Subclasses that override ``forward`` are left alone (and reported)."""
    _LINEAR_LIKE[cls] = spec
    _FOUND.clear()


_FOUND: dict[type, tuple[LinearLike, Callable[..., Any]] | None] = {}


def linear_like(cls: type[nn.Module]) -> tuple[LinearLike, Callable[..., Any]] | None:
    """The spec of a registered linear-like class (or base class) and its stock forward."""
    if cls not in _FOUND:
        _FOUND[cls] = None
        for base in cls.__mro__:
            name = f"{base.__module__}.{base.__qualname__}"
            spec = _LINEAR_LIKE.get(base) or _LINEAR_LIKE.get(name)
            if spec is not None:
                _FOUND[cls] = spec, base.forward  # type: ignore[attr-defined]
                break
    return _FOUND[cls]


def is_convertible_kind(module: nn.Module) -> bool:
    """True for the module types ``biograd.convert`` converts: Linear, Conv1d/2d/3d and the
    registered linear-like types (:func:`register_linear_like`)."""
    return isinstance(module, CONVERTIBLE) or linear_like(type(module)) is not None


def module_layout(layer: nn.Module, matrix: Tensor) -> Tensor:
    """A matrix in the ``(out, in)`` layout in that of ``layer.weight``, and back (a view)."""
    spec = linear_like(type(layer))
    return matrix.t() if spec is not None and spec[0].transposed else matrix


def linear_weight(layer: nn.Module) -> Tensor:
    """The weight a layer's rule sees: ``layer.weight`` in the ``(out, in)`` layout."""
    return module_layout(layer, layer.weight)  # type: ignore[arg-type]


def convertible(name: str, module: nn.Module, parents: dict[str, nn.Module]) -> str | None:
    """None if ``module`` (named ``name`` among ``parents``) can be converted, else why not."""
    cls = original_class(module) if isinstance(module, FeedbackLayer) else type(module)
    spec = linear_like(cls)
    if spec is not None:
        return None if cls.forward is spec[1] else f"{cls.__name__} overrides forward"
    if not isinstance(module, CONVERTIBLE):
        return "not a Linear or Conv layer"
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
    r = get_rule(rule).for_layer(layer, linear_weight(layer), seed, scale, **(options or {}))
    layer.rule = r
    return r


class WeightShapeError(BiogradError, RuntimeError):
    """A converted layer's weight changed shape and its rule's state cannot follow."""


class FeedbackLayer(nn.Module):
    """Mixin for a rule-parametrised layer: ``rule`` (a :class:`biograd.rules.Rule`, its state
    included), ``feedback_rule`` its name, ``feedback_exact`` a mode (like ``training``) for exact
    backprop (``biograd.exact``). Constructed directly it takes the torch class's arguments plus
    ``rule`` (default ``"bp"``; not a direct rule, which acts on the model), ``seed`` (default:
    from torch's RNG), ``scale`` (``biograd.rules.SCALES``) and ``options`` (``Rule.options``).
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
        uses_rule = not self.feedback_exact and not rule.exact_input_grad
        if uses_rule or (rule.direct and not self.feedback_exact):
            refuse_tracing(rule.name)
        if not uses_rule:
            return self._op(x, None, ())
        if rule.shape != tuple(linear_weight(self).shape):
            rule = self._follow_weight()
        return self._op(x, rule, rule.pass_state(self.training and torch.is_grad_enabled()))

    def _follow_weight(self) -> Rule:
        """The weight changed shape after the rule was made (``resize_token_embeddings``, a
        pruned layer): fixed state is drawn again from the same seed and scale; learned feedback
        (Parameters in an optimizer) cannot follow, and raises."""
        old, shape = self.rule, tuple(linear_weight(self).shape)
        if old.learned_feedback:
            raise WeightShapeError(
                f"the weight of this {old.name} layer changed shape from {old.shape} to {shape} "
                "after conversion, and its learned feedback cannot follow: convert the model "
                "again (and rebuild the optimizer) after resizing"
            )
        return set_rule(self, old.name, old.seed, old.scheme)

    def _op(self, x: Tensor, rule: Rule | None, state: tuple[Tensor, ...]) -> Tensor:
        layer: Any = self
        if isinstance(self, nn.Linear):
            return BF.linear(x, layer.weight, layer.bias, rule, state)
        if not isinstance(self, nn.modules.conv._ConvNd):  # a registered linear-like type
            return BF.linear(x, linear_weight(self), layer.bias, rule, state)
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
