"""The ops: one ``torch.autograd.Function`` per op whose backward sends the error through B.

For a layer ``a = W x + b`` the rules of the feedback-alignment family differ from backprop only in
the matrix that carries the error down: ``dL/dx = B^T delta`` instead of ``W^T delta``
(Lillicrap et al. 2016, Eq. 1; DESIGN.md, Notation). The weight and bias gradients
``dL/dW = delta x^T`` and ``dL/db = sum(delta)`` are the exact local gradients.

``B`` has the shape of ``W``. When ``B`` is itself a trainable tensor (Kolen-Pollack, Akrout et
al. 2019, Eq. 4), it receives the same gradient as ``W``: one tensor for both, as autograd's own
``a + b`` does; gradient accumulation never aliases it (``W.grad`` and ``B.grad`` are distinct).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LinearFeedback(torch.autograd.Function):
    """``y = x W^T + b`` for ``x`` of any rank; backward uses ``B`` for the input gradient."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, _weight, bias, feedback = inputs
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, feedback = ctx.saved_tensors
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad
        # Under autocast the forward ran in lower precision: compute in grad_out's dtype (no-ops
        # otherwise); autograd casts each gradient back to its input's dtype.
        x, feedback = x.to(grad_out.dtype), feedback.to(grad_out.dtype)
        grad_x = grad_w = grad_b = grad_fb = None
        if need_x:
            grad_x = grad_out.matmul(feedback)
        if need_w or need_fb:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1]))
            if need_fb:
                grad_fb = grad_w
        if need_b and ctx.has_bias:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w if need_w else None, grad_b, grad_fb


class ConvFeedback(torch.autograd.Function):
    """N-d convolution (1d, 2d, 3d, any stride, padding, dilation and groups) whose backward uses
    ``B`` for the input gradient, with PyTorch's fused ``convolution_backward``.

    The weight gradient of a convolution does not depend on the weight's values, so one fused call
    with ``B`` in the weight's place returns B's input gradient and the exact weight and bias
    gradients together.
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        feedback: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> Tensor:
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, _weight, bias, feedback, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, feedback)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, feedback = ctx.saved_tensors
        x, feedback = x.to(grad_out.dtype), feedback.to(grad_out.dtype)  # autocast, as above
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        mask = [need_x, need_w or need_fb, need_b and ctx.bias_sizes is not None]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, feedback, ctx.bias_sizes, stride, padding, dilation, False,
            [0] * len(stride), groups, mask,
        )  # fmt: skip
        grad_fb = grad_w if need_fb else None
        return (
            grad_x if need_x else None,
            grad_w if need_w else None,
            grad_b if mask[2] else None,
            grad_fb,
            None, None, None, None,
        )  # fmt: skip


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None) -> Tensor:
    """Linear map whose input gradient uses ``feedback`` (shape of ``weight``); exact if ``None``."""
    if feedback is None:
        return F.linear(x, weight, bias)
    out: Tensor = LinearFeedback.apply(x, weight, bias, feedback)
    return out


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    feedback: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """N-d convolution (explicit symmetric padding) whose input gradient uses ``feedback``;
    exact if ``None``. Batched or unbatched input, as ``torch.nn.functional.conv{1,2,3}d``."""
    if feedback is None:
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x = x.unsqueeze(0)
    out: Tensor = ConvFeedback.apply(x, weight, bias, feedback, stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out
