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
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ..rules.base import get_rule, in_backward
from ..rules.direct import NO_TARGETS, DirectRule, FeedbackError
from ..tracing import refuse_tracing
from .nodes import Inject, Pass, Receive, tap
from .norms import check_error, norm_factor
from .positions import Signal, Site, check_rows, features, lead_dims


def buffer_name(prefix: str, key: str) -> str:
    return prefix + key.replace(".", "__")


@dataclass
class _Point:
    site: Site
    tensor: Tensor
    tap: Tensor  # the point's Tap: the empty tensor whose backward sends it B_k s(e)


class DirectFeedback(nn.Module):
    """The feedback of a direct rule for one model; attached to the output layer as
    ``output_layer.direct_feedback`` so that it moves and saves with the model.

    Args:
        rule: ``dfa``, ``sdfa``, ``drtp`` or ``shallow`` (any registered direct rule).
        seed: seed of the random feedback (drawn on the CPU: identical on every device and rank).
        norm: one of :data:`NORMS`.
        batch_dims: None (default): rows by position (:mod:`biograd.direct.positions`): the
            input of a linear-like layer ``(N, *P, d)`` has ``d`` features, ``B_k`` ``(d, C)``
            is shared by its positions, and it receives per-position or pooled signals. An int:
            that many leading dimensions of every point and of the output index samples.
        explicit: points are outputs of named modules (``feedback_points``), not layer inputs.
        error: one of :data:`ERRORS`: the loss's output error (default) or each sample's.
    """

    layout: ClassVar[str] = ""

    def __init__(
        self, rule: str, *, seed: int = 0, norm: str = "launay", batch_dims: int | None = None,
        explicit: bool = False, error: str = "loss",
    ) -> None:  # fmt: skip
        super().__init__()
        norm_factor(norm, 1, 1)
        self.error = check_error(error)
        if batch_dims is not None and batch_dims < 1:
            raise ValueError(f"batch_dims must be at least 1, got {batch_dims}")
        rule_cls = get_rule(rule)
        if not issubclass(rule_cls, DirectRule):
            raise ValueError(f"{rule!r} is not a direct rule")
        self.rule: type[DirectRule] = rule_cls
        self.seed, self.norm, self.batch_dims, self.explicit = seed, norm, batch_dims, explicit
        # Per forward pass (never state): a mode, the pending points, what their taps share,
        # the targets, and which converted layer each point trains (the one that ran last
        # before the point).
        self.exact = False
        self.points: list[_Point] = []
        self.serving = Pass(self)
        self.targets: Tensor | None = None
        self.trains: dict[str, str] = {}
        self.last_layer, self.last_linear = "", True
        # The backward pass in progress (its signal s(e) and the points it serves), for the
        # points that activation checkpointing records while it recomputes a segment.
        self.current: Pass | None = None
        # The factor by which the loss was scaled before backward (fp16 GradScaler): sdfa's and
        # drtp's signals do not carry it, so the engine multiplies them by it.
        self.loss_scale = 1.0

    def extra_repr(self) -> str:
        return (
            f"rule={self.rule.name}, layout={self.layout}, norm={self.norm}, error={self.error}, "
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

    def product(self, s: Tensor, ds: Sequence[int]) -> Tensor:
        """What the layout computes once per backward pass from the signal rows ``s`` for
        points of sizes ``ds``, for :meth:`take` (here: ``s`` itself)."""
        return s

    def take(self, product: Tensor, key: str, d: int) -> Tensor:
        """``s B_k^T`` (rows x d_k) of point ``key`` from the :meth:`product` of ``s``."""
        return product.matmul(self.matrix(key, d).t())

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
        stores = cast(list[dict[str, Tensor | None]], [self._buffers, self._parameters])
        for store in stores:
            for name, old in store.items():
                value = state_dict.get(prefix + name)
                if old is None or value is None or old.shape == value.shape:
                    continue
                new = torch.empty_like(value, device=old.device, dtype=old.dtype)
                is_par = isinstance(old, nn.Parameter)
                store[name] = nn.Parameter(new, old.requires_grad) if is_par else new
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _matrices(self) -> list[Tensor]:
        """The stored feedback tensors (buffers; dkp's Parameters), sizes left out."""
        return [b for b in [*self.buffers(), *self.parameters()] if b.is_floating_point()]

    def nbytes(self) -> int:
        """Memory held by the feedback matrices, in bytes."""
        return sum(b.numel() * b.element_size() for b in self._matrices())

    # ---------------------------------------------------------------- forward protocol
    def record(self, key: str, x: Tensor, linear: bool = True) -> Tensor:
        """Record ``x`` as feedback point ``key`` of this forward pass (``linear``: a tensor of
        a linear-like layer, whose rows are its positions; :func:`lead_dims`); return it
        detached, so that nothing above it back-propagates into it."""
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
        site = Site(key, x.shape, lead_dims(x.dim(), linear, self.batch_dims))
        if x.dim() <= site.lead:
            raise FeedbackError(
                f"feedback point {key!r} has shape {tuple(x.shape)}: no feature dimension after "
                f"its {site.lead} sample dimension(s) (batch_dims={self.batch_dims})"
            )
        self.check(key, site.d)
        if self.last_layer:
            self.trains[key] = self.last_layer
        tapped = tap(x, self.serving, site)  # a graph break under torch.compile
        self.points.append(_Point(site, x, tapped))
        if in_backward() and (self.current is None or key not in self.current.served):
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
            late: Tensor = Receive.apply(x, self, site)
            return late
        return x.detach()

    def late_projection(self, site: Site) -> Tensor | None:
        """``B_k s(e)`` for a point recorded late from the signal of the backward pass in
        progress (None for ``shallow`` or before any backward pass)."""
        sig = None if self.current is None else self.current.signal
        if sig is None:
            return None
        classes = self.classes
        assert classes is not None
        self.materialise({site.key: site.d}, classes, sig.s)
        return Pass(self, sig).projection(site)

    def inject(self, out: Tensor, linear: bool = True) -> Tensor:
        """Route the output (of a linear-like layer if ``linear``) through the node that, in
        backward, projects its gradient onto the feedback points recorded since the last call
        (materialising their feedback first)."""
        points, self.points = self.points, []
        targets, self.targets = self.targets, None
        serving, self.serving = self.serving, Pass(self)
        if self.exact or not torch.is_grad_enabled() or not points:
            return out
        if self.rule.needs_targets and targets is None and self.training:
            raise FeedbackError(NO_TARGETS)  # in eval mode, only if a backward pass follows
        lead = lead_dims(out.dim(), linear, self.batch_dims)
        c, sites = features(out.shape, lead), [p.site for p in points]
        for site in sites:
            check_rows(site, out.shape[:lead], self.batch_dims is None)
        dtype = torch.float32 if torch.is_autocast_enabled(out.device.type) else out.dtype
        like = torch.empty((), device=out.device, dtype=dtype)
        self.materialise({site.key: site.d for site in sites}, c, like)
        if c != self.classes:
            raise FeedbackError(
                f"the output layer gives {c} values per row (shape {tuple(out.shape)}, "
                f"batch_dims={self.batch_dims}), the feedback was made for {self.classes}: set "
                "batch_dims, or convert again after resizing the output layer"
            )
        learned = []
        if self.rule.learned_feedback:
            learned = [*[p.tensor for p in points], *[self.matrix(s.key) for s in sites]]
        result: Tensor = Inject.apply(
            out, serving, targets, sites, lead, *[p.tap for p in points], *learned
        )
        return result

    def signal(self, e: Tensor, out_lead: int, targets: Tensor | None) -> Signal | None:
        """The rule's signal ``s(e)``, one row of ``C`` per output row, in the feedback's dtype
        (None: shallow)."""
        rows = e.shape[:out_lead]
        s = self.rule.signal(e.reshape(math.prod(rows), -1), targets)
        if s is None:
            return None
        if self.rule.scale_free and self.loss_scale != 1.0:
            s = s * self.loss_scale
        if self.error == "per_sample":
            s = s * math.prod(rows)
        return Signal(s.to(self._matrices()[0].dtype), rows, pool=self.batch_dims is None)

    # Hooks are bound methods (not closures) so that ``copy.deepcopy`` and pickle of a model
    # rebind them to the copy's engine. ``linear``: the hooked layer is linear-like.
    def clear_hook(self, module: nn.Module, args: Any) -> None:
        self.points, self.serving, self.current = [], Pass(self), None
        self.last_layer, self.last_linear = "", True

    def input_hook(self, key: str, linear: bool, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if self.explicit or not args:
            return None
        return (self.record(key, args[0], linear), *args[1:])

    def ran_hook(self, key: str, linear: bool, module: nn.Module, args: Any, output: Any) -> None:
        self.last_layer, self.last_linear = key, linear

    def output_hook(self, key: str, linear: bool, module: nn.Module, args: Any, out: Any) -> Any:
        self.last_layer, self.last_linear = key, linear
        return self.inject(out, linear)

    def point_hook(self, key: str, module: nn.Module, args: Any, output: Any) -> Any:
        # an explicit point reads its rows like the converted layer that ran last before it
        return self.record(key, output, self.last_linear)
