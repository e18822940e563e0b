"""The optimizer wrappers of ``biograd.optim`` produce the updates documented in docs/optim.md."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import biograd
from biograd.optim import BatchManhattan, NoSignChange, WeightNormConstraint, wrap

Make = Callable[[list[Tensor]], torch.optim.Optimizer]
SGD: Make = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)  # noqa: E731
ADAM: Make = lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01)  # noqa: E731


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, dtype=torch.float64))


def _grads(shape: tuple[int, ...], steps: int) -> list[Tensor]:
    gs = [torch.randn(shape, dtype=torch.float64) for _ in range(steps)]
    for g in gs:
        g.view(-1)[::5] = 0.0  # sign(0) = 0 must be honoured
    return gs


def _run(opt: torch.optim.Optimizer, p: Tensor, grads: list[Tensor]) -> list[Tensor]:
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


# ------------------------------------------------------------------ Batch Manhattan
def test_batch_manhattan_sgd_closed_form() -> None:
    lr, m, wd = 0.1, 0.9, 0.01
    p = _param(6, 5)
    w0 = p.detach().clone()
    g1, g2 = _grads((6, 5), 2)
    opt = BatchManhattan(torch.optim.SGD([p], lr=lr, momentum=m, weight_decay=wd))
    w1, w2 = _run(opt, p, [g1, g2])
    v1 = torch.sign(g1) + wd * w0  # decay added after the sign (Liao et al. 2016)
    e1 = w0 - lr * v1
    v2 = m * v1 + torch.sign(g2) + wd * e1
    torch.testing.assert_close(w1, e1, rtol=0, atol=1e-15)
    torch.testing.assert_close(w2, e1 - lr * v2, rtol=0, atol=1e-15)


def test_batch_manhattan_adam_closed_form_and_reference() -> None:
    lr, eps = 0.01, 1e-8
    p = _param(4, 7)
    w0 = p.detach().clone()
    grads = _grads((4, 7), 3)
    opt = BatchManhattan(torch.optim.Adam([p], lr=lr, eps=eps))
    got = _run(opt, p, grads)
    s = torch.sign(grads[0])  # first Adam step: m_hat = s, v_hat = s^2
    torch.testing.assert_close(got[0], w0 - lr * s / (s.abs() + eps), rtol=0, atol=1e-15)
    # The same Adam stepping on sign(g) directly gives bit-identical weights.
    q = nn.Parameter(w0.clone())
    ref = _run(torch.optim.Adam([q], lr=lr, eps=eps), q, [torch.sign(g) for g in grads])
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_batch_manhattan_restores_true_gradient() -> None:
    p = _param(3, 3)
    g = torch.randn(3, 3, dtype=torch.float64)
    p.grad = g
    BatchManhattan(torch.optim.SGD([p], lr=0.1)).step()
    assert p.grad is g and torch.equal(p.grad, g)


# ------------------------------------------------------------------ no sign change
def test_no_sign_change_sgd_closed_form() -> None:
    p = nn.Parameter(torch.tensor([0.5, -0.2, 0.05, 0.0, -0.01, 0.1]))
    g = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    opt = NoSignChange(torch.optim.SGD([p], lr=0.1))
    p.grad = g
    opt.step()
    # 0.5->0.4 kept; -0.2->-0.1 kept; 0.05->-0.05 flips: held; 0 has no sign: moves;
    # -0.01->0.09 flips: held; 0.1->0.0 lands on zero: applied.
    expected = torch.tensor([0.4, -0.1, 0.05, -0.1, -0.01, 0.0])
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    assert p.detach()[5] == 0.0


@pytest.mark.parametrize("make", [SGD, ADAM], ids=["sgd", "adam"])
def test_no_sign_change_matches_inner_update_then_mask(make: Make) -> None:
    p = _param(8, 8)
    q = nn.Parameter(p.detach().clone())
    grads = [10 * g for g in _grads((8, 8), 3)]  # big steps so that signs would flip
    opt, ref = NoSignChange(make([p])), make([q])
    flips = 0
    for g in grads:
        before = q.detach().clone()
        q.grad = g.clone()
        ref.step()
        with torch.no_grad():
            flipped = before * q < 0
            flips += int(flipped.sum())
            q.copy_(torch.where(flipped, before, q))
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.detach(), q.detach())
    assert flips > 0


def test_no_sign_change_params_restricts() -> None:
    a = nn.Parameter(torch.tensor([0.05]))
    b = nn.Parameter(torch.tensor([0.05]))
    opt = NoSignChange(torch.optim.SGD([a, b], lr=0.1), params=[a])
    a.grad, b.grad = torch.ones(1), torch.ones(1)
    opt.step()
    assert a.item() == pytest.approx(0.05) and b.item() == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="held by the optimizer"):
        NoSignChange(torch.optim.SGD([a], lr=0.1), params=[b])


# ------------------------------------------------------------------ weight-norm constraint
@pytest.mark.parametrize("make", [SGD, ADAM], ids=["sgd", "adam"])
def test_weight_norm_constraint_closed_form(make: Make) -> None:
    w = _param(5, 3, 2, 2)  # a conv kernel: one norm over the whole tensor
    q = nn.Parameter(w.detach().clone())
    n0 = torch.linalg.vector_norm(w.detach())
    opt, ref = WeightNormConstraint(make([w]), [w]), make([q])
    for g in _grads(tuple(w.shape), 3):
        q.grad, w.grad = g.clone(), g.clone()
        ref.step()
        with torch.no_grad():
            q.mul_(n0 / torch.linalg.vector_norm(q))
        opt.step()
        torch.testing.assert_close(w.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.linalg.vector_norm(w.detach()), n0)


def _mlp(rule: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    return biograd.convert(model, rule, seed=0)


def _backward(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()


def test_weight_norm_constraint_on_model_scales_kp_feedback_with_w() -> None:
    model = _mlp("kp")
    layers = [m for _, m in biograd.converted_layers(model)]
    ids = [id(p) for p in model.parameters()]
    n0 = [float(m.weight.detach().norm()) for m in layers]
    opt = WeightNormConstraint(torch.optim.SGD(model.parameters(), lr=0.5), model)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    _backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    for i, (key, m) in enumerate(biograd.converted_layers(model)):
        w_sgd = before[f"{key}.weight"] - 0.5 * grads[f"{key}.weight"]
        b_sgd = before[f"{key}.rule.feedback"] - 0.5 * grads[f"{key}.rule.feedback"]
        factor = n0[i] / float(w_sgd.norm())
        torch.testing.assert_close(m.weight.detach(), w_sgd * factor)
        torch.testing.assert_close(m.rule.feedback.detach(), b_sgd * factor)
        torch.testing.assert_close(float(m.weight.detach().norm()), n0[i])
        # the bias is not constrained
        torch.testing.assert_close(
            m.bias.detach(), before[f"{key}.bias"] - 0.5 * grads[f"{key}.bias"]
        )
    assert [id(p) for p in model.parameters()] == ids


def test_weight_norm_constraint_needs_converted_layers() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no converted layers"):
        WeightNormConstraint(torch.optim.SGD(model.parameters(), lr=0.1), model)


# ------------------------------------------------------------------ kp, identity, composition
@pytest.mark.parametrize("make", [SGD, ADAM], ids=["sgd", "adam"])
def test_kp_feedback_gets_the_same_manhattan_update_as_w(make: Make) -> None:
    torch.manual_seed(0)
    model = _mlp("kp")
    params = list(model.parameters())
    ids = [id(p) for p in params]
    opt = BatchManhattan(
        torch.optim.SGD(params, lr=0.1, momentum=0.9)
        if make is SGD
        else torch.optim.Adam(params, lr=0.01)
    )
    layers = [m for _, m in biograd.converted_layers(model)]
    start = [(m.weight.detach().clone(), m.rule.feedback.detach().clone()) for m in layers]
    for step in range(3):
        opt.zero_grad()
        _backward(model, seed=step)
        opt.step()
    for (w0, b0), m in zip(start, layers):
        # equal up to the rounding of w0 + dW versus b0 + dB
        torch.testing.assert_close(m.weight.detach() - w0, m.rule.feedback.detach() - b0)
        assert not torch.equal(m.weight.detach(), w0)
    assert [id(p) for p in model.parameters()] == ids
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], params))


def test_wrap_nests_in_documented_order_and_is_identity_when_empty() -> None:
    model = _mlp("usf")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    assert wrap(base) is base
    opt = wrap(base, manhattan=True, no_sign_change=True, norm_constraint=model)
    assert isinstance(opt, WeightNormConstraint)
    assert isinstance(opt.optimizer, NoSignChange)  # type: ignore[attr-defined]
    assert isinstance(opt.optimizer.optimizer, BatchManhattan)  # type: ignore[attr-defined]
    assert opt.param_groups is base.param_groups and opt.state is base.state


def test_all_wrappers_keep_usf_signs_and_norms_while_training() -> None:
    model = _mlp("usf")
    layers = [m for _, m in biograd.converted_layers(model)]
    signs = [torch.sign(m.weight.detach()) for m in layers]
    norms = [m.weight.detach().norm() for m in layers]
    opt = wrap(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        manhattan=True,
        no_sign_change=True,
        norm_constraint=model,
    )
    first = last = 0.0
    for step in range(30):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(32, 6, generator=gen)
        loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
        loss.backward()
        opt.step()
        first = float(loss) if step == 0 else first
        last = float(loss)
    assert last < first
    for m, s, n in zip(layers, signs, norms):
        assert torch.equal(torch.sign(m.weight.detach()), s)
        torch.testing.assert_close(m.weight.detach().norm(), n)
        assert torch.equal(torch.sign(biograd.feedback_weight(m)), s)  # type: ignore[arg-type]


def test_closure_is_evaluated_once_before_the_update() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = BatchManhattan(torch.optim.SGD([p], lr=0.1))
    calls = []

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (p * torch.tensor([3.0, 0.5])).sum()
        loss.backward()
        calls.append(1)
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and float(loss) == pytest.approx(2.0)
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -2.1]))


# ------------------------------------------------------------------ schedulers, checkpoints
def test_lr_scheduler_attaches_to_a_wrapper() -> None:
    model = _mlp("fa")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = wrap(base, manhattan=True, norm_constraint=model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            _backward(model)
            opt.step()
            sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.025)
    assert sched.get_last_lr() == [pytest.approx(0.025)]


def test_state_dict_round_trip_resumes_bit_identically() -> None:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        return wrap(
            torch.optim.Adam(model.parameters(), lr=0.01),
            manhattan=True,
            no_sign_change=True,
            norm_constraint=model,
        )

    a = _mlp("kp")
    opt_a = make(a)
    for step in range(3):
        opt_a.zero_grad()
        _backward(a, seed=step)
        opt_a.step()
    saved_model = copy.deepcopy(a.state_dict())
    saved_opt = copy.deepcopy(opt_a.state_dict())
    assert "biograd_weight_norms" in saved_opt

    b = _mlp("kp")
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(3.0)  # so that b's wrapper records different initial norms
    opt_b = make(b)
    b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    for step in range(3, 6):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _backward(model, seed=step)
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_grad_scaler_steps_through_a_wrapper() -> None:
    """GradScaler unscales the shared param_groups, skips steps with inf gradients, and
    otherwise calls the wrapper's step (the sign of the unscaled gradient)."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = BatchManhattan(torch.optim.SGD([p], lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale((p * torch.tensor([0.5, -3.0, 0.0])).sum()).backward()
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 3.0]))
    torch.testing.assert_close(p.grad, torch.tensor([0.5, -3.0, 0.0]))  # unscaled, not signed
    opt.zero_grad()
    scaler.scale((p * torch.tensor([float("inf"), 1.0, 1.0])).sum()).backward()
    scaler.step(opt)
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 3.0]))  # step skipped
