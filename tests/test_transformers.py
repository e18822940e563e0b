"""biograd on tiny randomly initialised transformers models (no download): every linear-like layer
converted (GPT-2's Conv1D included) or reported, fa's input gradients through B, dfa training
every layer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import biograd

transformers = pytest.importorskip("transformers")
import tiny_hf  # noqa: E402

VOCAB, SEQ, N = 64, 6, 3


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    return tiny_hf.bert(VOCAB, 16)


def _llama() -> nn.Module:
    return tiny_hf.llama(VOCAB, 16)


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


def _batch(kind: str) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (N, SEQ))
    if kind in ("gpt2", "llama"):
        return {"input_ids": ids, "labels": ids}
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.arange(N) % 3}
    if kind == "t5":  # source and target of different lengths
        return {"input_ids": ids, "labels": torch.randint(0, VOCAB, (N, SEQ - 2))}
    return {"pixel_values": torch.randn(N, 3, 8, 8), "labels": torch.arange(N) % 3}


MODELS = {"gpt2": _gpt2, "bert": _bert, "llama": _llama, "t5": _t5, "vit": _vit}


def _converted(kind: str, rule: str) -> nn.Module:
    """``kind`` converted to ``rule`` with the defaults (direct rules: rows by position)."""
    return biograd.convert(MODELS[kind](), rule, seed=1)


def direct(rule: str) -> bool:
    return biograd.get_rule(rule).direct


def _matrices(model: nn.Module) -> list[str]:
    """Modules with a weight matrix that carries an error down (embedding tables aside)."""
    return [
        n
        for n, m in model.named_modules()
        if not isinstance(m, (nn.Embedding, biograd.rules.Rule))
        and any(k.endswith("weight") and p.dim() >= 2 for k, p in m.named_parameters(recurse=False))
    ]


@pytest.mark.parametrize("rule", ["fa", "dfa"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_every_linear_like_layer_of_a_transformer_converts(kind: str, rule: str) -> None:
    model = _converted(kind, rule)
    report = biograd.conversion_report(model)
    assert report.unconverted_matrices == []
    assert set(_matrices(model)) == set(report.converted)


def test_unconverted_weight_matrices_are_warned_about() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.mixer_weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: Tensor) -> Tensor:
            return self.proj(x) @ self.mixer_weight

    with pytest.warns(UserWarning, match="weight matrix but were not converted.*<root>"):
        biograd.convert(Odd(), "fa")


@pytest.mark.parametrize("kind", list(MODELS))
def test_fa_input_gradient_of_every_layer_is_delta_times_b(kind: str) -> None:
    model = _converted(kind, "fa")
    seen: dict[str, dict[str, Tensor]] = {}

    def pre(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            x = args[0]
            if not x.requires_grad:  # the model's input (ViT's patch embedding)
                return None
            x = x.view_as(x)  # its own node: the gradient of this layer's input alone
            x.register_hook(lambda g: seen[name].__setitem__("dx", g))
            return (x, *args[1:])

        return hook

    def post(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            seen[name] = {}
            out.register_hook(lambda g: seen[name].__setitem__("delta", g))

        return hook

    layers = dict(biograd.converted_layers(model))
    for name, layer in layers.items():
        layer.register_forward_hook(post(name))
        layer.register_forward_pre_hook(pre(name))
    model(**_batch(kind)).loss.backward()
    checked = 0
    for name, layer in layers.items():
        got = seen.get(name, {})
        if "dx" not in got or isinstance(layer, nn.modules.conv._ConvNd):
            continue
        b, w = biograd.feedback_weight(layer), layer.weight.detach()
        if type(layer).__name__ == "FeedbackConv1D":  # (in, out) layout: y = x W + b
            b, w = b.t(), w.t()
        torch.testing.assert_close(got["dx"], got["delta"] @ b, msg=name)
        assert not torch.allclose(got["dx"], got["delta"] @ w, atol=1e-6), name
        checked += 1
    assert checked >= len(layers) - 2


@pytest.mark.parametrize("kind", list(MODELS))
def test_dfa_trains_every_layer_of_a_transformer(kind: str) -> None:
    model = _converted(kind, "dfa")
    batch = _batch(kind)
    model(**batch).loss.backward()
    rule = {n: m.weight.grad.clone() for n, m in biograd.converted_layers(model)}
    model.zero_grad()
    with biograd.exact(model):
        model(**batch).loss.backward()
    bp = {n: m.weight.grad.clone() for n, m in biograd.converted_layers(model)}
    output = biograd.conversion_report(model).output
    modules = dict(model.named_modules())
    tied = any(  # the output layer's weight is also an embedding table (gpt2, t5)
        getattr(m, "weight", None) is modules[output].weight
        for n, m in modules.items()
        if n != output
    )
    for name, g in rule.items():
        assert g.abs().sum() > 0, f"{name} got no gradient"
        if name == output and not tied:
            torch.testing.assert_close(g, bp[name])  # the output layer: the true error
    assert any(not torch.allclose(rule[n], bp[n]) for n in rule if n != output)


@pytest.mark.parametrize("rule", ["fa", "brsf", "kp", "dfa"])
def test_resized_tied_output_layer(rule: str) -> None:
    """``resize_token_embeddings`` after conversion: GPT-2's lm_head shares the new, larger
    embedding matrix; fixed feedback follows its shape, learned (kp) or direct feedback raise
    one clear error at the next forward."""
    model = _converted("gpt2", rule)
    batch = _batch("gpt2")
    model(**batch).loss.backward()
    model.resize_token_embeddings(VOCAB + 8)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    model.zero_grad()
    if rule == "kp":
        with pytest.raises(biograd.nn.layers.WeightShapeError, match="convert the model again"):
            model(**batch)
    elif rule == "dfa":
        with pytest.raises(biograd.direct.FeedbackError, match="after resizing"):
            model(**batch)
    else:
        model(**batch).loss.backward()
        assert biograd.feedback_weight(model.lm_head).shape == (VOCAB + 8, 16)
        assert model.transformer.h[0].mlp.c_fc.weight.grad is not None


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize(
    ("kind", "rule"), [("llama", "dfa"), ("llama", "brsf"), ("bert", "dfa"), ("t5", "dfa")]
)
def test_hf_gradient_checkpointing_gives_the_same_gradients(
    kind: str, rule: str, reentrant: bool
) -> None:
    """Per-token (llama) and pooled points (bert; t5's encoder, source longer than target)."""
    batch = _batch(kind)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(5)
        model = _converted(kind, rule)
        model.train()
        if checkpointed:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        for _ in range(2):  # brsf: the second step's draw too
            model.zero_grad()
            model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert grads[1][name] is not None, f"{name} got no gradient"
        torch.testing.assert_close(grads[1][name], g, msg=name)


# --------------------------------------------------------------------------- dfa by position
@pytest.mark.parametrize(
    ("kind", "layer", "pooled"),
    [
        ("gpt2", "transformer.h.0.mlp.c_proj", False),
        ("llama", "model.layers.0.mlp.down_proj", False),
        ("t5", "decoder.block.0.layer.2.DenseReluDense.wo", False),
        ("t5", "encoder.block.0.layer.1.DenseReluDense.wo", True),
        ("bert", "bert.encoder.layer.0.output.dense", True),
        ("vit", "vit.layers.0.mlp.fc2", True),
    ],
)
def test_dfa_defaults_project_each_positions_error_or_the_samples_pooled_one(
    kind: str, layer: str, pooled: bool
) -> None:
    """``convert(model, "dfa")`` with the defaults: the input ``(N, P, d)`` of a linear layer
    has ``B`` of shape ``(d, C)``; where its positions are the output's (causal LMs, T5's
    decoder) its gradient at position t is ``B e_t``, elsewhere (a classifier's ``(N, C)``
    output, T5's encoder against a shorter target) ``B sum_t e_t`` at every position."""
    model = MODELS[kind]()
    seen: list[Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...]) -> None:
        args[0].retain_grad()
        seen.append(args[0])

    dict(model.named_modules())[layer].register_forward_pre_hook(keep)  # runs before biograd's
    biograd.convert(model, "dfa", seed=1)
    out = model(**_batch(kind))
    out.logits.retain_grad()
    out.loss.backward()
    (x,) = seen
    e, b = out.logits.grad, model.get_submodule(biograd.conversion_report(model).output)
    b = b.direct_feedback.matrix(layer)
    assert b.shape == (x.shape[-1], e.shape[-1])
    if pooled:
        e = e.reshape(e.shape[0], -1, e.shape[-1]).sum(1)
        want = (e @ b.T).unsqueeze(1).expand(x.shape)
    else:
        want = e @ b.T
    torch.testing.assert_close(x.grad, want)


def test_bert_under_dfa_takes_sequences_of_two_lengths() -> None:
    """One ``(d, C)`` matrix per point serves every sequence length (no ``example_input``)."""
    model = _converted("bert", "dfa")
    engine = model.classifier.direct_feedback
    for seq in (SEQ, SEQ + 4):
        model.zero_grad()
        batch = {"input_ids": torch.randint(0, VOCAB, (N, seq)), "labels": torch.arange(N) % 3}
        model(**batch).loss.backward()
        if seq == SEQ:
            first = {k: engine.matrix(k).clone() for k in engine.sizes}
        assert set(engine.sizes.values()) == {16, 32} and engine.classes == 3
        for name, m in biograd.converted_layers(model):
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name
    assert all(torch.equal(engine.matrix(k), b) for k, b in first.items())
