"""Quantization-aware training (technique qat): fake-quantized fine-tuning, then torchao's real quantization.

Small runs: LeNet / lenet_small / mlp on digits, one epoch of QAT, the session's cached baselines. No timing is
asserted, only what the numbers mean: the converted model computes what the fake-quantized one trained with, its
weights are torchao int subclasses bit-packed in the artifact, pruned zeros stay zero.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from slimlab.artifact import load_model, load_state
from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.plugin_manager import load_plugins
from slimlab.plugins.qat import QatConfig, _plan, _quantize, _train_quantized, label, max_speedup
from slimlab.runner import plan as plan_run
from slimlab.runner import run
from slimlab.testing import TechniqueContract, context
from slimlab.zoo.datasets import digits
from slimlab.zoo.models import MLP, LeNet
from tests.conftest import slimlab as slimlab_cli

logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA kernels fail to load on a CPU machine: noise


def only_run(store: str):
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def lenet_small() -> LeNet:
    torch.manual_seed(0)
    return LeNet(conv1=6, conv2=16, hidden=120).eval()


class TestQat(TechniqueContract):
    technique = "qat"
    options = ["technique.qat.epochs=1"]
    presets = ["qat_int4", "qat_int2", "qat_int8"]

    @pytest.mark.slow  # torch.export of the int4 model: about 10 s
    def test_logs_as_an_mlflow_model_that_loads_back(
        self, slimlab_compose, slimlab_plugins, slimlab_store, tiny_data, tiny_model, tmp_path
    ):
        super().test_logs_as_an_mlflow_model_that_loads_back(
            slimlab_compose, slimlab_plugins, slimlab_store, tiny_data, tiny_model, tmp_path
        )


def test_labels_and_speed_bounds():
    """Run names say the recipe; the speed bound is quantize's (32 / bits), nothing more is claimed."""
    assert label(QatConfig()) == "qat(int4-wo,g32)"
    assert label(QatConfig(weights="int2", granularity="per_channel", epochs=3)) == "qat(int2-wo,per-channel,3ep)"
    assert label(QatConfig(weights="int8", activations="int8", granularity="per_channel")) == (
        "qat(int8-dyn-int8,per-channel)"
    )
    assert [max_speedup(QatConfig(weights=w)) for w in ("int8", "int4", "int2")] == [4.0, 8.0, 16.0]


@pytest.mark.parametrize(
    "options",
    [
        {"weights": "int4", "targets": ["Linear", "Conv2d"]},
        {"weights": "int2", "granularity": "per_channel", "targets": ["Linear", "Conv2d"]},
        {"weights": "int8", "activations": "int8", "granularity": "per_channel"},
    ],
    ids=["int4-g32-conv", "int2-per-channel-conv", "int8-dynamic"],
)
def test_the_converted_model_computes_what_the_fake_quantized_one_trained_with(options):
    """torchao's convert on Linear, and our Conv2d parametrization (torchao's fake quantizer over the rows
    IntxWeightOnlyConfig groups) against the real quantize_: the same numbers (to float rounding), so training saw
    the deployed model."""
    model, config = lenet_small(), QatConfig(**options)
    x = digits(seed=0).test.inputs[:32]
    seen = {}

    def train(prepared: nn.Module) -> None:
        conv = dict(prepared.named_modules())["conv2"]
        seen["conv_prepared"] = hasattr(conv, "parametrizations")
        with torch.no_grad():
            seen["output"] = prepared(x)

    _train_quantized(model, _plan(model, config), config, train)
    assert seen["conv_prepared"] == ("Conv2d" in config.targets)
    for name in ("fc1", "fc2", *(["conv2"] if "Conv2d" in config.targets else [])):
        weight = model.get_submodule(name).weight
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor", name
        assert weight.target_dtype == getattr(torch, config.weights)
    assert type(model.conv1.weight) is nn.Parameter  # one input channel: a scale per weight, left float
    with torch.inference_mode():
        torch.testing.assert_close(model(x), seen["output"], rtol=1e-5, atol=1e-5)


