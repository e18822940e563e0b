"""Graph capture that would drop a learning rule: ``torch.fx.symbolic_trace`` and
``torch.export`` record a converted layer's forward op (``linear``, ``convolution``) and derive its
backward from the op, i.e. backprop, and a direct rule's engine runs outside the recorded graph.
A converted layer therefore refuses to be traced by either (one-line :class:`TracingError`)
instead of silently training the traced copy with backprop. Layers on ``bp`` and layers inside
``biograd.exact`` compute backprop anyway and trace as usual; ``torch.compile`` keeps the rules
(its graphs keep the autograd Functions) and is not affected.
"""

from __future__ import annotations

import torch

from .errors import BiogradError


class TracingError(BiogradError, RuntimeError):
    """A converted layer was traced by torch.fx or torch.export, which would drop its rule."""


def tracer() -> str | None:
    """The graph capture in progress that would drop the rules (``"torch.fx"`` or
    ``"torch.export"``), or None."""
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return "torch.fx"
    if torch.compiler.is_exporting():
        return "torch.export"
    return None


def refuse_tracing(rule: str) -> None:
    """Raise :class:`TracingError` if a layer on ``rule`` is being traced by torch.fx or
    torch.export."""
    what = tracer()
    if what is not None:
        raise TracingError(
            f"biograd: {what} would trace the plain op and train the traced copy with backprop, "
            f"not {rule!r}: trace before biograd.convert, inside biograd.exact, or use torch.compile"
        )
