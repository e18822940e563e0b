"""Direct feedback (dfa, sdfa, drtp, shallow): every gradient is checked against the rule's
formula computed independently of the engine (docs/direct.md)."""

from __future__ import annotations

import copy
import io
import math
import zlib

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import biograd
from biograd.direct import (
    ERRORS,
    DirectFeedback,
    FeedbackError,
    feedback_memory,
    feedback_sizes,
    norm_factor,
)


def engine_of(model: nn.Module) -> DirectFeedback:
    engines = [m for m in model.modules() if isinstance(m, DirectFeedback)]
    assert len(engines) == 1
    return engines[0]


def primed(model: nn.Module, x: Tensor | None = None) -> nn.Module:
    """``model`` after one forward pass, which draws its direct feedback."""
    model(torch.randn(2, 6) if x is None else x)
    return model


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 4)
    )  # fmt: skip


LOSSES = {
    "ce": lambda out, y: F.cross_entropy(out, y),
    "mse": lambda out, y: F.mse_loss(out, F.one_hot(y, out.shape[-1]).to(out.dtype)),
}


def output_error(plain: nn.Module, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """e = dLoss/d(output), from an unconverted copy of the model."""
    out = plain(x)
    return torch.autograd.grad(LOSSES[loss](out, y), out)[0]


# --------------------------------------------------------------------------- the MLP, by hand
@pytest.mark.parametrize("error", ["loss", "per_sample"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("rule", ["dfa", "sdfa", "drtp"])
def test_mlp_gradients_follow_the_formula(rule: str, batch: int, loss: str, error: str) -> None:
    model = mlp()
    plain = copy.deepcopy(model)
    biograd.convert(model, rule, seed=3, error=error)
    x, y = torch.randn(batch, 6), torch.randint(0, 4, (batch,))
    if rule == "drtp":
        biograd.set_targets(model, y)
    LOSSES[loss](model(x), y).backward()

    e = output_error(plain, x, y, loss)
    signal = {
        "dfa": e,
        "sdfa": torch.sign(e) / batch,
        "drtp": -F.one_hot(y, 4).float() / batch,
    }[rule]
    if error == "per_sample":  # each sample's error at full size (Launay et al. 2019's code)
        signal = signal * batch
    w0, b0, w2, b2 = plain[0].weight, plain[0].bias, plain[2].weight, plain[2].bias
    with torch.no_grad():
        a0 = x @ w0.T + b0
        h0 = torch.tanh(a0)
        a2 = h0 @ w2.T + b2
        h2 = torch.tanh(a2)
    eng = engine_of(model)
    # Point "2" is the input of layer 2 (= h0): it trains layer 0; point "4" trains layer 2.
    delta0 = (signal @ eng.matrix("2").T) * (1 - torch.tanh(a0) ** 2)
    delta2 = (signal @ eng.matrix("4").T) * (1 - torch.tanh(a2) ** 2)
    torch.testing.assert_close(model[0].weight.grad, delta0.T @ x)
    torch.testing.assert_close(model[0].bias.grad, delta0.sum(0))
    torch.testing.assert_close(model[2].weight.grad, delta2.T @ h0)
    torch.testing.assert_close(model[2].bias.grad, delta2.sum(0))
    # The output layer gets the true error.
    torch.testing.assert_close(model[4].weight.grad, e.T @ h2)
    torch.testing.assert_close(model[4].bias.grad, e.sum(0))
    assert eng.points == []  # the forward pass handed its points to the backward node


def test_shallow_trains_only_the_output_layer() -> None:
    model = mlp()
    plain = copy.deepcopy(model)
    biograd.convert(model, "shallow")
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for i in (0, 2):
        assert model[i].weight.grad is None and model[i].bias.grad is None
    torch.testing.assert_close(model[4].weight.grad, plain[4].weight.grad)
    torch.testing.assert_close(model[4].bias.grad, plain[4].bias.grad)


def test_dfa_with_the_output_weights_as_feedback_is_backprop() -> None:
    """One hidden layer: B = W2^T makes B e = W2^T e, the back-propagated error."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    plain = copy.deepcopy(model)
    primed(biograd.convert(model, "dfa"), torch.randn(2, 5))
    eng = engine_of(model)
    eng.set_matrix("2", model[2].weight.detach().T)
    torch.testing.assert_close(biograd.feedback_weight(model[0]), model[2].weight.detach().T)
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(FeedbackError, match="shape"):
        eng.set_matrix("2", torch.zeros(3, 7))


@pytest.mark.parametrize("rule", ["dfa", "bp"])
def test_projection_ignores_the_downstream_forward_weights(rule: str) -> None:
    """With a loss whose error is fixed (e = G), perturbing the layers above layer 0 leaves its
    dfa gradient unchanged; backprop's changes (so the check can fail)."""
    model = mlp()
    biograd.convert(model, rule)
    x, g = torch.randn(4, 6), torch.randn(4, 4)

    def grad0() -> Tensor:
        model.zero_grad()
        (model(x) * g).sum().backward()
        return model[0].weight.grad.clone()

    before = grad0()
    with torch.no_grad():
        model[2].weight.add_(torch.randn_like(model[2].weight))
        model[4].weight.mul_(-3.0)
    after = grad0()
    if rule == "dfa":
        torch.testing.assert_close(after, before)
    else:
        assert not torch.allclose(after, before)


# --------------------------------------------------------------------------- a CNN with BN + pooling
def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(5, 3),
    )  # fmt: skip


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cnn_gradients_follow_the_formula(batch: int, loss: str) -> None:
    """delta at each conv's output = (B e) pulled back through its own BN, activation and
    pooling (their exact local derivatives, f'(a) in the formula); dW = conv weight gradient."""
    model = cnn()
    x, y = torch.randn(batch, 2, 8, 8), torch.randint(0, 3, (batch,))
    biograd.convert(model, "dfa", seed=1, example_input=x[:1])
    plain = copy.deepcopy(model)
    biograd.convert(plain, "bp")
    eng = engine_of(model)
    assert set(eng.sizes) == {"4", "9"} and eng.sizes == {"4": 4 * 4 * 4, "9": 5}
    LOSSES[loss](model(x), y).backward()

    e = output_error(plain, x, y, loss)
    a0 = plain[0](x)
    h0 = plain[3](plain[2](plain[1](a0)))
    a4 = plain[4](h0.detach())
    h4 = plain[8](plain[7](plain[6](plain[5](a4))))
    d0 = torch.autograd.grad(h0, a0, (e @ eng.matrix("4").T).reshape(h0.shape))[0]
    g4 = (e @ eng.matrix("9").T).reshape(h4.shape)
    d4, bn_w = torch.autograd.grad(h4, [a4, plain[5].weight], g4)
    w0 = torch.nn.grad.conv2d_weight(x, plain[0].weight.shape, d0, padding=1)
    w4 = torch.nn.grad.conv2d_weight(h0.detach(), plain[4].weight.shape, d4)
    torch.testing.assert_close(model[0].weight.grad, w0)
    torch.testing.assert_close(model[0].bias.grad, d0.sum((0, 2, 3)))
    torch.testing.assert_close(model[4].weight.grad, w4)
    torch.testing.assert_close(model[9].weight.grad, e.T @ h4.detach())
    # Batch norm keeps its exact local gradient under the injected delta.
    torch.testing.assert_close(model[5].weight.grad, bn_w)


# --------------------------------------------------------------------------- explicit points
class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block1 = Block(4)
        self.block2 = Block(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block2(self.block1(F.relu(self.stem(x))))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("layout", ["dense", "hashed"])
def test_explicit_points_in_a_residual_network(layout: str) -> None:
    """Block-wise DFA: each block's output gets B_k e; inside a block (and in the stem below
    block 1) gradients are exact backprop of that signal; the head gets the true error."""
    model = ResNet()
    x, y = torch.randn(3, 1, 6, 6), torch.randint(0, 3, (3,))
    biograd.convert(
        model, "dfa", feedback_points=["block*"], example_input=x[:1], layout=layout
    )  # fmt: skip
    assert biograd.conversion_report(model).feedback_points == ["block1", "block2"]
    assert biograd.feedback_weight(model.fc) is None  # the head's input is no feedback point
    plain = copy.deepcopy(model)
    biograd.convert(plain, "bp")
    F.cross_entropy(model(x), y).backward()

    e = output_error(plain, x, y, "ce")
    eng = engine_of(model)
    h1 = plain.block1(F.relu(plain.stem(x)))
    h2 = plain.block2(h1.detach())
    p1 = list(plain.stem.parameters()) + list(plain.block1.parameters())
    g1 = torch.autograd.grad(h1, p1, (e @ eng.matrix("block1").T).reshape(h1.shape))
    g2 = torch.autograd.grad(
        h2, list(plain.block2.parameters()), (e @ eng.matrix("block2").T).reshape(h2.shape)
    )
    got1 = list(model.stem.parameters()) + list(model.block1.parameters())
    for p, g in zip(got1, g1):
        torch.testing.assert_close(p.grad, g)
    for p, g in zip(model.block2.parameters(), g2):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(model.fc.weight.grad, e.T @ h2.detach().mean((2, 3)))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
                for _ in range(2)
            ]
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.blocks(self.embed(tokens)))


@pytest.mark.parametrize("batch_dims", [2, None])
@pytest.mark.parametrize("layout", ["dense", "shared", "hashed"])
def test_explicit_points_in_a_transformer(layout: str, batch_dims: int | None) -> None:
    """Per-token outputs (batch, time, vocab) with batch_dims=2, or by default (a block's output
    is read like the linear layer that ran last in it): B_k maps each token's error (vocab) to
    that token's features (dim) at each block's output."""
    model = TinyLM()
    tokens = torch.randint(0, 11, (3, 5))
    target = torch.randint(0, 11, (3, 5))
    biograd.convert(
        model, "dfa", feedback_points=["blocks.0", "blocks.1"], batch_dims=batch_dims,
        example_input=tokens[:1], layout=layout,
    )  # fmt: skip
    eng = engine_of(model)
    assert eng.classes == 11 and eng.sizes == {"blocks.0": 8, "blocks.1": 8}
    plain = copy.deepcopy(model)
    biograd.convert(plain, "bp")
    out = model(tokens)
    F.cross_entropy(out.reshape(-1, 11), target.reshape(-1)).backward()

    pout = plain(tokens)
    e = torch.autograd.grad(F.cross_entropy(pout.reshape(-1, 11), target.reshape(-1)), pout)[0]
    e2 = e.reshape(-1, 11)
    h0 = plain.blocks[0](plain.embed(tokens))
    h1 = plain.blocks[1](h0.detach())
    p0 = list(plain.embed.parameters()) + list(plain.blocks[0].parameters())
    g0 = torch.autograd.grad(h0, p0, (e2 @ eng.matrix("blocks.0").T).reshape(h0.shape))
    g1 = torch.autograd.grad(
        h1, list(plain.blocks[1].parameters()), (e2 @ eng.matrix("blocks.1").T).reshape(h1.shape)
    )
    got0 = list(model.embed.parameters()) + list(model.blocks[0].parameters())
    for p, g in zip(got0, g0):
        torch.testing.assert_close(p.grad, g)
    for p, g in zip(model.blocks[1].parameters(), g1):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(model.head.weight.grad, e2.T @ h1.detach().reshape(-1, 8))


# --------------------------------------------------------------------------- layouts and norms
def hashed_matrix(basis: Tensor, seed: int, key: str, d: int, scale: float) -> Tensor:
    """B_k of the hashed layout, from its documented definition, in plain Python integers."""
    m = 0xFFFFFFFF

    def mix(v: int) -> int:
        v &= m
        v ^= v >> 16
        v = (v * 0x85EBCA6B) & m
        v ^= v >> 13
        v = (v * 0xC2B2AE35) & m
        return v ^ (v >> 16)

    salt = zlib.crc32(key.encode()) ^ ((seed * 0x9E3779B1) & m)
    rows = []
    for i in range(d):
        h = mix(mix(i) ^ salt)
        rows.append(basis[h % basis.shape[0]] * (-1.0 if h >> 31 else 1.0))
    return torch.stack(rows) * scale


@pytest.mark.parametrize("layout", ["dense", "shared", "hashed"])
@pytest.mark.parametrize("norm", ["launay", "fan_in", "fan_out", "none"])
def test_layouts_give_their_documented_feedback(layout: str, norm: str) -> None:
    model = mlp()
    plain = copy.deepcopy(model)
    primed(biograd.convert(model, "dfa", seed=5, layout=layout, norm=norm, hashed_rows=7))
    eng = engine_of(model)
    expected: dict[str, Tensor] = {}
    for key, d in (("2", 9), ("4", 8)):
        scale = norm_factor(norm, d, 4)
        if layout == "dense":
            expected[key] = getattr(eng, "point_" + key)
        elif layout == "shared":
            assert eng.shared.shape == (9, 4)
            expected[key] = eng.shared[:d] * scale
        else:
            assert eng.basis.shape == (7, 4)
            expected[key] = hashed_matrix(eng.basis, 5, key, d, scale)
        torch.testing.assert_close(eng.matrix(key), expected[key])
        # the matrix at layer k's input trains the layer below it
        torch.testing.assert_close(biograd.feedback_weight(model[int(key) - 2]), expected[key])
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    F.cross_entropy(model(x), y).backward()
    e = output_error(plain, x, y, "ce")
    with torch.no_grad():
        a0 = plain[0](x)
    delta0 = (e @ expected["2"].T) * (1 - torch.tanh(a0) ** 2)
    torch.testing.assert_close(model[0].weight.grad, delta0.T @ x)


def test_hashed_rows_differ_between_points_and_repeat_within_the_basis() -> None:
    model = nn.Sequential(
        nn.Linear(3, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 4)
    )
    primed(biograd.convert(model, "dfa", layout="hashed", hashed_rows=16), torch.randn(2, 3))
    eng = engine_of(model)
    b2, b4 = eng.matrix("2"), eng.matrix("4")
    assert b2.shape == b4.shape == (300, 4)
    assert not torch.allclose(b2, b4)  # each point has its own hash
    rows = {tuple(r.abs().tolist()) for r in b2}
    assert len(rows) == 16  # every basis row is used, up to sign
    assert eng.nbytes() == 16 * 4 * 4


@pytest.mark.parametrize("norm", ["launay", "fan_in", "fan_out", "none"])
def test_norm_sets_the_feedback_scale(norm: str) -> None:
    model = nn.Sequential(nn.Linear(3, 400), nn.ReLU(), nn.Linear(400, 10))
    primed(biograd.convert(model, "dfa", norm=norm), torch.randn(2, 3))
    std = float(biograd.feedback_weight(model[0]).std())
    assert std == pytest.approx(norm_factor(norm, 400, 10), rel=0.05)


def test_per_sample_error_scales_hidden_updates_by_the_rows_of_a_token_output() -> None:
    """Per-token DFA on (N, T, d): ``per_sample`` multiplies every hidden layer's gradient by the
    N x T rows of the mean-reduced loss's error; the output layer keeps the true gradient."""
    x, y = torch.randn(3, 5, 6), torch.randint(0, 4, (3, 5))
    base, grads = mlp(), {}
    for error in ERRORS:
        model = copy.deepcopy(base)
        biograd.convert(model, "dfa", seed=1, error=error)
        F.cross_entropy(model(x).reshape(-1, 4), y.reshape(-1)).backward()
        grads[error] = [model[i].weight.grad for i in (0, 2, 4)]
    for hidden in (0, 1):
        torch.testing.assert_close(grads["per_sample"][hidden], 15 * grads["loss"][hidden])
    torch.testing.assert_close(grads["per_sample"][2], grads["loss"][2])


def test_unknown_error_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown feedback error 'sum'; choose one of loss"):
        biograd.convert(mlp(), "dfa", error="sum")


def test_default_norm_is_launay() -> None:
    model = mlp()
    biograd.convert(model, "dfa")
    assert engine_of(model).norm == "launay"
    assert norm_factor("launay", 9, 4) == pytest.approx(1 / math.sqrt(9 * 4))


# --------------------------------------------------------------------------- state and modes
@pytest.mark.parametrize("layout", ["dense", "shared", "hashed"])
def test_state_dict_round_trip_keeps_the_feedback(layout: str) -> None:
    a, b = mlp(), mlp()
    b.load_state_dict(a.state_dict())
    fresh = biograd.convert(copy.deepcopy(b), "dfa", seed=2, layout=layout, norm="fan_out")
    primed(biograd.convert(a, "dfa", seed=1, layout=layout, norm="fan_out"))
    primed(biograd.convert(b, "dfa", seed=2, layout=layout, norm="fan_out"))
    assert not torch.allclose(biograd.feedback_weight(a[0]), biograd.feedback_weight(b[0]))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    buf.seek(0)
    # a model that never ran takes the feedback (and the points' sizes) from the checkpoint
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert engine_of(fresh).sizes == engine_of(a).sizes
    for key in ("2", "4"):
        torch.testing.assert_close(engine_of(fresh).matrix(key), engine_of(a).matrix(key))
    for i in (0, 2):
        torch.testing.assert_close(biograd.feedback_weight(b[i]), biograd.feedback_weight(a[i]))
    x, y = torch.randn(3, 6), torch.randint(0, 4, (3,))
    for m in (a, b):
        F.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(b[0].weight.grad, a[0].weight.grad)


def test_state_dict_of_another_layout_is_refused() -> None:
    a, b = mlp(), mlp()
    primed(biograd.convert(a, "dfa", layout="dense"))
    biograd.convert(b, "dfa", layout="hashed")
    with pytest.raises(FeedbackError, match="layout"):
        b.load_state_dict(a.state_dict(), strict=False)


@pytest.mark.parametrize("layout", ["dense", "hashed"])
def test_float64_keeps_the_feedback(layout: str) -> None:
    model = mlp()
    primed(biograd.convert(model, "dfa", layout=layout))
    before = {i: biograd.feedback_weight(model[i]) for i in (0, 2)}
    model.to(torch.float64)
    plain = copy.deepcopy(model)
    eng = engine_of(model)
    assert all(b.dtype == torch.float64 for b in eng.buffers() if b.is_floating_point())
    for i in (0, 2):
        torch.testing.assert_close(biograd.feedback_weight(model[i]).float(), before[i])
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    F.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad.dtype == torch.float64
    with biograd.exact(plain):
        e = output_error(plain, x, y, "ce")
        a0 = plain[0](x).detach()
    delta0 = (e @ eng.matrix("2").T) * (1 - torch.tanh(a0) ** 2)
    torch.testing.assert_close(model[0].weight.grad, delta0.T @ x)


@pytest.mark.parametrize("rule", ["dfa", "sdfa", "drtp", "shallow"])
def test_exact_gives_backprop(rule: str) -> None:
    model = cnn()
    x, y = torch.randn(2, 2, 8, 8), torch.randint(0, 3, (2,))
    plain = copy.deepcopy(model)
    biograd.convert(model, rule, example_input=x)
    with biograd.exact(model):
        F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    model.zero_grad()
    if rule == "drtp":
        biograd.set_targets(model, y)
    F.cross_entropy(model(x), y).backward()  # back on the rule afterwards
    if rule == "shallow":
        assert model[0].weight.grad is None
    else:
        assert not torch.allclose(model[0].weight.grad, plain[0].weight.grad)


def test_no_grad_forward_records_nothing() -> None:
    model = mlp()
    biograd.convert(model, "drtp")
    with torch.no_grad():
        model(torch.randn(2, 6))  # drtp needs no targets without a backward
    assert engine_of(model).points == []


# --------------------------------------------------------------------------- errors
def test_drtp_without_targets_fails_clearly() -> None:
    model = mlp()
    biograd.convert(model, "drtp")
    with pytest.raises(FeedbackError, match="set_targets"):
        model(torch.randn(2, 6))
    biograd.set_targets(model, torch.tensor([0, 1]))
    model(torch.randn(2, 6)).sum().backward()
    with pytest.raises(FeedbackError, match="set_targets"):  # targets serve one forward pass
        model(torch.randn(2, 6))
    model.eval()  # an eval forward with grad enabled fails only if a backward pass follows
    out = model(torch.randn(2, 6))
    with pytest.raises(FeedbackError, match="set_targets"):
        out.sum().backward()


def test_drtp_with_the_wrong_number_of_targets_fails_clearly() -> None:
    model = mlp()
    biograd.convert(model, "drtp")
    biograd.set_targets(model, torch.tensor([0, 1, 2]))
    with pytest.raises(FeedbackError, match="3 targets"):
        model(torch.randn(2, 6)).sum().backward()


def test_point_of_the_wrong_size_fails_clearly() -> None:
    model = cnn()
    biograd.convert(model, "dfa", example_input=torch.randn(1, 2, 8, 8))
    with pytest.raises(FeedbackError, match="features per sample"):
        model(torch.randn(2, 2, 12, 12))


@pytest.mark.parametrize("layout", ["dense", "shared", "hashed"])
def test_conv_without_example_input_draws_its_feedback_at_the_first_pass(layout: str) -> None:
    model = biograd.convert(cnn(), "dfa", layout=layout)
    assert engine_of(model).sizes == {}
    x = torch.randn(2, 2, 8, 8)
    F.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert engine_of(model).sizes == {"4": 64, "9": 5}
    same = biograd.convert(cnn(), "dfa", layout=layout, example_input=x[:1])
    for key in ("4", "9"):
        assert torch.equal(engine_of(same).matrix(key), engine_of(model).matrix(key))


def test_bad_options_fail_clearly() -> None:
    with pytest.raises(ValueError, match="layout"):
        biograd.convert(mlp(), "dfa", layout="sparse")
    with pytest.raises(ValueError, match="norm"):
        biograd.convert(mlp(), "dfa", norm="xavier")
    with pytest.raises(ValueError, match="feedback_points"):
        biograd.convert(mlp(), "dfa", feedback_points=["nothing"])
    with pytest.warns(UserWarning, match="rank"):
        primed(biograd.convert(mlp(), "dfa", layout="hashed", hashed_rows=2))


def test_feedback_weight_shapes() -> None:
    model = mlp()
    biograd.convert(model, "dfa")
    assert all(biograd.feedback_weight(m) is None for m in model if isinstance(m, nn.Linear))
    primed(model)  # the feedback is drawn at the first forward pass
    # the matrix that trains a layer: (its outputs per sample, C); none for the output layer
    assert biograd.feedback_weight(model[0]).shape == (9, 4)
    assert biograd.feedback_weight(model[2]).shape == (8, 4)
    assert biograd.feedback_weight(model[4]) is None
    assert engine_of(model).trains == {"2": "0", "4": "2"}


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("layout", ["dense", "shared", "hashed"])
def test_feedback_memory_matches_the_allocated_feedback(layout: str) -> None:
    model = cnn()
    x = torch.randn(1, 2, 8, 8)
    predicted = feedback_memory(model, x.shape, layout=layout, hashed_rows=32)
    assert feedback_sizes(model, x.shape) == ({"4": 64, "9": 5}, 3)
    biograd.convert(model, "dfa", example_input=x, layout=layout, hashed_rows=32)
    assert engine_of(model).nbytes() == predicted
    assert feedback_memory(model, x.shape, layout=layout, hashed_rows=32) == predicted


def test_feedback_memory_does_not_run_on_real_data() -> None:
    """A 4096 x 4096 image would need about 0.5 GB per activation; the meta run allocates none."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten()
    )
    side = 4096
    sizes, classes = feedback_sizes(model, (1, 3, side, side))
    assert sizes == {"2": 8 * side * side} and classes == 8 * side * side
    got = feedback_memory(model, (1, 3, side, side), 1000, "hashed", hashed_rows=1024)
    assert got == 1024 * 1000 * 4


def test_hashed_feedback_memory_is_small_for_an_imagenet_resnet() -> None:
    models = pytest.importorskip("biograd.models")
    model = models.build_model("resnet18", in_shape=(3, 224, 224), classes=1000)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes, classes = feedback_sizes(model, (1, 3, 224, 224))
    assert classes == 1000 and max(sizes.values()) == 64 * 56 * 56
    dense = feedback_memory(model, (1, 3, 224, 224), 1000, "dense")
    shared = feedback_memory(model, (1, 3, 224, 224), 1000, "shared")
    hashed = feedback_memory(model, (1, 3, 224, 224), 1000, "hashed")
    assert dense > shared > 10 * params > hashed * 100
    assert hashed < 0.1 * params


# --------------------------------------------------------------------------- learning
def blobs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 10, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 10, generator=g), y


def train(model: nn.Module, rule: str, x: Tensor, y: Tensor, steps: int, batch: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        if rule == "drtp":
            biograd.set_targets(model, y[idx])
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("rule", ["dfa", "sdfa", "drtp", "shallow"])
def test_every_direct_rule_learns_a_synthetic_task(rule: str) -> None:
    x, y = blobs(512, 0)
    xt, yt = blobs(512, 1)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    biograd.convert(model, rule)
    before = accuracy(model, xt, yt)
    train(model, rule, x, y, steps=150, batch=32)
    assert accuracy(model, xt, yt) > max(0.9, before + 0.3)


def products(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """4 classes from the signs of two products of projections: no linear read-out of fixed
    random tanh features solves it, so the hidden layers must learn."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(10, 4, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, 10, generator=g)
    z = x @ proj
    return x, 2 * (z[:, 0] * z[:, 1] > 0).long() + (z[:, 2] * z[:, 3] > 0).long()


def test_dfa_trains_the_hidden_layers() -> None:
    x, y = products(2048, 0)
    xt, yt = products(1024, 1)
    acc = {}
    for rule in ("dfa", "shallow"):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)
        )  # fmt: skip
        biograd.convert(model, rule)
        train(model, rule, x, y, steps=600, batch=64)
        acc[rule] = accuracy(model, xt, yt)
    assert acc["shallow"] < 0.45  # chance: 0.25
    assert acc["dfa"] > 0.75


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from biograd.data import load_dataset

    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    mean, std = tr.mean[0], tr.std[0]
    return (tr.x - mean) / std, tr.y, (te.x - mean) / std, te.y


