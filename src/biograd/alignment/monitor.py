"""The alignment monitor: weight and gradient alignment every ``N`` training steps, appended to
``alignment.csv`` (and TensorBoard when it is installed)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..calls import TARGET_KEY, LossCall
from ..convert import converted_layers
from .gradients import LossFn, _Capture, _exact_pass, _Pass, _Setup, gradient_alignment
from .weights import weight_alignment

log = logging.getLogger("biograd")

CSV_COLUMNS = (
    "rule", "seed", "epoch", "step", "layer", "kind",
    "angle", "norm_ratio", "delta_cos_mean", "delta_cos_std",
)  # fmt: skip
"""Columns of ``alignment.csv`` (one row per measurement, layer and kind). For direct rules a
``weight`` row's ``layer`` is the layer that the feedback matrix trains."""


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
        self.model = model
        self.loss_fn = loss_fn
        self.target_key = target_key
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
        self,
        step: int,
        epoch: int,
        inputs: Any = None,
        targets: Any = None,
        *,
        closure: Callable[[], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Measure on this batch if ``step`` is a multiple of ``every``; return the rows written
        by this call (empty otherwise)."""
        if self.every <= 0:
            return []
        rows = self._finish() if self._pending is not None else []
        if step % self.every:
            return rows
        return rows + self.measure(step, epoch, inputs, targets, closure=closure)

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
        if self._pending is not None:
            self._finish()
        base = {"rule": self.rule, "seed": self.seed, "epoch": epoch, "step": step}
        rows = self._rows(base, "weight", weight_alignment(self.model))
        batch = LossCall(self.loss_fn, inputs, targets, closure=closure, target_key=self.target_key)
        if self.reuse_step:
            if batch.first_tensor() is None:
                raise ValueError("reuse_step=True needs the batch's inputs, not a closure")
            setup = _Setup.of(self.model)
            bp = _exact_pass(setup, batch)
            self._pending = (base, _Capture(setup, batch), bp)
        else:
            grad = gradient_alignment(
                self.model, self.loss_fn, inputs, targets, closure=closure,
                target_key=self.target_key,
            )  # fmt: skip
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
