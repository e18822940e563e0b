"""The model zoo: shapes, parameter counts against the papers, options, and that every model
converts to every rule with unchanged outputs and trains without non-finite values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import biograd
from biograd.errors import ConfigError
from biograd.models import MODELS, Bottleneck, ResNet, build_model, model_options
from biograd.rules.base import feedback_std

# A small input shape per model, so that the whole file stays fast on one core.
SMALL: dict[str, tuple[int, ...]] = {
    "mlp": (1, 8, 8),
    "lenet": (1, 28, 28),
    "resnet20": (3, 8, 8),
    "resnet32": (3, 8, 8),
    "resnet44": (3, 8, 8),
    "resnet56": (3, 8, 8),
    "resnet110": (3, 8, 8),
    "resnet18": (3, 32, 32),
    "resnet50": (3, 32, 32),
    "launay_fc": (3, 8, 8),
    "launay_cnn": (3, 16, 16),
}

# Models used for the every-rule training step (one of each architecture family).
FAMILY = {
    "mlp": {"batch_norm": True, "dropout": 0.2},
    "lenet": {},
    "resnet20": {},
    "launay_cnn": {"batch_norm": True},
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_count(name: str, **kwargs: object) -> int:
    with torch.device("meta"):
        return n_params(build_model(name, **kwargs))  # type: ignore[arg-type]


def test_models_tuple_matches_the_shared_schema() -> None:
    assert MODELS == (
        "mlp", "lenet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet18", "resnet50", "launay_fc", "launay_cnn",
    )  # fmt: skip
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_output_shape_in_train_and_eval(name: str) -> None:
    model = build_model(name, in_shape=SMALL[name], classes=7)
    x = torch.randn(2, *SMALL[name])
    assert model(x).shape == (2, 7)
    model.eval()
    assert model(x[:1]).shape == (1, 7)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M (option A: no shortcut weights).
        ("resnet20", {}, 269_722),
        ("resnet20", {"shortcut": "B"}, 272_474),
        ("resnet32", {}, 464_154),
        ("resnet44", {}, 658_586),
        ("resnet56", {}, 853_018),
        ("resnet110", {}, 1_727_962),
        # torchvision's published counts for the ImageNet nets.
        ("resnet18", {"classes": 1000}, 11_689_512),
        ("resnet50", {"classes": 1000}, 25_557_032),
        ("resnet50", {"classes": 1000, "stride_in_1x1": True}, 25_557_032),
        # LeNet-5: 156 + 2416 + 48120 + 10164 + 850.
        ("lenet", {"in_shape": (1, 28, 28)}, 61_706),
        ("lenet", {"in_shape": (1, 32, 32)}, 61_706),
        # Launay et al. 2019 on CIFAR-10: 3072-800-800-800-10 and conv 32/64/64 + 576-128-10.
        ("launay_fc", {"in_shape": (3, 32, 32)}, 3072 * 800 + 800 + 2 * 800 * 801 + 8010),
        ("launay_cnn", {"in_shape": (3, 32, 32)}, 231_306),
        ("mlp", {"in_shape": (1, 8, 8), "widths": (32,)}, 64 * 32 + 32 + 330),
    ],
)
def test_parameter_counts(name: str, kwargs: dict[str, object], expected: int) -> None:
    assert meta_count(name, **kwargs) == expected


def test_resnet_parameter_counts_with_real_tensors() -> None:
    # The meta-device counts above are the same as those of a materialised model.
    assert n_params(build_model("resnet20")) == 269_722
    assert n_params(build_model("resnet18", in_shape=(3, 32, 32), classes=1000)) == 11_689_512


def test_lenet_pads_small_inputs_to_32() -> None:
    m28 = build_model("lenet", in_shape=(1, 28, 28))
    assert isinstance(m28.pad, nn.ZeroPad2d) and m28.pad.padding == (2, 2, 2, 2)
    assert m28.fc1.in_features == 400
    m32 = build_model("lenet", in_shape=(3, 32, 32))
    assert not hasattr(m32, "pad") and m32.fc1.in_features == 400
    m8 = build_model("lenet", in_shape=(1, 8, 8))
    assert m8(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    m_odd = build_model("lenet", in_shape=(1, 7, 9), pad_to=32)
    assert m_odd.pad.padding == (11, 12, 12, 13)
    assert m_odd(torch.randn(2, 1, 7, 9)).shape == (2, 10)
    with pytest.raises(ConfigError, match="too small"):
        build_model("lenet", in_shape=(1, 8, 8), pad_to=0)


def test_lenet_conv3_is_biotorchs_c5_the_same_function_at_a_smaller_xavier_scale() -> None:
    torch.manual_seed(0)
    fc = build_model("lenet", in_shape=(1, 28, 28))
    c5 = build_model("lenet", in_shape=(1, 28, 28), conv3=True)
    assert not hasattr(c5, "fc1") and c5.conv3.kernel_size == (5, 5)
    state = fc.state_dict()
    state["conv3.weight"] = state.pop("fc1.weight").reshape(120, 16, 5, 5)
    state["conv3.bias"] = state.pop("fc1.bias")
    c5.load_state_dict(state)
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(c5(x), fc(x), atol=1e-5)
    for net in (fc, c5):
        biograd.models.init_weights(net, "xavier")
    ratio = float(fc.fc1.weight.std() / c5.conv3.weight.std())
    assert ratio == pytest.approx(math.sqrt(3400 / 520), rel=0.05)  # fan-out 120 x 25, not 120
    b_ratio = feedback_std(fc.fc1.weight, "xavier") / feedback_std(c5.conv3.weight, "xavier")
    assert b_ratio == pytest.approx(math.sqrt(3400 / 520))  # and so is its feedback's
    biograd.convert(c5, "usf")
    assert c5(x).shape == (4, 10)


def test_lenet_pad_keeps_the_image_in_the_centre() -> None:
    model = build_model("lenet", in_shape=(1, 28, 28))
    x = torch.randn(1, 1, 28, 28)
    padded = model.pad(x)
    assert padded.shape == (1, 1, 32, 32)
    assert torch.equal(padded[..., 2:30, 2:30], x) and padded.abs().sum() == x.abs().sum()


def test_launay_nets_follow_the_paper() -> None:
    cnn = build_model("launay_cnn", in_shape=(3, 32, 32))
    assert cnn.fc1.in_features == 576 and cnn.fc1.out_features == 128
    assert [cnn.get_submodule(f"conv{i}").out_channels for i in (1, 2, 3)] == [32, 64, 64]
    assert all(cnn.get_submodule(f"conv{i}").kernel_size == (5, 5) for i in (1, 2, 3))
    assert all(isinstance(cnn.get_submodule(f"act{i}"), nn.Tanh) for i in (1, 2, 3, 4))
    pool = cnn.pool1
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride) == (3, 2)
    assert build_model("launay_cnn", in_shape=(1, 28, 28)).fc1.in_features == 256
    fc = build_model("launay_fc", in_shape=(3, 32, 32))
    linears = [m for m in fc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (3072, 800), (800, 800), (800, 800), (800, 10),
    ]  # fmt: skip
    assert sum(isinstance(m, nn.Tanh) for m in fc.modules()) == 3
    with pytest.raises(ConfigError, match="at least 15x15"):
        build_model("launay_cnn", in_shape=(1, 8, 8))


def test_launay_grid_options_put_modules_in_the_authors_order() -> None:
    fc = build_model(
        "launay_fc", in_shape=(3, 32, 32), activation="leaky_relu", negative_slope=0.1,
        batch_norm=True, dropout=0.5, input_dropout=0.1,
    )  # fmt: skip
    names = [n for n, _ in fc.named_children()]
    assert names[:6] == ["flatten", "drop0", "fc1", "drop1", "act1", "bn1"]
    assert fc.act1.negative_slope == 0.1 and fc.drop1.p == 0.5 and fc.drop0.p == 0.1
    cnn = build_model(
        "launay_cnn", in_shape=(3, 32, 32), batch_norm=True, dropout=0.5, conv_dropout=0.1,
        input_dropout=0.1, activation="relu",
    )  # fmt: skip
    names = [n for n, _ in cnn.named_children()]
    assert names[:6] == ["drop0", "conv1", "drop1", "act1", "bn1", "pool1"]
    assert isinstance(cnn.drop0, nn.Dropout2d) and isinstance(cnn.drop1, nn.Dropout2d)
    assert isinstance(cnn.drop4, nn.Dropout) and isinstance(cnn.bn4, nn.BatchNorm1d)
    assert isinstance(cnn.act4, nn.ReLU)


@pytest.mark.parametrize(
    ("activation", "cls"),
    [("relu", nn.ReLU), ("tanh", nn.Tanh), ("leaky_relu", nn.LeakyReLU), ("sigmoid", nn.Sigmoid)],
)
def test_mlp_options(activation: str, cls: type[nn.Module]) -> None:
    model = build_model(
        "mlp", in_shape=(2, 3, 4), widths=(16, 8, 4), activation=activation, negative_slope=0.3,
        batch_norm=True, dropout=0.25,
    )  # fmt: skip
    kinds = [type(m) for m in model.children()]
    assert kinds == [nn.Flatten] + [nn.Linear, nn.BatchNorm1d, cls, nn.Dropout] * 3 + [nn.Linear]
    assert model.fc1.in_features == 24 and model.out.in_features == 4
    if activation == "leaky_relu":
        assert model.act1.negative_slope == 0.3
    assert model(torch.randn(5, 2, 3, 4)).shape == (5, 10)
    plain = build_model("mlp", in_shape=(10,), widths=())
    assert [type(m) for m in plain.children()] == [nn.Flatten, nn.Linear]


@settings(max_examples=15, deadline=None)
@given(
    in_shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    widths=st.lists(st.integers(1, 12), max_size=3),
    classes=st.integers(1, 6),
    batch=st.integers(1, 4),
)
def test_mlp_flattens_any_input(
    in_shape: list[int], widths: list[int], classes: int, batch: int
) -> None:
    model = build_model("mlp", in_shape=in_shape, widths=widths, classes=classes)
    assert model(torch.randn(batch, *in_shape)).shape == (batch, classes)
    first = model.fc1 if widths else model.out
    assert first.in_features == math.prod(in_shape)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_xavier_and_kaiming_init() -> None:
    torch.manual_seed(1)
    model = build_model("lenet", in_shape=(1, 28, 28), init="xavier")
    for m in _layers(model):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert m.weight.abs().max() <= bound
        assert m.weight.abs().max() > 0.9 * bound  # uniform up to the bound, not PyTorch's default
        assert torch.count_nonzero(m.bias) == 0
    model = build_model("launay_fc", in_shape=(3, 32, 32), init="kaiming")
    w = model.fc2.weight
    assert abs(w.std().item() - math.sqrt(2 / 800)) < 0.05 * math.sqrt(2 / 800)
    assert torch.count_nonzero(model.fc2.bias) == 0
    default = build_model("lenet", in_shape=(1, 28, 28))
    assert torch.count_nonzero(default.fc1.bias) > 0


def test_option_a_shortcut_has_no_parameters_and_pads_channels() -> None:
    model = build_model("resnet20", in_shape=(3, 8, 8))
    block = model.layer2[0]
    assert n_params(block.shortcut) == 0
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0
    proj = build_model("resnet20", shortcut="B").layer3[0].shortcut
    assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1)


def test_zero_init_residual_makes_blocks_start_as_identity() -> None:
    model = build_model("resnet18", in_shape=(3, 32, 32), zero_init_residual=True).eval()
    block = model.layer1[0]
    x = torch.rand(1, 64, 8, 8)
    assert torch.equal(block(x), torch.relu(x))
    cifar = build_model("resnet20", zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in cifar.modules() if hasattr(b, "bn2"))
    assert all(torch.count_nonzero(b.bn1.weight) == 16 for b in cifar.layer1)
    # the same on bottleneck blocks (a one-block ResNet keeps the test fast)
    deep = ResNet(Bottleneck, (1, 0, 0, 0), (3, 32, 32), zero_init_residual=True).eval()
    block = deep.layer1[0]
    assert torch.count_nonzero(block.bn3.weight) == 0 and torch.count_nonzero(block.bn2.weight)
    x = torch.rand(1, 64, 8, 8)
    assert torch.equal(block(x), torch.relu(block.shortcut(x)))


def test_bottleneck_stride_placement() -> None:
    with torch.device("meta"):
        v15 = build_model("resnet50", in_shape=(3, 32, 32)).layer2[0]
        paper = build_model("resnet50", in_shape=(3, 32, 32), stride_in_1x1=True).layer2[0]
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))
    assert (paper.conv1.stride, paper.conv2.stride) == ((2, 2), (1, 1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "lenet5"}, "did you mean 'lenet'"),
        ({"name": "mlp", "width": (3,)}, "did you mean 'widths'"),
        ({"name": "mlp", "activation": "swish"}, "unknown activation 'swish'"),
        ({"name": "mlp", "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"name": "mlp", "init": "orthogonal"}, "unknown init"),
        ({"name": "mlp", "classes": 0}, "classes must be"),
        ({"name": "resnet20", "shortcut": "C"}, "shortcut must be"),
        ({"name": "resnet20", "in_shape": (32, 32)}, r"needs images: in_shape=\(C, H, W\)"),
        ({"name": "lenet", "pool": "min"}, "pool must be"),
        ({"name": "launay_cnn", "channels": (32, 64)}, "three positive sizes"),
    ],
)
def test_bad_arguments_raise_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(**kwargs)  # type: ignore[arg-type]


def test_model_options_lists_the_defaults() -> None:
    assert model_options("launay_fc")["activation"] == "tanh"
    assert model_options("launay_cnn")["channels"] == (32, 64, 64)
    assert model_options("resnet20")["shortcut"] == "A"
    assert model_options("lenet")["init"] == "default"
    assert set(model_options("mlp")) == {
        "widths", "activation", "negative_slope", "batch_norm", "dropout", "init",
    }  # fmt: skip
    with torch.device("meta"):
        for name in MODELS:
            build_model(name, in_shape=SMALL[name], **model_options(name))


def _step(model: nn.Module, rule: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One plain SGD step; returns the loss. Checks that no gradient or weight is non-finite."""
    if getattr(biograd.get_rule(rule), "needs_targets", False):
        biograd.set_targets(model, y)
    loss = nn.functional.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), name
                p.sub_(0.1 * p.grad)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return loss.detach()