@pytest.mark.parametrize(
    ("rule", "steps", "floor"),
    [("dfa", 200, 0.93), ("sdfa", 400, 0.7), ("drtp", 200, 0.9), ("shallow", 200, 0.8)],
)
def test_direct_rules_learn_digits(rule: str, steps: int, floor: float) -> None:
    """Chance is 0.1. sdfa is the slowest: with softmax cross-entropy sign(e) = 1 - 2 y* for
    every sample, so its signal is drtp's plus a constant projection B 1."""
    x, y, xt, yt = digits()
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )  # fmt: skip
    biograd.convert(model, rule)
    train(model, rule, x, y, steps=steps, batch=32)
    assert accuracy(model, xt, yt) > floor


def test_hashed_feedback_trains_a_cnn_on_digits_as_well_as_dense() -> None:
    """Even with 32 basis rows for 512-feature maps (each row reused 16 times up to sign)."""
    x, y, xt, yt = digits()
    acc = {}
    for layout in ("dense", "hashed"):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8 * 16, 10),
        )  # fmt: skip
        biograd.convert(model, "dfa", layout=layout, example_input=x[:1], hashed_rows=32)
        train(model, "dfa", x, y, steps=200, batch=32)
        model.eval()
        acc[layout] = accuracy(model, xt, yt)
    assert acc["dense"] > 0.9
    assert acc["hashed"] > acc["dense"] - 0.04


