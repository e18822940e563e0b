"""Gradient alignment: on one batch and the same parameters, the rule's weight gradients and
per-sample deltas against backprop's (Launay et al. 2019, Sec. 3), leaving the model as found."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..calls import TARGET_KEY, LossCall, LossFn
from ..convert import converted_layers, exact
from ..direct import DirectFeedback
from ..nn.layers import FeedbackLayer
from ..rules.base import Rule
from .weights import _Pairs, _same_dtype, _wide

NETWORK = "<network>"
"""Layer name of the whole-network row of :func:`gradient_alignment`."""


# --------------------------------------------------------------------------- gradient alignment
@dataclass
class _Snapshot:
    """Everything a measurement pass can change, to put back afterwards."""

    grads: list[tuple[Tensor, Tensor | None]]
    buffers: list[tuple[Tensor, Tensor]]
    versions: list[tuple[str, Tensor, int]]
    engines: list[tuple[DirectFeedback, list[Any], Tensor | None, dict[str, str]]]
    cpu_rng: Tensor
    cuda_rng: list[Tensor] | None = field(default=None)

    @classmethod
    def take(cls, model: nn.Module) -> _Snapshot:
        # Floating rule state (B, scales, direct feedback) is never written by a forward or
        # backward pass: it is checked by version counter instead of copied. Everything else
        # (counters such as brsf's step, batch norm running statistics, user buffers) is copied.
        fixed = {
            id(b)
            for m in model.modules()
            if isinstance(m, (Rule, DirectFeedback))
            for b in m.buffers(recurse=False)
            if b.is_floating_point()
        }
        buffers, versions = [], []
        for name, b in model.named_buffers():
            if id(b) in fixed:
                versions.append((name, b, b._version))
            else:
                buffers.append((b, b.detach().clone()))
        engines = [m for m in model.modules() if isinstance(m, DirectFeedback)]
        return cls(
            grads=[(p, p.grad) for p in model.parameters()],
            buffers=buffers,
            versions=versions,
            engines=[(e, list(e.points), e.targets, dict(e.trains)) for e in engines],
            cpu_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        )

    def restore(self) -> None:
        """Put everything back as it was when the snapshot was taken."""
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        with torch.no_grad():
            for b, saved in self.buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)
        for p, g in self.grads:
            p.grad = g
        for engine, points, targets, trains in self.engines:
            engine.points, engine.targets, engine.trains = points, targets, trains
        for name, b, version in self.versions:
            if b._version != version:
                raise RuntimeError(f"biograd: feedback buffer {name!r} was modified in place")


@dataclass
class _Pass:
    grads: list[Tensor | None]
    deltas: dict[str, list[Tensor | None]]


def _delta_hooks(
    layers: Mapping[str, FeedbackLayer], deltas: dict[str, list[Tensor | None]]
) -> list[Any]:
    """Forward hooks that record, for every call of every layer, the gradient that reaches the
    layer's output in the next backward pass (``dLoss/da``, the layer's delta)."""

    def capture(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.requires_grad:
                calls = deltas[name]
                index = len(calls)
                calls.append(None)

                def store(g: Tensor | None) -> None:
                    if g is not None:
                        calls[index] = g.detach()

                out.register_hook(store)

        return hook

    return [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]


def _run_pass(setup: _Setup, batch: LossCall) -> _Pass:
    deltas: dict[str, list[Tensor | None]] = {name: [] for name in setup.layers}
    handles = _delta_hooks(setup.layers, deltas)
    try:
        with torch.enable_grad():
            loss = batch(setup.model)
            grads = torch.autograd.grad(loss, setup.params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return _Pass(list(grads), deltas)


@dataclass
class _Setup:
    """The converted layers and trainable parameters that a measurement compares."""

    model: nn.Module
    layers: dict[str, FeedbackLayer]
    params: list[Tensor]
    weights: dict[str, int]  # layer name -> index of its weight in params

    @classmethod
    def of(cls, model: nn.Module) -> _Setup:
        layers = dict(converted_layers(model))
        if not layers:
            raise ValueError(
                "gradient_alignment: the model has no converted layer; use biograd.convert"
            )
        feedback = {id(p) for m in model.modules() if isinstance(m, Rule) for p in m.parameters()}
        params: list[Tensor] = [
            p for p in model.parameters() if p.requires_grad and id(p) not in feedback
        ]
        index = {id(p): i for i, p in enumerate(params)}
        weights = {n: index[id(m.weight)] for n, m in layers.items() if id(m.weight) in index}
        return cls(model, layers, params, weights)


def _isolated_pass(setup: _Setup, batch: LossCall, bp: bool) -> _Pass:
    """One side of a measurement, the rule's or (``bp``) backprop's, leaving the model as found:
    both sides start from the same RNG state and brsf step."""
    snap = _Snapshot.take(setup.model)
    try:
        with exact(setup.model) if bp else contextlib.nullcontext():
            return _run_pass(setup, batch)
    finally:
        snap.restore()


def _delta_cosines(rule: list[Tensor | None], bp: list[Tensor | None]) -> tuple[float, float]:
    """Mean and standard deviation over samples of ``cos(delta_rule_i, delta_bp_i)``; each call
    of the layer contributes its samples (first dimension); samples where either delta is zero
    are left out."""
    cosines: list[float] = []
    for r, b in zip(rule, bp):
        if r is None or b is None:
            continue
        r2, b2 = _same_dtype(_wide(r).view(r.shape[0], -1), _wide(b).view(b.shape[0], -1))
        norms = torch.linalg.vector_norm(r2, dim=1) * torch.linalg.vector_norm(b2, dim=1)
        cosines += (torch.linalg.vecdot(r2, b2) / norms).tolist()
    # NaN (0/0) where a delta is zero; float32 rounding can step just outside [-1, 1]
    cosines = [min(1.0, max(-1.0, c)) for c in cosines if math.isfinite(c)]
    if not cosines:
        return math.nan, math.nan
    mean = math.fsum(cosines) / len(cosines)
    return mean, math.sqrt(math.fsum((c - mean) ** 2 for c in cosines) / len(cosines))


def gradient_alignment(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    inputs: Any = None,
    targets: Any = None,
    *,
    closure: Callable[[], Any] | None = None,
    target_key: str | int | None = TARGET_KEY,
) -> dict[str, dict[str, float]]:
    """How far the rule's updates are from backprop's on one batch, layer by layer.

    The model runs the batch on its rules and under ``biograd.exact(model)`` (the same model),
    both from the same RNG state and brsf step, so dropout masks and brsf's ``B_t`` are those of
    the rule's own training step. Gradients come from ``torch.autograd.grad``; afterwards every
    ``.grad``, buffer, RNG state (CPU, and CUDA when initialised), brsf step and the direct
    engine's pending state are as they were. ``drtp`` gets ``targets`` (or the batch's
    ``target_key`` entry) through ``biograd.set_targets`` before each forward.

    Args:
        model: a model converted with ``biograd.convert``, in train or eval mode.
        loss_fn: ``loss_fn(output, targets)`` returns the scalar loss of the model's output
            (``loss_fn(output, inputs)`` when ``targets`` is None); None reads the loss off the
            output, ``output.loss`` or ``output["loss"]`` (a Hugging Face model given labels).
        inputs: the batch: a tensor (one positional input), a tuple of positional inputs, a
            mapping of keyword inputs (a Hugging Face batch), or a ``biograd.Call``.
        targets: whatever ``loss_fn`` takes as its second argument; None for the batch.
        closure: instead of ``loss_fn`` and ``inputs``, a function that runs the forward pass
            and returns the loss (or an output carrying it), e.g. a Lightning module's
            ``lambda: module.training_step(batch, 0)``.
        target_key: the batch entry that holds ``drtp``'s targets when ``targets`` is None: a
            keyword (str, ``labels`` by default) or positional index (int).

    Returns:
        Per converted layer ``{"angle", "delta_cos_mean", "delta_cos_std"}``: the angle in
        degrees between the rule's and backprop's gradient of ``layer.weight``, and the mean and
        standard deviation over samples of the cosine between the rule's and backprop's
        ``dLoss/d(layer output)`` (Launay et al. 2019, Sec. 3); and under ``"<network>"``
        ``{"angle"}``, the angle between the concatenated gradients of all trainable parameters
        (Kolen-Pollack's feedback excluded). NaN where a quantity is undefined (a zero
        gradient, e.g. the hidden layers of ``shallow``).
    """
    batch = LossCall(loss_fn, inputs, targets, closure=closure, target_key=target_key)
    setup = _Setup.of(model)
    rule = _isolated_pass(setup, batch, False)
    return _compare(setup, rule, _isolated_pass(setup, batch, True))


def _compare(setup: _Setup, rule: _Pass, bp: _Pass) -> dict[str, dict[str, float]]:
    per_param: list[_Pairs | None] = []
    for r, b in zip(rule.grads, bp.grads):
        if r is None and b is None:
            per_param.append(None)
            continue
        if r is None:
            assert b is not None
            r = torch.zeros_like(b)
        elif b is None:
            b = torch.zeros_like(r)
        per_param.append(_Pairs([(r, b)]))
    result: dict[str, dict[str, float]] = {}
    for name in setup.layers:
        i = setup.weights.get(name)
        pair = per_param[i] if i is not None else None
        mean, std = _delta_cosines(rule.deltas[name], bp.deltas[name])
        result[name] = {
            "angle": pair.angle() if pair is not None else math.nan,
            "delta_cos_mean": mean,
            "delta_cos_std": std,
        }
    result[NETWORK] = {"angle": _Pairs.join([p for p in per_param if p is not None]).angle()}
    return result
