"""The alignment monitor of a training loop: :func:`biograd.weight_alignment` and
:func:`biograd.gradient_alignment` every ``N`` steps, appended to ``alignment.csv`` (and
TensorBoard when it is installed). Also ``biograd.AlignmentMonitor`` and
``biograd.alignment.AlignmentMonitor``."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..alignment.gradients import (
    LossFn,
    _compare,
    _delta_hooks,
    _isolated_pass,
    _Pass,
    _Setup,
    gradient_alignment,
)
from ..alignment.weights import weight_alignment
from ..calls import TARGET_KEY, Call, LossCall
from ..convert import converted_layers

log = logging.getLogger("biograd")

CSV_COLUMNS = (
    "rule", "seed", "epoch", "step", "layer", "kind",
    "angle", "norm_ratio", "delta_cos_mean", "delta_cos_std",
)  # fmt: skip
"""Columns of ``alignment.csv`` (one row per measurement, layer and kind). For direct rules a
``weight`` row's ``layer`` is the layer that the feedback matrix trains."""

METRICS = ("angle", "delta_cos_mean")
"""The row values logged by default (``norm_ratio`` and ``delta_cos_std`` can be added)."""


def metric_name(row: Mapping[str, Any], key: str) -> str:
    """The name under which value ``key`` of an alignment row is logged (TensorBoard, the
    framework integrations): ``alignment/{kind}_{key}/{layer}``."""
    return f"alignment/{row['kind']}_{key}/{row['layer']}"


def metrics(rows: Iterable[Mapping[str, Any]], keys: Sequence[str] = METRICS) -> dict[str, float]:
    """The finite values ``keys`` of alignment ``rows`` by :func:`metric_name` (undefined values,
    NaN, are left out: loggers plot them badly)."""
    out: dict[str, float] = {}
    for row in rows:
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[metric_name(row, key)] = float(value)
    return out


class _Capture:
    """The rule's side of a ``reuse_step`` measurement, read off the training step that follows
    it: the deltas and parameter gradients of the first forward/backward pass of the model whose
    first tensor argument (positional, else keyword) is that of the measured batch."""

    def __init__(self, setup: _Setup, batch: LossCall) -> None:
        self.setup = setup
        self.first = batch.first_tensor()
        self.deltas: dict[str, list[Tensor | None]] = {name: [] for name in setup.layers}
        self.grads: list[Tensor | None] = [None] * len(setup.params)
        self.matched = False
        self.handles: list[Any] = [
            setup.model.register_forward_pre_hook(self._pre, with_kwargs=True)
        ]

    def _pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._remove(len(self.handles))
        if not (Call(*args, **kwargs).first_tensor() is self.first and torch.is_grad_enabled()):
            return
        self.matched = True
        self.handles = _delta_hooks(self.setup.layers, self.deltas)
        self.handles.append(self.setup.model.register_forward_hook(self._post))
        for i, p in enumerate(self.setup.params):
            self.handles.append(p.register_hook(self._store(i)))

    def _post(self, module: nn.Module, args: Any, out: Any) -> None:
        # no more delta hooks after this forward pass; the parameter hooks stay for its backward
        self._remove(len(self.setup.layers) + 1)

    def _remove(self, n: int) -> None:
        for h in self.handles[:n]:
            h.remove()
        self.handles = self.handles[n:]

    def _store(self, i: int) -> Callable[[Tensor], None]:
        def store(g: Tensor) -> None:
            if self.grads[i] is None:
                self.grads[i] = g.detach()

        return store

    def finish(self, bp: _Pass) -> dict[str, dict[str, float]] | None:
        """The comparison with ``bp``, or None if the training step did not run the batch."""
        self._remove(len(self.handles))
        if not self.matched or all(g is None for g in self.grads):
            return None
        return _compare(self.setup, _Pass(self.grads, self.deltas), bp)


def _main_rule(model: nn.Module) -> str:
    rules = [m.feedback_rule for _, m in converted_layers(model)]
    return max(set(rules), key=rules.count) if rules else ""


