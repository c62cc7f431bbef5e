"""The Python API: ``slimlab.compress`` on a model object and a Data object, with the same runner and tracking."""

from __future__ import annotations

import tempfile

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

import slimlab
from slimlab.errors import ConfigError
from slimlab.zoo.datasets import digits


def trained_mlp(data) -> nn.Module:
    """A notebook's model: defined and trained in the session, not importable from any config."""

    class NotebookNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(0)
    model = NotebookNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.train.inputs, data.train.targets
    for _ in range(3):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start : start + 64]), y[start : start + 64]).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def notebook():
    data = digits(seed=0)
    return trained_mlp(data), data


def test_compress_a_model_object_and_log_it(notebook, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config directory here: the API needs none
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model, data = notebook
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        expected = (model(data.test.inputs).argmax(1) == data.test.targets).float().mean().item()
    (tmp_path / "my runs").mkdir()
    store = f"sqlite:///{tmp_path / 'my runs' / 'mlflow.db'}"  # any character in a path

    result = slimlab.compress(
        model, data, ["prune"], prune={"amount": 0.5}, measure={"repeats": 5, "warmup": 1}, tracking=store
    )
    assert result.primary_metric == "accuracy" and result.score == result.metrics["accuracy"]
    assert result.metrics["baseline_accuracy"] == pytest.approx(expected)  # the model as it was: not retrained
    assert result.metrics["sparsity"] > 0.45 and result.metrics["accuracy"] > 0.8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    with torch.inference_mode():
        zeros = sum(int((p == 0).sum()) for p in result.model.parameters())
    # the model the metrics are of
    assert zeros == result.metrics["param_count"] - result.metrics["nonzero_param_count"]

    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "NotebookNet prune(0.5)"
    assert run.data.metrics["accuracy"] == result.metrics["accuracy"]
    assert run.data.tags["slimlab.baseline"] == "given (pretrained)"
    assert {a.path for a in MlflowClient(store).list_artifacts(result.run_id)} >= {"stages.json", "layer_sparsity.md"}
    # the run's files went to the store; the temporary copies it wrote outside a Hydra job are gone
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("slimlab-")]


def test_compress_without_tracking_and_with_a_fine_tuned_baseline(notebook, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data = notebook
    result = slimlab.compress(
        model, data, [], tracking=False, train={"fine_tune_pretrained": True, "epochs": 1}, measure={"repeats": 5}
    )
    assert result.run_id is None and not (tmp_path / "mlflow.db").exists()
    assert result.metrics["accuracy_drop"] == 0.0  # no technique: the (fine-tuned) baseline itself
    as_given = slimlab.compress(model, data, [], tracking=False, measure={"repeats": 5})
    # one more epoch moved the weights: the fine-tuned baseline is not the model as given
    assert not torch.equal(result.model.layers[1].weight, model.layers[1].weight)
    assert torch.equal(as_given.model.layers[1].weight, model.layers[1].weight)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"prune": {"amout": 0.5}}, r"technique.prune.amout=0.5: Key 'amout' not in 'PruneConfig'"),
        ({"prune": {"amount": 1.5}}, r"technique.prune: amount must be in \[0, 1\)"),
        ({"train": {"epochs": "many"}}, r"train.epochs='many': Value 'many' of type 'str' could not be converted"),
        ({"model": "lenet"}, r"model is an argument of compress\(\), not an option"),
    ],
)
def test_bad_options_are_config_errors_before_any_work(notebook, tmp_path, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    model, data = notebook
    with pytest.raises(ConfigError, match=message):
        slimlab.compress(model, data, ["prune"], **options)
    assert not (tmp_path / "mlflow.db").exists()


def test_an_unknown_technique_is_named(notebook):
    model, data = notebook
    registered = r"unknown technique\(s\) \['prune_harder'\]; registered: distill, onnx, place"
    with pytest.raises(ConfigError, match=registered):
        slimlab.compress(model, data, ["prune_harder"])


def test_a_torchao_config_is_an_option_like_any_other(notebook, tmp_path, monkeypatch):
    """A free-form option (a torchao config node) is set whole, not key by key into a field that is unset."""
    monkeypatch.chdir(tmp_path)
    model, data = notebook
    config = {
        "_target_": "torchao.quantization.IntxWeightOnlyConfig",
        "weight_dtype": "int4",
        "granularity": {"_target_": "torchao.quantization.PerGroup", "group_size": 16},  # 784 = 49 * 16
    }
    result = slimlab.compress(
        model, data, ["quantize"], quantize={"config": config, "allow_slower": True}, tracking=False
    )
    assert result.metrics["compression_ratio"] > 4  # int4 weights bit-packed, a float scale per 16 of them
    assert result.metrics["accuracy_drop"] < 0.05
