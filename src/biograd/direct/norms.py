"""The scale schemes of direct feedback matrices."""

from __future__ import annotations

import math

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


ERRORS = ("loss", "per_sample")
"""What the feedback projects of the output error ``e = dL/dy`` (rows x C):

- ``loss`` (default): ``e`` itself, reduced as the loss is (a mean over N rows divides each
  row by N), so the hidden layers learn at the scale of the output layer's own gradient.
- ``per_sample``: ``e`` times its number of rows, each sample's error at full size (for
  softmax cross-entropy, ``softmax(y) - onehot``) while the output layer learns from the
  reduced loss. Launay, Poli, Krzakala 2019's code (``dfatools``) does this: with a mean
  over a batch of N, their hidden layers take N times the step of ``loss``.
"""


def check_error(error: str) -> str:
    """``error`` if it is one of :data:`ERRORS`, else ValueError."""
    if error not in ERRORS:
        raise ValueError(f"unknown feedback error {error!r}; choose one of {', '.join(ERRORS)}")
    return error


def norm_factor(norm: str, d: int, classes: int) -> float:
    """The factor of :data:`NORMS` scheme ``norm`` for a point of ``d`` features and ``C`` outputs."""
    factors = {"launay": d * classes, "fan_in": classes, "fan_out": d, "none": 1}
    if norm not in factors:
        raise ValueError(f"unknown feedback norm {norm!r}; choose one of {', '.join(NORMS)}")
    return 1.0 / math.sqrt(factors[norm])
