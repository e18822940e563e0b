"""The direct-feedback engine: DFA, sign-DFA, DRTP and the shallow control.

Direct rules send the output error straight to every hidden layer through a fixed random matrix:
``delta_l = (B_l e) * f'(a_l)`` (Nøkland 2016). Here ``e = dLoss/d(output)`` is whatever
autograd computes for the user's loss, and the projection ``B_k e`` is injected at a **feedback
point**: by default the input of every converted layer but the first, i.e. the output side of the
layer below *after* its activation, batch norm and pooling, so that ``f'`` and the other local
derivatives come from autograd (the placement of Launay, Poli, Krzakala 2019). Explicit feedback
points can be put on the output of any module instead (block-wise DFA, Launay et al. 2020).

A point's tensor is detached from the graph above it in the forward pass, so the backward never
computes the back-propagated products that DFA throws away. The output layer's forward pass hands
all points of that forward pass to one autograd node (``_Inject``) which, in backward, receives
``e`` and returns ``B_k s(e)`` for every point ``k``, with one matmul for the ``shared`` and
``hashed`` layouts.

Feedback matrix of point k: ``B_k`` of shape ``(d_k, C)``, ``d_k`` the number of features per
sample at the point (``prod(shape[batch_dims:])``), ``C`` the number of outputs per sample.
See ``docs/direct.md`` for the maths, the layouts and their costs.
"""

from __future__ import annotations

import functools
import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import BiogradError
from .rules.base import Rule, get_rule, register

LAYOUTS = ("dense", "shared", "hashed")
"""Feedback layouts (``d_k`` features at point k, ``C`` outputs, ``R`` = ``hashed_rows``):

- ``dense``: one buffer ``(d_k, C)`` per point; memory ``C * sum(d_k)``.
- ``shared``: one buffer ``S`` of shape ``(max d_k, C)``; ``B_k = S[:d_k] * norm(d_k)`` (the
  scheme of Launay et al. 2019 and TinyDFA); one matmul per step; memory ``C * max(d_k)``.
- ``hashed``: one basis ``P`` of shape ``(R, C)``; row ``i`` of ``B_k`` is
  ``sign_k(i) * P[idx_k(i)] * norm(d_k)`` with ``idx_k``, ``sign_k`` an integer hash of ``(k, i)``
  (:meth:`DirectFeedback.hash_index`) recomputed in every backward; one matmul per step; memory
  ``R * C`` whatever the feature-map size. Rows of ``B_k`` repeat (up to sign) about every ``R``
  features, so ``rank(B_k) <= min(R, C)``: keep ``R >= C``.
"""

NORMS = ("launay", "fan_in", "fan_out", "none")
"""Feedback scales (entries are N(0, 1) times the factor; ``d_k`` point features, ``C`` outputs):

- ``launay`` (default): ``1 / sqrt(d_k * C)``. Launay, Poli, Krzakala 2019 draw the shared matrix
  as N(0,1)/sqrt(d_max*C) and rescale each slice by sqrt(d_max/d_k): the same factor.
  ``||B_k e|| ~ ||e|| / sqrt(C)``, whatever the width of the point.
- ``fan_in``: ``1 / sqrt(C)`` (TinyDFA's FAN_IN: divide by the square root of the error size);
  ``||B_k e|| ~ ||e|| sqrt(d_k / C)``.
- ``fan_out``: ``1 / sqrt(d_k)`` (TinyDFA's FAN_OUT, its default: divide by the square root of the
  feedback size); ``||B_k e|| ~ ||e||``.
- ``none``: 1 (unscaled); ``||B_k e|| ~ ||e|| sqrt(d_k)``.
"""


class FeedbackError(BiogradError, RuntimeError):
    """A direct-feedback rule cannot run as set up (missing targets, a point of the wrong size)."""


def norm_factor(norm: str, d: int, classes: int) -> float:
    """The factor of :data:`NORMS` scheme ``norm`` for a point of ``d`` features and ``C`` outputs."""
    if norm == "launay":
        return 1.0 / math.sqrt(d * classes)
    if norm == "fan_in":
        return 1.0 / math.sqrt(classes)
    if norm == "fan_out":
        return 1.0 / math.sqrt(d)
    if norm == "none":
        return 1.0
    raise ValueError(f"unknown feedback norm {norm!r}; choose one of {', '.join(NORMS)}")


