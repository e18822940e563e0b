"""Rows, positions and features of the feedback points and of the output of a direct rule, and
how the signal of the output's rows reaches each point's rows.

A tensor of shape ``(N, *P, d)`` has ``lead`` leading dimensions that index its **rows** (the
sample ``N`` and the positions ``P``) and features after them. With ``batch_dims`` unset (the
default), a tensor that a linear-like layer reads or makes (``nn.Linear``, transformers'
``Conv1D``: one weight applied at every position) has its last dimension as features, and its
feedback ``B_k`` of shape ``(d, C)`` is shared by all its positions, as the layer's weight is; a
convolution's input keeps per-sample features (``lead = 1``, ``d = prod(shape[1:])``), as in
Nøkland 2016 and Launay et al. 2019. With ``batch_dims`` set, every tensor has ``lead =
batch_dims``.

The output's error ``e`` has rows ``(N, *P_out)`` of ``C`` values and the rule's signal ``s`` one
row per output row. A point whose rows equal the output's (a causal LM's tokens, a T5 decoder's
positions) receives at each row the projection of that row's signal, ``g_{n,t} = B_k s_{n,t}``:
per-token DFA (Launay, Poli, Boniface, Krzakala 2020). A point whose positions differ (a
classifier's ``(N, C)`` output read from ``(N, T, d)`` tokens, a T5 encoder's source positions
against the target positions) receives at every one of its positions the projection of the
sample's pooled signal, ``g_{n,p} = B_k sum_t s_{n,t}``: the DFA signal ``B_k e`` of Nøkland 2016
for the gradient ``sum_t e_{n,t}`` of a quantity shared by the output's positions, shared by the
point's positions as a convolution's per-sample feedback is shared by its pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..rules.direct import FeedbackError


def positional(layer: nn.Module) -> bool:
    """True for a linear-like converted layer (one weight at every position), False for a
    convolution (whose input keeps per-sample features)."""
    return not isinstance(layer, nn.modules.conv._ConvNd)


def lead_dims(ndim: int, linear: bool, batch_dims: int | None) -> int:
    """Leading dimensions of an ``ndim``-dimensional tensor that index rows: ``batch_dims`` if
    set, else ``ndim - 1`` for a tensor of a linear-like layer, 1 otherwise."""
    if batch_dims is not None:
        return batch_dims
    return max(ndim - 1, 1) if linear else 1


def features(shape: Sequence[int], lead: int) -> int:
    """Features per row of a tensor of ``shape`` whose first ``lead`` dimensions index rows."""
    return math.prod(shape[lead:])


@dataclass(frozen=True)
class Site:
    """A feedback point of one forward pass: its key, shape and rows (``shape[:lead]``)."""

    key: str
    shape: torch.Size
    lead: int

    @property
    def d(self) -> int:
        return features(self.shape, self.lead)

    def spread(self, g: Tensor, pooled: bool) -> Tensor:
        """The point's gradient from its projection ``g`` (rows x d): reshaped to the point, or
        (pooled: one row per sample) the same row at every position of the sample."""
        if not pooled:
            return g.reshape(self.shape)
        lead, n = self.lead, self.shape[0]
        return g.reshape(n, *[1] * (lead - 1), *self.shape[lead:]).expand(self.shape).contiguous()

    def pool(self, a: Tensor, pooled: bool) -> Tensor:
        """The point's activity ``a`` as rows x d: summed over its positions if ``pooled`` (the
        transpose of :meth:`spread`)."""
        n = self.shape[0] if pooled else math.prod(self.shape[: self.lead])
        return a.reshape(n, -1, self.d).sum(1)


def check_rows(site: Site, out_rows: torch.Size, pool: bool) -> bool:
    """Whether ``site`` receives the pooled signal (its rows differ from the output's rows
    ``out_rows`` but its samples agree, and ``pool``); raise :class:`FeedbackError` if neither."""
    rows = site.shape[: site.lead]
    if rows == out_rows:
        return False
    if pool and rows[:1] == out_rows[:1]:
        return True
    how = "samples" if pool else f"sample dimensions (batch_dims={site.lead})"
    raise FeedbackError(
        f"feedback point {site.key!r} has shape {tuple(site.shape)}, the output rows "
        f"{tuple(out_rows)}: their {how} differ (set batch_dims in biograd.convert)"
    )


@dataclass
class Signal:
    """The rule's signal ``s`` of one backward pass, one row per output row ``rows``."""

    s: Tensor
    rows: torch.Size
    pool: bool  # batch_dims unset: points with other positions get the pooled signal

    def pooled(self) -> Tensor:
        """``sum_t s_{n,t}`` over the output's positions: one row per sample."""
        n = self.rows[0]
        return self.s.reshape(n, math.prod(self.rows[1:]), -1).sum(1)

    def rows_for(self, site: Site) -> tuple[Tensor, bool]:
        """The signal rows that ``site`` receives, and whether they are pooled."""
        pooled = check_rows(site, self.rows, self.pool)
        return (self.pooled() if pooled else self.s), pooled
