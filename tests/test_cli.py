"""The ``slimlab`` command line, run as a user would: exit codes, messages, Hydra's flags, sweeps, the UI."""

from __future__ import annotations

import subprocess

import pytest
from mlflow import MlflowClient

from tests.conftest import FAST, SLIMLAB, free_port, slimlab, wait_until_healthy

BAD_INPUT = [
    (["technique.prune.amount=1.5"], r"technique.prune: amount must be in [0, 1), got 1.5"),
    (["technique.prune.amout=0.3"], "Key 'amout' not in 'PruneConfig'; valid keys: amount, method,"),
    (["technique.prune.amount=abc"], "technique.prune.amount=abc"),
    (
        ["model=resnet9000"],
        "unknown model 'resnet9000'; valid model options: big_model, huggingface, lenet, lenet_small, ",
    ),
    (
        ["technique=[prun]"],
        "unknown technique 'prun'; valid technique options: distill, place, prune, prune_90, quantize",
    ),
    (["experiment=nope"], "unknown experiment 'nope'; valid experiment options:"),
    (["technique=[quantize,prune]"], "'prune' cannot follow 'quantize'"),
    (["plugins.disable=[prune]"], "(disabled plugins: prune)"),
    (["artifact.codec=zip"], "unknown artifact.codec 'zip'; valid: none, lzma"),
    # with +, the prefix the README teaches for keys a yaml lacks: refused too, not ignored
    (["+technique.prune.amout=0.3", "technique=[prune]"], "technique.prune has no option amout; its options: amount,"),
    (["+foo=1"], "unknown key(s) foo; the top-level keys are artifact, cache_dir,"),
    (["measure.batch_size=0"], "measure.batch_size=0: rows per timed batch must be an integer >= 1"),
    (["measure.repeats=0"], "measure.repeats=0: timed calls per model must be an integer >= 5"),
    (["train.epochs=-1"], "train.epochs=-1: epochs of baseline training must be an integer >= 0"),
    (["train.lr=-1"], "train.lr=-1.0: the learning rate must be > 0"),
    (["seed=-1"], "seed=-1: the seed must be an integer >= 0"),
    (["experiment_name="], "experiment_name is empty"),
    (["technique=[prune,distill,prune]"], "technique=[prune,distill,prune]: prune appears more than once"),
]


def all_runs(store: str) -> list:
    client = MlflowClient(store)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[a[0] for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_and_records_nothing(args, message, tmp_path, store):
    result = slimlab("run", *args, f"tracking.uri={store}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimlab: error: "), result.stderr
    assert message in lines[0]
    assert not (tmp_path / "mlflow.db").exists() or all_runs(store) == []


def test_unknown_command_exits_2(tmp_path):
    result = slimlab("compress", cwd=tmp_path)
    assert result.returncode == 2 and "valid: run, plugins, report, ui, server" in result.stderr


def test_help_lists_groups_and_every_technique_option(plugin_site, tmp_path):
    result = slimlab("run", "--help", cwd=tmp_path, env={"PYTHONPATH": str(plugin_site)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "model: big_model, example_lenet, huggingface, lenet, lenet_small, linear, ",  # example_lenet: a plugin's
        "quickstart, seed_distillation",
        "tracking: mlflow, none",
    ):
        assert line in out
    presets = "quantize_ao, quantize_ao_emb, quantize_legacy, quantize_pt2e"
    assert f"technique: distill, explode, place, prune, prune_90, quantize, {presets}, zero_small" in out  # plugins too
    assert "zero_small (plugin example):\n  threshold: float = 0.01" in out
    assert "amount: float = 0.5" in out


def test_cfg_job_and_info(tmp_path):
    result = slimlab("run", "experiment=quickstart", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0 and "amount: 0.9" in result.stdout
    result = slimlab("run", "--info", "defaults", cwd=tmp_path)
    assert result.returncode == 0 and "technique/prune" in result.stdout


@pytest.mark.slow
def test_sweep_runs_every_job_and_trains_the_baseline_once(tmp_path, cache_dir):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = slimlab(
        "run", "-m", "technique.prune.amount=0.3,0.6", "technique=[prune]", *FAST, "seed=11",
        f"cache_dir={cache_dir}", f"tracking.uri={store}", "experiment_name=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    runs = sorted(all_runs(store), key=lambda r: r.info.start_time)
    runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # the jobs, without the sweep's parent
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.params["technique.prune.amount"] for r in runs] == ["0.3", "0.6"]
    assert [r.data.tags["slimlab.baseline"].split()[1] for r in runs] == ["(trained)", "(cached)"]


@pytest.mark.slow
def test_failing_run_exits_1_and_is_recorded_failed(plugin_site, tmp_path, cache_dir):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = slimlab(
        "run", "technique=[explode]", *FAST, f"cache_dir={cache_dir}", f"tracking.uri={store}",
        cwd=tmp_path, env={"PYTHONPATH": str(plugin_site)},
    )  # fmt: skip
    assert result.returncode == 1
    assert "slimlab: run failed: RuntimeError: boom" in result.stderr
    assert [r.info.status for r in all_runs(store)] == ["FAILED"]


@pytest.mark.slow
def test_default_store_is_absolute_sqlite_in_launch_dir(tmp_path, cache_dir):
    result = slimlab("run", "technique=[prune]", *FAST, f"cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert [r.info.status for r in all_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")] == ["FINISHED"]
    assert "slimlab ui" in result.stdout  # the summary says how to look at it


@pytest.mark.slow
def test_ui_serves_the_store(tmp_path, store):
    port = free_port()
    process = subprocess.Popen(
        [*SLIMLAB, "ui", "--uri", store, "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert f"http://127.0.0.1:{port}" in process.stdout.readline()
        wait_until_healthy(f"http://127.0.0.1:{port}", process, seconds=90)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_ui_links_the_comparison_view_of_each_experiment_slimlab_wrote(store, tmp_path):
    from slimlab.cli import comparison_links
    from slimlab.tracking import VIEW_TAG, experiment_id

    assert comparison_links(f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}", "http://h:1") == []  # nothing created
    assert not (tmp_path / "none").exists()
    client = MlflowClient(store)
    classify = experiment_id(client, "classify", store)
    regress = experiment_id(client, "regress", store, primary="mse")
    client.create_experiment("not slimlab's")
    links = dict(comparison_links(store, "http://h:1"))
    assert links == {
        "classify": f"http://h:1/#/experiments/{classify}/runs?viewStateShareKey=slimlab",
        "regress": f"http://h:1/#/experiments/{regress}/runs?viewStateShareKey=slimlab",
    }
    # the view's columns follow the task's metric
    assert "metrics.`mse`" in client.get_experiment(regress).tags[VIEW_TAG]
    assert "metrics.`accuracy`" in client.get_experiment(classify).tags[VIEW_TAG]
