"""The compressed model logged with mlflow.pytorch.log_model loads back with load_model and gives the same outputs."""

from __future__ import annotations

import os

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow import MlflowClient

from slimlab import hookimpl
from slimlab.config import compose
from slimlab.logged_model import LOAD_NOTE, portable, tensor_interface, using_tracking_uri
from slimlab.plugin_manager import load_plugins
from slimlab.runner import run_metrics
from tests.conftest import LOG_MODEL


class RecordOutputs:
    """A plugin that keeps the run's model's outputs on a fixed batch, taken just before tracking logs it."""

    @hookimpl(tryfirst=True)
    def after_run(self, ctx) -> None:
        self.batch = ctx.example_inputs(16).cpu()
        with torch.inference_mode():
            self.deployed = ctx.model(self.batch).clone()  # as the run measured it
            logged = tensor_interface(portable(ctx.model), self.batch)  # the form logged: one CPU module
            self.logged = logged(self.batch).clone()


# technique options and the serialization format expected
CASES = {
    "pruned": (["technique=[prune]", "technique.prune.amount=0.9"], "pt2"),
    "quantized (torch.ao eager)": (["technique=[quantize_legacy]"], "pickle"),
    # uncompiled: the run's model is then the very graph logged (compiled, it runs inductor's kernels)
    "quantized (pt2e)": (
        ["technique=[quantize_pt2e]", "technique.quantize.compile=false", "technique.quantize.allow_slower=true"],
        "pt2",
    ),
    "distilled": (
        ["technique=[distill]", "technique.distill.student=lenet_small", "technique.distill.epochs=1"],
        "pt2",
    ),
    "placed (float16)": (["technique=[place]", "technique.place.dtype=float16"], "pt2"),
    "placed (offloaded to disk)": (["technique=[place]", "+technique.place.device_map={fc1:disk}"], "pt2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logged_model_loads_back_with_the_same_outputs(case, overrides, store):
    options, expected_format = CASES[case]
    plugins = load_plugins()
    recorder = RecordOutputs()
    plugins.manager.register(recorder, name="record-outputs")
    run_metrics(compose([*overrides, LOG_MODEL, "model=lenet", "data=digits", *options]), plugins)
    # the logged form computes what the run's model computed
    torch.testing.assert_close(recorder.logged, recorder.deployed, rtol=0, atol=0)

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    tags = run.data.tags
    assert tags["slimlab.model_format"] == expected_format
    assert tags["slimlab.model_uri"].startswith("models:/")
    with using_tracking_uri(store):
        for uri in (tags["slimlab.model_uri"], f"runs:/{run.info.run_id}/model"):  # both name the same model
            loaded = mlflow.pytorch.load_model(uri)
            with torch.inference_mode():
                torch.testing.assert_close(loaded(recorder.batch), recorder.logged, rtol=0, atol=0)
        info = mlflow.models.get_model_info(tags["slimlab.model_uri"])
        assert info.signature is not None and info.saved_input_example_info is not None
        # a pt2e graph calls quantized ops that only exist once torchao is imported: its MLmodel says so
        assert (info.metadata == LOAD_NOTE) == (case == "quantized (pt2e)")


def test_log_model_false_logs_the_measured_file_only(overrides, store):
    run_metrics(compose([*overrides, "technique=[prune]", "tracking.log_model=false"]))
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("tests").experiment_id
    (run,) = client.search_runs([experiment])
    assert "slimlab.model_uri" not in run.data.tags
    assert client.search_logged_models([experiment]) == []
    assert "model.pt" in [a.path for a in client.list_artifacts(run.info.run_id)]


class ValueDependent(torch.nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it, pickle holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        return out if out.sum() > 0 else -out


def test_a_model_torch_export_cannot_trace_is_logged_as_pickle_with_the_reason(store, tmp_path, tiny_data, monkeypatch):
    from slimlab.config import compose
    from slimlab.logged_model import log_compressed_model
    from slimlab.testing import context
    from slimlab.tracking import experiment_id

    client = MlflowClient(store)
    run = client.create_run(experiment_id(client, "tests", store))
    torch.manual_seed(0)
    model = ValueDependent().eval()
    ctx = context(compose(["tracking=none"]), tiny_data, tmp_path)
    ctx.model = model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # what the user set stays set
    uri = log_compressed_model(store, run.info.run_id, ctx)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"

    assert ctx.tags["slimlab.model_format"].startswith("pickle (pt2 failed: ")
    (logged,) = client.search_logged_models([run.info.experiment_id])  # the failed pt2 attempt is not kept
    assert f"models:/{logged.model_id}" == uri and str(logged.status) == "READY"
    with using_tracking_uri(store):
        loaded = mlflow.pytorch.load_model(uri)
        by_run = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")  # the READY one, not the failed
    batch = ctx.example_inputs(8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=0)
        torch.testing.assert_close(by_run(batch), model(batch), rtol=0, atol=0)


def test_the_pipeline_is_pickled_when_any_step_needs_it(slimlab_plugins, slimlab_compose):
    from slimlab.registry import serialization_format
    from slimlab.runner import plan

    def steps(techniques: str):
        return plan(slimlab_compose(["tracking=none", f"technique={techniques}"]), slimlab_plugins).steps

    assert serialization_format(steps("[prune,distill]")) == "pt2"
    assert serialization_format(steps("[prune,quantize_pt2e]")) == "pt2"
    assert serialization_format(steps("[prune,quantize_legacy]")) == "pickle"
    assert serialization_format([]) == "pt2"  # the baseline alone


def test_key_params_and_serialization_format_are_checked_at_registration():
    from dataclasses import dataclass

    from slimlab.errors import PluginError
    from slimlab.registry import TechniqueRegistry

    @dataclass
    class Options:
        amount: float = 0.5

    register = TechniqueRegistry().register_for("third-party")
    with pytest.raises(PluginError, match=r"key_params \['amout'\] .* not fields of its schema \(fields: amount\)"):
        register("a", Options, lambda m, c, x: m, key_params=["amout"])
    with pytest.raises(PluginError, match="serialization_format 'onnx'.*valid: pt2, pickle"):
        register("b", Options, lambda m, c, x: m, serialization_format="onnx")


def test_a_failure_that_is_not_the_format_is_raised_not_hidden_by_a_fallback(store, tmp_path, tiny_data):
    from slimlab.config import compose
    from slimlab.logged_model import log_compressed_model
    from slimlab.testing import context
    from slimlab.tracking import experiment_id

    client = MlflowClient(store)
    run = client.create_run(experiment_id(client, "tests", store))
    ctx = context(compose(["tracking=none"]), tiny_data, tmp_path)
    ctx.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    with using_tracking_uri(store), mlflow.start_run():  # the caller's own fluent run is active
        with pytest.raises(Exception, match="already active"):
            log_compressed_model(store, run.info.run_id, ctx)
    assert "slimlab.model_format" not in ctx.tags
