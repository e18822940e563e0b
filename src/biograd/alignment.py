"""Alignment with backprop: how far each rule's feedback and updates are from the true gradient.

Three instruments (definitions and formulas in ``docs/alignment.md``):

- :func:`weight_alignment`: the angle between a layer's forward weight and its feedback matrix
  (Lillicrap et al. 2016, Fig. 2; Liao et al. 2016), or for direct rules between a feedback
  point's matrix and the linearised backprop path to it (Launay, Poli, Krzakala 2019).
- :func:`gradient_alignment`: on one batch and the same parameters, the angle between the rule's
  weight gradient and backprop's, the per-sample cosine between the rule's and backprop's delta at
  each layer's output (Launay et al. 2019, Sec. 3), and the angle for the whole network.
- :class:`AlignmentMonitor`: both of the above every ``N`` training steps, appended to
  ``alignment.csv`` (and TensorBoard when it is installed).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .convert import converted_layers, exact, feedback_weight, needs_targets, set_targets
from .direct import DirectFeedback
from .nn.layers import FeedbackLayer
from .rules.base import Rule

log = logging.getLogger("biograd")

NETWORK = "<network>"
"""Layer name of the whole-network row of :func:`gradient_alignment`."""

CSV_COLUMNS = (
    "rule", "seed", "epoch", "step", "layer", "kind",
    "angle", "norm_ratio", "delta_cos_mean", "delta_cos_std",
)  # fmt: skip
"""Columns of ``alignment.csv`` (one row per measurement, layer and kind)."""

LossFn = Callable[[Any, Any], Tensor]


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
    """``W_L ... W_k``, the products of the forward weights from a layer (k) to the output layer
    (L), built from the output down and shared between layers; None where the path is not a
    plain chain of ``nn.Linear`` layers in module order whose shapes chain."""

    def __init__(self, model: nn.Module, output: nn.Module | None) -> None:
        self.weighted = [
            m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
        ]
        self.index = {id(m): i for i, m in enumerate(self.weighted)}
        self.out = None if output is None else self.index.get(id(output))
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
    """Per converted layer, the angle between its feedback and what backprop would use.

    Feedback-alignment family (``bp fa usf frsf brsf kp``): the angle in degrees between
    ``vec(W)`` and ``vec(B)``, with ``B = biograd.feedback_weight(layer)``, and the norm ratio
    ``||B||_F / ||W||_F`` (Lillicrap et al. 2016; Moskovitz et al. 2018).

    Direct rules (``dfa sdfa drtp shallow``): the row of a layer describes the matrix that
    *trains it*, ``B_k = biograd.feedback_weight(layer)`` of shape ``(d_k, C)`` at the feedback
    point ``k`` its output reaches (for an MLP the next layer's input). Backprop would send the
    error there through the Jacobian of the output with respect to the point; in a linear
    network this is the product of the forward weights above it, ``P_k = W_L ... W_{l+1}``
    (``C x d_k``). The entry is the angle between ``vec(B_k)`` and ``vec(P_k^T)`` and the ratio
    ``||B_k|| / ||P_k||``: a linear-network approximation (Launay, Poli, Krzakala 2019, Sec. 3).
    Where the path is not a plain product of matrices (a convolution, a branch, or layers whose
    shapes do not chain in module order), both values are NaN: use :func:`gradient_alignment`,
    which measures the real thing on data. Layers without such a matrix (the output layer, and
    every layer before the first forward pass) are left out.

    Returns:
        ``{layer_name: {"angle": degrees, "norm_ratio": ratio}}``.
    """
    out: dict[str, dict[str, float]] = {}
    layers = list(converted_layers(model))
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


# --------------------------------------------------------------------------- gradient alignment
@dataclass
class _Snapshot:
    """Everything a measurement pass can change, to put back afterwards."""

    grads: list[tuple[Tensor, Tensor | None]]
    buffers: list[tuple[Tensor, Tensor]]
    versions: list[tuple[str, Tensor, int]]
    engines: list[tuple[DirectFeedback, list[Any], Tensor | None, dict[str, str]]]
    cpu_rng: Tensor
    cuda_rng: list[Tensor] | None = field(default=None)

    @classmethod
    def take(cls, model: nn.Module) -> _Snapshot:
        # Floating rule state (B, scales, direct feedback) is never written by a forward or
        # backward pass: it is checked by version counter instead of copied. Everything else
        # (counters such as brsf's step, batch norm running statistics, user buffers) is copied.
        fixed = {
            id(b)
            for m in model.modules()
            if isinstance(m, (Rule, DirectFeedback))
            for b in m.buffers(recurse=False)
            if b.is_floating_point()
        }
        buffers, versions = [], []
        for name, b in model.named_buffers():
            if id(b) in fixed:
                versions.append((name, b, b._version))
            else:
                buffers.append((b, b.detach().clone()))
        engines = [m for m in model.modules() if isinstance(m, DirectFeedback)]
        return cls(
            grads=[(p, p.grad) for p in model.parameters()],
            buffers=buffers,
            versions=versions,
            engines=[(e, list(e.points), e.targets, dict(e.trains)) for e in engines],
            cpu_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        )

    def rewind(self) -> None:
        """Put back what one forward pass changes: RNG, brsf steps, batch-norm statistics."""
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        with torch.no_grad():
            for b, saved in self.buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)

    def restore(self) -> None:
        """Put everything back as it was when the snapshot was taken."""
        self.rewind()
        for p, g in self.grads:
            p.grad = g
        for engine, points, targets, trains in self.engines:
            engine.points, engine.targets, engine.trains = points, targets, trains
        for name, b, version in self.versions:
            if b._version != version:
                raise RuntimeError(f"biograd: feedback buffer {name!r} was modified in place")


@dataclass
class _Pass:
    grads: list[Tensor | None]
    deltas: dict[str, list[Tensor | None]]


def _delta_hooks(
    layers: Mapping[str, FeedbackLayer], deltas: dict[str, list[Tensor | None]]
) -> list[Any]:
    """Forward hooks that record, for every call of every layer, the gradient that reaches the
    layer's output in the next backward pass (``dLoss/da``, the layer's delta)."""

    def capture(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.requires_grad:
                calls = deltas[name]
                index = len(calls)
                calls.append(None)

                def store(g: Tensor | None) -> None:
                    if g is not None:
                        calls[index] = g.detach()

                out.register_hook(store)

        return hook

    return [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]


def _run_pass(setup: _Setup, loss_fn: LossFn, inputs: Any, targets: Any) -> _Pass:
    deltas: dict[str, list[Tensor | None]] = {name: [] for name in setup.layers}
    handles = _delta_hooks(setup.layers, deltas)
    try:
        if setup.needs_targets:
            set_targets(setup.model, targets)
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        with torch.enable_grad():
            loss = loss_fn(setup.model(*args), targets)
            grads = torch.autograd.grad(loss, setup.params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return _Pass(list(grads), deltas)


@dataclass
class _Setup:
    """The converted layers and trainable parameters that a measurement compares."""

    model: nn.Module
    layers: dict[str, FeedbackLayer]
    params: list[Tensor]
    weights: dict[str, int]  # layer name -> index of its weight in params
    needs_targets: bool

    @classmethod
    def of(cls, model: nn.Module) -> _Setup:
        layers = dict(converted_layers(model))
        if not layers:
            raise ValueError(
                "gradient_alignment: the model has no converted layer; use biograd.convert"
            )
        feedback = {id(p) for m in model.modules() if isinstance(m, Rule) for p in m.parameters()}
        params: list[Tensor] = [
            p for p in model.parameters() if p.requires_grad and id(p) not in feedback
        ]
        index = {id(p): i for i, p in enumerate(params)}
        weights = {n: index[id(m.weight)] for n, m in layers.items() if id(m.weight) in index}
        return cls(model, layers, params, weights, needs_targets(model))


def _exact_pass(setup: _Setup, loss_fn: LossFn, inputs: Any, targets: Any) -> _Pass:
    """Backprop's side of a measurement, leaving the model's state as found."""
    snap = _Snapshot.take(setup.model)
    try:
        with exact(setup.model):
            return _run_pass(setup, loss_fn, inputs, targets)
    finally:
        snap.restore()


def _delta_cosines(rule: list[Tensor | None], bp: list[Tensor | None]) -> tuple[float, float]:
    """Mean and standard deviation over samples of ``cos(delta_rule_i, delta_bp_i)``; each call
    of the layer contributes its samples (first dimension); samples where either delta is zero
    are left out."""
    cosines: list[float] = []
    for r, b in zip(rule, bp):
        if r is None or b is None:
            continue
        r2, b2 = _same_dtype(_wide(r).view(r.shape[0], -1), _wide(b).view(b.shape[0], -1))
        norms = torch.linalg.vector_norm(r2, dim=1) * torch.linalg.vector_norm(b2, dim=1)
        cosines += (torch.linalg.vecdot(r2, b2) / norms).tolist()
    # NaN (0/0) where a delta is zero; float32 rounding can step just outside [-1, 1]
    cosines = [min(1.0, max(-1.0, c)) for c in cosines if math.isfinite(c)]
    if not cosines:
        return math.nan, math.nan
    mean = math.fsum(cosines) / len(cosines)
    return mean, math.sqrt(math.fsum((c - mean) ** 2 for c in cosines) / len(cosines))


def gradient_alignment(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any
) -> dict[str, dict[str, float]]:
    """How far the rule's updates are from backprop's on one batch, layer by layer.

    The model runs the batch twice, once on its rules and once under ``biograd.exact(model)``
    (true backprop; the same model, no copy), each time from the same RNG state and the same
    brsf step, so dropout masks and brsf's ``B_t`` are those of the rule's own training step.
    Gradients come from ``torch.autograd.grad``; ``.grad`` is never written. Afterwards every
    ``.grad``, buffer (batch-norm statistics included), the torch RNG states (CPU, and CUDA
    when initialised), brsf steps, each layer's last feedback and the direct-feedback engine's
    pending state are as they were. Direct rules that need targets (``drtp``) get ``targets``
    through ``biograd.set_targets`` before each forward pass.

    Args:
        model: a model converted with ``biograd.convert``, in train or eval mode.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns the scalar loss.
        inputs: a tensor, or a tuple of positional inputs.
        targets: whatever ``loss_fn`` takes as its second argument.

    Returns:
        Per converted layer ``{"angle", "delta_cos_mean", "delta_cos_std"}``: the angle in
        degrees between the rule's and backprop's gradient of ``layer.weight``, and the mean and
        standard deviation over samples of the cosine between the rule's and backprop's
        ``dLoss/d(layer output)`` (Launay et al. 2019, Sec. 3); and under ``"<network>"``
        ``{"angle"}``, the angle between the concatenated gradients of all trainable parameters
        (Kolen-Pollack's feedback excluded). NaN where a quantity is undefined (a zero
        gradient, e.g. the hidden layers of ``shallow``).
    """
    setup = _Setup.of(model)
    snap = _Snapshot.take(model)
    try:
        rule = _run_pass(setup, loss_fn, inputs, targets)
        snap.rewind()
        with exact(model):
            bp = _run_pass(setup, loss_fn, inputs, targets)
    finally:
        snap.restore()
    return _compare(setup, rule, bp)


def _compare(setup: _Setup, rule: _Pass, bp: _Pass) -> dict[str, dict[str, float]]:
    per_param: list[_Pairs | None] = []
    for r, b in zip(rule.grads, bp.grads):
        if r is None and b is None:
            per_param.append(None)
            continue
        if r is None:
            assert b is not None
            r = torch.zeros_like(b)
        elif b is None:
            b = torch.zeros_like(r)
        per_param.append(_Pairs([(r, b)]))
    result: dict[str, dict[str, float]] = {}
    for name in setup.layers:
        i = setup.weights.get(name)
        pair = per_param[i] if i is not None else None
        mean, std = _delta_cosines(rule.deltas[name], bp.deltas[name])
        result[name] = {
            "angle": pair.angle() if pair is not None else math.nan,
            "delta_cos_mean": mean,
            "delta_cos_std": std,
        }
    result[NETWORK] = {"angle": _Pairs.join([p for p in per_param if p is not None]).angle()}
    return result


class _Capture:
    """The rule's side of a measurement, read off the training step that follows it: armed by
    :meth:`AlignmentMonitor.measure` with ``reuse_step=True``, it records the deltas and the
    parameter gradients of the first forward/backward pass of the model whose first input is
    the measured batch."""

    def __init__(self, setup: _Setup, inputs: Any) -> None:
        self.setup = setup
        self.first = inputs[0] if isinstance(inputs, tuple) else inputs
        self.deltas: dict[str, list[Tensor | None]] = {name: [] for name in setup.layers}
        self.grads: list[Tensor | None] = [None] * len(setup.params)
        self.matched = False
        self.handles: list[Any] = [setup.model.register_forward_pre_hook(self._pre)]

    def _pre(self, module: nn.Module, args: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if not (args and args[0] is self.first and torch.is_grad_enabled()):
            return
        self.matched = True
        self.handles = _delta_hooks(self.setup.layers, self.deltas)
        self.handles.append(self.setup.model.register_forward_hook(self._post))
        for i, p in enumerate(self.setup.params):
            self.handles.append(p.register_hook(self._store(i)))

    def _post(self, module: nn.Module, args: Any, out: Any) -> None:
        # no more delta hooks after this forward pass; the parameter hooks stay for its backward
        n = len(self.setup.layers)
        for h in self.handles[: n + 1]:
            h.remove()
        self.handles = self.handles[n + 1 :]

    def _store(self, i: int) -> Callable[[Tensor], None]:
        def store(g: Tensor) -> None:
            if self.grads[i] is None:
                self.grads[i] = g.detach()

        return store

    def finish(self, bp: _Pass) -> dict[str, dict[str, float]] | None:
        """The comparison with ``bp``, or None if the training step did not run the batch."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if not self.matched or all(g is None for g in self.grads):
            return None
        return _compare(self.setup, _Pass(self.grads, self.deltas), bp)


