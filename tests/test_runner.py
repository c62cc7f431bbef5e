"""End to end through the runner, against a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from slimlab.artifact import load_model, load_state, save_model
from slimlab.config import compose
from slimlab.plugin_manager import load_plugins
from slimlab.runner import run
from slimlab.zoo.datasets import digits
from slimlab.zoo.models import LeNet

METRICS = {
    "accuracy", "baseline_accuracy", "accuracy_drop", "size_bytes", "baseline_size_bytes", "compression_ratio",
    "param_count", "nonzero_param_count", "sparsity", "latency_ms", "latency_ms_p95", "speedup",
}  # fmt: skip


def only_run(store: str):
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def artifact_paths(client, run_id, path=None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_quickstart_logs_every_metric_and_artifact(overrides, store, tmp_path):
    cfg = compose(["experiment=quickstart", *overrides])
    accuracy = run(cfg)
    client, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "lenet prune(0.9,fine_tune_epochs=2)+quantize(int8-wo)"
    metrics = logged.data.metrics
    assert METRICS <= set(metrics)
    assert metrics["accuracy"] == accuracy
    assert metrics["compression_ratio"] == pytest.approx(metrics["baseline_size_bytes"] / metrics["size_bytes"])
    assert metrics["sparsity"] > 0.85  # 90% of weights pruned (biases are kept)
    assert logged.data.params["technique.prune.amount"] == "0.9"
    # one param per option, as the technique ran it: the scheme the backend chose, not the config's None
    params = logged.data.params
    assert params["technique.quantize.scheme"] == "int8_weight_only" and params["techniques"] == "prune+quantize"
    assert params["technique.quantize.compile"] == "False" and params["model.name"] == "lenet"
    assert not [key for key in params if key.startswith(("prune.", "quantize.")) or key in ("model", "data")]
    # One log_batch call for all metrics (one log_metric call costs about 5 ms against sqlite): one timestamp.
    assert len({client.get_metric_history(logged.info.run_id, name)[0].timestamp for name in METRICS}) == 1
    tags = logged.data.tags
    assert tags["slimlab.techniques"] == "prune,quantize"
    assert "prune:slimlab==0.1.0" in tags["slimlab.plugins"] and len(tags["slimlab.config_hash"]) == 16
    assert {"config.yaml", "overrides.txt", "stages.json", "model.pt"} <= artifact_paths(client, logged.info.run_id)

    # size_bytes is the size of the very file logged, and that file reloads to the same model.
    model_file = Path(client.download_artifacts(logged.info.run_id, "model.pt", str(tmp_path)))
    assert model_file.stat().st_size == metrics["size_bytes"]
    assert not [key for key in load_state(model_file) if key.endswith(("_orig", "_mask"))]  # pruning is permanent
    reloaded = load_model(LeNet(), model_file)
    data = digits(seed=cfg.seed)
    predictions = reloaded(data.test.inputs).argmax(1)
    assert (predictions == data.test.targets).float().mean().item() == pytest.approx(accuracy)


def test_baseline_trained_once_then_cached(overrides, store):
    first = compose([*overrides, "technique=[prune]", "technique.prune.amount=0.2", "seed=7"])
    second = compose([*overrides, "technique=[prune]", "technique.prune.amount=0.4", "seed=7"])
    run(first)
    run(second)
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id], order_by=["start_time ASC"])
    assert [r.data.tags["slimlab.baseline"].split()[1] for r in runs] == ["(trained)", "(cached)"]
    assert runs[0].data.metrics["baseline_accuracy"] == runs[1].data.metrics["baseline_accuracy"]


def test_tracking_none_writes_nothing(overrides, store, tmp_path):
    run(compose([*overrides, "tracking=none", "technique=[prune]"]))
    assert not (tmp_path / "mlflow.db").exists()


def test_failing_technique_records_failed_run_with_traceback(with_plugins, overrides, store, tmp_path):
    plugins = load_plugins()
    with pytest.raises(RuntimeError, match="boom"):
        run(compose([*overrides, "technique=[prune,explode]"], plugins), plugins)
    client, logged = only_run(store)
    assert logged.info.status == "FAILED"
    traceback_file = client.download_artifacts(logged.info.run_id, "traceback.txt", str(tmp_path))
    text = open(traceback_file).read()
    assert "RuntimeError: boom" in text and "explode" in text


def test_bad_config_records_nothing(overrides, store, tmp_path):
    from slimlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"amount must be in \[0, 1\)"):
        run(compose([*overrides, "technique.prune.amount=1.5"]))
    with pytest.raises(ConfigError, match="cannot follow 'quantize'"):
        run(compose([*overrides, "technique=[quantize,prune]"]))
    assert not (tmp_path / "mlflow.db").exists()


def test_third_party_technique_runs_and_its_metrics_are_merged(with_plugins, overrides, store):
    plugins = load_plugins()
    run(compose([*overrides, "technique=[zero_small]", "technique.zero_small.threshold=0.02"], plugins), plugins)
    _, logged = only_run(store)
    assert logged.info.run_name == "lenet zero_small(0.02)"
    assert logged.data.metrics["example_layers"] == 5  # LeNet + 4 layers, from the plugin's evaluate hook
    assert logged.data.metrics["sparsity"] > 0


def test_artifact_stores_zeros_compactly(tmp_path):
    """A 90%-sparse model's file is far smaller than the dense one: the mask is stored as bits."""
    model = LeNet()
    dense = save_model(model, tmp_path / "dense.pt")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter[torch.rand_like(parameter) < 0.9] = 0
    sparse = save_model(model, tmp_path / "sparse.pt")
    assert sparse < dense * 0.25
    reloaded = load_model(LeNet(), tmp_path / "sparse.pt")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(reloaded(x), model(x))


