"""``biograd.convert``: one line to put any PyTorch model on a learning rule, and its companions
``exact``, ``feedback_weight``, ``set_targets``, the capability queries and ``conversion_report``
(``unconvert`` and ``load_plain``: :mod:`biograd.state`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .direct import DirectFeedback
from .direct.plan import attach, match, points_of
from .nn.layers import (
    FeedbackLayer,
    convertible,
    feedback_class,
    is_convertible_kind,
    linear_weight,
    module_layout,
    set_rule,
)
from .rules.base import Rule, check_scale, get_rule, layer_seed
from .state import unconvert

log = logging.getLogger("biograd")

_EXACT_KINDS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.MultiheadAttention, nn.Embedding,
)  # fmt: skip


@dataclass
class ConversionReport:
    """What ``convert`` did: ``converted`` maps layer names to rules, ``exact`` maps the other
    layers that take part in learning to why their gradients stay exact."""

    converted: dict[str, str] = field(default_factory=dict)
    exact: dict[str, str] = field(default_factory=dict)
    output: str | None = None
    feedback_points: list[str] = field(default_factory=list)
    unconverted_matrices: list[str] = field(default_factory=list)
    """Modules that hold a weight matrix (a parameter named ``*weight`` with two or more
    dimensions; embeddings aside) but were neither converted nor excluded: their input gradient
    is backprop's, through the transpose of that matrix. ``convert`` warns about them."""

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
        if self.unconverted_matrices:
            lines.append("WARNING: " + self.warning())
        return "\n".join(lines)

    def warning(self) -> str:
        """One line naming the :attr:`unconverted_matrices` (empty if there are none)."""
        if not self.unconverted_matrices:
            return ""
        return (
            f"{len(self.unconverted_matrices)} module(s) hold a weight matrix but were not "
            f"converted, so backprop carries the error through them: "
            f"{', '.join(self.unconverted_matrices)} (a linear-like type converts once registered "
            "with biograd.nn.register_linear_like)"
        )


def _plan(
    model: nn.Module, rule: str, overrides: Mapping[str, str] | None, exclude: Sequence[str] | None,
    scale: str, output: str | None,
) -> dict[str, str]:  # fmt: skip
    """Layer name -> rule name for every layer to convert; raises before anything changes."""
    main = get_rule(rule)
    for name in (overrides or {}).values():
        get_rule(name)
    check_scale(scale)
    parents = dict(model.named_modules())
    ok = [n for n, m in parents.items() if convertible(n, m, parents) is None]
    plan = {n: match(n, overrides) or main.name for n in ok if not match(n, exclude)}
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
            if not any(match(n, [pattern]) for n in ok):
                warnings.warn(
                    f"biograd.convert: {what} pattern {pattern!r} matches no convertible layer "
                    f"(layers: {', '.join(ok)})",
                    stacklevel=3,
                )
    direct = {r for r in plan.values() if get_rule(r).direct}
    if len(direct) > 1:
        raise ValueError(f"one model can use one direct rule at a time, got {sorted(direct)}")
    if direct and output is not None and output not in plan:
        raise ValueError(
            f"output layer {output!r} is not a converted layer; converted: {', '.join(plan)}"
        )
    return plan


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
    options: Mapping[str, Any] | None = None,
    verbose: bool = False,
) -> nn.Module:
    """Put every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` of ``model`` (also on the meta device) on
    ``rule`` (a name in ``biograd.RULES``), in place, and return it. Converting again replaces
    the rule; ``unconvert`` takes it off; ``conversion_report(model)`` says what was converted.

    Args:
        seed: seed of all random feedback (each layer derives its own from its name).
        overrides: per-layer rules by module name or glob, e.g. ``{"fc": "bp", "layer4.*": "fa"}``.
        exclude: names or globs of layers to leave plain (exact gradients).
        scale: scale scheme of B for the feedback-alignment family (``biograd.rules.SCALES``).
        options: the rules' own keyword options (``Rule.options``, ``docs/rules.md``), e.g.
            ``{"lr": 0.05}`` for ``wm``; each rule takes those it declares.
        verbose: print the conversion report (always logged at INFO level on ``biograd``).

    Direct rules only (``docs/direct.md``): ``output`` gets the true error (default: the last
    converted layer to run on ``example_input``, else in module order); ``layout``, ``norm``,
    ``hashed_rows``: ``biograd.direct.LAYOUTS`` and ``NORMS``; ``batch_dims``: leading dimensions
    that index samples at the feedback points; ``feedback_points``: names or globs of modules
    whose *outputs* receive the projected error (block-wise DFA); ``example_input``: a batch (or
    tuple of inputs) run once without backward, to find the layers' order and draw the feedback
    now (needed before ``DistributedDataParallel``).

    Raises:
        ValueError: an unknown rule, scale, layout, norm, output layer or rule option; nothing
            to convert; two direct rules in one model.
    """
    overrides, exclude = _check_arguments(rule, seed, overrides, exclude)
    plan = _plan(model, rule, overrides, exclude, scale, output)
    own = _rule_options(plan, options)
    modules = dict(model.named_modules())
    unconvert(model)
    for name, rule_name in plan.items():
        layer = modules[name]
        layer.__class__ = feedback_class(type(layer))
        set_rule(layer, rule_name, layer_seed(seed, name), scale, own[rule_name])
    direct = {n: modules[n] for n, r in plan.items() if get_rule(r).direct}
    if direct:
        attach(
            model, direct, plan[next(iter(direct))], seed=seed, output=output, layout=layout,
            norm=norm, batch_dims=batch_dims, feedback_points=feedback_points,
            example_input=example_input, hashed_rows=hashed_rows,
        )  # fmt: skip
    _announce(conversion_report(model), verbose)
    return model


