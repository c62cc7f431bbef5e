"""Host-aware quantization: a recipe is timed on this run's layers before it runs and refused if slower than fp32
here (allow_slower=true runs it, flagged); backend ort runs ONNX Runtime's own int8 inside quantize; backend auto
keeps the fastest candidate that keeps the outputs; any run slower than its baseline says so.

Whether a given recipe is slower depends on the machine, so no test expects a given verdict from a timing: the
refusal is checked with a ratio handed in, and runs are checked for a verdict consistent with what they measured.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from slimlab.config import compose
from slimlab.plugins.quantize import QuantizeConfig
from slimlab.plugins.quantize.speed import SLOWER, SlowerThanFloat, judge, layer_calls
from slimlab.runner import run_metrics
from tests.test_cli import assert_refused, slimlab_here  # noqa: F401 (a fixture)

# Two cheap candidates that run anywhere slimlab runs, and one that cannot run on a CPU (2:4 sparse kernels).
CHEAP = "[{backend:eager,scheme:dynamic},{backend:ort,scheme:dynamic},{backend:torchao,scheme:sparse_2_4}]"


def only_run(store: str):
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return client, run


class FakeContext:
    """What judge() reads of a run: its measure settings; what it writes: tags."""

    def __init__(self) -> None:
        self.cfg = compose([])
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, float] = {}


def test_a_recipe_measured_slower_than_fp32_is_refused_with_the_ratio_and_the_way_out():
    with pytest.raises(SlowerThanFloat) as refused:
        judge(0.42, "measured on the model's layers fc1", QuantizeConfig(), FakeContext(), "quantize(int8-wo)")
    message = str(refused.value)
    assert "quantize(int8-wo) runs 0.42x as fast as fp32 on this machine" in message
    assert "fc1" in message and "flags" in message  # what was measured, and on which CPU
    assert "quantize_auto" in message and "technique.quantize.allow_slower=true" in message


def test_allow_slower_runs_it_and_flags_it():
    ctx = FakeContext()
    judge(0.42, "measured on fc1", QuantizeConfig(allow_slower=True), ctx, "quantize(int8-wo)")
    assert ctx.tags["slimlab.quantize.slower"].startswith("0.42x fp32 speed on this machine")
    assert ctx.tags["slimlab.quantize.probe"] == "0.42x fp32, measured on fc1"


def test_within_timing_noise_of_fp32_is_not_slower():
    ctx = FakeContext()
    judge(SLOWER, "measured on fc1", QuantizeConfig(), ctx, "quantize(int8-wo)")
    assert "slimlab.quantize.slower" not in ctx.tags


def test_the_probe_times_the_run_s_own_layer_shapes():
    """Each distinct targeted layer once, with the input the model gives it and how often it is called."""
    from slimlab.plugins.quantize.layers import _selector
    from slimlab.zoo.models import LeNet

    layers = layer_calls(LeNet().eval(), _selector(["Linear"], []), torch.randn(16, 1, 28, 28))
    assert [(layer.name, tuple(layer.inputs.shape), layer.calls) for layer in layers] == [
        ("fc1", (16, 800), 1),
        ("fc2", (16, 500), 1),
    ]


def test_a_run_s_probe_verdict_matches_what_it_measured(overrides, store):
    """The probe's ratio is logged; the run is flagged slower exactly when the ratio (or its speedup) says so."""
    run_metrics(compose([*overrides, "technique=[quantize]", "technique.quantize.allow_slower=true"]))
    _, run = only_run(store)
    ratio, tags = run.data.metrics["probe_speedup"], run.data.tags
    assert ratio > 0 and tags["slimlab.quantize.probe"].startswith(f"{ratio:.2f}x fp32, measured on the model's layers")
    assert ("slimlab.quantize.slower" in tags) == (ratio < SLOWER)
    assert ("slimlab.slower" in tags) == (run.data.metrics["speedup"] < 1)


