"""int4 weights on the CPU (torchao's Intx configs), the artifact's packed sub-byte integers, any torchao config.

The runs are small (LeNet on digits with the session's cached baseline, a 2-layer MiniLM on a dozen sentences);
no timing is asserted, only that the speed bound holds and the files really shrink.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

import slimlab
from slimlab.artifact import _decode_entry, _encode_entry, decode_tensor, encode_tensor, load_model, load_state
from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.runner import run
from slimlab.zoo.datasets import digits
from slimlab.zoo.models import LeNet
from tests.conftest import slimlab as slimlab_cli

logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA kernels fail to load on a CPU machine: noise

KERNEL_TAG = "slimlab.quantize.kernel"


def only_run(store: str):
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def artifact(client: MlflowClient, logged, tmp_path: Path) -> Path:
    path = Path(client.download_artifacts(logged.info.run_id, "model.pt", str(tmp_path)))
    assert path.stat().st_size == logged.data.metrics["size_bytes"]  # the file the metric describes
    return path


def digits_accuracy(model: nn.Module) -> float:
    data = digits(seed=0)
    with torch.inference_mode():
        return (model(data.test.inputs).argmax(1) == data.test.targets).float().mean().item()


# --- the artifact: sub-byte integers bit-packed, exactly ------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("signed", [True, False], ids=["int", "uint"])
@pytest.mark.parametrize("zeros", [0.0, 0.9], ids=["dense", "sparse"])
def test_narrow_integers_pack_to_their_width_and_round_trip_exactly(bits, signed, zeros):
    low = -(2 ** (bits - 1)) if signed else 0
    generator = torch.Generator().manual_seed(bits)
    values = torch.randint(low, low + 2**bits, (37, 29), generator=generator, dtype=torch.int8)
    values[torch.rand(values.shape, generator=generator) < zeros] = 0
    for compact in (True, False):
        stored = encode_tensor(values, compact, narrow=(bits, low))
        decoded = decode_tensor(stored)
        assert decoded.dtype == torch.int8 and decoded.shape == values.shape and torch.equal(decoded, values)
        packed = stored["values"] if "mask" in stored else stored
        assert packed["planes"].dtype == torch.uint8 and packed["planes"].shape[0] == bits
    dense = encode_tensor(values, compact=False, narrow=(bits, low))["planes"]
    assert dense.numel() == bits * -(-values.numel() // 8)  # `bits` bits a value, not 8


def test_values_outside_the_promised_range_are_stored_as_they_are():
    """A subclass that says int4 but holds an 8 is not packed as int4, never clipped: stored exactly (here as a
    palette of its four values, which is what any tensor of few values gets)."""
    values = torch.tensor([[-8, 7, 8, 1] * 20], dtype=torch.int8)
    stored = encode_tensor(values, narrow=(4, -8))
    assert torch.equal(decode_tensor(stored), values) and stored["palette"].tolist() == [-8, 1, 7, 8]
    values[0, ::4] = 0  # as the non-zero values of a sparse tensor: exact too
    assert torch.equal(decode_tensor(encode_tensor(values, narrow=(4, -8))), values)
    small = torch.tensor([[-8.0, 7.0, 3.0, 1.0] * 20])  # in range, but floats are never int-packed
    stored = encode_tensor(small, narrow=(4, -8))
    assert "planes" not in stored and stored["palette"].dtype == torch.float32
    assert torch.equal(decode_tensor(stored), small)


def test_constant_tensors_are_one_value():
    zeros = torch.zeros(8, 128, dtype=torch.int8)  # the zero points of symmetric quantization
    stored = encode_tensor(zeros)
    assert stored["fill"].numel() == 1 and torch.equal(decode_tensor(stored), zeros)
    scales = torch.full((4, 25), 0.125)
    assert torch.equal(decode_tensor(encode_tensor(scales)), scales) and encode_tensor(scales)["fill"] == 0.125


@pytest.mark.parametrize("mapping", ["SYMMETRIC", "ASYMMETRIC"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["weight-only", "int8-dynamic"])
def test_int4_weights_encode_to_half_a_byte_and_decode_identically(mapping, dynamic):
    import torchao.quantization as ao

    torch.manual_seed(0)
    layer = nn.Linear(256, 64)
    kind = getattr(ao.MappingType, mapping)
    if dynamic:
        recipe = ao.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=ao.PerGroup(32), weight_mapping_type=kind
        )
    else:
        recipe = ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(32), mapping_type=kind)
    ao.quantize_(layer, recipe)
    weight = layer.weight
    stored = _encode_entry(weight)
    qdata = stored["inner"]["qdata"]
    assert qdata["bits"] == 4 and qdata["planes"].numel() == weight.numel() // 2  # two int4 values a byte
    assert stored["inner"]["scale"].dtype == weight.scale.dtype  # scales as torchao keeps them
    zero_point = stored["inner"]["zero_point"]
    if mapping == "SYMMETRIC":  # all zero: one value
        assert zero_point["fill"].numel() == 1
    else:  # in the int4 range too: packed (dense, or its non-zero values)
        assert zero_point.get("values", zero_point)["bits"] == 4
    decoded = _decode_entry(stored)
    assert type(decoded) is type(weight)
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(decoded, name), getattr(weight, name))
    assert decoded.activation_quantization == weight.activation_quantization
    x = torch.randn(4, 256)
    assert torch.equal(nn.functional.linear(x, decoded), nn.functional.linear(x, weight))


# --- int4 schemes through the runner -------------------------------------------------------------------------------


def test_int4_speed_bound_and_labels():
    """int4 weights are 8x narrower than fp32: the bound a measured speedup is checked against (the runner fails a
    run above it); a torchao config claims none. The group size is in the run name."""
    from slimlab.plugins.quantize import QuantizeConfig, label, max_speedup

    for scheme, name in (("int4_weight_only", "int4-wo"), ("int8_dynamic_int4", "int8-dyn-int4")):
        assert max_speedup(QuantizeConfig(scheme=scheme)) == 8.0
        assert label(QuantizeConfig(scheme=scheme, group_size=128)) == f"quantize({name},g128)"
    assert QuantizeConfig(scheme="int4_weight_only").group_size == 32 and QuantizeConfig().group_size is None
    spec = {"_target_": "torchao.quantization.IntxWeightOnlyConfig", "weight_dtype": "int2"}
    assert max_speedup(QuantizeConfig(config=spec)) is None
    assert label(QuantizeConfig(config=spec, embeddings=True)) == "quantize(IntxWeightOnlyConfig,int2,per-row,emb)"


def test_int4_lenet_is_six_times_smaller_keeps_accuracy_and_reloads(overrides, store, tmp_path):
    """The issue's done-when on LeNet: the int4 artifact is >= 6x smaller than the fp32 file; accuracy within 0.02."""
    cfg = compose([*overrides, "technique=[quantize_int4]"])
    accuracy = run(cfg)
    client, logged = only_run(store)
    metrics, tags = logged.data.metrics, logged.data.tags
    assert (
        logged.info.status == "FINISHED" and logged.info.run_name == "lenet quantize(int4-wo,g32,targets=Linear+Conv2d)"
    )
    assert metrics["compression_ratio"] >= 6
    assert metrics["accuracy_drop"] <= 0.02
    assert metrics["speedup"] > 0  # measured, not asserted: slower than fp32 on a CPU without int4 kernels
    # fc1 (800 wide) in groups of 32; conv2 (20 input channels) and fc2 (500) one group per row; conv1 (one input
    # channel: a scale per weight) stays float
    assert tags["slimlab.quantize.per_row"] == "conv2, fc2" and tags["slimlab.quantize.left_float"] == "conv1"
    assert "not a faster model" in tags[KERNEL_TAG]
    assert logged.data.params["technique.quantize.group_size"] == "32"
    path = artifact(client, logged, tmp_path)
    state = load_state(path)
    assert state["fc1.weight"].qdata.dtype == torch.int8 and state["fc1.weight"].block_size == (1, 32)
    assert state["conv1.weight"].dtype == torch.float32
    assert digits_accuracy(load_model(LeNet(), path).eval()) == pytest.approx(accuracy, abs=1e-6)


