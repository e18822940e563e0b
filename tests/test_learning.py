"""Every rule learns: a few dozen steps lower the loss of a small MLP and a small CNN on a
synthetic task (labels from a fixed random teacher network)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import biograd

CLASSES = 4


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.Tanh(),
        nn.Linear(64, 32),
        nn.Tanh(),
        nn.Linear(32, CLASSES),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, CLASSES),
    )


def task(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    teacher = torch.randn(64, 16, generator=gen)
    readout = torch.randn(16, CLASSES, generator=gen)
    y = (torch.tanh(x.flatten(1) @ teacher / 8) @ readout).argmax(1)
    return x, y


def eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    model.train()
    return loss


@pytest.mark.parametrize("rule", biograd.RULES)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_every_rule_lowers_the_loss(arch: str, rule: str) -> None:
    torch.manual_seed(0)
    x, y = task()
    model = mlp() if arch == "mlp" else cnn()
    biograd.convert(model, rule, seed=0)  # direct feedback: drawn at the first forward pass
    layers = [layer for _, layer in biograd.converted_layers(model)]
    first = layers[0].weight.detach().clone()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = eval_loss(model, x, y)
    for step in range(100):
        idx = (torch.arange(64) + step * 64) % len(x)
        if biograd.needs_targets(model):
            biograd.set_targets(model, y[idx])
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optim.zero_grad()
        loss.backward()
        optim.step()
    after = eval_loss(model, x, y)
    assert after < 0.9 * before, (before, after)
    # the hidden layers learn, except under the shallow control (only the output layer learns)
    assert torch.equal(layers[0].weight, first) == (rule == "shallow")
