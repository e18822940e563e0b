"""The maths of the learned-feedback rules, as pure functions of tensors (no modules, no state).

Shapes follow ``torch``: a linear layer's weight ``W`` is ``(out, in)`` and acts on the last
dimension of an input of any rank, a convolution's weight is ``(C_out, C_in / groups, *kernel)``.
Feedback matrices are stored **shaped like the forward weight** (the input gradient of a rule of
the feedback-alignment family is ``g B`` where backprop's is ``g W``). For a convolution, ``conv``
carries the layer's stride, padding, dilation and groups; ``None`` means a linear layer.

- weight mirror (``wm``): :func:`mirror_response`, :func:`mirror_correlation`,
  :func:`mirror_update` (Akrout, Wilson, Humphreys, Lillicrap, Tweed 2019, Sec. 3);
- product feedback alignment (``pfa``): :func:`pfa_input_grad`, :func:`pfa_r_grad`,
  :func:`pfa_path` (Li Ji-An & Benna 2024);
- direct Kolen-Pollack (``dkp``): :func:`dkp_grad` (Webster, Choi, Ahn 2020).

``docs/rules.md`` states every update with its source; ``tests/test_learned.py`` checks each
function against an independent computation of the formula (autograd on the explicit expression,
or a loop over output positions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import MASK32, Rule, feedback_std, mix32, register, uniform_like
from .direct import DirectRule

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class ConvArgs:
    """The geometry of a convolution (explicit symmetric padding)."""

    stride: Sequence[int]
    padding: Sequence[int]
    dilation: Sequence[int]
    groups: int = 1

    @classmethod
    def plain(cls, dims: int, groups: int = 1) -> ConvArgs:
        """Stride 1, no padding, no dilation."""
        return cls((1,) * dims, (0,) * dims, (1,) * dims, groups)


def _rows(t: Tensor) -> Tensor:
    """A linear layer's input or output as ``(rows, features)``."""
    return t.reshape(-1, t.shape[-1])


def forward(x: Tensor, weight: Tensor, conv: ConvArgs | None) -> Tensor:
    """``W x`` without bias: ``x W^T`` for a linear layer, the convolution otherwise."""
    if conv is None:
        return F.linear(x, weight)
    c = conv
    return _CONV[weight.dim() - 2](x, weight, None, c.stride, c.padding, c.dilation, c.groups)


def input_grad(g: Tensor, weight: Tensor, x_shape: Sequence[int], conv: ConvArgs | None) -> Tensor:
    """``g W``: the gradient reaching the input of ``x -> W x`` from the output gradient ``g``
    (for a convolution, the transposed convolution with kernel ``weight``)."""
    if conv is None:
        return g.matmul(weight)
    c = conv
    empty = g.new_empty(tuple(x_shape))
    out: Tensor = torch.ops.aten.convolution_backward(
        g, empty, weight, None, list(c.stride), list(c.padding), list(c.dilation), False,
        [0] * len(c.stride), c.groups, [True, False, False],
    )[0]  # fmt: skip
    return out


def weight_grad(x: Tensor, g: Tensor, weight_shape: Sequence[int], conv: ConvArgs | None) -> Tensor:
    """``sum_r g_r x_r^T``: the gradient of ``<g, W x>`` with respect to ``W`` (every output
    position ``r`` of a convolution pairs its output ``g_r`` with its input patch ``x_r``)."""
    if conv is None:
        return _rows(g).t().matmul(_rows(x))
    c = conv
    empty = g.new_empty(tuple(weight_shape))
    out: Tensor = torch.ops.aten.convolution_backward(
        g, x, empty, None, list(c.stride), list(c.padding), list(c.dilation), False,
        [0] * len(c.stride), c.groups, [False, True, False],
    )[1]  # fmt: skip
    return out


def output_positions(y: Tensor, conv: ConvArgs | None) -> int:
    """Rows of a layer output ``y``: samples times leading dimensions (linear) or samples times
    spatial output positions (convolution)."""
    return y.numel() // (y.shape[-1] if conv is None else y.shape[1])