def test_auto_keeps_the_fastest_candidate_that_keeps_the_outputs(overrides, store, tmp_path):
    run_metrics(compose([*overrides, "technique=[quantize_auto]", f"technique.quantize.candidates={CHEAP}"]))
    client, run = only_run(store)
    assert run.info.run_name == "lenet quantize(auto,own candidates)"
    table = Path(client.download_artifacts(run.info.run_id, "quantize_auto.md", str(tmp_path))).read_text()
    rows = {
        cells[0]: cells[1:]
        for line in table.splitlines()
        if line.startswith("| quantize(")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert set(rows) == {"quantize(eager-dyn)", "quantize(ort-int8-dyn)", "quantize(sparse-2:4)"}
    assert rows["quantize(sparse-2:4)"][-1].startswith("failed: ")  # cannot run here, and says why
    ran = {label: float(cells[0].rstrip("x")) for label, cells in rows.items() if not cells[-1].startswith("failed")}
    chosen = max(ran, key=ran.get)  # every candidate keeps the outputs of LeNet at cosine 0.99
    assert rows[chosen][-1] == "chosen" and run.data.tags["slimlab.quantize.auto"] == chosen
    assert run.data.metrics["auto_cosine"] >= 0.99


def test_auto_refuses_when_no_candidate_keeps_the_outputs(overrides, store):
    cfg = compose([*overrides, "technique=[quantize_auto]", "technique.quantize.candidates=[{backend:eager}]"])
    cfg.technique.quantize.min_cosine = 1.0  # int8 never reproduces fp32 exactly
    with pytest.raises(Exception, match="no candidate keeps min_cosine=1.0"):
        run_metrics(cfg)
    _, run = only_run(store)
    assert run.info.status == "FAILED"


def test_ort_backend_deploys_onnx_runtime_and_is_measured_against_the_torch_model(overrides, store):
    _, metrics = run_metrics(compose([*overrides, "technique=[quantize_ort]", "technique.quantize.allow_slower=true"]))
    _, run = only_run(store)
    assert run.info.run_name == "lenet quantize(ort-int8-dyn)"
    assert metrics["ort_speedup"] > 0 and run.data.tags["slimlab.quantize.probe"].endswith("on the whole model")
    assert "MatMulInteger" in run.data.tags["slimlab.onnx.ops"]  # ONNX Runtime's int8 matmuls, not fp32 MatMul
    assert abs(metrics["accuracy"] - metrics["baseline_accuracy"]) <= 0.02


@pytest.mark.parametrize(
    "args,message",
    [
        (["technique=[quantize_ort,place]"], "backend=ort deploys an ONNX Runtime model"),
        (["technique=[quantize_auto,place]"], "backend=auto deploys"),
        (["technique=[quantize_auto]", "technique.quantize.min_cosine=1.5"], "min_cosine must be in (0, 1]"),
        (["technique=[quantize_auto]", "technique.quantize.candidates=[{backend:auto}]"], "candidates[0] must be"),
        (["technique=[quantize_auto]", "technique.quantize.candidates=[{backend:eager,bits:3}]"], "unknown options"),
        (["technique=[quantize]", "technique.quantize.candidates=[{backend:eager}]"], "candidates apply to backend"),
        (["technique=[quantize_ort]", "technique.quantize.keep_float=[fc1]"], "keep_float is not supported"),
    ],
    ids=["ort-last", "auto-last", "min-cosine", "auto-in-auto", "unknown-option", "not-auto", "ort-keep-float"],
)
def test_bad_auto_and_ort_options_are_refused_up_front(args, message, slimlab_here, tmp_path, store, capsys):  # noqa: F811
    code = slimlab_here("run", *args, f"tracking.uri={store}")
    assert_refused(code, capsys.readouterr().err, message, tmp_path)


def test_a_refused_recipe_fails_the_run_with_the_reason_and_no_traceback(
    slimlab_here,  # noqa: F811
    monkeypatch,
    overrides,
    store,
    capsys,
    tmp_path,
):
    """Through the CLI: exit 1, one line, the MLflow run FAILED with the reason. The bar is raised out of reach so
    that any measured ratio is below it, whatever this machine's."""
    from slimlab.plugins.quantize import speed

    monkeypatch.setattr(speed, "SLOWER", 1e9)
    code = slimlab_here("run", *overrides, "technique=[quantize]")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("slimlab:")]
    assert line.startswith("slimlab: run failed: SlowerThanFloat: quantize(int8-wo) runs ") and "allow_slower" in line
    client, run = only_run(store)
    assert run.info.status == "FAILED"
    recorded = Path(client.download_artifacts(run.info.run_id, "traceback.txt", str(tmp_path))).read_text()
    assert "SlowerThanFloat: quantize(int8-wo) runs " in recorded


def test_the_probe_leaves_the_model_as_it_found_it():
    """A BatchNorm in training mode would update its running statistics on the probe's forward pass."""
    from torch import nn

    from slimlab.plugins.quantize.layers import _selector

    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    layers = layer_calls(model, _selector(["Linear"], []), torch.randn(16, 8) * 5 + 3)
    assert len(layers) == 2 and model.training
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
