"""The ops of ``biograd.nn.functional``: the input gradient is carried by B, the weight and bias
gradients are autograd's, and with B = W the ops are exactly autograd's linear and convolution."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import biograd
from biograd.nn import ConvFeedback, LinearFeedback
from biograd.nn import functional as BF

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _grads(out: torch.Tensor, g: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, g))


# ------------------------------------------------------------------------------------ linear
@pytest.mark.parametrize("shape", [(5, 4), (3, 6, 4), (2, 3, 2, 4), (4,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_input_gradient_is_carried_by_b(shape: tuple[int, ...], bias: bool) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None
    fb = torch.randn(7, 4, dtype=torch.float64)
    out = BF.linear(x, w, b, fb)
    assert torch.equal(out, F.linear(x, w, b))
    g = torch.randn_like(out)
    got = _grads(out, g, x, w, *([b] if b is not None else []))

    # independent closed forms: dL/dx = g B, dL/dW = sum over samples of g x^T, dL/db = sum g
    g2, x2 = g.reshape(-1, 7), x.detach().reshape(-1, 4)
    torch.testing.assert_close(got[0], torch.einsum("...o,oi->...i", g, fb), rtol=1e-12, atol=0)
    ref = _grads(F.linear(x, w, b), g, w, *([b] if b is not None else []))
    torch.testing.assert_close(got[1], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], g2.t() @ x2, rtol=1e-12, atol=1e-12)
    if b is not None:
        torch.testing.assert_close(got[2], ref[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[2], g2.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 4), (3, 6, 4)])
def test_linear_with_b_equal_w_is_autograd_bit_for_bit(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    g = torch.randn(*shape[:-1], 7)
    got = _grads(BF.linear(x, w, b, w.detach()), g, x, w, b)
    ref = _grads(F.linear(x, w, b), g, x, w, b)
    for a, r in zip(got, ref):
        assert torch.equal(a, r)


def test_linear_trainable_feedback_gets_the_weight_gradient() -> None:
    x = torch.randn(5, 4)
    w = torch.randn(7, 4, requires_grad=True)
    fb = torch.randn(7, 4, requires_grad=True)
    _check_shared_gradient(lambda: LinearFeedback.apply(x, w, None, BF.GIVEN, fb), w, fb)


def _check_shared_gradient(run, w: torch.Tensor, fb: torch.Tensor) -> None:
    """W and B get equal gradients, accumulated into distinct tensors (an optimizer may update
    one in place without touching the other), with ``.grad`` reset to None or to zeros."""
    for set_to_none in (True, False):
        for _ in range(2):
            run().square().sum().backward()
        assert torch.equal(w.grad, fb.grad)
        assert w.grad.data_ptr() != fb.grad.data_ptr()
        if set_to_none:
            w.grad = fb.grad = None
        else:
            w.grad.zero_()
            fb.grad.zero_()


def test_linear_gradcheck_float64() -> None:
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    # B = W: the op is the true linear map, its whole Jacobian must match the numerical one.
    assert torch.autograd.gradcheck(
        lambda x, w, b: LinearFeedback.apply(x, w, b, BF.GIVEN, w.detach()), (x, w, b)
    )
    # B != W: the weight and bias gradients stay exact (the input gradient is checked above).
    fb = torch.randn(5, 4, dtype=torch.float64)
    x_const = x.detach()
    assert torch.autograd.gradcheck(
        lambda w, b: LinearFeedback.apply(x_const, w, b, BF.GIVEN, fb), (w, b)
    )


# ------------------------------------------------------------------------------------ conv
@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    dim = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding = draw(
        st.one_of(
            st.sampled_from(["same", "valid"]),
            st.tuples(*[st.integers(0, 2)] * dim),
        )
    )
    stride = (1,) * dim if padding == "same" else tuple(draw(st.integers(1, 3)) for _ in range(dim))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    size_max = 7 if dim < 3 else 5
    # reflect/circular padding needs the padding to be smaller than the input
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    spatial = tuple(draw(st.integers(max(s, 3), size_max + s)) for s in span)
    return {
        "dim": dim,
        "cin": cin,
        "cout": cout,
        "kernel": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
        "mode": mode,
        "batch": draw(st.integers(1, 3)),
        "spatial": spatial,
    }


def _conv_module(case: dict) -> nn.Module:
    return CONV[case["dim"]](
        case["cin"],
        case["cout"],
        case["kernel"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        bias=case["bias"],
        padding_mode=case["mode"],
    ).double()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), rule=st.sampled_from(["fa", "usf", "frsf", "brsf", "kp"]))
def test_conv_gradients_follow_b(case: dict, rule: str) -> None:
    """For every conv argument: the converted layer's output is the stock one's, its input
    gradient is the stock layer's with B in W's place, its weight and bias gradients are exact."""
    torch.manual_seed(0)
    plain = _conv_module(case)
    x = torch.randn(case["batch"], case["cin"], *case["spatial"], dtype=torch.float64)
    layer = biograd.convert(copy.deepcopy(plain), rule)
    x1 = x.clone().requires_grad_()
    out = layer(x1)
    x2 = x.clone().requires_grad_()
    ref = plain(x2)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    got = _grads(out, g, x1, *params)
    ref_params = [p for p in (plain.weight, plain.bias) if p is not None]
    ref_grads = _grads(ref, g, x2, *ref_params)
    for a, r in zip(got[1:], ref_grads[1:]):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)

    with_b = copy.deepcopy(plain)
    with torch.no_grad():
        with_b.weight.copy_(biograd.feedback_weight(layer))
    x3 = x.clone().requires_grad_()
    (expected,) = _grads(with_b(x3), g, x3)
    torch.testing.assert_close(got[0], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_with_b_equal_w_is_autograd_bit_for_bit(dim: int) -> None:
    x = torch.randn(2, 4, *(6,) * dim, requires_grad=True)
    w = torch.randn(6, 2, *(3,) * dim, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    args = ((2,) * dim, (1,) * dim, (1,) * dim, 2)
    out = BF.conv(x, w, b, w.detach(), *args)
    ref = FCONV[dim](x, w, b, *args)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    for a, r in zip(_grads(out, g, x, w, b), _grads(ref, g, x, w, b)):
        assert torch.equal(a, r)


@pytest.mark.parametrize("rule", ["bp", "fa", "usf", "brsf", "kp"])
def test_conv_gradients_do_not_depend_on_the_memory_format(rule: str) -> None:
    """A model and batch in channels_last (``channels_last: true`` in a config) compute the
    same output and gradients as in the default layout, up to rounding."""
    torch.manual_seed(0)
    plain = biograd.convert(nn.Conv2d(3, 8, 3, padding=1), rule, seed=1)
    last = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert last.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 9, 9)
    grads = []
    for layer, batch in ((plain, x), (last, x.contiguous(memory_format=torch.channels_last))):
        xi = batch.clone().requires_grad_()
        out = layer(xi)
        grads.append((out, *_grads(out, torch.ones_like(out), xi, layer.weight, layer.bias)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_gradcheck_float64(dim: int) -> None:
    x = torch.randn(2, 2, *(4,) * dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, *(2,) * dim, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    args = ((2,) * dim, (1,) * dim, (1,) * dim, 2)

    def same(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ConvFeedback.apply(x, w, b, BF.GIVEN, *args, w.detach())

    assert torch.autograd.gradcheck(same, (x, w, b))
    fb = torch.randn_like(w).detach()
    x_const = x.detach()

    def other(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ConvFeedback.apply(x_const, w, b, BF.GIVEN, *args, fb)

    assert torch.autograd.gradcheck(other, (w, b))
    # and the input gradient against the closed form: the transposed convolution with B
    out = ConvFeedback.apply(x, w, b, BF.GIVEN, *args, fb)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    expected = getattr(torch.nn.grad, f"conv{dim}d_input")(x.shape, fb, g, *args)
    torch.testing.assert_close(gx, expected, rtol=1e-12, atol=1e-12)


def test_conv_trainable_feedback_gets_the_weight_gradient() -> None:
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    fb = torch.randn(4, 3, 3, 3, requires_grad=True)
    _check_shared_gradient(
        lambda: ConvFeedback.apply(x, w, None, BF.GIVEN, (1, 1), (1, 1), (1, 1), 1, fb), w, fb
    )


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_unbatched_conv_input(dim: int) -> None:
    plain = CONV[dim](3, 4, 3, padding=1)
    layer = biograd.convert(copy.deepcopy(plain), "fa")
    x = torch.randn(3, *(5,) * dim, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, plain(x))
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_frozen_parts_get_no_gradient() -> None:
    layer = biograd.convert(nn.Linear(4, 3), "fa")
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 4, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None and x.grad is not None
    conv = biograd.convert(nn.Conv2d(2, 3, 3), "fa")
    conv.bias.requires_grad_(False)
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    assert conv.bias.grad is None and conv.weight.grad is not None


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 5), lambda: nn.Conv2d(3, 5, 3, padding=1)])
def test_autocast_matches_stock_layer(make) -> None:
    """Under autocast the converted layer computes in the autocast dtype like the stock layer,
    and its backward mixes the low-precision error with float32 state without failing."""
    torch.manual_seed(1)
    plain = make()
    layer = biograd.convert(copy.deepcopy(plain), "fa")
    x = torch.randn(2, 3, 4, 6) if isinstance(plain, nn.Linear) else torch.randn(2, 3, 6, 6)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    ref.float().sum().backward()
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
