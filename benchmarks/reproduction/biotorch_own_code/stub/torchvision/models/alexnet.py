"""Placeholders (BioTorch imports them at import time)."""

from . import Unavailable

AlexNet = alexnet = DenseNet = MNASNet = ResNet = Unavailable
