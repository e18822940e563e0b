"""How the feedback matrices ``B_k`` of a direct rule are stored: one engine class per layout.

``d_k`` features at point k, ``C`` outputs, ``R`` = ``hashed_rows``; every entry is N(0, 1) times
the norm factor of :data:`biograd.direct.NORMS`, drawn on the CPU from the model seed:

- :class:`Dense` (``dense``): one buffer ``point_<k>`` of shape ``(d_k, C)`` per point, drawn from
  (seed, point name, shape), so adding a point leaves the others as they were; memory
  ``C * sum(d_k)``.
- :class:`Shared` (``shared``): one buffer ``shared`` of shape ``(max d_k, C)``;
  ``B_k = S[:d_k] * norm(d_k)`` (Launay et al. 2019, TinyDFA); one matmul per step; memory
  ``C * max(d_k)``.
- :class:`Hashed` (``hashed``): one basis ``basis`` of shape ``(R, C)``; row ``i`` of ``B_k`` is
  ``sign_k(i) * P[idx_k(i)] * norm(d_k)`` with ``idx_k``, ``sign_k`` an integer hash of ``(k, i)``
  (:meth:`Hashed.hash_index`) recomputed in every backward; one matmul per step; memory ``R * C``
  whatever the feature-map size. Rows of ``B_k`` repeat (up to sign) about every ``R`` features,
  so ``rank(B_k) <= min(R, C)``: keep ``R >= C``.

Shared and hashed keep each point's size as an int64 buffer ``size_<k>``; hashed its seed as
``hash_seed``.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..rules.base import MASK32, layer_seed, mix32
from ..rules.direct import FeedbackError
from .engine import DirectFeedback, buffer_name
from .norms import norm_factor


def point_salt(seed: int, key: str) -> int:
    """The 32-bit salt of feedback point ``key`` in the ``hashed`` layout:
    ``crc32(key) XOR (seed * 0x9E3779B1 mod 2^32)``."""
    return zlib.crc32(key.encode()) ^ ((seed * 0x9E3779B1) & MASK32)


class Dense(DirectFeedback):
    """One ``(d_k, C)`` buffer per point (a Parameter for a rule with ``learned_feedback``:
    ``dkp``)."""

    layout = "dense"

    def _points(self) -> dict[str, Tensor]:
        return {
            n[len("point_") :].replace("__", "."): b
            for n, b in [*self._buffers.items(), *self._parameters.items()]
            if n.startswith("point_") and b is not None
        }

    @property
    def sizes(self) -> dict[str, int]:
        return {k: b.shape[0] for k, b in self._points().items()}

    @property
    def classes(self) -> int | None:
        return next((b.shape[1] for b in self._points().values()), None)

    def materialise(self, sizes: dict[str, int], classes: int, like: Tensor) -> None:
        known = self._points()
        for key, d in sizes.items():
            self.check(key, d)
            if key not in known:
                b = self._draw(d, classes, layer_seed(self.seed, key), like)
                self._store(buffer_name("point_", key), b * norm_factor(self.norm, d, classes))

    def _store(self, name: str, value: Tensor) -> None:
        if self.rule.learned_feedback:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def placeholders(self, names: Sequence[str]) -> None:
        for n in names:
            self._store(n, torch.empty(0, 0))

    def check(self, key: str, d: int) -> None:
        b = self._points().get(key)
        if b is not None and b.shape[0] != d:
            raise FeedbackError(
                f"feedback point {key!r} has {d} features per sample or position (batch_dims="
                f"{self.batch_dims}) but its feedback was drawn for {b.shape[0]} at the first "
                "forward pass: set batch_dims, or use layout='hashed'"
            )

    def matrix(self, key: str, d: int | None = None) -> Tensor:
        points = self._points()
        if key not in points:
            raise KeyError(f"no feedback point {key!r} has been seen; known: {sorted(points)}")
        return points[key]

    def set_matrix(self, key: str, value: Tensor) -> None:
        """Replace the feedback of point ``key`` with ``value`` of shape ``(d_k, C)`` (e.g. to
        compare with a chosen feedback such as a transposed weight)."""
        buf = self._points().get(key)
        if buf is None or buf.shape != value.shape:
            shape = None if buf is None else tuple(buf.shape)
            raise FeedbackError(
                f"point {key!r}: feedback of shape {shape}, got {tuple(value.shape)}"
            )
        with torch.no_grad():
            buf.copy_(value)

    @staticmethod
    def entries(sizes: dict[str, int], classes: int, hashed_rows: int) -> int:
        return classes * sum(sizes.values())

    def owns(self, name: str) -> str | None:
        return "matrix" if name.startswith("point_") else None


class _Sized(DirectFeedback):
    """A layout with one stored matrix (``store``) and a ``size_<k>`` buffer per point."""

    store = ""

    @property
    def sizes(self) -> dict[str, int]:
        return {
            n[len("size_") :].replace("__", "."): int(b)
            for n, b in self._buffers.items()
            if n.startswith("size_") and b is not None
        }

    @property
    def classes(self) -> int | None:
        b = self._buffers.get(self.store)
        return None if b is None else b.shape[1]

    def _rows(self, sizes: dict[str, int], classes: int) -> int:
        raise NotImplementedError

    def materialise(self, sizes: dict[str, int], classes: int, like: Tensor) -> None:
        if self._buffers.get(self.store) is None:
            b = self._draw(self._rows(sizes, classes), classes, self.seed, like)
            self.register_buffer(self.store, b)
        for key, d in sizes.items():
            self.check(key, d)
            name = buffer_name("size_", key)
            if name not in self._buffers:
                self.register_buffer(name, torch.tensor(d, device=like.device))

    def owns(self, name: str) -> str | None:
        if name == self.store:
            return "matrix"
        return "int" if name.startswith("size_") or name == "hash_seed" else None

    def matrix(self, key: str, d: int | None = None) -> Tensor:
        if d is None:
            sizes = self.sizes
            if key not in sizes:
                raise KeyError(f"no feedback point {key!r} has been seen; known: {sorted(sizes)}")
            d = sizes[key]
        return self._matrix(key, d)

    def _matrix(self, key: str, d: int) -> Tensor:
        raise NotImplementedError


class Shared(_Sized):
    """One ``(max d_k, C)`` matrix ``S``; ``B_k = S[:d_k] * norm(d_k)``."""

    layout, store = "shared", "shared"
    shared: Tensor

    def _rows(self, sizes: dict[str, int], classes: int) -> int:
        return max(sizes.values(), default=1)

    def check(self, key: str, d: int) -> None:
        if self._buffers.get("shared") is not None and d > self.shared.shape[0]:
            raise FeedbackError(
                f"feedback point {key!r} has {d} features per sample or position, the shared "
                f"feedback {self.shared.shape[0]} rows (drawn at the first forward pass): run the largest "
                "input first, or use layout='hashed'"
            )

    def _matrix(self, key: str, d: int) -> Tensor:
        return self.shared[:d] * norm_factor(self.norm, d, self.shared.shape[1])

    def product(self, s: Tensor, ds: Sequence[int]) -> Tensor:
        # one matmul for all points, kept for the backward pass (rows x max d_k): cheaper than
        # one per point, and each point's columns are those of a single product
        return s.matmul(self.shared[: max(ds)].t())

    def take(self, product: Tensor, key: str, d: int) -> Tensor:
        return product[:, :d] * norm_factor(self.norm, d, self.shared.shape[1])

    @staticmethod
    def entries(sizes: dict[str, int], classes: int, hashed_rows: int) -> int:
        return classes * max(sizes.values(), default=1)


class Hashed(_Sized):
    """One ``(R, C)`` basis; the rows of ``B_k`` are signed basis rows chosen by a hash."""

    layout, store = "hashed", "basis"
    basis: Tensor

    def __init__(self, rule: str, *, hashed_rows: int = 1024, **kwargs: Any) -> None:
        super().__init__(rule, **kwargs)
        self.hashed_rows = hashed_rows

    def materialise(self, sizes: dict[str, int], classes: int, like: Tensor) -> None:
        if "hash_seed" not in self._buffers:
            self.register_buffer("hash_seed", torch.tensor(self.seed, device=like.device))
        super().materialise(sizes, classes, like)

    def _rows(self, sizes: dict[str, int], classes: int) -> int:
        widest = max(sizes.values(), default=classes)
        if self.hashed_rows < min(classes, widest):
            warnings.warn(
                f"hashed_rows={self.hashed_rows} < {min(classes, widest)}: the hashed feedback has "
                f"rank at most {self.hashed_rows}, lower than a dense one ({min(classes, widest)})",
                stacklevel=2,
            )
        return self.hashed_rows

    def hash_index(
        self, key: str, d: int, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """Row indices into the basis and signs of ``B_k``: ``h = mix(mix(i) XOR salt_k)``,
        ``idx = h mod R``, ``sign = +1`` if bit 31 of ``h`` is 0 else ``-1``, for
        ``i = 0..d-1``, ``mix`` MurmurHash3's finaliser, ``salt_k`` from :func:`point_salt` with
        the seed of the int64 buffer ``hash_seed`` (computed on the device)."""
        i = torch.arange(d, device=device, dtype=torch.int64)
        seed = self.get_buffer("hash_seed").to(device)
        salt = ((seed * 0x9E3779B1) & MASK32) ^ zlib.crc32(key.encode())
        h = mix32(mix32(i) ^ salt)
        return h % self.basis.shape[0], 1 - 2 * ((h >> 31) & 1)

    def _matrix(self, key: str, d: int) -> Tensor:
        idx, sign = self.hash_index(key, d, self.basis.device)
        scale = norm_factor(self.norm, d, self.basis.shape[1])
        return self.basis[idx] * (sign.to(self.basis.dtype) * scale).unsqueeze(1)

    def product(self, s: Tensor, ds: Sequence[int]) -> Tensor:
        return s.matmul(self.basis.t())  # rows x R, kept for the backward pass

    def take(self, product: Tensor, key: str, d: int) -> Tensor:
        idx, sign = self.hash_index(key, d, product.device)
        factor = sign.to(product.dtype) * norm_factor(self.norm, d, self.basis.shape[1])
        return product.index_select(1, idx).mul_(factor)

    @staticmethod
    def entries(sizes: dict[str, int], classes: int, hashed_rows: int) -> int:
        return classes * hashed_rows


LAYOUTS: dict[str, type[DirectFeedback]] = {"dense": Dense, "shared": Shared, "hashed": Hashed}
"""The layouts by name (see this module's docstring)."""
