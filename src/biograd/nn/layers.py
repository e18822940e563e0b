"""The rule-parametrised layer: one mixin that turns an ``nn.Linear`` or ``nn.Conv{1,2,3}d`` into a
layer whose backward follows a learning rule, while it stays an instance of its torch class.

``biograd.convert`` swaps a module's class for ``Feedback<Class>`` (a subclass of both this mixin
and the original class, as ``torch.nn.utils.parametrize`` does), and registers the rule's buffers.
The module keeps its Parameter objects, so its weights stay bit-for-bit and an optimizer built
before conversion still holds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import functional as BF

if TYPE_CHECKING:
    from ..direct import DirectFeedback
    from ..rules.base import Rule

CONVERTIBLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FeedbackLayer(nn.Module):
    """Mixin for a converted layer. Attributes (all set by ``biograd.convert``):

    - ``feedback_rule``: the rule's name; ``feedback_seed``: this layer's seed;
      ``feedback_scale_scheme``: the scale scheme of B (see ``biograd.rules.SCALES``);
    - ``feedback_step``: training forward passes so far (drives brsf's per-batch draws);
    - ``feedback_exact``: when true the layer computes exact backprop (``biograd.exact``).
    """

    feedback_rule: str
    feedback_seed: int
    feedback_scale_scheme: str
    feedback_step: int
    feedback_exact: bool
    feedback_key: str
    direct_role: str  # "" (not direct), "hidden" (input is a feedback point), "output", "none"
    _rule: Rule
    _engine: DirectFeedback | None
    weight: Tensor
    # the rules' state (buffers, or kp's Parameter), present only under the rule that uses it
    feedback: Tensor
    feedback_scale: Tensor
    feedback_magnitude: Tensor

    def forward(self, x: Tensor) -> Tensor:
        if self.feedback_exact:
            return self._op(x, None)
        if self._rule.direct:
            engine = self._engine
            if engine is not None and self.direct_role in ("hidden", "output"):
                x = engine.add_point(self.feedback_key, x)
            out = self._op(x, None)
            if engine is not None and self.direct_role == "output":
                out = engine.inject(out)
            return out
        fb = self._rule.feedback(self)
        if fb is not None:
            self.__dict__["_last_feedback"] = fb.detach()  # plain attribute, not module state
        return self._op(x, fb)

    def _op(self, x: Tensor, feedback: Tensor | None) -> Tensor:
        layer: Any = self
        if isinstance(self, nn.Linear):
            return BF.linear(x, layer.weight, layer.bias, feedback)
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
        return BF.conv(
            x, conv.weight, conv.bias, feedback, conv.stride, padding, conv.dilation, conv.groups
        )

    def _feedback_generator(self, device: torch.device) -> torch.Generator:
        gens: dict[torch.device, torch.Generator] = self.__dict__.setdefault(
            "_feedback_generators", {}
        )
        if device not in gens:
            gens[device] = torch.Generator(device=device)
        return gens[device]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "rule": self.feedback_rule,
            "seed": self.feedback_seed,
            "scale": self.feedback_scale_scheme,
            "step": self.feedback_step,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("rule") != self.feedback_rule:
            raise RuntimeError(
                f"state_dict was saved with rule {state.get('rule')!r}, this layer uses {self.feedback_rule!r}"
            )
        self.feedback_seed = int(state["seed"])
        self.feedback_step = int(state["step"])

    def extra_repr(self) -> str:
        base = super().extra_repr()
        extra = f"rule={self.feedback_rule}"
        if not self._rule.direct and self.feedback_rule != "bp":
            extra += f", scale={self.feedback_scale_scheme}"
        if self.direct_role:
            extra += f", role={self.direct_role}"
        return f"{base}, {extra}"


class FeedbackLinear(FeedbackLayer, nn.Linear):
    """``nn.Linear`` following a learning rule (any input rank)."""


class FeedbackConv1d(FeedbackLayer, nn.Conv1d):
    """``nn.Conv1d`` following a learning rule."""


class FeedbackConv2d(FeedbackLayer, nn.Conv2d):
    """``nn.Conv2d`` following a learning rule."""


class FeedbackConv3d(FeedbackLayer, nn.Conv3d):
    """``nn.Conv3d`` following a learning rule."""


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
            f"Feedback{cls.__name__}", (FeedbackLayer, cls), {"__module__": __name__}
        )
    return _CLASSES[cls]


def original_class(layer: FeedbackLayer) -> type[nn.Module]:
    """The torch class a converted layer was made from."""
    for base in type(layer).__mro__[1:]:
        if issubclass(base, nn.Module) and not issubclass(base, FeedbackLayer):
            return base
    raise TypeError(f"{type(layer).__name__} has no original class")
