"""Small convolutional networks: LeNet-5 (BioTorch benchmark) and the CNN of Launay et al. 2019."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError
from .common import activation as make_activation
from .common import check_dropout, conv_out, image_shape


class LeNet(nn.Sequential):
    """LeNet-5 (LeCun et al. 1998) as used by the BioTorch benchmark (Sanfiz & Akrout 2021):
    ``conv1`` 5x5 6 -> ``pool1`` 2x2 -> ``conv2`` 5x5 16 -> ``pool2`` 2x2 -> ``fc1`` 120 ->
    ``fc2`` 84 -> ``out`` classes, ReLU after every hidden layer.

    ``conv3=True`` makes the third layer LeNet-5's C5, as in BioTorch's ``models/le_net.py``: a
    convolution of 16 -> 120 channels whose kernel covers the 5x5 map (``conv3``, then
    ``flatten``) in place of ``fc1``. It computes the same function, but Xavier initialisation
    and the rules' Xavier feedback scale count its fan-out as 120 x 25 instead of 120, so its
    weights and feedback start 2.6 times smaller.

    Images smaller than ``pad_to`` (28x28 MNIST, 8x8 digits) are zero-padded symmetrically to
    ``pad_to`` x ``pad_to`` by the first module ``pad``, so the net sees the 32x32 inputs of the
    benchmark (and of LeNet-5) and ``fc1`` has 16*5*5 = 400 inputs; larger images are not resized.

    Args:
        in_shape: ``(C, H, W)``.
        classes: number of outputs.
        activation, negative_slope: the hidden activation (BioTorch: relu; LeCun: tanh-like).
        pool: ``"max"`` (BioTorch) or ``"avg"`` (LeCun's subsampling).
        pad_to: minimum spatial size after padding; ``0`` disables padding.
        conv3: the third layer as a convolution (BioTorch), not ``fc1``.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        classes: int = 10,
        *,
        activation: str = "relu",
        negative_slope: float = 0.01,
        pool: str = "max",
        pad_to: int = 32,
        conv3: bool = False,
    ) -> None:
        c, h, w = image_shape("lenet", in_shape)
        if pool not in ("max", "avg"):
            raise ConfigError(f"lenet pool must be 'max' or 'avg', got {pool!r}")
        pooling = nn.MaxPool2d if pool == "max" else nn.AvgPool2d

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if h < pad_to or w < pad_to:
            ph, pw = max(pad_to - h, 0), max(pad_to - w, 0)
            layers["pad"] = nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = h + ph, w + pw
        for _ in range(2):
            h, w = conv_out(h, 5) // 2, conv_out(w, 5) // 2
        if min(h, w) < 1:
            raise ConfigError(f"lenet: input {tuple(in_shape)} is too small (use pad_to=32)")

        layers["conv1"] = nn.Conv2d(c, 6, 5)
        layers["act1"] = make_activation(activation, negative_slope)
        layers["pool1"] = pooling(2)
        layers["conv2"] = nn.Conv2d(6, 16, 5)
        layers["act2"] = make_activation(activation, negative_slope)
        layers["pool2"] = pooling(2)
        if conv3:
            layers["conv3"] = nn.Conv2d(16, 120, (h, w))
            layers["act3"] = make_activation(activation, negative_slope)
            layers["flatten"] = nn.Flatten()
        else:
            layers["flatten"] = nn.Flatten()
            layers["fc1"] = nn.Linear(16 * h * w, 120)
            layers["act3"] = make_activation(activation, negative_slope)
        layers["fc2"] = nn.Linear(120, 84)
        layers["act4"] = make_activation(activation, negative_slope)
        layers["out"] = nn.Linear(84, classes)
        super().__init__(layers)


class LaunayCNN(nn.Sequential):
    """The convolutional net of Launay, Poli, Krzakala 2019 (§3): three 5x5 convolutions of
    32, 64 and 64 channels (padding 2), each followed by its activation and a 3x3 max-pool of
    stride 2, then a hidden Linear of 128 and the output; tanh by default. On 32x32 CIFAR-10
    images the feature map before ``fc1`` is 64x3x3 = 576 (28x28 images: 64x2x2 = 256).

    Layer order follows the authors' code: ``drop0`` (input ``Dropout2d``) -> for each block
    ``conv{i}`` -> ``drop{i}`` (``Dropout2d``) -> ``act{i}`` -> ``bn{i}`` (``BatchNorm2d``) ->
    ``pool{i}``; then ``flatten`` -> ``fc1`` -> ``drop4`` -> ``act4`` -> ``bn4`` -> ``out``.
    Optional modules appear only when enabled.

    Args:
        in_shape: ``(C, H, W)``; at least 15x15 (three pools of 3/2 must leave one pixel).
        classes: number of outputs.
        channels: channels of the three convolutions.
        hidden: width of the hidden Linear layer.
        activation, negative_slope: the activation of every hidden layer.
        batch_norm: batch norm after each hidden activation.
        dropout: dropout probability on the hidden Linear layer.
        conv_dropout: ``Dropout2d`` probability after each convolution.
        input_dropout: ``Dropout2d`` probability on the input (drops whole input channels, as in
            the authors' code).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        classes: int = 10,
        *,
        channels: Sequence[int] = (32, 64, 64),
        hidden: int = 128,
        activation: str = "tanh",
        negative_slope: float = 0.01,
        batch_norm: bool = False,
        dropout: float = 0.0,
        conv_dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        c, h, w = image_shape("launay_cnn", in_shape)
        dropout = check_dropout("dropout", dropout)
        conv_dropout = check_dropout("conv_dropout", conv_dropout)
        input_dropout = check_dropout("input_dropout", input_dropout)
        if len(channels) != 3 or min(channels) < 1:
            raise ConfigError(f"launay_cnn channels must be three positive sizes, got {channels}")

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if input_dropout > 0:
            layers["drop0"] = nn.Dropout2d(input_dropout)
        for i, out_c in enumerate((int(ch) for ch in channels), start=1):
            layers[f"conv{i}"] = nn.Conv2d(c, out_c, 5, padding=2)
            if conv_dropout > 0:
                layers[f"drop{i}"] = nn.Dropout2d(conv_dropout)
            layers[f"act{i}"] = make_activation(activation, negative_slope)
            if batch_norm:
                layers[f"bn{i}"] = nn.BatchNorm2d(out_c)
            layers[f"pool{i}"] = nn.MaxPool2d(3, 2)
            c, h, w = out_c, conv_out(h, 3, 2), conv_out(w, 3, 2)
        if min(h, w) < 1:
            raise ConfigError(
                f"launay_cnn: input {tuple(in_shape)} is too small; it needs at least 15x15"
            )
        layers["flatten"] = nn.Flatten()
        layers["fc1"] = nn.Linear(c * h * w, hidden)
        if dropout > 0:
            layers["drop4"] = nn.Dropout(dropout)
        layers["act4"] = make_activation(activation, negative_slope)
        if batch_norm:
            layers["bn4"] = nn.BatchNorm1d(hidden)
        layers["out"] = nn.Linear(hidden, classes)
        super().__init__(layers)
