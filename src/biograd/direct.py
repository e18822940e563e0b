"""The direct-feedback engine: DFA, sign-DFA, DRTP and the shallow control.

Direct rules send the output error straight to every hidden layer through a fixed random matrix:
``delta_l = (B_l e) * f'(a_l)`` (Nøkland 2016, Eq. 3). Here ``e = dLoss/d(output)`` is whatever
autograd computes for the user's loss, and the projection ``B_l e`` is injected at a **feedback
point**: by default the input of every converted layer but the first, i.e. the output side of the
layer below *after* its activation, batch norm and pooling, so that ``f'`` and the other local
derivatives come from autograd (the placement of Launay, Poli, Krzakala 2019). Explicit feedback
points can be put on the output of any module instead (block-wise DFA, Launay et al. 2020).

A point's tensor is detached from the graph below it in the forward pass, so the backward never
computes the back-propagated products that DFA throws away. The output layer's forward pass hands
all points of that forward pass to one autograd node (``_Inject``) which, in backward, receives
``e`` and returns ``B_k s(e)`` for every point ``k``, with one matmul for the ``shared`` and
``hashed`` layouts.

Feedback matrix of point k: ``B_k`` of shape ``(d_k, C)``, ``d_k`` the number of features per
sample at the point (``prod(shape[batch_dims:])``), ``C`` the number of outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .rules.base import Rule, get_rule, register

LAYOUTS = ("dense", "shared", "hashed")
"""Feedback layouts:

- ``dense``: one buffer ``(d_k, C)`` per point; memory ``C * sum(d_k)``.
- ``shared``: one buffer ``(max d_k, C)``, each point uses its first ``d_k`` rows (TinyDFA;
  Launay et al. 2019); one matmul per step; memory ``C * max(d_k)``.
- ``hashed``: one small basis ``P`` of shape ``(rows, C)``; row ``i`` of ``B_k`` is
  ``sign_k(i) * P[idx_k(i)]``, with ``idx_k`` and ``sign_k`` an integer hash of ``(k, i)``
  recomputed in every backward. Memory ``rows * C`` whatever the feature-map size; the price is
  that rows of ``B_k`` repeat (up to sign) every ``rows`` features.
"""

NORMS = ("launay", "fan_in", "fan_out", "none")
"""Feedback scales (entries are N(0, 1) times the factor):

- ``launay`` (default): ``1 / sqrt(d_k * C)``; Launay et al. 2019 draw the shared matrix as
  N(0,1)/sqrt(d_max*C) and rescale each slice by sqrt(d_max/d_k), which is the same factor.
