"""Alignment with backprop: how far each rule's feedback and updates are from the true gradient
(definitions and formulas in ``docs/alignment.md``).

- :func:`weight_alignment`: the angle between a layer's forward weight and its feedback matrix
  (Lillicrap et al. 2016, Fig. 2; Liao et al. 2016), or for direct rules between a feedback
  point's matrix and the linearised backprop path to it (Launay, Poli, Krzakala 2019).
- :func:`gradient_alignment`: on one batch and the same parameters, the angle between the rule's
  weight gradient and backprop's, the per-sample cosine between the rule's and backprop's delta at
  each layer's output (Launay et al. 2019, Sec. 3), and the angle for the whole network.

``AlignmentMonitor`` and ``CSV_COLUMNS`` (a training loop's logger) live in
:mod:`biograd.experiment.monitor`; they are re-exported here on first use.
"""

from typing import Any

from .gradients import NETWORK, LossFn, gradient_alignment
from .weights import angle, weight_alignment

__all__ = [
    "CSV_COLUMNS", "NETWORK", "AlignmentMonitor", "LossFn", "angle", "gradient_alignment",
    "weight_alignment",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in ("AlignmentMonitor", "CSV_COLUMNS"):
        from ..experiment import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module 'biograd.alignment' has no attribute {name!r}")
