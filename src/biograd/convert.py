"""``biograd.convert``: one line to put any PyTorch model on a learning rule, and its companions
``exact``, ``feedback_weight``, ``set_targets`` and ``conversion_report``."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .direct import DirectFeedback, attach
from .nn.layers import CONVERTIBLE, FeedbackLayer, feedback_class, original_class
from .rules.base import SCALES, get_rule, layer_seed

log = logging.getLogger("biograd")

_STOCK_FORWARD = {cls.forward for cls in CONVERTIBLE}
_EXACT_KINDS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.MultiheadAttention,
    nn.Embedding,
)


@dataclass
class ConversionReport:
    """What ``convert`` did: ``converted`` maps layer names to rules, ``exact`` maps the other
    layers that take part in learning to why their gradients stay exact."""

    converted: dict[str, str] = field(default_factory=dict)
    exact: dict[str, str] = field(default_factory=dict)
    output: str | None = None
    feedback_points: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s):"]
        width = max((len(n) for n in [*self.converted, *self.exact]), default=4)
        for name, rule in self.converted.items():
            tag = "  (output: true error)" if name == self.output else ""
            lines.append(f"  {name:<{width}}  {rule}{tag}")
        if self.feedback_points:
            lines.append("feedback points: " + ", ".join(self.feedback_points))
        if self.exact:
            lines.append("exact gradients (not converted):")
            lines.extend(f"  {name:<{width}}  {why}" for name, why in self.exact.items())
        return "\n".join(lines)


def match(name: str, patterns: Sequence[str] | Mapping[str, Any] | None) -> Any:
    if not patterns:
        return None
    items = patterns.items() if isinstance(patterns, Mapping) else ((p, p) for p in patterns)
    for pattern, value in items:
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def _state(model: nn.Module) -> dict[str, Any]:
    st: dict[str, Any] = model.__dict__.setdefault("_biograd", {"hooks": []})
    return st


def _unconvert(model: nn.Module) -> None:
    for handle in _state(model)["hooks"]:
        handle.remove()
    model.__dict__["_biograd"] = {
        "hooks": []
    }  # hooks, feedback points, excluded: all per conversion
    for module in model.modules():
        if isinstance(module, FeedbackLayer):
            module._rule.teardown(module)
            module._modules.pop("direct_feedback", None)
            for attr in ("_rule", "_engine", "_last_feedback", "_feedback_generators"):
                module.__dict__.pop(attr, None)
            module.__class__ = original_class(module)  # type: ignore[assignment]


def _convertible(name: str, module: nn.Module, parents: dict[str, nn.Module]) -> str | None:
    """None if ``module`` can be converted, else why not."""
    if not isinstance(module, CONVERTIBLE):
        return "not a Linear or Conv layer"
    cls = original_class(module) if isinstance(module, FeedbackLayer) else type(module)
    if cls.forward not in _STOCK_FORWARD:
        return f"{cls.__name__} overrides forward"
    parent = parents.get(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention):
        return "used inside MultiheadAttention's fused kernel (exact)"
    return None


def convert(
    model: nn.Module,
    rule: str,
    *,
    seed: int = 0,
    overrides: Mapping[str, str] | None = None,
    exclude: Sequence[str] | None = None,
    scale: str = "xavier",
    output: str | None = None,
    layout: str = "dense",
    norm: str = "launay",
    batch_dims: int = 1,
    feedback_points: Sequence[str] | None = None,
    example_input: Any = None,
    hashed_rows: int = 1024,
    verbose: bool = False,
) -> nn.Module:
    """Put every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` of ``model`` on ``rule``, in place.

    Args:
        model: any module; layers are found wherever they sit.
        rule: a name from ``biograd.RULES``.
        seed: seed of all random feedback (each layer derives its own from its name).
        overrides: per-layer rules by module name or glob, e.g. ``{"fc": "bp", "layer4.*": "fa"}``.
        exclude: names or globs of layers to leave untouched (plain torch layers, exact gradients).
        scale: scale scheme of B for the feedback-alignment family (``biograd.rules.SCALES``).
        output: direct rules: name of the output layer, which gets the true error
            (default: the last converted layer that runs).
        layout, norm, hashed_rows: direct rules: feedback layout and scale
            (``biograd.direct.LAYOUTS`` and ``NORMS``).
        batch_dims: direct rules: leading dimensions that index samples at the feedback points.
        feedback_points: direct rules: names or globs of modules whose *outputs* receive the
            projected error (block-wise DFA) instead of the inputs of the converted layers.
        example_input: a batch (or tuple of positional inputs) run once without a backward pass to
            size the feedback of direct rules on convolutions and to find the layers' order.
        verbose: print the conversion report (it is always logged at INFO level on ``biograd``).

    Returns:
        ``model``, converted. Converting again replaces the previous rule; ``biograd.RULES``
        lists the rules; ``conversion_report(model)`` describes what was converted.

    Raises:
        ValueError: an unknown rule, scale, layout or norm; a model with nothing to convert;
            direct rules mixed in one model; an unknown output layer.
    """
    main = get_rule(rule)
    for name in (overrides or {}).values():
        get_rule(name)
    if scale not in SCALES:
        raise ValueError(f"unknown feedback scale {scale!r}; choose one of {', '.join(SCALES)}")

    parents = dict(model.named_modules())
    plan: dict[str, str] = {}
    excluded: list[str] = []
    for name, module in model.named_modules():
        if _convertible(name, module, parents) is None:
            if match(name, exclude):
                excluded.append(name)
            else:
                plan[name] = match(name, overrides) or main.name
    lazy = [n for n in plan if isinstance(parents[n].weight, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"layer(s) {', '.join(lazy)} have uninitialised (lazy) parameters: run the model on "
            "one batch before biograd.convert"
        )
    if not plan:
        raise ValueError(
            f"nothing to convert in {type(model).__name__}: biograd converts nn.Linear and "
            "nn.Conv1d/2d/3d layers (after exclude)"
        )
    for what, patterns in (("overrides", list(overrides or ())), ("exclude", list(exclude or ()))):
        for pattern in patterns:
            if not any(match(n, [pattern]) for n in [*plan, *excluded]):
                warnings.warn(
                    f"biograd.convert: {what} pattern {pattern!r} matches no convertible layer "
                    f"(layers: {', '.join([*plan, *excluded])})",
                    stacklevel=2,
                )
    direct = {r for r in plan.values() if get_rule(r).direct}
    if len(direct) > 1:
        raise ValueError(f"one model can use one direct rule at a time, got {sorted(direct)}")
    if direct and output is not None and output not in plan:
        raise ValueError(
            f"output layer {output!r} is not a converted layer; converted: {', '.join(plan)}"
        )

    _unconvert(model)
    _state(model)["excluded"] = excluded
    for name, rule_name in plan.items():
        layer = parents[name]
        r = get_rule(rule_name)
        layer.__class__ = feedback_class(type(layer))
        layer.__dict__.update(
            feedback_rule=r.name,
            feedback_seed=layer_seed(seed, name),
            feedback_scale_scheme=scale,
            feedback_step=0,
            feedback_exact=False,
            feedback_key=name,
            direct_role="",
            _rule=r,
            _engine=None,
        )
        r.setup(layer, layer.feedback_seed, scale)

    if direct:
        attach(
            model, plan, direct.pop(), hooks=_state(model), seed=seed, output=output, layout=layout, norm=norm,
            batch_dims=batch_dims, feedback_points=feedback_points, example_input=example_input,
            hashed_rows=hashed_rows,
        )  # fmt: skip

    report = conversion_report(model)
    log.info("%s", report)
    if verbose:
        print(report)
    return model


def converted_layers(model: nn.Module) -> Iterator[tuple[str, FeedbackLayer]]:
    """``(name, layer)`` for every converted layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FeedbackLayer):
            yield name, module


def conversion_report(model: nn.Module) -> ConversionReport:
    """Describe the conversion of ``model``: converted layers with their rules, and the layers
    whose gradients stay exact (batch norm, pooling, attention internals, unknown types)."""
    report = ConversionReport()
    parents = dict(model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, FeedbackLayer):
            report.converted[name or "<root>"] = module.feedback_rule
            if module.direct_role == "output":
                report.output = name
            continue
        if isinstance(module, DirectFeedback):
            continue
        own_params = any(True for _ in module.parameters(recurse=False))
        if isinstance(module, _EXACT_KINDS) or own_params:
            why = _convertible(name, module, parents) if isinstance(module, CONVERTIBLE) else None
            if name in _state(model).get("excluded", ()):
                why = f"{type(module).__name__} (excluded)"
            report.exact[name or "<root>"] = why or f"{type(module).__name__} (autograd)"
    report.feedback_points = list(_state(model).get("points", []))
    return report


@contextlib.contextmanager
def exact(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every converted layer (and the direct-feedback engine) computes exact
    backprop; the previous modes come back on exit, also after an exception."""
    layers = [m for _, m in converted_layers(model)]
    engines = [m for m in model.modules() if isinstance(m, DirectFeedback)]
    before = [m.feedback_exact for m in layers], [e.exact for e in engines]
    try:
        for m in layers:
            m.feedback_exact = True
        for e in engines:
            e.exact = True
        yield model
    finally:
        for m, v in zip(layers, before[0]):
            m.feedback_exact = v
        for e, v in zip(engines, before[1]):
            e.exact = v


def feedback_weight(layer: nn.Module) -> Tensor | None:
    """The feedback matrix of a converted layer.

    Feedback-alignment family: the B the layer used in its last forward/backward pass, shaped
    like ``layer.weight`` (before any pass: the B it would use now; fa and kp: their own B);
    ``bp`` returns ``weight``.
    Direct rules: the matrix that projects the output error onto this layer's *input*, shape
    ``(d, C)`` with ``d`` the input features per sample and ``C`` the outputs; it trains the layers
    below this one. ``None`` for a layer with no feedback point (the first layer).
    """
    if not isinstance(layer, FeedbackLayer):
        raise TypeError(
            f"{type(layer).__name__} is not a converted layer; use biograd.convert first"
        )
    rule = layer._rule
    if rule.direct:
        engine = layer._engine
        if engine is None or layer.direct_role not in ("hidden", "output"):
            return None
        if layer.feedback_key not in engine.sizes:
            return None
        return engine.matrix(layer.feedback_key).detach()
    last = layer.__dict__.get("_last_feedback")
    if last is not None:
        return last
    with torch.no_grad():
        fb = rule.feedback(layer)
    return layer.weight.detach() if fb is None else fb.detach()


def set_targets(model: nn.Module, targets: Tensor) -> None:
    """Hand the targets of the next forward pass to a model on a rule that needs them (``drtp``)."""
    engines = [m for m in model.modules() if isinstance(m, DirectFeedback)]
    if not engines:
        raise ValueError("set_targets: the model has no direct-feedback rule")
    for e in engines:
        e.targets = targets


def set_loss_scale(model: nn.Module, scale: float) -> None:
    """Tell a model on ``sdfa`` or ``drtp`` by what factor the loss is scaled before backward
    (``scaler.get_scale()`` of an fp16 ``torch.amp.GradScaler``). Their signals, ``sign(e)`` and
    the targets, do not carry the loss scale that ``e`` carries, so without this the scaler's
    unscale step would shrink their hidden-layer gradients by the scale. No-op for other rules."""
    for m in model.modules():
        if isinstance(m, DirectFeedback):
            m.loss_scale = float(scale)
