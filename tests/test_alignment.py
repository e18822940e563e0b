"""Alignment diagnostics: known angles, and measurements that leave the model untouched."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import biograd
from biograd.alignment import (
    CSV_COLUMNS,
    NETWORK,
    AlignmentMonitor,
    angle,
    gradient_alignment,
    weight_alignment,
)
from biograd.bottleneck import TensorData, apply_bottleneck, bottleneck_sweep, remove_bottleneck

FA_FAMILY = ("bp", "fa", "usf", "frsf", "brsf", "kp")
ALL_RULES = (*FA_FAMILY, "dfa", "sdfa", "drtp", "shallow")
TOL = 1e-4  # degrees


def mlp(d_in: int = 12, hidden: int = 16, classes: int = 4, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )


def tanh_mlp(hidden: int = 40) -> nn.Sequential:
    """Every gradient entry is non-zero (no ReLU zeros to confuse a filter test)."""
    return nn.Sequential(
        nn.Linear(12, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 4)
    )  # fmt: skip


def batch(n: int = 8, d: int = 12, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, d), torch.randint(0, classes, (n,))


def image_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 8, 8), torch.randint(0, 5, (n,))


# --------------------------------------------------------------------------- angle
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 50), st.floats(0.01, 100.0), st.integers(0, 10_000))
def test_angle_of_parallel_and_opposite_vectors(n: int, c: float, seed: int) -> None:
    a = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    assert angle(a, c * a) == pytest.approx(0.0, abs=TOL)
    assert angle(a, -c * a) == pytest.approx(180.0, abs=TOL)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    assert angle(a, b) == pytest.approx(angle(b, a), abs=1e-9)


def test_angle_of_zero_vector_is_nan() -> None:
    assert math.isnan(angle(torch.zeros(3), torch.ones(3)))


# --------------------------------------------------------------------------- weight alignment
def test_bp_gives_zero_everywhere() -> None:
    model = biograd.convert(mlp(dropout=0.5), "bp")
    x, y = batch()
    for values in weight_alignment(model).values():
        assert values["angle"] == pytest.approx(0.0, abs=TOL)
        assert values["norm_ratio"] == pytest.approx(1.0)
    grad = gradient_alignment(model, F.cross_entropy, x, y)
    assert set(grad) == {"0", "3", "5", NETWORK}
    for values in grad.values():
        assert values["angle"] == pytest.approx(0.0, abs=TOL)
    for name in ("0", "3", "5"):
        assert grad[name]["delta_cos_mean"] == pytest.approx(1.0, abs=1e-6)
        assert grad[name]["delta_cos_std"] == pytest.approx(0.0, abs=1e-6)


def test_fa_with_b_set_to_w_gives_zero_everywhere() -> None:
    model = biograd.convert(mlp(), "fa")
    with torch.no_grad():
        for _, layer in biograd.converted_layers(model):
            layer.rule.feedback.copy_(layer.weight)
    x, y = batch()
    for values in weight_alignment(model).values():
        assert values["angle"] == pytest.approx(0.0, abs=TOL)
    for values in gradient_alignment(model, F.cross_entropy, x, y).values():
        assert values["angle"] == pytest.approx(0.0, abs=TOL)


def test_fresh_fa_is_about_90_degrees() -> None:
    model = biograd.convert(nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 200)), "fa", seed=3)
    for values in weight_alignment(model).values():
        assert values["angle"] == pytest.approx(90.0, abs=2.0)


def test_usf_on_uniform_weights_is_30_degrees() -> None:
    layer = nn.Linear(400, 300)
    nn.init.uniform_(layer.weight, -0.1, 0.1)
    model = biograd.convert(nn.Sequential(layer), "usf")
    expected = math.degrees(math.acos(math.sqrt(3) / 2))
    assert weight_alignment(model)["0"]["angle"] == pytest.approx(expected, abs=0.3)


def test_b_orthogonal_to_w_gives_90() -> None:
    model = biograd.convert(nn.Sequential(nn.Linear(10, 7)), "fa")
    layer = model[0]
    with torch.no_grad():
        w = layer.weight.double()
        b = torch.randn_like(w)
        b -= (b * w).sum() / (w * w).sum() * w
        layer.rule.feedback.copy_(b.float())
        layer.rule.feedback.mul_(3.0)
    values = weight_alignment(model)["0"]
    assert values["angle"] == pytest.approx(90.0, abs=1e-3)
    assert values["norm_ratio"] == pytest.approx(
        float(layer.rule.feedback.norm() / layer.weight.detach().norm()), rel=1e-6
    )


def test_one_hidden_layer_dfa_with_feedback_set_to_output_weights_gives_zero() -> None:
    net = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 4))
    model = biograd.convert(net, "dfa", example_input=torch.randn(2, 12))
    engine = model[2].direct_feedback
    with torch.no_grad():
        engine.point_2.copy_(model[2].weight.t())
    weight = weight_alignment(model)
    assert set(weight) == {"0"}  # the matrix at layer 2's input trains layer 0
    assert weight["0"]["angle"] == pytest.approx(0.0, abs=TOL)
    assert weight["0"]["norm_ratio"] == pytest.approx(1.0)
    x, y = batch()
    grad = gradient_alignment(model, F.cross_entropy, x, y)
    for values in grad.values():
        assert values["angle"] == pytest.approx(0.0, abs=TOL)
    assert grad["0"]["delta_cos_mean"] == pytest.approx(1.0, abs=1e-6)


def test_dfa_weight_alignment_uses_the_product_of_downstream_weights() -> None:
    model = biograd.convert(mlp(), "dfa", seed=2)
    assert weight_alignment(model) == {}  # the feedback is drawn at the first forward pass
    model(batch()[0])
    path = model[5].weight.double() @ model[3].weight.double()  # (C, d) from the input of layer "3"
    b = model[5].direct_feedback.point_3  # it trains layer "0", whose output reaches it first
    assert weight_alignment(model)["0"]["angle"] == pytest.approx(angle(path.t(), b), abs=1e-6)


class _Block(nn.Module):
    """A residual block with two branches: no product of weights is its backprop path."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.q(x)) * self.k(x)


