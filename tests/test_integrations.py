"""biograd inside the tools researchers train with: any model call for the alignment tools, and the
Hugging Face and Lightning callbacks, on tiny randomly initialised transformers (no download)."""

from __future__ import annotations

import csv
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import biograd
from biograd.alignment import NETWORK, AlignmentMonitor, gradient_alignment
from biograd.calls import Call, targets_from_batch

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

import tiny_hf  # noqa: E402
from biograd.integrations import huggingface as bg_hf  # noqa: E402
from biograd.integrations import lightning as bg_pl  # noqa: E402

VOCAB, SEQ, BATCH = 64, 8, 4


def tiny_bert(labels: int = 3) -> nn.Module:
    return tiny_hf.bert(VOCAB, 32, labels)


def tiny_llama() -> nn.Module:
    return tiny_hf.llama(VOCAB, 32)


def cls_batch(n: int = BATCH) -> dict[str, Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (n, SEQ)), "labels": torch.arange(n) % 3}


def lm_batch(n: int = BATCH) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (n, SEQ))
    return {"input_ids": ids, "labels": ids.clone()}


def as_dataset(batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def converted(model: nn.Module, rule: str) -> nn.Module:
    """``model`` on ``rule`` with the defaults (direct rules: BERT's per-sample logits get the
    pooled signal, the causal LMs' per-token logits the per-token one)."""
    return biograd.convert(model, rule)


def assert_same(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for key, value in a[name].items():
            other = b[name][key]
            assert (math.isnan(value) and math.isnan(other)) or value == pytest.approx(
                other, abs=1e-6
            ), (name, key)


# --------------------------------------------------------------------------- any model call
def test_keyword_batch_with_the_loss_the_model_computes() -> None:
    model = converted(tiny_bert(), "fa")
    batch = cls_batch()
    from_output = gradient_alignment(model, None, batch)
    explicit = gradient_alignment(
        model, lambda out, b: F.cross_entropy(out.logits, b["labels"]), batch
    )
    assert_same(from_output, explicit)
    layers = {n for n, _ in biograd.converted_layers(model)}
    assert from_output.keys() == {*layers, NETWORK}
    assert 10 < from_output[NETWORK]["angle"] < 170  # fa's hidden layers: not backprop


def test_keyword_batch_under_bp_is_backprop() -> None:
    model = converted(tiny_bert(), "bp")
    for name, values in gradient_alignment(model, None, cls_batch()).items():
        assert values["angle"] == pytest.approx(0.0, abs=1e-3), name


def test_mixed_positional_and_keyword_call() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x: Tensor, *, scale: float = 1.0) -> Tensor:
            return self.b(torch.tanh(self.a(x))) * scale

    model = biograd.convert(Scaled(), "fa")
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    mixed = gradient_alignment(model, F.cross_entropy, Call(x, scale=2.0), y)
    plain = gradient_alignment(model, lambda out, t: F.cross_entropy(2.0 * out, t), x, y)
    assert_same(mixed, plain)


def test_missing_loss_is_one_clear_error() -> None:
    model = converted(tiny_bert(), "fa")
    batch = cls_batch()
    del batch["labels"]
    with pytest.raises(ValueError, match=r"output\.loss"):
        gradient_alignment(model, None, batch)


def test_drtp_targets_come_from_the_batch() -> None:
    model = converted(tiny_bert(), "drtp")
    batch = cls_batch()
    from_batch = gradient_alignment(model, None, batch)
    given = gradient_alignment(
        model, lambda out, y: F.cross_entropy(out.logits, y), {"input_ids": batch["input_ids"]},
        batch["labels"],
    )  # fmt: skip
    assert_same(from_batch, given)
    assert math.isfinite(from_batch["bert.pooler.dense"]["angle"])


def test_targets_from_batch_trains_drtp_without_a_custom_loss() -> None:
    model = converted(tiny_bert(), "drtp")
    batch = cls_batch()
    with pytest.raises(biograd.direct.FeedbackError, match="targets"):
        model(**batch).loss.backward()
    handle = targets_from_batch(model)
    model.zero_grad()
    model(**batch).loss.backward()
    assert model.bert.pooler.dense.weight.grad.abs().sum() > 0
    handle.remove()


@pytest.mark.parametrize("reuse", [False, True])
def test_monitor_on_keyword_batches(reuse: bool) -> None:
    model = converted(tiny_bert(), "fa")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = AlignmentMonitor(model, every=1, reuse_step=reuse)
    rows = []
    expected = []
    for step in range(2):
        batch = cls_batch()
        expected.append(gradient_alignment(model, None, batch))
        rows += monitor.maybe_measure(step, 0, batch)
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    rows += monitor.flush()
    for step in range(2):
        got = {r["layer"]: r for r in rows if r["kind"] == "gradient" and r["step"] == step}
        assert got.keys() == expected[step].keys()
        for layer, values in expected[step].items():
            assert got[layer]["angle"] == pytest.approx(values["angle"], abs=1e-4), layer


# --------------------------------------------------------------------------- Hugging Face Trainer
def hf_train(
    model: nn.Module, batch: dict[str, Tensor], tmp_path: Any, callback: Any = None, steps: int = 3
) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=1e-2, report_to=[], logging_steps=1, use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=as_dataset(batch))
    if callback is not None:
        callback.attach(trainer)
    trainer.train()
    return trainer


def hidden_weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: m.weight.detach().clone() for n, m in biograd.converted_layers(model)}


