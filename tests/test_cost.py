"""What the feedback-alignment family keeps and forms (issue 16): nothing weight-sized from the
forward pass to the backward pass beyond W and the rule's own state, B formed only in the backward
and only when the input gradient is needed, kp's gradient as a distinct copy of W's, and direct
rules' projections ``B_k s(e)`` made one at a time as the backward reaches each point."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import biograd
from benchmark_scripts import load

FAMILY = ("fa", "usf", "frsf", "brsf", "kp")


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )


@contextmanager
def _saved() -> Iterator[list[Tensor]]:
    packed: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield packed


@pytest.mark.parametrize("rule", FAMILY)
def test_forward_saves_no_weight_sized_tensor_but_w_and_the_rules_state(rule: str) -> None:
    model = biograd.convert(_model(), rule, seed=0)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    weights = {tuple(m.weight.shape) for _, m in biograd.converted_layers(model)}
    x = torch.randn(4, 2, 5, 5)
    with _saved() as packed:
        out = model(x)
    for t in packed:
        if tuple(t.shape) in weights:
            assert t.untyped_storage().data_ptr() in own, (rule, tuple(t.shape))
    out.sum().backward()  # the saved tensors suffice


@pytest.mark.parametrize("rule", FAMILY)
def test_b_is_formed_in_the_backward_and_only_for_an_input_gradient(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = biograd.convert(_model(), rule, seed=0)
    calls: list[str] = []
    for name, layer in biograd.converted_layers(model):
        original = layer.rule.matrix

        def spy(weight: Tensor, *state: Tensor, _name: str = name, _f=original) -> Tensor | None:
            calls.append(_name)
            return _f(weight, *state)

        monkeypatch.setattr(layer.rule, "matrix", spy)
    out = model(torch.randn(4, 2, 5, 5))
    assert calls == []  # nothing in the forward pass
    out.sum().backward()
    # the first layer's input needs no gradient: no B; the others once each
    assert sorted(calls) == ["3", "5"]
    calls.clear()
    x = torch.randn(4, 2, 5, 5, requires_grad=True)
    model(x).sum().backward()
    assert sorted(calls) == ["0", "3", "5"]


def test_kp_feedback_gradient_is_a_distinct_copy() -> None:
    """W.grad and B.grad are equal but distinct: in-place gradient code (accumulation, clipping,
    GradScaler) must not act twice on one tensor."""
    torch.manual_seed(0)
    model = biograd.convert(_model(), "kp", seed=0)
    x = torch.randn(4, 2, 5, 5)
    for _ in range(2):  # the second backward accumulates
        model(x).sum().backward()
    for _, layer in biograd.converted_layers(model):
        w, b = layer.weight.grad, layer.rule.feedback.grad
        assert torch.equal(w, b)
        assert w.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    torch.manual_seed(0)
    one = biograd.convert(_model(), "kp", seed=0)
    one(x).sum().backward()
    for (_, a), (_, c) in zip(biograd.converted_layers(model), biograd.converted_layers(one)):
        torch.testing.assert_close(a.rule.feedback.grad, 2 * c.rule.feedback.grad)


@pytest.mark.parametrize("rule", FAMILY)
def test_a_training_step_binds_no_signatures(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's ``Function.apply`` runs ``inspect.signature`` on every call of a Function with a
    ``setup_context``; the ops skip it (most of their Python overhead on small layers)."""
    import inspect

    model = biograd.convert(_model(), rule, seed=0)
    x = torch.randn(4, 2, 5, 5)
    model(x).sum().backward()
    calls: list[object] = []
    real = inspect.signature
    monkeypatch.setattr(
        inspect, "signature", lambda f, *a, **k: calls.append(f) or real(f, *a, **k)
    )
    model(x).sum().backward()
    assert calls == []


@pytest.mark.parametrize(
    ("rule", "layout"), [("dfa", "dense"), ("dfa", "shared"), ("dfa", "hashed"), ("dkp", "dense")]
)
def test_direct_projections_are_not_all_alive_at_once(rule: str, layout: str) -> None:
    """Each point's ``B_k s(e)`` is made when the backward reaches the point, not all of them
    when it starts: the backward's peak, beyond the gradients it leaves, stays well under the
    bytes of all the projections together (11 points of 256 x 64 floats here)."""
    torch.manual_seed(0)
    n, width, depth = 256, 64, 10
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Tanh()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dkp: Parameters made at the first forward
        biograd.convert(model, rule, layout=layout, hashed_rows=width)
    x, y = torch.randn(n, 16), torch.randint(0, 10, (n,))
    F.cross_entropy(model(x), y).backward()  # draws the feedback
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    peak = load("common").cpu_peak_increment(loss.backward)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    projections = (depth + 1) * n * width * 4
    assert peak - grads < projections / 2, (peak, grads, projections)


@pytest.mark.parametrize("layout", ["dense", "shared", "hashed"])
def test_two_forward_passes_in_one_backward_each_get_their_signal(layout: str) -> None:
    """The taps of each forward pass read the signal of their own output's backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    biograd.convert(model, "dfa", layout=layout)
    x1, x2, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 3, (5,))
    F.cross_entropy(model(x1), y).backward()
    F.cross_entropy(model(x2), y).backward()
    apart = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(x1), y) + F.cross_entropy(model(x2), y)).backward()
    together = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(together) == len(apart) == 6
    for a, b in zip(apart, together):
        torch.testing.assert_close(b, a)
