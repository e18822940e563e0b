"""How a measurement runs a model on a batch and gets its loss: any model call (positional and
keyword inputs, such as a Hugging Face batch dict), a loss computed from the model's output object
(``loss_fn=None`` reads ``output.loss``), or a closure that runs a whole training step; and the
targets that ``drtp`` needs, taken from the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

LossFn = Callable[[Any, Any], Tensor]
"""``loss_fn(output, targets)``: the scalar loss of the model's output (``targets`` is the batch
itself where no targets are given)."""

TARGET_KEY = "labels"
"""Key of the targets in a batch dict (the Hugging Face convention)."""


class Call:
    """The arguments of one model call, ``model(*args, **kwargs)``.

    ``Call.of`` reads a batch as the call it stands for: a tensor is one positional input, a tuple
    or list the positional inputs, a mapping (a Hugging Face batch, ``BatchEncoding`` included)
    the keyword inputs; ``Call(x, mask=m)`` mixes both.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    @classmethod
    def of(cls, inputs: Any) -> Call:
        if isinstance(inputs, Call):
            return inputs
        if isinstance(inputs, Mapping):
            return cls(**inputs)
        if isinstance(inputs, (tuple, list)):
            return cls(*inputs)
        return cls(inputs)

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def first_tensor(self) -> Tensor | None:
        """The first tensor among the arguments (positional first): what identifies the batch."""
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Tensor):
                return value
        return None

    def get(self, key: str | int) -> Any:
        """Keyword argument ``key`` (a str) or positional argument ``key`` (an int); None if
        absent."""
        if isinstance(key, int):
            return self.args[key] if -len(self.args) <= key < len(self.args) else None
        return self.kwargs.get(key)


def output_loss(output: Any) -> Tensor:
    """The loss carried by a model's output object: ``output.loss`` (Hugging Face ``ModelOutput``
    when the batch holds labels), ``output["loss"]``, or the output itself if it is a scalar."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, Tensor) and output.dim() == 0:
        loss = output
    if not isinstance(loss, Tensor):
        raise ValueError(
            f"loss_fn=None needs a model output that carries its loss (output.loss or "
            f"output['loss']), got {type(output).__name__}: pass the labels in the batch or a loss_fn"
        )
    return loss


def compute_loss(loss_fn: LossFn | None, output: Any, targets: Any, batch: Any) -> Tensor:
    """``loss_fn(output, targets)``, or ``loss_fn(output, batch)`` when ``targets`` is None, or
    :func:`output_loss` when ``loss_fn`` is None."""
    if loss_fn is None:
        return output_loss(output)
    return loss_fn(output, batch if targets is None else targets)


def batch_targets(inputs: Any, targets: Any, key: str | int | None = TARGET_KEY) -> Any:
    """The targets of a batch: ``targets`` if given, else the batch's ``key`` entry (keyword
    ``labels`` by default), else None."""
    if targets is not None or key is None:
        return targets
    return Call.of(inputs).get(key)


def targets_from_batch(
    model: nn.Module,
    key: str | int | Callable[[Call], Any] = TARGET_KEY,
) -> RemovableHandle:
    """Hand ``drtp`` its targets from every call of ``model``, without a custom loss: before each
    forward pass, the call's keyword argument ``key`` (a str, ``labels`` by default: what the
    Hugging Face Trainer passes), positional argument ``key`` (an int), or ``key(call)`` (a
    callable taking the :class:`Call`) goes to ``biograd.set_targets``. Calls without targets and
    models on other rules pass through. Returns the hook's handle (``.remove()`` stops it)."""

    from .convert import needs_targets, set_targets

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not needs_targets(module):
            return
        call = Call(*args, **kwargs)
        targets = key(call) if callable(key) else call.get(key)
        if targets is not None:
            set_targets(module, targets)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


class LossCall:
    """One measured batch: runs the model on it and returns the loss (what
    ``biograd.gradient_alignment`` and the monitor do twice per measurement).

    Either ``closure()`` runs the forward pass and returns the loss (a scalar tensor, a dict with
    ``"loss"`` as Lightning's ``training_step`` may return, or an output carrying ``.loss``), or
    the model is called on ``Call.of(inputs)`` and the loss is
    ``compute_loss(loss_fn, output, targets, inputs)``. On a rule that needs targets (``drtp``)
    the targets, or the batch's ``target_key`` entry, go to ``biograd.set_targets`` first.
    """

    def __init__(
        self,
        loss_fn: LossFn | None,
        inputs: Any,
        targets: Any = None,
        *,
        closure: Callable[[], Any] | None = None,
        target_key: str | int | None = TARGET_KEY,
    ) -> None:
        if closure is None and inputs is None:
            raise ValueError("gradient_alignment: pass the batch (inputs) or a closure")
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.closure = closure
        self.target_key = target_key

    def first_tensor(self) -> Tensor | None:
        """The tensor that identifies this batch in the model's next call (None for a closure)."""
        return None if self.inputs is None else Call.of(self.inputs).first_tensor()

    def __call__(self, model: nn.Module) -> Tensor:
        from .convert import needs_targets, set_targets

        if needs_targets(model):
            targets = batch_targets(self.inputs, self.targets, self.target_key)
            if targets is not None:
                set_targets(model, targets)
        if self.closure is not None:
            return output_loss(self.closure())
        output = Call.of(self.inputs)(model)
        return compute_loss(self.loss_fn, output, self.targets, self.inputs)
