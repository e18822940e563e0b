"""brsf's per-step random magnitudes: a counter-based draw that is cheap, reproducible from
(layer seed, step) and bit-identical on every device and rank.

Batchwise random-magnitude sign-concordant feedback (Liao, Leibo, Poggio 2016, "brSF") needs a
fresh magnitude for every weight at every step. A float per weight from torch's CPU generator
(a serial Mersenne Twister) costs more than the layer's matrix products on a fully connected
layer, and CPU and CUDA generators give different streams. Here one byte per weight comes from a
hash of the word index and a 64-bit key, computed with element-wise int32 tensor ops:

- ``key = splitmix64(splitmix64(layer_seed) + step)`` (:func:`seed_key`, :func:`step_key`;
  SplitMix64, Steele, Lea, Flood 2014), computed on the device from int64 tensors, so neither the
  step nor the key ever leaves the device; it is split into two 32-bit halves ``k_lo``, ``k_hi``;
- word ``i`` (``i = 0 .. ceil(n/4) - 1``) is ``h_i = fmix32(fmix32(i XOR k_lo) XOR k_hi)``,
  ``fmix32`` MurmurHash3's 32-bit finaliser (a bijection with full avalanche);
- the bytes of the words, little-endian, are the ``n`` random bytes ``u_j`` (:func:`random_bytes`).

A magnitude is ``|R_j| = (u_j + 1/2) * sqrt(3) * s / 256`` (:func:`magnitudes`): the discrete
uniform distribution on the 256 midpoints of ``(0, sqrt(3) s)``, i.e. ``U(0, sqrt(3) s)``
(the magnitude of fa's ``U(-sqrt(3) s, sqrt(3) s)``) quantised to 8 bits. Its mean is
``sqrt(3) s / 2`` exactly, as for the continuous law, and its variance ``s^2 / 4 * (1 - 256^-2)``
(continuous: ``s^2 / 4``); ``E[R^2] = s^2 (1 - 1/(4 * 256^2))``.

Every op is exact integer arithmetic or a single IEEE rounding (one multiplication), so CPU and
CUDA give the same bits; int32 multiplication wraps modulo 2^32 on both.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_M64 = (1 << 64) - 1
_C1 = 0x85EBCA6B - (1 << 32)  # MurmurHash3 fmix32 constants, as signed int32
_C2 = 0xC2B2AE35 - (1 << 32)
LEVELS = 256
"""Number of magnitude levels (one byte per weight)."""


def _signed64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA = _signed64(0x9E3779B97F4A7C15)
_S1 = _signed64(0xBF58476D1CE4E5B9)
_S2 = _signed64(0x94D049BB133111EB)


def splitmix64(x: int) -> int:
    """SplitMix64's output function of ``x + golden gamma`` (Steele, Lea, Flood 2014), on Python
    integers modulo 2^64; :func:`splitmix64_tensor` is the same on int64 tensors."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def splitmix64_tensor(x: Tensor) -> Tensor:
    """:func:`splitmix64` on an int64 tensor (two's complement: arithmetic wraps modulo 2^64;
    logical right shifts via masks, as ``>>`` on int64 is arithmetic)."""
    z = x + _GAMMA
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _S1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _S2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def seed_key(seed: int) -> int:
    """A layer's key: ``splitmix64(seed)`` as a signed 64-bit integer (an int64 buffer)."""
    return _signed64(splitmix64(seed & _M64))


def step_key(key: Tensor, step: Tensor) -> Tensor | int:
    """The 64-bit key of the draw at ``step``: ``splitmix64(key + step)``, ``key`` from
    :func:`seed_key`. On an accelerator an int64 tensor on the device (no host synchronisation);
    on the CPU, where reading a scalar costs nothing, the same value as a Python integer (a
    dozen tiny tensor ops fewer per layer and step)."""
    if key.device.type == "cpu" and not torch.compiler.is_compiling():
        return _signed64(splitmix64((int(key) + int(step)) & _M64))
    return splitmix64_tensor(key + step)


@functools.cache
def _constants(device: torch.device) -> tuple[Tensor, ...]:
    """fmix32's shifts, masks and multipliers as int32 tensors on ``device``: an op with a
    tensor operand skips the wrapping of a Python scalar, a third of a small op's cost."""
    values = (16, 0xFFFF, 13, 0x7FFFF, _C1, _C2)
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in values)


def _fmix32_(x: Tensor) -> Tensor:
    """MurmurHash3's finaliser on an int32 tensor, in place (logical shifts via masks: ``>>``
    on int32 is arithmetic)."""
    s16, m16, s13, m19, c1, c2 = _constants(x.device)
    t = torch.bitwise_right_shift(x, s16).bitwise_and_(m16)
    x ^= t
    x *= c1
    x ^= torch.bitwise_right_shift(x, s13, out=t).bitwise_and_(m19)
    x *= c2
    x ^= torch.bitwise_right_shift(x, s16, out=t).bitwise_and_(m16)
    return x


def _low32(x: Tensor | int) -> Tensor | int:
    """The low 32 bits of an int64 tensor (or integer) as int32 (the same bits, two's
    complement)."""
    low = x & 0xFFFFFFFF
    out = low - (low >> 31) * (1 << 32)
    return out.to(torch.int32) if isinstance(out, Tensor) else out


def random_bytes(n: int, key: Tensor | int, device: torch.device | str = "cpu") -> Tensor:
    """``n`` random bytes (uint8, shape ``(n,)``) from the 64-bit key (an int64 tensor, on its
    device, or a Python integer, on ``device``), the same on every device: the little-endian
    bytes of ``fmix32(fmix32(i XOR k_lo) XOR k_hi)`` for word ``i = 0 .. ceil(n/4) - 1``."""
    if isinstance(key, Tensor):
        device = key.device
    words = torch.arange((n + 3) // 4, dtype=torch.int32, device=device)
    words ^= _low32(key)
    _fmix32_(words)
    words ^= _low32(key >> 32)
    _fmix32_(words)
    # x86, ARM and CUDA are little-endian; on a big-endian host the bytes of a word reverse.
    return words.view(torch.uint8)[:n]


def magnitudes(
    shape: torch.Size | tuple[int, ...],
    std: float | Tensor,
    key: Tensor | int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random magnitudes ``(u + 1/2) * sqrt(3) * std / 256`` of the given shape on ``key``'s
    device (``device`` for an integer key), ``u`` the bytes of :func:`random_bytes`:
    ``U(0, sqrt(3) std)`` on 256 levels (see the module docstring). Computed in float32
    (float64 for a float64 ``dtype``), then cast."""
    n = math.prod(shape)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    r = random_bytes(n, key, device).to(work).add_(0.5)
    step = (math.sqrt(3.0) / LEVELS) * std
    r = r.mul_(step.to(work) if isinstance(step, Tensor) else step)
    return r.view(shape).to(dtype)
