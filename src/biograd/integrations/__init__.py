"""Alignment logging inside other training frameworks (optional extras, ``pip install
biograd[integrations]``):

- :mod:`biograd.integrations.huggingface`: ``AlignmentCallback``, a ``transformers``
  ``TrainerCallback``;
- :mod:`biograd.integrations.lightning`: ``AlignmentCallback``, a Lightning ``Callback``.

Both measure :func:`biograd.weight_alignment` and :func:`biograd.gradient_alignment` every ``N``
optimizer steps and hand the values to the framework's own logging, so they reach whatever
logger it has (TensorBoard, CSV, Weights & Biases, ...). See ``docs/integrations.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..calls import TARGET_KEY
from ..experiment.monitor import METRICS, AlignmentMonitor, metric_name, metrics

__all__ = ["METRICS", "AlignmentSettings", "metric_name", "metrics"]


class AlignmentSettings:
    """What both callbacks take and keep: ``every``, ``loss_fn``, ``csv_path``, ``keys`` and
    ``target_key`` (see each callback), the ``rows`` measured so far, and the monitor."""

    def __init__(
        self,
        every: int = 50,
        loss_fn: Any = None,
        *,
        csv_path: str | Path | None = None,
        keys: tuple[str, ...] = METRICS,
        target_key: str | int | None = TARGET_KEY,
    ) -> None:
        self.every, self.loss_fn, self.csv_path = int(every), loss_fn, csv_path
        self.keys, self.target_key = keys, target_key
        self.rows: list[dict[str, Any]] = []
        self._monitor: AlignmentMonitor | None = None

    def _start(self, model: Any, loss_fn: Any = None) -> None:
        self._monitor = AlignmentMonitor(
            model, loss_fn, every=self.every, csv_path=self.csv_path, target_key=self.target_key
        )

    def _close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
