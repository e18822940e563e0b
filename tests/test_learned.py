"""The maths of the learned-feedback rules (``biograd.rules.learned``) against independent
computations of the papers' formulas: explicit loops over output positions, and autograd on the
explicit forward expression. Linear layers with 2-D and 3-D inputs, convolutions 1d/2d/3d with
stride, padding, dilation and groups."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from biograd.rules import learned as L
from biograd.rules.learned import ConvArgs

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# name -> (input shape, weight shape, conv geometry or None)
CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...], ConvArgs | None]] = {
    "linear2d": ((7, 5), (4, 5), None),
    "linear3d": ((3, 4, 5), (6, 5), None),
    "conv1d": ((3, 4, 9), (6, 2, 3), ConvArgs((2,), (1,), (2,), 2)),
    "conv2d": ((2, 3, 6, 5), (4, 3, 3, 2), ConvArgs((1, 2), (1, 0), (1, 1), 1)),
    "conv3d": ((2, 2, 4, 5, 4), (4, 1, 2, 3, 2), ConvArgs((1, 1, 2), (0, 1, 1), (1, 2, 1), 2)),
}


def double(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def conv_out(x: Tensor, w: Tensor, c: ConvArgs | None) -> Tensor:
    if c is None:
        return x @ w.t()
    return CONV[w.dim() - 2](x, w, None, c.stride, c.padding, c.dilation, c.groups)


def patches(
    x: Tensor, w_shape: tuple[int, ...], c: ConvArgs
) -> tuple[list[tuple[int, ...]], Tensor]:
    """Every output position and the input patch it sees: ``(positions, P)`` with ``P`` of
    shape ``(N, positions, C_in, *kernel)``, built by explicit indexing of the padded input."""
    dims = len(w_shape) - 2
    ks = w_shape[2:]
    pad = [p for pp in reversed(c.padding) for p in (pp, pp)]
    xp = F.pad(x, pad)
    sizes = [
        (xp.shape[2 + i] - c.dilation[i] * (ks[i] - 1) - 1) // c.stride[i] + 1 for i in range(dims)
    ]
    positions = list(itertools.product(*[range(s) for s in sizes]))
    out = []
    for pos in positions:
        idx = [torch.arange(ks[i]) * c.dilation[i] + pos[i] * c.stride[i] for i in range(dims)]
        patch = xp
        for i in range(dims):
            patch = patch.index_select(2 + i, idx[i])
        out.append(patch)
    return positions, torch.stack(out, 1)


def ref_weight_grad(x: Tensor, g: Tensor, w_shape: tuple[int, ...], c: ConvArgs | None) -> Tensor:
    """``sum_r g_r x_r^T`` by an explicit loop over rows / output positions (and groups)."""
    if c is None:
        xs, gs = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        return sum(torch.outer(gs[r], xs[r]) for r in range(xs.shape[0]))
    positions, p = patches(x, w_shape, c)
    out_c, in_g = w_shape[0], w_shape[1]
    per = out_c // c.groups
    grad = torch.zeros(w_shape, dtype=x.dtype)
    gf = g.reshape(g.shape[0], out_c, -1)
    for o in range(out_c):
        grp = o // per
        sl = p[:, :, grp * in_g : (grp + 1) * in_g]
        for r, _ in enumerate(positions):
            grad[o] += (gf[:, o, r].reshape(-1, *[1] * (len(w_shape) - 1)) * sl[:, r]).sum(0)
    return grad


@pytest.mark.parametrize("case", CASES)
def test_weight_and_input_grad_match_loops_and_autograd(case: str) -> None:
    torch.manual_seed(0)
    x_shape, w_shape, c = CASES[case]
    x, w = double(*x_shape).requires_grad_(), double(*w_shape).requires_grad_()
    y = conv_out(x, w, c)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * g).sum(), (x, w))
    torch.testing.assert_close(L.weight_grad(x.detach(), g, w_shape, c), gw)
    torch.testing.assert_close(
        L.weight_grad(x.detach(), g, w_shape, c), ref_weight_grad(x.detach(), g, w_shape, c)
    )
    torch.testing.assert_close(L.input_grad(g, w.detach(), x_shape, c), gx)
    torch.testing.assert_close(L.forward(x, w, c), y)


# --------------------------------------------------------------------------- weight mirror
@pytest.mark.parametrize("case", CASES)
def test_mirror_update_is_the_hebbian_product_minus_decay(case: str) -> None:
    """Delta B = eta ((1/R) sum_r y_r x_r^T - lambda B) with y = W x (Akrout et al. 2019, Sec. 3)."""
    torch.manual_seed(1)
    x_shape, w_shape, c = CASES[case]
    w, b, noise = double(*w_shape), double(*w_shape), double(*x_shape)
    y = L.mirror_response(noise, w, c)
    torch.testing.assert_close(y, conv_out(noise, w, c))
    rows = y.numel() // (y.shape[-1] if c is None else y.shape[1])
    expected = 0.3 * (ref_weight_grad(noise, y, w_shape, c) / rows - 0.7 * b)
    torch.testing.assert_close(L.mirror_update(b, noise, y, w, c, lr=0.3, decay=0.7), expected)


@pytest.mark.parametrize("case", ["linear2d", "conv1d", "conv2d", "conv3d"])
def test_mirror_noise_patches_give_sigma2_w_in_expectation(case: str) -> None:
    """The noise batch of ``mirror_noise_shape`` gives one pure-noise patch per sample, so the
    correlation averages to sigma^2 W (no border zeros)."""
    torch.manual_seed(2)
    _, w_shape, c = CASES[case]
    w = double(*w_shape)
    shape, drive = L.mirror_noise_shape(w, 40_000, c)
    sigma = 0.5
    noise = sigma * torch.randn(shape, dtype=torch.float64)
    y = L.mirror_response(noise, w, drive)
    assert L.output_positions(y, drive) == 40_000
    corr = L.mirror_correlation(noise, y, w, drive)
    err = (corr - sigma**2 * w).norm() / (sigma**2 * w).norm()
    assert err < 0.05, float(err)


def test_mirror_iterations_drive_b_to_the_fixed_point() -> None:
    """Repeated steps take B to (sigma^2 / lambda) W: angle near 0, norm ratio sigma^2 / lambda."""
    torch.manual_seed(3)
    w = double(6, 10)
    b = double(6, 10)
    sigma, decay = 1.0, 2.0
    for _ in range(400):
        noise = sigma * double(256, 10)
        b = b + L.mirror_update(b, noise, L.mirror_response(noise, w, None), w, None, 0.05, decay)
    cos = float((b * w).sum() / (b.norm() * w.norm()))
    assert math.degrees(math.acos(min(cos, 1.0))) < 5
    assert abs(float(b.norm() / w.norm()) - sigma**2 / decay) < 0.05


# --------------------------------------------------------------------------- product feedback
def pfa_shapes(
    w_shape: tuple[int, ...], c: ConvArgs | None, ratio: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of B and R for a layer with weight shape ``w_shape`` and expansion ratio ``ratio``."""
    out = w_shape[0]
    mid = out * ratio
    if c is None:
        return (out, mid), (mid, w_shape[1])
    dims = len(w_shape) - 2
    return (out, mid // c.groups, *[1] * dims), (mid, *w_shape[1:])


def two_stage(x: Tensor, b: Tensor, r: Tensor, c: ConvArgs | None) -> Tensor:
    """The explicit forward expression of the feedback path: ``B (R x)`` (for a convolution, R
    with the layer's geometry, then B as a grouped 1x1 convolution)."""
    if c is None:
        return (x @ r.t()) @ b.t()
    dims = r.dim() - 2
    mid = conv_out(x, r, c)
    return CONV[dims](mid, b, None, (1,) * dims, (0,) * dims, (1,) * dims, c.groups)


@pytest.mark.parametrize("ratio", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_pfa_gradients_match_autograd_on_the_product_path(case: str, ratio: int) -> None:
    """grad_in = (g B) R and grad_R = (g B)^T x (Li & Benna 2024) are the input and R gradients
    of <g, B R x>, and grad_in equals the gradient through the product matrix B R."""
    torch.manual_seed(4)
    x_shape, w_shape, c = CASES[case]
    b_shape, r_shape = pfa_shapes(w_shape, c, ratio)
    x, b, r = double(*x_shape).requires_grad_(), double(*b_shape), double(*r_shape).requires_grad_()
    y = two_stage(x, b, r, c)
    g = torch.randn_like(y)
    gx, gr = torch.autograd.grad((y * g).sum(), (x, r))
    torch.testing.assert_close(L.pfa_input_grad(g, b, r.detach(), x_shape, c), gx)
    torch.testing.assert_close(L.pfa_r_grad(g, b, x.detach(), r_shape, c), gr)
    gw = L.weight_grad(x.detach(), g, w_shape, c)
    groups = 1 if c is None else c.groups
    torch.testing.assert_close(L.pfa_r_from_weight_grad(gw, b, groups), gr)
    path = L.pfa_path(b, r.detach(), 1 if c is None else c.groups)
    assert path.shape == w_shape
    torch.testing.assert_close(L.input_grad(g, path, x_shape, c), gx)


def test_pfa_path_is_the_matrix_product_per_group() -> None:
    torch.manual_seed(5)
    b, r = double(6, 4, 1, 1), double(8, 3, 2, 2)  # groups=2: out 6, mid 8, in 6
    path = L.pfa_path(b, r, groups=2)
    for o in range(6):
        grp = o // 3
        expected = sum(b[o, m, 0, 0] * r[grp * 4 + m] for m in range(4))
        torch.testing.assert_close(path[o], expected)
    b2, r2 = double(5, 15), double(15, 7)
    torch.testing.assert_close(L.pfa_path(b2, r2), torch.einsum("om,mi->oi", b2, r2))


def test_pfa_b_scale_makes_b_bt_the_identity_on_average() -> None:
    torch.manual_seed(6)
    mid = 4000
    b = torch.randn(5, mid, dtype=torch.float64) * L.pfa_b_std(mid)
    torch.testing.assert_close(b @ b.t(), torch.eye(5, dtype=torch.float64), atol=0.08, rtol=0)


# --------------------------------------------------------------------------- direct Kolen-Pollack
@pytest.mark.parametrize("point_shape", [(7, 12), (7, 3, 2, 2)])
def test_dkp_grad_is_activity_times_error(point_shape: tuple[int, ...]) -> None:
    """grad_B = a^T e (Webster et al. 2020), B of shape (d, C), a flattened per sample."""
    torch.manual_seed(7)
    a, e = double(*point_shape), double(7, 4)
    expected = sum(torch.outer(a[n].reshape(-1), e[n]) for n in range(7))
    torch.testing.assert_close(L.dkp_grad(a, e), expected)
