"""The rules of the feedback-alignment family: what B is for each rule, that with B = W every rule
is backprop to the last bit, brsf's per-batch draws, Kolen-Pollack's B -> W, and B's state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import biograd
from biograd.rules import SCALES, feedback_std, get_rule, rule_names

FAMILY = ("bp", "fa", "usf", "frsf", "brsf", "kp")
RANDOM_B = ("fa", "usf", "frsf", "brsf", "kp")


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, groups=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


def _data(model_name: str) -> torch.Tensor:
    return torch.randn(4, 5, 6) if model_name == "mlp" else torch.randn(3, 2, 8, 8)


def set_b_to_w(model: nn.Module) -> None:
    """Make every converted layer's feedback equal to its weight (the rule's B stays the rule's:
    for sign-concordant rules the weight is moved onto B instead)."""
    with torch.no_grad():
        for _, layer in biograd.converted_layers(model):
            rule = layer.feedback_rule
            if rule in ("fa", "kp"):
                layer.rule.feedback.copy_(layer.weight)
            elif rule in ("usf", "frsf", "brsf"):
                # brsf: this is the B of the next training forward pass (draws depend only on
                # the layer's seed and step; the sign of W is unchanged by the copy)
                layer.weight.copy_(layer.rule.matrix(layer.weight, *layer.rule.pass_state(False)))


def test_registry_names_and_unknown_rule() -> None:
    for name in (*FAMILY, "dfa", "sdfa", "drtp", "shallow"):
        assert name in biograd.RULES
        assert get_rule(name).name == name
    assert rule_names() == biograd.RULES
    with pytest.raises(ValueError, match="available rules: bp, fa, usf"):
        get_rule("backprop")


@pytest.mark.parametrize("rule", FAMILY)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_b_equal_w_reproduces_backprop_exactly(rule: str, model_name: str) -> None:
    torch.manual_seed(3)
    model = mlp() if model_name == "mlp" else cnn()
    biograd.convert(model, rule, seed=5)
    set_b_to_w(model)
    plain = copy.deepcopy(model)
    biograd.convert(plain, "bp")
    x = _data(model_name)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = model(x1), plain(x2)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    ref_params = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("feedback"):
            continue
        assert torch.equal(p.grad, ref_params[name].grad), name


@pytest.mark.parametrize("rule", RANDOM_B)
def test_random_b_changes_the_input_gradient_but_not_the_weight_gradient(rule: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    plain = copy.deepcopy(layer)
    biograd.convert(layer, rule)
    x1 = torch.randn(5, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    layer(x1).sum().backward()
    plain(x2).sum().backward()
    assert not torch.allclose(x1.grad, x2.grad)
    assert torch.equal(layer.weight.grad, plain.weight.grad)
    assert torch.equal(layer.bias.grad, plain.bias.grad)


# ------------------------------------------------------------------------------ scales and B
def test_scale_schemes() -> None:
    w = torch.empty(32, 16, 3, 3)
    fan_in, fan_out = 16 * 9, 32 * 9
    assert feedback_std(w, "xavier") == pytest.approx(math.sqrt(2 / (fan_in + fan_out)))
    assert feedback_std(w, "kaiming") == pytest.approx(math.sqrt(2 / fan_in))
    assert feedback_std(w, "xiao") == pytest.approx(math.sqrt(2 / fan_out))
    nn.init.normal_(w, std=0.3)
    assert feedback_std(w, "weight") == pytest.approx(0.3, rel=0.05)
    assert set(SCALES) == {"xavier", "kaiming", "xiao", "weight"}
    with pytest.raises(ValueError, match="xavier, kaiming"):
        feedback_std(w, "lecun")
    with pytest.raises(ValueError, match="unknown feedback scale"):
        biograd.convert(nn.Linear(3, 3), "fa", scale="lecun")


@pytest.mark.parametrize("scale", ["xavier", "kaiming", "xiao"])
def test_fa_b_is_fixed_and_has_the_scheme_std(scale: str) -> None:
    layer = biograd.convert(nn.Conv2d(16, 32, 3), "fa", scale=scale)
    b = biograd.feedback_weight(layer)
    assert b.shape == layer.weight.shape
    std = feedback_std(layer.weight, scale)
    assert float(b.std()) == pytest.approx(std, rel=0.05)
    assert float(b.abs().max()) <= math.sqrt(3) * std
    layer(torch.randn(1, 16, 5, 5)).sum().backward()
    assert torch.equal(biograd.feedback_weight(layer), b)


def test_fa_b_depends_on_seed_and_layer() -> None:
    def draw(seed: int) -> list[torch.Tensor]:
        m = biograd.convert(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), "fa", seed=seed)
        return [biograd.feedback_weight(m[0]), biograd.feedback_weight(m[1])]

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("scale", SCALES)
def test_usf_b_is_scale_times_sign_of_w(scale: str) -> None:
    layer = nn.Linear(20, 10)
    std = feedback_std(layer.weight, scale)
    biograd.convert(layer, "usf", scale=scale)
    layer(torch.randn(3, 20)).sum().backward()
    expected = std * torch.sign(layer.weight.detach())
    torch.testing.assert_close(biograd.feedback_weight(layer), expected, rtol=1e-6, atol=0)
    with torch.no_grad():  # B follows W's sign as W changes
        layer.weight.neg_()
    layer(torch.randn(3, 20))
    torch.testing.assert_close(biograd.feedback_weight(layer), -expected, rtol=1e-6, atol=0)


def test_frsf_magnitudes_are_fixed_and_signs_follow_w() -> None:
    layer = biograd.convert(nn.Linear(20, 10), "frsf")
    layer(torch.randn(3, 20))
    b1 = biograd.feedback_weight(layer)
    assert torch.equal(torch.sign(b1), torch.sign(layer.weight.detach()))
    with torch.no_grad():
        layer.weight[0].neg_()
    layer(torch.randn(3, 20))
    b2 = biograd.feedback_weight(layer)
    assert torch.equal(b2.abs(), b1.abs())
    assert torch.equal(torch.sign(b2), torch.sign(layer.weight.detach()))


def test_brsf_magnitudes_change_every_batch_signs_follow_w() -> None:
    layer = biograd.convert(nn.Conv2d(4, 8, 3), "brsf")
    std = feedback_std(layer.weight, "xavier")
    seen = []
    for _ in range(4):
        layer(torch.randn(2, 4, 6, 6)).sum().backward()
        b = biograd.feedback_weight(layer)
        assert torch.equal(torch.sign(b), torch.sign(layer.weight.detach()))
        assert float(b.abs().max()) <= math.sqrt(3) * std
        seen.append(b.abs())
    for i in range(len(seen)):
        for j in range(i):
            assert not torch.equal(seen[i], seen[j])
    assert int(layer.rule.step) == 4
    # evaluation and no-grad passes use the current draw without advancing the schedule
    layer.eval()
    layer(torch.randn(2, 4, 6, 6))
    with torch.no_grad():
        layer.train()(torch.randn(2, 4, 6, 6))
    assert int(layer.rule.step) == 4


# ------------------------------------------------------------------------------ kolen-pollack
def test_kp_b_is_a_parameter_with_the_weight_gradient() -> None:
    model = biograd.convert(mlp(), "kp")
    names = [n for n, _ in model.named_parameters()]
    assert "0.rule.feedback" in names and "2.rule.feedback" in names
    assert isinstance(model[0].rule.feedback, nn.Parameter)
    model(torch.randn(4, 6)).sum().backward()
    for _, layer in biograd.converted_layers(model):
        assert torch.equal(layer.rule.feedback.grad, layer.weight.grad)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_kp_one_step_shrinks_w_minus_b_by_the_decay_factor(opt: str) -> None:
    torch.manual_seed(0)
    model = biograd.convert(mlp(), "kp")
    lr, wd = 0.05, 0.1
    if opt == "sgd":
        optim: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    else:
        optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    layer = model[2]
    before = (layer.weight - layer.rule.feedback).detach().clone()
    model(torch.randn(8, 6)).pow(2).sum().backward()
    optim.step()
    after = (layer.weight - layer.rule.feedback).detach()
    torch.testing.assert_close(after, (1 - lr * wd) * before, rtol=1e-4, atol=1e-6)


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0)
    return math.degrees(math.acos(float(cos.clamp(-1, 1))))


def test_kp_angle_between_b_and_w_falls_under_training_with_weight_decay() -> None:
    torch.manual_seed(0)
    model = biograd.convert(mlp(), "kp", seed=1)
    optim = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=3e-2)
    x = torch.randn(256, 6)
    y = (x[:, :3] * x[:, 3:]).argmax(1)
    layers = [layer for _, layer in biograd.converted_layers(model)]
    start = [_angle(m.weight, m.rule.feedback) for m in layers]
    for _ in range(300):
        optim.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optim.step()
    end = [_angle(m.weight, m.rule.feedback) for m in layers]
    for s, e in zip(start, end):
        assert s > 60
        assert e < 5, (start, end)


# ------------------------------------------------------------------------------ state
@pytest.mark.parametrize("rule", FAMILY)
def test_state_dict_round_trip_restores_b(rule: str) -> None:
    torch.manual_seed(0)
    a = biograd.convert(cnn(), rule, seed=0)
    for _ in range(3):
        a(torch.randn(3, 2, 8, 8)).sum().backward()
    state = a.state_dict()
    for name, layer in biograd.converted_layers(a):
        assert not any(k.endswith("_extra_state") for k in state)
        if rule == "brsf":
            assert int(state[f"{name}.rule.step"]) == int(layer.rule.step) == 3
        if rule in ("fa", "kp"):
            assert f"{name}.rule.feedback" in state
        if rule == "frsf":
            assert f"{name}.rule.magnitude" in state

    b = biograd.convert(cnn(), rule, seed=1)
    b.load_state_dict(state)
    x = torch.randn(3, 2, 8, 8)
    a.zero_grad()
    a(x).sum().backward()
    b(x).sum().backward()  # brsf: the resumed model draws the same next B
    for (name, la), (_, lb) in zip(biograd.converted_layers(a), biograd.converted_layers(b)):
        assert torch.equal(biograd.feedback_weight(la), biograd.feedback_weight(lb)), name
        assert torch.equal(la.rule.step, lb.rule.step) if rule == "brsf" else True
        assert torch.equal(la.weight.grad, lb.weight.grad)


def test_brsf_resumed_training_is_bit_identical() -> None:
    torch.manual_seed(0)
    model = biograd.convert(mlp(), "brsf")
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(6)]

    def step(m: nn.Module, o: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for x, y in data[:3]:
        step(model, optim, x, y)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optim": optim.state_dict()})
    for x, y in data[3:]:
        step(model, optim, x, y)

    resumed = biograd.convert(mlp(), "brsf")
    resumed.load_state_dict(checkpoint["model"])
    optim2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    optim2.load_state_dict(checkpoint["optim"])
    for x, y in data[3:]:
        step(resumed, optim2, x, y)
    for (n, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_loading_a_checkpoint_of_another_rule_fails_clearly() -> None:
    state = biograd.convert(mlp(), "fa").state_dict()
    with pytest.raises(RuntimeError, match="another rule"):
        biograd.convert(mlp(), "usf").load_state_dict(state, strict=False)


@pytest.mark.parametrize("rule", FAMILY)
def test_to_float64_moves_b(rule: str) -> None:
    model = biograd.convert(cnn(), rule)
    before = {n: biograd.feedback_weight(m).clone() for n, m in biograd.converted_layers(model)}
    model.to(torch.float64)
    for _, layer in biograd.converted_layers(model):
        for t in (*layer.buffers(recurse=False), *layer.parameters(recurse=False)):
            assert t.dtype == torch.float64
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad.dtype == torch.float64
    for name, layer in biograd.converted_layers(model):
        b = biograd.feedback_weight(layer)
        assert b.dtype == torch.float64
        if rule in ("fa", "kp"):  # moved, not drawn again
            assert torch.equal(b, before[name].double())
        if rule == "usf":
            torch.testing.assert_close(b, before[name].double())
