"""Rule state is registered tensors only: it saves and loads with torch.save, safetensors and
Hugging Face ``save_pretrained``/``from_pretrained``, comes out right from the meta device, goes
away with ``unconvert``, survives pickle and deepcopy; rule layers go straight into model code."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import biograd
from biograd import distributed
from biograd.direct import FeedbackError

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

FAMILY = ("bp", "fa", "usf", "frsf", "brsf", "kp")


class MyLinear(nn.Linear):
    """A user subclass with the stock forward (module level, so that pickle finds it)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(a, b)
        self.tag = "mine"


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), MyLinear(6 * 2 * 2, 3),
    )  # fmt: skip


def images(n: int = 4) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def logits(out: object) -> Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[attr-defined, return-value]


def train(model: nn.Module, inputs: dict[str, Tensor] | Tensor, y: Tensor, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    for _ in range(steps):
        if biograd.needs_targets(model):
            biograd.set_targets(model, y)
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        opt.zero_grad()
        F.cross_entropy(logits(out), y).backward()
        opt.step()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("rule", biograd.RULES)
def test_state_dict_is_tensors_and_nothing_is_stashed(rule: str) -> None:
    model = biograd.convert(cnn(), rule, seed=1)
    train(model, *images())
    state = model.state_dict()
    assert state and all(isinstance(v, Tensor) for v in state.values())
    assert not any(k.endswith("_extra_state") for k in state)
    for m in model.modules():
        assert not {"_rule", "_engine", "_last_feedback", "_feedback_generators"} & set(vars(m))
    assert "_biograd" not in vars(model)


@pytest.mark.parametrize("rule", biograd.RULES)
def test_safetensors_round_trip(rule: str, tmp_path) -> None:
    model = biograd.convert(cnn(), rule, seed=1)
    train(model, *images())
    safetensors_torch.save_file(model.state_dict(), tmp_path / "a.safetensors")
    safetensors_torch.save_model(model, str(tmp_path / "b.safetensors"))
    for load in ("file", "model"):
        fresh = biograd.convert(cnn(), rule, seed=2)  # never ran: direct feedback not drawn yet
        if load == "file":
            fresh.load_state_dict(safetensors_torch.load_file(tmp_path / "a.safetensors"))
        else:
            safetensors_torch.load_model(fresh, str(tmp_path / "b.safetensors"))
        assert_same_state(model, fresh)
        x, y = images(5)
        ref = copy.deepcopy(model)
        train(ref, x, y, steps=1)
        train(fresh, x, y, steps=1)  # brsf: the same next draw; kp: the same learned B
        assert_same_state(ref, fresh)


def tiny_bert() -> tuple[object, dict[str, Tensor]]:
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=12, num_labels=3,
    )  # fmt: skip
    ids = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(0))
    return cfg, {"input_ids": ids}


def tiny_vit() -> tuple[object, dict[str, Tensor]]:
    cfg = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=24, num_labels=3,
    )  # fmt: skip
    return cfg, {"pixel_values": images()[0]}


def converted_bert_class(rule: str) -> type[nn.Module]:
    class Converted(transformers.BertForSequenceClassification):  # type: ignore[misc, name-defined]
        def __init__(self, config: object) -> None:
            super().__init__(config)
            biograd.convert(self, rule, seed=0)

    return Converted


@pytest.mark.parametrize("rule", biograd.RULES)
def test_hugging_face_save_and_from_pretrained(rule: str, tmp_path) -> None:
    torch.manual_seed(0)
    cfg, inputs = tiny_bert()
    cls = converted_bert_class(rule)
    model = cls(cfg)
    y = torch.tensor([0, 1, 2, 0])
    train(model, inputs, y)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    if rule == "kp":
        b = biograd.feedback_weight(model.classifier)
        assert not torch.equal(b, biograd.feedback_weight(cls(cfg).classifier))  # B learned
        assert torch.equal(biograd.feedback_weight(loaded.classifier), b)
    if rule == "brsf":
        assert int(loaded.classifier.rule.step) == int(model.classifier.rule.step) == 2
    if biograd.get_rule(rule).direct:
        # from_pretrained keeps only the keys of a model that has not run: direct feedback is
        # drawn again, identically, from the seed at the first forward pass
        loaded.eval()(**inputs)
    assert_same_state(model, loaded)
    model.eval()
    assert torch.equal(logits(model(**inputs)), logits(loaded(**inputs)))


