"""What tracking costs a run: the plan leaves MLflow unimported, the logged model's requirements reuse MLflow's map
of distributions; and the store errors met on the way, refused in one line."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from slimlab import mlflow_tracking as tracking
from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.logged_model import installed_distributions, requirements
from slimlab.runner import run
from tests.conftest import FAST, NO_MLFLOW_MODEL, REPO

TINY = ["model=mlp", "technique=[]", NO_MLFLOW_MODEL, *FAST]


def test_the_plan_leaves_mlflow_unimported(tmp_path):
    # Importing MLflow takes a second and a half: a config the plan refuses is refused without it.
    uris = [f"sqlite:///{tmp_path / 'mlflow.db'}", "postgresql+psycopg2://user@host/db", "http://127.0.0.1:1"]
    code = (
        "import sys; from slimlab.mlflow_tracking import MlflowStore\n"
        f"for uri in {uris!r}: MlflowStore(uri).check(host=False)\n"
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


def test_a_run_in_a_deleted_experiment_is_refused_in_one_line_before_any_work(store, tmp_path):
    # MLflow refused the run with a traceback (``must be in the 'active' state``); one line now (exit 2 from the CLI).
    client = MlflowClient(store)
    client.delete_experiment(client.create_experiment("tests"))
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"^experiment_name=tests: the MLflow experiment 'tests' .* is deleted; "):
        run(compose([*TINY, f"cache_dir={cache}", f"tracking.uri={store}", "experiment_name=tests"]))
    assert client.search_runs([e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]) == []
    assert not cache.exists()  # nothing trained


def test_the_logged_model_requirements_name_the_same_distributions_as_the_standard_library():
    standard = metadata.packages_distributions()
    for package in ("torch", "slimlab", "numpy", "mlflow"):
        assert set(installed_distributions()[package]) == set(standard[package])


def test_the_logged_model_requirements_build_the_map_mlflow_checks_them_with(monkeypatch):
    # requirements() built the standard library's map (0.45 s) and log_model then built MLflow's (0.25 s): one now.
    from mlflow.utils import requirements_utils
    from torch import nn

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a fresh process
    assert requirements(nn.Linear(2, 2), "pt2") == [f"torch=={metadata.version('torch').split('+')[0]}"]
    assert requirements_utils._MODULES_TO_PACKAGES is not None  # log_model's check reuses it
