"""technique=[onnx]: the model exported to ONNX and run by ONNX Runtime (optionally int8 by ORT's own quantizer),
measured by the run's protocol, its artifact the .onnx file, logged with mlflow.onnx."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow.onnx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mlflow import MlflowClient

from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.logged_model import using_tracking_uri
from slimlab.plugins import onnx as onnx_plugin
from slimlab.runner import run_metrics
from tests.conftest import LOG_MODEL
from tests.test_cli import assert_refused, slimlab_here  # noqa: F401 (a fixture)
from tests.test_minilm import FEW

LENET_PARAMS = 431_080


def only_run(store: str):
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return client, run


def artifact(client: MlflowClient, run, path: str, tmp_path: Path) -> Path:
    return Path(client.download_artifacts(run.info.run_id, path, str(tmp_path / "downloads")))


def cosine(a, b) -> float:
    """Mean row-wise cosine similarity, as the run's cosine_to_baseline."""
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b)).mean().item()


def test_fp32_run_is_measured_on_onnx_runtime_and_logged_with_mlflow_onnx(overrides, store, tmp_path):
    primary, metrics = run_metrics(compose([*overrides, LOG_MODEL, "technique=[onnx]"]))
    client, run = only_run(store)
    tags = run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "lenet onnx(fp32)"
    assert tags["slimlab.onnx.exporter"] == "dynamo" and "slimlab.onnx.dynamo_error" not in tags
    assert abs(metrics["accuracy"] - metrics["baseline_accuracy"]) <= 0.01
    # the params are the ONNX file's weights: all of LeNet's, none of the exporter's constants
    assert metrics["param_count"] == metrics["nonzero_param_count"] == LENET_PARAMS
    assert metrics["ort_latency_ms"] > 0 and metrics["ort_speedup"] > 0
    # size_bytes is the very .onnx file logged as the run's model artifact, and the MLflow model is that file
    measured = artifact(client, run, "model.onnx", tmp_path).read_bytes()
    assert metrics["size_bytes"] == run.data.metrics["size_bytes"] == len(measured)
    assert tags["slimlab.model_format"] == "onnx"
    with using_tracking_uri(store):
        logged = mlflow.onnx.load_model(tags["slimlab.model_uri"])
        info = mlflow.models.get_model_info(tags["slimlab.model_uri"])
    assert logged.SerializeToString() == onnx.load_from_string(measured).SerializeToString()
    assert info.signature is not None and info.saved_input_example_info is not None
    # it runs in onnxruntime, at any batch size, and predicts what the run's model predicted
    from slimlab.zoo.datasets import digits

    images = digits(seed=0).test.inputs[:33]
    session = ort.InferenceSession(logged.SerializeToString(), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for rows in (1, 33):
        (output,) = session.run(None, {name: images[:rows].numpy()})
        assert output.shape == (rows, 10)
    deployed = onnx_plugin.runtime_class()(measured, ["input"], 1, {})
    with torch.inference_mode():
        np.testing.assert_array_equal(deployed(images).numpy(), output)


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_int8_counts_the_weights_it_quantized(scheme, overrides, store):
    primary, metrics = run_metrics(compose([*overrides, "technique=[onnx]", f"technique.onnx.quantize={scheme}"]))
    _, run = only_run(store)
    assert run.info.status == "FINISHED" and run.info.run_name == f"lenet onnx(int8 {scheme})"
    assert metrics["param_count"] == LENET_PARAMS  # int8 weights counted as the weights, not their scales
    assert metrics["compression_ratio"] > 3.5  # int8 values, not float32
    assert abs(metrics["accuracy"] - metrics["baseline_accuracy"]) <= 0.03
    ops = run.data.tags["slimlab.onnx.ops"]
    assert ("MatMulInteger" if scheme == "dynamic" else "QuantizeLinear") in ops


def test_pruned_then_exported_keeps_its_zeros_under_torch_names(overrides, store, tmp_path):
    args = [*overrides, "technique=[prune,onnx]", "technique.prune.amount=0.6"]
    primary, metrics = run_metrics(compose(args))
    client, run = only_run(store)
    assert run.info.run_name == "lenet prune(0.6)+onnx(fp32)"
    pruned, exported = json.loads(artifact(client, run, "stages.json", tmp_path).read_text())["stages"]
    nonzero = metrics["nonzero_param_count"]
    assert exported["nonzero_param_count"] == pruned["nonzero_param_count"] == nonzero < LENET_PARAMS
    # the exporter names fc weights after graph nodes (transposed): found back by value, sparsity per layer kept
    assert exported["layer_sparsity"] == pytest.approx(pruned["layer_sparsity"])
    assert set(exported["layer_sparsity"]) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}


