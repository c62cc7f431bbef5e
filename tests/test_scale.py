"""Beyond one process: joblib and Ray launchers, submitit's local mode, Optuna search, an MLflow server on PostgreSQL.

Everything is real: Hydra's launcher plugins, a local Ray cluster, PostgreSQL started here on 127.0.0.1 and
stopped by its process id, ``slimlab server`` (mlflow server) in front of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import FAST, NO_MLFLOW_MODEL, SLIMLAB, free_port, slimlab, wait_until_healthy
from tests.test_sweep import runs_by_kind

pytestmark = pytest.mark.slow

SWEEP = ["-m", "technique=[prune]", "technique.prune.amount=0.2,0.4,0.6,0.8", *FAST, NO_MLFLOW_MODEL]


def child_configs(store: str) -> set[str]:
    """The config hashes of the finished children of the store's only sweep."""
    (parent,), children = runs_by_kind(store)
    assert parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    return {c.data.tags["slimlab.config_hash"] for c in children}


def test_joblib_ray_and_basic_launchers_give_the_same_children(tmp_path, cache_dir):
    found = {}
    for launcher in ("basic", "joblib", "ray"):
        store = f"sqlite:///{tmp_path / launcher / 'mlflow.db'}"
        (tmp_path / launcher).mkdir()
        extra = {
            "basic": [],
            "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
            "ray": ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2"],
        }[launcher]
        result = slimlab(
            "run", *SWEEP, *extra, f"cache_dir={cache_dir}", f"tracking.uri={store}", cwd=tmp_path / launcher,
            timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, f"{launcher}:\n{result.stderr[-3000:]}"
        assert "sweep: 4 finished, 0 failed, 0 skipped of 4 jobs" in result.stdout, launcher
        found[launcher] = child_configs(store)
    assert len(found["basic"]) == 4
    assert found["joblib"] == found["basic"] == found["ray"]


def test_submitit_local_launcher(tmp_path, cache_dir):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = slimlab(
        "run", "-m", "technique=[prune]", "technique.prune.amount=0.3,0.6", *FAST, NO_MLFLOW_MODEL,
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"cache_dir={cache_dir}",
        f"tracking.uri={store}", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(child_configs(store)) == 2


def test_optuna_search_resumes_after_an_interruption(tmp_path, cache_dir):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        *SLIMLAB, "run", "-m", "hydra/sweeper=slimlab_optuna", "hydra.sweeper.n_trials=12", "technique=[prune]",
        "technique.prune.amount=interval(0.1, 0.95)", "technique.prune.scope=choice(global, layer)", *FAST,
        NO_MLFLOW_MODEL, f"cache_dir={cache_dir}", f"tracking.uri={store}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
    ]  # fmt: skip
    MlflowClient(store).search_experiments()  # the store exists before we poll it
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while sum(c.info.status == "FINISHED" for c in runs_by_kind(store)[1]) < 6:
            assert time.monotonic() < deadline and process.poll() is None, "the search did not get half way"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143  # 128 + SIGTERM
    import optuna

    (name,) = optuna.get_all_study_names(f"sqlite:///{tmp_path}/optuna.db")  # <experiment>-<digest of the search>
    assert name.startswith("default-")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 6 <= len(complete) < 12

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")  # the same study
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 12
    assert f"Pareto front of study {name!r}" in again.stdout
    parents, _ = runs_by_kind(store)
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    client = MlflowClient(store)
    front_file = client.download_artifacts(parents[1].info.run_id, "report/optuna_pareto_front.json", str(tmp_path))
    front = json.loads(Path(front_file).read_text())
    assert front and all(set(entry["values"]) == {"accuracy", "size_bytes"} for entry in front)


# --- a tracking server on PostgreSQL ---------------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _as_postgres(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the postgres user there."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 and a free port, with a database `mlflow`; stopped by its process id."""
    binaries = _pg_bin()
    if binaries is None:
        if os.environ.get("SLIMLAB_REQUIRE_SERVICES"):
            pytest.fail("PostgreSQL server binaries are missing (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql)")
    # Not under pytest's tmp_path: its parents are private to this user, and PostgreSQL runs as `postgres` here.
    data = Path(tempfile.mkdtemp(prefix="slimlab-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run(_as_postgres([str(binaries / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"]),
                   check=True, capture_output=True)  # fmt: skip
    port = free_port()
    command = [str(binaries / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)]
    server = subprocess.Popen(_as_postgres(command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import psycopg2

        deadline = time.monotonic() + 60
        while True:
            try:
                connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                assert time.monotonic() < deadline and server.poll() is None, "PostgreSQL did not start"
                time.sleep(0.3)
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        postmaster = data / "postmaster.pid"
        pid = int(postmaster.read_text().split()[0]) if postmaster.exists() else server.pid
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)


def test_parallel_sweep_against_a_tracking_server_on_postgresql(tmp_path, cache_dir, postgres):
    port = free_port()
    server = subprocess.Popen(
        [*SLIMLAB, "server", "--backend-store-uri", postgres, "--artifacts-destination", str(tmp_path / "artifacts"),
         "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(uri, server)
        result = slimlab(
            "run", *SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"cache_dir={cache_dir}",
            cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(child_configs(uri)) == 4  # no run lost
        client = MlflowClient(uri)
        _, children = runs_by_kind(uri)
        model = client.download_artifacts(children[0].info.run_id, "model.pt", str(tmp_path))
        assert Path(model).stat().st_size == children[0].data.metrics["size_bytes"]  # served by the server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
