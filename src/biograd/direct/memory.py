"""What the feedback of a direct rule would cost, computed without allocating it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.layers import convertible
from .engine import DirectFeedback
from .layouts import LAYOUTS
from .plan import explicit_points, match, probing
from .positions import features, lead_dims, positional


class _MetaCall(nn.Module):
    """Runs ``inner`` with every parameter and buffer replaced by a ``meta`` tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.state = {
            k: torch.empty_like(v, device="meta").requires_grad_(v.requires_grad)
            for k, v in [*inner.named_parameters(), *inner.named_buffers()]
        }

    def forward(self, x: Tensor) -> Any:
        return torch.func.functional_call(self.inner, self.state, (x,))


def _trace(
    model: nn.Module, layers: dict[str, nn.Module], explicit: dict[str, nn.Module], x: Tensor,
    batch_dims: int | None,
) -> tuple[dict[str, int], int]:  # fmt: skip
    """Run ``model`` on ``x`` (eval mode, restored) and return the feature size of every point
    and the output size of the last converted layer to run (rows as the engine reads them)."""
    points: dict[str, int] = {}
    outputs: dict[str, int] = {}
    last = [True]  # whether the last converted layer to run is linear-like

    def size(t: Tensor, linear: bool) -> int:
        return features(t.shape, lead_dims(t.dim(), linear, batch_dims))

    def pre(name: str, args: tuple[Any, ...]) -> None:
        a = args[0] if args else None
        if not explicit and isinstance(a, Tensor) and a.requires_grad:
            points.setdefault(name, size(a, positional(layers[name])))

    def post(name: str, out: Any, into: dict[str, int]) -> None:
        if name in layers:
            last[0] = positional(layers[name])
        if isinstance(out, Tensor):
            into.pop(name, None)
            into[name] = size(out, last[0])

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: pre(n, a)) for n, m in layers.items()]
    handles += [
        m.register_forward_hook(lambda m, a, y, n=n: post(n, y, outputs)) for n, m in layers.items()
    ]
    handles += [
        m.register_forward_hook(lambda m, a, y, n=n: post(n, y, points))
        for n, m in explicit.items()
    ]
    try:
        with probing(model, grad=True):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return points, list(outputs.values())[-1]


def feedback_sizes(
    model: nn.Module,
    example_input_shape: Sequence[int],
    *,
    feedback_points: Sequence[str] | None = None,
    batch_dims: int | None = None,
    exclude: Sequence[str] | None = None,
) -> tuple[dict[str, int], int]:
    """Feature sizes ``d_k`` of the feedback points that ``biograd.convert`` would make for an
    input of shape ``example_input_shape``, and the output size ``C`` of the last converted layer.

    The model (converted or not) runs once on the ``meta`` device, so nothing of the input's size
    is allocated (a real batch-of-the-shape run is the fallback for ops without meta kernels).
    """
    parents = dict(model.named_modules())
    layers = {
        n: m
        for n, m in parents.items()
        if convertible(n, m, parents) is None and not match(n, exclude)
    }
    if not layers:
        raise ValueError(f"nothing to convert in {type(model).__name__}")
    explicit = {n: parents[n] for n in explicit_points(model, feedback_points)}
    shape = tuple(example_input_shape)
    engines = [m for m in model.modules() if isinstance(m, DirectFeedback)]
    modes = [e.exact for e in engines]
    try:
        for e in engines:
            e.exact = True  # record nothing, draw nothing
        meta = torch.empty(shape, device="meta")
        try:
            return _trace(_MetaCall(model), layers, explicit, meta, batch_dims)
        except (NotImplementedError, RuntimeError):
            p = next(model.parameters())
            x = torch.zeros(shape, device=p.device, dtype=p.dtype)
            return _trace(model, layers, explicit, x, batch_dims)
    finally:
        for e, mode in zip(engines, modes):
            e.exact = mode


def feedback_memory(
    model: nn.Module,
    example_input_shape: Sequence[int],
    classes: int | None = None,
    layout: str = "dense",
    *,
    feedback_points: Sequence[str] | None = None,
    batch_dims: int | None = None,
    hashed_rows: int = 1024,
    exclude: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes that the feedback of a direct rule would take for ``model`` on inputs of shape
    ``example_input_shape`` with layout ``layout``, computed without allocating it:
    ``dense`` ``C * sum(d_k)``, ``shared`` ``C * max(d_k)``, ``hashed`` ``hashed_rows * C``
    entries (see :data:`LAYOUTS`). ``classes`` defaults to the output size of the last converted
    layer. Example: ``feedback_memory(resnet18, (1, 3, 224, 224), 1000, "hashed")``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown feedback layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    sizes, out = feedback_sizes(
        model, example_input_shape, feedback_points=feedback_points, batch_dims=batch_dims,
        exclude=exclude,
    )  # fmt: skip
    entries = LAYOUTS[layout].entries(sizes, out if classes is None else classes, hashed_rows)
    return entries * torch.empty((), dtype=dtype).element_size()
