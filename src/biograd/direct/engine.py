"""The engine of direct rules: records the feedback points of a forward pass and, in the backward
pass, sends ``B_k s(e)`` to every point ``k`` (Nøkland 2016; placement of Launay, Poli, Krzakala
2019). One subclass per layout (:mod:`biograd.direct.layouts`) says how the ``B_k`` are stored.

The matrices are materialised at the first forward pass that reaches the output with points
(``torch.nn.modules.lazy``'s convention), deterministically from (seed, point name, shape), on the
output's device; a ``state_dict`` loaded before that materialises them with the saved shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..rules.base import get_rule, in_backward
from ..rules.direct import NO_TARGETS, DirectRule, FeedbackError
from ..tracing import refuse_tracing

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


def norm_factor(norm: str, d: int, classes: int) -> float:
    """The factor of :data:`NORMS` scheme ``norm`` for a point of ``d`` features and ``C`` outputs."""
    factors = {"launay": d * classes, "fan_in": classes, "fan_out": d, "none": 1}
    if norm not in factors:
        raise ValueError(f"unknown feedback norm {norm!r}; choose one of {', '.join(NORMS)}")
    return 1.0 / math.sqrt(factors[norm])


def features(shape: Sequence[int], batch_dims: int) -> int:
    """Features per sample of a tensor of ``shape`` whose first ``batch_dims`` index samples."""
    return math.prod(shape[batch_dims:])


def buffer_name(prefix: str, key: str) -> str:
    return prefix + key.replace(".", "__")


@dataclass
class _Point:
    key: str
    tensor: Tensor


class DirectFeedback(nn.Module):
    """The feedback of a direct rule for one model; attached to the output layer as
    ``output_layer.direct_feedback`` so that it moves and saves with the model.

    Args:
        rule: ``dfa``, ``sdfa``, ``drtp`` or ``shallow`` (any registered direct rule).
        seed: seed of the random feedback (drawn on the CPU: identical on every device and rank).
        norm: one of :data:`NORMS`.
        batch_dims: leading dimensions that index samples (2 for per-token outputs of shape
            ``(batch, time, C)``).
        explicit: points are outputs of named modules (``feedback_points``), not layer inputs.
    """

    layout: ClassVar[str] = ""

    def __init__(
        self, rule: str, *, seed: int = 0, norm: str = "launay", batch_dims: int = 1,
        explicit: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        norm_factor(norm, 1, 1)
        if batch_dims < 1:
            raise ValueError(f"batch_dims must be at least 1, got {batch_dims}")
        rule_cls = get_rule(rule)
        if not issubclass(rule_cls, DirectRule):
            raise ValueError(f"{rule!r} is not a direct rule")
        self.rule: type[DirectRule] = rule_cls
        self.seed, self.norm, self.batch_dims, self.explicit = seed, norm, batch_dims, explicit
        # Per forward pass (never state): a mode, the pending points and targets, and which
        # converted layer each point trains (the one that ran last before the point).
        self.exact = False
        self.points: list[_Point] = []
        self.targets: Tensor | None = None
        self.trains: dict[str, str] = {}
        self.last_layer = ""
        # The projected signal s(e) of the backward pass in progress, for the points that
        # activation checkpointing records while it recomputes a segment (reentrant mode).
        self.current_signal: Tensor | None = None
        self.served: set[str] = set()  # the points that signal was projected onto
        # The factor by which the loss was scaled before backward (fp16 GradScaler): sdfa's and
        # drtp's signals do not carry it, so the engine multiplies them by it.
        self.loss_scale = 1.0

    def extra_repr(self) -> str:
        return (
            f"rule={self.rule.name}, layout={self.layout}, norm={self.norm}, "
            f"points={len(self.sizes)}, batch_dims={self.batch_dims}"
        )

    # ---------------------------------------------------------------- the layout's part
    @property
    def sizes(self) -> dict[str, int]:
        """Feature size ``d_k`` of every materialised point, by point key."""
        raise NotImplementedError

    @property
    def classes(self) -> int | None:
        """Outputs ``C`` per sample (None before materialisation)."""
        raise NotImplementedError

    def materialise(self, sizes: dict[str, int], classes: int, like: Tensor) -> None:
        """Draw the feedback of the points in ``sizes`` that have none yet."""
        raise NotImplementedError

    def matrix(self, key: str, d: int | None = None) -> Tensor:
        """The feedback matrix ``B_k`` of point ``key`` as a dense ``(d_k, C)`` tensor."""
        raise NotImplementedError

    def check(self, key: str, d: int) -> None:
        """Raise :class:`FeedbackError` if point ``key`` with ``d`` features cannot have the
        feedback drawn so far (checked on shapes only: no device synchronisation)."""

    def project_signal(self, s: Tensor, keys: Sequence[str], ds: Sequence[int]) -> list[Tensor]:
        """``s B_k^T`` (rows x d_k) for every point."""
        return [s.matmul(self.matrix(k, d).t()) for k, d in zip(keys, ds)]

    @staticmethod
    def entries(sizes: dict[str, int], classes: int, hashed_rows: int) -> int:
        """Entries the layout stores for points of ``sizes`` and ``classes`` outputs."""
        raise NotImplementedError

    def owns(self, name: str) -> str | None:
        """What a buffer called ``name`` is in this layout: ``"matrix"``, ``"int"`` or None."""
        raise NotImplementedError

    def placeholders(self, names: Sequence[str]) -> None:
        """Register empty buffers under saved ``names`` so that ``load_state_dict`` fills them."""
        for n in names:
            size = self.owns(n) == "int"
            self.register_buffer(
                n, torch.empty((), dtype=torch.int64) if size else torch.empty(0, 0)
            )

    def _draw(self, rows: int, classes: int, seed: int, like: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        b = torch.randn(rows, classes, generator=gen, dtype=dtype)
        return b.to(device=like.device, dtype=like.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = [k[len(prefix) :] for k in state_dict if k.startswith(prefix)]
        alien = [n for n in saved if not self.owns(n)]
        if alien:
            raise FeedbackError(
                f"the checkpoint holds direct feedback {alien[:3]} of another layout; this model "
                f"uses layout={self.layout!r}: convert with the layout it was saved with"
            )
        self.placeholders(
            [n for n in saved if n not in self._buffers and n not in self._parameters]
        )
        for name, buf in self._buffers.items():
            value = state_dict.get(prefix + name)
            if buf is not None and value is not None and buf.shape != value.shape:
                self._buffers[name] = torch.empty_like(value, device=buf.device, dtype=buf.dtype)
        for name, par in self._parameters.items():
            value = state_dict.get(prefix + name)
            if par is not None and value is not None and par.shape != value.shape:
                empty = torch.empty_like(value, device=par.device, dtype=par.dtype)
                self._parameters[name] = nn.Parameter(empty, par.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _matrices(self) -> list[Tensor]:
        """The stored feedback tensors (buffers; dkp's Parameters), sizes left out."""
        return [b for b in [*self.buffers(), *self.parameters()] if b.is_floating_point()]

    def nbytes(self) -> int:
        """Memory held by the feedback matrices, in bytes."""
        return sum(b.numel() * b.element_size() for b in self._matrices())

    # ---------------------------------------------------------------- forward protocol
    def record(self, key: str, x: Tensor) -> Tensor:
        """Record ``x`` as feedback point ``key`` of this forward pass; return it detached, so
        that nothing above it back-propagates into it."""
        if self.exact or not torch.is_grad_enabled():
            return x
        refuse_tracing(self.rule.name)
        if not isinstance(x, Tensor):
            raise FeedbackError(
                f"feedback point {key!r} must be one tensor, got {type(x).__name__}"
            )
        if not x.requires_grad:
            return x
        if any(p.tensor is x for p in self.points):
            return x.detach()
        if x.dim() <= self.batch_dims:
            raise FeedbackError(
                f"feedback point {key!r} has shape {tuple(x.shape)}: no feature dimension after "
                f"batch_dims={self.batch_dims}"
            )
        self.check(key, features(x.shape, self.batch_dims))
        if self.last_layer:
            self.trains[key] = self.last_layer
        self.points.append(_Point(key, x))
        if in_backward() and key not in self.served:
            # A checkpointed segment recomputed in the backward pass whose first forward ran
            # without autograd (reentrant checkpointing), so the output's backward, which has
            # run, could not serve this point: it takes its projection of s(e) now.
            # (Non-reentrant checkpointing served the point in that backward already and uses
            # the recomputed tensors as saved values only: detached, as in the forward.)
            if self.rule.learned_feedback:
                raise FeedbackError(
                    f"{self.rule.name} learns its feedback matrices from the points' activities, "
                    "which reentrant activation checkpointing hides from the output's backward: "
                    "use torch.utils.checkpoint with use_reentrant=False"
                )
            late: Tensor = _Receive.apply(x, self, key)
            return late
        return x.detach()

    def late_projection(self, key: str, shape: torch.Size) -> Tensor | None:
        """``B_k s(e)`` for point ``key`` of ``shape`` from the signal of the backward pass in
        progress (None for ``shallow`` or before any backward pass)."""
        s = self.current_signal
        if s is None:
            return None
        bd = self.batch_dims
        if features(shape[:bd], 0) != s.shape[0]:
            raise FeedbackError(
                f"feedback point {key!r} recomputed with shape {tuple(shape)}: its sample "
                f"dimensions differ from the output's ({s.shape[0]} rows, batch_dims={bd})"
            )
        d = features(shape, bd)
        classes = self.classes
        assert classes is not None
        self.materialise({key: d}, classes, s)
        return self.project_signal(s, [key], [d])[0].reshape(shape)

    def inject(self, out: Tensor) -> Tensor:
        """Route the output through the node that, in backward, projects its gradient onto the
        feedback points recorded since the last call (materialising their feedback first)."""
        points, self.points = self.points, []
        targets, self.targets = self.targets, None
        if self.exact or not torch.is_grad_enabled() or not points:
            return out
        if self.rule.needs_targets and targets is None and self.training:
            raise FeedbackError(NO_TARGETS)  # in eval mode, only if a backward pass follows
        bd = self.batch_dims
        c, rows = features(out.shape, bd), features(out.shape[:bd], 0)
        for p in points:
            if features(p.tensor.shape[:bd], 0) != rows:
                raise FeedbackError(
                    f"feedback point {p.key!r} has shape {tuple(p.tensor.shape)} with batch_dims="
                    f"{bd}, the output {tuple(out.shape)}: their sample dimensions differ (set "
                    "batch_dims in biograd.convert)"
                )
        dtype = torch.float32 if torch.is_autocast_enabled(out.device.type) else out.dtype
        like = torch.empty((), device=out.device, dtype=dtype)
        self.materialise({p.key: features(p.tensor.shape, bd) for p in points}, c, like)
        if c != self.classes:
            raise FeedbackError(
                f"the output layer gives {c} values per sample (shape {tuple(out.shape)}, "
                f"batch_dims={bd}), the feedback was made for {self.classes}: set batch_dims, or "
                "convert again after resizing the output layer"
            )
        keys = [p.key for p in points]
        learned = [self.matrix(k) for k in keys] if self.rule.learned_feedback else []
        result: Tensor = _Inject.apply(
            out, self, targets, keys, len(points), *[p.tensor for p in points], *learned
        )
        return result

    def project(
        self, e: Tensor, keys: Sequence[str], shapes: Sequence[torch.Size], targets: Tensor | None
    ) -> list[Tensor | None]:
        """``B_k s(e)`` flattened per sample for each point ``k`` (``None`` for ``shallow``);
        ``s(e)`` is kept for points that checkpointing recomputes later in this backward pass."""
        s = self.signal(e, targets)
        self.current_signal, self.served = s, set(keys)
        if s is None:
            return [None] * len(keys)
        ds = [features(shape, self.batch_dims) for shape in shapes]
        return list(self.project_signal(s, keys, ds))

    def signal(self, e: Tensor, targets: Tensor | None) -> Tensor | None:
        """The rule's signal ``s(e)``, ``(rows, C)`` in the feedback's dtype (None: shallow)."""
        rows = features(e.shape[: self.batch_dims], 0)
        s = self.rule.signal(e.reshape(rows, -1), targets)
        if s is None:
            return None
        if self.rule.scale_free and self.loss_scale != 1.0:
            s = s * self.loss_scale
        return s.to(self._matrices()[0].dtype)

    # Hooks are bound methods (not closures) so that ``copy.deepcopy`` and pickle of a model
    # rebind them to the copy's engine.
    def clear_hook(self, module: nn.Module, args: Any) -> None:
        self.points, self.last_layer, self.current_signal, self.served = [], "", None, set()

    def input_hook(self, key: str, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if self.explicit or not args:
            return None
        return (self.record(key, args[0]), *args[1:])

    def ran_hook(self, key: str, module: nn.Module, args: Any, output: Any) -> None:
        self.last_layer = key

    def output_hook(self, key: str, module: nn.Module, args: Any, output: Any) -> Any:
        self.last_layer = key
        return self.inject(output)

    def point_hook(self, key: str, module: nn.Module, args: Any, output: Any) -> Any:
        return self.record(key, output)


class _Inject(torch.autograd.Function):
    """Identity on the output; its backward sends ``B_k s(e)`` to every feedback point. Under a
    rule with learned feedback (``dkp``) the matrices ``B_k`` are inputs too, and receive the
    rule's ``feedback_grad(a_k, s)`` from the points' activities ``a_k``."""

    @staticmethod
    def forward(
        out: Tensor, engine: DirectFeedback, targets: Tensor | None, keys: list[str],
        n: int, *tensors: Tensor,
    ) -> Tensor:  # fmt: skip
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        # forward and setup_context apart: what torch.func.grad needs of a Function
        _, engine, targets, keys, n, *tensors = inputs
        points, learned = tensors[:n], tensors[n:]
        ctx.engine, ctx.targets, ctx.keys, ctx.learned = engine, targets, keys, bool(learned)
        ctx.shapes = [p.shape for p in points]
        ctx.dtypes = [(p.dtype, p.device) for p in points]
        if learned:
            ctx.save_for_backward(*points)

    @staticmethod
    def backward(ctx: Any, e: Tensor) -> tuple[Tensor | None, ...]:
        engine: DirectFeedback = ctx.engine
        flat = engine.project(e, ctx.keys, ctx.shapes, ctx.targets)
        s = engine.current_signal
        grads = [
            None if f is None else f.to(dtype=dt, device=dev).reshape(shape)
            for f, shape, (dt, dev) in zip(flat, ctx.shapes, ctx.dtypes)
        ]
        learned: list[Tensor | None] = []
        if ctx.learned:
            learned = [
                None if s is None else engine.rule.feedback_grad(a.to(s.dtype), s)
                for a in ctx.saved_tensors
            ]
        return (e, None, None, None, None, *grads, *learned)


class _Receive(torch.autograd.Function):
    """A feedback point recorded during a backward pass (a checkpointed segment recomputed):
    identity on the point; its backward drops the gradient from above, as a detached point
    does, and sends ``B_k s(e)`` of the backward pass in progress instead."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, engine: DirectFeedback, key: str) -> Tensor:
        ctx.engine, ctx.key, ctx.shape, ctx.dtype = engine, key, x.shape, x.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        g = ctx.engine.late_projection(ctx.key, ctx.shape)
        return (None if g is None else g.to(ctx.dtype), None, None)
