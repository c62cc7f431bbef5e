"""Pruning through the runner: unstructured (global, per layer, random, gradual) and structured."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from slimlab.artifact import load_model
from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.plugins.prune import cubic_schedule
from slimlab.runner import run
from slimlab.zoo.datasets import digits
from slimlab.zoo.models import LeNet
from tests.test_runner import artifact_paths, only_run


def run_prune(overrides, store, *options):
    run(compose([*overrides, "technique=[prune]", *options]))
    return only_run(store)


def test_global_unstructured_keeps_zeros_in_the_file(overrides, store):
    client, logged = run_prune(overrides, store, "technique.prune.amount=0.9", "technique.prune.fine_tune_epochs=1")
    metrics = logged.data.metrics
    assert metrics["sparsity"] > 0.89
    assert metrics["dense_size_bytes"] > 4 * metrics["size_bytes"]  # zeros stored as bits, not floats
    assert metrics["compression_ratio"] > 4
    paths = artifact_paths(client, logged.info.run_id)
    assert {"layer_sparsity.svg", "layer_sparsity.md"} <= paths


def test_per_layer_scope_prunes_each_listed_layer_by_the_amount(overrides, store, tmp_path):
    client, logged = run_prune(
        overrides,
        store,
        "technique.prune.amount=0.6",
        "technique.prune.scope=layer",
        "technique.prune.layers=[conv2,fc1]",
    )
    table = Path(client.download_artifacts(logged.info.run_id, "layer_sparsity.md", str(tmp_path))).read_text()
    assert "| conv2.weight | 25,000 | 15,000 | 60.0% |" in table
    assert "| fc1.weight | 400,000 | 240,000 | 60.0% |" in table
    assert "| conv1.weight | 500 | 0 | 0.0% |" in table


def test_random_control_runs_with_its_label(overrides, store):
    _, logged = run_prune(overrides, store, "technique.prune.amount=0.5", "technique.prune.method=random")
    assert logged.info.run_name == "lenet prune(0.5,random)"
    assert logged.data.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_cubic_schedule_ramps_fast_then_slow():
    schedule = cubic_schedule(0.8, 4)
    assert schedule[-1] == pytest.approx(0.8)
    steps = [b - a for a, b in zip([0, *schedule], schedule, strict=False)]
    assert steps == sorted(steps, reverse=True)  # the largest cut first, while there is most redundancy


def test_gradual_reaches_the_final_sparsity(overrides, store):
    _, logged = run_prune(
        overrides, store, "technique.prune.amount=0.8", "technique.prune.schedule=gradual",
        "technique.prune.steps=3", "technique.prune.fine_tune_epochs=3",
    )  # fmt: skip
    assert logged.data.metrics["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert logged.info.run_name == "lenet prune(0.8,gradual,steps=3,fine_tune_epochs=3)"


def test_structured_removes_channels_and_the_artifact_reloads_at_its_new_shapes(overrides, store, tmp_path):
    client, logged = run_prune(
        overrides, store, "technique.prune.amount=0.5", "technique.prune.structure=channels",
        "technique.prune.scope=layer",
    )  # fmt: skip
    metrics = logged.data.metrics
    assert metrics["param_count"] < 0.3 * 431_080  # half the channels of each layer: about a quarter of the weights
    assert metrics["sparsity"] < 0.01  # nothing masked: the weights are gone
    assert "fc1:(250, 400)" in logged.data.tags["slimlab.prune.shapes"]
    model_file = client.download_artifacts(logged.info.run_id, "model.pt", str(tmp_path))
    reloaded = load_model(LeNet(), model_file)
    assert reloaded.conv2.out_channels == 25 and reloaded.fc1.in_features == 400
    data = digits()
    accuracy = (reloaded(data.test.inputs).argmax(1) == data.test.targets).float().mean().item()
    assert accuracy == pytest.approx(metrics["accuracy"])


def test_structured_gradual(overrides, store):
    _, logged = run_prune(
        overrides, store, "technique.prune.amount=0.5", "technique.prune.structure=channels",
        "technique.prune.schedule=gradual", "technique.prune.steps=2", "technique.prune.fine_tune_epochs=2",
    )  # fmt: skip
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["param_count"] < 0.5 * 431_080


def test_seed_pruning_experiment(overrides, store):
    run(compose(["experiment=seed_pruning", *overrides]))
    client = MlflowClient(store)
    (logged,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "lenet prune(0.7,layer,4 layers,fine_tune_epochs=2)"
    assert logged.data.metrics["sparsity"] == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize(
    "option,message",
    [
        ("technique.prune.method=l2", "method must be one of l1, random"),
        ("technique.prune.structure=blocks", "structure must be one of unstructured, channels"),
        ("technique.prune.steps=0", "steps must be >= 1"),
    ],
)
def test_bad_values_are_config_errors(overrides, option, message):
    with pytest.raises(ConfigError, match=message):
        run(compose([*overrides, "technique=[prune]", option]))


def test_the_sparsity_chart_is_an_svg_with_a_bar_per_layer(tmp_path):
    from xml.dom.minidom import parse

    from slimlab.plots import layer_sparsity_chart

    chart = layer_sparsity_chart({"conv1": 0.5, "fc<1>": 0.9}, tmp_path / "chart.svg", "lenet prune(0.9)")
    bars = [r for r in parse(str(chart)).getElementsByTagName("rect") if r.getAttribute("fill") == "#4c72b0"]
    assert [float(bar.getAttribute("width")) for bar in bars] == [220.0, 396.0]  # to scale: 50% and 90% of 440
    assert "fc&lt;1&gt;" in chart.read_text()  # layer names are escaped
