"""The registry of learning rules. ``rule_names()`` lists them; ``get_rule(name)`` returns one."""

from . import feedback as feedback
from .base import SCALES, Rule, feedback_std, get_rule, register, rule_names

__all__ = ["SCALES", "Rule", "feedback_std", "get_rule", "register", "rule_names"]
