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

from .gradients import NETWORK, LossFn, gradient_alignment
from .monitor import CSV_COLUMNS, AlignmentMonitor
from .weights import angle, weight_alignment

__all__ = [
    "CSV_COLUMNS", "NETWORK", "AlignmentMonitor", "LossFn", "angle", "gradient_alignment",
    "weight_alignment",
]  # fmt: skip