class Int4Net(nn.Module):
    """Every int4 case at once: an embedding (rows of 32), convs with 1 and 4 input channels, Linear layers with
    rows of 160 (groups of 32) and 48 (one group per row)."""

    def __init__(self, levels: int = 4) -> None:
        super().__init__()
        self.levels = levels
        self.register_buffer("offsets", torch.arange(784) * levels, persistent=False)
        self.embed = nn.Embedding(784 * levels, 32)
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.conv2 = nn.Conv2d(4, 8, 5)
        self.fc1 = nn.Linear(8 * 4 * 4 + 32, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = ((torch.flatten(x, 1) + 1) * self.levels / 4).long().clamp(0, self.levels - 1)
        embedded = self.embed(level + self.offsets).mean(dim=1)
        h = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        h = torch.relu(self.fc1(torch.cat([torch.flatten(h, 1), embedded], dim=1)))
        return torch.log_softmax(self.fc2(h), dim=1)


@pytest.mark.parametrize("scheme", ["int4_weight_only", "int8_dynamic_int4"])
def test_int4_artifact_reloads_with_identical_outputs(scheme, store, tmp_path):
    """The deployed model and the artifact loaded into a fresh instance give the same outputs, bit for bit."""
    torch.manual_seed(0)
    targets = ["Linear", "Conv2d"] if scheme == "int4_weight_only" else ["Linear"]  # torchao's dynamic: 2-D only
    options = {"scheme": scheme, "targets": targets, "embeddings": True, "allow_slower": True}
    result = slimlab.compress(
        Int4Net(), digits(seed=0), ["quantize"], tracking=store, quantize=options, measure={"repeats": 5, "warmup": 1}
    )
    client, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["slimlab.quantize.per_row"] == ("conv2, fc2" if "Conv2d" in targets else "fc2")
    reloaded = load_model(Int4Net(), artifact(client, logged, tmp_path)).eval()
    assert type(reloaded.embed.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert reloaded.embed.weight.target_dtype == torch.int4
    x = digits(seed=0).test.inputs[:64]
    with torch.inference_mode():
        assert torch.equal(reloaded(x), result.model(x))


@pytest.mark.slow
def test_int4_compiled_says_where_the_dequantization_goes(overrides, store):
    run(compose([*overrides, "technique=[quantize_int4]", "technique.quantize.compile=true"]))
    _, logged = only_run(store)
    assert (
        logged.info.status == "FINISHED"
        and logged.info.run_name == "lenet quantize(int4-wo,g32,compiled,targets=Linear+Conv2d)"
    )
    assert logged.data.metrics["compression_ratio"] >= 6 and logged.data.metrics["compile_time_s"] > 0
    assert "inside the torch.compile'd graph" in logged.data.tags[KERNEL_TAG]


def test_int8_dynamic_int4_runs_on_lenet(overrides, store):
    run(compose([*overrides, "technique=[quantize_int8_int4]"]))
    _, logged = only_run(store)
    metrics = logged.data.metrics
    assert logged.info.status == "FINISHED" and logged.info.run_name == "lenet quantize(int8-dyn-int4,g32)"
    assert metrics["accuracy_drop"] <= 0.02
    assert metrics["compression_ratio"] > 4.5  # the convolutions stay fp32: torchao's dynamic config takes 2-D weights


def test_int4_minilm_with_embeddings_is_six_times_smaller(overrides, store, tmp_path):
    """A 2-layer MiniLM with its word embeddings (most of its parameters) in int4: >= 6x smaller, and it reloads."""
    from slimlab.zoo.datasets import sentences
    from slimlab.zoo.models import SentenceEmbedding
    from tests.test_minilm import FEW

    few = tmp_path / "few.txt"
    few.write_text(FEW)
    data = ["model=minilm", "model.num_layers=2", "data=sentences", f"data.path={few}", "data.test_fraction=0.5"]
    cosine = run(compose([*overrides, *data, "technique=[quantize_int4_emb]"]))
    client, logged = only_run(store)
    metrics = logged.data.metrics
    assert (
        logged.info.status == "FINISHED"
        and logged.info.run_name == "minilm quantize(int4-wo,g32,emb,targets=Linear+Conv2d)"
    )
    assert metrics["compression_ratio"] >= 6
    assert cosine > 0.9  # the full model: 0.960 on the sentence set (BENCHMARKS-style figures in the report)
    assert "slimlab.quantize.per_row" not in logged.data.tags  # every row is a multiple of 32 (384, 1536)
    reloaded = load_model(SentenceEmbedding(num_layers=2), artifact(client, logged, tmp_path)).eval()
    baseline = SentenceEmbedding(num_layers=2).eval()
    inputs = sentences(path=str(few), test_fraction=0.5, seed=0).test.inputs
    with torch.inference_mode():
        again = nn.functional.cosine_similarity(reloaded(**inputs), baseline(**inputs)).mean().item()
    assert again == pytest.approx(cosine, abs=1e-6)


# --- any torchao config --------------------------------------------------------------------------------------------

PER_GROUP_32 = "granularity:{_target_:torchao.quantization.PerGroup,group_size:32}"
INTX = "_target_:torchao.quantization.IntxWeightOnlyConfig"


def test_a_torchao_config_by_target_runs(overrides, store):
    """The preset's asymmetric int4 config (strings made dtype and enum), with LeNet's 500-wide fc2 kept float."""
    cfg = compose([*overrides, "technique=[quantize_ao_config]", "technique.quantize.keep_float=[fc2]"])
    run(cfg)
    _, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "lenet quantize(IntxWeightOnlyConfig,int4,g32,keep_float=fc2)"
    assert logged.data.params["technique.quantize.config.mapping_type"] == "asymmetric"
    assert logged.data.metrics["compression_ratio"] > 3.5 and logged.data.metrics["accuracy_drop"] <= 0.02


def test_fqn_to_config_quantizes_per_layer(overrides, store, tmp_path):
    per_layer = f"{{_target_:torchao.quantization.FqnToConfig,fqn_to_config:{{fc1:{{{INTX},weight_dtype:int4,{PER_GROUP_32}}},fc2:null}}}}"  # noqa: E501
    run(
        compose(
            [
                *overrides,
                "technique=[quantize]",
                "technique.quantize.allow_slower=true",
                f"technique.quantize.config={per_layer}",
            ]
        )
    )
    client, logged = only_run(store)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "lenet quantize(FqnToConfig)"
    state = load_state(artifact(client, logged, tmp_path))
    assert state["fc1.weight"].target_dtype == torch.int4 and state["fc2.weight"].dtype == torch.float32


BAD_CONFIGS = {  # value of technique.quantize.config (or other options): the refusal
    "unknown-target": (
        ["config={_target_:torchao.quantization.NoSuchConfig}"],
        r"config._target_='torchao.quantization.NoSuchConfig' cannot be imported",
    ),
    "wrong-argument": (
        [f"config={{{INTX},weight_dtyp:int4}}"],
        r"config: torchao.quantization.IntxWeightOnlyConfig refuses these arguments: TypeError: .*weight_dtyp",
    ),
    "not-a-dtype": ([f"config={{{INTX},weight_dtype:int42}}"], r"config.weight_dtype='int42' is not a torch dtype"),
    "torchao-refuses": (
        [f"config={{{INTX},weight_dtype:float32}}"],
        r"config: torchao.quantization.IntxWeightOnlyConfig refuses these arguments: AssertionError: weight_dtype must",
    ),
    "not-an-enum-member": (
        [f"config={{{INTX},mapping_type:sideways}}"],
        r"config.mapping_type='sideways' is not a MappingType; valid: symmetric, ",
    ),
    "bad-nested-target": (
        [f"config={{{INTX},granularity:{{_target_:torchao.quantization.PerGroup,size:32}}}}"],
        r"config.granularity: torchao.quantization.PerGroup refuses these arguments: TypeError",
    ),
    "not-a-config": (
        ["config={_target_:torchao.quantization.PerGroup,group_size:32}"],
        r"config._target_='torchao.quantization.PerGroup' is not a torchao config \(AOBaseConfig\)",
    ),
    "no-target": (["config={weight_dtype:int4}"], r"config must be a torchao config node \{_target_: "),
    "config-and-scheme": ([f"config={{{INTX}}}", "scheme=int8_dynamic"], r"scheme=int8_dynamic and config are"),
    "config-on-eager": ([f"config={{{INTX}}}", "backend=eager"], r"config is a torchao config: it needs backend="),
    "group-not-dividing": (  # LeNet's fc2 is 500 wide: found on the model built on the meta device
        [f"config={{{INTX},weight_dtype:int4,{PER_GROUP_32}}}"],
        r"the config's PerGroup\(32\) does not divide the rows of fc2 \(500\): keep them float",
    ),
    "fqn-and-keep-float": (
        ["config={_target_:torchao.quantization.FqnToConfig,fqn_to_config:{fc2:null}}", "keep_float=[fc1]"],
        r"with FqnToConfig the config picks the layers",
    ),
    "group-size-not-power-of-two": (
        ["scheme=int4_weight_only", "group_size=48"],
        r"group_size must be a positive power of two \(32, 64, 128...\), got 48",
    ),
    "group-size-zero": (["scheme=int4_weight_only", "group_size=0"], r"group_size must be a positive power of two"),
    "group-size-for-int8": (["scheme=int8_dynamic", "group_size=64"], r"group_size applies to int4 schemes"),
    "granularity-for-int4": (
        ["scheme=int8_dynamic_int4", "granularity=per_tensor"],
        r"granularity applies to int8 and float8 schemes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_are_refused_before_any_work(case, overrides, store, tmp_path):
    options, message = BAD_CONFIGS[case]
    cfg = compose(
        [
            *overrides,
            "technique=[quantize]",
            *(f"technique.quantize.{o}" for o in options),
        ]
    )
    # the plan's refusals are "technique.quantize: ...", the one that needs the model "technique.quantize.config: ..."
    with pytest.raises(ConfigError, match=rf"^technique\.quantize(: |\.config: ){message}") as refused:
        run(cfg)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded


def test_a_config_this_machine_cannot_run_is_refused_by_the_probe(overrides, store, tmp_path):
    """torchao's Int4WeightOnlyConfig needs a kernel package (mslk) a CPU build lacks: the probe says so."""
    cfg = compose(
        [
            *overrides,
            "technique=[quantize]",
            "technique.quantize.config={_target_:torchao.quantization.Int4WeightOnlyConfig}",
        ]
    )  # noqa: E501
    if torch.cuda.is_available():
        pytest.skip("a machine with the kernels runs it")
    with pytest.raises(ConfigError, match=r"^technique.quantize: config Int4WeightOnlyConfig cannot run here: \w+"):
        run(cfg)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_bad_config_exits_2_with_one_line(tmp_path):
    result = slimlab_cli(
        "run",
        "technique=[quantize]",
        "technique.quantize.config={_target_:torchao.quantization.NoSuchConfig}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("slimlab: error: technique.quantize: config._target_=")
    assert "Traceback" not in result.stderr and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "outputs").exists()


def test_a_quantize_node_outside_the_pipeline_is_not_checked():
    """An experiment may set technique.quantize.config for a list that leaves quantize out: ignored, not refused."""
    from slimlab.plugins import quantize as quantize_plugin

    config = "{_target_:torchao.quantization.IntxWeightOnlyConfig,weight_dtype:int4}"
    quantize_plugin.check_config(cfg=compose(["technique=[]", f"+technique.quantize.config={config}"]), host=True)