_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of 32-bit integers) on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def point_salt(seed: int, key: str) -> int:
    """The 32-bit salt of feedback point ``key`` in the ``hashed`` layout:
    ``crc32(key) XOR (seed * 0x9E3779B1 mod 2^32)``."""
    return zlib.crc32(key.encode()) ^ ((seed * 0x9E3779B1) & _MASK32)


class DirectRule(Rule):
    """A direct rule: the signal ``s`` that the engine projects, from ``e`` (rows x C)."""

    direct: ClassVar[bool] = True
    needs_targets: ClassVar[bool] = False
    # True when the signal does not carry the error's magnitude, hence not a loss scale either.
    scale_free: ClassVar[bool] = False

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        raise NotImplementedError


class DFA(DirectRule):
    """Direct feedback alignment: ``s = e``, ``delta_l = (B_l e) * f'(a_l)`` (Nøkland 2016)."""

    name = "dfa"
    paper = "Nøkland 2016"

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        return e


class SignDFA(DirectRule):
    """Sign DFA: ``s = sign(e) / N`` (N rows of ``e``), ``delta_l = (B_l s) * f'(a_l)``. Only the
    sign of the error travels (Frenkel, Lefebvre, Bol 2021, "sDFA"); ``1/N`` restores the scale of
    a mean-reduced loss, which ``sign`` drops."""

    name = "sdfa"
    paper = "Frenkel, Lefebvre, Bol 2021 (sDFA)"
    scale_free = True

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        return torch.sign(e) / e.shape[0]


class DRTP(DirectRule):
    """Direct random target projection: ``s = -y* / N`` with ``y*`` the one-hot target (or a given
    target distribution) and N rows; ``delta_l = (B_l s) * f'(a_l)`` (Frenkel, Lefebvre, Bol 2021:
    the target is a proxy for the sign of the error; ``-y*`` is the target-dependent part of
    softmax cross-entropy's ``e = p - y*``). Targets come through ``biograd.set_targets``."""

    name = "drtp"
    paper = "Frenkel, Lefebvre, Bol 2021"
    needs_targets = True
    scale_free = True

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        if targets is None:
            raise FeedbackError(_NO_TARGETS)
        rows, classes = e.shape
        t = targets.to(e.device)
        if t.is_floating_point() and t.shape[-1] == classes and t.numel() == e.numel():
            onehot = t.reshape(rows, classes).to(e.dtype)
        else:
            t = t.reshape(-1).long()
            if t.numel() != rows:
                raise FeedbackError(
                    f"drtp: {t.numel()} targets for an output error of {rows} rows "
                    "(hand over one class index per row, or a (rows, C) target distribution)"
                )
            onehot = torch.zeros_like(e).scatter_(1, t.unsqueeze(1), 1.0)
        return -onehot / rows


_NO_TARGETS = (
    "drtp needs the targets of every training forward pass: call "
    "biograd.set_targets(model, targets) right before model(inputs)"
)


class Shallow(DirectRule):
    """Shallow control: hidden layers receive no error; only the output layer learns."""

    name = "shallow"
    paper = "control (Launay et al. 2019; Frenkel et al. 2021)"

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        return None


for _r in (DFA(), SignDFA(), DRTP(), Shallow()):
    register(_r)


@dataclass
class _Point:
    key: str
    tensor: Tensor


def _buffer_name(key: str) -> str:
    return "point_" + key.replace(".", "__")


def _features(shape: Sequence[int], batch_dims: int) -> int:
    return math.prod(shape[batch_dims:])


