"""Backprop and the feedback-alignment family: the error travels layer by layer through a
feedback matrix B shaped like W, formed in the backward pass from the rule's state and W."""

from __future__ import annotations

import torch
from torch import Tensor

from . import draw
from .base import Rule, in_backward, register, uniform_like


@register
class Backprop(Rule):
    """Exact backpropagation: B = W (Rumelhart et al. 1986)."""

    name = "bp"
    paper = "Rumelhart, Hinton, Williams 1986"
    exact_input_grad = True


@register
class FeedbackAlignment(Rule):
    """Feedback alignment: B fixed and random, drawn once (Lillicrap et al. 2016, Eq. 1).

    B ~ U(-sqrt(3) s, sqrt(3) s) with s from the layer's scale scheme; buffer ``feedback``.
    """

    name = "fa"
    paper = "Lillicrap, Cownden, Tweed, Akerman 2016"

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        return {"feedback": uniform_like(like, self.std, self.seed)}

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        return state[0]


def _scale(like: Tensor, std: float) -> Tensor:
    return torch.tensor(std, dtype=like.dtype, device=like.device)


@register
class UniformSignFeedback(Rule):
    """Uniform sign-concordant feedback: B = s * sign(W), s a fixed per-layer scale (buffer
    ``scale``) (Liao, Leibo, Poggio 2016, "uSF"; Xiao et al. 2018)."""

    name = "usf"
    paper = "Liao, Leibo, Poggio 2016"

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        return {"scale": _scale(like, self.std)}

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        return torch.copysign(state[0], weight)  # one pass over W


@register
class FixedRandomSignFeedback(Rule):
    """Fixed random-magnitude sign-concordant feedback: B = |R| * sign(W), R drawn once (buffer
    ``magnitude`` = |R|) (Liao et al. 2016, "frSF")."""

    name = "frsf"
    paper = "Liao, Leibo, Poggio 2016"

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        return {"magnitude": uniform_like(like, self.std, self.seed).abs()}

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        return torch.copysign(state[0], weight)  # one pass over W and |R|


@register
class BatchRandomSignFeedback(Rule):
    """Batchwise random-magnitude sign-concordant feedback: B = |R_t| * sign(W), R_t redrawn at
    every training forward pass (Liao et al. 2016, "brSF").

    ``t`` is the int64 buffer ``step``, ``key`` an int64 buffer from the layer's seed. |R_t| is
    ``U(0, sqrt(3) s)`` (fa's magnitude) on 256 levels, a counter-based byte per weight keyed by
    (key, t) (:mod:`biograd.rules.draw`) made in the backward on the weight's device: resumed
    runs, devices and DDP ranks draw the same values.
    """

    name = "brsf"
    paper = "Liao, Leibo, Poggio 2016"
    step: Tensor
    advanced: Tensor

    def __init__(self, weight: Tensor, seed: int = 0, scale: str = "xavier") -> None:
        super().__init__(weight, seed, scale)
        # 1 if the last pass advanced ``step`` (a training pass with autograd on), else 0: what
        # a checkpointed segment's recomputation must undo to draw the same R_t. Meaningful
        # within one step only, so not saved.
        self.register_buffer("advanced", torch.zeros_like(self.step), persistent=False)

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        step = torch.zeros((), dtype=torch.int64, device=like.device)
        key = torch.tensor(draw.seed_key(self.seed), dtype=torch.int64, device=like.device)
        return {"scale": _scale(like, self.std), "step": step, "key": key}

    # Eager under torch.compile: a compiled graph hands the backward the step after the increment.
    @torch.compiler.disable
    def pass_state(self, advance: bool) -> tuple[Tensor, ...]:
        if advance and in_backward():
            # Activation checkpointing recomputes a pass: draw its R_t again. Non-reentrant,
            # that pass advanced the step; reentrant, it ran without autograd and did not, so
            # this recomputation is the training pass and advances it. One draw per step.
            step = self.step - self.advanced
            self.step.add_(1 - self.advanced)
            self.advanced.fill_(1)
        else:
            step = self.step.clone()
            self.advanced.fill_(int(advance))
            if advance:
                self.step.add_(1)
        return self.get_buffer("scale"), step, self.get_buffer("key")

    def last_state(self) -> tuple[Tensor, ...]:
        return self.get_buffer("scale"), (self.step - 1).clamp_(min=0), self.get_buffer("key")

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        scale, step, key = state
        k = draw.step_key(key.to(weight.device), step.to(weight.device))
        mag = draw.magnitudes(weight.shape, scale, k, weight.dtype, weight.device)
        return torch.copysign(mag, weight, out=mag)


@register
class KolenPollack(FeedbackAlignment):
    """Kolen-Pollack: B starts random (as in FA) and receives the same gradient as W, so with the
    same optimizer and weight decay B - W decays to 0 (Kolen & Pollack 1994; Akrout et al. 2019,
    Eq. 4). B is the Parameter ``rule.feedback``: an optimizer built after conversion updates it,
    and DDP keeps it in step across ranks.
    """

    name = "kp"
    paper = "Akrout, Wilson, Humphreys, Lillicrap, Tweed 2019"
    learned_feedback = True
    learned = tied_to_weight = ("feedback",)

    def state_grads(self, grad_weight: Tensor | None, *state: Tensor) -> tuple[Tensor | None, ...]:
        return (grad_weight,)
