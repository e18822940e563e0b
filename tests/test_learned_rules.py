"""The learned-feedback rules on real layers: weight mirror (``wm``), product feedback alignment
(``pfa``) and direct Kolen-Pollack (``dkp``). Their updates equal the papers' formulas computed
independently, their feedback aligns under training, their learned state round-trips through
``state_dict``, and they learn the digits set."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import biograd
from biograd.rules import get_rule
from biograd.rules.learned import conv_args

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

LAYERS = {
    "linear2d": (lambda: nn.Linear(5, 4), (7, 5)),
    "linear3d": (lambda: nn.Linear(5, 6), (3, 4, 5)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (3, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 0)), (2, 3, 6, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (2, 3, 2), padding=1, groups=2), (2, 2, 4, 5, 4)),
}


def one_layer(kind: str, rule: str, **options: float) -> tuple[nn.Module, tuple[int, ...]]:
    make, x_shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make().double()
    biograd.convert(layer, rule, seed=2, options=options or None)
    return layer, x_shape


def angle(a: Tensor, b: Tensor) -> float:
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def test_registered_with_capabilities() -> None:
    for name in ("wm", "pfa", "dkp"):
        assert name in biograd.RULES
    assert get_rule("wm").updates_after_step and not get_rule("wm").direct
    assert get_rule("pfa").learned_feedback and not get_rule("pfa").updates_after_step
    assert get_rule("dkp").direct and get_rule("dkp").learned_feedback


# --------------------------------------------------------------------------- weight mirror
@pytest.mark.parametrize("kind", LAYERS)
def test_mirror_step_is_eta_times_noise_correlation_minus_decay(kind: str) -> None:
    """Delta B = eta ((1/R) sum_r y_r x_r^T - lambda B), y = W x (Akrout et al. 2019, Sec. 3),
    with the correlation computed by autograd as the gradient of <y, B' x> / R at any B'."""
    layer, _ = one_layer(kind, "wm", lr=0.3, decay=0.5, samples=16)
    rule = layer.rule
    before = rule.feedback.clone()
    w = layer.weight.detach()
    c = conv_args(layer)
    x, drive = rule.mirror_noise(w, c, rule.step.clone())
    biograd.update_feedback(layer)
    assert int(rule.step) == 1
    probe = torch.zeros_like(w, requires_grad=True)
    if drive is None:
        y, out = x @ w.t(), x @ probe.t()
    else:
        dims = w.dim() - 2
        args = (drive.stride, drive.padding, drive.dilation, drive.groups)
        y, out = CONV[dims](x, w, None, *args), CONV[dims](x, probe, None, *args)
    assert y.numel() // y.shape[-1 if drive is None else 1] == 16  # one output per sample
    (corr,) = torch.autograd.grad((y * out).sum() / 16, probe)
    torch.testing.assert_close(rule.feedback, before + 0.3 * (corr - 0.5 * before))


def test_mirror_noise_is_seeded_zero_mean_and_new_at_every_step() -> None:
    a, _ = one_layer("linear2d", "wm", samples=4000, noise=0.5)
    b, _ = one_layer("linear2d", "wm", samples=4000, noise=0.5)
    w, rule = a.weight.detach(), a.rule
    x0, _ = rule.mirror_noise(w, None, torch.tensor(0))
    x0b, _ = b.rule.mirror_noise(w, None, torch.tensor(0))
    x1, _ = rule.mirror_noise(w, None, torch.tensor(1))
    assert torch.equal(x0, x0b)  # same seed and step: same noise (every DDP rank)
    assert not torch.equal(x0, x1)
    assert abs(float(x0.mean())) < 0.02 and abs(float(x0.std()) - 0.5) < 0.02


def test_mirror_every_k_steps() -> None:
    layer, _ = one_layer("linear2d", "wm", every=3)
    seen = []
    for _ in range(6):
        before = layer.rule.feedback.clone()
        biograd.update_feedback(layer)
        seen.append(not torch.equal(before, layer.rule.feedback))
    assert seen == [True, False, False, True, False, False]


def teacher(n: int = 512, d: int = 20, classes: int = 4) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    y = (
        torch.tanh(x @ torch.randn(d, 16, generator=g)) @ torch.randn(16, classes, generator=g)
    ).argmax(1)
    return x, y


def mlp(d: int = 20, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, classes)
    )


def train(
    model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int, batch: int = 64
) -> None:
    for step in range(steps):
        idx = (torch.arange(batch) + step * batch) % len(x)
        if biograd.needs_targets(model):
            biograd.set_targets(model, y[idx])
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        biograd.update_feedback(model)


@pytest.mark.parametrize("rule", ["wm", "kp", "pfa"])
def test_feedback_aligns_with_the_forward_weights_under_training(rule: str) -> None:
    """wm's and kp's B, and pfa's path B R, turn towards W: the angle of weight_alignment falls
    from its random start (about 90 degrees) to well below it."""
    x, y = teacher()
    model = biograd.convert(mlp(), rule, seed=0)
    hidden = ["2", "4"]
    start = biograd.weight_alignment(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
    train(model, opt, x, y, steps=150)
    end = biograd.weight_alignment(model)
    for name in hidden:  # fa on the same run: 73 and 38 degrees
        assert start[name]["angle"] > 60, (name, start)
        assert end[name]["angle"] < 25, (name, start, end)


# --------------------------------------------------------------------------- product feedback
@pytest.mark.parametrize("kind", LAYERS)
def test_pfa_layer_gradients_are_the_paper_formulas(kind: str) -> None:
    """grad_in = (g B) R and grad_R = (g B)^T x (Li & Benna 2024) through the converted layer,
    against autograd on the explicit two-stage expression B (R x); W's gradient stays exact."""
    layer, x_shape = one_layer(kind, "pfa", ratio=2)
    rule = layer.rule
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    b, r = rule.b.detach(), rule.r.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    c = conv_args(layer)
    if c is None:
        path, direct = (x2 @ r.t()) @ b.t(), x.detach() @ w.t()
    else:
        dims = w.dim() - 2
        pad = layer.padding
        args = (c.stride, pad, c.dilation, c.groups)
        mid = CONV[dims](x2, r, None, *args)
        path = CONV[dims](mid, b, None, (1,) * dims, (0,) * dims, (1,) * dims, c.groups)
        direct = CONV[dims](x.detach(), w, None, *args)
    gx, gr = torch.autograd.grad((path * g).sum(), (x2, r))
    (gw,) = torch.autograd.grad((direct * g).sum(), w)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(rule.r.grad, gr)
    torch.testing.assert_close(layer.weight.grad, gw)
    torch.testing.assert_close(
        biograd.feedback_weight(layer),
        biograd.rules.learned.pfa_path(b, rule.r.detach(), c.groups if c else 1),
    )