def test_dfa_weight_alignment_is_nan_for_layers_nested_in_blocks() -> None:
    d = 6
    model = nn.Sequential(nn.Linear(4, d), _Block(d), _Block(d), nn.Linear(d, 3))
    model = biograd.convert(model, "dfa", seed=0)
    model(torch.randn(5, 4))
    weight = weight_alignment(model)
    assert {"0", "1.k", "2.k"} <= set(weight)  # the layers that ran last before a point
    assert all(math.isnan(v["angle"]) and math.isnan(v["norm_ratio"]) for v in weight.values())


def test_fresh_direct_rules_are_far_from_backprop() -> None:
    torch.manual_seed(1)
    model = biograd.convert(mlp(hidden=64), "dfa")
    x, y = batch(32)
    grad = gradient_alignment(model, F.cross_entropy, x, y)
    assert 60.0 < grad["0"]["angle"] < 120.0
    assert grad["5"]["angle"] == pytest.approx(0.0, abs=TOL)  # the output layer has the true error


@pytest.mark.parametrize("rule", ALL_RULES)
def test_every_rule_reports_every_layer(rule: str) -> None:
    model = biograd.convert(mlp(dropout=0.2), rule)
    x, y = batch()
    grad = gradient_alignment(model, F.cross_entropy, x, y)
    assert set(grad) == {"0", "3", "5", NETWORK}
    assert grad["5"]["angle"] == pytest.approx(0.0, abs=TOL)
    if rule == "shallow":
        assert math.isnan(grad["0"]["angle"])  # hidden layers get no update at all
    else:
        assert 0.0 <= grad["0"]["angle"] <= 180.0
        assert -1.0 <= grad["0"]["delta_cos_mean"] <= 1.0


# --------------------------------------------------------------------------- convolutions
@pytest.mark.parametrize("rule", ("bp", "fa", "brsf", "dfa"))
def test_conv_layers(rule: str) -> None:
    x, y = image_batch()
    model = biograd.convert(convnet(), rule, example_input=x)
    if rule == "fa":
        with torch.no_grad():
            for _, layer in biograd.converted_layers(model):
                layer.rule.feedback.copy_(layer.weight)
    weight = weight_alignment(model)
    grad = gradient_alignment(model, F.cross_entropy, x, y)
    assert set(grad) == {"0", "4", "7", NETWORK}
    exact_rule = rule in ("bp", "fa")
    for name in ("0", "4"):
        if exact_rule:
            assert grad[name]["angle"] == pytest.approx(0.0, abs=TOL)
            assert weight[name]["angle"] == pytest.approx(0.0, abs=TOL)
        else:
            assert 0.0 < grad[name]["angle"] < 180.0
    if rule == "dfa":
        assert math.isnan(weight["0"]["angle"])  # a convolutional path is no plain product
        assert math.isfinite(weight["4"]["angle"])  # the matrix at 7's input trains 4


