"""The compressed model logged with mlflow.pytorch.log_model loads back with load_model and gives the same outputs."""

from __future__ import annotations

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow import MlflowClient

from framework import hookimpl
from framework.artifact import deployable
from framework.config import compose
from framework.plugins import load_plugins
from framework.runner import run_metrics


class RecordOutputs:
    """A plugin that keeps the deployed model's outputs on a fixed batch, taken just before tracking logs it."""

    outputs: torch.Tensor | None = None

    @hookimpl(tryfirst=True)
    def after_run(self, ctx) -> None:
        self.batch = ctx.data.example_batch(16).cpu()
        with torch.inference_mode():
            self.outputs = deployable(ctx.model)(self.batch).clone()


CASES = {
    "pruned": (["technique=[prune]", "technique.prune.amount=0.9"], "pt2"),
    "quantized (torch.ao eager)": (["technique=[quantize_legacy]"], "pickle"),
    "quantized (pt2e)": (["technique=[quantize_pt2e]"], "pt2"),
    "distilled": (["technique=[distill]", "technique.distill.student=lenet_small", "technique.distill.epochs=1"], "pt2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logged_model_loads_back_with_the_same_outputs(case, overrides, store):
    options, expected_format = CASES[case]
    plugins = load_plugins()
    recorder = RecordOutputs()
    plugins.manager.register(recorder, name="record-outputs")
    run_metrics(compose([*overrides, "model=lenet", "data=digits", *options]), plugins)

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    tags = run.data.tags
    assert tags["slimlab.model_format"] == expected_format
    assert tags["slimlab.model_uri"].startswith("models:/")
    mlflow.set_tracking_uri(store)
    try:
        for uri in (tags["slimlab.model_uri"], f"runs:/{run.info.run_id}/model"):  # both name the same model
            loaded = mlflow.pytorch.load_model(uri)
            with torch.inference_mode():
                torch.testing.assert_close(loaded(recorder.batch), recorder.outputs, rtol=0, atol=0)
        info = mlflow.models.get_model_info(tags["slimlab.model_uri"])
        assert info.signature is not None and info.saved_input_example_info is not None
    finally:
        mlflow.set_tracking_uri(None)
