"""Direct rules: a signal of the output error goes straight to every hidden layer through a fixed
random matrix, ``delta_l = (B_l s(e)) * f'(a_l)`` (Nøkland 2016). The rule is stateless; the
matrices live in the model's direct-feedback engine (:mod:`biograd.direct`)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..errors import BiogradError
from .base import Rule, register


class FeedbackError(BiogradError, RuntimeError):
    """A direct-feedback rule cannot run as set up (missing targets, a point of the wrong size)."""


NO_TARGETS = (
    "drtp needs the targets of every training forward pass: call "
    "biograd.set_targets(model, targets) right before model(inputs)"
)


class DirectRule(Rule):
    """A direct rule: :meth:`signal` maps ``e`` (rows x C) to what the engine projects."""

    direct = True
    exact_input_grad = True  # the layer's own backward is exact; the engine cuts and injects
    # True when the signal does not carry the error's magnitude, hence not a loss scale either.
    scale_free: ClassVar[bool] = False

    @staticmethod
    def signal(e: Tensor, targets: Tensor | None) -> Tensor | None:
        """The signal ``s`` projected onto the feedback points (None: no hidden error)."""
        raise NotImplementedError

    @staticmethod
    def feedback_grad(point: Tensor, s: Tensor) -> Tensor | None:
        """For a rule with ``learned_feedback``: the gradient of a point's matrix ``B_k``
        (``d_k x C``) from the point's activity (``rows x d_k``) and the signal (``rows x C``)."""
        return None


@register
class DFA(DirectRule):
    """Direct feedback alignment: ``s = e``, ``delta_l = (B_l e) * f'(a_l)`` (Nøkland 2016)."""

    name = "dfa"
    paper = "Nøkland 2016"

    @staticmethod
    def signal(e: Tensor, targets: Tensor | None) -> Tensor | None:
        return e


@register
class SignDFA(DirectRule):
    """Sign DFA: ``s = sign(e) / N`` (N rows of ``e``), ``delta_l = (B_l s) * f'(a_l)``. Only the
    sign of the error travels (Frenkel, Lefebvre, Bol 2021, "sDFA"); ``1/N`` restores the scale of
    a mean-reduced loss, which ``sign`` drops."""

    name = "sdfa"
    paper = "Frenkel, Lefebvre, Bol 2021 (sDFA)"
    scale_free = True

    @staticmethod
    def signal(e: Tensor, targets: Tensor | None) -> Tensor | None:
        return torch.sign(e) / e.shape[0]


@register
class DRTP(DirectRule):
    """Direct random target projection: ``s = -y* / N`` with ``y*`` the one-hot target (or a given
    target distribution) and N rows; ``delta_l = (B_l s) * f'(a_l)`` (Frenkel, Lefebvre, Bol 2021:
    the target is a proxy for the sign of the error; ``-y*`` is the target-dependent part of
    softmax cross-entropy's ``e = p - y*``). Targets come through ``biograd.set_targets``."""

    name = "drtp"
    paper = "Frenkel, Lefebvre, Bol 2021"
    needs_targets = True
    scale_free = True

    @staticmethod
    def signal(e: Tensor, targets: Tensor | None) -> Tensor | None:
        if targets is None:
            raise FeedbackError(NO_TARGETS)
        rows, classes = e.shape
        t = targets.to(e.device)
        if t.is_floating_point() and t.shape[-1] == classes and t.numel() == e.numel():
            onehot = t.reshape(rows, classes).to(e.dtype)
        else:
            t = t.reshape(-1).long()
            if t.numel() != rows:
                raise FeedbackError(
                    f"drtp: {t.numel()} targets for an output error of {rows} rows "
                    "(hand over one class index per row, or a (rows, C) target distribution)"
                )
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= classes):
                bad = int(t.max()) if int(t.max()) >= classes else int(t.min())
                raise FeedbackError(
                    f"drtp: target class {bad} is outside 0..{classes - 1} "
                    f"(the output has {classes} classes)"
                )
            onehot = torch.zeros_like(e).scatter_(1, t.unsqueeze(1), 1.0)
        return -onehot / rows


@register
class Shallow(DirectRule):
    """Shallow control: hidden layers receive no error; only the output layer learns."""

    name = "shallow"
    paper = "control (Launay et al. 2019; Frenkel et al. 2021)"
    trains_hidden = False

    @staticmethod
    def signal(e: Tensor, targets: Tensor | None) -> Tensor | None:
        return None