def test_lzma_codec_shrinks_a_sparse_artifact_and_reloads_it_exactly(tmp_path):
    """Entropy coding: the 1-bit masks of a 95%-sparse model are mostly zeros and code far below a bit each."""
    torch.manual_seed(0)
    model = LeNet()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter[torch.rand_like(parameter) < 0.95] = 0
    plain = save_model(model, tmp_path / "plain.pt")
    coded = save_model(model, tmp_path / "coded.pt", codec="lzma")
    assert coded < plain * 0.75
    assert (tmp_path / "coded.pt").read_bytes().startswith(b"\xfd7zXZ")
    reloaded = load_model(LeNet(), tmp_path / "coded.pt")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(reloaded(x), model(x))
    with pytest.raises(ValueError, match="codec must be one of none, lzma"):
        save_model(model, tmp_path / "bad.pt", codec="zip")


def test_experiment_settings_for_unselected_techniques_are_ignored(overrides, store):
    """The technique list is the pipeline: quickstart's quantize settings do not add quantize to '[prune]'."""
    cfg = compose(["experiment=quickstart", *overrides, "technique=[prune]"])
    assert "quantize" in cfg.technique  # merged from the experiment's body...
    run(cfg)
    _, logged = only_run(store)
    assert logged.data.tags["slimlab.techniques"] == "prune"  # ...but not run


def test_module_names_are_checked_against_the_model_each_step_gets(overrides):
    """``prune.layers``, ``place.device_map``, ``quantize.keep_float`` name modules: checked in the plan, while
    the steps before keep the model's module names (a distilled student or a compiled model has others)."""
    from torch import nn

    from slimlab.errors import ConfigError
    from slimlab.runner import plan

    plugins = load_plugins()

    def planned(*args: str, **kwargs):
        return plan(compose([*overrides, *args], plugins), plugins, host=False, **kwargs)

    state = torch.get_rng_state()
    with pytest.raises(ConfigError, match=r"^technique.prune.layers: 'fc3' is not a module of model lenet; its "):
        planned("technique=[prune]", "technique.prune.layers=[conv1,fc3]")
    assert torch.equal(torch.get_rng_state(), state)  # the model built to read its names drew no random numbers
    with pytest.raises(ConfigError, match="technique.place.device_map: 'conv9' is not a module of model lenet"):
        planned(
            "technique=[prune,quantize,place]", "technique.place.device=cpu", "+technique.place.device_map={conv9:cpu}"
        )
    # after a fresh student, or a compiled model, the names are not the built model's: the run checks them
    planned("technique=[distill,prune]", "technique.distill.student=mlp", "technique.prune.layers=[net.0]")
    planned("technique=[quantize,place]", "technique.quantize.compile=true", "+technique.place.device_map={x:cpu}")
    # a model handed in (the Python API) is the one checked
    given = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    planned("technique=[prune]", "technique.prune.layers=[0,2]", given=["model"], model=given)
    with pytest.raises(ConfigError, match=r"'fc1' is not a module of the given model; its modules: 0, 1, 2$"):
        planned("technique=[prune]", "technique.prune.layers=[fc1]", given=["model"], model=given)


