"""The direct-feedback engine: DFA, sign-DFA, DRTP and the shallow control.

Direct rules send the output error straight to every hidden layer through a fixed random matrix:
``delta_l = (B_l e) * f'(a_l)`` (Nøkland 2016). Here ``e = dLoss/d(output)`` is whatever
autograd computes for the user's loss, and the projection ``B_k e`` is injected at a **feedback
point**: by default the input of every converted layer but the first, i.e. the output side of the
layer below *after* its activation, batch norm and pooling, so that ``f'`` and the other local
derivatives come from autograd (the placement of Launay, Poli, Krzakala 2019). Explicit feedback
points can be put on the output of any module instead (block-wise DFA, Launay et al. 2020).

A point's tensor is detached from the graph above it in the forward pass, so the backward never
computes the back-propagated products that DFA throws away. Every point carries a small autograd
node (a tap) made where the point is; the output's node receives ``e`` in backward and computes the
rule's signal ``s(e)``, and each tap returns ``B_k s(e)`` as its point's gradient when the backward
reaches that point (so about one projection is alive at a time).

Feedback matrix of point k: ``B_k`` of shape ``(d_k, C)``, ``d_k`` the features per row of the
point and ``C`` the outputs per row; by default a linear-like layer's input ``(N, *P, d)`` has
rows ``(N, *P)`` and ``d`` features, a convolution's input per-sample features, and a point
whose positions differ from the output's gets the sample's pooled signal at every position
(:mod:`biograd.direct.positions`). It trains the converted layer that ran last before the point.
Modules: ``engine`` (the forward and backward protocol), ``nodes`` (its autograd nodes),
``positions`` (rows and routing), ``layouts`` (storage), ``norms`` (scales), ``plan`` (hooks,
points, output), ``memory`` (cost). See ``docs/direct.md``.
"""

from ..rules.direct import DirectRule, FeedbackError
from .engine import DirectFeedback
from .layouts import LAYOUTS, Dense, Hashed, Shared, point_salt
from .memory import feedback_memory, feedback_sizes
from .norms import ERRORS, NORMS, norm_factor

__all__ = [
    "ERRORS", "LAYOUTS", "NORMS", "Dense", "DirectFeedback", "DirectRule", "FeedbackError",
    "Hashed", "Shared", "feedback_memory", "feedback_sizes", "norm_factor", "point_salt",
]  # fmt: skip
