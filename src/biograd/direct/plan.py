"""Putting a direct rule on a model: which modules are feedback points, which layer is the output,
and the hooks that connect them to the engine (called by ``biograd.convert``)."""

from __future__ import annotations

import fnmatch
import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..rules.base import get_rule
from .engine import DirectFeedback
from .layouts import LAYOUTS
from .positions import positional


def match(name: str, patterns: Sequence[str] | Mapping[str, Any] | None) -> Any:
    """The value of the first pattern (a name or glob) that ``name`` matches; for a list of
    patterns, the pattern itself; None if none matches."""
    if not patterns:
        return None
    items = patterns.items() if isinstance(patterns, Mapping) else ((p, p) for p in patterns)
    for pattern, value in items:
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def explicit_points(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Names of the modules that ``patterns`` (names or globs) select as feedback points, in
    module order; a module inside another selected module is left out (``"block*"`` selects
    ``block1``, not ``block1.conv1``)."""
    chosen: list[str] = []
    for name, _ in model.named_modules():
        if name and match(name, patterns) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    return chosen


@contextmanager
def probing(model: nn.Module, grad: bool) -> Iterator[None]:
    """For a forward pass that only looks at ``model``: every module in eval mode, autograd on
    if ``grad``; each module's train mode restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.set_grad_enabled(grad):
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def call(model: nn.Module, example_input: Any) -> Any:
    """``model(example_input)``, or ``model(*example_input)`` for a tuple of arguments."""
    return model(*(example_input if isinstance(example_input, tuple) else (example_input,)))


def run_order(model: nn.Module, layers: Mapping[str, nn.Module], example_input: Any) -> list[str]:
    """The names of ``layers`` in the order they run on ``example_input`` (one forward pass in
    eval mode without autograd; train modes restored)."""
    ran: list[str] = []
    handles = [
        m.register_forward_pre_hook(functools.partial(lambda n, *_: ran.append(n), n))
        for n, m in layers.items()
    ]
    try:
        with probing(model, grad=False):
            call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(ran))


def attach(
    model: nn.Module, layers: Mapping[str, nn.Module], rule: str, *, seed: int,
    output: str | None, layout: str, norm: str, batch_dims: int | None,
    feedback_points: Sequence[str] | None, example_input: Any, hashed_rows: int, error: str,
) -> DirectFeedback:  # fmt: skip
    """Attach a direct-feedback engine for ``rule`` to the output layer of ``model``, whose
    converted ``layers`` (by name) are on that rule, and hook it in. The output layer is
    ``output``, else the last of ``layers`` to run on ``example_input``, else the last in module
    order. The feedback is drawn at the first forward pass (with ``example_input``: now)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown feedback layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    modules = dict(model.named_modules())
    explicit = explicit_points(model, feedback_points)
    if feedback_points and not explicit:
        raise ValueError(f"no module matches feedback_points={list(feedback_points)}")
    order = list(layers) if example_input is None else run_order(model, layers, example_input)
    out_name = output if output is not None else (order or list(layers))[-1]
    if out_name not in layers:
        raise ValueError(
            f"output layer {out_name!r} is not a converted layer; converted: {', '.join(layers)}"
        )
    if get_rule(rule).learned_feedback:
        if layout != "dense":
            raise ValueError(
                f"{rule} learns one feedback matrix per point: it needs layout='dense' "
                f"({layout!r} shares stored rows between points)"
            )
        if example_input is None:
            warnings.warn(
                f"{rule} learns its feedback matrices as Parameters, made at the first forward "
                "pass: build the optimizer after it, or pass example_input=<a batch> to "
                "biograd.convert to make them now",
                stacklevel=3,
            )
    kwargs: dict[str, Any] = {"hashed_rows": hashed_rows} if layout == "hashed" else {}
    engine = LAYOUTS[layout](
        rule,
        seed=seed,
        norm=norm,
        batch_dims=batch_dims,
        explicit=bool(explicit),
        error=error,
        **kwargs,
    )
    layers[out_name].add_module("direct_feedback", engine)
    model.register_forward_pre_hook(engine.clear_hook)
    for n, layer in layers.items():
        linear = positional(layer)
        layer.register_forward_pre_hook(functools.partial(engine.input_hook, n, linear))
        hook = engine.output_hook if n == out_name else engine.ran_hook
        layer.register_forward_hook(functools.partial(hook, n, linear))
    for n in explicit:
        modules[n].register_forward_hook(functools.partial(engine.point_hook, n))
    if example_input is not None:
        materialise(model, engine, example_input)
    return engine


def materialise(model: nn.Module, engine: DirectFeedback, example_input: Any) -> None:
    """Run ``model`` once on ``example_input`` (eval mode, restored) so that the engine draws its
    feedback now; nothing else changes (no backward pass, no optimizer state)."""
    try:
        with probing(model, grad=True):
            call(model, example_input)
    finally:
        engine.points, engine.targets = [], None


def detach_hooks(model: nn.Module) -> None:
    """Remove every hook that a direct-feedback engine put on ``model``'s modules."""
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for k in [k for k, h in hooks.items() if _engine_of(h) is not None]:
                del hooks[k]


def _engine_of(hook: Any) -> DirectFeedback | None:
    fn = hook.func if isinstance(hook, functools.partial) else hook
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, DirectFeedback) else None


def points_of(model: nn.Module) -> list[str]:
    """The feedback points of a converted model: the materialised ones, else the planned ones
    (the explicit modules, or the inputs of the direct layers but the first in module order)."""
    engine = next((m for m in model.modules() if isinstance(m, DirectFeedback)), None)
    if engine is None:
        return []
    if engine.sizes:
        return list(engine.sizes)
    hooked = {"point": [], "input": []}  # type: dict[str, list[str]]
    for name, mod in model.named_modules():
        for h in (*mod._forward_hooks.values(), *mod._forward_pre_hooks.values()):
            if isinstance(h, functools.partial) and _engine_of(h) is engine:
                if h.func == engine.point_hook:
                    hooked["point"].append(name)
                elif h.func == engine.input_hook:
                    hooked["input"].append(name)
    return hooked["point"] or hooked["input"][1:]
