"""The rules keep working where PyTorch users put them: activation checkpointing, torch.func,
torch.fx / torch.export; and on tiny randomly initialised transformers models (no download)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
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
    expected, got = step_grads(plain, rule), step_grads(ckpt, rule)
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