# --------------------------------------------------------------------------- no side effects
def _state(model: nn.Module) -> dict[str, object]:
    layers = [m for _, m in biograd.converted_layers(model)]
    return {
        "state": {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else dict(v)
            for k, v in model.state_dict(keep_vars=True).items()
        },
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        "feedback": [biograd.feedback_weight(m) for m in layers],
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["state"].keys() == b["state"].keys()  # type: ignore[attr-defined]
    for k, v in a["state"].items():  # type: ignore[attr-defined]
        other = b["state"][k]  # type: ignore[index]
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, other), k
        else:
            assert v == other, k
    for k, g in a["grads"].items():  # type: ignore[attr-defined]
        other = b["grads"][k]  # type: ignore[index]
        assert (g is None and other is None) or torch.equal(g, other), k
    assert a["grad_ids"] == b["grad_ids"]
    for x, y in zip(a["feedback"], b["feedback"]):  # type: ignore[call-overload]
        assert (x is None and y is None) or torch.equal(x, y)
    assert torch.equal(a["rng"], b["rng"])  # type: ignore[arg-type]
    assert a["training"] == b["training"]


@pytest.mark.parametrize("mode", ("train", "eval"))
@pytest.mark.parametrize("rule", ("brsf", "kp", "dfa", "drtp"))
def test_measurement_leaves_the_model_bit_identical(rule: str, mode: str) -> None:
    x, y = image_batch()
    model = biograd.convert(convnet(), rule, example_input=x)
    model.train(mode == "train")
    # a training step first, so that grads, brsf steps and running statistics are populated
    if rule == "drtp":
        biograd.set_targets(model, y)
    F.cross_entropy(model(x), y).backward()
    before = _state(model)
    weight_alignment(model)
    gradient_alignment(model, F.cross_entropy, x, y)
    _assert_same(before, _state(model))


@pytest.mark.parametrize("rule", ("brsf", "dfa"))
def test_training_is_unchanged_by_measuring(rule: str) -> None:
    """The next training step (dropout masks, brsf draws, BN statistics) is the same as without
    the measurement."""

    def run(measure: bool) -> list[torch.Tensor]:
        torch.manual_seed(5)
        x, y = image_batch()
        model = biograd.convert(convnet(), rule, example_input=x).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            if measure:
                gradient_alignment(model, F.cross_entropy, x, y)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [
            t.detach().clone() for t in model.state_dict().values() if isinstance(t, torch.Tensor)
        ]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_dropout_masks_are_identical_in_both_passes() -> None:
    model = biograd.convert(mlp(dropout=0.5), "bp").train()
    x, y = batch(32)
    grad = gradient_alignment(model, F.cross_entropy, x, y)
    assert grad[NETWORK]["angle"] == pytest.approx(0.0, abs=TOL)


def test_unconverted_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="no converted layer"):
        gradient_alignment(mlp(), F.cross_entropy, *batch())


# --------------------------------------------------------------------------- monitor
def test_monitor_writes_rows_every_n_steps(tmp_path) -> None:
    model = biograd.convert(mlp(), "fa")
    path = tmp_path / "run" / "alignment.csv"
    x, y = batch()
    with AlignmentMonitor(
        model, F.cross_entropy, every=2, csv_path=path, tags={"rule": "fa", "seed": 3}
    ) as monitor:
        written = [monitor.maybe_measure(step, 0, x, y) for step in range(5)]
    assert [bool(rows) for rows in written] == [True, False, True, False, True]
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 3 * (3 + 4)  # 3 weight rows + 3 layer and 1 network gradient rows
    assert {r["step"] for r in rows} == {"0", "2", "4"}
    assert {r["rule"] for r in rows} == {"fa"} and {r["seed"] for r in rows} == {"3"}
    net = [r for r in rows if r["layer"] == NETWORK]
    assert all(r["kind"] == "gradient" and r["norm_ratio"] == "" and r["angle"] for r in net)
    weight = [r for r in rows if r["kind"] == "weight"]
    assert all(r["delta_cos_mean"] == "" and float(r["norm_ratio"]) > 0 for r in weight)


def test_monitor_off_does_nothing(tmp_path) -> None:
    model = biograd.convert(mlp(), "fa")
    path = tmp_path / "alignment.csv"
    monitor = AlignmentMonitor(model, F.cross_entropy, every=0, csv_path=path)
    assert not monitor.enabled
    assert monitor.maybe_measure(0, 0, None, None) == []
    assert not path.exists()
    monitor.close()


