"""The registry of learning rules. ``rule_names()`` lists them; ``get_rule(name)`` returns the
rule class (its capabilities are class attributes)."""

# ruff: noqa: I001  (the family registers first: RULES lists bp fa ... before dfa ...)
from . import feedback as feedback
from . import direct as direct
from . import learned_rules as learned_rules
from .base import SCALES, Rule, feedback_std, get_rule, register, rule_names
from .direct import DirectRule

__all__ = ["SCALES", "DirectRule", "Rule", "feedback_std", "get_rule", "register", "rule_names"]
