"""Compare learning rules on your own model and data: a small CNN and a synthetic data set.

Run it as a script (from the repository root):

    python docs/examples/own_model.py

or hand its two factories to the command line:

    biograd compare --model docs/examples/own_model.py:make_net \\
        --data docs/examples/own_model.py:make_data --rules bp,fa,dfa --epochs 5 --seeds 2

See docs/own-model.md.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import biograd


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with ReLU and 2x2 max pooling, then a linear classifier."""

    def __init__(self, in_shape: tuple[int, ...], classes: int, width: int) -> None:
        super().__init__()
        channels, height, breadth = in_shape
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (height // 4) * (breadth // 4), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def make_net(
    in_shape: tuple[int, ...] = (1, 12, 12), classes: int = 4, width: int = 8
) -> nn.Module:
    """The model factory: a fresh :class:`SmallCNN` for every rule and seed.

    biograd passes ``in_shape`` (one example's shape) and ``classes`` because the function takes
    parameters of those names; ``width`` comes from ``model.kwargs`` (or ``model_kwargs=``).
    """
    return SmallCNN(in_shape, classes, width)


def bars(
    n: int, size: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy images (1, size, size), each holding one bar whose orientation is the class:
    0 horizontal, 1 vertical, 2 diagonal, 3 anti-diagonal, at a random offset."""
    y = torch.randint(0, 4, (n,), generator=generator)
    offset = torch.randint(-size // 3, size // 3 + 1, (n,), generator=generator)
    r = torch.arange(size)[:, None].expand(size, size)
    c = torch.arange(size)[None, :].expand(size, size)
    centre = size // 2
    lines = torch.stack(
        [
            r[None] == centre + offset[:, None, None],  # horizontal
            c[None] == centre + offset[:, None, None],  # vertical
            (r - c)[None] == offset[:, None, None],  # diagonal
            (r + c)[None] == size - 1 + offset[:, None, None],  # anti-diagonal
        ],
        dim=1,
    )  # (n, 4, size, size)
    x = lines[torch.arange(n), y].float()[:, None]
    x = x + noise * torch.randn(x.shape, generator=generator)
    return x, y


def make_data(
    n_train: int = 512, n_test: int = 256, size: int = 12, noise: float = 0.3, seed: int = 0
) -> biograd.DataSplits:
    """The train and test splits of the bars task (drawn once from ``seed``, so every rule and
    seed of a comparison sees the same examples); the keyword arguments come from
    ``data.kwargs`` (or ``data_kwargs=``)."""
    g = torch.Generator().manual_seed(seed)
    return biograd.DataSplits(
        train=bars(n_train, size, noise, g), test=bars(n_test, size, noise, g), classes=4
    )


if __name__ == "__main__":
    result = biograd.compare(
        make_net,
        make_data,  # a data factory; or pass the splits: compare(make_net, (x, y), (x_test, y_test))
        rules=["bp", "fa", "dfa"],
        epochs=5,
        seeds=2,
        out="runs/own-model",
        optim={"lr": 0.05},
    )
    print(result.markdown())
    for row in result.rows:
        print(f"{row['rule']}: {100 * row['test_acc']:.1f}% test accuracy")
    print("plots:", *result.plots, sep="\n  ")
    print("reproducible from config.yaml:", result.reproducible)
