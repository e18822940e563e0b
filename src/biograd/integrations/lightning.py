"""A Lightning ``Callback`` that logs per-layer alignment with backprop.

>>> trainer = lightning.Trainer(callbacks=[AlignmentCallback(every=50)], logger=...)
>>> trainer.fit(module)   # module's layers converted with biograd.convert

Every ``every`` optimizer steps, before the training step of that batch, the callback measures
:func:`biograd.weight_alignment` and :func:`biograd.gradient_alignment` on the batch and hands the
values to ``log_metrics`` of every logger of the Trainer (``trainer.loggers``: TensorBoard, CSV,
W&B, ...) at that step. (``pl_module.log`` from a batch-start hook would repeat the values at
every later step of the epoch.) Only the global-zero process measures. The measurement leaves gradients, RNG and rule state as it found them, so the training
run is the same with and without the callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from . import AlignmentSettings, metrics

StepLoss = Callable[[Any, Any], Any]
"""``loss_fn(pl_module, batch)``: runs the forward pass and returns the loss."""


class AlignmentCallback(AlignmentSettings, pl.Callback):  # type: ignore[misc]
    """Log alignment every ``every`` optimizer steps of a Lightning ``Trainer``.

    Args:
        every: measure when ``trainer.global_step % every == 0`` (once per optimizer step, also
            with gradient accumulation); 0 turns it off.
        loss_fn: ``loss_fn(pl_module, batch)`` returns the loss (a tensor, or a dict with
            ``"loss"``). None (default): ``pl_module.training_step(batch, batch_idx)``, with its
            own ``self.log`` calls silenced during the measurement.
        csv_path: also append the rows to this ``alignment.csv``.
        keys: the row values to log (``biograd.integrations.METRICS`` by default).
        target_key: the batch entry with ``drtp``'s targets (a dict key, or an index into a
            tuple batch such as ``(x, y)``: pass 1).

    ``rows`` holds every row measured so far (dicts with the ``alignment.csv`` columns).
    """

    def __init__(self, every: int = 50, loss_fn: StepLoss | None = None, **settings: Any) -> None:
        super().__init__(every, loss_fn, **settings)
        self._measured: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every > 0:
            self._start(pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if self._monitor is None or step % self.every or step == self._measured:
            return
        if not trainer.is_global_zero:
            return
        self._measured = step

        def closure() -> Any:
            if self.loss_fn is not None:
                return self.loss_fn(pl_module, batch)
            return _quiet_step(pl_module, batch, batch_idx)

        targets = _batch_entry(batch, self.target_key)
        rows = self._monitor.measure(
            step, int(trainer.current_epoch), None, targets, closure=closure
        )
        self.rows += rows
        values = metrics(rows, self.keys)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()


def _batch_entry(batch: Any, key: str | int | None) -> Tensor | None:
    if key is None:
        return None
    if (
        isinstance(key, int)
        and isinstance(batch, (tuple, list))
        and -len(batch) <= key < len(batch)
    ):
        entry = batch[key]
    elif isinstance(key, str) and isinstance(batch, dict):
        entry = batch.get(key)
    else:
        return None
    return entry if isinstance(entry, Tensor) else None


def _quiet_step(module: pl.LightningModule, batch: Any, batch_idx: int) -> Any:
    """``module.training_step(batch, batch_idx)`` with ``self.log`` and ``self.log_dict`` turned
    into no-ops, so that the measurement's passes do not enter the training metrics."""

    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    module.__dict__["log"] = module.__dict__["log_dict"] = nothing
    try:
        return module.training_step(batch, batch_idx)
    finally:
        del module.__dict__["log"], module.__dict__["log_dict"]
