"""Distributed data parallel training with ``torch.distributed`` (launched by ``torchrun``).

Converted models need nothing special under ``DistributedDataParallel``:

- fixed feedback (fa, frsf, usf's scale, the direct-feedback matrices) is drawn on the CPU from the
  run's seed and each layer's name, so every rank builds the same buffers without a broadcast;
- brsf draws ``R_t`` from a generator seeded with (layer seed, step), and every rank runs the same
  number of forward passes, so the draws agree;
- kp's B is a Parameter whose gradient DDP all-reduces like any other, so it stays in step;
- ``shallow`` leaves hidden weights without gradient: wrap with ``find_unused_parameters=True``
  (:func:`wrap` does it for you).

DDP broadcasts every buffer from rank 0 at each forward pass by default; :func:`wrap` excludes the
feedback buffers (identical by construction) so that only batch-norm statistics and the like travel.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn


def launched() -> bool:
    """True when started by torchrun (or any launcher setting ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group described by torchrun's environment; return ``(rank, world)``.

    The backend defaults to NCCL when CUDA is available and gloo otherwise. Without a launcher
    this is a no-op that returns ``(0, 1)``. A group created here is destroyed when the
    interpreter exits (before its teardown: gloo's worker threads still holding work at
    teardown abort the process with "terminate called without an active exception").
    """
    if not launched():
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        atexit.register(_destroy)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files (rank 0)."""
    return rank() == 0


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum ``values`` over ranks (returns ``values`` itself on one process)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if world_size() > 1:
        dist.barrier()


T = TypeVar("T")


def on_main_first(fn: Callable[[], T], *, others: bool = True) -> T | None:
    """Run ``fn`` on rank 0, then (if ``others``) on the other ranks once rank 0 succeeded:
    downloads, or writing the run directory. If rank 0 raises, every rank raises with its message
    instead of waiting forever. On one process: ``fn()``."""
    if world_size() == 1:
        return fn()
    result: T | None = None
    message = [""]
    if is_main():
        try:
            result = fn()
        except Exception as e:  # handed to the other ranks, then raised here as well
            message[0] = f"{type(e).__name__}: {e}"
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        from .errors import BiogradError

        raise BiogradError(f"rank 0 failed: {message[0]}")
    if others and not is_main():
        result = fn()
    return result


def wrap(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``DistributedDataParallel(model)`` when a process group exists, else ``model``.

    ``find_unused_parameters`` is set when some converted layers cannot receive a gradient
    (a rule whose ``trains_hidden`` is false, such as ``shallow``). Direct feedback must be
    drawn first (``example_input`` in ``biograd.convert``, or one forward pass), as
    ``DistributedDataParallel`` refuses lazy modules before their first forward pass.
    """
    if world_size() == 1:
        return model
    from .convert import engine_of, rules_of
    from .direct import FeedbackError

    engine = engine_of(model)
    if engine is not None and not engine.sizes:
        raise FeedbackError(
            "direct feedback is drawn at the first forward pass: run one batch (or pass "
            "example_input to biograd.convert) before wrapping the model in DDP"
        )
    unused = any(not r.trains_hidden for r in rules_of(model))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, feedback_buffer_names(model)
    )
    ids = [device.index] if device is not None and device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)


def feedback_buffer_names(model: nn.Module) -> list[str]:
    """Qualified names of the rules' buffers and the direct feedback of a converted model
    (never kp's Parameter): drawn from the seed, identical on every rank without a broadcast."""
    from .direct import DirectFeedback
    from .rules import Rule

    return [
        f"{mod}.{name}" if mod else name
        for mod, m in model.named_modules()
        if isinstance(m, (Rule, DirectFeedback))
        for name, _ in m.named_buffers(recurse=False)
    ]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or ``torch.compile``) wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
