"""Residual networks (He, Zhang, Ren, Sun 2016, *Deep residual learning for image recognition*):
the CIFAR ResNet-20/32/44/56/110 of §4.2 and the ImageNet ResNet-18/50 of §3.3 (Table 1).

Every block is a plain tree of ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.ReLU`` modules, and the
residual sum is out of place, so ``biograd.convert`` applies to every convolution and the
autograd graph keeps every tensor a rule's backward needs. Each block runs its main path before
its shortcut, so that a projection shortcut reads the same input tensor after ``conv1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .common import image_shape

CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}
"""CIFAR ResNet depth ``6n + 2`` -> blocks per stage ``n`` (He et al. 2016, §4.2)."""


class PadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016, §3.3 and §4.2): identity with spatial subsampling by
    ``stride`` and zero channels appended (split evenly before and after); no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.pad}"


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Option-B shortcut: a strided 1x1 convolution and batch norm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _shortcut(in_channels: int, out_channels: int, stride: int, option: str) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if option == "A":
        return PadShortcut(in_channels, out_channels, stride)
    return _projection(in_channels, out_channels, stride)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; ``relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x))``."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), each with batch norm (He et al. 2016, Fig. 5 right).

    ``stride_in_1x1=False`` (default) puts the stride on the 3x3 convolution, as torchvision's
    "ResNet v1.5" does; ``True`` puts it on the first 1x1 as in the paper. The parameter count is
    the same either way.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        shortcut: str = "B",
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=s3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut)
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images (He et al. 2016, §4.2): a 3x3 convolution of 16 channels, three
    stages of ``n`` basic blocks with 16, 32 and 64 channels (the 2nd and 3rd start with stride
    2), global average pooling and ``fc``; depth ``6n + 2``.

    Args:
        depth: 20, 32, 44, 56 or 110 (or any ``6n + 2``).
        in_shape: ``(C, H, W)``; any size (the pooling is global).
        classes: number of outputs.
        shortcut: ``"A"`` (zero-padded identity, the paper's CIFAR choice; ResNet-20 has
            269,722 parameters) or ``"B"`` (1x1 projections where the shape changes; 272,474).
        zero_init_residual: start every block as the identity (Goyal et al. 2017, §5.1: the last
            batch-norm weight of each block is 0).
    """

    def __init__(
        self,
        depth: int,
        in_shape: Sequence[int],
        classes: int = 10,
        *,
        shortcut: str = "A",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        c, _, _ = image_shape(f"resnet{depth}", in_shape)
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(c, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages, width = [], 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(width, channels, stride if i == 0 else 1, shortcut))
                width = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, classes)
        if zero_init_residual:
            _zero_init_residual(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        out: Tensor = self.fc(self.flatten(self.avgpool(x)))
        return out


class ResNet(nn.Module):
    """ImageNet ResNet (He et al. 2016, Table 1): a 7x7/2 convolution of 64 channels, 3x3/2
    max-pool, four stages of blocks with 64, 128, 256, 512 base channels (stages 2-4 start with
    stride 2, projection shortcuts where the shape changes), global average pooling and ``fc``.

    Args:
        block: :class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50/101/152).
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for 50.
        in_shape: ``(C, H, W)``; any size of at least 1x1 (224x224 in the paper).
        classes: number of outputs.
        stride_in_1x1: Bottleneck only, see :class:`Bottleneck`.
        zero_init_residual: start every block as the identity (Goyal et al. 2017, §5.1: the last
            batch-norm weight of each block is 0).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        in_shape: Sequence[int],
        classes: int = 1000,
        *,
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        c, _, _ = image_shape("resnet", in_shape)
        self.conv1 = nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, width = [], 64
        for s, (channels, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks: list[nn.Module] = []
            for i in range(count):
                stride = 2 if s > 0 and i == 0 else 1
                if block is Bottleneck:
                    blocks.append(Bottleneck(width, channels, stride, "B", stride_in_1x1))
                else:
                    blocks.append(BasicBlock(width, channels, stride, "B"))
                width = channels * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, classes)
        if zero_init_residual:
            _zero_init_residual(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: Tensor = self.fc(self.flatten(self.avgpool(x)))
        return out


def _zero_init_residual(model: nn.Module) -> nn.Module:
    """Set the last batch-norm weight of every residual block of ``model`` to zero."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Bottleneck):
                m.bn3.weight.zero_()
            elif isinstance(m, BasicBlock):
                m.bn2.weight.zero_()
    return model