@pytest.mark.parametrize("arch", ["cnn", "vit", "bert"])
def test_dfa_trains_without_example_input(arch: str) -> None:
    torch.manual_seed(0)
    if arch == "cnn":
        model: nn.Module = cnn()
        inputs: dict[str, Tensor] | Tensor = images()[0]
    else:
        cfg, inputs = tiny_vit() if arch == "vit" else tiny_bert()
        cls = (
            transformers.ViTForImageClassification
            if arch == "vit"
            else transformers.BertForSequenceClassification
        )
        model = cls(cfg)
    biograd.convert(model, "dfa")
    first = next(m for _, m in biograd.converted_layers(model))
    before = first.weight.detach().clone()
    train(model, inputs, torch.tensor([0, 1, 2, 0]), steps=2)
    assert not torch.equal(first.weight, before)  # the hidden layers learn
    assert biograd.conversion_report(model).feedback_points
    layers = [m for _, m in biograd.converted_layers(model)]
    assert sum(biograd.feedback_weight(m) is not None for m in layers) >= 2


@pytest.mark.parametrize("rule", [*FAMILY, "dfa"])
def test_meta_build_gives_the_feedback_of_a_cpu_build(rule: str) -> None:
    torch.manual_seed(0)
    ref = biograd.convert(cnn(), rule, seed=4)
    with torch.device("meta"):
        model = biograd.convert(cnn(), rule, seed=4)
    model.to_empty(device="cpu")
    biograd.load_plain(model, biograd.plain_state_dict(ref))
    x, y = images()
    train(ref, x, y, steps=1)
    train(model, x, y, steps=1)
    assert_same_state(ref, model)
    for (_, a), (_, b) in zip(biograd.converted_layers(ref), biograd.converted_layers(model)):
        fa, fb = biograd.feedback_weight(a), biograd.feedback_weight(b)
        assert (fa is None and fb is None) or torch.equal(fa, fb)


@pytest.mark.parametrize("rule", biograd.RULES)
def test_unconvert_gives_the_plain_model_back(rule: str) -> None:
    model = cnn()
    classes = [type(m) for m in model.modules()]
    params = list(model.parameters())
    biograd.convert(model, rule, seed=1)
    train(model, *images())
    assert biograd.unconvert(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert not model[0]._forward_pre_hooks and not model._forward_pre_hooks
    fresh = cnn()
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = images(6)[0]
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    fresh(x).sum().backward()  # a plain model: autograd's backprop


def test_load_plain_is_strict_and_keeps_the_feedback() -> None:
    plain = cnn()
    model = biograd.convert(cnn(), "kp", seed=1)
    b = biograd.feedback_weight(model[0]).clone()
    biograd.load_plain(model, plain.state_dict())
    assert torch.equal(model[0].weight, plain[0].weight)
    assert torch.equal(biograd.feedback_weight(model[0]), b)
    partial = {k: v for k, v in plain.state_dict().items() if k != "0.bias"}
    with pytest.raises(RuntimeError, match=r"0\.bias"):
        biograd.load_plain(model, partial)
    with pytest.raises(RuntimeError, match="rule state"):
        biograd.load_plain(model, model.state_dict())
    with pytest.raises(RuntimeError, match=r"another rule|Missing"):
        biograd.convert(cnn(), "usf").load_state_dict(model.state_dict())


@pytest.mark.parametrize("rule", ["fa", "brsf", "kp", "dfa"])
def test_pickle_and_deepcopy_of_a_converted_user_subclass(rule: str) -> None:
    model = biograd.convert(cnn(), rule, seed=1)
    train(model, *images())
    model.eval()  # batch norm statistics stay as they are
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert isinstance(twin[7], MyLinear) and twin[7].tag == "mine"
        assert_same_state(model, twin)
        x, y = images(5)
        for m in (model, twin):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert p is not q and torch.equal(p.grad, q.grad)


def test_rule_layers_in_model_code() -> None:
    torch.manual_seed(0)
    layer = biograd.nn.Linear(5, 3, rule="fa", seed=7)
    assert isinstance(layer, nn.Linear) and layer.feedback_rule == "fa"
    x = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 3)
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ layer.rule.feedback)
    plain = biograd.nn.Linear(5, 3)  # rule "bp": torch's own layer
    assert plain.feedback_rule == "bp" and set(plain.state_dict()) == {"weight", "bias"}
    for cls, shape in ((biograd.nn.Conv1d, (2, 2, 9)), (biograd.nn.Conv2d, (2, 2, 9, 9)),
                       (biograd.nn.Conv3d, (2, 2, 5, 5, 5))):  # fmt: skip
        conv = cls(2, 4, 3, padding=1, bias=False, rule="usf", scale="xiao")
        assert isinstance(conv, nn.modules.conv._ConvNd) and conv.bias is None
        conv(torch.randn(shape)).sum().backward()
        b = biograd.feedback_weight(conv)
        assert torch.equal(torch.sign(b), torch.sign(conv.weight.detach()))
    with pytest.raises(ValueError, match=r"biograd\.convert"):
        biograd.nn.Linear(3, 2, rule="dfa")
    model = nn.Sequential(biograd.nn.Linear(4, 6, rule="kp", seed=0), nn.ReLU(), nn.Linear(6, 2))
    assert "0.rule.feedback" in dict(model.named_parameters())


