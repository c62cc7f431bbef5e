"""The language-modelling task on a tiny Hugging Face causal LM built from a config in a temporary directory:
the generic Hugging Face path (a model directory, the tokenizer's dict batches, ``logits`` outputs)."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from slimlab.config import compose
from slimlab.runner import run_metrics
from slimlab.tasks import LanguageModeling, Scored

LM_METRICS = {"perplexity", "baseline_perplexity", "perplexity_drop", "nll", "next_token_accuracy", "token_agreement"}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer Llama (32 wide) with all-MiniLM-L6-v2's tokenizer, saved as a Hugging Face model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimlab.zoo.datasets import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_language_modeling_metrics():
    task = LanguageModeling()
    labels = torch.tensor([[1, 2, 3, -100]])  # the last position is padding
    logits = torch.full((1, 4, 5), -10.0)
    logits[0, 0, 2] = logits[0, 1, 3] = 10.0  # predicts 2 after 1 and 3 after 2: both right
    logits[0, 2, 4] = 10.0  # the prediction after 3 has no label to meet: ignored
    found = task.evaluate([Scored(logits, labels, task.reference(logits))])
    assert found["next_token_accuracy"] == 1.0 and found["token_agreement"] == 1.0
    assert found["perplexity"] == pytest.approx(math.exp(found["nll"])) and found["perplexity"] < 1.001
    assert task.loss(logits, labels).item() == pytest.approx(found["nll"], abs=1e-6)
    assert not task.higher_is_better and task.drop(10.0, 12.0) == 2.0  # higher perplexity is worse


@pytest.mark.slow
def test_a_tiny_causal_lm_quantized_logs_perplexity_and_agreement(tiny_lm, overrides, store):
    cfg = compose(
        [
            *overrides, "model=huggingface", f"model.path={tiny_lm}", "model.auto_class=AutoModelForCausalLM",
            "data=text", f"data.tokenizer={tiny_lm}", "technique=[quantize]", "technique.quantize.scheme=int8_dynamic",
            "technique.quantize.allow_slower=true",
            "measure.batch_size=8",
        ]
    )  # fmt: skip
    primary, metrics = run_metrics(cfg)
    assert primary == "perplexity" and LM_METRICS <= set(metrics)
    # random weights: perplexity near the vocabulary's size; int8 changes few of the predicted tokens
    assert 1000 < metrics["baseline_perplexity"] < 3 * 30522
    assert metrics["perplexity"] == pytest.approx(metrics["baseline_perplexity"], rel=0.05)
    assert metrics["token_agreement"] > 0.8 and metrics["compression_ratio"] > 1.5
    client = MlflowClient(store)
    (logged,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert logged.info.status == "FINISHED" and logged.data.tags["slimlab.baseline"].endswith("(pretrained)")
    assert logged.data.tags["slimlab.task"] == "language_modeling"