# --------------------------------------------------------------------------- bottleneck
def _masked_rows(grad: torch.Tensor, keep: int) -> tuple[bool, bool]:
    """(all rows from ``keep`` on are zero, every row before ``keep`` is non-zero)."""
    rows = grad.reshape(grad.shape[0], -1).abs().sum(1)
    return bool((rows[keep:] == 0).all()), bool((rows[:keep] > 0).all())


@pytest.mark.parametrize("rule", ("bp", "fa", "dfa"))
def test_mask_bottleneck_lets_only_kept_units_learn(rule: str) -> None:
    model = apply_bottleneck(mlp(hidden=10), "3", 3, "mask")
    biograd.convert(model, rule)
    x, y = batch(16)
    F.cross_entropy(model(x), y).backward()
    assert _masked_rows(model[3].weight.grad, 3) == (True, True)
    assert bool((model[3].bias.grad[3:] == 0).all())
    grad = gradient_alignment(model, F.cross_entropy, x, y)  # the mask acts in both passes
    assert math.isfinite(grad["3"]["angle"])
    if rule == "bp":
        assert grad["3"]["angle"] == pytest.approx(0.0, abs=TOL)


@pytest.mark.parametrize("rule", ("bp", "fa", "dfa"))
def test_filter_bottleneck_lets_a_fixed_random_share_of_weights_learn(rule: str) -> None:
    """Launay et al.'s code: a fixed 0/1 filter, keep/width of the entries, on the layer's weight
    and bias gradients; the same entries every step, drawn from the seed; the input's gradient
    is not filtered."""
    torch.manual_seed(0)
    model = apply_bottleneck(tanh_mlp(), "2", 10, "filter", seed=3)
    plain = tanh_mlp()
    plain.load_state_dict(model.state_dict())  # the filter adds no state
    biograd.convert(model, rule)
    biograd.convert(plain, rule)
    x, y = batch(16)
    for m in (model, plain):
        F.cross_entropy(m(x), y).backward()
    learns = model[2].weight.grad != 0
    assert 0.15 < learns.float().mean().item() < 0.35  # 400 of 1600 entries expected
    assert torch.equal(model[2].weight.grad, plain[2].weight.grad * learns)
    assert torch.equal(model[0].weight.grad, plain[0].weight.grad)  # the layer below: unfiltered
    bias = model[2].bias.grad != 0
    assert 0 < bias.sum() < 25 and torch.equal(model[2].bias.grad, plain[2].bias.grad * bias)
    model.zero_grad()
    F.cross_entropy(model(x[:8]), y[:8]).backward()
    assert torch.equal(model[2].weight.grad != 0, learns)  # the same entries on another batch
    if rule == "bp":
        grad = gradient_alignment(model, F.cross_entropy, x, y)
        assert grad["2"]["angle"] == pytest.approx(0.0, abs=TOL)
    again = apply_bottleneck(tanh_mlp(), "2", 10, "filter", seed=3)
    other = apply_bottleneck(tanh_mlp(), "2", 10, "filter", seed=4)
    for m in (again, other):
        F.cross_entropy(m(x), y).backward()
    assert torch.equal(again[2].weight.grad != 0, learns)
    assert not torch.equal(other[2].weight.grad != 0, learns)


def test_filter_bottleneck_is_replaced_and_removed() -> None:
    x, y = batch(16)
    model = apply_bottleneck(tanh_mlp(), "2", 1, "filter")
    apply_bottleneck(model, "2", 40, "filter")  # replaces it: every entry learns
    F.cross_entropy(model(x), y).backward()
    assert bool((model[2].weight.grad != 0).all())
    apply_bottleneck(model, "2", 4, "filter")
    remove_bottleneck(model, "2")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert bool((model[2].weight.grad != 0).all())
    with torch.device("meta"):
        late = tanh_mlp()
    with pytest.raises(ValueError, match="after to_empty"):  # materialising replaces parameters
        apply_bottleneck(late, "2", 10, "filter")


def test_mask_bottleneck_on_a_convolution_and_replacing_it() -> None:
    x, y = image_batch()
    model = convnet()
    apply_bottleneck(model, "0", 1, "mask")
    apply_bottleneck(model, "0", 2, "mask")  # replaces the first mask
    F.cross_entropy(model(x), y).backward()
    assert _masked_rows(model[0].weight.grad, 2) == (True, True)
    remove_bottleneck(model, "0")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert _masked_rows(model[0].weight.grad, 4) == (True, True)


