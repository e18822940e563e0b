"""The rules keep working where PyTorch users put them: activation checkpointing, torch.func,
torch.fx / torch.export; and on tiny randomly initialised transformers models (no download)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import biograd

RULES = biograd.RULES


def direct(rule: str) -> bool:
    return biograd.get_rule(rule).direct


# --------------------------------------------------------------------------- checkpointing
class Segmented(nn.Module):
    """An MLP whose middle two layers run as one checkpointed segment (``mode``: None for no
    checkpoint, else ``use_reentrant``)."""

    def __init__(self, mode: bool | None = None) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = (
            nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3),
        )  # fmt: skip
        self.mode = mode

    def segment(self, h: Tensor) -> Tensor:
        return torch.tanh(self.b(torch.tanh(self.a(h))))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        if self.mode is None:
            h = self.segment(h)
        else:
            h = checkpoint(self.segment, h, use_reentrant=self.mode)
        return self.out(h)


def step_grads(model: nn.Module, rule: str, steps: int = 3) -> list[dict[str, Tensor]]:
    """Parameter gradients of ``steps`` training steps (SGD between them); a missing gradient
    reads as zeros."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
        if rule == "drtp":
            biograd.set_targets(model, y)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        out.append(
            {
                n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
                for n, p in model.named_parameters()
            }
        )
        opt.step()
    return out


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("rule", RULES)
def test_checkpointing_gives_the_same_gradients(rule: str, reentrant: bool) -> None:
    plain, ckpt = Segmented(), Segmented(reentrant)
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):
        biograd.convert(m, rule, seed=3)
    expected = step_grads(plain, rule)
    if reentrant and biograd.get_rule(rule).learned_feedback and biograd.get_rule(rule).direct:
        with pytest.raises(biograd.direct.FeedbackError, match="use_reentrant=False"):
            step_grads(ckpt, rule)
        return
    got = step_grads(ckpt, rule)
    for step, (e, g) in enumerate(zip(expected, got)):
        for name in e:
            torch.testing.assert_close(g[name], e[name], msg=f"step {step}: {name}")


def test_brsf_draws_once_per_step_under_checkpointing() -> None:
    for mode in (True, False):
        plain, ckpt = Segmented(), Segmented(mode)
        ckpt.load_state_dict(plain.state_dict())
        for m in (plain, ckpt):
            biograd.convert(m, "brsf")
            step_grads(m, "brsf", steps=3)
        for name in ("a", "b"):
            assert int(getattr(ckpt, name).rule.step) == 3
            torch.testing.assert_close(
                biograd.feedback_weight(getattr(ckpt, name)),
                biograd.feedback_weight(getattr(plain, name)),
            )


# --------------------------------------------------------------------------- torch.func
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))


@pytest.mark.parametrize("make", [mlp, convnet])
@pytest.mark.parametrize("rule", ["fa", "usf", "frsf", "kp"])
def test_vmap_grad_per_sample_gradients(rule: str, make: Any) -> None:
    model = biograd.convert(make(), rule, seed=1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    x = torch.randn(6, 4) if make is mlp else torch.randn(6, 2, 4, 4)
    y = torch.randint(0, 3, (6,))

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, msg=f"sample {i}: {name}")
    with biograd.exact(model):
        bp = grad(loss)(params, x[0], y[0])
    first = next(iter(params))
    assert not torch.allclose(bp[first], per_sample[first][0])  # the rule, not backprop


@pytest.mark.parametrize("rule", ["dfa", "sdfa", "drtp", "shallow"])
def test_func_grad_of_direct_rules_equals_backward(rule: str) -> None:
    model = biograd.convert(mlp(), rule, seed=1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def loss(p: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        if rule == "drtp":
            biograd.set_targets(model, y)
        return F.cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    params = dict(model.named_parameters())
    loss(params, dict(model.named_buffers())).backward()  # draws the feedback
    detached = {k: v.detach() for k, v in params.items()}
    got = grad(loss)(detached, {k: v.detach() for k, v in model.named_buffers()})
    for name, p in params.items():
        expected = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got[name], expected, msg=name)


# --------------------------------------------------------------------------- tracing
@pytest.mark.parametrize("rule", ["fa", "usf", "kp", "dfa"])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_tracing_keeps_the_rule_or_refuses(rule: str, tracer: str) -> None:
    model = biograd.convert(mlp(), rule, seed=2)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    try:
        if tracer == "fx":
            traced: nn.Module = torch.fx.symbolic_trace(model)
        else:
            traced = torch.export.export(model, (x,)).module()
    except biograd.errors.BiogradError as err:
        assert "\n" not in str(err) and "biograd" in str(err)
        return
    eager = [
        g.clone() for g in torch.autograd.grad(F.cross_entropy(model(x), y), model.parameters())
    ]
    got = torch.autograd.grad(F.cross_entropy(traced(x), y), list(traced.parameters()))
    for e, g in zip(eager, got):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_tracing_backprop_and_exact_models_still_works(tracer: str) -> None:
    model = biograd.convert(mlp(), "bp")
    x = torch.randn(5, 4)
    traced = (
        torch.fx.symbolic_trace(model)
        if tracer == "fx"
        else torch.export.export(model, (x,)).module()
    )
    torch.testing.assert_close(traced(x), model(x))
