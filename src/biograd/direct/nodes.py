"""The autograd nodes of the direct-feedback engine: a :class:`Tap` on every feedback point of
the forward pass, :class:`Inject` on the output, whose backward computes the signal ``s(e)`` that
each tap then projects, ``B_k s(e)``, when the backward reaches its point, and :class:`Receive` on
a point recorded while a checkpointed segment is recomputed in the backward pass.

The taps are made where the points are, so their autograd sequence numbers lie between the
layers' nodes; autograd's engine runs the ready node with the highest sequence number first, so
each projection is made just before the layer below its point needs it, and about one is alive at
a time rather than all ``N * sum(d_k)`` values from the start of the backward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..nn.functional import _Op
from .positions import Signal, Site, check_rows

if TYPE_CHECKING:
    from .engine import DirectFeedback


@dataclass
class Pass:
    """What the taps of one forward pass share: the signal of its backward pass, the points it
    serves, and the layout's product of the signal (:meth:`DirectFeedback.product`) for the
    per-row points and for the pooled ones, kept until the last tap has taken its projection."""

    engine: DirectFeedback
    signal: Signal | None = None
    served: set[str] = field(default_factory=set)
    sizes: dict[bool, list[int]] = field(default_factory=dict)
    products: dict[bool, Tensor] = field(default_factory=dict)
    pending: int = 0

    def start(self, signal: Signal | None, sites: list[Site]) -> None:
        """Begin a backward pass with ``signal`` (None: shallow) for points ``sites``."""
        self.signal, self.served, self.products = signal, {s.key for s in sites}, {}
        self.sizes, self.pending = {}, len(sites)
        if signal is not None:
            for site in sites:
                pooled = check_rows(site, signal.rows, signal.pool)
                self.sizes.setdefault(pooled, []).append(site.d)

    def projection(self, site: Site) -> Tensor | None:
        """``B_k s(e)`` at point ``site``, shaped like it (None for shallow)."""
        sig = self.signal
        if sig is None:
            return None
        pooled = check_rows(site, sig.rows, sig.pool)
        product = self.products.get(pooled)
        if product is None:
            s = sig.pooled() if pooled else sig.s
            product = self.engine.product(s, self.sizes.get(pooled, [site.d]))
            self.products[pooled] = product
        g = site.spread(self.engine.take(product, site.key, site.d), pooled)
        self.pending -= 1
        if self.pending <= 0:
            self.products = {}  # the last point of this backward pass: free the products
        return g


class Tap(_Op):
    """An empty tensor that depends on a feedback point ``x``; given to :class:`Inject`, its
    backward returns the point's gradient ``B_k s(e)`` from the signal of its :class:`Pass`."""

    @staticmethod
    def forward(x: Tensor, served: Pass, site: Site) -> Tensor:
        return x.new_empty(0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, ctx.served, ctx.site = inputs
        ctx.dtype, ctx.device = x.dtype, x.device
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, _: Tensor | None) -> tuple[Tensor | None, ...]:
        g = ctx.served.projection(ctx.site)
        return (None if g is None else g.to(dtype=ctx.dtype, device=ctx.device), None, None)


@torch.compiler.disable
def tap(x: Tensor, served: Pass, site: Site) -> Tensor:
    """The :class:`Tap` of point ``x``, made eagerly under ``torch.compile``: its backward reads
    the signal of the backward pass in progress, which a compiled graph cannot see."""
    out: Tensor = Tap.apply(x, served, site)
    return out


class Inject(torch.autograd.Function):
    """Identity on the output; its backward computes the rule's signal ``s(e)`` for the taps of
    its forward pass (``served``). Under a rule with learned feedback (``dkp``) the points and
    their matrices ``B_k`` are inputs too: the matrices receive the rule's ``feedback_grad(a_k,
    s_k)`` from the points' activities ``a_k`` and the signal rows ``s_k`` they receive (pooled
    over positions alike: :meth:`Site.pool`), all in this backward (each the size of its
    ``B_k``)."""

    @staticmethod
    def forward(
        out: Tensor, served: Pass, targets: Tensor | None, sites: list[Site], out_lead: int,
        *tensors: Tensor,
    ) -> Tensor:  # fmt: skip
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        # forward and setup_context apart: what torch.func.grad needs of a Function
        _, served, targets, sites, out_lead, *tensors = inputs
        ctx.served, ctx.targets, ctx.sites, ctx.out_lead = served, targets, sites, out_lead
        ctx.inputs, ctx.learned = len(tensors), len(tensors) > len(sites)
        if ctx.learned:
            ctx.save_for_backward(*tensors[len(sites) : 2 * len(sites)])

    @staticmethod
    def backward(ctx: Any, e: Tensor) -> tuple[Tensor | None, ...]:
        served: Pass = ctx.served
        engine = served.engine
        sig = engine.signal(e, ctx.out_lead, ctx.targets)
        served.start(sig, ctx.sites)
        engine.current = served  # for points that checkpointing recomputes in this backward
        grads: list[Tensor | None] = [None] * ctx.inputs
        if ctx.learned and sig is not None:
            for i, (site, a) in enumerate(zip(ctx.sites, ctx.saved_tensors)):
                s, pooled = sig.rows_for(site)
                a_k = site.pool(a.to(s.dtype), pooled)
                grads[2 * len(ctx.sites) + i] = engine.rule.feedback_grad(a_k, s)
        return (e, None, None, None, None, *grads)


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