def test_ddp_wrap_refuses_feedback_not_yet_drawn(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    model = biograd.convert(cnn(), "dfa")
    with pytest.raises(FeedbackError, match="first forward pass"):
        distributed.wrap(model)


class ProductFeedback(biograd.rules.Rule):
    """A test rule in the shape of issue 17's pfa: B = P R with P fixed (out x 2) and R learned
    (2 x in, another shape than W), R moved by ``update`` after each optimizer step."""

    name = "test-product"
    learned_feedback = updates_after_step = True
    learned = ("r",)

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        return {
            "p": torch.randn(like.shape[0], 2, generator=g),
            "r": torch.randn(2, like.shape[1], generator=g),
        }

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        p, r = state
        return p @ r

    def update(self, layer: nn.Module) -> None:
        with torch.no_grad():
            self.get_parameter("r").mul_(0.5)


def test_a_rule_with_learned_state_of_its_own_shape_and_a_post_step_update() -> None:
    layer = biograd.nn.Linear(5, 3)
    layer.rule = ProductFeedback(layer.weight, seed=1)
    model = nn.Sequential(layer)
    assert "0.rule.r" in dict(model.named_parameters()) and "0.rule.p" in model.state_dict()
    x = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 3)
    model(x).backward(g)
    b = layer.rule.p @ layer.rule.r
    torch.testing.assert_close(x.grad, g @ b.detach())
    torch.testing.assert_close(biograd.feedback_weight(layer), b.detach())
    biograd.update_feedback(model)
    assert torch.allclose(biograd.feedback_weight(layer), 0.5 * b.detach())


def test_learned_direct_feedback_comes_back_after_from_pretrained(tmp_path) -> None:
    """dkp's B_k are made at the first forward pass, so ``from_pretrained`` (which keeps only the
    keys of a model that has not run) drops them; ``load_rule_state`` brings them back."""
    torch.manual_seed(0)
    cfg, inputs = tiny_bert()
    cls = converted_bert_class("dkp")
    model = cls(cfg)
    model(**inputs)  # the feedback exists: the optimizer gets it
    y = torch.tensor([0, 1, 2, 0])
    train(model, inputs, y)
    model.save_pretrained(tmp_path)
    feedback = {k: v for k, v in model.state_dict().items() if ".direct_feedback." in k}
    assert feedback
    loaded = cls.from_pretrained(tmp_path)
    loaded.eval()(**inputs)
    redrawn = loaded.state_dict()
    assert not all(torch.equal(redrawn[k], v) for k, v in feedback.items())  # learned B lost
    again = cls.from_pretrained(tmp_path)
    keys = biograd.load_rule_state(
        again, safetensors_torch.load_file(tmp_path / "model.safetensors")
    )
    assert set(feedback) <= set(keys)
    assert_same_state(model, again)
    model.eval()
    assert torch.equal(logits(model(**inputs)), logits(again.eval()(**inputs)))