# --------------------------------------------------------------------------- monitor
def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def _main_rule(model: nn.Module) -> str:
    rules = [m.feedback_rule for _, m in converted_layers(model)]
    return max(set(rules), key=rules.count) if rules else ""


class AlignmentMonitor:
    """Measures :func:`weight_alignment` and :func:`gradient_alignment` every ``every`` steps of
    a training loop and appends the rows to ``alignment.csv`` (columns :data:`CSV_COLUMNS`) and,
    when the ``tensorboard`` package is installed, to a TensorBoard log.

    Call :meth:`maybe_measure` once per step with the step's batch. With ``every=0`` (or on a
    step that is not a multiple of ``every``) it returns at once: one comparison.

    Two ways to get the rule's side of the gradient comparison:

    - ``reuse_step=False`` (default): :func:`gradient_alignment` runs the rule and backprop on
      the batch itself (two forward/backward passes) and leaves the model as it found it; call
      it anywhere in the step.
    - ``reuse_step=True``: only backprop's pass runs at the call; the rule's deltas and gradients
      are read (by hooks, without copies of the model) off the training step's own
      forward/backward pass, which must come next and take the same ``inputs`` object as its
      first argument: call ``maybe_measure`` right before the training forward pass. The RNG
      and brsf state are restored before that pass, so its dropout masks and ``B_t`` are those
      backprop's pass used. The gradient rows are written at the next call of
      ``maybe_measure`` (or at :meth:`close`). This halves the cost of a measurement.

    Args:
        model: the converted model being trained.
        loss_fn: ``loss_fn(model(inputs), targets)``, as in training.
        every: measure when ``step % every == 0``; 0 or less turns the monitor off.
        csv_path: file to append rows to (header written when the file is new or empty).
        tensorboard_dir: directory of a TensorBoard event file; ignored (with a warning) when
            ``tensorboard`` is not installed.
        tags: values of the ``rule`` and ``seed`` columns (default: the model's most common
            rule, and an empty seed).
        reuse_step: see above.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        every: int = 100,
        csv_path: str | Path | None = None,
        tensorboard_dir: str | Path | None = None,
        tags: Mapping[str, Any] | None = None,
        reuse_step: bool = False,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.every = int(every)
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.reuse_step = reuse_step
        tags = dict(tags or {})
        self.rule = str(tags.get("rule", _main_rule(model)))
        self.seed = tags.get("seed", "")
        self._pending: tuple[dict[str, Any], _Capture, _Pass] | None = None
        self._writer: Any = None
        if tensorboard_dir is not None and self.every > 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: alignment goes to alignment.csv only")
            else:
                self._writer = SummaryWriter(str(tensorboard_dir))

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def maybe_measure(
        self, step: int, epoch: int, inputs: Any, targets: Any
    ) -> list[dict[str, Any]]:
        """Measure on this batch if ``step`` is a multiple of ``every``; return the rows written
        by this call (empty otherwise)."""
        if self.every <= 0:
            return []
        rows = self._finish() if self._pending is not None else []
        if step % self.every:
            return rows
        return rows + self.measure(step, epoch, inputs, targets)

    def measure(self, step: int, epoch: int, inputs: Any, targets: Any) -> list[dict[str, Any]]:
        """Measure now and write the rows: one ``weight`` row per layer with a feedback matrix,
        one ``gradient`` row per converted layer, and a ``gradient`` row for ``<network>``
        (with ``reuse_step``, the gradient rows come at the next call)."""
        if self._pending is not None:
            self._finish()
        base = {"rule": self.rule, "seed": self.seed, "epoch": epoch, "step": step}
        rows = self._rows(base, "weight", weight_alignment(self.model))
        if self.reuse_step:
            setup = _Setup.of(self.model)
            bp = _exact_pass(setup, self.loss_fn, inputs, targets)
            self._pending = (base, _Capture(setup, inputs), bp)
        else:
            grad = gradient_alignment(self.model, self.loss_fn, inputs, targets)
            rows += self._rows(base, "gradient", grad)
        self._write(rows)
        return rows

    def _finish(self) -> list[dict[str, Any]]:
        assert self._pending is not None
        base, capture, bp = self._pending
        self._pending = None
        grad = capture.finish(bp)
        if grad is None:
            log.warning(
                "alignment: the step after the measurement at step %s did not run its batch; "
                "with reuse_step=True call maybe_measure right before the training forward pass",
                base["step"],
            )
            return []
        rows = self._rows(base, "gradient", grad)
        self._write(rows)
        return rows

    @staticmethod
    def _rows(
        base: dict[str, Any], kind: str, values: dict[str, dict[str, float]]
    ) -> list[dict[str, Any]]:
        empty = dict.fromkeys(("angle", "norm_ratio", "delta_cos_mean", "delta_cos_std"), math.nan)
        return [{**base, "layer": k, "kind": kind, **empty, **v} for k, v in values.items()]

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self.csv_path is not None:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            with self.csv_path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerows({k: _cell(row[k]) for k in CSV_COLUMNS} for row in rows)
        if self._writer is not None:
            for row in rows:
                for key in ("angle", "delta_cos_mean"):
                    value = row[key]
                    if isinstance(value, float) and math.isfinite(value):
                        tag = f"alignment/{row['kind']}_{key}/{row['layer']}"
                        self._writer.add_scalar(tag, value, row["step"])

    def flush(self) -> list[dict[str, Any]]:
        """Write the pending measurement of ``reuse_step`` (its training step must have run);
        return the rows written. A trainer calls this before it checkpoints."""
        return self._finish() if self._pending is not None else []

    def close(self) -> None:
        """Write a pending measurement, then flush and close the TensorBoard writer, if any."""
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> AlignmentMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
