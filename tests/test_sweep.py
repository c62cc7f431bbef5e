"""Sweeps through the real CLI and a real sqlite store: parent and children, failure isolation, resume, report."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from mlflow import MlflowClient

from slimlab.report import Row, pareto_front
from tests.conftest import FAST, NO_MLFLOW_MODEL, SLIMLAB, slimlab

# Six jobs; the last names a module that pruning cannot prune, which only pruning itself finds out (the plan checks
# that the names are modules of the model): it fails while running.
LAYERS = "technique.prune.layers=[],[fc1],[conv1],[conv2],[fc2],[nope]"
# LeNet with a module named `nope` that is no Linear/Conv2d layer
LENET_WITH_NOPE = """
from torch import nn

from slimlab.zoo.models import LeNet


class LeNetWithNope(LeNet):
    def __init__(self):
        super().__init__()
        self.nope = nn.Identity()
"""


def runs_by_kind(store: str) -> tuple[list, list]:
    """(parent runs, child runs) in the store, oldest first."""
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    runs.sort(key=lambda r: r.info.start_time)
    parents = [r for r in runs if r.data.tags.get("slimlab.sweep") == "parent"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def outcomes(run) -> dict[int, dict]:
    return {int(k.rsplit(".", 1)[1]): json.loads(v) for k, v in run.data.tags.items() if k.startswith("slimlab.job.")}


@pytest.mark.slow
def test_sweep_isolates_a_failing_job_resumes_and_reports(tmp_path, cache_dir, store):
    (tmp_path / "lenet_with_nope.py").write_text(LENET_WITH_NOPE)
    common = ["-m", "technique=[prune]", *FAST, NO_MLFLOW_MODEL, f"cache_dir={cache_dir}", f"tracking.uri={store}"]
    common.append("model._target_=lenet_with_nope.LeNetWithNope")
    first = slimlab("run", *common, LAYERS, cwd=tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "sweep: 5 finished, 1 failed, 0 skipped of 6 jobs" in first.stdout
    assert "job 5 FAILED: ValueError: layers ['nope'] are not Linear/Conv2d layers" in first.stdout

    client = MlflowClient(store)
    (parent,), children = runs_by_kind(store)
    assert parent.info.status == "FAILED"
    assert all(child.info.start_time >= parent.info.start_time for child in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    statuses = sorted(c.info.status for c in children)
    assert statuses == ["FAILED"] + ["FINISHED"] * 5
    failed = next(c for c in children if c.info.status == "FAILED")
    traceback = client.download_artifacts(failed.info.run_id, "traceback.txt", str(tmp_path))
    assert "ValueError: layers ['nope']" in open(traceback).read()
    assert parent.data.metrics["jobs_failed"] == 1 and parent.data.metrics["jobs_finished"] == 5
    finished = [c.data.metrics for c in children if c.info.status == "FINISHED"]
    best = min(finished, key=lambda m: m["accuracy_drop"])
    assert parent.data.metrics["best_accuracy"] == best["accuracy"]  # the sweep's summary, named apart
    assert parent.data.metrics["best_compression_ratio"] == max(m["compression_ratio"] for m in finished)
    assert "accuracy" not in parent.data.metrics  # or the tradeoff charts would plot the parent as a run
    reported = {item.path for item in client.list_artifacts(parent.info.run_id, "report")}
    assert reported == {"report/pareto.png", "report/report.csv", "report/report.md", "report/report.html"}
    csv_path = client.download_artifacts(parent.info.run_id, "report/report.csv", str(tmp_path))
    assert len(open(csv_path).read().strip().splitlines()) == 1 + 5  # header + the finished runs

    # Started again: the five finished configs are skipped, only the failing job runs (and fails again).
    second = slimlab("run", *common, LAYERS, cwd=tmp_path)
    assert second.returncode == 1
    assert "sweep: 0 finished, 1 failed, 5 skipped of 6 jobs" in second.stdout
    parents, children_after = runs_by_kind(store)
    new = [c for c in children_after if c.data.tags["mlflow.parentRunId"] == parents[1].info.run_id]
    assert [c.info.status for c in new] == ["FAILED"]
    skipped = [o["run_id"] for o in outcomes(parents[1]).values() if o["status"] == "SKIPPED"]
    assert sorted(skipped) == sorted(c.info.run_id for c in children if c.info.status == "FINISHED")
    # the skipped jobs' runs are not the new parent's children: the terminal and the parent's description say
    # where they are, and the parent's summary metrics count them
    for run_id in skipped:
        assert f"SKIPPED: the same run key already FINISHED as run {run_id}" in second.stdout
        assert run_id in parents[1].data.tags["mlflow.note.content"]
    assert parents[1].data.metrics["best_accuracy"] == parent.data.metrics["best_accuracy"]

    # Without the failing value nothing new runs; resume=false runs everything again.
    third = slimlab("run", *common, LAYERS.removesuffix(",[nope]"), cwd=tmp_path)
    assert third.returncode == 0 and "sweep: 0 finished, 0 failed, 5 skipped of 5 jobs" in third.stdout
    assert len(runs_by_kind(store)[1]) == len(children_after)
    assert runs_by_kind(store)[0][2].info.status == "FINISHED"
    forced = slimlab("run", *common, "technique.prune.layers=[fc1]", "resume=false", cwd=tmp_path)
    assert forced.returncode == 0 and "sweep: 1 finished, 0 failed, 0 skipped of 1 jobs" in forced.stdout


def test_a_value_refused_at_compose_time_stops_the_sweep_before_it_starts(tmp_path, store):
    result = slimlab("run", "-m", "technique.prune.amount=0.5,1.5", f"tracking.uri={store}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "job 1 (technique.prune.amount=1.5): technique.prune: amount must be in [0, 1), got 1.5" in lines[0]
    assert not (tmp_path / "mlflow.db").exists() or runs_by_kind(store) == ([], [])


@pytest.mark.slow
def test_sigterm_marks_the_running_child_and_the_parent_killed(tmp_path, store):
    command = [*SLIMLAB, "run", "-m", "technique=[prune]", "technique.prune.amount=0.5,0.6", "train.epochs=200",
               f"cache_dir={tmp_path / 'cache'}", f"tracking.uri={store}"]  # fmt: skip
    MlflowClient(store).search_experiments()  # the store exists before we poll it: no race on its migrations
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not runs_by_kind(store)[1]:
            assert time.monotonic() < deadline and process.poll() is None, "no child run started"
            time.sleep(0.5)
        # Into the baseline's 200 epochs, not inside the run's first writes to the store: a signal that lands
        # mid-transaction can leave sqlite locked for the writes that close the runs.
        time.sleep(3)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-2000:]  # 128 + SIGTERM
    (parent,), children = runs_by_kind(store)
    assert parent.info.status == "KILLED"
    assert [c.info.status for c in children] == ["KILLED"]  # the second job never started


def test_pareto_front_keeps_the_undominated_runs():
    def row(name: str, drop: float, size: float) -> Row:
        return Row(name, name, name, {"accuracy_drop": drop, "size_bytes": size}, "accuracy")

    rows = [row("a", 0.00, 100), row("b", 0.01, 50), row("c", 0.02, 60), row("d", 0.00, 120), row("e", 0.05, 10)]
    assert [r.name for r in pareto_front(rows, "size_bytes")] == ["e", "b", "a"]


FLAKY_DATA = """
from slimlab.zoo.datasets import digits as slimlab_digits