def _announce(report: ConversionReport, verbose: bool) -> None:
    """Log (and with ``verbose`` print) the report; warn about unconverted weight matrices."""
    log.info("%s", report)
    if verbose:
        print(report)
    if report.unconverted_matrices:
        warnings.warn(f"biograd.convert: {report.warning()}", stacklevel=3)


def _rule_options(plan: Mapping[str, str], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Each planned rule's share of ``options`` (those it declares), checked by the rule;
    ``ValueError`` for an option that no rule of the plan takes."""
    opts = dict(options or {})
    rules = {r: get_rule(r) for r in sorted(set(plan.values()))}
    takes = {o for cls in rules.values() for o in cls.options}
    if set(opts) - takes:
        raise ValueError(
            f"unknown rule option(s) {', '.join(sorted(set(opts) - takes))} for rule(s) "
            f"{', '.join(rules)}; they take: {', '.join(sorted(takes)) or 'none'}"
        )
    own = {r: {k: v for k, v in opts.items() if k in cls.options} for r, cls in rules.items()}
    for r, cls in rules.items():
        cls.check_options(**own[r])
    return own


def _check_arguments(
    rule: Any, seed: Any, overrides: Any, exclude: Any
) -> tuple[Mapping[str, str] | None, Sequence[str] | None]:
    """``convert``'s arguments of the wrong type as a ``TypeError`` that says what is expected;
    returns ``(overrides, exclude)`` with a single ``exclude`` name read as a list of one."""
    if not isinstance(rule, str):
        raise TypeError(f"convert: rule must be a rule name (str), got {type(rule).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"convert: seed must be an int, got {seed!r}")
    if overrides is not None and not (
        isinstance(overrides, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in overrides.items())
    ):
        raise TypeError(
            "convert: overrides must map layer names or globs to rule names, e.g. "
            f"{{'fc': 'bp'}}; got {overrides!r}"
        )
    if isinstance(exclude, str):
        exclude = [exclude]  # one name, not its characters
    if exclude is not None and not all(isinstance(p, str) for p in exclude):
        raise TypeError(f"convert: exclude must be layer names or globs, got {exclude!r}")
    return overrides, exclude


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


def conversion_report(model: nn.Module) -> ConversionReport:
    """Describe the conversion of ``model``: converted layers with their rules, and the layers
    whose gradients stay exact (batch norm, pooling, attention internals, unknown types)."""
    report = ConversionReport(feedback_points=points_of(model))
    parents = dict(model.named_modules())
    for name, module in model.named_modules():
        key = name or "<root>"
        if _holds_matrix(module) and not _excluded(name, module, parents):
            report.unconverted_matrices.append(key)
        if isinstance(module, FeedbackLayer):
            report.converted[key] = module.feedback_rule
            if "direct_feedback" in module._modules:
                report.output = name
        elif is_convertible_kind(module):
            report.exact[key] = (
                convertible(name, module, parents) or f"{type(module).__name__} (excluded)"
            )
        elif (
            isinstance(module, _EXACT_KINDS)
            or next(module.parameters(recurse=False), None) is not None
        ):
            report.exact[key] = f"{type(module).__name__} (autograd)"
    return report


def _holds_matrix(module: nn.Module) -> bool:
    """A module that is not converted and owns a weight matrix that is not an embedding table
    (a lookup has no input gradient, so nothing is transported)."""
    if isinstance(module, (FeedbackLayer, nn.Embedding, nn.EmbeddingBag, Rule, DirectFeedback)):
        return False
    return any(
        n.endswith("weight") and p.dim() >= 2 for n, p in module.named_parameters(recurse=False)
    )


def _excluded(name: str, module: nn.Module, parents: dict[str, nn.Module]) -> bool:
    """A convertible module left plain on purpose (``exclude``)."""
    return is_convertible_kind(module) and convertible(name, module, parents) is None


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

    Feedback-alignment family: B shaped like ``layer.weight``, from the rule's state and the
    current weight: fa and kp their own B, usf and frsf the B of the next backward pass, brsf
    the draw of its last training pass; ``bp`` returns ``weight``.

    Direct rules: the matrix ``B_k`` of shape ``(d_k, C)`` that *trains this layer*: the one of
    the feedback point that this layer's output reaches first (the converted layer that ran last
    before the point; for an MLP the input of the next layer, so ``d_k`` is this layer's outputs
    per sample), ``C`` the model's outputs per sample. ``None`` for the output layer (it gets
    the true error) and before the first forward pass has drawn the feedback.
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
    """Tell a model on ``sdfa`` or ``drtp`` by what factor the loss is scaled before backward
    (``scaler.get_scale()`` of an fp16 ``torch.amp.GradScaler``). Their signals, ``sign(e)`` and
    the targets, do not carry the loss scale that ``e`` carries, so without this the scaler's
    unscale step would shrink their hidden-layer gradients by the scale. No-op for other rules."""
    engine = engine_of(model)
    if engine is not None:
        engine.loss_scale = float(scale)