def test_narrow_bottleneck_rebuilds_the_layer_and_its_reader() -> None:
    model = nn.Sequential(
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )  # fmt: skip
    apply_bottleneck(model, "0", 5, "narrow")
    assert model[0].out_features == 5 and model[1].num_features == 5 and model[3].in_features == 5
    assert model(torch.randn(3, 12)).shape == (3, 4)
    with pytest.raises(ValueError, match="keep=17"):
        apply_bottleneck(model, "3", 17, "narrow")
    biograd.convert(model, "fa")
    with pytest.raises(ValueError, match=r"before biograd\.convert"):
        apply_bottleneck(model, "3", 4, "narrow")
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        apply_bottleneck(convnet(), "0", 2, "narrow")
    with pytest.raises(ValueError, match="unknown bottleneck mode"):
        apply_bottleneck(convnet(), "0", 2, "thin")


def test_bottleneck_sweep_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = TensorData(x[:64], y[:64], x[64:], y[64:])
    rows = bottleneck_sweep(
        lambda: mlp(classes=3), "3", [1, 8], data, rules=("bp", "drtp"), epochs=2, lr=0.05
    )
    assert [(r["rule"], r["width"]) for r in rows] == [
        ("bp", 1), ("bp", 8), ("drtp", 1), ("drtp", 8)
    ]  # fmt: skip
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and math.isfinite(r["train_loss"])
        assert set(r["angles"]) == {"0", "3", "5"}
    assert all(r["angle"] == pytest.approx(0.0, abs=TOL) for r in rows if r["rule"] == "bp")
    assert all(0.0 < r["angle"] < 180.0 for r in rows if r["rule"] == "drtp")
    narrow = bottleneck_sweep(lambda: mlp(classes=3), "3", [2], data, mode="narrow", epochs=1)
    assert narrow[0]["mode"] == "narrow" and math.isfinite(narrow[0]["angle"])


def _train_monitored(rule: str, reuse: bool, path, fresh_batches: bool = False) -> list[dict]:
    torch.manual_seed(0)
    x, y = image_batch()
    model = biograd.convert(convnet(), rule, example_input=x).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = AlignmentMonitor(model, F.cross_entropy, every=2, csv_path=path, reuse_step=reuse)
    rows: list[dict] = []
    for step in range(5):
        if rule == "drtp":
            biograd.set_targets(model, y)
        rows += monitor.maybe_measure(step, 0, x, y)
        xb = x.clone() if fresh_batches else x
        opt.zero_grad()
        F.cross_entropy(model(xb), y).backward()
        opt.step()
    monitor.close()
    return rows


@pytest.mark.parametrize("rule", ("brsf", "dfa", "drtp"))
def test_reuse_step_measures_the_same_as_a_separate_pass(rule: str, tmp_path) -> None:
    _train_monitored(rule, False, tmp_path / "a.csv")
    _train_monitored(rule, True, tmp_path / "b.csv")

    def read(name: str) -> dict[tuple[str, str, str], dict[str, str]]:
        with (tmp_path / name).open() as f:
            return {(r["step"], r["kind"], r["layer"]): r for r in csv.DictReader(f)}

    separate, reused = read("a.csv"), read("b.csv")
    assert separate.keys() == reused.keys()
    assert {k[0] for k in separate} == {"0", "2", "4"}
    for k, r in separate.items():
        for col in ("angle", "delta_cos_mean", "norm_ratio"):
            if r[col] == "":
                assert reused[k][col] == ""
            else:
                assert float(reused[k][col]) == pytest.approx(float(r[col]), abs=1e-3), (k, col)


def test_reuse_step_without_the_batch_writes_no_gradient_rows(tmp_path, caplog) -> None:
    rows = _train_monitored("fa", True, tmp_path / "a.csv", fresh_batches=True)
    assert rows and {r["kind"] for r in rows} == {"weight"}
    assert "did not run its batch" in caplog.text


def test_bottleneck_command_writes_csv_and_plot(tmp_path) -> None:
    from biograd.bottleneck import main

    main(
        ["--widths", "2,8", "--rules", "bp", "--epochs", "1", "--hidden", "16,16",
         "--out", str(tmp_path)]
    )  # fmt: skip
    with (tmp_path / "bottleneck.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["width"] for r in rows] == ["2", "8"]
    assert all(float(r["angle"]) == pytest.approx(0.0, abs=TOL) for r in rows)
    assert (tmp_path / "bottleneck.png").stat().st_size > 1000
