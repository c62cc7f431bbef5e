"""The MLflow run opened in a thread beside the training (slimlab.tracking.Opening), and a plan that leaves MLflow
unimported: the thread's errors surface as the run's, the store is still created under the lock."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from functools import partial
from importlib import metadata
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from slimlab import tracking
from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.liveness import process_tags
from slimlab.logged_model import installed_distributions
from slimlab.runner import run
from tests.conftest import FAST, NO_MLFLOW_MODEL, REPO

TINY = ["model=mlp", "technique=[]", NO_MLFLOW_MODEL, *FAST]


def opening(uri: str, **params: str) -> tracking.Opening:
    """The thread ``before_run`` starts, for a run of experiment ``tests`` in ``uri`` with ``params``."""
    work = partial(
        tracking.open_run,
        uri=uri,
        experiment="tests",
        primary=None,
        run_name="thread",
        tags=process_tags(),
        params=params,
        log_model=False,
    )
    return tracking.Opening(work)


def context(started: tracking.Opening) -> SimpleNamespace:
    """What the tracking hooks read of a run's context once ``before_run`` has started ``started``."""
    return SimpleNamespace(state={tracking.OPENING: started, "mlflow": tracking.OpenedRun(started)})


def test_the_plan_leaves_mlflow_unimported(tmp_path):
    # Importing MLflow is a second and a half the run's thread now spends beside the training, not in the plan.
    uris = [f"sqlite:///{tmp_path / 'mlflow.db'}", "postgresql+psycopg2://user@host/db", "http://127.0.0.1:1"]
    code = (
        "import sys; from slimlab import tracking\n"
        f"for uri in {uris!r}: tracking.check_store(uri, host=False)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:////tmp/x/mlflow.db",
        "postgresql+psycopg2://u@h/db",
        "mysql://u@h/db",
        "mssql+pyodbc://h/db",
        "https://host:5000",
        "file:///tmp/mlruns",
        "/tmp/mlruns",
        r"C:\runs",
        "databricks://profile",
        "s3://bucket/runs",
    ],
)
def test_a_uri_scheme_is_read_as_mlflow_reads_it(uri):
    from mlflow.utils.uri import get_uri_scheme

    assert tracking.uri_scheme(uri) == get_uri_scheme(uri)


@pytest.mark.parametrize("uri", ["sqlitex:///tmp/mlflow.db", "postgresql+a+b://host/db"])
def test_a_database_uri_mlflow_cannot_parse_is_refused_in_one_line(uri):
    # MLflow's own parser raised an MlflowException here: a traceback from the plan instead of a reason.
    with pytest.raises(ConfigError, match=r"MLflow has no tracking store for .*valid: .*sqlite://"):
        tracking.check_store(uri)


@pytest.mark.parametrize("spare", [True, False], ids=["in a thread", "in before_run"])
def test_a_run_in_a_deleted_experiment_fails_with_the_reason_and_records_nothing(spare, store, tmp_path, monkeypatch):
    # In the opening thread (a core to spare) the error is the run's, raised by after_run; without a spare core the
    # run is opened in before_run, which fails before any work. One line either way (exit 2 from the CLI).
    monkeypatch.setattr(tracking, "spare_core", lambda threads: spare)
    client = MlflowClient(store)
    client.delete_experiment(client.create_experiment("tests"))
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"^experiment_name=tests: the MLflow experiment 'tests' .* is deleted; "):
        run(compose([*TINY, f"cache_dir={cache}", f"tracking.uri={store}", "experiment_name=tests"]))
    assert client.search_runs([e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]) == []
    assert cache.exists() == spare  # trained beside the thread; refused before any work without it


@pytest.mark.parametrize("first", ["the thread's", "the pipeline's"])
def test_a_run_whose_params_cannot_be_logged_is_closed_failed_with_the_error_raised(first, store, caplog):
    started = opening(store, **{"k" * 300: "MLflow refuses keys over 250 characters"})
    started.start()
    state, failure = started.wait()
    assert isinstance(failure, MlflowException) and "250" in str(failure)
    ctx = context(started)
    with pytest.raises(MlflowException) as raised:  # the hooks that read the run raise the thread's error
        tracking.plugin.after_technique(ctx=ctx)
    assert raised.value is failure
    with pytest.raises(MlflowException):
        dict(ctx.state["mlflow"])
    error = failure if first == "the thread's" else RuntimeError("boom")
    with caplog.at_level(logging.ERROR, logger="slimlab"):
        tracking.plugin.on_run_error(ctx=ctx, error=error, traceback_text="Traceback: ...")
    logged = MlflowClient(store).get_run(state["run_id"])
    assert logged.info.status == "FAILED"
    assert logged.data.tags[tracking.ERROR_TAG] == f"{type(error).__name__}: {error}"  # what the run raises
    if error is not failure:  # the run's own error is raised; the thread's is logged, not lost
        assert "the MLflow run could not be opened: MlflowException" in caplog.text


def test_the_thread_creates_a_new_store_under_the_lock(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    before = sys.getswitchinterval()
    started = opening(uri, seed="0")
    with tracking.store_lock(uri):  # what another process creating the store holds
        started.start()
        assert sys.getswitchinterval() == pytest.approx(min(before, tracking.SWITCH_INTERVAL))  # GIL back sooner
        time.sleep(1)
        assert not (tmp_path / "new" / "mlflow.db").exists()
        assert not started.failed()
    state, failure = started.wait()
    assert failure is None
    assert sys.getswitchinterval() == pytest.approx(before)
    client = MlflowClient(uri)
    assert client.get_run(state["run_id"]).data.params == {"seed": "0"}
    ctx = context(started)
    tracking.plugin.after_technique(ctx=ctx)  # nothing failed: nothing raised
    assert dict(ctx.state["mlflow"]) == state
    client.set_terminated(state["run_id"])


@pytest.mark.parametrize("load", [0.0, 1.0, 3.0])
def test_the_thread_is_used_when_a_core_is_left_idle(load, monkeypatch):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))  # this process alone is a load of 1
    assert tracking.spare_core(threads=1) == (cpus - 1 - max(load - 1, 0) >= 0.5)
    assert not tracking.spare_core(threads=cpus)  # the training takes every core


def test_the_logged_model_requirements_name_the_same_distributions_as_the_standard_library():
    standard = metadata.packages_distributions()
    for package in ("torch", "slimlab", "numpy", "mlflow"):
        assert set(installed_distributions()[package]) == set(standard[package])
