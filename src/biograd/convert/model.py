"""What a converted model is asked and told: its layers and rules, exact mode, the feedback
matrices, targets and loss scale for direct rules, the post-step update of learned feedback."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..direct import DirectFeedback
from ..nn.layers import FeedbackLayer, linear_weight, module_layout
from ..rules.base import Rule


def converted_layers(model: nn.Module) -> Iterator[tuple[str, FeedbackLayer]]:
    """``(name, layer)`` for every converted layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FeedbackLayer):
            yield name, module


def rules_of(model: nn.Module) -> list[Rule]:
    """The rule of every converted layer of ``model`` (ask their capabilities, not names)."""
    return [layer.rule for _, layer in converted_layers(model)]


def needs_targets(model: nn.Module) -> bool:
    """True if some rule of ``model`` needs ``biograd.set_targets`` before each forward pass."""
    return any(r.needs_targets for r in rules_of(model))


def update_feedback(model: nn.Module) -> None:
    """Run the post-step update of every rule that has one (``updates_after_step``): call it
    after each ``optimizer.step()``."""
    for _, layer in converted_layers(model):
        if layer.rule.updates_after_step:
            layer.rule.update(layer)


@contextlib.contextmanager
def exact(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every converted layer (and the direct-feedback engine) computes exact
    backprop; the previous modes come back on exit, also after an exception."""
    mods = [
        (m, "feedback_exact" if isinstance(m, FeedbackLayer) else "exact")
        for m in model.modules()
        if isinstance(m, (FeedbackLayer, DirectFeedback))
    ]
    before = [getattr(m, mode) for m, mode in mods]
    try:
        for m, mode in mods:
            setattr(m, mode, True)
        yield model
    finally:
        for (m, mode), value in zip(mods, before):
            setattr(m, mode, value)


def engine_of(model: nn.Module) -> DirectFeedback | None:
    """The direct-feedback engine of ``model`` (None if it has none)."""
    return next((m for m in model.modules() if isinstance(m, DirectFeedback)), None)


def feedback_weight(layer: nn.Module) -> Tensor | None:
    """The feedback matrix of a converted layer (detached).

    Feedback-alignment family: B shaped like ``layer.weight`` from the rule's state and the
    current weight (usf, frsf: the B of the next backward; brsf: of its last training pass;
    bp: ``weight``). Direct rules: the ``B_k`` (``d_k x C``) that *trains this layer*, at the
    feedback point its output reaches first (for an MLP the next layer's input), ``C`` the
    model's outputs per sample; ``None`` for the output layer and before the first forward pass.
    """
    if not isinstance(layer, FeedbackLayer):
        raise TypeError(
            f"{type(layer).__name__} is not a converted layer; use biograd.convert first"
        )
    rule = layer.rule
    if not rule.direct:
        with torch.no_grad():
            b = rule.matrix(linear_weight(layer).detach(), *rule.last_state())
        return layer.weight.detach() if b is None else module_layout(layer, b).detach()
    engine, name = served_by(layer)
    key = next((p for p, t in engine.trains.items() if t == name), None)
    return None if key is None or key not in engine.sizes else engine.matrix(key).detach()


def served_by(layer: nn.Module) -> tuple[DirectFeedback, str]:
    """The direct-feedback engine that serves ``layer``, and the layer's name in its model."""
    for hook in layer._forward_hooks.values():
        owner = getattr(getattr(hook, "func", hook), "__self__", None)
        if isinstance(owner, DirectFeedback) and isinstance(hook, functools.partial):
            return owner, hook.args[0]
    raise TypeError("the layer has no direct-feedback engine (convert the model)")


def set_targets(model: nn.Module, targets: Tensor) -> None:
    """Hand the targets of the next forward pass to a model on a rule that needs them (``drtp``)."""
    engine = engine_of(model)
    if engine is None:
        raise ValueError("set_targets: the model has no direct-feedback rule")
    engine.targets = targets


def set_loss_scale(model: nn.Module, scale: float) -> None:
    """Tell a model on ``sdfa`` or ``drtp`` the loss scale of an fp16 ``torch.amp.GradScaler``
    (``scaler.get_scale()``): their signals, ``sign(e)`` and the targets, do not carry it, so the
    scaler's unscale step would shrink their hidden gradients by it. No-op for other rules."""
    engine = engine_of(model)
    if engine is not None:
        engine.loss_scale = float(scale)