def test_cache_dir_is_checked_without_creating_it(overrides, tmp_path):
    from slimlab.errors import ConfigError
    from slimlab.runner import plan

    plugins = load_plugins()
    cache = tmp_path / "not" / "yet"
    plan(compose([*overrides, f"cache_dir={cache}"], plugins), plugins)
    assert not (tmp_path / "not").exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match=r"^cache_dir=/proc/slimlab/cache: cannot write there"):
        plan(compose([*overrides, "cache_dir=/proc/slimlab/cache"], plugins), plugins)
    plan(compose([*overrides, "cache_dir=/proc/slimlab/cache"], plugins), plugins, host=False)  # another machine's


def test_choice_options_are_enums_logged_as_their_plain_values(overrides):
    """An enum option composes, hashes and is logged as the string it always was (existing runs still match)."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    from slimlab.config import config_hash, flatten
    from slimlab.plugins.prune import Method
    from slimlab.runner import RUN_KEYS, plan

    plugins = load_plugins()
    cfg = compose([*overrides, "technique.prune.method=random", "technique.quantize.backend=eager"], plugins)
    assert isinstance(cfg.technique.prune.method, Method) and cfg.technique.prune.method == "random"
    flat = flatten(cfg)
    assert (flat["technique.prune.method"], flat["technique.prune.scope"]) == ("random", "global")
    assert (flat["technique.quantize.backend"], flat["technique.prune.module_types"]) == (
        "eager",
        '["Linear", "Conv2d"]',
    )
    # the hash of the plain strings, as before these options were enums
    plain = {key: OmegaConf.to_container(cfg[key], resolve=True, enum_to_str=True) for key in RUN_KEYS if key != "seed"}
    plain = json.dumps({**plain, "seed": cfg.seed}, sort_keys=True, default=str).encode()
    assert config_hash(cfg, RUN_KEYS) == hashlib.sha256(plain).hexdigest()[:16]
    params = {k: v for step in plan(cfg, plugins, host=False).steps for k, v in step.key_params().items()}
    assert params["prune.method"] == "random" and type(params["quantize.backend"]) is str


def test_the_run_key_covers_the_techniques_code_and_runtime_versions(monkeypatch):
    """Upgrading torchao or onnxruntime, or editing the code a torchao config names, must not let a sweep resume."""
    from importlib import metadata

    from slimlab import identity
    from slimlab.runner import run_key

    plugins = load_plugins()
    cfg = compose(["technique=[quantize]"], plugins)
    found = identity.techniques_fingerprint({"quantize": {"config": {"_target_": "torchao.quantization.PerRow"}}})
    assert f"torchao=={metadata.version('torchao')}" in found["code"][0]
    assert found["runtimes"]["onnxruntime"] == metadata.version("onnxruntime")
    before = run_key(cfg, plugins, found={"baseline": "fixed"})
    monkeypatch.setattr(identity, "_version", lambda name: "99.0" if name == "torchao" else metadata.version(name))
    assert run_key(cfg, plugins, found={"baseline": "fixed"}) != before


def test_a_run_without_techniques_has_a_run_key():
    from slimlab.runner import run_key

    plugins = load_plugins()
    assert run_key(compose(["technique=[]"], plugins), plugins, found={"baseline": "fixed"})
