"""The external example plugin (examples/slimlab-lowrank), pip-installed into a directory of its own.

It is a fifth technique that none of the built-ins covers, packaged as a third party would: discovered
through its entry point, listed with its distribution, sweepable, logged like a built-in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import FAST, REPO, slimlab

EXAMPLE = REPO / "examples" / "slimlab-lowrank"


@pytest.fixture(scope="module")
def lowrank_site(tmp_path_factory) -> Path:
    """``pip install`` of the example into a fresh directory (its dependency, slimlab, is the one under test)."""
    site = tmp_path_factory.mktemp("lowrank-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(EXAMPLE)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (site / "slimlab_lowrank-0.1.0.dist-info").is_dir()
    return site


def test_listed_with_its_distribution_and_in_run_help(lowrank_site, tmp_path):
    env = {"PYTHONPATH": str(lowrank_site)}
    listed = json.loads(slimlab("plugins", "--json", cwd=tmp_path, env=env).stdout)
    entry = next(e for e in listed if e["name"] == "lowrank")
    assert (entry["distribution"], entry["version"], entry["status"]) == ("slimlab-lowrank", "0.1.0", "loaded")
    assert entry["techniques"] == ["lowrank"]
    help_text = slimlab("run", "--help", cwd=tmp_path, env=env).stdout
    assert "lowrank (plugin lowrank):\n  energy: float = 0.9" in help_text


@pytest.mark.slow
def test_lowrank_then_quantize_logs_a_finished_run(lowrank_site, tmp_path, cache_dir, store):
    result = slimlab(
        "run", "technique=[lowrank,quantize]", "technique.lowrank.energy=0.8",
        "technique.quantize.allow_slower=true", *FAST, f"cache_dir={cache_dir}",
        f"tracking.uri={store}", cwd=tmp_path, env={"PYTHONPATH": str(lowrank_site)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(store)
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert run.info.status == "FINISHED" and run.info.run_name == "lenet lowrank(0.8)+quantize(int8-wo)"
    metrics = run.data.metrics
    assert metrics["lowrank_layers"] >= 1 and metrics["compression_ratio"] > 4  # fewer weights, then int8
    assert "lowrank:slimlab-lowrank==0.1.0" in run.data.tags["slimlab.plugins"]
    assert "fc1:" in run.data.tags["lowrank.ranks"]


@pytest.mark.slow
def test_lowrank_sweeps_like_a_built_in(lowrank_site, tmp_path, cache_dir, store):
    result = slimlab(
        "run", "-m", "technique=[lowrank]", "technique.lowrank.energy=0.7,0.9", *FAST, f"cache_dir={cache_dir}",
        f"tracking.uri={store}", cwd=tmp_path, env={"PYTHONPATH": str(lowrank_site)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep: 2 finished, 0 failed, 0 skipped of 2 jobs" in result.stdout
    assert "lenet lowrank(0.7)" in result.stdout and "lenet lowrank(0.9)" in result.stdout


@pytest.mark.slow
def test_the_example_passes_its_own_tests(lowrank_site):
    env = {**os.environ, "PYTHONPATH": str(lowrank_site)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        cwd=lowrank_site, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 12, result.stdout[-2000:]  # its 5 tests + slimlab's 7-test contract


@pytest.mark.slow
def test_broken_plugins_beside_it_do_not_stop_its_runs(lowrank_site, tmp_path, cache_dir):
    from tests.conftest import write_plugin

    broken = tmp_path / "broken-site"
    write_plugin(broken, "slimlab-broken", "slimlab_broken", "import not_a_module_xyz\n", {"broken": "slimlab_broken"})
    copycat = (
        "from dataclasses import dataclass\nfrom slimlab import hookimpl\n\n@dataclass\nclass C:\n    x: int = 1\n\n"
        "@hookimpl\ndef register_techniques(register):\n    register('lowrank', C, lambda m, c, ctx: m)\n"
    )
    write_plugin(broken, "slimlab-copycat", "slimlab_copycat", copycat, {"lowrank_clone": "slimlab_copycat"})
    result = slimlab(
        "run", "technique=[lowrank]", *FAST, "tracking=none", f"cache_dir={cache_dir}", cwd=tmp_path,
        env={"PYTHONPATH": f"{lowrank_site}{os.pathsep}{broken}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lenet lowrank(0.9)" in result.stdout  # the real plugin ran, not the copycat
    assert "'broken'" in result.stderr and "slimlab-broken" in result.stderr and "not_a_module_xyz" in result.stderr
    assert "'lowrank_clone'" in result.stderr and "already registered by 'lowrank'" in result.stderr


KMEANS = REPO / "examples" / "slimlab-kmeans"


@pytest.mark.slow
def test_weight_sharing_shows_in_size_bytes_without_any_flag(tmp_path, cache_dir, store):
    """The k-means example declares nothing about storage: slimlab's artifact stores a layer of 16 shared values
    as a palette and 4-bit indices, so the file shrinks as the weights did (issue 16)."""
    site = tmp_path / "kmeans-site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(KMEANS)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    common = [*FAST, "technique.prune.amount=0.5", f"cache_dir={cache_dir}", f"tracking.uri={store}"]
    # the last: centroid fine-tuning through the training hook (keep_zeros, after_step)
    for chain in ("[prune]", "[prune,kmeans]", "[prune,kmeans] technique.kmeans.fine_tune_epochs=1"):
        result = slimlab("run", *f"technique={chain}".split(), *common, cwd=tmp_path, env={"PYTHONPATH": str(site)})
        assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(store)
    runs = {r.info.run_name: r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    pruned, shared = runs["lenet prune(0.5)"], runs["lenet prune(0.5)+kmeans(16)"]
    tuned = runs["lenet prune(0.5)+kmeans(16,fine_tune_epochs=1)"]
    for run in (shared, tuned):
        assert run.info.status == "FINISHED" and run.data.metrics["kmeans_layers"] == 4
        # 1 mask bit + half the weights at 4 bits, against 1 + half at 32: about a sixth of the bytes
        assert run.data.metrics["size_bytes"] < 0.3 * pruned.data.metrics["size_bytes"]
        assert run.data.metrics["sparsity"] == pytest.approx(pruned.data.metrics["sparsity"], abs=1e-6)
        assert run.data.metrics["accuracy_drop"] < 0.05  # 16 centroids a layer keep LeNet's accuracy
