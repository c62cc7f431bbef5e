"""The compressed model logged to MLflow loads back with mlflow.pytorch and mlflow.pyfunc and gives the same
outputs; with MLflow alone (a fresh process, ``mlflow models serve``) too, and its description says how."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from slimlab import hookimpl
from slimlab.config import compose
from slimlab.logged_model import LOAD_NOTE, NOTE_TAG, portable, tensor_interface, using_tracking_uri
from slimlab.plugin_manager import load_plugins
from slimlab.runner import run_metrics
from tests.conftest import FAST, LOG_MODEL, free_port


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
        # as a pyfunc (what mlflow models serve calls): numpy in, numpy out, through slimlab's loader
        predicted = mlflow.pyfunc.load_model(tags["slimlab.model_uri"]).predict(recorder.batch.numpy())
        torch.testing.assert_close(torch.from_numpy(predicted), recorder.logged, rtol=0, atol=0)
        info = mlflow.models.get_model_info(tags["slimlab.model_uri"])
        assert info.signature is not None and info.saved_input_example_info is not None
        # a pt2e graph calls quantized ops that only exist once torchao is imported: its MLmodel says so, and
        # the pyfunc loader imports it
        assert (info.metadata == LOAD_NOTE) == (case == "quantized (pt2e)")
        loader = info.flavors["python_function"]
        assert loader["loader_module"] == "slimlab_pyfunc" and loader["code"] == "code"
        assert loader["imports"] == (["torchao"] if case == "quantized (pt2e)" else [])


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
    from slimlab.mlflow_tracking import experiment_id
    from slimlab.testing import context

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
    from slimlab.mlflow_tracking import experiment_id
    from slimlab.testing import context

    client = MlflowClient(store)
    run = client.create_run(experiment_id(client, "tests", store))
    ctx = context(compose(["tracking=none"]), tiny_data, tmp_path)
    ctx.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    with using_tracking_uri(store), mlflow.start_run():  # the caller's own fluent run is active
        with pytest.raises(Exception, match="already active"):
            log_compressed_model(store, run.info.run_id, ctx)
    assert "slimlab.model_format" not in ctx.tags


class TwoInputs(torch.nn.Module):
    """A model called with two tensors: MLflow's own pyfunc flavor leaves such a pt2 graph out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * scale


def test_a_model_with_two_inputs_predicts_as_a_pyfunc_from_a_dict_of_arrays(store, tmp_path):
    from slimlab.data import Data
    from slimlab.logged_model import log_compressed_model
    from slimlab.mlflow_tracking import experiment_id
    from slimlab.testing import context

    torch.manual_seed(0)
    rows = (torch.randn(20, 4), torch.rand(20, 1))
    data = Data.from_tensors(rows, torch.zeros(20, dtype=torch.long), rows, torch.zeros(20, dtype=torch.long))
    client = MlflowClient(store)
    run = client.create_run(experiment_id(client, "tests", store))
    ctx = context(compose(["tracking=none"]), data, tmp_path)
    ctx.model = TwoInputs().eval()
    uri = log_compressed_model(store, run.info.run_id, ctx)
    assert ctx.tags["slimlab.model_format"] == "pt2"
    with torch.inference_mode():
        expected = ctx.model(*rows).numpy()
    with using_tracking_uri(store):
        model = mlflow.pyfunc.load_model(uri)
        predicted = model.predict({"input_0": rows[0].numpy(), "input_1": rows[1].numpy()})
        np.testing.assert_allclose(predicted, expected, rtol=1e-6)
        # the description's one-liner builds a dict of zeros by the signature's names, and runs
        description = client.get_logged_model(uri.removeprefix("models:/")).tags[NOTE_TAG]
        exec(shlex.split(_command(description))[-1], {})


# --- the pt2e model with MLflow alone: a fresh process, mlflow models serve, the UI's description ----------------

PT2E = ["technique=[quantize_pt2e]", "technique.quantize.compile=false", "technique.quantize.allow_slower=true"]


class RecordTestSplit:
    """A plugin that keeps the run's test split, batch by batch, and its model's outputs on it."""

    @hookimpl(tryfirst=True)
    def after_run(self, ctx) -> None:
        from slimlab.data import iterate
        from slimlab.training import test_split

        self.batch_size = ctx.cfg.measure.eval_batch_size
        split = list(iterate(test_split(ctx.data, self.batch_size), "cpu"))
        self.inputs = torch.cat([inputs for inputs, _ in split]).numpy()
        self.targets = torch.cat([target for _, target in split]).numpy()
        with torch.inference_mode():
            self.outputs = torch.cat([ctx.model(inputs) for inputs, _ in split]).numpy()