- ``fan_in``: ``1 / sqrt(C)`` (TinyDFA's FAN_IN: divide by the square root of the error size).
- ``fan_out``: ``1 / sqrt(d_k)`` (TinyDFA's FAN_OUT: divide by the square root of the feedback size).
- ``none``: 1.
"""


def _norm(norm: str, d: int, classes: int) -> float:
    if norm == "launay":
        return 1.0 / math.sqrt(d * classes)
    if norm == "fan_in":
        return 1.0 / math.sqrt(classes)
    if norm == "fan_out":
        return 1.0 / math.sqrt(d)
    if norm == "none":
        return 1.0
    raise ValueError(f"unknown feedback norm {norm!r}; choose one of {', '.join(NORMS)}")


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (the finaliser of MurmurHash3) on int64 tensors."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


class DirectRule(Rule):
    """A direct rule: what the engine projects, as a function of ``e`` (rows x C)."""

    direct: ClassVar[bool] = True
    needs_targets: ClassVar[bool] = False

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        raise NotImplementedError


class DFA(DirectRule):
    """Direct feedback alignment: ``delta_l = (B_l e) * f'(a_l)`` (Nøkland 2016, Eq. 3)."""

    name = "dfa"
    paper = "Nøkland 2016"

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        return e


class SignDFA(DirectRule):
    """Sign DFA: ``delta_l = (B_l sign(e)) * f'(a_l) / N``. The ``1/N`` (N rows of e) keeps the
    scale of a mean-reduced loss, which ``sign`` would otherwise drop."""

    name = "sdfa"
    paper = "Nøkland 2016 (sign variant); Launay et al. 2020"

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        return torch.sign(e) / e.shape[0]


class DRTP(DirectRule):
    """Direct random target projection: ``delta_l = (B_l (-y*)) * f'(a_l) / N`` with ``y*`` the
    one-hot target (Frenkel, Lefebvre, Bol 2021, Eq. 4). ``-y*`` is the target-dependent part of
    softmax cross-entropy's error; the targets are handed over with ``biograd.set_targets``."""

    name = "drtp"
    paper = "Frenkel, Lefebvre, Bol 2021"
    needs_targets = True

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        if targets is None:
            raise RuntimeError(
                "drtp needs the targets: call biograd.set_targets(model, targets) before the forward pass"
            )
        t = targets.reshape(-1)
        if t.numel() != e.shape[0]:
            raise RuntimeError(f"drtp: {t.numel()} targets for an error with {e.shape[0]} rows")
        onehot = torch.zeros_like(e)
        onehot.scatter_(1, t.long().to(e.device).unsqueeze(1), 1.0)
        return -onehot / e.shape[0]


class Shallow(DirectRule):
    """Shallow control: hidden layers receive no error; only the output layer learns."""

    name = "shallow"
    paper = "control (e.g. Launay et al. 2019; Frenkel et al. 2021)"

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        return None


for _r in (DFA(), SignDFA(), DRTP(), Shallow()):
    register(_r)


@dataclass
class _Point:
    key: str
    tensor: Tensor


def _buffer_name(key: str) -> str:
    return "point_" + key.replace(".", "__") if key else "point_"


class DirectFeedback(nn.Module):
    """The feedback of a direct rule for one model; attached to the output layer as
    ``output_layer.direct_feedback`` so that it moves and saves with the model.

    Args:
        rule: ``dfa``, ``sdfa``, ``drtp`` or ``shallow``.
        classes: size ``C`` of the output error.
        sizes: feature size ``d_k`` of each feedback point, by point key (dense and shared layouts).
        seed: seed of the random feedback (drawn on the CPU: identical on every device and rank).
        layout: one of :data:`LAYOUTS`.
        norm: one of :data:`NORMS`.
        batch_dims: leading dimensions that index samples (2 for ``(batch, time, features)``).
        hashed_rows: rows of the basis of the ``hashed`` layout.
    """

    def __init__(
        self,
        rule: str,
        classes: int,
        sizes: dict[str, int],
        *,
        seed: int = 0,
        layout: str = "dense",
        norm: str = "launay",
        batch_dims: int = 1,
        hashed_rows: int = 1024,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(
                f"unknown feedback layout {layout!r}; choose one of {', '.join(LAYOUTS)}"
            )
        _norm(norm, 1, 1)
        rule_obj = get_rule(rule)
        if not isinstance(rule_obj, DirectRule):
            raise ValueError(f"{rule!r} is not a direct rule")
        self.rule: DirectRule = rule_obj
        self.classes = classes
        self.seed = seed
        self.layout = layout
        self.norm = norm
        self.batch_dims = batch_dims
        self.sizes: dict[str, int] = dict(sizes)
        self.exact = False
        self.points: list[_Point] = []
        self.targets: Tensor | None = None
        gen = torch.Generator().manual_seed(seed)
        gdtype = torch.float64 if dtype == torch.float64 else torch.float32

        def draw(rows: int) -> Tensor:
            return torch.randn(rows, classes, generator=gen, dtype=gdtype).to(
                device=device, dtype=dtype
            )

        if layout == "dense":
            for key, d in self.sizes.items():
                self.register_buffer(_buffer_name(key), draw(d) * _norm(norm, d, classes))
        elif layout == "shared":
            self.register_buffer("shared", draw(max(self.sizes.values(), default=1)))
        else:
            self.register_buffer("basis", draw(hashed_rows))

    def extra_repr(self) -> str:
        return (
            f"rule={self.rule.name}, classes={self.classes}, layout={self.layout}, norm={self.norm}, "
            f"points={len(self.sizes)}, batch_dims={self.batch_dims}"
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {"rule": self.rule.name, "seed": self.seed, "layout": self.layout, "norm": self.norm}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("layout") != self.layout or state.get("rule") != self.rule.name:
            raise RuntimeError(
                f"checkpoint holds {state.get('rule')}/{state.get('layout')} feedback, "
                f"this model {self.rule.name}/{self.layout}"
            )

    # ----------------------------------------------------------------- feedback matrices
    def _hash_index(self, key: str, d: int, device: torch.device) -> tuple[Tensor, Tensor]:
        salt = (
            self.seed * 0x9E3779B1 + sum((i + 1) * ord(c) for i, c in enumerate(key))
        ) & 0xFFFFFFFF
        i = torch.arange(d, device=device, dtype=torch.int64)
        h = _hash32(i * 0x27D4EB2F + salt)
        rows = self.basis.shape[0]
        idx = h % rows
        sign = ((h >> 31) & 1) * -2 + 1
        return idx, sign

    def matrix(self, key: str, d: int | None = None) -> Tensor:
        """The dense feedback matrix ``B_k`` of point ``key``, shape ``(d_k, C)``."""
        if d is None:
            if key not in self.sizes:
                raise KeyError(
                    f"no feedback point {key!r} has been seen; known: {sorted(self.sizes)}"
                )
            d = self.sizes[key]
        if self.layout == "dense":
            buf = getattr(self, _buffer_name(key), None)
            if buf is None:
                raise RuntimeError(
                    f"feedback point {key!r} has no feedback matrix: pass example_input to "
                    "biograd.convert so that every point is sized, or use layout='hashed'"
                )
            if buf.shape[0] != d:
                raise RuntimeError(
                    f"feedback point {key!r} has {d} features per sample, its feedback was made for "
                    f"{buf.shape[0]} (convert with an example input of the shape you train on)"
                )
            b: Tensor = buf
            return b
        scale = _norm(self.norm, d, self.classes)
        if self.layout == "shared":
            if d > self.shared.shape[0]:
                raise RuntimeError(
                    f"feedback point {key!r} has {d} features, the shared matrix {self.shared.shape[0]} rows"
                )
            return self.shared[:d] * scale
        idx, sign = self._hash_index(key, d, self.basis.device)
        return self.basis[idx] * (sign.to(self.basis.dtype) * scale).unsqueeze(1)

    def project(
        self, e: Tensor, keys: list[str], shapes: list[torch.Size], targets: Tensor | None
    ) -> list[Tensor | None]:
        """``B_k s(e)`` reshaped like each point, for the points of one forward pass."""
        e2 = e.reshape(-1, e.shape[-1])
        s = self.rule.signal(e2, targets)
        if s is None:
            return [None] * len(keys)
        s = s.to(self._feedback_dtype())
        rows = s.shape[0]
        ds = [math.prod(shape[self.batch_dims :]) for shape in shapes]
        for key, shape in zip(keys, shapes):
            if math.prod(shape[: self.batch_dims]) != rows:
                raise RuntimeError(
                    f"feedback point {key!r} has shape {tuple(shape)} with batch_dims={self.batch_dims}, "
                    f"but the output error has {rows} rows: set batch_dims in biograd.convert"
                )
        if self.layout == "dense":
            flat = [s.matmul(self.matrix(k, d).t()) for k, d in zip(keys, ds)]
        elif self.layout == "shared":
            dmax = max(ds)
            if dmax > self.shared.shape[0]:
                self.matrix(keys[ds.index(dmax)], dmax)  # raises with the point's name
            full = s.matmul(self.shared[:dmax].t())
            flat = [full[:, :d] * _norm(self.norm, d, self.classes) for d in ds]
        else:
            pe = s.matmul(self.basis.t())
            flat = []
            for k, d in zip(keys, ds):
                idx, sign = self._hash_index(k, d, pe.device)
                flat.append(pe[:, idx] * (sign.to(pe.dtype) * _norm(self.norm, d, self.classes)))
        return [f.to(e.dtype).reshape(shape) for f, shape in zip(flat, shapes)]

    def _feedback_dtype(self) -> torch.dtype:
        for b in self.buffers():
            return b.dtype
        return torch.float32

    # ----------------------------------------------------------------- forward protocol
    def add_point(self, key: str, x: Tensor) -> Tensor:
        """Record ``x`` as feedback point ``key`` of this forward pass; return it detached."""
        if self.exact or not torch.is_grad_enabled() or not x.requires_grad:
            return x
        for p in self.points:
            if p.tensor is x:
                return x.detach()
        self.sizes.setdefault(key, math.prod(x.shape[self.batch_dims :]))
        self.points.append(_Point(key, x))
        return x.detach()

    def inject(self, out: Tensor) -> Tensor:
        """Route the output through the node that, in backward, projects its gradient onto the
        feedback points recorded since the last call."""
        points, self.points = self.points, []
        targets, self.targets = self.targets, None
        if self.exact or not torch.is_grad_enabled():
            return out
        if not points:
            return out
        result: Tensor = _Inject.apply(
            out, self, targets, [p.key for p in points], *[p.tensor for p in points]
        )
        return result

    def clear(self) -> None:
        self.points = []


class _Inject(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        out: Tensor,
        engine: DirectFeedback,
        targets: Tensor | None,
        keys: list[str],
        *points: Tensor,
    ) -> Tensor:
        ctx.engine = engine
        ctx.targets = targets
        ctx.keys = keys
        ctx.shapes = [p.shape for p in points]
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, e: Tensor) -> tuple[Tensor | None, ...]:
        engine: DirectFeedback = ctx.engine
        keys = ctx.keys
        grads = engine.project(e, keys, ctx.shapes, ctx.targets)
        return (e, None, None, None, *grads)


def _run(model: nn.Module, example_input: Any) -> None:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.enable_grad():
        model(*args)


def attach(
    model: nn.Module,
    plan: dict[str, str],
    rule: str,
    *,
    seed: int,
    output: str | None,
    layout: str,
    norm: str,
    batch_dims: int,
    feedback_points: Sequence[str] | None,
    example_input: Any,
    hashed_rows: int,
    hooks: dict[str, Any],
) -> None:
    """Attach a :class:`DirectFeedback` engine to the output layer of a model whose layers in
    ``plan`` were converted to direct rule ``rule`` (called by ``biograd.convert``)."""
    from .convert import match

    modules = dict(model.named_modules())
    layers = {n: modules[n] for n, r in plan.items() if get_rule(r).direct}
    explicit = [n for n in modules if n and match(n, feedback_points)] if feedback_points else []
    if feedback_points and not explicit:
        raise ValueError(f"no module matches feedback_points={list(feedback_points)}")

    order: list[str] = list(layers)
    sizes: dict[str, int] = {}
    if example_input is not None:
        # A sizing pass (no engine is attached yet, so the layers run plain): it records which
        # layers run in which order, and the feature size at every feedback point.
        ran: list[str] = []

        def record(name: str, x: Any, always: bool) -> None:
            if always or (isinstance(x, Tensor) and x.requires_grad):
                sizes.setdefault(name, _features(x, batch_dims))

        handles = []
        for n, m in layers.items():
            handles.append(m.register_forward_pre_hook(lambda m, a, n=n: ran.append(n)))
            if not explicit:
                handles.append(
                    m.register_forward_pre_hook(lambda m, a, n=n: record(n, a[0], False))
                )
        for n in explicit:
            handles.append(
                modules[n].register_forward_hook(lambda m, a, out, n=n: record(n, out, True))
            )
        try:
            modes = {m: m.training for m in model.modules()}
            model.eval()
            try:
                _run(model, example_input)
            finally:
                for m, mode in modes.items():
                    m.training = mode
        finally:
            for h in handles:
                h.remove()
        order = list(dict.fromkeys(ran)) or order

    out_name = output if output is not None else order[-1]
    if out_name not in layers:
        raise ValueError(
            f"output layer {out_name!r} is not a converted layer; converted: {', '.join(layers)}"
        )
    out_layer = layers[out_name]
    classes = out_layer.weight.shape[0]

    if example_input is None:
        if explicit:
            points = explicit
        else:
            first = order[0]
            points = [n for n in layers if n != first]
        for n in points:
            m = modules[n]
            if isinstance(m, nn.Linear) and not explicit:
                sizes[n] = m.in_features
            elif layout != "hashed":
                raise ValueError(
                    f"feedback point {n!r} needs its feature size for the {layout!r} layout: pass "
                    "example_input=<a batch> to biograd.convert, or use layout='hashed'"
                )
    w = out_layer.weight
    engine = DirectFeedback(
        rule, classes, sizes, seed=seed, layout=layout, norm=norm, batch_dims=batch_dims,
        hashed_rows=hashed_rows, dtype=w.dtype, device=w.device,
    )  # fmt: skip
    out_layer.add_module("direct_feedback", engine)
    for n, layer in layers.items():
        layer.__dict__["_engine"] = engine
        if n == out_name:
            layer.direct_role = "output"
        else:
            layer.direct_role = "none" if explicit else "hidden"

    handles = hooks["hooks"]
    handles.append(model.register_forward_pre_hook(lambda m, a: engine.clear()))
    for n in explicit:
        handles.append(
            modules[n].register_forward_hook(lambda m, a, out, n=n: engine.add_point(n, out))
        )
    hooks["points"] = explicit or [n for n in layers if n in sizes or layout == "hashed"]


def _features(x: Tensor, batch_dims: int) -> int:
    if not isinstance(x, Tensor):
        raise TypeError("a feedback point must be a single tensor")
    n = 1
    for s in x.shape[batch_dims:]:
        n *= s
    return n
