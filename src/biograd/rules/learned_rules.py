"""The learned-feedback rules: weight mirror (``wm``), product feedback alignment (``pfa``) and
direct Kolen-Pollack (``dkp``); their maths is :mod:`biograd.rules.learned`."""

from __future__ import annotations

import math
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from . import learned as L
from .base import MASK32, Rule, feedback_std, mix32, register, uniform_like
from .direct import DFA
from .feedback import FeedbackAlignment

_MIRROR_SALT = 0x5BD1E995
_PFA_SALT = 0x27D4EB2F


def hashed_uniform(shape: tuple[int, ...], std: float, key: Tensor, dtype: torch.dtype) -> Tensor:
    """U(-sqrt(3) std, sqrt(3) std) entries that are a pure function of the int64 tensor ``key``,
    on its device: ``2 u_i - 1`` scaled, ``u_i = ((mix(mix(i + c) XOR key) >> 8) + 1/2) / 2^24``
    (``c`` = 0x9E3779B9, ``mix`` :func:`biograd.rules.base.mix32`): a counter-based draw in the
    spirit of Salmon et al. 2011, without a generator or a host synchronisation."""
    i = torch.arange(math.prod(shape), device=key.device, dtype=torch.int64)
    h = mix32(mix32(i + 0x9E3779B9) ^ (key & MASK32))
    u = (h >> 8).to(torch.float32).add_(0.5).mul_(2.0**-24).to(dtype).reshape(shape)
    return u.mul_(2.0).sub_(1.0).mul_(math.sqrt(3.0) * std)