def test_qat_int4_lenet_is_six_times_smaller_packed_and_reloads(overrides, store, tmp_path):
    """The quantize_int4 recipe after fine-tuning: torchao int4 subclasses, bit-packed (>= 6x smaller than fp32),
    the per-row and float layers named; the controls measure post-training quantization in the same run."""
    cfg = compose([*overrides, "technique=[qat_int4]", "technique.qat.control=true"])
    accuracy = run(cfg)
    client, logged = only_run(store)
    metrics, tags = logged.data.metrics, logged.data.tags
    assert logged.info.status == "FINISHED" and logged.info.run_name == "lenet qat(int4-wo,g32,targets=Linear+Conv2d)"
    assert metrics["compression_ratio"] >= 6
    assert metrics["accuracy_drop"] <= 0.02
    assert metrics["qat_gain"] == pytest.approx(metrics["accuracy"] - metrics["tuned_ptq_accuracy"])
    assert 0.5 < metrics["ptq_accuracy"] <= 1 and 0.5 < metrics["tuned_ptq_accuracy"] <= 1
    assert tags["slimlab.qat.per_row"] == "conv2, fc2" and tags["slimlab.qat.left_float"] == "conv1"
    assert "not a faster model" in tags["slimlab.qat.kernel"] and "slimlab.qat.held_zeros" not in tags
    path = Path(client.download_artifacts(logged.info.run_id, "model.pt", str(tmp_path)))
    assert path.stat().st_size == metrics["size_bytes"]
    state = load_state(path)
    assert state["fc1.weight"].target_dtype == torch.int4 and state["fc1.weight"].block_size == (1, 32)
    assert state["conv2.weight"].target_dtype == torch.int4 and state["conv1.weight"].dtype == torch.float32
    data = digits(seed=0)
    reloaded = load_model(LeNet(), path).eval()
    with torch.inference_mode():
        assert (reloaded(data.test.inputs).argmax(1) == data.test.targets).float().mean().item() == pytest.approx(
            accuracy, abs=1e-6
        )


def test_the_control_is_quantize_int4s_recipe(overrides, tmp_path):
    """The controls quantize as `quantize` with the same weight recipe does: identical integers and scales."""
    plugins = load_plugins()
    cfg = compose([*overrides, "technique=[quantize_int4]"], plugins)
    (step,) = plan_run(cfg, plugins).steps
    model = LeNet().eval()
    ctx = context(cfg, digits(seed=0), tmp_path)
    by_quantize = step.technique.apply(copy.deepcopy(model), step.config, ctx)
    config = QatConfig(targets=["Linear", "Conv2d"])
    ours = copy.deepcopy(model)
    _quantize(ours, _plan(ours, config), config, None)
    theirs = by_quantize.state_dict()
    for name, value in ours.state_dict().items():
        if type(value).__name__ == "IntxUnpackedToInt8Tensor":
            assert torch.equal(value.qdata, theirs[name].qdata) and torch.equal(value.scale, theirs[name].scale), name
        else:
            assert torch.equal(value, theirs[name]), name


