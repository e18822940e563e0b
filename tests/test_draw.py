"""brsf's counter-based magnitude draw (biograd.rules.draw): the documented hash, the
distribution of bytes and magnitudes, determinism from (seed, step), and brsf's B: those
magnitudes with the signs of W."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import biograd
from biograd.rules import draw, feedback_std

M32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _key(seed: int, step: int) -> torch.Tensor:
    return draw.step_key(torch.tensor(draw.seed_key(seed)), torch.tensor(step))


def _reference_key(seed: int, step: int) -> int:
    return draw.splitmix64((draw.splitmix64(seed) + step) & (2**64 - 1))


def _reference_bytes(n: int, key: int) -> list[int]:
    """The module docstring's definition, in plain Python integers."""
    out: list[int] = []
    for i in range((n + 3) // 4):
        h = _fmix32(_fmix32(i ^ (key & M32)) ^ (key >> 32))
        out.extend((h >> (8 * b)) & 0xFF for b in range(4))
    return out[:n]


@pytest.mark.parametrize(("seed", "step", "n"), [(0, 0, 37), (7, 3, 64), (2**61 + 5, 10**6, 9)])
def test_bytes_follow_the_documented_hash(seed: int, step: int, n: int) -> None:
    key = _key(seed, step)
    assert int(key) & (2**64 - 1) == _reference_key(seed, step)
    assert draw.random_bytes(n, key).tolist() == _reference_bytes(n, _reference_key(seed, step))


def test_bytes_are_pinned() -> None:
    """The stream is part of a run's reproducibility: it must not change across versions or
    devices (every op is exact integer arithmetic)."""
    assert int(_key(0, 0)) & (2**64 - 1) == 0xA706DD2F4D197E6F
    assert draw.random_bytes(12, _key(0, 0)).tolist() == [
        0, 225, 62, 16, 154, 0, 231, 245, 20, 187, 158, 187,
    ]  # fmt: skip


@pytest.mark.parametrize(("seed", "step"), [(0, 0), (7, 3), (2**62 - 1, 2**40), (5, 2**63 - 9)])
def test_cpu_integer_key_path_equals_the_device_tensor_path(seed: int, step: int) -> None:
    """On the CPU the step key is a Python integer; on an accelerator the same value is
    computed with int64 tensor ops on the device. Both must give the same key and bytes."""
    key, t = torch.tensor(draw.seed_key(seed)), torch.tensor(step)
    on_cpu = draw.step_key(key, t)
    on_device = draw.splitmix64_tensor(key + t)  # what a CUDA key gets
    assert isinstance(on_cpu, int) and on_cpu == int(on_device)
    assert torch.equal(draw.random_bytes(4099, on_cpu), draw.random_bytes(4099, on_device))
    a = draw.magnitudes((33, 31), torch.tensor(0.2), on_cpu)
    assert torch.equal(a, draw.magnitudes((33, 31), torch.tensor(0.2), on_device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bytes_are_identical_on_cuda() -> None:
    key = _key(3, 11)
    cpu = draw.magnitudes((1000, 333), 0.05, key)
    cuda = draw.magnitudes((1000, 333), torch.tensor(0.05, device="cuda"), key.cuda())
    assert torch.equal(cuda.cpu(), cpu)


def test_bytes_are_uniform_and_independent_between_steps() -> None:
    n = 1 << 18
    a = draw.random_bytes(n, _key(1, 0)).long()
    b = draw.random_bytes(n, _key(1, 1)).long()
    for u in (a, b):
        counts = torch.bincount(u, minlength=256).double()
        chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
        assert chi2 < 255 + 6 * math.sqrt(2 * 255), chi2  # 255 degrees of freedom
        bits = torch.stack([(u >> k) & 1 for k in range(8)]).double().mean(1)
        assert torch.all((bits - 0.5).abs() < 5 * 0.5 / math.sqrt(n)), bits
    af, bf = a.double() - a.double().mean(), b.double() - b.double().mean()
    corr = float((af * bf).sum() / (af.norm() * bf.norm()))
    assert abs(corr) < 5 / math.sqrt(n), corr
    neighbours = float((af[1:] * af[:-1]).sum() / af.norm() ** 2)  # bytes of the same word too
    assert abs(neighbours) < 5 / math.sqrt(n), neighbours


def test_draws_are_deterministic_and_differ_by_seed_and_step() -> None:
    k = _key(5, 9)
    assert torch.equal(draw.random_bytes(1000, k), draw.random_bytes(1000, k))
    others = [_key(5, 10), _key(6, 9), _key(5, 8)]
    assert len({int(k), *(int(o) for o in others)}) == 4
    for other in others:
        same = (draw.random_bytes(1000, k) == draw.random_bytes(1000, other)).float().mean()
        assert float(same) < 0.02  # 1/256 expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitudes_mean_variance_and_support(dtype: torch.dtype) -> None:
    std, n = 0.07, 1 << 18
    a = math.sqrt(3) * std
    r = draw.magnitudes((n,), std, _key(2, 4), dtype=dtype)
    assert r.dtype == dtype
    level = r.double() / (a / 256) - 0.5  # the byte each magnitude came from
    assert torch.allclose(level, level.round(), atol=1e-3)
    assert int(level.round().min()) == 0 and int(level.round().max()) == 255
    assert float(r.min()) > 0 and float(r.max()) < a
    # sampling error of the mean: sd / sqrt(n); of the variance: ~ sd^2 * sqrt(0.8 / n)
    sd = a / math.sqrt(12)
    assert abs(float(r.double().mean()) - a / 2) < 5 * sd / math.sqrt(n)
    assert abs(float(r.double().var()) - sd**2 * (1 - 256**-2)) < 5 * sd**2 * math.sqrt(0.8 / n)
    assert abs(float(r.double().pow(2).mean()) - std**2) < 0.01 * std**2  # E[B^2] = s^2, as fa


def test_brsf_b_has_the_draw_as_magnitude_and_the_sign_of_w() -> None:
    layer = biograd.convert(nn.Linear(300, 200), "brsf", seed=4)
    std = feedback_std(layer.weight, "xavier")
    with torch.no_grad():
        layer.weight[0, :10] = 0.0  # copysign: B takes the sign bit of a zero weight
    for step in range(3):
        layer(torch.randn(2, 300)).sum().backward()
        b = biograd.feedback_weight(layer)
        w = layer.weight.detach()
        expected = draw.magnitudes(w.shape, std, _key(layer.rule.seed, step))
        torch.testing.assert_close(b.abs(), expected, rtol=1e-6, atol=0)
        assert torch.equal(torch.signbit(b), torch.signbit(w))
        nonzero = w != 0
        assert torch.equal(torch.sign(b)[nonzero], torch.sign(w)[nonzero])
