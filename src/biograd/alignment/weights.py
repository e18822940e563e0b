"""Weight alignment (Lillicrap et al. 2016, Fig. 2; Launay, Poli, Krzakala 2019) and the angle
arithmetic that every instrument shares."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..convert import converted_layers, feedback_weight


# --------------------------------------------------------------------------- angles
def angle(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between ``vec(a)`` and ``vec(b)``; NaN if either is zero."""
    return _Pairs([(a, b)]).angle()


def _wide(t: Tensor) -> Tensor:
    """``t`` flattened, detached, in float32 at least."""
    t = t.detach().reshape(-1)
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _same_dtype(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return (a, b) if a.dtype == b.dtype else (a.double(), b.double())


class _Pairs:
    """Tensor pairs ``(a_i, b_i)`` read as two long vectors ``[vec(a_1), ...]`` and
    ``[vec(b_1), ...]``; their dot products are taken once (float32 at least)."""

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.flat = [_same_dtype(_wide(a), _wide(b)) for a, b in pairs]
        self.uu = sum(float(torch.dot(u, u)) for u, _ in self.flat)
        self.vv = sum(float(torch.dot(v, v)) for _, v in self.flat)
        self.uv = sum(float(torch.dot(u, v)) for u, v in self.flat)

    @classmethod
    def join(cls, parts: Sequence[_Pairs]) -> _Pairs:
        """All pairs of ``parts`` in one."""
        out = cls([])
        for part in parts:
            out.flat += part.flat
            out.uu, out.vv, out.uv = out.uu + part.uu, out.vv + part.vv, out.uv + part.uv
        return out

    def norm_ratio(self) -> float:
        """``||b|| / ||a||``."""
        return math.sqrt(self.vv / self.uu) if self.uu > 0 else math.nan

    def angle(self) -> float:
        """Degrees; ``arccos`` of the cosine, except near 0 and 180 degrees where that loses
        precision: there ``2 atan2(|u - v|, |u + v|)`` with ``u, v`` the unit vectors (Kahan),
        exact to rounding. NaN if either vector is zero."""
        uu, vv = self.uu, self.vv
        if not (uu > 0 and vv > 0 and math.isfinite(uu) and math.isfinite(vv)):
            return math.nan
        cos = self.uv / math.sqrt(uu * vv)
        if abs(cos) < 0.99:
            return math.degrees(math.acos(cos))
        nu, nv = math.sqrt(uu), math.sqrt(vv)
        flat = [(u.double() / nu, v.double() / nv) for u, v in self.flat]
        diff = sum(float(torch.linalg.vector_norm(u - v)) ** 2 for u, v in flat)
        both = sum(float(torch.linalg.vector_norm(u + v)) ** 2 for u, v in flat)
        return math.degrees(2.0 * math.atan2(math.sqrt(diff), math.sqrt(both)))


# --------------------------------------------------------------------------- weight alignment
class _LinearPaths:
    """``W_L ... W_k``, the products of the forward weights from layer k to the output layer L,
    built from the output down; None where they are not a chain of ``nn.Linear`` layers.

    A chain is read from module order, so it is trusted only in a flat model: every weighted
    layer a child of the same module (an ``nn.Sequential`` MLP, or a module with ``fc1``,
    ``fc2``, ... as attributes). Layers nested in blocks (a transformer's attention and MLP
    blocks, a ResNet's stages) branch and add residuals: no product of weights is their path."""

    def __init__(self, model: nn.Module, output: nn.Module | None) -> None:
        weighted = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
        ]
        self.weighted = [m for _, m in weighted]
        self.index = {id(m): i for i, m in enumerate(self.weighted)}
        flat = len({n.rpartition(".")[0] for n, _ in weighted}) == 1
        self.out = None if output is None or not flat else self.index.get(id(output))
        self.cache: dict[int, Tensor | None] = {}

    def above(self, layer: nn.Module) -> Tensor | None:
        """``W_L ... W_{l+1}`` for the layer ``l`` (None for the output layer)."""
        i = self.index.get(id(layer))
        if i is None or self.out is None or i >= self.out:
            return None
        return self._path(i + 1)

    def _path(self, i: int) -> Tensor | None:
        if i not in self.cache:
            m = self.weighted[i]
            w = m.weight.detach() if isinstance(m, nn.Linear) else None
            if w is None or i == self.out:
                self.cache[i] = w
            else:
                above = self._path(i + 1)
                ok = above is not None and above.shape[1] == w.shape[0]
                self.cache[i] = above @ w if ok and above is not None else None
        return self.cache[i]


def weight_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per converted layer, ``{"angle": degrees, "norm_ratio": ratio}`` between its feedback
    and what backprop would use.

    Feedback-alignment family: the angle between ``vec(W)`` and ``vec(B)``, ``B =
    biograd.feedback_weight(layer)``, and ``||B||_F / ||W||_F`` (Lillicrap et al. 2016; Moskovitz
    et al. 2018). Direct rules: the matrix that *trains* the layer, ``B_k`` (``d_k x C``) at the
    point its output reaches, against ``P_k^T`` with ``P_k = W_L ... W_{l+1}`` the product of the
    forward weights above, backprop's path in a linear network (Launay, Poli, Krzakala 2019,
    Sec. 3); NaN where the path is not such a chain (a convolution, layers nested in blocks, shapes
    that do not chain in module order: use :func:`gradient_alignment`). Layers without a feedback
    matrix (a direct rule's output layer, any before the first forward pass) are left out.
    """
    out: dict[str, dict[str, float]] = {}
    layers = list(converted_layers(model))
    if not layers:
        raise ValueError("weight_alignment: the model has no converted layer; use biograd.convert")
    output = next((m for _, m in layers if "direct_feedback" in m._modules), None)
    paths = _LinearPaths(model, output)
    for name, layer in layers:
        b = feedback_weight(layer)
        if b is None:
            continue
        ref: Tensor | None = layer.weight
        if layer.rule.direct:
            ref = paths.above(layer)
            ref = None if ref is None or ref.t().shape != b.shape else ref.t()
        pair = _Pairs([(ref, b)]) if ref is not None else None
        out[name] = {
            "angle": pair.angle() if pair else math.nan,
            "norm_ratio": pair.norm_ratio() if pair else math.nan,
        }
    return out