def digits(gone=False):
    if gone:
        raise FileNotFoundError("the data files are gone")
    return slimlab_digits()
"""


@pytest.mark.slow
def test_a_job_failing_before_its_run_exists_is_counted_and_so_are_jobs_without_tracking(tmp_path, cache_dir, store):
    # The second job's data cannot be read: it fails while its data is built, before its MLflow run exists.
    (tmp_path / "flaky_data.py").write_text(FLAKY_DATA)
    args = ["run", "-m", "technique=[prune]", "data._target_=flaky_data.digits", "+data.gone=false,true", *FAST]
    args.append(f"cache_dir={cache_dir}")
    tracked = slimlab(*args, f"tracking.uri={store}", cwd=tmp_path)
    assert tracked.returncode == 1, tracked.stderr[-3000:]
    assert "sweep: 1 finished, 1 failed, 0 skipped of 2 jobs" in tracked.stdout
    assert "job 1 FAILED: FileNotFoundError: the data files are gone" in tracked.stdout
    (parent,), children = runs_by_kind(store)
    assert parent.info.status == "FAILED" and [c.info.status for c in children] == ["FINISHED"]

    untracked = slimlab(*args, "tracking=none", cwd=tmp_path)
    assert untracked.returncode == 1, untracked.stderr[-3000:]
    assert "sweep: 1 finished, 1 failed, 0 skipped of 2 jobs" in untracked.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["technique=[prune]"], "slimlab_optuna needs a search space"),
        (["hydra.sweeper.sampler=grid", "technique.prune.amount=interval(0.1, 0.9)"], "sampler must be one of tpe"),
    ],
)
def test_bad_optuna_settings_stop_the_search_before_it_starts(args, message, tmp_path, store):
    result = slimlab("run", "-m", "hydra/sweeper=slimlab_optuna", *args, f"tracking.uri={store}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_the_sweep_callback_goes_to_a_worker_without_the_launching_process_sweep():
    """joblib, submitit and Ray pickle Hydra's context, callbacks included, for their workers: the sweep the
    callback holds (a progress thread, its lock) stays in the launching process."""
    import pickle
    import threading

    from slimlab.sweep import Sweep, SweepCallback

    callback = SweepCallback()
    callback.sweep = Sweep()
    callback.sweep.result = threading.Lock()  # as unpicklable as the progress thread a running sweep holds
    assert pickle.loads(pickle.dumps(callback)).sweep is None