@pytest.fixture(scope="module")
def pt2e_run(tmp_path_factory, cache_dir):
    """A pt2e-quantized LeNet (uncompiled: the run's model is the very graph logged) logged to its own store."""
    folder = tmp_path_factory.mktemp("pt2e")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    plugins = load_plugins()
    recorder = RecordTestSplit()
    plugins.manager.register(recorder, name="record-test-split")
    tracking = [f"cache_dir={cache_dir}", f"tracking.uri={store}", "experiment_name=tests", LOG_MODEL]
    run_metrics(compose([*FAST, *tracking, "model=lenet_small", "data=digits", *PT2E]), plugins)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    np.save(folder / "inputs.npy", recorder.inputs)
    return SimpleNamespace(folder=folder, store=store, run=run, uri=run.data.tags["slimlab.model_uri"], seen=recorder)


def _mlflow_alone(store: str | None) -> dict[str, str]:
    """The environment of a process that knows the store (if given) and nothing of slimlab's source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    # `python`, and uvicorn, which the scoring server starts by name: this interpreter's
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "MLFLOW_TRACKING_URI": store} if store else env


LOAD_AND_PREDICT = """
import json, sys
import mlflow
import numpy as np

model = mlflow.pyfunc.load_model(sys.argv[1])
inputs = np.load(sys.argv[2])
rows = int(sys.argv[3])  # the run's evaluation batches: the same shapes, the same kernels
np.save(sys.argv[4], np.concatenate([model.predict(inputs[i : i + rows]) for i in range(0, len(inputs), rows)]))
print(json.dumps(sorted(name for name in sys.modules if name in ("slimlab", "torchao"))))
"""


def test_the_pt2e_model_loads_and_predicts_in_a_process_that_imports_only_mlflow_and_numpy(pt2e_run):
    run, seen = pt2e_run.run, pt2e_run.seen
    assert run.data.tags["slimlab.model_format"] == "pt2"
    out = pt2e_run.folder / "predicted.npy"
    args = [pt2e_run.uri, str(pt2e_run.folder / "inputs.npy"), str(seen.batch_size), str(out)]
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, *args],
        cwd=pt2e_run.folder, env=_mlflow_alone(pt2e_run.store), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # the loader shipped in the model imported torchao for the graph's quantized ops; nothing imported slimlab
    assert json.loads(done.stdout.splitlines()[-1]) == ["torchao"]
    predicted = np.load(out)
    np.testing.assert_allclose(predicted, seen.outputs, rtol=1e-5, atol=1e-5)
    assert (predicted.argmax(1) == seen.outputs.argmax(1)).all()
    accuracy = (predicted.argmax(1) == seen.targets).mean()
    assert accuracy == pytest.approx(run.data.metrics["accuracy"], abs=1e-6)  # as the run reported it


def _command(description: str) -> str:
    """The shell one-liner in the description's code block."""
    (block,) = re.findall(r"```\n(.*?)\n```", description, re.S)
    return block


def test_the_logged_model_has_a_description_that_says_what_it_is_and_how_to_load_it(pt2e_run):
    client = MlflowClient(pt2e_run.store)
    model = client.get_logged_model(pt2e_run.uri.removeprefix("models:/"))
    description = model.tags[NOTE_TAG]  # the description MLflow's UI shows on the model's page
    run = pt2e_run.run
    assert description.startswith(f"**{run.info.run_name}**") and run.info.run_id in description
    assert "Techniques: quantize(pt2e-static,uncompiled)" in description
    assert "torch.export graph (pt2)" in description and "import torchao" in description
    assert f"mlflow models serve -m {pt2e_run.uri} --env-manager local" in description
    command = _command(description)
    assert command.startswith(f"MLFLOW_TRACKING_URI={pt2e_run.store} python -c ")
    code = shlex.split(command)[-1]
    assert f'mlflow.pyfunc.load_model("{pt2e_run.uri}")' in code
    with using_tracking_uri(pt2e_run.store):
        exec(code, {})  # it runs (in a shell, with MLflow alone: the slow test below)


@pytest.mark.slow
def test_the_descriptions_one_liner_runs_in_a_shell_as_written(pt2e_run):
    description = MlflowClient(pt2e_run.store).get_logged_model(pt2e_run.uri.removeprefix("models:/")).tags[NOTE_TAG]
    done = subprocess.run(
        ["bash", "-c", _command(description)], env=_mlflow_alone(None), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(re.findall(r"-?\d+\.\d*(?:e[-+]\d+)?", done.stdout)) == 10, done.stdout  # one row of 10 scores


def test_a_password_in_the_store_uri_is_not_written_in_the_description():
    from slimlab.logged_model import _without_password

    hidden = _without_password("postgresql://mlflow:s3cret@db:5432/mlflow")
    assert hidden == "postgresql://mlflow:<password>@db:5432/mlflow"
    assert _without_password("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_request_for_the_pt2e_model(pt2e_run, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", pt2e_run.uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=_mlflow_alone(pt2e_run.store), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 120 s"
            time.sleep(0.5)
        seen = pt2e_run.seen
        rows = seen.inputs[: seen.batch_size]  # one of the run's evaluation batches
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": rows.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predicted = np.array(json.loads(response.read())["predictions"], dtype=np.float32)
        np.testing.assert_allclose(predicted, seen.outputs[: len(rows)], rtol=1e-5, atol=1e-5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