@pytest.mark.parametrize("b_init", ["random", "orthogonal", "identity"])
def test_pfa_b_options(b_init: str) -> None:
    ratio = 1 if b_init == "identity" else 3
    layer = biograd.convert(nn.Linear(6, 5), "pfa", options={"ratio": ratio, "b_init": b_init})
    b = layer.rule.b
    assert b.shape == (5, 5 * ratio) and not isinstance(b, nn.Parameter)
    assert isinstance(layer.rule.r, nn.Parameter) and layer.rule.r.shape == (5 * ratio, 6)
    if b_init != "random":
        torch.testing.assert_close(b @ b.t(), torch.eye(5))
    with pytest.raises(ValueError, match="ratio=1"):
        biograd.convert(nn.Linear(6, 5), "pfa", options={"ratio": 2, "b_init": "identity"})


@pytest.mark.parametrize("rule", ["wm", "pfa", "dkp"])
def test_bf16_autocast_trains(rule: str) -> None:
    """Under autocast the op's backward runs in bf16: every learned tensor still gets a float32
    gradient (or update) of the right shape."""
    x, y = teacher(n=16)
    model = biograd.convert(mlp(), rule, seed=0, example_input=x[:2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    biograd.update_feedback(model)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("rule.feedback") for k in moved) == (rule == "wm")


# --------------------------------------------------------------------------- state
@pytest.mark.parametrize("rule", ["wm", "pfa", "dkp"])
def test_learned_state_round_trips_through_state_dict(rule: str) -> None:
    x, y = teacher()
    model = biograd.convert(mlp(), rule, seed=0, example_input=x[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=0.01)
    train(model, opt, x, y, steps=5)
    saved = copy.deepcopy(model.state_dict())
    fresh = biograd.convert(mlp(), rule, seed=0, example_input=x[:2])
    assert any(
        not torch.equal(v, fresh.state_dict()[k]) for k, v in saved.items() if "weight" not in k
    )
    fresh.load_state_dict(saved)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # the next step is the same for the original and the restored model
    for m in (model, fresh):
        o = torch.optim.SGD(m.parameters(), lr=0.05, weight_decay=0.01)
        train(m, o, x, y, steps=1)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], msg=k)