class DirectFeedback(nn.Module):
    """The feedback of a direct rule for one model; attached to the output layer as
    ``output_layer.direct_feedback`` so that it moves and saves with the model.

    Args:
        rule: ``dfa``, ``sdfa``, ``drtp`` or ``shallow``.
        classes: size ``C`` of the output error per sample (``prod(out.shape[batch_dims:])``).
        sizes: feature size ``d_k`` of each feedback point, by point key (needed by the dense
            and shared layouts; the hashed layout learns them on the fly).
        seed: seed of the random feedback (drawn on the CPU: identical on every device and rank).
        layout: one of :data:`LAYOUTS`.
        norm: one of :data:`NORMS`.
        batch_dims: leading dimensions that index samples (2 for per-token outputs of shape
            ``(batch, time, C)``).
        hashed_rows: rows ``R`` of the basis of the ``hashed`` layout (keep ``R >= C``).
        explicit: points are outputs of named modules (``feedback_points``), not layer inputs.
    """

    shared: Tensor
    basis: Tensor
    classes: int
    batch_dims: int

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
        explicit: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(
                f"unknown feedback layout {layout!r}; choose one of {', '.join(LAYOUTS)}"
            )
        norm_factor(norm, 1, 1)
        if batch_dims < 1:
            raise ValueError(f"batch_dims must be at least 1, got {batch_dims}")
        rule_obj = get_rule(rule)
        if not isinstance(rule_obj, DirectRule):
            raise ValueError(f"{rule!r} is not a direct rule")
        self.rule: DirectRule = rule_obj
        self.classes = classes
        self.seed = seed
        self.layout = layout
        self.norm = norm
        self.batch_dims = batch_dims
        self.explicit = explicit
        self.sizes: dict[str, int] = dict(sizes)
        self.exact = False
        self.points: list[_Point] = []
        self.targets: Tensor | None = None
        # The factor by which the loss was scaled before backward (fp16 GradScaler): sdfa's and
        # drtp's signals do not carry it, so the engine multiplies them by it.
        self.loss_scale = 1.0
        gen = torch.Generator().manual_seed(seed)
        gdtype = torch.float64 if dtype == torch.float64 else torch.float32

        def draw(rows: int) -> Tensor:
            return torch.randn(rows, classes, generator=gen, dtype=gdtype).to(
                device=device, dtype=dtype
            )

        if layout == "dense":
            for key, d in self.sizes.items():
                self.register_buffer(_buffer_name(key), draw(d) * norm_factor(norm, d, classes))
        elif layout == "shared":
            self.register_buffer("shared", draw(max(self.sizes.values(), default=1)))
        else:
            widest = max(self.sizes.values(), default=classes)
            if hashed_rows < min(classes, widest):
                warnings.warn(
                    f"hashed_rows={hashed_rows} < {min(classes, widest)}: the hashed feedback has "
                    f"rank at most {hashed_rows}, lower than a dense one ({min(classes, widest)})",
                    stacklevel=2,
                )
            self.register_buffer("basis", draw(hashed_rows))

    def extra_repr(self) -> str:
        return (
            f"rule={self.rule.name}, classes={self.classes}, layout={self.layout}, norm={self.norm}, "
            f"points={len(self.sizes)}, batch_dims={self.batch_dims}"
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "rule": self.rule.name,
            "seed": self.seed,
            "layout": self.layout,
            "norm": self.norm,
            "classes": self.classes,
            "sizes": dict(self.sizes),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("layout") != self.layout or state.get("rule") != self.rule.name:
            raise FeedbackError(
                f"checkpoint holds {state.get('rule')}/{state.get('layout')} feedback, "
                f"this model {self.rule.name}/{self.layout}: convert with the same rule and layout"
            )
        # The hashed layout's hash and the shared/hashed scale are computed, not stored.
        self.seed = int(state.get("seed", self.seed))
        self.norm = str(state.get("norm", self.norm))
        for key, d in state.get("sizes", {}).items():
            self.sizes.setdefault(key, int(d))

    # ----------------------------------------------------------------- feedback matrices
    def hash_index(
        self, key: str, d: int, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """Row indices into the basis and signs of ``B_k`` in the ``hashed`` layout:
        ``h = mix(mix(i) XOR salt_k)``, ``idx = h mod R``, ``sign = +1`` if bit 31 of ``h`` is 0
        else ``-1``, for ``i = 0..d-1``, ``mix`` MurmurHash3's finaliser, ``salt_k`` from
        :func:`point_salt`."""
        i = torch.arange(d, device=device, dtype=torch.int64)
        h = _mix32(_mix32(i) ^ point_salt(self.seed, key))
        idx = h % self.basis.shape[0]
        sign = 1 - 2 * ((h >> 31) & 1)
        return idx, sign

    def matrix(self, key: str, d: int | None = None) -> Tensor:
        """The feedback matrix ``B_k`` of point ``key`` as a dense ``(d_k, C)`` tensor (for the
        hashed layout it is built here; the backward pass never builds it)."""
        if d is None:
            if key not in self.sizes:
                raise KeyError(
                    f"no feedback point {key!r} has been seen; known: {sorted(self.sizes)}"
                )
            d = self.sizes[key]
        self.check(key, d)
        if self.layout == "dense":
            b: Tensor = self._buffers[_buffer_name(key)]  # type: ignore[assignment]
            return b
        scale = norm_factor(self.norm, d, self.classes)
        if self.layout == "shared":
            return self.shared[:d] * scale
        idx, sign = self.hash_index(key, d, self.basis.device)
        return self.basis[idx] * (sign.to(self.basis.dtype) * scale).unsqueeze(1)

    def set_matrix(self, key: str, value: Tensor) -> None:
        """Replace the feedback of point ``key`` with ``value`` of shape ``(d_k, C)`` (``dense``
        layout only; e.g. to compare with a chosen feedback such as a transposed weight)."""
        if self.layout != "dense":
            raise FeedbackError(
                f"set_matrix needs the dense layout, this engine is {self.layout!r}"
            )
        buf = self._buffers.get(_buffer_name(key))
        if buf is None or buf.shape != value.shape:
            shape = None if buf is None else tuple(buf.shape)
            raise FeedbackError(
                f"point {key!r}: feedback of shape {shape}, got {tuple(value.shape)}"
            )
        with torch.no_grad():
            buf.copy_(value)

    def check(self, key: str, d: int) -> None:
        """Raise :class:`FeedbackError` if point ``key`` with ``d`` features has no feedback."""
        if self.layout == "dense":
            buf = self._buffers.get(_buffer_name(key))
            if buf is None:
                raise FeedbackError(
                    f"feedback point {key!r} has no feedback matrix in the dense layout: pass "
                    "example_input=<a batch> to biograd.convert so that every point is sized, "
                    "or use layout='hashed'"
                )
            if buf.shape[0] != d:
                raise FeedbackError(
                    f"feedback point {key!r} has {d} features per sample (batch_dims="
                    f"{self.batch_dims}) but its feedback was made for {buf.shape[0]}: convert with "
                    "an example input of the shape you train on, set batch_dims, or use "
                    "layout='hashed'"
                )
        elif self.layout == "shared" and d > self.shared.shape[0]:
            raise FeedbackError(
                f"feedback point {key!r} has {d} features per sample, the shared feedback "
                f"{self.shared.shape[0]} rows: convert with an example input of the largest shape"
            )

    def nbytes(self) -> int:
        """Memory held by the feedback buffers, in bytes."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def project(
        self,
        e: Tensor,
        keys: Sequence[str],
        shapes: Sequence[torch.Size],
        targets: Tensor | None,
    ) -> list[Tensor | None]:
        """``B_k s(e)`` shaped like each point ``k`` (``None`` for the shallow rule)."""
        rows = _features(e.shape[: self.batch_dims], 0)
        s = self.rule.signal(e.reshape(rows, -1), targets)
        if s is None:
            return [None] * len(keys)
        if self.rule.scale_free and self.loss_scale != 1.0:
            s = s * self.loss_scale
        dtype = self._feedback_dtype()
        s = s.to(dtype)
        ds = [_features(shape, self.batch_dims) for shape in shapes]
        if self.layout == "dense":
            return [s.matmul(self.matrix(k, d).t()) for k, d in zip(keys, ds)]
        if self.layout == "shared":
            full = s.matmul(self.shared[: max(ds)].t())
            return [full[:, :d] * norm_factor(self.norm, d, self.classes) for d in ds]
        pe = s.matmul(self.basis.t())
        flat: list[Tensor | None] = []
        for k, d in zip(keys, ds):
            idx, sign = self.hash_index(k, d, pe.device)
            flat.append(
                pe.index_select(1, idx).mul_(
                    sign.to(dtype) * norm_factor(self.norm, d, self.classes)
                )
            )
        return flat

    def _feedback_dtype(self) -> torch.dtype:
        for b in self.buffers():
            return b.dtype
        return torch.float32

    # ----------------------------------------------------------------- forward protocol
    def add_point(self, key: str, x: Tensor) -> Tensor:
        """A converted layer's input ``x``: record it as feedback point ``key`` of this forward
        pass and return it detached (unless feedback points are explicit modules)."""
        if self.explicit:
            return x
        return self.record(key, x)

    def record(self, key: str, x: Tensor) -> Tensor:
        """Record ``x`` as feedback point ``key`` of this forward pass; return it detached, so
        that nothing above it back-propagates into it."""
        if self.exact or not torch.is_grad_enabled():
            return x
        if not isinstance(x, Tensor):
            raise FeedbackError(
                f"feedback point {key!r} must be one tensor, got {type(x).__name__}"
            )
        if not x.requires_grad:
            return x
        for p in self.points:
            if p.tensor is x:
                return x.detach()
        if x.dim() <= self.batch_dims:
            raise FeedbackError(
                f"feedback point {key!r} has shape {tuple(x.shape)}: no feature dimension after "
                f"batch_dims={self.batch_dims}"
            )
        d = _features(x.shape, self.batch_dims)
        self.check(key, d)
        self.sizes.setdefault(key, d)
        self.points.append(_Point(key, x))
        return x.detach()

    def inject(self, out: Tensor) -> Tensor:
        """Route the output through the node that, in backward, projects its gradient onto the
        feedback points recorded since the last call."""
        points, self.points = self.points, []
        targets, self.targets = self.targets, None
        if self.exact or not torch.is_grad_enabled() or not points:
            return out
        if self.rule.needs_targets and targets is None and self.training:
            raise FeedbackError(_NO_TARGETS)  # in eval mode, only if a backward pass follows
        c = _features(out.shape, self.batch_dims)
        if c != self.classes:
            raise FeedbackError(
                f"the output layer gives {c} values per sample (shape {tuple(out.shape)}, "
                f"batch_dims={self.batch_dims}), the feedback was made for {self.classes}: "
                "pass example_input to biograd.convert or set batch_dims"
            )
        rows = _features(out.shape[: self.batch_dims], 0)
        for p in points:
            if _features(p.tensor.shape[: self.batch_dims], 0) != rows:
                raise FeedbackError(
                    f"feedback point {p.key!r} has shape {tuple(p.tensor.shape)} with batch_dims="
                    f"{self.batch_dims}, the output {tuple(out.shape)}: their sample dimensions "
                    "differ (set batch_dims in biograd.convert)"
                )
        result: Tensor = _Inject.apply(
            out, self, targets, [p.key for p in points], *[p.tensor for p in points]
        )
        return result

    def clear(self) -> None:
        """Forget the points of an unfinished forward pass."""
        self.points = []

    # Hooks are bound methods (not closures) so that ``copy.deepcopy`` of a model rebinds them to
    # the copy's engine.
    def _clear_hook(self, module: nn.Module, args: Any) -> None:
        self.clear()

    def _record_hook(self, key: str, module: nn.Module, args: Any, output: Any) -> Tensor:
        return self.record(key, output)


class _Inject(torch.autograd.Function):
    """Identity on the output; its backward sends ``B_k s(e)`` to every feedback point."""

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
        ctx.dtypes = [(p.dtype, p.device) for p in points]
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, e: Tensor) -> tuple[Tensor | None, ...]:
        flat = ctx.engine.project(e, ctx.keys, ctx.shapes, ctx.targets)
        grads = [
            None if f is None else f.to(dtype=dt, device=dev).reshape(shape)
            for f, shape, (dt, dev) in zip(flat, ctx.shapes, ctx.dtypes)
        ]
        return (e, None, None, None, *grads)


# --------------------------------------------------------------------------- set-up
@dataclass
class Trace:
    """What one forward pass shows about a model's direct feedback: the converted layers in the
    order they ran, the feature size at every feedback point, and each layer's output size."""

    order: list[str]
    points: dict[str, int]
    outputs: dict[str, int]


def trace(
    model: nn.Module,
    layers: dict[str, nn.Module],
    explicit: dict[str, nn.Module],
    example_input: Any,
    batch_dims: int,
) -> Trace:
    """Run ``model`` once on ``example_input`` (in eval mode, train modes restored) and record,
    for the converted ``layers``, the :class:`Trace`. Explicit points are the outputs of the
    modules in ``explicit``; otherwise a layer's input is a point if it requires grad (it is not
    the model's input)."""
    ran: list[str] = []
    points: dict[str, int] = {}
    outputs: dict[str, int] = {}

    def pre(name: str, args: tuple[Any, ...]) -> None:
        ran.append(name)
        x = args[0] if args else None
        if not explicit and isinstance(x, Tensor) and x.requires_grad:
            points.setdefault(name, _features(x.shape, batch_dims))

    def post(name: str, out: Any) -> None:
        if not isinstance(out, Tensor):
            raise FeedbackError(f"feedback point {name!r} must output one tensor, not {type(out)}")
        points.setdefault(name, _features(out.shape, batch_dims))

    def out(name: str, y: Any) -> None:
        if isinstance(y, Tensor):
            outputs.setdefault(name, _features(y.shape, batch_dims))

    handles = []
    for n, m in layers.items():
        handles.append(m.register_forward_pre_hook(lambda m, a, n=n: pre(n, a)))
        handles.append(m.register_forward_hook(lambda m, a, y, n=n: out(n, y)))
    for n, module in explicit.items():
        handles.append(module.register_forward_hook(lambda m, a, o, n=n: post(n, o)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        with torch.enable_grad():
            model(*args)
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in handles:
            h.remove()
    return Trace(list(dict.fromkeys(ran)), points, outputs)


def explicit_points(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Names of the modules that ``patterns`` (names or globs) select as feedback points, in
    module order; a module inside another selected module is left out (``"block*"`` selects
    ``block1``, not ``block1.conv1``)."""
    from .convert import match

    chosen: list[str] = []
    for name, _ in model.named_modules():
        if name and match(name, patterns) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    return chosen


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

    if layout not in LAYOUTS:
        raise ValueError(f"unknown feedback layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    norm_factor(norm, 1, 1)
    modules = dict(model.named_modules())
    layers = {n: modules[n] for n, r in plan.items() if get_rule(r).direct}
    explicit = explicit_points(model, feedback_points)
    if feedback_points and not explicit:
        raise ValueError(f"no module matches feedback_points={list(feedback_points)}")

    order: list[str] = list(layers)
    sizes: dict[str, int] = {}
    outputs: dict[str, int] = {}
    if example_input is not None:
        # No engine is attached yet, so the layers run plain.
        t = trace(model, layers, {n: modules[n] for n in explicit}, example_input, batch_dims)
        order, sizes, outputs = t.order or order, t.points, t.outputs

    out_name = output if output is not None else order[-1]
    if out_name not in layers:
        raise ValueError(
            f"output layer {out_name!r} is not a converted layer; converted: {', '.join(layers)}"
        )
    out_layer = layers[out_name]
    classes = outputs.get(out_name, out_layer.weight.shape[0])

    if example_input is None:
        # A Linear layer's point is sized by in_features, the first one's too: it is used when
        # the model's input requires grad (an embedding below it, say).
        first = order[0]
        for n in explicit or [n for n in layers if n != first or isinstance(modules[n], nn.Linear)]:
            m = modules[n]
            if isinstance(m, nn.Linear) and not explicit:
                sizes[n] = m.in_features
            elif layout != "hashed":
                raise ValueError(
                    f"feedback point {n!r} needs its feature size for the {layout!r} layout: pass "
                    "example_input=<a batch> to biograd.convert, or use layout='hashed'"
                )
    if explicit:
        sizes = {n: sizes[n] for n in explicit if n in sizes}
    w = out_layer.weight
    engine = DirectFeedback(
        rule, classes, sizes, seed=seed, layout=layout, norm=norm, batch_dims=batch_dims,
        hashed_rows=hashed_rows, explicit=bool(explicit), dtype=w.dtype, device=w.device,
    )  # fmt: skip
    out_layer.add_module("direct_feedback", engine)
    for n, layer in layers.items():
        layer.__dict__["_engine"] = engine
        if n == out_name:
            layer.direct_role = "output"
        else:
            layer.direct_role = "none" if explicit else "hidden"

    handles = hooks["hooks"]
    handles.append(model.register_forward_pre_hook(engine._clear_hook))
    for n in explicit:
        handles.append(modules[n].register_forward_hook(functools.partial(engine._record_hook, n)))
    if explicit:
        hooks["points"] = list(explicit)
    elif sizes:
        hooks["points"] = [n for n in order if n in sizes]
    else:
        hooks["points"] = [n for n in order if n != order[0]]


# --------------------------------------------------------------------------- memory
class _MetaCall(nn.Module):
    """Runs ``inner`` with every parameter and buffer replaced by a ``meta`` tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.state = {
            k: torch.empty_like(v, device="meta").requires_grad_(v.requires_grad)
            for k, v in [*inner.named_parameters(), *inner.named_buffers()]
        }

    def forward(self, x: Tensor) -> Any:
        return torch.func.functional_call(self.inner, self.state, (x,))


def feedback_sizes(
    model: nn.Module,
    example_input_shape: Sequence[int],
    *,
    feedback_points: Sequence[str] | None = None,
    batch_dims: int = 1,
    exclude: Sequence[str] | None = None,
) -> tuple[dict[str, int], int]:
    """Feature sizes ``d_k`` of the feedback points that ``biograd.convert`` would make for an
    input of shape ``example_input_shape``, and the output size ``C`` of the last converted layer.

    The model (converted or not) runs once on the ``meta`` device, so nothing of the input's size
    is allocated (a real batch-of-the-shape run is the fallback for ops without meta kernels).
    """
    from .convert import _convertible, exact, match

    parents = dict(model.named_modules())
    layers = {
        n: m
        for n, m in parents.items()
        if _convertible(n, m, parents) is None and not match(n, exclude)
    }
    if not layers:
        raise ValueError(f"nothing to convert in {type(model).__name__}")
    explicit = {n: parents[n] for n in explicit_points(model, feedback_points)}
    shape = tuple(example_input_shape)
    with exact(model):
        try:
            t = trace(
                _MetaCall(model), layers, explicit, torch.empty(shape, device="meta"), batch_dims
            )
        except (NotImplementedError, RuntimeError):
            p = next(model.parameters())
            x = torch.zeros(shape, device=p.device, dtype=p.dtype)
            t = trace(model, layers, explicit, x, batch_dims)
    return t.points, t.outputs[t.order[-1]]


def feedback_memory(
    model: nn.Module,
    example_input_shape: Sequence[int],
    classes: int | None = None,
    layout: str = "dense",
    *,
    feedback_points: Sequence[str] | None = None,
    batch_dims: int = 1,
    hashed_rows: int = 1024,
    exclude: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes that the feedback of a direct rule would take for ``model`` on inputs of shape
    ``example_input_shape`` with layout ``layout``, computed without allocating it:
    ``dense`` ``C * sum(d_k)``, ``shared`` ``C * max(d_k)``, ``hashed`` ``hashed_rows * C``
    entries (see :data:`LAYOUTS`). ``classes`` defaults to the output size of the last converted
    layer. Example: ``feedback_memory(resnet18, (1, 3, 224, 224), 1000, "hashed")``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown feedback layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    sizes, out = feedback_sizes(
        model,
        example_input_shape,
        feedback_points=feedback_points,
        batch_dims=batch_dims,
        exclude=exclude,
    )
    c = out if classes is None else classes
    if layout == "dense":
        entries = c * sum(sizes.values())
    elif layout == "shared":
        entries = c * max(sizes.values(), default=1)
    else:
        entries = c * hashed_rows
    return entries * torch.empty((), dtype=dtype).element_size()
