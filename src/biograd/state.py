"""Taking a model off its rules and moving weights between converted and plain models:
``unconvert``, ``plain_state_dict``, ``load_plain`` and ``load_rule_state``."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .direct import DirectFeedback
from .direct.plan import detach_hooks
from .nn.layers import FeedbackLayer, original_class
from .rules.base import Rule


def unconvert(model: nn.Module) -> nn.Module:
    """Take ``model`` off its rules, in place: every converted layer becomes an instance of its
    original class again with the same Parameter objects, the rules' state and the direct
    feedback are removed, and ``model.state_dict()`` loads strictly into the plain architecture.
    Returns ``model``."""
    detach_hooks(model)
    for module in model.modules():
        if isinstance(module, FeedbackLayer):
            module._modules.pop("rule", None)
            module._modules.pop("direct_feedback", None)
            module.__dict__.pop("feedback_exact", None)
            module.__class__ = original_class(module)  # type: ignore[assignment]
    return model


def _rule_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The ``state_dict`` key prefixes of the modules that hold rule state."""
    return tuple(
        f"{n}." if n else ""
        for n, m in model.named_modules()
        if isinstance(m, (Rule, DirectFeedback))
    )


def rule_keys(model: nn.Module) -> set[str]:
    """The ``state_dict`` keys of ``model`` that hold rule state (not in the plain model)."""
    prefixes = _rule_prefixes(model)
    return {k for k in model.state_dict() if k.startswith(prefixes)}


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without the rules' state: what the unconverted model would save."""
    drop = rule_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def load_plain(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load the ``state_dict`` of the plain (unconverted) architecture into a converted model,
    strictly: every plain key must be there and no other (``RuntimeError`` as
    ``load_state_dict`` raises otherwise). The weights come in; the rules' state stays."""
    merged = {k: v for k, v in model.state_dict().items() if k in rule_keys(model)}
    extra = sorted(set(state_dict) & set(merged))
    if extra:
        raise RuntimeError(f"load_plain: {extra[:3]} are rule state, not plain weights")
    model.load_state_dict({**merged, **state_dict}, strict=True)


def load_rule_state(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load only the rules' state (a layer's ``rule.*``, a direct rule's ``direct_feedback.*``)
    from a full ``state_dict`` of the converted model; the weights are left as they are. Returns
    the keys loaded.

    For loaders that keep only the keys a model has *before* its first forward pass, and so drop
    a direct rule's feedback, which is made at the first forward pass: Hugging Face
    ``from_pretrained`` reports them as unexpected. Fixed feedback (``dfa``, ...) is drawn again
    identically from the seed; a learned one (``dkp``) must come back with this function, e.g.
    ``load_rule_state(model, safetensors.torch.load_file(f"{path}/model.safetensors"))``.
    """
    prefixes = _rule_prefixes(model)
    subset = {k: v for k, v in state_dict.items() if k.startswith(prefixes)}
    result = model.load_state_dict(subset, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"load_rule_state: {result.unexpected_keys[:3]} are not in the model")
    return sorted(subset)