class AlignmentMonitor:
    """Measures :func:`weight_alignment` and :func:`gradient_alignment` every ``every`` steps of
    a training loop and appends the rows to ``alignment.csv`` (columns :data:`CSV_COLUMNS`) and,
    when the ``tensorboard`` package is installed, to a TensorBoard log.

    Call :meth:`maybe_measure` once per step with the step's batch (any batch
    :func:`gradient_alignment` takes: a tensor, positional inputs, a Hugging Face dict; or a
    ``closure`` that runs the forward pass and returns the loss). With ``every=0`` (or on a step
    that is not a multiple of ``every``) it returns at once: one comparison.

    Two ways to get the rule's side of the gradient comparison:

    - ``reuse_step=False`` (default): :func:`gradient_alignment` runs the rule and backprop on
      the batch itself (two forward/backward passes) and leaves the model as it found it; call
      it anywhere in the step.
    - ``reuse_step=True``: only backprop's pass runs at the call; the rule's deltas and gradients
      are read (by hooks, without copies of the model) off the training step's own
      forward/backward pass, which must come next and take the same ``inputs`` object as its
      first tensor argument: call ``maybe_measure`` right before the training forward pass. The RNG
      and brsf state are restored before that pass, so its dropout masks and ``B_t`` are those
      backprop's pass used. The gradient rows are written at the next call of
      ``maybe_measure`` (or at :meth:`close`). This halves the cost of a measurement.

    Args:
        model: the converted model being trained.
        loss_fn: ``loss_fn(output, targets)``, as in training (``targets`` None: the batch);
            None reads ``output.loss`` (see :func:`gradient_alignment`).
        every: measure when ``step % every == 0``; 0 or less turns the monitor off.
        csv_path: file to append rows to (header written when the file is new or empty).
        tensorboard_dir: directory of a TensorBoard event file; ignored (with a warning) when
            ``tensorboard`` is not installed.
        tags: values of the ``rule`` and ``seed`` columns (default: the model's most common
            rule, and an empty seed).
        reuse_step: see above.
        target_key: where ``drtp``'s targets are in a batch without ``targets`` (see
            :func:`gradient_alignment`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        every: int = 100,
        csv_path: str | Path | None = None,
        tensorboard_dir: str | Path | None = None,
        tags: Mapping[str, Any] | None = None,
        reuse_step: bool = False,
        target_key: str | int | None = TARGET_KEY,
    ) -> None:
        self.model, self.loss_fn, self.target_key = model, loss_fn, target_key
        self.every, self.reuse_step = int(every), reuse_step
        self.csv_path = Path(csv_path) if csv_path is not None else None
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

    def maybe_measure(self, step: int, epoch: int, *batch: Any, **kwargs: Any) -> list[Any]:
        """:meth:`measure` (same arguments) if ``step`` is a multiple of ``every``; return the
        rows written by this call (a pending ``reuse_step`` measurement's included)."""
        if self.every <= 0:
            return []
        rows = self.flush()
        return rows if step % self.every else rows + self.measure(step, epoch, *batch, **kwargs)

    def measure(
        self,
        step: int,
        epoch: int,
        inputs: Any = None,
        targets: Any = None,
        *,
        closure: Callable[[], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Measure now and write the rows: one ``weight`` row per layer with a feedback matrix,
        one ``gradient`` row per converted layer, and a ``gradient`` row for ``<network>``
        (with ``reuse_step``, the gradient rows come at the next call)."""
        self.flush()
        base = {"rule": self.rule, "seed": self.seed, "epoch": epoch, "step": step}
        rows = self._rows(base, "weight", weight_alignment(self.model))
        batch = LossCall(self.loss_fn, inputs, targets, closure=closure, target_key=self.target_key)
        if self.reuse_step:
            if batch.first_tensor() is None:
                raise ValueError("reuse_step=True needs the batch's inputs, not a closure")
            setup = _Setup.of(self.model)
            bp = _isolated_pass(setup, batch, True)  # before the capture's hooks are armed
            self._pending = (base, _Capture(setup, batch), bp)
        else:
            grad = gradient_alignment(
                self.model, self.loss_fn, inputs, targets, closure=closure,
                target_key=self.target_key,
            )  # fmt: skip
            rows += self._rows(base, "gradient", grad)
        self._write(rows)
        return rows

    def flush(self) -> list[dict[str, Any]]:
        """Write the pending measurement of ``reuse_step`` (its training step must have run);
        return the rows written. A trainer calls this before it checkpoints."""
        if self._pending is None:
            return []
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
        empty = dict.fromkeys(CSV_COLUMNS[6:], math.nan)
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
        if self._writer is not None and rows:
            for tag, value in metrics(rows).items():
                self._writer.add_scalar(tag, value, rows[0]["step"])

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


def _cell(value: Any) -> Any:
    return "" if isinstance(value, float) and not math.isfinite(value) else value
