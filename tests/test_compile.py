"""Converted models under mixed precision, torch.compile and channels_last, on CPU.

torch.compile is checked with two backends: ``aot_eager`` (Dynamo + AOTAutograd tracing of the
custom autograd Functions, then eager kernels: gradients must be bit-identical) for every rule on
an MLP and a CNN, and ``inductor`` (generated kernels: equal up to float reassociation) on a CNN
that holds both ops, because an inductor compile costs 10-30 s of CPU time per model here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import biograd

RULES = ("bp", "fa", "usf", "frsf", "brsf", "kp", "dfa")


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (12,)),
    "cnn": (_cnn, (3, 8, 8)),
}


def _data(kind: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, *MODELS[kind][1], generator=gen), torch.randint(0, 5, (8,), generator=gen)


def _model(kind: str, rule: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[kind][0]()
    if rule == "plain":
        return model
    return biograd.convert(model, rule, seed=3, example_input=_data(kind)[0])


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    if biograd.needs_targets(model):
        biograd.set_targets(model, y)
    return nn.functional.cross_entropy(model(x), y)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch.compiler.reset()
    yield
    torch.compiler.reset()


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("rule", RULES)
def test_compiled_gradients_equal_eager(kind: str, rule: str) -> None:
    """Two training steps: the compiled copy's gradients and weights are bit-identical to eager
    (brsf: the same per-batch draws), and the second step does not recompile."""
    eager = _model(kind, rule)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, twin)]
    for step in range(2):
        x, y = _data(kind, seed=step)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            for model, opt in zip((eager, compiled), opts):
                opt.zero_grad()
                _loss(model, x, y).backward()
                opt.step()
        ge, gc = _grads(eager), _grads(twin)
        assert ge.keys() == gc.keys() and ge
        for name in ge:
            assert torch.equal(ge[name], gc[name]), (step, name)
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_inductor_gradients_match_eager() -> None:
    """Inductor-generated kernels on a CNN (conv and linear ops) with kp, whose feedback also
    receives a gradient; the compile time is printed (``pytest -s``)."""
    eager = _model("cnn", "kp")
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    x, y = _data("cnn")
    _loss(eager, x, y).backward()
    start = time.perf_counter()
    _loss(compiled, x, y).backward()
    print(f"inductor compile + first step (cnn, kp): {time.perf_counter() - start:.1f} s")
    ge, gc = _grads(eager), _grads(twin)
    assert ge.keys() == gc.keys() and {"0.rule.feedback", "5.rule.feedback"} <= ge.keys()
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ autocast
def _reset_brsf(model: nn.Module) -> None:
    for _, layer in biograd.converted_layers(model):
        if hasattr(layer.rule, "step"):
            layer.rule.step.zero_()  # the same draw of brsf's feedback in both passes


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("rule", RULES)
def test_bf16_autocast_runs_every_rule(kind: str, rule: str) -> None:
    """bf16 autocast on CPU: the forward runs in bf16, every gradient comes back in its
    parameter's float32, close to the float32 gradient."""
    model = _model(kind, rule)
    x, y = _data(kind)
    _loss(model, x, y).backward()
    ref = _grads(model)
    model.zero_grad()
    _reset_brsf(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
    assert out.dtype == torch.bfloat16
    loss.backward()
    got = _grads(model)
    assert got.keys() == ref.keys()
    for name, g in got.items():
        assert g.dtype == torch.float32, name
        scale = ref[name].abs().max()
        torch.testing.assert_close(g, ref[name], rtol=0, atol=float(0.05 * scale + 1e-6))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_with_b_equal_w_is_autocast_backprop(kind: str, dtype: torch.dtype) -> None:
    """With B set to W, fa under autocast reproduces autocast backprop bit for bit: the feedback
    product runs in the same precision as the forward (B cast to grad_out's dtype)."""
    plain, model = _model(kind, "plain"), _model(kind, "fa")
    with torch.no_grad():
        for _, layer in biograd.converted_layers(model):
            layer.rule.feedback.copy_(layer.weight)
    x, y = _data(kind)
    for m in (plain, model):
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        assert q.grad is not None and torch.equal(p.grad, q.grad), name


def test_compiled_under_bf16_autocast_equals_eager() -> None:
    eager = _model("cnn", "brsf")
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager")
    x, y = _data("cnn")
    for m in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name


# ------------------------------------------------------------------ fp16 + GradScaler
def _unscaled_grads(
    kind: str, rule: str, scaler: bool, tell_scale: bool = True
) -> dict[str, Tensor]:
    model = _model(kind, rule)
    x, y = _data(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaler)
    if tell_scale:
        biograd.set_loss_scale(model, sc.get_scale())
    with torch.autocast("cpu", dtype=torch.float16):
        loss = _loss(model, x, y)
    sc.scale(loss).backward()
    sc.unscale_(opt)
    return _grads(model)


@pytest.mark.parametrize("rule", ["fa", "brsf", "kp", "dfa"])
def test_grad_scaler_fp16_unscaled_gradients_match(rule: str) -> None:
    """fp16 autocast with a GradScaler: the unscaled gradients equal the unscaled run's (the
    feedback products are linear in the error, so the loss scale passes through them)."""
    ref, got = _unscaled_grads("cnn", rule, False), _unscaled_grads("cnn", rule, True)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("rule", ["sdfa", "drtp"])
def test_grad_scaler_with_scale_free_direct_signals(rule: str) -> None:
    """sdfa's sign(e) and drtp's -y*/N do not carry the loss scale: biograd.set_loss_scale hands
    it over, and without it the unscaled hidden gradients are too small by the scale."""
    ref, got = _unscaled_grads("mlp", rule, False), _unscaled_grads("mlp", rule, True)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=2e-3, atol=1e-5)
    untold = _unscaled_grads("mlp", rule, True, tell_scale=False)
    assert not torch.allclose(untold["0.weight"], ref["0.weight"], rtol=0.1)


# ------------------------------------------------------------------ channels_last
@pytest.mark.parametrize("rule", RULES)
def test_channels_last(rule: str) -> None:
    """A channels_last CNN on channels_last inputs gives the gradients of the contiguous one."""
    model = _model("cnn", rule)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert last[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = _data("cnn")
    x_last = x.contiguous(memory_format=torch.channels_last)
    _loss(model, x, y).backward()
    _loss(last, x_last, y).backward()
    for (name, p), q in zip(model.named_parameters(), last.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_channels_last_compiled() -> None:
    eager = _model("cnn", "frsf").to(memory_format=torch.channels_last)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager")
    x, y = _data("cnn")
    x = x.contiguous(memory_format=torch.channels_last)
    for m in (eager, compiled):
        _loss(m, x, y).backward()
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