@pytest.mark.parametrize("targets", [["Linear", "Conv2d"], ["Linear"]], ids=["convs-fake-quantized", "convs-float"])
def test_pruned_zeros_stay_zero_through_qat(targets, overrides, tmp_path):
    """prune removes its masks when done, so qat sees plain zeros: fine-tuning would regrow them unless held, in the
    fake-quantized layers (Linear: prune mask on torchao's FakeQuantizedLinear; Conv2d: in the parametrization) and
    in the layers QAT leaves float. int8: one epoch regrows less than half an int4 step, which would round it away."""
    plugins = load_plugins()
    options = [
        "technique.prune.amount=0.7",
        "technique.qat.weights=int8",
        f"technique.qat.targets=[{','.join(targets)}]",
    ]
    cfg = compose([*overrides, "model=lenet_small", "technique=[prune,qat]", *options], plugins)
    prune_step, qat_step = plan_run(cfg, plugins).steps
    data, model = digits(seed=0), lenet_small()
    ctx = context(cfg, data, tmp_path, copy.deepcopy(model), plugins)
    pruned = prune_step.technique.apply(model, prune_step.config, ctx)
    weights = {n: m.weight.detach().clone() for n, m in pruned.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    zeros = {name: weight.eq(0) for name, weight in weights.items()}
    assert sum(int(z.sum()) for z in zeros.values()) > 0.6 * sum(w.numel() for w in weights.values())
    done = qat_step.technique.apply(pruned, qat_step.config, ctx)
    for name, zero in zeros.items():
        weight = done.get_submodule(name).weight
        values = weight.dequantize() if type(weight) is not nn.Parameter else weight.detach()
        assert not values[zero].any(), f"{name}: pruned weights regrown"
        assert not torch.equal(values, weights[name]), f"{name}: not fine-tuned"
    assert ctx.tags["slimlab.qat.held_zeros"] == "conv1, conv2, fc1, fc2"


@pytest.mark.slow  # the positions are checked above; this is the same through the runner
def test_prune_then_qat_run_keeps_the_sparsity(overrides, store):
    cfg = compose([*overrides, "model=mlp", "technique=[prune,qat]", "technique.prune.amount=0.8"])
    run(cfg)
    _, logged = only_run(store)
    assert logged.info.run_name == "mlp prune(0.8)+qat(int4-wo,g32)"
    weights = 784 * 128 + 128 * 10
    assert logged.data.metrics["nonzero_param_count"] <= 0.2 * weights + 128 + 10  # the biases are not pruned
    assert logged.data.tags["slimlab.qat.per_row"] == "fc1"  # 784 is not a multiple of 32


BAD_OPTIONS = {
    "group-size": (["group_size=48"], r"group_size must be a power of two >= 2 \(16, 32, 64...\), got 48"),
    "group-size-per-channel": (
        ["granularity=per_channel", "group_size=32"],
        r"group_size applies to granularity=per_group, not per_channel",
    ),
    "per-tensor": (["granularity=per_tensor"], r"granularity must be one of per_group, per_channel"),
    "weights": (["weights=int3"], r"weights must be one of int2, int4, int8"),
    "epochs": (["epochs=0"], r"epochs must be >= 1"),
    "lr": (["lr=0"], r"lr must be > 0"),
    "no-targets": (["targets=[]"], r"targets must be a non-empty list of distinct Linear, Conv2d"),
    "activations-on-conv": (
        ["activations=int8", "targets=[Linear,Conv2d]"],
        r"activations=int8 fake-quantizes Linear inputs only",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_refused_before_any_work(case, overrides, tmp_path):
    options, message = BAD_OPTIONS[case]
    with pytest.raises(ConfigError, match=rf"^technique\.qat: {message}") as refused:
        run(compose([*overrides, "technique=[qat]", *(f"technique.qat.{option}" for option in options)]))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded


def test_a_bad_option_exits_2_with_one_line_and_only_place_may_follow(tmp_path):
    store = f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"
    result = slimlab_cli("run", "technique=[qat]", "technique.qat.group_size=48", store, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "slimlab: error: technique.qat: group_size must be a power of two >= 2 (16, 32, 64...), got 48"
    ]
    with pytest.raises(ConfigError, match=r"technique 'prune' cannot follow 'qat' \('qat' may be followed by: place\)"):
        run(compose(["technique=[qat,prune]", "tracking=none"]))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_a_model_without_the_targeted_layers_fails_with_the_reason():
    with pytest.raises(ValueError, match="the model has no Conv2d layers to quantize"):
        _plan(MLP(), QatConfig(targets=["Conv2d"]))