@pytest.mark.parametrize("rule", ["fa", "dfa"])
@pytest.mark.parametrize("name", MODELS)
def test_conversion_keeps_outputs_and_trains(name: str, rule: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_shape=SMALL[name], classes=5).eval()
    x, y = torch.randn(2, *SMALL[name]), torch.tensor([0, 4])
    with torch.no_grad():
        before = model(x)
    biograd.convert(model, rule, seed=3, example_input=x)
    n_layers = len(_layers(model))
    assert len(list(biograd.converted_layers(model))) == n_layers
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    model.train()
    first = _layers(model)[0].weight
    assert torch.isfinite(_step(model, rule, x, y))
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("rule", biograd.RULES)
@pytest.mark.parametrize("name", list(FAMILY))
def test_one_training_step_with_every_rule(name: str, rule: str) -> None:
    torch.manual_seed(0)
    shape = SMALL[name]
    model = build_model(name, in_shape=shape, classes=4, init="xavier", **FAMILY[name])
    x, y = torch.randn(8, *shape), torch.randint(0, 4, (8,))
    biograd.convert(model, rule, seed=1, example_input=x)
    out_layer = _layers(model)[-1]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _step(model, rule, x, y)
    assert torch.isfinite(loss)
    assert out_layer.weight.grad is not None and out_layer.weight.grad.abs().sum() > 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    if rule != "shallow":
        # every converted layer learns (the first layer too: it is below a feedback point)
        for n, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                assert f"{n}.weight" in changed, (n, rule)
