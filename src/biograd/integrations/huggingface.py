"""A ``transformers`` ``TrainerCallback`` that logs per-layer alignment with backprop.

>>> trainer = Trainer(model=biograd.convert(model, "fa"), args=args, train_dataset=data)
>>> AlignmentCallback(every=50).attach(trainer)
>>> trainer.train()

Every ``every`` optimizer steps (``state.global_step % every == 0``) the callback measures
:func:`biograd.weight_alignment` and :func:`biograd.gradient_alignment` on the batch of the last
training forward pass (recorded by a forward pre-hook, no copy), with the parameters just updated,
and passes the values to ``trainer.log``: they join ``state.log_history`` and every ``report_to``
integration (TensorBoard, W&B, ...). The measurement leaves gradients, RNG and rule state as it
found them, so the training run is the same with and without the callback.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..calls import Call, LossFn
from . import AlignmentSettings, metrics


class AlignmentCallback(AlignmentSettings, TrainerCallback):  # type: ignore[misc]
    """Log alignment every ``every`` optimizer steps of a Hugging Face ``Trainer``.

    Args:
        every: measure when ``state.global_step % every == 0``; 0 turns it off.
        loss_fn: ``loss_fn(output, batch)``; None (default) reads ``output.loss``, which the
            model computes from the batch's ``labels`` as the Trainer's default loss does.
        trainer: the Trainer whose ``log`` receives the values (or call :meth:`attach`).
            Without one the values go to ``state.log_history`` only, and no integration sees them.
        csv_path: also append the rows to this ``alignment.csv`` (columns
            ``biograd.alignment.CSV_COLUMNS``).
        keys: the row values to log (``biograd.integrations.METRICS`` by default).
        target_key: the batch entry with ``drtp``'s targets.

    ``rows`` holds every row measured so far (dicts with the ``alignment.csv`` columns).
    """

    def __init__(
        self,
        every: int = 50,
        loss_fn: LossFn | None = None,
        *,
        trainer: Any = None,
        **settings: Any,
    ) -> None:
        super().__init__(every, loss_fn, **settings)
        self.trainer = trainer
        self._last: Call | None = None
        self._hook: Any = None

    def attach(self, trainer: Any) -> AlignmentCallback:
        """Log through ``trainer`` and add this callback to it; returns the callback."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled():
            self._last = Call(*args, **kwargs)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None or self.every <= 0:
            return
        self._start(model, self.loss_fn)
        self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        if self._monitor is None or self._last is None or step % self.every:
            return
        rows = self._monitor.measure(step, int(state.epoch or 0), self._last)
        self._last = None
        self.rows += rows
        values = metrics(rows, self.keys)
        if self.trainer is not None:
            self.trainer.log(values)
        else:
            state.log_history.append({**values, "step": step})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._close()
        self._last = None