@pytest.mark.parametrize(("make", "rule"), [(tiny_bert, "fa"), (tiny_llama, "dfa")])
def test_hf_trainer_step_logs_alignment(make: Any, rule: str, tmp_path: Any) -> None:
    batch = cls_batch(8) if make is tiny_bert else lm_batch(8)
    model = converted(make(), rule)
    before = hidden_weights(model)
    callback = bg_hf.AlignmentCallback(every=2, csv_path=tmp_path / "alignment.csv")
    trainer = hf_train(model, batch, tmp_path, callback)
    for name, w in hidden_weights(model).items():
        assert not torch.equal(w, before[name]), f"{name} did not learn"
    logged = [h for h in trainer.state.log_history if any(k.startswith("alignment/") for k in h)]
    assert [h["step"] for h in logged] == [2]
    layers = [n for n, _ in biograd.converted_layers(model)]
    for name in layers[:-1]:  # every hidden layer has a gradient row, finite
        assert math.isfinite(logged[0][f"alignment/gradient_angle/{name}"])
    assert {r["layer"] for r in callback.rows if r["kind"] == "gradient"} == {*layers, NETWORK}
    with open(tmp_path / "alignment.csv") as f:
        assert len(list(csv.DictReader(f))) == len(callback.rows)


def test_hf_callback_leaves_training_unchanged(tmp_path: Any) -> None:
    batch = cls_batch(8)
    torch.manual_seed(1)
    a = converted(tiny_bert(), "brsf")
    b = converted(tiny_bert(), "brsf")
    b.load_state_dict(a.state_dict())
    hf_train(a, batch, tmp_path)
    hf_train(b, batch, tmp_path, bg_hf.AlignmentCallback(every=1))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_hf_trainer_drtp_with_labels_from_the_batch(tmp_path: Any) -> None:
    model = converted(tiny_bert(), "drtp")
    targets_from_batch(model)
    before = hidden_weights(model)
    callback = bg_hf.AlignmentCallback(every=1)
    hf_train(model, cls_batch(8), tmp_path, callback, steps=2)
    assert not torch.equal(model.bert.pooler.dense.weight, before["bert.pooler.dense"])
    assert callback.rows


def test_hf_trainer_trains_t5_with_unequal_lengths_under_dfa_defaults(tmp_path: Any) -> None:
    """An encoder-decoder whose source (8) and target (5) lengths differ: the encoder's points
    get the pooled error, the decoder's their own positions' (no ``batch_dims``)."""
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    model = converted(transformers.T5ForConditionalGeneration(cfg), "dfa")
    gen = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, VOCAB, (8, SEQ), generator=gen),
        "labels": torch.randint(0, VOCAB, (8, SEQ - 3), generator=gen),
    }
    before = hidden_weights(model)
    hf_train(model, batch, tmp_path, steps=2)
    for name, w in hidden_weights(model).items():
        assert not torch.equal(w, before[name]), f"{name} did not learn"


# --------------------------------------------------------------------------- Lightning
class LitLM(pl.LightningModule):
    """A Lightning module around a tiny transformers model; the loss is the model's own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss: Tensor = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def pl_fit(module: Any, batch: dict[str, Tensor], tmp_path: Any, callback: Any) -> Any:
    from lightning.pytorch.loggers import CSVLogger

    loader = torch.utils.data.DataLoader(as_dataset(batch), batch_size=BATCH)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path)),
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize(("make", "rule"), [(tiny_bert, "fa"), (tiny_llama, "dfa")])
def test_lightning_step_logs_alignment(make: Any, rule: str, tmp_path: Any) -> None:
    batch = cls_batch(8) if make is tiny_bert else lm_batch(8)
    module = LitLM(converted(make(), rule))
    before = hidden_weights(module)
    callback = bg_pl.AlignmentCallback(every=2)
    trainer = pl_fit(module, batch, tmp_path, callback)
    for name, w in hidden_weights(module).items():
        assert not torch.equal(w, before[name]), f"{name} did not learn"
    assert sorted({r["step"] for r in callback.rows}) == [0, 2]
    layers = [n for n, _ in biograd.converted_layers(module)]
    with open(trainer.logger.experiment.metrics_file_path) as f:
        logged = [r for r in csv.DictReader(f) if r.get(f"alignment/gradient_angle/{NETWORK}")]
    assert [int(r["step"]) for r in logged] == [0, 2]
    for name in layers[:-1]:
        assert math.isfinite(float(logged[0][f"alignment/gradient_angle/{name}"])), name
    # the measurement's own passes do not enter the training metrics: one loss per step
    with open(trainer.logger.experiment.metrics_file_path) as f:
        losses = [r for r in csv.DictReader(f) if r.get("train_loss")]
    assert len(losses) == 4


def test_lightning_custom_loss(tmp_path: Any) -> None:
    module = LitLM(converted(tiny_bert(), "fa"))
    calls = []

    def loss_fn(pl_module: Any, batch: dict[str, Tensor]) -> Tensor:
        calls.append(1)
        return F.cross_entropy(
            pl_module.model(input_ids=batch["input_ids"]).logits, batch["labels"]
        )

    callback = bg_pl.AlignmentCallback(every=4, loss_fn=loss_fn)
    pl_fit(module, cls_batch(8), tmp_path, callback)
    assert len(calls) == 2  # one measurement (step 0): rule and backprop
    assert {r["step"] for r in callback.rows} == {0}
