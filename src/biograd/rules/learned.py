"""The maths of the learned-feedback rules (:mod:`biograd.rules.learned_rules`) as pure functions
of tensors: weight mirror (``wm``; Akrout, Wilson, Humphreys, Lillicrap, Tweed 2019, Sec. 3),
product feedback alignment (``pfa``; Li Ji-An & Benna 2024) and direct Kolen-Pollack (``dkp``;
Webster, Choi, Ahn 2020).

A linear weight ``W`` is ``(out, in)`` and acts on the last dimension of an input of any rank; a
convolution's is ``(C_out, C_in / groups, *kernel)``, with ``conv`` its geometry (``None``: a
linear layer). Feedback matrices are shaped like ``W`` (the input gradient is ``g B`` where
backprop's is ``g W``). ``docs/rules.md`` states every update with its source;
``tests/test_learned.py`` checks each function against an independent computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
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
    def plain(cls, dims: int, groups: int = 1, dilation: Sequence[int] | None = None) -> ConvArgs:
        """Stride 1, no padding, ``dilation`` (default none)."""
        return cls((1,) * dims, (0,) * dims, tuple(dilation or (1,) * dims), groups)


def conv_args(layer: nn.Module) -> ConvArgs | None:
    """The convolution geometry of a layer (``None`` for ``nn.Linear``)."""
    if isinstance(layer, nn.Linear):
        return None
    m: Any = layer
    padding = m.padding if not isinstance(m.padding, str) else (0,) * len(m.kernel_size)
    return ConvArgs(tuple(m.stride), tuple(padding), tuple(m.dilation), int(m.groups))


def _rows(t: Tensor) -> Tensor:
    """A linear layer's input or output as ``(rows, features)``."""
    return t.reshape(-1, t.shape[-1])


def _conv_backward(g: Tensor, x: Tensor, w: Tensor, c: ConvArgs, mask: list[bool]) -> Any:
    return torch.ops.aten.convolution_backward(
        g, x, w, None, list(c.stride), list(c.padding), list(c.dilation), False,
        [0] * len(c.stride), c.groups, mask,
    )  # fmt: skip


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
    out: Tensor = _conv_backward(
        g, g.new_empty(tuple(x_shape)), weight, conv, [True, False, False]
    )[0]
    return out


def weight_grad(x: Tensor, g: Tensor, weight_shape: Sequence[int], conv: ConvArgs | None) -> Tensor:
    """``sum_r g_r x_r^T``: the gradient of ``<g, W x>`` with respect to ``W`` (every output
    position ``r`` of a convolution pairs its output ``g_r`` with its input patch ``x_r``)."""
    if conv is None:
        return _rows(g).t().matmul(_rows(x))
    out: Tensor = _conv_backward(
        g, x, g.new_empty(tuple(weight_shape)), conv, [False, True, False]
    )[1]
    return out


def output_positions(y: Tensor, conv: ConvArgs | None) -> int:
    """Rows of a layer output ``y``: samples times leading dimensions (linear) or samples times
    spatial output positions (convolution)."""
    return y.numel() // (y.shape[-1] if conv is None else y.shape[1])


# --------------------------------------------------------------------------- weight mirror
def mirror_noise_shape(
    weight: Tensor, samples: int, conv: ConvArgs | None
) -> tuple[tuple[int, ...], ConvArgs | None]:
    """Shape of a mirror-mode noise batch, and the geometry to drive it with. Linear:
    ``(samples, in)``. Convolution: ``samples`` patches of the receptive field ``dilation * (k -
    1) + 1`` per dimension at stride 1 without padding, so each sample gives one output position
    whose patch is pure noise (hence ``E[correlation] = sigma^2 W`` exactly)."""
    if conv is None:
        return (samples, weight.shape[1]), None
    ks = weight.shape[2:]
    extent = tuple(d * (k - 1) + 1 for d, k in zip(conv.dilation, ks))
    shape = (samples, weight.shape[1] * conv.groups, *extent)
    return shape, ConvArgs.plain(len(ks), conv.groups, conv.dilation)


def mirror_response(noise: Tensor, weight: Tensor, conv: ConvArgs | None) -> Tensor:
    """``y = W x``, the layer's response to mirror-mode noise ``x`` (Akrout et al. 2019, Sec. 3).
    No bias: with zero-mean noise its share of the correlation is zero in expectation."""
    return forward(noise, weight, conv)


def mirror_correlation(noise: Tensor, y: Tensor, weight: Tensor, conv: ConvArgs | None) -> Tensor:
    """``(1/R) sum_r y_r x_r^T`` shaped like ``W``: the Hebbian product of output and input over
    the ``R`` output positions; ``sigma^2 W`` in expectation for ``y = W x``, noise ``sigma^2 I``."""
    return weight_grad(noise, y, weight.shape, conv) / output_positions(y, conv)


