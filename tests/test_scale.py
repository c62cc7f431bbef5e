"""Beyond one process: joblib and Ray launchers, submitit's local mode, Optuna search, an MLflow server on PostgreSQL.

Everything is real: Hydra's launcher plugins, a local Ray cluster, PostgreSQL started here on 127.0.0.1 and
stopped by its process id, ``slimlab server`` (mlflow server) in front of it, set up as the README says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from slimlab.mlflow_tracking import comparison_url
from tests.conftest import FAST, NO_MLFLOW_MODEL, REPO, SLIMLAB, free_port, slimlab, wait_until_healthy
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
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]  # 128 + SIGTERM
    import optuna

    (name,) = optuna.get_all_study_names(f"sqlite:///{tmp_path}/optuna.db")  # <experiment>-<digest of the search>
    assert name.startswith("slimlab-")  # the default experiment_name
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


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(marker: str) -> str:
    """The README's shell block after ``<!-- scaling-out: MARKER -->``, as a user would paste it."""
    match = re.search(rf"<!-- scaling-out: {marker} -->\n```sh\n(.*?)^```", README.read_text(), re.S | re.M)
    assert match, f"README.md: no shell block marked <!-- scaling-out: {marker} -->"
    return match[1]


@contextmanager
def fresh_postgres(*auth: str) -> Iterator[tuple[int, Path]]:
    """A new PostgreSQL on 127.0.0.1 and a free port (its socket in its data directory): (port, data directory).

    Stopped by its process id. ``auth`` are initdb's authentication options.
    """
    binaries = _pg_bin()
    if binaries is None:
        if os.environ.get("SLIMLAB_REQUIRE_SERVICES"):
            pytest.fail("PostgreSQL server binaries are missing (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql)")
    # Not under pytest's tmp_path: its parents are private to this user, and PostgreSQL runs as `postgres` here.
    data = Path(tempfile.mkdtemp(prefix="slimlab-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    initdb = [str(binaries / "initdb"), "-D", str(data), *auth, "-U", "postgres"]
    subprocess.run(_as_postgres(initdb), check=True, capture_output=True)
    port = free_port()
    command = [str(binaries / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)]
    server = subprocess.Popen(_as_postgres(command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (data / f".s.PGSQL.{port}").exists() or not (data / "postmaster.pid").exists():
            assert time.monotonic() < deadline and server.poll() is None, "PostgreSQL did not start"
            time.sleep(0.2)
        ready = [str(binaries / "pg_isready"), "-h", str(data), "-p", str(port)]
        while subprocess.run(ready, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and server.poll() is None, "PostgreSQL did not get ready"
            time.sleep(0.2)
        yield port, data
    finally:
        postmaster = data / "postmaster.pid"
        pid = int(postmaster.read_text().split()[0]) if postmaster.exists() else server.pid
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)


def this_hosts_name() -> str:
    """A name of this host other than localhost that resolves, for SERVER (falls back to 127.0.0.1)."""
    for name in (socket.gethostname(), socket.getfqdn()):
        try:
            socket.getaddrinfo(name, None)
        except OSError:
            continue
        if name and not name.startswith("localhost"):
            return name
    return "127.0.0.1"


def test_the_readmes_tracking_server_on_a_fresh_postgresql(tmp_path, cache_dir):
    """README "Scaling out", word for word: role and database on a PostgreSQL set up as Debian's is (peer login on
    the socket, passwords over TCP), `slimlab server`, then a run and a parallel sweep from this host's name."""
    if os.geteuid() != 0:
        pytest.skip("the README's database step runs as root (su postgres)")
    with fresh_postgres("--auth-local=peer", "--auth-host=scram-sha-256") as (pg_port, socket_dir):
        # PostgreSQL's own variables say where this server is (Debian's: /var/run/postgresql, 5432)
        env = {**os.environ, "PGHOST": str(socket_dir), "PGPORT": str(pg_port)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this suite's slimlab
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("MLFLOW_TRACKING_URI", None)
        port = free_port()
        server_block = readme_block("server")
        assert "--port 5000" in server_block
        server_block = server_block.replace("--port 5000", f"--port {port}")

        # before the role exists: one line, exit 2, no traceback
        early = subprocess.run(["bash", "-c", server_block], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert early.returncode == 2, early.stderr[-3000:]
        assert early.stderr.startswith("slimlab: error: --backend-store-uri ") and early.stderr.count("\n") == 1
        assert 'password authentication failed for user "mlflow"' in early.stderr and "change-me" not in early.stderr

        database = subprocess.run(
            ["bash", "-c", readme_block("database")], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert database.returncode == 0 and "ERROR" not in database.stderr, database.stderr

        server = subprocess.Popen(
            ["bash", "-c", f"exec {server_block}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        uri = f"http://{this_hosts_name()}:{port}"  # SERVER: this host's name, as another host would use it
        try:
            wait_until_healthy(uri, server)
            result = slimlab(
                "run", "technique=[prune]", *FAST, NO_MLFLOW_MODEL, f"cache_dir={cache_dir}", "experiment_name=one",
                cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=600,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("one")
            (run,) = client.search_runs([experiment.experiment_id])
            assert run.info.status == "FINISHED"
            # the run's last line: its experiment's comparison view on the server, which the UI opens
            link = comparison_url(uri, experiment.experiment_id)
            assert result.stdout.rstrip().endswith(f"See it in the MLflow UI: {link}"), result.stdout[-500:]
            search = urllib.request.Request(  # what the UI's page does from that origin (a POST)
                f"{uri}/ajax-api/2.0/mlflow/runs/search", method="POST", data=b'{"experiment_ids": ["0"]}',
                headers={"Content-Type": "application/json", "Origin": uri},
            )  # fmt: skip
            with urllib.request.urlopen(search, timeout=10) as response:
                assert response.status == 200

            result = slimlab(
                "run", *SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"cache_dir={cache_dir}",
                cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=600,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            assert len(child_configs(uri)) == 4  # no run lost
            (parent,), children = runs_by_kind(uri)
            link = comparison_url(uri, parent.info.experiment_id)  # the sweep ends with its link too
            assert result.stdout.rstrip().endswith(f"See it in the MLflow UI: {link}"), result.stdout[-500:]
            model = client.download_artifacts(children[0].info.run_id, "model.pt", str(tmp_path))
            assert Path(model).stat().st_size == children[0].data.metrics["size_bytes"]  # served by the server
            assert (tmp_path / "mlartifacts").is_dir()  # the README's artifacts directory, beside the server
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            output = server.communicate(timeout=30)[0]
        assert "change-me" not in output  # the URI it prints hides the password
        assert "MLflow tracking server at http://" in output
