"""Backprop and the feedback-alignment family: rules where the error travels layer by layer
through a feedback matrix B shaped like W (DESIGN.md, Notation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from .base import Rule, feedback_std, register, uniform_like

if TYPE_CHECKING:
    from ..nn.layers import FeedbackLayer


class Backprop(Rule):
    """Exact backpropagation: B = W (Rumelhart et al. 1986)."""

    name = "bp"
    paper = "Rumelhart, Hinton, Williams 1986"


class FeedbackAlignment(Rule):
    """Feedback alignment: B fixed and random, drawn once (Lillicrap et al. 2016, Eq. 1).

    B ~ U(-sqrt(3) s, sqrt(3) s) with s from the layer's scale scheme.
    """

    name = "fa"
    paper = "Lillicrap, Cownden, Tweed, Akerman 2016"

    def setup(self, layer: FeedbackLayer, seed: int, scale: str) -> None:
        w = layer.weight
        layer.register_buffer("feedback", uniform_like(w, feedback_std(w, scale), seed))

    def feedback(self, layer: FeedbackLayer) -> Tensor | None:
        return layer.feedback


class UniformSignFeedback(Rule):
    """Uniform sign-concordant feedback: B = s * sign(W), s a fixed per-layer scale
    (Liao, Leibo, Poggio 2016, "uSF"; Xiao et al. 2018)."""

    name = "usf"
    paper = "Liao, Leibo, Poggio 2016"

    def setup(self, layer: FeedbackLayer, seed: int, scale: str) -> None:
        std = feedback_std(layer.weight, scale)
        layer.register_buffer(
            "feedback_scale",
            torch.tensor(std, dtype=layer.weight.dtype, device=layer.weight.device),
        )

    def feedback(self, layer: FeedbackLayer) -> Tensor | None:
        return torch.sign(layer.weight.detach()).mul_(layer.feedback_scale)


class FixedRandomSignFeedback(Rule):
    """Fixed random-magnitude sign-concordant feedback: B = |R| * sign(W), R drawn once
    (Liao et al. 2016, "frSF")."""

    name = "frsf"
    paper = "Liao, Leibo, Poggio 2016"

    def setup(self, layer: FeedbackLayer, seed: int, scale: str) -> None:
        w = layer.weight
        layer.register_buffer(
            "feedback_magnitude", uniform_like(w, feedback_std(w, scale), seed).abs()
        )

    def feedback(self, layer: FeedbackLayer) -> Tensor | None:
        return torch.sign(layer.weight.detach()).mul_(layer.feedback_magnitude)


class BatchRandomSignFeedback(Rule):
    """Batchwise random-magnitude sign-concordant feedback: B = |R_t| * sign(W), R_t redrawn at
    every forward pass (Liao et al. 2016, "brSF").

    R_t comes from a per-layer generator seeded with (layer seed, t); ``t`` counts the layer's
    training forward passes and is saved in ``state_dict`` (extra state), so a resumed run draws
    the same R_t as an uninterrupted one, and every DDP rank draws the same values.
    """

    name = "brsf"
    paper = "Liao, Leibo, Poggio 2016"
    _MIX: ClassVar[int] = 0x9E3779B97F4A7C15

    def setup(self, layer: FeedbackLayer, seed: int, scale: str) -> None:
        layer.register_buffer(
            "feedback_scale",
            torch.tensor(
                feedback_std(layer.weight, scale),
                dtype=layer.weight.dtype,
                device=layer.weight.device,
            ),
        )

    # Runs eagerly under torch.compile: the draw depends on a Python counter and a generator,
    # which would otherwise recompile the graph at every step.
    @torch.compiler.disable
    def feedback(self, layer: FeedbackLayer) -> Tensor | None:
        w = layer.weight.detach()
        step = layer.feedback_step
        if layer.training and torch.is_grad_enabled():
            layer.feedback_step = step + 1
        gen = layer._feedback_generator(w.device)
        gen.manual_seed((layer.feedback_seed + step * self._MIX) % (2**63))
        r = torch.rand(w.shape, generator=gen, device=w.device, dtype=w.dtype)
        # |U(-a, a)| is U(0, a): the magnitudes of the same distribution as fa's B.
        return r.mul_(torch.sign(w)).mul_(3.0**0.5 * layer.feedback_scale)


class KolenPollack(Rule):
    """Kolen-Pollack: B starts random (as in FA) and receives the same gradient as W, so with the
    same optimizer and weight decay B - W decays to 0 (Kolen & Pollack 1994; Akrout et al. 2019,
    Eq. 4).

    B is registered as a *Parameter* named ``feedback`` because it learns: any torch optimizer
    built from ``model.parameters()`` after conversion updates it with W's gradient and W's
    weight decay, and DDP keeps it in step across ranks.
    """

    name = "kp"
    paper = "Akrout, Wilson, Humphreys, Lillicrap, Tweed 2019"

    def setup(self, layer: FeedbackLayer, seed: int, scale: str) -> None:
        w = layer.weight
        layer.register_parameter(
            "feedback",
            nn.Parameter(
                uniform_like(w, feedback_std(w, scale), seed), requires_grad=w.requires_grad
            ),
        )

    def feedback(self, layer: FeedbackLayer) -> Tensor | None:
        return layer.feedback


for _rule in (
    Backprop(),
    FeedbackAlignment(),
    UniformSignFeedback(),
    FixedRandomSignFeedback(),
    BatchRandomSignFeedback(),
    KolenPollack(),
):
    register(_rule)
