"""The ops (``functional``) and the rule-parametrised layers (``layers``).

``biograd.nn.Linear(784, 256, rule="fa")`` and ``biograd.nn.Conv2d(3, 16, 3, rule="usf")`` take
torch's arguments plus ``rule``, ``seed`` and ``scale``, and go straight into model code.
"""

from .functional import ConvFeedback, LinearFeedback, conv, linear
from .layers import (
    FeedbackConv1d,
    FeedbackConv2d,
    FeedbackConv3d,
    FeedbackLayer,
    FeedbackLinear,
    LinearLike,
    feedback_class,
    register_linear_like,
)

Linear = FeedbackLinear
Conv1d = FeedbackConv1d
Conv2d = FeedbackConv2d
Conv3d = FeedbackConv3d

__all__ = [
    "Conv1d", "Conv2d", "Conv3d", "ConvFeedback", "FeedbackConv1d", "FeedbackConv2d",
    "FeedbackConv3d", "FeedbackLayer", "FeedbackLinear", "Linear", "LinearFeedback", "LinearLike",
    "conv", "feedback_class", "linear", "register_linear_like",
]  # fmt: skip
