"""Runs as the MLflow UI compares them (issue 15): names that tell runs apart, the shared comparison view, metrics at
the digits they have, the sweep parent's summary metrics. A real sqlite store; no run trains here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient

from slimlab.config import compose
from slimlab.mlflow_tracking import KIND, KIND_TAG, VIEW_TAG, MlflowStore, experiment_id, open_store
from slimlab.plugin_manager import load_plugins
from slimlab.runner import readable, run_name
from slimlab.sweep import summary_metrics


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def name_of(overrides: list[str], plugins) -> str:
    cfg = compose(overrides, plugins)
    return run_name(cfg, plugins.registry.pipeline(cfg, disabled=cfg.plugins.disable, probe=False))


def test_runs_that_differ_in_an_option_have_different_names(plugins):
    # the quickstart fine-tunes for 2 epochs; a plain prune(0.9)+quantize run does not: they shared a name
    quickstart = name_of(["experiment=quickstart"], plugins)
    plain = name_of(["technique=[prune,quantize]", "technique.prune.amount=0.9"], plugins)
    assert quickstart == "lenet prune(0.9,fine_tune_epochs=2)+quantize(int8-wo)"
    assert plain == "lenet prune(0.9)+quantize(int8-wo)"
    changed = name_of(
        ["technique=[prune]", "technique.prune.lr=0.01", "technique.prune.layers=[conv1,fc1,fc2]"], plugins
    )
    assert changed == "lenet prune(0.5,3 layers,lr=0.01)"
    # what the label shows is not repeated; an option that only decides whether a slow recipe runs is not shown
    assert (
        name_of(["technique=[quantize]", "technique.quantize.allow_slower=true"], plugins) == "lenet quantize(int8-wo)"
    )
    auto = ["technique=[quantize_auto]", "technique.quantize.min_cosine=0.995"]
    assert name_of(auto, plugins) == "lenet quantize(auto,min_cosine=0.995)"


def test_a_metric_keeps_the_digits_it_has():
    assert readable(float(np.float32(0.98))) == 0.98  # a float32 tensor's .item(): 0.9800000190734863
    assert readable(0.98 - 0.9756) == 0.0044  # float64 noise: 0.0043999999999999595
    assert readable(431 / 450) == 0.957777777778 and readable(1_727_537.0) == 1_727_537.0
    assert readable(0.1) == 0.1 and np.isnan(readable(float("nan")))
    assert all(readable(readable(v)) == readable(v) for v in (1 / 3, 2 / 3, 0.9973000288009644, 13.4627))


def test_the_experiment_is_a_model_training_one_with_the_tradeoff_view(store):
    client = open_store(store)
    first = experiment_id(client, "x", store, "accuracy", True, ["technique.prune.amount"])
    tags = client.get_experiment(first).tags
    assert tags[KIND_TAG] == KIND  # not filed by the UI as a GenAI experiment
    view = json.loads(tags[VIEW_TAG])
    charts = {(c["xaxis"]["key"], c["yaxis"]["key"]) for c in view["compareRunCharts"] if c["type"] == "SCATTER"}
    assert charts == {("size_bytes", "accuracy"), ("speedup", "accuracy")}
    assert view["orderByKey"] == "metrics.`accuracy`" and view["orderByAsc"] is False  # best first, listed flat
    assert view["runsHiddenMode"] == "SHOW_ALL"  # the UI's default charts only the first ten runs
    assert "params.`technique.prune.amount`" in view["selectedColumns"]
    # a later run of another chain and a lower-is-better task: its columns join, the order follows its metric
    again = experiment_id(client, "x", store, "mse", False, ["technique.quantize.scheme"])
    view = json.loads(client.get_experiment(again).tags[VIEW_TAG])
    assert again == first and view["orderByKey"] == "metrics.`mse`" and view["orderByAsc"] is True
    assert {"params.`technique.prune.amount`", "params.`technique.quantize.scheme`"} <= set(view["selectedColumns"])
    # a sweep's parent opens the experiment without a task metric: the view stays as the runs left it
    assert json.loads(client.get_experiment(experiment_id(client, "x", store)).tags[VIEW_TAG]) == view


def test_a_sweep_parent_summarises_its_children(store):
    client = MlflowClient(store)
    experiment = client.create_experiment("sweep")
    for accuracy, drop, ratio, speedup, status in [
        (0.95, 0.02, 13.0, 0.9, "FINISHED"),
        (0.97, 0.00, 5.0, 1.1, "FINISHED"),
        (0.99, -0.02, 50.0, 3.0, "FAILED"),  # a failed child's numbers are not the sweep's
    ]:
        run = client.create_run(experiment)
        metrics = {"accuracy": accuracy, "baseline_accuracy": 0.97, "accuracy_drop": drop}
        for name, value in {**metrics, "compression_ratio": ratio, "speedup": speedup}.items():
            client.log_metric(run.info.run_id, name, value)
        client.set_terminated(run.info.run_id, status)
    runs = MlflowStore(store).search([experiment])
    assert summary_metrics(runs) == {"best_accuracy": 0.97, "best_compression_ratio": 13.0, "best_speedup": 1.1}


def test_the_default_experiment_is_slimlab_not_default(plugins):
    # MLflow has its own experiment "Default": a second one named "default" beside it read as the same
    assert compose(["technique=[]"], plugins).experiment_name == "slimlab"
