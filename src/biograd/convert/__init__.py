"""``biograd.convert``: one line to put any PyTorch model on a learning rule; the conversion
report (:mod:`.report`); what a converted model is asked and told (:mod:`.model`: ``exact``,
``feedback_weight``, ``set_targets``, the capability queries); ``unconvert`` and ``load_plain``:
:mod:`biograd.state`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..direct.plan import attach, match
from ..nn.layers import convertible, feedback_class, set_rule
from ..rules.base import check_scale, get_rule, layer_seed
from ..state import unconvert
from .model import (
    converted_layers,
    engine_of,
    exact,
    feedback_weight,
    needs_targets,
    rules_of,
    served_by,
    set_loss_scale,
    set_targets,
    update_feedback,
)  # fmt: skip
from .report import ConversionReport, conversion_report

__all__ = [
    "ConversionReport", "conversion_report", "convert", "converted_layers", "engine_of", "exact",
    "feedback_weight", "needs_targets", "rules_of", "served_by", "set_loss_scale", "set_targets",
    "update_feedback",
]  # fmt: skip

log = logging.getLogger("biograd")


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
    error: str = "loss",
    batch_dims: int | None = None,
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
    ``hashed_rows``: ``biograd.direct.LAYOUTS`` and ``NORMS``; ``error``: ``"loss"`` projects the
    loss's output error, ``"per_sample"`` each sample's (``biograd.direct.ERRORS``); ``batch_dims``:
    None (default) reads rows by position: a linear-like layer's input ``(N, *P, d)`` has one
    ``B_k`` of shape ``(d, C)`` for all its positions (a convolution's input: ``prod(shape[1:])``
    features), and position ``t`` gets ``B_k s_t`` where the point's positions are the output's
    (per-token DFA, Launay et al. 2020), else every position of sample ``n`` gets ``B_k sum_t
    s_{n,t}`` (Nøkland 2016's ``B e`` for the sample's error pooled over the output's positions); an
    int: that many leading dimensions of every point and of the output index samples, a point's
    equal to the output's (``biograd.direct.positions``); ``feedback_points``: names or globs of
    modules whose *outputs* receive the projected error (block-wise DFA); ``example_input``: a batch
    (or tuple of inputs) run once without backward, to find the layers' order and draw the feedback
    now (needed before ``DistributedDataParallel``).

    Raises:
        ValueError: an unknown rule, scale, layout, norm, error, output layer or rule option;
            nothing to convert; two direct rules in one model.
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
            example_input=example_input, hashed_rows=hashed_rows, error=error,
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