@register
class WeightMirror(FeedbackAlignment):
    """Weight mirror (Akrout, Wilson, Humphreys, Lillicrap, Tweed 2019, Sec. 3).

    The input gradient is ``g B`` with ``B`` (buffer ``feedback``) drawn like fa's. After every
    optimizer step :func:`biograd.update_feedback` runs :meth:`update`, the *mirror mode*: ``W``
    is driven with zero-mean noise ``x`` of standard deviation ``noise`` and

        ``B <- B + lr * ((1/R) sum_r y_r x_r^T - decay * B)``,   ``y = W x``

    (:func:`~biograd.rules.learned.mirror_update`, ``R`` samples), so ``B`` relaxes at rate
    ``lr * decay`` towards ``(noise^2 / decay) W``; the decay is the growth control. A
    convolution is driven with noise patches of its receptive field.

    Options (``convert(..., options=...)``): ``lr`` (0.1), ``decay`` (1.0), ``noise`` (1.0),
    ``samples`` (64 per step), ``every`` (1: a mirror step after every ``every``-th optimizer
    step). The int64 buffer ``step`` counts :meth:`update` calls; the noise of call ``t`` is a
    counter-based draw keyed by (layer seed, ``t``) on the weight's device, so DDP ranks make the
    same update and a resumed run continues the same noise sequence.
    """

    name = "wm"
    paper = "Akrout, Wilson, Humphreys, Lillicrap, Tweed 2019"
    updates_after_step = True
    options: ClassVar[tuple[str, ...]] = ("lr", "decay", "noise", "samples", "every")
    feedback: Tensor
    step: Tensor

    def __init__(
        self, weight: Tensor, seed: int = 0, scale: str = "xavier", *, lr: float = 0.1,
        decay: float = 1.0, noise: float = 1.0, samples: int = 64, every: int = 1,
    ) -> None:  # fmt: skip
        self.check_options(samples=samples, every=every)
        super().__init__(weight, seed, scale)
        self.lr, self.decay, self.noise = float(lr), float(decay), float(noise)
        self.samples, self.every = int(samples), int(every)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        for key in ("samples", "every"):
            if key in options and int(options[key]) < 1:
                raise ValueError(f"wm: {key} must be a positive integer, got {options[key]}")

    @classmethod
    def for_layer(
        cls, layer: nn.Module, weight: Tensor, seed: int, scale: str, **options: Any
    ) -> Rule:
        if weight is not layer.weight:
            raise ValueError(
                "wm drives the module's own weight with noise: linear-like modules with a "
                "transposed weight (e.g. transformers' Conv1D) are not supported"
            )
        return cls(weight, seed, scale, **options)

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        step = torch.zeros((), dtype=torch.int64, device=like.device)
        return {**super().initial_state(like), "step": step}

    def pass_state(self, advance: bool) -> tuple[Tensor, ...]:
        return (self.feedback,)

    def mirror_noise(
        self, weight: Tensor, conv: L.ConvArgs | None, step: Tensor
    ) -> tuple[Tensor, L.ConvArgs | None]:
        """The noise batch of mirror step ``step`` and the geometry that drives it."""
        shape, drive = L.mirror_noise_shape(weight, self.samples, conv)
        key = mix32(mix32(step) ^ ((self.seed ^ _MIRROR_SALT) & MASK32))
        return hashed_uniform(shape, self.noise, key.to(weight.device), weight.dtype), drive

    def update(self, layer: nn.Module) -> None:
        """One mirror step (see the class docstring); every ``every``-th call."""
        step = self.step
        if self.every == 1 or int(step) % self.every == 0:
            weight = cast(Tensor, layer.weight).detach()
            with torch.no_grad():
                x, drive = self.mirror_noise(weight, L.conv_args(layer), step)
                y = L.mirror_response(x, weight, drive)
                delta = L.mirror_update(self.feedback, x, y, weight, drive, self.lr, self.decay)
                self.feedback.add_(delta.to(self.feedback.dtype))
        step.add_(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lr={self.lr}, decay={self.decay}, noise={self.noise}, samples={self.samples}, every={self.every}"


B_INITS = ("random", "orthogonal", "identity")
"""How pfa draws its fixed ``B`` (``out x mid`` per group), the options of the authors' code:
``random`` (default) U with std ``1/sqrt(mid)``, so ``E[B B^T] = I``; ``orthogonal``
orthonormal rows (``B B^T = I``; needs ``mid >= out``); ``identity`` ``B = I`` (``ratio`` 1: ``R``
alone is a learned feedback matrix)."""


@register
class ProductFeedbackAlignment(Rule):
    """Product feedback alignment (Li Ji-An & Benna 2024, *Deep learning without weight symmetry*).

    The error reaches the input through a fixed random ``B`` (buffer ``b``: ``out x mid``, ``mid
    = ratio * out``) and a learned ``R`` (Parameter ``r``: ``mid x in``), never ``W^T``:

        ``grad_in = (g B) R``        ``grad_R = (g B)^T x``

    so ``R`` learns like a forward weight whose output error is ``g B``; with weight decay on
    ``R`` the *path* ``B R`` aligns with ``W``. :func:`biograd.feedback_weight` returns ``B R``,
    so :func:`biograd.weight_alignment` reports the path alignment. The op's backward gets ``B
    R`` as the matrix and ``B^T grad_W`` (equal to ``(g B)^T x``) as ``R``'s gradient. For a
    convolution ``R`` is a kernel ``(mid, C_in / groups, *k)`` and ``B`` a grouped 1x1 kernel.

    Options: ``ratio`` (``mid / out``, default 10 as in the authors' CIFAR-10 and ImageNet
    configurations), ``b_init`` (:data:`B_INITS`). ``R`` is drawn like fa's B for ``R``'s shape.
    Like kp, ``R`` learns only through an optimizer built after conversion, with weight decay.
    """

    name = "pfa"
    paper = "Li Ji-An & Benna 2024"
    learned_feedback = True
    learned = ("r",)
    options: ClassVar[tuple[str, ...]] = ("ratio", "b_init")
    b: Tensor
    r: Tensor

    def __init__(
        self, weight: Tensor, seed: int = 0, scale: str = "xavier", *, ratio: int = 10,
        b_init: str = "random", groups: int = 1,
    ) -> None:  # fmt: skip
        self.check_options(ratio=ratio, b_init=b_init)
        self.ratio, self.b_init, self.groups = int(ratio), b_init, int(groups)
        super().__init__(weight, seed, scale)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        ratio, b_init = int(options.get("ratio", 10)), options.get("b_init", "random")
        if b_init not in B_INITS:
            raise ValueError(f"pfa: unknown b_init {b_init!r}; choose one of {', '.join(B_INITS)}")
        if ratio < 1:
            raise ValueError(f"pfa: ratio must be a positive integer, got {ratio}")
        if b_init == "identity" and ratio != 1:
            raise ValueError("pfa: b_init='identity' needs ratio=1")

    @classmethod
    def for_layer(
        cls, layer: nn.Module, weight: Tensor, seed: int, scale: str, **options: Any
    ) -> Rule:
        return cls(weight, seed, scale, groups=int(getattr(layer, "groups", 1)), **options)

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        out, groups = like.shape[0], self.groups
        per_out, per_mid = out // groups, out * self.ratio // groups
        r_like = like.new_empty((out * self.ratio, *like.shape[1:]))
        r = uniform_like(r_like, feedback_std(r_like, self.scheme), self.seed)
        b_shape = (out, per_mid, *[1] * (like.dim() - 2))
        b_seed = (self.seed ^ _PFA_SALT) % 2**62
        if self.b_init == "random":
            b = uniform_like(like.new_empty(b_shape), L.pfa_b_std(per_mid), b_seed)
        elif self.b_init == "identity":
            b = torch.eye(per_out, per_mid, dtype=like.dtype, device=like.device).repeat(groups, 1)
        else:
            gen = torch.Generator().manual_seed(b_seed)
            g = [
                torch.randn(per_mid, per_out, generator=gen, dtype=torch.float64)
                for _ in range(groups)
            ]
            b = torch.cat([torch.linalg.qr(q)[0].t() for q in g]).to(like.device, like.dtype)
        return {"b": b.reshape(b_shape), "r": r}

    def pass_state(self, advance: bool) -> tuple[Tensor, ...]:
        return self.b, self.r

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        b, r = state
        return L.pfa_path(b, r, self.groups)

    def state_grads(self, grad_weight: Tensor | None, *state: Tensor) -> tuple[Tensor | None, ...]:
        if grad_weight is None:
            return (None, None)
        b = state[0].to(grad_weight.dtype)  # autocast: the backward runs in grad_out's dtype
        return (None, L.pfa_r_from_weight_grad(grad_weight, b, self.groups))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ratio={self.ratio}, b_init={self.b_init}"


@register
class DirectKolenPollack(DFA):
    """Direct Kolen-Pollack (Webster, Choi, Ahn 2020): DFA (``delta_l = (B_l e) * f'(a_l)``)
    whose matrices learn. Each ``B_k`` (``d_k x C``) is a Parameter of the direct-feedback
    engine with gradient ``grad_{B_k} = a_k^T e`` (:func:`~biograd.rules.learned.dkp_grad`), the
    Kolen-Pollack update of a direct connection from the point's activity to the output error,
    computed in the same backward pass; the optimizer's weight decay makes it align. DDP
    all-reduces it like any gradient.

    Only the ``dense`` layout: ``shared`` and ``hashed`` reuse stored rows across points, so one
    point's update would change another's feedback. The matrices must exist before the optimizer
    is built: pass ``example_input`` to ``biograd.convert``, or build it after the first forward.
    """

    name = "dkp"
    paper = "Webster, Choi, Ahn 2020"
    learned_feedback = True

    @staticmethod
    def feedback_grad(point: Tensor, s: Tensor) -> Tensor | None:
        return L.dkp_grad(point, s)
