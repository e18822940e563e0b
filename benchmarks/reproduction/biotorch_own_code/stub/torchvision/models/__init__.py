"""Names BioTorch imports from ``torchvision.models`` (its ImageNet models); none is usable."""

from typing import Any


class Unavailable:
    """A placeholder: raises when used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("torchvision stub: only the LeNet/MNIST path is available")


def __getattr__(name: str) -> type[Unavailable]:
    return Unavailable
