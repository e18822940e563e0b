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

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

METRICS = ("angle", "delta_cos_mean")
"""The row values logged by default (``norm_ratio`` and ``delta_cos_std`` can be added)."""


def metric_name(row: Mapping[str, Any], key: str) -> str:
    """The name under which a framework logs value ``key`` of an alignment row:
    ``alignment/{kind}_{key}/{layer}``, the tag ``AlignmentMonitor`` gives TensorBoard."""
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
