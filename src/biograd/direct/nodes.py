"""The two autograd nodes of the direct-feedback engine: :class:`Inject` on the output, which in
backward sends ``B_k s(e)`` to every feedback point of the forward pass, and :class:`Receive` on
a point recorded while a checkpointed segment is recomputed in the backward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .positions import Site

if TYPE_CHECKING:
    from .engine import DirectFeedback


class Inject(torch.autograd.Function):
    """Identity on the output; its backward sends ``B_k s(e)`` to every feedback point. Under a
    rule with learned feedback (``dkp``) the matrices ``B_k`` are inputs too, and receive the
    rule's ``feedback_grad(a_k, s_k)`` from the points' activities ``a_k`` and the signal rows
    ``s_k`` they received (pooled over positions alike: :meth:`Site.pool`)."""

    @staticmethod
    def forward(
        out: Tensor, engine: DirectFeedback, targets: Tensor | None, sites: list[Site],
        out_lead: int, *tensors: Tensor,
    ) -> Tensor:  # fmt: skip
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        # forward and setup_context apart: what torch.func.grad needs of a Function
        _, engine, targets, sites, out_lead, *tensors = inputs
        points, learned = tensors[: len(sites)], tensors[len(sites) :]
        ctx.engine, ctx.targets, ctx.sites, ctx.out_lead = engine, targets, sites, out_lead
        ctx.learned = bool(learned)
        ctx.dtypes = [(p.dtype, p.device) for p in points]
        if learned:
            ctx.save_for_backward(*points)

    @staticmethod
    def backward(ctx: Any, e: Tensor) -> tuple[Tensor | None, ...]:
        engine: DirectFeedback = ctx.engine
        grads = engine.project(e, ctx.sites, ctx.out_lead, ctx.targets)
        grads = [
            None if g is None else g.to(dtype=dt, device=dev)
            for g, (dt, dev) in zip(grads, ctx.dtypes)
        ]
        sig = engine.current_signal
        learned: list[Tensor | None] = []
        if ctx.learned:
            for site, a in zip(ctx.sites, ctx.saved_tensors):
                if sig is None:
                    learned.append(None)
                    continue
                s, pooled = sig.rows_for(site)
                learned.append(engine.rule.feedback_grad(site.pool(a.to(s.dtype), pooled), s))
        return (e, None, None, None, None, *grads, *learned)


class Receive(torch.autograd.Function):
    """A feedback point recorded during a backward pass (a checkpointed segment recomputed):
    identity on the point; its backward drops the gradient from above, as a detached point
    does, and sends ``B_k s(e)`` of the backward pass in progress instead."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, engine: DirectFeedback, site: Site) -> Tensor:
        ctx.engine, ctx.site, ctx.dtype = engine, site, x.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        g = ctx.engine.late_projection(ctx.site)
        return (None if g is None else g.to(ctx.dtype), None, None)