# --------------------------------------------------------------------------- weight mirror
def mirror_noise_shape(
    weight: Tensor, samples: int, conv: ConvArgs | None
) -> tuple[tuple[int, ...], ConvArgs | None]:
    """Shape of a mirror-mode noise batch for a layer, and the geometry to drive it with.

    Linear: ``(samples, in)``. Convolution: ``samples`` noise patches of the kernel's receptive
    field ``dilation * (k - 1) + 1`` per dimension, driven with stride 1 and no padding, so every
    sample gives one output position whose patch is pure noise (no zero padding at a border,
    hence ``E[correlation] = sigma^2 W`` exactly)."""
    if conv is None:
        return (samples, weight.shape[1]), None
    ks = weight.shape[2:]
    extent = tuple(d * (k - 1) + 1 for d, k in zip(conv.dilation, ks))
    shape = (samples, weight.shape[1] * conv.groups, *extent)
    dims = len(ks)
    return shape, ConvArgs((1,) * dims, (0,) * dims, tuple(conv.dilation), conv.groups)


def mirror_response(noise: Tensor, weight: Tensor, conv: ConvArgs | None) -> Tensor:
    """``y = W x``: the layer's response to mirror-mode noise ``x`` (Akrout et al. 2019, Sec. 3:
    in mirror mode the forward neurons are driven by noise and their outputs are read by the
    feedback synapses). The bias is left out: with zero-mean noise its contribution to the
    correlation is zero in expectation, and leaving it out removes its sampling noise."""
    return forward(noise, weight, conv)


def mirror_correlation(noise: Tensor, y: Tensor, weight: Tensor, conv: ConvArgs | None) -> Tensor:
    """``(1/R) sum_r y_r x_r^T``, shaped like ``W``: the Hebbian product of the layer's output
    ``y`` and its input ``x`` averaged over the ``R`` output positions. For ``y = W x`` and noise
    with covariance ``sigma^2 I`` its expectation is ``sigma^2 W``."""
    return weight_grad(noise, y, weight.shape, conv) / output_positions(y, conv)


def mirror_update(
    feedback: Tensor,
    noise: Tensor,
    y: Tensor,
    weight: Tensor,
    conv: ConvArgs | None,
    lr: float,
    decay: float,
) -> Tensor:
    """The weight-mirror step ``Delta B = eta (corr(x, y) - lambda B)`` (returned, not applied).

    Akrout et al. 2019, Sec. 3: the feedback matrix learns the Hebbian product of the noise ``x``
    driving a layer and the layer's response ``y = W x`` (``Delta B = eta x y^T`` in their
    orientation, ``B`` transposed to ours), which in expectation is ``eta sigma^2 W``; weight
    decay ``-eta lambda B`` keeps ``||B||`` bounded. In expectation ``B`` relaxes towards the
    fixed point ``B* = (sigma^2 / lambda) W``: the direction of ``W`` (angle 0) with the norm
    ratio ``sigma^2 / lambda``, reached at rate ``eta lambda`` per step."""
    return lr * (mirror_correlation(noise, y, weight, conv) - decay * feedback)


# --------------------------------------------------------------------------- product feedback
def pfa_mid(g: Tensor, feedback_b: Tensor, conv: ConvArgs | None) -> Tensor:
    """``g B``: the output gradient carried to the ``mid`` feedback neurons by the fixed ``B``
    (linear: ``(out, mid)``; convolution: a 1x1 kernel ``(C_out, mid / groups, 1, ...)`` applied
    per output position, grouped like the layer)."""
    if conv is None:
        return g.matmul(feedback_b)
    groups = conv.groups
    mid = feedback_b.shape[1] * groups
    dims = g.dim() - 2
    return input_grad(g, feedback_b, (g.shape[0], mid, *g.shape[2:]), ConvArgs.plain(dims, groups))


def pfa_input_grad(
    g: Tensor, feedback_b: Tensor, feedback_r: Tensor, x_shape: Sequence[int], conv: ConvArgs | None
) -> Tensor:
    """``grad_in = (g B) R``: product feedback alignment's input gradient (Li & Benna 2024): the
    output gradient ``g`` reaches the input through the fixed random ``B`` (``out x mid``) and
    the learned ``R`` (``mid x in``, for a convolution a kernel ``(mid, C_in / groups, *k)`` with
    the layer's geometry), so the path ``B R`` stands where backprop has ``W``."""
    return input_grad(pfa_mid(g, feedback_b, conv), feedback_r, x_shape, conv)


def pfa_r_grad(
    g: Tensor, feedback_b: Tensor, x: Tensor, r_shape: Sequence[int], conv: ConvArgs | None
) -> Tensor:
    """``grad_R = (g B)^T x`` (Li & Benna 2024): ``R`` learns like a forward weight from the
    layer's input ``x`` to the ``mid`` neurons whose error is ``g B``; with weight decay on ``R``
    the path ``B R`` aligns with ``W``."""
    return weight_grad(x, pfa_mid(g, feedback_b, conv), r_shape, conv)