def test_deepcopy_rebinds_hooks_to_the_copy() -> None:
    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b1 = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
            self.b2 = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
            self.fc = nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.b2(self.b1(x)))

    model = biograd.convert(
        Blocks(), "dfa", feedback_points=["b1", "b2"], example_input=torch.randn(2, 8)
    )
    clone = copy.deepcopy(model)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    F.cross_entropy(clone(x), y).backward()
    assert all(p.grad is not None for p in clone.parameters())
    assert all(p.grad is None for p in model.parameters())
    # The copy's hidden gradient is the original's (same feedback, same weights).
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(clone.b1[0].weight.grad, model.b1[0].weight.grad)


def test_input_that_requires_grad_gets_the_first_layers_projection() -> None:
    model = biograd.convert(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)), "dfa")
    x = torch.randn(5, 8, requires_grad=True)
    out = model(x)
    e = torch.randn_like(out)
    out.backward(e)
    b0 = engine_of(model).matrix("0")
    assert b0.shape == (8, 3)
    torch.testing.assert_close(x.grad, e @ b0.t())


def test_adding_a_feedback_point_leaves_the_others_as_they_were() -> None:
    one = primed(biograd.convert(mlp(), "dfa", seed=4, feedback_points=["1"]))
    two = primed(biograd.convert(mlp(), "dfa", seed=4, feedback_points=["1", "3"]))
    assert set(engine_of(one).sizes) == {"1"} and set(engine_of(two).sizes) == {"1", "3"}
    assert torch.equal(engine_of(one).matrix("1"), engine_of(two).matrix("1"))
