"""The ops (``functional``) and the rule-parametrised layers (``layers``)."""

from .functional import ConvFeedback, LinearFeedback, conv, linear
from .layers import FeedbackLayer, feedback_class

__all__ = ["ConvFeedback", "FeedbackLayer", "LinearFeedback", "conv", "feedback_class", "linear"]