# --------------------------------------------------------------------------- learning
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from biograd.data import load_dataset

    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    mean, std = tr.mean[0], tr.std[0]
    return ((tr.x - mean) / std).flatten(1), tr.y, ((te.x - mean) / std).flatten(1), te.y


@pytest.mark.parametrize("rule", ["wm", "pfa", "dkp"])
def test_new_rules_learn_digits(rule: str) -> None:
    """Chance is 0.1; 300 Adam steps of batch 32 (under a second each rule)."""
    x, y, xt, yt = digits()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    biograd.convert(model, rule, example_input=x[:2])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    train(model, opt, x, y, steps=300, batch=32)
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    assert acc > 0.85, acc


# --------------------------------------------------------------------------- direct Kolen-Pollack
class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Linear(6, 10), nn.Tanh())
        self.b2 = nn.Sequential(nn.Linear(10, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.b2(self.b1(x)))


@pytest.mark.parametrize("points", [None, ["b1", "b2"]])
@pytest.mark.parametrize("shape", [(5, 6), (2, 4, 6)])
def test_dkp_matrices_get_activity_times_error_and_move_with_the_optimizer(
    points: list[str] | None, shape: tuple[int, ...]
) -> None:
    """grad_{B_k} = a_k^T e (Webster et al. 2020), a_k the activity at point k, for layer-input
    and explicit (block) points, one or two batch dimensions; an SGD step with weight decay then
    moves B_k by -lr (a_k^T e + wd B_k)."""
    torch.manual_seed(0)
    model = Blocks().double()
    x = torch.randn(shape, dtype=torch.float64)
    batch_dims = len(shape) - 1
    biograd.convert(
        model, "dkp", feedback_points=points, batch_dims=batch_dims, example_input=x[:1]
    )
    acts: dict[str, Tensor] = {}
    keys = (
        {"b2.0": model.b1, "fc": model.b2} if points is None else {"b1": model.b1, "b2": model.b2}
    )
    for key, mod in keys.items():
        mod.register_forward_hook(lambda m, a, o, key=key: acts.__setitem__(key, o.detach()))
    engine = model.fc.direct_feedback
    before = {k: engine.matrix(k).detach().clone() for k in keys}
    out = model(x)
    out.retain_grad()
    y = torch.randint(0, 3, shape[:-1])
    F.cross_entropy(out.reshape(-1, 3), y.reshape(-1)).backward()
    e = out.grad.reshape(-1, 3)
    opt = torch.optim.SGD([engine.matrix(k) for k in keys], lr=0.5, weight_decay=0.1)
    for k in keys:
        a = acts[k].reshape(e.shape[0], -1)
        expected = torch.einsum("ri,rc->ic", a, e)
        torch.testing.assert_close(engine.matrix(k).grad, expected)
    opt.step()
    for k in keys:
        a = acts[k].reshape(e.shape[0], -1)
        step = torch.einsum("ri,rc->ic", a, e) + 0.1 * before[k]
        torch.testing.assert_close(engine.matrix(k).detach(), before[k] - 0.5 * step)


def test_dkp_needs_the_dense_layout_and_warns_without_an_example_input() -> None:
    with pytest.raises(ValueError, match="layout='dense'"):
        biograd.convert(mlp(), "dkp", layout="hashed", example_input=torch.zeros(2, 20))
    with pytest.warns(UserWarning, match="build the optimizer after it"):
        model = biograd.convert(mlp(), "dkp")
    assert not [n for n, _ in model.named_parameters() if "direct_feedback" in n]
    model(torch.zeros(2, 20, requires_grad=False))  # the model's input needs no grad
    F.cross_entropy(model(torch.randn(3, 20)), torch.tensor([0, 1, 2])).backward()
    made = [n for n, _ in model.named_parameters() if "direct_feedback" in n]
    assert made == ["4.direct_feedback.point_2", "4.direct_feedback.point_4"]


def test_dkp_matrices_align_with_the_backprop_path_under_training() -> None:
    """In an MLP the backprop path to the last hidden point is W_out^T; with weight decay the
    learned B of that point turns towards it (weight_alignment's direct-rule angle)."""
    x, y = teacher()
    model = biograd.convert(mlp(), "dkp", seed=0, example_input=x[:2])
    start = biograd.weight_alignment(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
    train(model, opt, x, y, steps=150)
    end = biograd.weight_alignment(model)
    assert start["2"]["angle"] > 60 and end["2"]["angle"] < 10, (start, end)  # dfa: 33 degrees
