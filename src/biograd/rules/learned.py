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

import torch
from torch import Tensor
from torch.nn import functional as F

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
