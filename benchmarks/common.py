"""Shared pieces of the benchmarks: the benchmark networks, one training step, interleaved
timing, memory estimates and a description of the machine.

Not part of the library: these scripts measure it (``benchmarks/README.md``).
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------- networks
def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A fully connected net ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between layers."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def small_cnn(classes: int = 10, channels: int = 3) -> nn.Sequential:
    """A small CNN for 32x32 inputs: two conv-ReLU-maxpool stages (32, 64 channels), then
    4096 -> 256 -> classes."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, classes),
    )


def library_model(name: str, in_shape: tuple[int, int, int], classes: int) -> nn.Module:
    """``biograd.models.build_model(name)``; ``RuntimeError`` if the models module is missing."""
    try:
        from biograd.models import build_model
    except ImportError as exc:  # the models module is not there yet
        raise RuntimeError(f"biograd.models.build_model is not available ({exc})") from exc
    model: nn.Module = build_model(name, in_shape=in_shape, classes=classes)
    return model


# ----------------------------------------------------------------------------- one step
@dataclass
class Trainee:
    """A model under one rule with its own optimizer, trained on a fixed batch. ``backward``,
    if given, replaces ``loss.backward()`` (the DFA floor: :func:`cut_inputs`)."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    needs_targets: bool = False
    backward: Callable[[Tensor], None] | None = None
    times: dict[str, list[float]] = field(default_factory=lambda: {"wall": [], "cpu": []})
    rep_medians: dict[str, list[float]] = field(default_factory=lambda: {"wall": [], "cpu": []})


def train_step(t: Trainee, x: Tensor, y: Tensor) -> None:
    """Forward, cross-entropy loss, backward, optimizer step."""
    t.optimizer.zero_grad(set_to_none=True)
    step_after_zero_grad(t, x, y)


def step_after_zero_grad(t: Trainee, x: Tensor, y: Tensor) -> None:
    """The training step without ``zero_grad``: forward, loss, backward, optimizer step."""
    if t.needs_targets:
        import biograd

        biograd.set_targets(t.model, y)
    loss = F.cross_entropy(t.model(x), y)
    if t.backward is None:
        loss.backward()
    else:
        t.backward(loss)
    t.optimizer.step()


def cut_inputs(model: nn.Module, names: list[str]) -> Callable[[Tensor], None]:
    """Make ``model`` (a plain torch model) do the work that DFA cannot avoid, and return the
    backward that goes with it.

    Forward pre-hooks on the modules ``names`` (DFA's feedback points: the inputs of every
    converted layer but the first) detach each input, as DFA's engine does, so autograd never
    computes the products with the transposed weights; the returned backward then runs autograd
    once from the loss and from every cut point, with a fixed random gradient in place of DFA's
    ``B_k e``: forward, every local derivative (activations, batch norm, pooling, residual
    sums), every weight gradient and the optimizer step, but no feedback projection, no
    bookkeeping of points and no injection node. A tensor that feeds several cut modules
    (a residual block's input into ``conv1`` and the shortcut) is one point, as in the engine.
    """
    modules = dict(model.named_modules())
    points: list[Tensor] = []
    grads: dict[tuple[int, ...], Tensor] = {}

    def pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if not (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()):
            return None
        if not any(p is x for p in points):
            points.append(x)
        return (x.detach(), *args[1:])

    for name in names:
        modules[name].register_forward_pre_hook(pre)

    def backward(loss: Tensor) -> None:
        roots, root_grads = [loss], [torch.ones_like(loss)]
        for p in points:
            shape = tuple(p.shape)
            if shape not in grads:
                gen = torch.Generator().manual_seed(len(grads))
                g = torch.randn(shape, generator=gen) / p[0].numel() ** 0.5 / p.shape[0]
                grads[shape] = g.to(p.device, p.dtype)
            roots.append(p)
            root_grads.append(grads[shape])
        points.clear()
        torch.autograd.backward(roots, root_grads)

    return backward


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    trainees: list[Trainee],
    x: Tensor,
    y: Tensor,
    *,
    warmup: int,
    reps: int,
    inner: int,
    on_rep: Callable[[int], None] | None = None,
) -> None:
    """Time ``train_step`` for every trainee in one process, interleaved.

    Each trainee first runs ``warmup`` untimed steps (in turn). Then for each of ``reps``
    repetitions every trainee runs ``inner`` timed steps, the order rotating by one each
    repetition so that no rule always follows the same neighbour. Per-step times go to
    ``t.times``, the median of each repetition to ``t.rep_medians``, both for the wall clock
    (``"wall"``) and for the CPU time of this process (``"cpu"``, ``time.process_time``: on a
    shared machine it does not count the time other processes hold the cores).
    """
    device = x.device
    for _ in range(warmup):
        for t in trainees:
            train_step(t, x, y)
    sync(device)
    n = len(trainees)
    for rep in range(reps):
        order = [trainees[(rep + i) % n] for i in range(n)]
        for t in order:
            wall, cpu = [], []
            for _ in range(inner):
                start, start_cpu = time.perf_counter(), time.process_time()
                train_step(t, x, y)
                sync(device)
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            for clock, block in (("wall", wall), ("cpu", cpu)):
                t.times[clock].extend(block)
                t.rep_medians[clock].append(statistics.median(block))
        if on_rep is not None:
            on_rep(rep)


def ratio_stats(t: Trainee, base: Trainee, clock: str) -> dict[str, float]:
    """Median step time of ``t`` over that of ``base`` on ``clock``; the spread is the
    10th-90th percentile range of the per-repetition ratios (each repetition's medians, measured
    close together in time). Also the median of those ratios and the ratio of the fastest steps
    (the least disturbed by other processes)."""
    paired = sorted(a / b for a, b in zip(t.rep_medians[clock], base.rep_medians[clock]))
    q = _quantiles(paired)
    return {
        "ratio": statistics.median(t.times[clock]) / statistics.median(base.times[clock]),
        "ratio_paired_median": statistics.median(paired),
        "ratio_min": min(t.times[clock]) / min(base.times[clock]),
        "ratio_p10": q[0],
        "ratio_p90": q[1],
    }


def _quantiles(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], deciles[-1]


# ----------------------------------------------------------------------------- memory
def persistent_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, their gradients, buffers and optimizer state (after one step)."""
    seen: set[int] = set()
    total = 0

    def add(x: Any) -> None:
        nonlocal total
        if isinstance(x, Tensor) and x.numel():
            ptr = x.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += x.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    return total


def saved_tensor_bytes(t: Trainee, x: Tensor, y: Tensor) -> int:
    """Bytes that autograd keeps for the backward pass of one step (every tensor packed by
    ``save_for_backward`` or by a built-in op, counted once per storage), leaving out the
    parameters and buffers, which exist anyway: what lives from the forward pass to the backward
    pass (activations, and any tensor a rule builds in the forward pass for its backward)."""
    own = {p.untyped_storage().data_ptr() for p in t.model.parameters()}
    own |= {b.untyped_storage().data_ptr() for b in t.model.buffers() if b.numel()}
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        if tensor.numel():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in own:
                seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        train_step(t, x, y)
    return sum(seen.values())


def peak_bytes(t: Trainee, x: Tensor, y: Tensor) -> dict[str, int]:
    """Peak memory of one training step, the same definition on every device: the bytes of the
    trainee's own state when the step starts (parameters, buffers, optimizer state; gradients
    are freed by ``zero_grad``) plus the largest amount allocated during the step (forward,
    loss, backward, optimizer step) and not yet freed.

    On CUDA the increment is ``torch.cuda.max_memory_allocated`` minus the allocation at the
    start. On the CPU torch's allocator keeps no statistics, but it reports every allocation
    and free to ``torch.profiler`` (``profile_memory=True``): the running sum of those events,
    in time order, is the memory allocated since the step started (blocks allocated before the
    profiler started report no free, so the sum counts only the step's own allocations), and
    its maximum is the increment. This counts every tensor the step allocates, temporaries
    inside ops included, at the allocator's granularity.

    Returns ``start`` (own state at the start), ``increment`` and ``peak`` (their sum), bytes.
    """
    t.optimizer.zero_grad(set_to_none=True)
    start = persistent_bytes(t.model, t.optimizer)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        step_after_zero_grad(t, x, y)
        torch.cuda.synchronize(x.device)
        increment = torch.cuda.max_memory_allocated(x.device) - before
    else:
        increment = cpu_peak_increment(lambda: step_after_zero_grad(t, x, y))
    return {"start": start, "increment": increment, "peak": start + increment}


def cpu_peak_increment(fn: Callable[[], object]) -> int:
    """The most CPU bytes allocated and not yet freed while ``fn`` runs: the running sum, in
    time order, of the allocation and free events the allocator reports to ``torch.profiler``
    (``profile_memory=True``; blocks allocated before ``fn`` report no free)."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"
    ]
    events.sort(key=lambda e: e.start_ns())
    running = increment = 0
    for e in events:
        running += e.nbytes()
        increment = max(increment, running)
    return increment


# ----------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    """CPU model, core count, torch version and threads (and the GPU, if one is used)."""
    model_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1min": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"
