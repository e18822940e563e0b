"""biograd: train PyTorch networks without weight transport.

>>> import biograd
>>> model = biograd.convert(model, "fa", seed=0)
"""

from . import direct as direct
from . import optim as optim
from . import rules as rules
from .alignment import AlignmentMonitor, gradient_alignment, weight_alignment
from .convert import (
    ConversionReport,
    conversion_report,
    convert,
    converted_layers,
    exact,
    feedback_weight,
    set_loss_scale,
    set_targets,
)
from .rules import get_rule, rule_names

RULES: tuple[str, ...] = rule_names()
"""Names of every learning rule: ``bp fa usf frsf brsf kp dfa sdfa drtp shallow``."""

__version__ = "0.1.0"

__all__ = [
    "RULES",
    "AlignmentMonitor",
    "ConversionReport",
    "conversion_report",
    "convert",
    "converted_layers",
    "exact",
    "feedback_weight",
    "get_rule",
    "gradient_alignment",
    "set_loss_scale",
    "set_targets",
    "weight_alignment",
]
