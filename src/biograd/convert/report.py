"""The conversion report: which layers ``biograd.convert`` put on which rule, and which keep
exact gradients and why."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..direct import DirectFeedback
from ..direct.plan import points_of
from ..nn.layers import FeedbackLayer, convertible, is_convertible_kind
from ..rules.base import Rule

_EXACT_KINDS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.MultiheadAttention, nn.Embedding,
)  # fmt: skip


@dataclass
class ConversionReport:
    """What ``convert`` did: ``converted`` maps layer names to rules, ``exact`` maps the other
    layers that take part in learning to why their gradients stay exact."""

    converted: dict[str, str] = field(default_factory=dict)
    exact: dict[str, str] = field(default_factory=dict)
    output: str | None = None
    feedback_points: list[str] = field(default_factory=list)
    unconverted_matrices: list[str] = field(default_factory=list)
    """Modules with a weight matrix (a ``*weight`` of two or more dimensions, embeddings aside)
    neither converted nor excluded: backprop carries the error through them (``convert`` warns)."""

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s):"]
        width = max((len(n) for n in [*self.converted, *self.exact]), default=4)
        for name, rule in self.converted.items():
            tag = "  (output: true error)" if name == self.output else ""
            lines.append(f"  {name:<{width}}  {rule}{tag}")
        if self.feedback_points:
            lines.append("feedback points: " + ", ".join(self.feedback_points))
        if self.exact:
            lines.append("exact gradients (not converted):")
            lines.extend(f"  {name:<{width}}  {why}" for name, why in self.exact.items())
        if self.unconverted_matrices:
            lines.append("WARNING: " + self.warning())
        return "\n".join(lines)

    def warning(self) -> str:
        """One line naming the :attr:`unconverted_matrices` (empty if there are none)."""
        if not self.unconverted_matrices:
            return ""
        return (
            f"{len(self.unconverted_matrices)} module(s) hold a weight matrix but were not "
            f"converted, so backprop carries the error through them: "
            f"{', '.join(self.unconverted_matrices)} (a linear-like type converts once registered "
            "with biograd.nn.register_linear_like)"
        )


def conversion_report(model: nn.Module) -> ConversionReport:
    """Describe the conversion of ``model``: converted layers with their rules, and the layers
    whose gradients stay exact (batch norm, pooling, attention internals, unknown types)."""
    report = ConversionReport(feedback_points=points_of(model))
    parents = dict(model.named_modules())
    why: str | None  # None: a convertible layer left plain on purpose (``exclude``)
    for name, module in model.named_modules():
        key, why = name or "<root>", ""
        if isinstance(module, FeedbackLayer):
            report.converted[key] = module.feedback_rule
            if "direct_feedback" in module._modules:
                report.output = name
        elif is_convertible_kind(module):
            why = convertible(name, module, parents)
            report.exact[key] = why or f"{type(module).__name__} (excluded)"
        elif (
            isinstance(module, _EXACT_KINDS)
            or next(module.parameters(recurse=False), None) is not None
        ):
            report.exact[key] = f"{type(module).__name__} (autograd)"
        if why is not None and _holds_matrix(module):
            report.unconverted_matrices.append(key)
    return report


def _holds_matrix(module: nn.Module) -> bool:
    """A module that is not converted and owns a weight matrix that is not an embedding table
    (a lookup has no input gradient, so nothing is transported)."""
    if isinstance(module, (FeedbackLayer, nn.Embedding, nn.EmbeddingBag, Rule, DirectFeedback)):
        return False
    return any(
        n.endswith("weight") and p.dim() >= 2 for n, p in module.named_parameters(recurse=False)
    )
