"""The ops: one ``torch.autograd.Function`` per op whose backward sends the error through B.

For ``a = W x + b`` the feedback-alignment family differs from backprop only in ``dL/dx = B^T
delta`` instead of ``W^T delta`` (Lillicrap et al. 2016, Eq. 1); ``dL/dW = delta x^T`` and
``dL/db = sum(delta)`` are exact. The forward pass hands the rule and ``rule.pass_state`` to the
backward, which asks ``rule.matrix(W, *state)`` for B; the state tensors are inputs of the
Function, so a learned B (a Parameter) gets the gradient ``rule.state_grads`` gives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Feedback(Protocol):
    """What an op asks of a rule in the backward pass (``biograd.rules.Rule`` is one)."""

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None: ...

    def state_grads(self, grad_weight: Tensor | None, *state: Tensor) -> tuple[Any, ...]: ...


class Given:
    """A given feedback tensor as the op's rule: ``linear(x, W, b, B)`` runs with ``B`` (the
    one state tensor); a B that requires grad gets W's gradient, as Kolen-Pollack's does."""

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        return state[0]

    def state_grads(self, grad_weight: Tensor | None, *state: Tensor) -> tuple[Any, ...]:
        return (grad_weight,)


GIVEN = Given()


def _rule(
    feedback: Feedback | Tensor, state: Sequence[Tensor]
) -> tuple[Feedback, tuple[Tensor, ...]]:
    return (GIVEN, (feedback,)) if isinstance(feedback, Tensor) else (feedback, tuple(state))


def _saved(
    ctx: Any, grad_out: Tensor, need_b: bool
) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
    """The input and B in ``grad_out``'s dtype (autocast; autograd casts each gradient back to
    its input's dtype), and the state. B is formed only if ``need_b`` (never for a first layer)."""
    x, weight, *state = ctx.saved_tensors
    dt = grad_out.dtype
    b = None
    if need_b:
        b = ctx.rule.matrix(weight, *state)
        b = _as(weight if b is None else b, dt)
    return _as(x, dt), b, tuple(state)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op ``to`` still costs a dispatch


def _state_grads(ctx: Any, grad_w: Tensor | None, state: tuple[Tensor, ...]) -> list[Any]:
    grads = ctx.rule.state_grads(grad_w, *state)
    return [g if need else None for g, need in zip(grads, ctx.needs_input_grad[ctx.n_args :])]


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _Op(torch.autograd.Function):
    """``torch.autograd.Function`` whose ``apply`` skips the per-call ``inspect.signature``
    binding of default arguments that torch does for every Function with a ``setup_context``
    (our forwards have no defaults and take positional arguments only): in eager mode that
    binding was about two thirds of an op's Python overhead. Under a torch.func transform the
    call goes through torch's own ``apply``."""

    @classmethod
    def apply(cls, *args: Any) -> Any:  # type: ignore[override]
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))  # type: ignore[misc]


class LinearFeedback(_Op):
    """``y = x W^T + b`` for ``x`` of any rank; backward uses the rule's B for the input gradient."""

    generate_vmap_rule = True  # torch.func.vmap(grad(...)): per-sample gradients

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor, bias: Tensor | None, rule: Feedback, *state: Tensor
    ) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, rule, *state = inputs
        ctx.save_for_backward(x, weight, *state)
        ctx.rule, ctx.n_args, ctx.has_bias = rule, 4, bias is not None

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w or any(ctx.needs_input_grad[4:])
        x, b, state = _saved(ctx, grad_out, need_x)
        grad_x = grad_out.matmul(b) if b is not None else None
        del b  # a B formed here is freed before the weight gradient is allocated
        g2, x2 = (grad_out, x) if x.dim() == 2 else (_rows(grad_out), _rows(x))
        grad_w = g2.t().matmul(x2) if need_w else None
        grad_b = g2.sum(0) if need_b and ctx.has_bias else None
        extra = _state_grads(ctx, grad_w, state)
        return grad_x, grad_w if ctx.needs_input_grad[1] else None, grad_b, None, *extra


class ConvFeedback(_Op):
    """N-d convolution (any stride, padding, dilation, groups) whose backward uses the rule's B
    for the input gradient: one fused ``convolution_backward`` with B in the weight's place gives
    it and the exact weight and bias gradients (which do not depend on the weight's values)."""

    generate_vmap_rule = True  # torch.func.vmap(grad(...)): per-sample gradients

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor, bias: Tensor | None, rule: Feedback, stride: Sequence[int],
        padding: Sequence[int], dilation: Sequence[int], groups: int, *state: Tensor,
    ) -> Tensor:  # fmt: skip
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, rule, stride, padding, dilation, groups, *state = inputs
        ctx.save_for_backward(x, weight, *state)
        ctx.rule, ctx.n_args, ctx.conv_args = rule, 8, (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w or any(ctx.needs_input_grad[8:])
        x, b, state = _saved(ctx, grad_out, need_x)
        if b is None:  # the weight's shape and dtype is all convolution_backward needs of it
            b = ctx.saved_tensors[1].to(grad_out.dtype)
        mask = [need_x, need_w, need_b and ctx.bias_sizes is not None]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, b, ctx.bias_sizes, list(stride), list(padding), list(dilation), False,
            [0] * len(stride), groups, mask,
        )  # fmt: skip
        extra = _state_grads(ctx, grad_w if need_w else None, state)
        return (
            grad_x if need_x else None,
            grad_w if ctx.needs_input_grad[1] else None,
            grad_b if mask[2] else None,
            None, None, None, None, None, *extra,
        )  # fmt: skip


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    feedback: Feedback | Tensor | None,
    state: Sequence[Tensor] = (),
) -> Tensor:
    """Linear map whose input gradient uses ``feedback``: a rule (with its pass ``state``) or a
    tensor shaped like ``weight``; exact if ``None``."""
    if feedback is None:
        return F.linear(x, weight, bias)
    rule, st = _rule(feedback, state)
    out: Tensor = LinearFeedback.apply(x, weight, bias, rule, *st)
    return out


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    feedback: Feedback | Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    state: Sequence[Tensor] = (),
) -> Tensor:
    """N-d convolution (explicit symmetric padding) whose input gradient uses ``feedback``, as in
    :func:`linear`; exact if ``None``. Batched or unbatched input, as ``F.conv{1,2,3}d``."""
    args = (stride, padding, dilation, groups)
    if feedback is None:
        return _CONV[weight.dim() - 2](x, weight, bias, *args)
    rule, st = _rule(feedback, state)
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x = x.unsqueeze(0)
    out: Tensor = ConvFeedback.apply(x, weight, bias, rule, *args, *st)
    return out.squeeze(0) if unbatched else out
