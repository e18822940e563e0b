"""biograd: train PyTorch networks without weight transport.

>>> import biograd
>>> model = biograd.convert(model, "fa", seed=0)
"""

from typing import TYPE_CHECKING, Any

from . import direct as direct
from . import nn as nn
from . import optim as optim
from . import rules as rules
from .alignment import gradient_alignment, weight_alignment
from .calls import Call, targets_from_batch
from .convert import (
    ConversionReport,
    conversion_report,
    convert,
    converted_layers,
    exact,
    feedback_weight,
    needs_targets,
    rules_of,
    set_loss_scale,
    set_targets,
    update_feedback,
)
from .experiment.monitor import AlignmentMonitor
from .rules import get_rule, rule_names
from .state import load_plain, load_rule_state, plain_state_dict, unconvert

if TYPE_CHECKING:
    from .experiment.compare import CompareResult, compare
    from .experiment.factory import DataSplits

# Imported on first use: they pull in the experiment machinery (pydantic, yaml, the data sets).
_LAZY = {
    "compare": "biograd.experiment.compare",
    "CompareResult": "biograd.experiment.compare",
    "DataSplits": "biograd.experiment.factory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'biograd' has no attribute {name!r}")


RULES: tuple[str, ...] = rule_names()
"""Names of every learning rule: ``bp fa usf frsf brsf kp dfa sdfa drtp shallow wm pfa dkp``."""

__version__ = "0.1.0"

__all__ = [
    "RULES",
    "AlignmentMonitor",
    "Call",
    "CompareResult",
    "ConversionReport",
    "DataSplits",
    "compare",
    "conversion_report",
    "convert",
    "converted_layers",
    "exact",
    "feedback_weight",
    "get_rule",
    "gradient_alignment",
    "load_plain",
    "load_rule_state",
    "needs_targets",
    "plain_state_dict",
    "rules_of",
    "set_loss_scale",
    "set_targets",
    "targets_from_batch",
    "unconvert",
    "update_feedback",
    "weight_alignment",
]