def mirror_update(
    feedback: Tensor, noise: Tensor, y: Tensor, weight: Tensor, conv: ConvArgs | None,
    lr: float, decay: float,
) -> Tensor:  # fmt: skip
    """The weight-mirror step ``Delta B = eta (corr(x, y) - lambda B)`` (returned, not applied;
    Akrout et al. 2019, Sec. 3, ``Delta B = eta x y^T`` with B transposed to ours, plus decay).
    In expectation ``B`` relaxes at rate ``eta lambda`` to ``(sigma^2 / lambda) W``."""
    return lr * (mirror_correlation(noise, y, weight, conv) - decay * feedback)


# --------------------------------------------------------------------------- product feedback
def pfa_mid(g: Tensor, feedback_b: Tensor, conv: ConvArgs | None) -> Tensor:
    """``g B``: the output gradient at the ``mid`` feedback neurons through the fixed ``B``
    (linear ``(out, mid)``; convolution a grouped 1x1 kernel ``(C_out, mid / groups, 1, ...)``)."""
    if conv is None:
        return g.matmul(feedback_b)
    mid = feedback_b.shape[1] * conv.groups
    plain = ConvArgs.plain(g.dim() - 2, conv.groups)
    return input_grad(g, feedback_b, (g.shape[0], mid, *g.shape[2:]), plain)


def pfa_input_grad(
    g: Tensor, feedback_b: Tensor, feedback_r: Tensor, x_shape: Sequence[int], conv: ConvArgs | None
) -> Tensor:
    """``grad_in = (g B) R`` (Li & Benna 2024): through the fixed ``B`` (``out x mid``) and the
    learned ``R`` (``mid x in``; a kernel with the layer's geometry), so ``B R`` stands for ``W``."""
    return input_grad(pfa_mid(g, feedback_b, conv), feedback_r, x_shape, conv)


def pfa_r_grad(
    g: Tensor, feedback_b: Tensor, x: Tensor, r_shape: Sequence[int], conv: ConvArgs | None
) -> Tensor:
    """``grad_R = (g B)^T x`` (Li & Benna 2024): ``R`` learns like a forward weight from the
    input ``x`` to the ``mid`` neurons whose error is ``g B``."""
    return weight_grad(x, pfa_mid(g, feedback_b, conv), r_shape, conv)


def _grouped(t: Tensor, groups: int) -> Tensor:
    return t.reshape(groups, t.shape[0] // groups, -1)


def pfa_r_from_weight_grad(grad_weight: Tensor, feedback_b: Tensor, groups: int = 1) -> Tensor:
    """``grad_R = B^T grad_W``: :func:`pfa_r_grad` from the exact ``grad_W = g^T x`` (``B`` mixes
    output units at each position, so it factors out of the sum); one product per group."""
    if grad_weight.dim() == 2:
        return feedback_b.t().matmul(grad_weight)
    mid = feedback_b.shape[1] * groups
    gw = _grouped(grad_weight, groups)
    return torch.bmm(_grouped(feedback_b, groups).transpose(1, 2), gw).reshape(
        mid, *grad_weight.shape[1:]
    )


def pfa_path(feedback_b: Tensor, feedback_r: Tensor, groups: int = 1) -> Tensor:
    """``B R`` shaped like ``W``, the matrix ``pfa``'s input gradient uses in ``W``'s place; its
    angle to ``W`` is the *path alignment* of Li & Benna 2024."""
    if feedback_r.dim() == 2:
        return feedback_b.matmul(feedback_r)
    prod = torch.bmm(_grouped(feedback_b, groups), _grouped(feedback_r, groups))
    return prod.reshape(feedback_b.shape[0], *feedback_r.shape[1:])


def pfa_b_std(mid: int) -> float:
    """``1 / sqrt(mid)``, the std of ``B``'s entries so that ``E[B B^T] = I`` (``mid = B.shape[1]``;
    the authors' Xavier-uniform draw with gain ``sqrt((1 + 1/r) / 2)``)."""
    return 1.0 / math.sqrt(mid)


# --------------------------------------------------------------------------- direct Kolen-Pollack
def dkp_grad(point: Tensor, e: Tensor) -> Tensor:
    """``grad_{B_k} = a_k^T e`` (Webster, Choi, Ahn 2020): the Kolen-Pollack update of a direct
    connection from a point's activity ``a_k`` (``rows x d_k``) to the output error ``e`` (``rows
    x C``), for its feedback ``B_k`` (``d_k x C``); ``e`` carries any batch reduction."""
    return point.reshape(e.shape[0], -1).t().matmul(e.to(point.dtype))