def pfa_r_from_weight_grad(grad_weight: Tensor, feedback_b: Tensor, groups: int = 1) -> Tensor:
    """``grad_R = B^T grad_W``: the same ``(g B)^T x`` as :func:`pfa_r_grad`, from the layer's
    exact weight gradient ``grad_W = g^T x`` (``B`` mixes output units at each position, so it
    factors out of the sum over rows and positions); one ``(mid x out) (out x in k)`` product
    per group instead of a second pass over the batch."""
    if grad_weight.dim() == 2:
        return feedback_b.t().matmul(grad_weight)
    out = grad_weight.shape[0]
    b = feedback_b.reshape(groups, out // groups, feedback_b.shape[1])
    gw = grad_weight.reshape(groups, out // groups, -1)
    mid = feedback_b.shape[1] * groups
    return torch.bmm(b.transpose(1, 2), gw).reshape(mid, *grad_weight.shape[1:])


def pfa_path(feedback_b: Tensor, feedback_r: Tensor, groups: int = 1) -> Tensor:
    """``B R`` shaped like ``W``: the matrix (or kernel) the input gradient of ``pfa`` uses in
    ``W``'s place; its angle to ``W`` is the *path alignment* of Li & Benna 2024."""
    if feedback_r.dim() == 2:
        return feedback_b.matmul(feedback_r)
    out = feedback_b.shape[0]
    b = feedback_b.reshape(groups, out // groups, feedback_b.shape[1])
    r = feedback_r.reshape(groups, feedback_r.shape[0] // groups, -1)
    return torch.bmm(b, r).reshape(out, *feedback_r.shape[1:])


def pfa_b_std(mid: int) -> float:
    """Standard deviation of ``B``'s entries: ``1 / sqrt(mid)``, so that ``E[B B^T] = I``
    (``mid`` the feedback neurons per output unit's group, i.e. ``B.shape[1]``); the scale of
    the Xavier-uniform draw with gain ``sqrt((1 + 1/r) / 2)`` of the authors' code."""
    return 1.0 / math.sqrt(mid)


# --------------------------------------------------------------------------- direct Kolen-Pollack
def dkp_grad(point: Tensor, e: Tensor) -> Tensor:
    """``grad_{B_k} = a_k^T e`` (Webster, Choi, Ahn 2020): the feedback matrix ``B_k``
    (``d_k x C``) of a direct feedback point receives the Kolen-Pollack update of a direct
    forward connection from the point's activity ``a_k`` (``rows x d_k``) to the output error
    ``e`` (``rows x C``); with weight decay on ``B_k``, ``B_k e`` moves towards the error that
    such a connection would carry back. Any batch reduction is already in ``e`` (autograd's
    ``1/N`` of a mean loss)."""
    return point.reshape(e.shape[0], -1).t().matmul(e.to(point.dtype))


# --------------------------------------------------------------------------- the rules
def hashed_uniform(shape: torch.Size, key: Tensor, dtype: torch.dtype) -> Tensor:
    """U(0, 1) entries of ``shape`` that are a pure function of the int64 tensor ``key``:
    ``u_i = ((mix(mix(i + c) XOR key) >> 8) + 1/2) / 2^24`` (``c`` = 0x9E3779B9) on ``key``'s
    device, never 0, with no generator object and no host synchronisation (a counter-based draw
    in the spirit of Salmon et al. 2011)."""
    i = torch.arange(math.prod(shape), device=key.device, dtype=torch.int64)
    h = mix32(mix32(i + 0x9E3779B9) ^ (key & MASK32))
    return (h >> 8).to(torch.float32).add_(0.5).mul_(2.0**-24).to(dtype).reshape(shape)


def _uniform(shape: Sequence[int], std: float, key: Tensor, dtype: torch.dtype) -> Tensor:
    """U(-sqrt(3) std, sqrt(3) std) entries (zero mean, standard deviation ``std``) that are a
    pure function of ``key`` (:func:`hashed_uniform`), on ``key``'s device."""
    u = hashed_uniform(torch.Size(shape), key, dtype)
    return u.mul_(2.0).sub_(1.0).mul_(math.sqrt(3.0) * std)


@register
class WeightMirror(Rule):
    """Weight mirror (Akrout, Wilson, Humphreys, Lillicrap, Tweed 2019, Sec. 3).

    The input gradient is ``g B`` as in feedback alignment, with ``B`` (buffer ``feedback``,
    shaped like ``W``) drawn like fa's. After every optimizer step :func:`biograd.update_feedback`
    calls :meth:`update`, which runs the layer in *mirror mode*: it drives ``W`` with zero-mean
    noise ``x`` of standard deviation ``noise`` and applies

        ``B <- B + lr * ((1/R) sum_r y_r x_r^T - decay * B)``,   ``y = W x``

    (:func:`mirror_update`; ``R`` noise samples). In expectation ``B`` relaxes at rate
    ``lr * decay`` towards ``(noise^2 / decay) W``; the decay is the growth control that keeps
    ``||B||`` bounded. A convolution is driven with noise patches of its receptive field (one
    output position each, :func:`mirror_noise_shape`).

    Options (attributes of ``layer.rule``, set with :func:`configure` or ``convert(...,
    options=...)``): ``lr`` (0.1), ``decay`` (1.0: ``B -> W`` with unit noise), ``noise`` (1.0),
    ``samples`` (64 noise samples per step), ``every`` (1: a mirror step after every optimizer
    step; ``k``: after every ``k``-th). The int64 buffer ``step`` counts the calls of
    :meth:`update`; the noise of call ``t`` is a counter-based draw keyed by (layer seed, ``t``),
    made on the weight's device, so every DDP rank (same ``W``, same ``t``) makes the same
    update and a resumed run continues the same noise sequence.
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

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        step = torch.zeros((), dtype=torch.int64, device=like.device)
        return {"feedback": uniform_like(like, self.std, self.seed), "step": step}

    def pass_state(self, advance: bool) -> tuple[Tensor, ...]:
        return (self.feedback,)

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        return state[0]

    def mirror_noise(
        self, weight: Tensor, conv: ConvArgs | None, step: Tensor
    ) -> tuple[Tensor, ConvArgs | None]:
        """The noise batch of mirror step ``step`` and the geometry that drives it."""
        shape, drive = mirror_noise_shape(weight, self.samples, conv)
        key = mix32(mix32(step) ^ ((self.seed ^ _MIRROR_SALT) & 0xFFFFFFFF))
        return _uniform(shape, self.noise, key.to(weight.device), weight.dtype), drive

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

    def update(self, layer: nn.Module) -> None:
        """One mirror step (see the class docstring); every ``every``-th call."""
        step = self.step
        if self.every > 1 and int(step) % self.every != 0:
            step.add_(1)
            return
        weight = cast(Tensor, layer.weight).detach()
        with torch.no_grad():
            conv = conv_args(layer)
            x, drive = self.mirror_noise(weight, conv, step)
            y = mirror_response(x, weight, drive)
            self.feedback.add_(
                mirror_update(self.feedback, x, y, weight, drive, self.lr, self.decay).to(
                    self.feedback.dtype
                )
            )
            step.add_(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lr={self.lr}, decay={self.decay}, noise={self.noise}, samples={self.samples}, every={self.every}"


_MIRROR_SALT = 0x5BD1E995


def conv_args(layer: nn.Module) -> ConvArgs | None:
    """The convolution geometry of a layer (``None`` for ``nn.Linear``)."""
    if isinstance(layer, nn.Linear):
        return None
    m: Any = layer
    padding = m.padding if not isinstance(m.padding, str) else (0,) * len(m.kernel_size)
    return ConvArgs(tuple(m.stride), tuple(padding), tuple(m.dilation), int(m.groups))


B_INITS = ("random", "orthogonal", "identity")
"""How pfa draws its fixed ``B`` (``out x mid`` per group): ``random`` (default) U with standard
deviation ``1/sqrt(mid)`` so that ``E[B B^T] = I``; ``orthogonal`` orthonormal rows (``B B^T =
I`` exactly; needs ``mid >= out``); ``identity`` ``B = I`` (``ratio`` must be 1: then ``R`` alone
is a learned feedback matrix). The three options of the authors' code (``expand_ratio`` a number,
``"ortho"``, ``"id"``)."""


@register
class ProductFeedbackAlignment(Rule):
    """Product feedback alignment (Li Ji-An & Benna 2024, *Deep learning without weight symmetry*).

    The error reaches the layer's input through two matrices, neither of which is ``W^T``: a fixed
    random ``B`` (buffer ``b``: ``out x mid``, ``mid = ratio * out``) from the output units to
    ``mid`` feedback neurons, and a learned ``R`` (Parameter ``r``: ``mid x in``) from those to
    the input units:

        ``grad_in = (g B) R``        ``grad_R = (g B)^T x``  (:func:`pfa_input_grad`, :func:`pfa_r_grad`)

    so ``R`` learns like a forward weight whose output error is ``g B``; with weight decay on
    ``R`` (the authors' "PFA with weight decay"), the *path* ``B R`` aligns with ``W``.
    :func:`biograd.feedback_weight` returns ``B R`` (shaped like ``W``), so
    :func:`biograd.weight_alignment` reports the *path alignment*, the angle between ``B R`` and
    ``W``. In the op's backward the rule hands ``B R`` as the matrix and ``B^T grad_W`` as
    ``R``'s gradient (:func:`pfa_r_from_weight_grad`, equal to ``(g B)^T x``).

    For a convolution ``R`` is a kernel ``(mid, C_in / groups, *k)`` with the layer's geometry
    and ``B`` a 1x1 kernel ``(C_out, mid / groups, 1, ...)`` (grouped like the layer); ``B R`` is
    then a kernel shaped like ``W``.

    Options: ``ratio`` (expansion ratio ``mid / out``, default 10 as in the authors' CIFAR-10 and
    ImageNet configurations), ``b_init`` (:data:`B_INITS`). ``R`` is drawn like fa's B with the
    layer's scale scheme applied to ``R``'s shape. Like kp, ``R`` learns only through an optimizer
    built after conversion, and needs weight decay to align.
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

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        ratio, b_init, groups = self.ratio, self.b_init, self.groups
        out = like.shape[0]
        mid = out * ratio
        per_out, per_mid = out // groups, mid // groups
        b_shape = (out, per_mid) if like.dim() == 2 else (out, per_mid, *[1] * (like.dim() - 2))
        r_like = like.new_empty((mid, *like.shape[1:]))
        r = uniform_like(r_like, feedback_std(r_like, self.scheme), self.seed)
        b_seed = (self.seed ^ _PFA_SALT) % 2**62
        if b_init == "random":
            b = uniform_like(like.new_empty(b_shape), pfa_b_std(per_mid), b_seed)
        elif b_init == "identity":
            b = torch.eye(per_out, per_mid, dtype=like.dtype, device=like.device).repeat(groups, 1)
        else:
            gen = torch.Generator().manual_seed(b_seed)
            blocks = []
            for _ in range(groups):
                g = torch.randn(per_mid, per_out, generator=gen, dtype=torch.float64)
                q, _ = torch.linalg.qr(g)  # per_mid x per_out, orthonormal columns
                blocks.append(q.t())
            b = torch.cat(blocks).to(like.device, like.dtype)
        return {"b": b.reshape(b_shape), "r": r}

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

    def pass_state(self, advance: bool) -> tuple[Tensor, ...]:
        return self.b, self.r

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        b, r = state
        return pfa_path(b, r, self.groups)

    def state_grads(self, grad_weight: Tensor | None, *state: Tensor) -> tuple[Tensor | None, ...]:
        if grad_weight is None:
            return (None, None)
        b = state[0].to(grad_weight.dtype)  # autocast: the backward runs in grad_out's dtype
        return (None, pfa_r_from_weight_grad(grad_weight, b, self.groups))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ratio={self.ratio}, b_init={self.b_init}"


_PFA_SALT = 0x27D4EB2F


@register
class DirectKolenPollack(DirectRule):
    """Direct Kolen-Pollack (Webster, Choi, Ahn 2020): DFA whose feedback matrices learn.

    As in ``dfa``, each feedback point ``k`` receives ``B_k e`` (``delta_l = (B_l e) * f'(a_l)``);
    each ``B_k`` (``d_k x C``) is a *Parameter* of the direct-feedback engine whose gradient is
    the Kolen-Pollack update of a direct connection from the point's activity ``a_k`` to the
    output error, ``grad_{B_k} = a_k^T e`` (:func:`dkp_grad`), computed in the same backward
    pass. The optimizer applies it with its learning rate and weight decay (weight decay is what
    makes Kolen-Pollack align; without it ``B_k`` only accumulates ``a^T e``). DDP all-reduces
    these gradients like any other, so every rank keeps the same ``B_k``.

    Only the ``dense`` layout: ``shared`` and ``hashed`` reuse the same stored rows for several
    points (and, hashed, for several rows of one point), so one point's update would change the
    others' feedback and no ``B_k`` could follow its own path. The matrices must exist before the
    optimizer is built: pass ``example_input`` to ``biograd.convert``, or build the optimizer
    after the first forward pass.
    """

    name = "dkp"
    paper = "Webster, Choi, Ahn 2020"
    learned_feedback = True

    @staticmethod
    def signal(e: Tensor, targets: Tensor | None) -> Tensor | None:
        return e

    @staticmethod
    def feedback_grad(point: Tensor, s: Tensor) -> Tensor | None:
        return dkp_grad(point, s)
