"""Tiny randomly initialised transformers models for the tests (nothing is downloaded). Import
it after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import transformers
from torch import nn


def bert(vocab: int, positions: int, labels: int = 3) -> nn.Module:
    """A one-layer BERT sequence classifier without dropout."""
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=positions, num_labels=labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def llama(vocab: int, positions: int) -> nn.Module:
    """A one-layer Llama causal LM."""
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)
