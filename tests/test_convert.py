"""``biograd.convert`` on real architectures (residual CNN, Conv1d model, transformer-style model
with attention), its options, its report, and ``exact``/``feedback_weight``."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import biograd
from biograd.nn.layers import FeedbackLayer

FAMILY = ("bp", "fa", "usf", "frsf", "brsf", "kp")


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding="same", bias=False, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResCNN(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.ModuleList([Block(8, 8, 1), Block(8, 16, 2)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.ModuleDict({"fc": nn.Linear(16, classes)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.heads["fc"](self.pool(x).flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 6, 5, padding=2, padding_mode="circular"),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(6, 8, 3, dilation=2, groups=2),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8 * 6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = self.norm1(h + self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(h + self.mlp(h))  # Linear on (batch, time, features)
        return self.head(h.mean(1))


MODELS = {
    "rescnn": (ResCNN, lambda: torch.randn(4, 3, 8, 8)),
    "conv1d": (Conv1dNet, lambda: torch.randn(4, 2, 20)),
    "transformer": (TinyTransformer, lambda: torch.randint(0, 11, (4, 7))),
}
TORCH_CLASSES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _make(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    cls, data = MODELS[name]
    return cls(), data()


def _layer_classes(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, TORCH_CLASSES)}


@pytest.mark.parametrize("rule", biograd.RULES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_conversion_keeps_outputs_weights_and_classes(model_name: str, rule: str) -> None:
    model, x = _make(model_name)
    model.eval()  # batch norm in eval mode: the forward pass has no side effects
    before = model(x)
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    classes = _layer_classes(model)
    biograd.convert(model, rule, seed=1, example_input=x)
    if rule == "drtp":
        biograd.set_targets(model, torch.zeros(len(x), dtype=torch.long))
    assert torch.equal(model(x), before)
    now = dict(model.named_parameters())
    for n, (p, value) in params.items():
        assert now[n] is p  # the same Parameter objects: an optimizer built before still holds them
        assert torch.equal(p, value)
    for n, m in model.named_modules():
        if n in classes:
            assert isinstance(m, classes[n]), n
    converted = dict(biograd.converted_layers(model))
    assert converted and all(m.feedback_rule == rule for m in converted.values())


@pytest.mark.parametrize("rule", [r for r in FAMILY if r != "bp"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_trains_end_to_end_and_b_equal_w_is_backprop(model_name: str, rule: str) -> None:
    model, x = _make(model_name)
    biograd.convert(model, rule)
    with torch.no_grad():
        for _, layer in biograd.converted_layers(model):
            if rule in ("fa", "kp"):
                layer.rule.feedback.copy_(layer.weight)
            else:
                layer.weight.copy_(layer.rule.matrix(layer.weight, *layer.rule.pass_state(False)))
    reference = biograd.convert(copy.deepcopy(model), "bp")
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if not n.endswith("feedback"):
            assert p.grad is not None, n
            assert torch.equal(p.grad, ref[n].grad), n


def test_report_lists_exact_layers() -> None:
    model, _ = _make("rescnn")
    biograd.convert(model, "fa")
    report = biograd.conversion_report(model)
    assert report.converted["heads.fc"] == "fa"
    assert report.converted["layers.1.shortcut.0"] == "fa"
    assert len(report.converted) == 7
    for name in ("stem.1", "layers.0.bn1", "layers.1.shortcut.1", "pool"):
        assert name in report.exact
    text = str(report)
    assert "heads.fc" in text and "BatchNorm2d" in text and "AdaptiveAvgPool2d" in text

    model, _ = _make("transformer")
    biograd.convert(model, "fa")
    report = biograd.conversion_report(model)
    assert set(report.converted) == {"mlp.0", "mlp.2", "head"}
    assert "MultiheadAttention" in report.exact["attn.out_proj"]
    assert "attn" in report.exact and "embed" in report.exact and "norm1" in report.exact
    assert not isinstance(model.attn.out_proj, FeedbackLayer)

    model, _ = _make("conv1d")
    biograd.convert(model, "fa")
    assert "features.2" in biograd.conversion_report(model).exact  # MaxPool1d


def test_report_is_logged_and_printed(caplog, capsys) -> None:
    with caplog.at_level(logging.INFO, logger="biograd"):
        biograd.convert(Conv1dNet(), "usf", verbose=True)
    assert "converted 3 layer(s)" in caplog.text
    assert "features.0" in capsys.readouterr().out


def test_overrides_by_name_and_glob_and_exclude() -> None:
    model, x = _make("rescnn")
    biograd.convert(
        model,
        "fa",
        overrides={"heads.fc": "bp", "layers.1.*": "kp", "stem.0": "brsf"},
        exclude=["layers.0.conv2"],
    )
    rules = {n: m.feedback_rule for n, m in biograd.converted_layers(model)}
    assert rules["heads.fc"] == "bp"
    assert rules["stem.0"] == "brsf"
    assert rules["layers.0.conv1"] == "fa"
    assert rules["layers.1.conv1"] == rules["layers.1.shortcut.0"] == "kp"
    assert "layers.0.conv2" not in rules
    assert type(model.layers[0].conv2) is nn.Conv2d
    assert "excluded" in biograd.conversion_report(model).exact["layers.0.conv2"]
    model(x).sum().backward()
    assert model.layers[0].conv2.weight.grad is not None

    with pytest.warns(UserWarning, match="'nope' matches no convertible layer"):
        biograd.convert(model, "fa", overrides={"nope": "bp"})


def test_converting_again_and_back_to_bp() -> None:
    model, x = _make("rescnn")
    plain = copy.deepcopy(model)
    biograd.convert(model, "fa", seed=3)
    b_first = biograd.feedback_weight(model.heads["fc"]).clone()
    biograd.convert(model, "kp")
    assert any(n.endswith("feedback") for n, _ in model.named_parameters())
    biograd.convert(model, "usf")
    assert not any("feedback" in n for n, _ in model.named_parameters())
    assert all(not k.endswith(".feedback") for k in model.state_dict())
    biograd.convert(model, "dfa", example_input=x)
    assert any("direct_feedback" in n for n, _ in model.named_modules())
    biograd.convert(model, "fa", seed=3)
    assert not any("direct_feedback" in n for n, _ in model.named_modules())
    assert torch.equal(biograd.feedback_weight(model.heads["fc"]), b_first)

    biograd.convert(model, "bp")
    out, ref = model(x), plain(x)
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    grads = dict(plain.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n].grad), n
    assert set(model.state_dict()) == set(plain.state_dict())


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown rule 'feedback'; available rules: bp, fa"):
        biograd.convert(ResCNN(), "feedback")
    with pytest.raises(ValueError, match="available rules"):
        biograd.convert(ResCNN(), "fa", overrides={"heads.fc": "backprop"})
    with pytest.raises(ValueError, match="nothing to convert in Sequential"):
        biograd.convert(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "fa")
    model = biograd.convert(Conv1dNet(), "fa")
    with pytest.raises(ValueError, match="nothing to convert"):
        biograd.convert(model, "usf", exclude=["*"])
    assert model.fc.feedback_rule == "fa"  # a failed conversion leaves the model as it was
    with pytest.raises(ValueError, match="output layer 'features'"):
        biograd.convert(model, "dfa", output="features")
    assert model.fc.feedback_rule == "fa"


def test_exact_context_gives_backprop_and_restores() -> None:
    model, x = _make("conv1d")
    plain = copy.deepcopy(model)
    biograd.convert(model, "fa")
    with biograd.exact(model):
        model(x).sum().backward()
    plain(x).sum().backward()
    grads = dict(plain.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n].grad)
    assert not model.fc.feedback_exact
    model.zero_grad()
    with pytest.raises(KeyError), biograd.exact(model):
        assert model.fc.feedback_exact
        raise KeyError
    assert not model.fc.feedback_exact
    model(x).sum().backward()
    assert not torch.equal(model.features[0].weight.grad, grads["features.0.weight"].grad)


def test_exact_context_for_direct_rules() -> None:
    model, x = _make("conv1d")
    plain = copy.deepcopy(model)
    biograd.convert(model, "dfa", example_input=x)
    with biograd.exact(model):
        model(x).sum().backward()
    plain(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_feedback_weight() -> None:
    model, x = _make("conv1d")
    with pytest.raises(TypeError, match="not a converted layer"):
        biograd.feedback_weight(model.fc)
    biograd.convert(model, "fa", overrides={"fc": "bp"})
    assert biograd.feedback_weight(model.fc) is not None
    assert torch.equal(biograd.feedback_weight(model.fc), model.fc.weight)
    b = biograd.feedback_weight(model.features[0])
    assert b.shape == model.features[0].weight.shape and not b.requires_grad
    assert not torch.equal(b, model.features[0].weight)

    biograd.convert(model, "dfa", example_input=x)
    # the matrix that trains a layer: (features where its output meets a feedback point, outputs)
    assert biograd.feedback_weight(model.features[0]).shape == (6 * 10, 4)
    assert biograd.feedback_weight(model.features[3]).shape == (48, 4)
    assert biograd.feedback_weight(model.fc) is None  # the output layer: the true error


def test_user_subclass_with_stock_forward_converts() -> None:
    class Scaled(nn.Linear):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(a, b)
            self.tag = "mine"

    class Custom(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(Scaled(4, 5), nn.ReLU(), Custom(5, 3))
    x = torch.randn(2, 4)
    before = model(x)
    biograd.convert(model, "fa")
    assert isinstance(model[0], Scaled) and isinstance(model[0], FeedbackLayer)
    assert model[0].tag == "mine"
    assert type(model[2]) is Custom
    assert "overrides forward" in biograd.conversion_report(model).exact["2"]
    assert torch.equal(model(x), before)
    biograd.convert(model, "bp")
    assert isinstance(model[0], Scaled) and model[0].feedback_rule == "bp"
    assert type(model[0]).__mro__[2] is Scaled  # converting again does not stack subclasses


@pytest.mark.parametrize("rule", ["fa", "brsf", "kp"])
def test_deepcopy_of_converted_model(rule: str) -> None:
    model, x = _make("rescnn")
    biograd.convert(model, rule)
    model(x).sum().backward()
    twin = copy.deepcopy(model)
    model.zero_grad()
    twin.zero_grad()
    model(x).sum().backward()
    twin(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p is not q
        assert torch.equal(p.grad, q.grad), n
    for (_, a), (_, b) in zip(biograd.converted_layers(model), biograd.converted_layers(twin)):
        assert torch.equal(biograd.feedback_weight(a), biograd.feedback_weight(b))
        assert a.rule.name == b.rule.name == rule


def test_root_module_and_containers() -> None:
    layer = biograd.convert(nn.Linear(3, 2), "fa")
    assert biograd.conversion_report(layer).converted == {"<root>": "fa"}
    dictionary = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.ModuleList([nn.Conv3d(1, 2, 2)])})
    biograd.convert(dictionary, "usf")
    assert isinstance(dictionary["b"][0], FeedbackLayer)
    out = dictionary["b"][0](torch.randn(1, 1, 3, 3, 3, requires_grad=True))
    out.sum().backward()
    assert dictionary["b"][0].weight.grad is not None


def test_parametrized_and_library_layers() -> None:
    from torch.nn.utils import parametrizations

    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    before = model(x)
    biograd.convert(model, "fa")
    assert torch.equal(model(x), before)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 8)
    before = encoder(x)
    biograd.convert(encoder, "usf")
    assert set(biograd.conversion_report(encoder).converted) == {"linear1", "linear2"}
    out = encoder(x)
    assert torch.equal(out, before)
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_lazy_layers_need_a_forward_pass_first() -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="uninitialised"):
        biograd.convert(model, "fa")
    assert not any(isinstance(m, FeedbackLayer) for m in model.modules())
    model(torch.randn(2, 4))
    biograd.convert(model, "fa")
    assert isinstance(model[0], nn.Linear) and model[0].feedback_rule == "fa"


def test_converting_back_from_a_direct_rule_forgets_its_feedback_points() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    biograd.convert(model, "dfa")
    assert biograd.conversion_report(model).feedback_points
    biograd.convert(model, "fa")
    assert biograd.conversion_report(model).feedback_points == []