def test_onnx_must_be_last(slimlab_here, tmp_path, store, capsys):  # noqa: F811
    code = slimlab_here("run", "technique=[onnx,prune]", f"tracking.uri={store}")
    assert_refused(code, capsys.readouterr().err, "technique 'prune' cannot follow 'onnx'", tmp_path)


def test_without_onnxruntime_it_says_what_to_install(slimlab_here, tmp_path, store, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: find_spec finds nothing
    code = slimlab_here("run", "technique=[onnx]", f"tracking.uri={store}")
    assert_refused(code, capsys.readouterr().err, "onnxruntime not installed: pip install slimlab[onnx]", tmp_path)


def test_a_coded_artifact_is_refused_since_the_file_must_load_as_onnx(slimlab_here, tmp_path, store, capsys):  # noqa: F811
    code = slimlab_here("run", "technique=[onnx]", "artifact.codec=lzma", f"tracking.uri={store}")
    assert_refused(code, capsys.readouterr().err, "artifact.codec=lzma cannot code an ONNX model file", tmp_path)


def test_an_onnx_node_outside_the_pipeline_is_not_checked():
    """An experiment may set options of a technique its list leaves out: they are ignored, not refused."""
    from slimlab.plugins import onnx as onnx_plugin

    left_out = compose(["technique=[]", "artifact.codec=lzma", "+technique.onnx.quantize=dynamic"])
    onnx_plugin.check_config(cfg=left_out, host=True)
    with pytest.raises(ConfigError, match="artifact.codec=lzma cannot code an ONNX model file"):
        onnx_plugin.check_config(cfg=compose(["technique=[onnx]", "artifact.codec=lzma"]), host=True)


def test_presets_and_bench_variants_compose():
    from slimlab.plugin_manager import load_plugins
    from slimlab.runner import plan

    plugins = load_plugins()

    def step(*overrides: str):
        (last,) = plan(compose(list(overrides), plugins), plugins, host=False).steps[-1:]
        return last

    assert step("technique=[onnx_int8]").describe() == "onnx(int8 dynamic)"
    assert step("technique=[onnx_int8_pc]").describe() == "onnx(int8 dynamic,per_channel)"
    assert step("technique=[onnx_static]").describe() == "onnx(int8 static,per_channel)"
    # bench_pt2e_static's ORT variants follow the sweep's weight scales
    for scales in ("per_channel", "per_tensor"):
        onnx = step("experiment=bench_pt2e_static", "technique=[onnx]", f"technique.quantize.granularity={scales}")
        assert (onnx.config.quantize, onnx.config.granularity) == ("static", scales)
    from omegaconf import OmegaConf

    from slimlab.config import CONFIG_DIR

    bench = OmegaConf.load(CONFIG_DIR / "experiment" / "bench_minilm_int8.yaml")
    variants = bench.hydra.sweeper.params.technique.split("],[")
    onnx = [f"[{v.strip('[]')}]" for v in variants if v.strip("[]").startswith("onnx")]
    assert onnx == ["[onnx]", "[onnx_int8]", "[onnx_int8_pc]"]
    for variant in onnx:
        assert step("experiment=bench_minilm_int8", f"technique={variant}").name == "onnx"


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + shift


def test_positional_inputs_are_named_and_any_batch_runs():
    model, inputs = TwoInputs().eval(), (torch.randn(3, 4), torch.randn(3, 2))
    exported, exporter, _ = onnx_plugin.export(model, inputs, "auto")
    names = onnx_plugin.input_names(inputs)
    assert exporter == "dynamo" and names == ["input_0", "input_1"]
    deployed = onnx_plugin.runtime_class()(exported, names, 1, onnx_plugin.weight_names(model, exported))
    with torch.inference_mode():
        for rows in (1, 5):
            x, shift = torch.randn(rows, 4), torch.randn(rows, 2)
            torch.testing.assert_close(deployed(x, shift), model(x, shift))
    assert [name for name, _ in deployed.named_parameters()] == ["linear.weight", "linear.bias"]
    # timed interleaved with torch: its threads must not spin on after a call, stealing the next model's cores
    assert deployed.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"


class Branchy(torch.nn.Module):
    """A data-dependent branch: torch.export (dynamo) refuses it, the TorchScript tracer records one path."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def test_export_falls_back_to_torchscript_and_says_why(capfd):
    model, x = Branchy().eval(), torch.ones(3, 4)
    exported, exporter, reason = onnx_plugin.export(model, x, "auto")
    assert exporter == "torchscript" and reason.startswith("GuardOnDataDependentSymNode: ")  # torch.export's
    assert "GraphModule" not in capfd.readouterr().err  # the failed attempt's partial graphs are not printed
    deployed = onnx_plugin.runtime_class()(exported, ["input"], 1, {})
    with torch.inference_mode():
        torch.testing.assert_close(deployed(x), model(x))
    assert not model.training
    with pytest.raises(Exception, match="torch.export"):  # asked for dynamo: no fallback
        onnx_plugin.export(model, x, "dynamo")


@pytest.fixture
def few(tmp_path) -> Path:
    path = tmp_path / "few.txt"
    path.write_text(FEW)
    return path


@pytest.mark.slow  # about 10 s each: a MiniLM exported, evaluated and timed
@pytest.mark.parametrize("technique", ["onnx", "onnx_int8_pc"])
def test_minilm_artifact_loads_with_mlflow_onnx_and_matches_the_fp32_model(technique, overrides, store, few):
    """Issue 14's Done-when: mean cosine >= 0.995 to the fp32 model, for the variants that meet it: fp32, and on this
    2-layer MiniLM ORT's int8 dynamic with per-channel scales (about 0.996; per tensor, ORT's default, gives 0.96;
    on the 6-layer model per-channel gives 0.993, below)."""
    from slimlab.zoo.datasets import sentences
    from slimlab.zoo.models import SentenceEmbedding

    args = [
        *overrides, LOG_MODEL, "model=minilm", "model.num_layers=2", "data=sentences", f"data.path={few}",
        "data.test_fraction=0.5", f"technique=[{technique}]",
    ]  # fmt: skip
    primary, metrics = run_metrics(compose(args))
    _, run = only_run(store)
    assert run.info.status == "FINISHED" and run.data.tags["slimlab.model_format"] == "onnx"
    assert metrics["param_count"] == 15_467_520  # the 2-layer MiniLM's, counted from the ONNX initializers
    with using_tracking_uri(store):
        logged = mlflow.onnx.load_model(run.data.tags["slimlab.model_uri"])
    session = ort.InferenceSession(logged.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    inputs = sentences(path=str(few), test_fraction=0.5, seed=0).test.inputs
    torch_model = SentenceEmbedding(num_layers=2).eval()
    # any batch and sequence length: the whole test split, and one sentence cut to 6 tokens
    for batch in (inputs, {name: value[:1, :6] for name, value in inputs.items()}):
        (served,) = session.run(None, {name: value.numpy() for name, value in batch.items()})
        with torch.inference_mode():
            assert cosine(served, torch_model(**batch)) >= 0.995
    assert metrics["cosine_to_baseline"] >= 0.995
