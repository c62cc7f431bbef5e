"""The place technique through the runner, against a real sqlite MLflow store: devices, dtypes, splits, offload."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from slimlab import hookimpl
from slimlab.artifact import load_model, load_state
from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.plugin_manager import load_plugins
from slimlab.runner import run
from slimlab.zoo.models import LeNet
from tests.conftest import REPO, slimlab

METRICS = {
    "accuracy", "baseline_accuracy", "accuracy_drop", "size_bytes", "baseline_size_bytes", "compression_ratio",
    "param_count", "nonzero_param_count", "sparsity", "latency_ms", "latency_ms_p95", "speedup",
}  # fmt: skip
LENET_PARAMS = 431_080
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device; torch sees none on this machine")
without_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA; this one has CUDA")


class ComparePredictions:
    """A test plugin: how far the deployed model's test-split outputs are from the baseline's."""

    @hookimpl
    def evaluate(self, model, ctx):
        from slimlab.training import outputs

        placed = torch.cat([output for output, _ in outputs(model, ctx.data)])
        baseline = torch.cat([output for output, _ in outputs(ctx.baseline, ctx.data, ctx.device)])
        offload = ctx.tags.get("slimlab.place.offload_dir")  # while the model lives, its weights on disk are there
        return {
            "test_mismatches": float((placed.argmax(1) != baseline.argmax(1)).sum()),
            "test_max_abs_diff": float((placed - baseline).abs().max()),
            "test_fc1_weight_on_disk": float(
                bool(offload) and all((Path(offload) / name).exists() for name in ("index.json", "fc1.weight.dat"))
            ),
        }


def place(overrides: list[str], *extra: str) -> None:
    """One run of ``technique=[place]`` with the prediction comparison plugged in."""
    plugins = load_plugins()
    plugins.manager.register(ComparePredictions(), name="compare_predictions")
    run(compose([*overrides, "technique=[place]", *extra], plugins), plugins)


def only_run(store: str):
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def artifact(client, logged, path: str, tmp_path: Path) -> Path:
    return Path(client.download_artifacts(logged.info.run_id, path, str(tmp_path)))


def baseline_state(logged, cache_dir: Path) -> dict[str, torch.Tensor]:
    key = logged.data.tags["slimlab.baseline"].split()[0]
    return load_state(cache_dir / "baselines" / key / "model.pt")


def assert_same_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_cpu_float32_with_threads(overrides, store, cache_dir, tmp_path):
    place(overrides, "technique.place.device=cpu", "technique.place.threads=1")
    client, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "lenet place(cpu,fp32,threads=1)"
    metrics, tags = logged.data.metrics, logged.data.tags
    assert METRICS <= set(metrics)
    assert metrics["test_mismatches"] == 0 and metrics["test_max_abs_diff"] == 0
    assert metrics["accuracy"] == metrics["baseline_accuracy"]
    assert metrics["param_count"] == LENET_PARAMS
    assert metrics["size_bytes"] == pytest.approx(metrics["baseline_size_bytes"], rel=1e-3)
    assert tags["slimlab.place.device"] == "cpu"
    assert tags["slimlab.place.dtype"] == "float32"
    assert tags["slimlab.place.threads"] == "1"
    assert "slimlab.place.device_map" not in tags

    # The artifact is the inner model's state, under its own names: it loads into a fresh LeNet.
    model_file = artifact(client, logged, "model.pt", tmp_path)
    assert model_file.stat().st_size == metrics["size_bytes"]
    assert_same_weights(load_state(model_file), baseline_state(logged, cache_dir))


@pytest.mark.parametrize("dtype,short", [("bfloat16", "bf16"), pytest.param("float16", "fp16", marks=pytest.mark.slow)])
def test_half_precision_halves_the_file(overrides, store, tmp_path, dtype, short):
    place(overrides, "technique.place.device=cpu", f"technique.place.dtype={dtype}")
    client, logged = only_run(store)
    assert logged.info.run_name == f"lenet place(cpu,{short})"
    metrics = logged.data.metrics
    assert 0.45 < metrics["size_bytes"] / metrics["baseline_size_bytes"] < 0.55
    assert abs(metrics["accuracy_drop"]) <= 0.02
    assert metrics["test_mismatches"] <= 0.02 * 450  # at most 2% of the test split changes its prediction
    assert logged.data.tags["slimlab.place.dtype"] == dtype
    model_file = artifact(client, logged, "model.pt", tmp_path)
    assert model_file.stat().st_size == metrics["size_bytes"]
    assert {tensor.dtype for tensor in load_state(model_file).values()} == {getattr(torch, dtype)}
    reloaded = load_model(LeNet(), model_file)
    assert reloaded(torch.zeros(1, 1, 28, 28, dtype=getattr(torch, dtype))).shape == (1, 10)


def test_device_map_splits_by_module_name_on_cpu(overrides, store, cache_dir, tmp_path):
    place(overrides, "technique.place.device=cpu", "+technique.place.device_map={conv1:cpu,fc1:disk}")
    client, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "lenet place(cpu,fp32,split)"
    metrics, tags = logged.data.metrics, logged.data.tags
    # Modules the map does not name go to `device`.
    expected = {"conv1": "cpu", "conv2": "cpu", "fc1": "disk", "fc2": "cpu"}
    assert json.loads(tags["slimlab.place.device_map"]) == expected
    assert json.loads(artifact(client, logged, "device_map.json", tmp_path).read_text()) == expected
    assert metrics["test_fc1_weight_on_disk"] == 1
    gc.collect()  # the model is gone: so are its weights on disk (nothing left in /tmp)
    assert not Path(tags["slimlab.place.offload_dir"]).exists()
    assert metrics["test_mismatches"] == 0 and metrics["test_max_abs_diff"] == 0
    # fc1's weights live on disk (meta in the module), yet they are counted and saved for real.
    assert metrics["param_count"] == metrics["nonzero_param_count"] == LENET_PARAMS
    model_file = artifact(client, logged, "model.pt", tmp_path)
    assert_same_weights(load_state(model_file), baseline_state(logged, cache_dir))


def test_max_memory_below_the_model_offloads_to_disk(overrides, store, cache_dir, tmp_path):
    # LeNet's float32 weights take 1.72 MB; with 1 MB of CPU memory accelerate puts them on disk.
    place(overrides, "technique.place.device=cpu", "+technique.place.max_memory={cpu:1MB}")
    client, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    metrics, tags = logged.data.metrics, logged.data.tags
    assert "disk" in json.loads(tags["slimlab.place.device_map"]).values()
    assert metrics["test_fc1_weight_on_disk"] == 1
    # Same predictions as the baseline, and the saved weights are the baseline's, read back from disk.
    assert metrics["test_mismatches"] == 0 and metrics["test_max_abs_diff"] == 0
    assert metrics["accuracy"] == metrics["baseline_accuracy"]
    assert metrics["param_count"] == metrics["nonzero_param_count"] == LENET_PARAMS
    model_file = artifact(client, logged, "model.pt", tmp_path)
    assert model_file.stat().st_size == metrics["size_bytes"]
    assert_same_weights(load_state(model_file), baseline_state(logged, cache_dir))


@pytest.mark.slow
def test_compile_reports_compile_time_apart_from_latency(overrides, store):
    # threads=1 inside the placed model: the latency protocol's thread setting does not force a recompile
    place(overrides, "technique.place.device=cpu", "technique.place.compile=true", "technique.place.threads=1")
    _, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "lenet place(cpu,fp32,compiled,threads=1)"
    metrics = logged.data.metrics
    assert METRICS | {"compile_time_s"} <= set(metrics)
    assert metrics["compile_time_s"] > 0
    assert metrics["test_mismatches"] <= 2 and abs(metrics["accuracy_drop"]) <= 0.005
    assert logged.data.tags["slimlab.place.compile"] == "true"


@without_cuda
@pytest.mark.parametrize(
    "override",
    [
        "technique.place.device=cuda",
        "technique.place.device=cuda:1",
        "+technique.place.device_map={fc1:cuda}",
        "+technique.place.max_memory={cuda:1GB}",
    ],
)
def test_cuda_refused_without_cuda(overrides, store, tmp_path, override):
    with pytest.raises(ConfigError, match="torch sees no CUDA device on this machine; valid here: .*cpu"):
        run(compose([*overrides, "technique=[place]", override]))
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was recorded


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_refused_without_mps(overrides, tmp_path):
    with pytest.raises(ConfigError, match="no MPS"):
        run(compose([*overrides, "technique=[place]", "technique.place.device=mps"]))
    assert not (tmp_path / "mlflow.db").exists()


@without_cuda
def test_command_line_refuses_cuda_in_one_line_with_exit_2(tmp_path):
    result = slimlab("run", "technique=[place]", "technique.place.device=cuda", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "slimlab: error: technique.place: device=cuda but torch sees no CUDA device on this machine; "
        "valid here: auto, cpu"
    ]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("technique.place.device=tpu", "device must be one of auto, cpu, cuda, cuda:N, mps; got 'tpu'"),
        ("technique.place.dtype=int8", "dtype must be one of float32, bfloat16, float16; got 'int8'"),
        ("technique.place.threads=0", "threads must be >= 1"),
        ("+technique.place.device_map={fc1:gpu}", "device_map values must be one of cpu, disk"),
        ("+technique.place.max_memory={disk:1GB}", "max_memory keys must be cpu, cuda, cuda:N or mps"),
        ("+technique.place.max_memory={cpu:lots}", "max_memory.cpu: a size is a number of bytes"),
        ("technique=[place,prune]", "technique 'prune' cannot follow 'place'"),
    ],
)
def test_bad_input_refused_with_what_is_valid(overrides, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run(compose([*overrides, "technique=[place]", override]))
    assert not (tmp_path / "mlflow.db").exists()


def test_unknown_module_in_device_map_is_refused_before_the_run(overrides, store):
    with pytest.raises(ConfigError, match="technique.place.device_map: 'conv9' is not a module of model lenet"):
        place(overrides, "technique.place.device=cpu", "+technique.place.device_map={conv9:disk}")
    assert not Path(store.removeprefix("sqlite:///")).exists()  # refused in the plan: nothing recorded


def test_seed_heterogeneous_experiment(overrides, store):
    cfg = compose(["experiment=seed_heterogeneous", *overrides])
    accuracy = run(cfg)
    _, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    device = "cuda" if CUDA else "cpu"
    assert logged.info.run_name == f"lenet place({device},fp32)"
    metrics = logged.data.metrics
    assert METRICS <= set(metrics)
    assert metrics["accuracy"] == accuracy
    assert logged.data.tags["slimlab.place.device"].startswith(device)
    assert logged.data.tags["slimlab.techniques"] == "place"


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, slimlab.plugins.place; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_sizes_are_bytes():
    from slimlab.plugins.place import parse_size

    assert parse_size("1000") == 1000
    assert parse_size("1MB") == parse_size("1mb") == 10**6  # never bits
    assert parse_size("1.5KiB") == 1536
    with pytest.raises(ValueError, match="KiB"):
        parse_size("1 TB")


# --- where CUDA is present ---------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_placement(overrides, store, tmp_path):
    place(overrides, "technique.place.device=cuda")
    client, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    metrics = logged.data.metrics
    assert METRICS <= set(metrics)
    assert logged.data.tags["slimlab.place.device"].startswith("cuda:")
    assert metrics["test_mismatches"] <= 2 and abs(metrics["accuracy_drop"]) <= 0.005
    model_file = artifact(client, logged, "model.pt", tmp_path)
    assert model_file.stat().st_size == metrics["size_bytes"]
    load_model(LeNet(), model_file)  # saved from the GPU, loads on the CPU


@needs_cuda
def test_cuda_with_cpu_offload(overrides, store, cache_dir, tmp_path):
    # On a GPU device, a module mapped to cpu keeps its weights in CPU memory and computes on the GPU.
    place(overrides, "technique.place.device=cuda", "+technique.place.device_map={fc1:cpu}")
    client, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    device_map = json.loads(logged.data.tags["slimlab.place.device_map"])
    assert device_map["fc1"] == "cpu" and device_map["conv1"].startswith("cuda:")
    metrics = logged.data.metrics
    assert metrics["test_mismatches"] <= 2 and metrics["param_count"] == LENET_PARAMS
    model_file = artifact(client, logged, "model.pt", tmp_path)
    assert_same_weights(load_state(model_file), baseline_state(logged, cache_dir))


@needs_cuda
def test_cpu_and_cuda_compute_together(overrides, store):
    # On the CPU device, the module mapped to cuda computes on the GPU and the rest on the CPU.
    place(overrides, "technique.place.device=cpu", "+technique.place.device_map={fc1:cuda}")
    _, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    device_map = json.loads(logged.data.tags["slimlab.place.device_map"])
    assert device_map["fc1"].startswith("cuda:") and device_map["conv1"] == "cpu"
    assert logged.data.metrics["test_mismatches"] <= 2
