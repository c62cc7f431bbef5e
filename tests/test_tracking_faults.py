"""Faults around the MLflow store: concurrent creation, a full disk, SIGKILL, read-only or unreachable stores."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from slimlab import liveness
from slimlab import mlflow_tracking as tracking
from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.plugin_manager import load_plugins
from slimlab.runner import run, tracking_store
from slimlab.tracking import close_dead_runs
from tests.conftest import FAST, NO_MLFLOW_MODEL, SLIMLAB, free_port, slimlab

TINY = ["model=mlp", "technique=[]", NO_MLFLOW_MODEL]  # the smallest real run: an MLP on digits, no technique


def fresh_directory(tmp_path: Path) -> Path:
    """A directory for a store: on tmpfs when there is one (the race is between processes, not disks, and
    sqlite's fsyncs during MLflow's migrations take seconds on a disk)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(dir=shm, prefix="slimlab-test-"))
    return Path(tempfile.mkdtemp(dir=tmp_path))


@pytest.fixture(scope="session")
def migrated(tmp_path_factory) -> Iterator[Path]:
    """A store MLflow created and migrated once (seconds of sqlite fsyncs): each test gets a copy."""
    directory = fresh_directory(tmp_path_factory.mktemp("migrated"))
    MlflowClient(f"sqlite:///{directory / 'mlflow.db'}")
    yield directory / "mlflow.db"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def store(tmp_path, migrated) -> str:
    shutil.copy(migrated, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def all_runs(store: str) -> list:
    client = MlflowClient(store)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


# --- 1. processes opening a fresh store at once ---


def open_and_run(uris: list[str], barrier, results) -> None:
    """One process: for each fresh store, wait for the others, then open it as the tracking plugin does."""
    for uri in uris:
        barrier.wait()
        try:
            client = tracking.open_store(uri)
            experiment = tracking.experiment_id(client, "race", uri)
            run_id = client.create_run(experiment).info.run_id
            client.set_terminated(run_id, "FINISHED")
            results.put("ok")
        except Exception as error:
            results.put(f"{type(error).__name__}: {error}"[:300])


def test_processes_opening_a_fresh_store_at_once_lose_no_run(tmp_path):
    # Without the lock every round loses runs: `duplicate column name: step`, `Online migration expected to
    # match one row`, `table _alembic_tmp_... already exists` (each of 5 rounds of 2 processes, before the fix).
    processes, rounds = 2, 2
    directories = [fresh_directory(tmp_path) for _ in range(rounds)]
    uris = [f"sqlite:///{directory / 'mlflow.db'}" for directory in directories]
    context = multiprocessing.get_context("spawn")  # a clean interpreter, as two `slimlab run` are
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=open_and_run, args=(uris, barrier, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in range(processes * rounds)]
    for worker in workers:
        worker.join(timeout=30)
    try:
        assert outcomes == ["ok"] * (processes * rounds)
        for uri in uris:
            runs = all_runs(uri)
            assert [r.info.status for r in runs] == ["FINISHED"] * processes
            assert len({r.info.experiment_id for r in runs}) == 1  # one experiment, created once
    finally:
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)


def test_an_experiment_created_meanwhile_by_another_process_is_used(store):
    client = tracking.open_store(store)
    first = tracking.experiment_id(client, "shared", store)
    # The loser of the race asks after the winner created it: MLflow answers RESOURCE_ALREADY_EXISTS.
    assert tracking.experiment_id(client, "shared", store) == first
    client.create_experiment("taken")  # what another process did between our lookup and our create

    class LateClient:  # our lookup ran before theirs was created
        def __init__(self):
            self.asked = 0

        def __getattr__(self, name):
            return getattr(client, name)

        def get_experiment_by_name(self, name):
            self.asked += 1
            return None if self.asked == 1 else client.get_experiment_by_name(name)

    assert tracking.experiment_id(LateClient(), "taken", store) == client.get_experiment_by_name("taken").experiment_id


@pytest.mark.slow
def test_two_runs_started_together_in_a_fresh_directory_both_finish(tmp_path, cache_dir):
    """The issue's Done-when: 5 times, two `slimlab run` at once on a fresh directory: 10 of 10 FINISHED."""
    args = ["run", *TINY, *FAST, f"cache_dir={cache_dir}"]
    run(compose([*TINY, *FAST, f"cache_dir={cache_dir}", "tracking=none"]))  # cached: the runs do not train
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    statuses = []
    for _ in range(5):
        directory = fresh_directory(tmp_path)
        try:
            pair = [
                subprocess.Popen(
                    [*SLIMLAB, *args], cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                for _ in range(2)
            ]
            for process in pair:
                _, stderr = process.communicate(timeout=300)
                assert process.returncode == 0, stderr.decode()[-3000:]
            statuses += [r.info.status for r in all_runs(f"sqlite:///{directory / 'mlflow.db'}")]
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    assert statuses == ["FINISHED"] * 10


# --- 2. an error handler that cannot write its traceback ---


@pytest.mark.parametrize("technique", ["explode", "none"])
def test_a_run_whose_artifacts_cannot_be_written_is_closed_failed(technique, with_plugins, overrides, store, tmp_path):
    # A file where the artifact directory goes: every artifact write fails (as on a full disk), for root too.
    (tmp_path / "mlartifacts").write_text("not a directory")
    plugins = load_plugins()
    chain = "technique=[explode]" if technique == "explode" else "technique=[]"
    with pytest.raises((RuntimeError, OSError)) as raised:
        run(compose([*overrides, *TINY, chain], plugins), plugins)
    error = raised.value
    if technique == "explode":  # the run's own error, not the one of the handler that failed to log its traceback
        assert isinstance(error, RuntimeError) and str(error) == "boom"
    else:  # the run's last writes (config.yaml) failed: reported like any error of the run
        assert isinstance(error, OSError)
    (logged,) = all_runs(store)
    assert logged.info.status == "FAILED"
    assert logged.data.tags["slimlab.error"] == f"{type(error).__name__}: {error}"


# --- 3. runs whose process was killed ---


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _state(pid: int) -> str:
    """A process's state letter from /proc ("" without /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_running_runs_whose_process_is_gone_are_closed_killed(store):
    client = tracking.open_store(store)
    experiment = tracking.experiment_id(client, "tests", store)
    mine = liveness.process_tags()
    here = socket.gethostname()

    def running(**tags: str) -> str:
        return client.create_run(experiment, tags=tags).info.run_id

    dead = running(**{**mine, liveness.PID_TAG: str(dead_pid()), liveness.START_TAG: ""})
    start = mine[liveness.START_TAG]
    reused = running(**{**mine, liveness.START_TAG: start[:-1] + "x"})  # our pid, not our process
    rebooted = running(**{**mine, liveness.START_TAG: "another-boot" + start[start.find("/") :]})
    exited = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie until reaped
    while exited.pid and _state(exited.pid) not in ("Z", ""):
        time.sleep(0.05)
    zombie = running(**{**mine, liveness.PID_TAG: str(exited.pid), liveness.START_TAG: ""})
    alive = running(**mine)
    elsewhere = running(**{**mine, liveness.HOST_TAG: here + "-elsewhere", liveness.PID_TAG: str(dead_pid())})
    untagged = running()
    closed = close_dead_runs(tracking.MlflowStore(store), experiment)
    exited.wait()
    if not start:  # no /proc nor psutil: a live pid cannot be told from a reused one
        reused = rebooted = None
    assert set(closed) == {dead, reused, rebooted, zombie} - {None}
    for run_id in closed:
        run_ = client.get_run(run_id)
        assert run_.info.status == "KILLED"
        assert "is gone" in run_.data.tags["slimlab.error"]
    assert {client.get_run(r).info.status for r in (alive, elsewhere, untagged)} == {"RUNNING"}


def test_a_run_records_its_process_and_closes_the_runs_of_dead_processes(overrides, store):
    client = tracking.open_store(store)
    experiment = tracking.experiment_id(client, "tests", store)
    tags = {**liveness.process_tags(), liveness.PID_TAG: str(dead_pid())}
    killed = client.create_run(experiment, tags=tags).info.run_id
    run(compose([*overrides, *TINY]))
    assert client.get_run(killed).info.status == "KILLED"
    (new,) = [r for r in all_runs(store) if r.info.run_id != killed]
    assert new.info.status == "FINISHED"
    assert {k: new.data.tags[k] for k in tags} == liveness.process_tags()


def wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


@pytest.mark.slow
def test_a_sweep_closes_the_parent_and_child_of_a_sigkilled_sweep(tmp_path, store, cache_dir):
    tracking.open_store(store)  # the store exists before it is polled
    common = [*TINY, f"tracking.uri={store}", "experiment_name=tests"]
    command = [*SLIMLAB, "run", "-m", *common, "train.epochs=500,501", f"cache_dir={tmp_path / 'cache'}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any("mlflow.parentRunId" in r.data.tags for r in all_runs(store)), process)
        time.sleep(1)  # into the baseline's training, not inside the run's first writes
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    killed = all_runs(store)
    assert sorted(r.info.status for r in killed) == ["RUNNING", "RUNNING"]  # what SIGKILL leaves behind
    run(compose([*common, *FAST, f"cache_dir={cache_dir}", "tracking=none"]))  # cached: the next sweep is quick
    again = slimlab("run", "-m", *common, *FAST, f"cache_dir={cache_dir}", cwd=tmp_path)  # a sweep of one job
    assert again.returncode == 0, again.stderr[-3000:]
    client = MlflowClient(store)
    for before in killed:
        after = client.get_run(before.info.run_id)
        assert after.info.status == "KILLED"
        assert "is gone" in after.data.tags["slimlab.error"]


# --- 4. stores that cannot be used: refused before any work ---


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` made unwritable for real: chmod, or for root (whom modes do not stop) the immutable attribute."""
    undo = None
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        undo = lambda: path.chmod(mode)  # noqa: E731
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(path)], check=True)  # noqa: E731
    try:
        if undo is None or os.access(path, os.W_OK):
            pytest.skip(f"cannot make {path} read-only here")
        yield path
    finally:
        if undo is not None:
            undo()


def plugin_check(uri: str, host: bool = True) -> None:
    """The check the plan makes of the store that ``tracking.uri`` names."""
    cfg = compose(["model=mlp", f"tracking.uri={uri}"])
    tracking_store(cfg, load_plugins()).check(host)


@pytest.mark.parametrize("uri", ["foo://bar", "s3://bucket/runs"])
def test_a_tracking_uri_mlflow_cannot_use_is_refused(uri):
    with pytest.raises(ConfigError, match=r"tracking.uri=.*MLflow has no tracking store .*valid: .*sqlite://"):
        plugin_check(uri)


def test_a_bad_uri_from_the_environment_is_named_so(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    with pytest.raises(ConfigError, match=r"^\$MLFLOW_TRACKING_URI=foo://bar: MLflow has no tracking store"):
        tracking_store(compose(["model=mlp"]), load_plugins()).check(True)


def test_a_file_store_is_refused_unless_mlflow_allows_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        plugin_check(f"file://{tmp_path / 'mlruns'}")


def test_an_unreachable_tracking_server_is_refused_in_seconds():
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with pytest.raises(ConfigError, match=r"tracking server http://127.0.0.1:\d+ \(tracking.uri\) does not answer"):
        plugin_check(url)
    plugin_check(url, host=False)  # the jobs run elsewhere: only they can tell


@pytest.mark.parametrize("status", [404, 503])
def test_a_server_that_answers_with_an_error_is_refused(status):
    """A proxy whose MLflow is down (5xx), or a host that is no MLflow server (404): MLflow would retry for minutes."""
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_error(status)

        def log_message(self, *args):  # quiet
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match=rf"answers /health with HTTP {status} .*not a running MLflow server"):
            plugin_check(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


@pytest.mark.parametrize("uri", ["sqlite:///", "sqlite:///:memory:"])
def test_an_in_memory_sqlite_store_is_refused(uri):
    with pytest.raises(ConfigError, match="in-memory sqlite store: the runs would vanish"):
        plugin_check(uri)


def test_a_writable_store_passes(store):
    plugin_check(store)


def test_a_read_only_store_file_is_refused(tmp_path, store):
    tracking.open_store(store)
    with read_only(tmp_path / "mlflow.db"):
        with pytest.raises(ConfigError, match=r"the tracking store .*mlflow.db is read-only: the file is not writable"):
            plugin_check(store)


def test_a_store_in_a_read_only_directory_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    with read_only(folder):
        with pytest.raises(ConfigError, match=r"the tracking store .*ro/new/mlflow.db is read-only: the directory"):
            plugin_check(f"sqlite:///{folder / 'new' / 'mlflow.db'}")


@pytest.mark.parametrize("case", ["read-only", "unknown scheme", "no server", "no server, sweep"])
def test_a_run_on_a_store_it_cannot_use_is_refused_in_one_line_before_any_work(case, tmp_path, store):
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    uri = {"read-only": store, "unknown scheme": "foo://bar"}.get(case, url)
    expected = {
        "read-only": f"slimlab: error: the tracking store {tmp_path / 'mlflow.db'} is read-only: ",
        "unknown scheme": "slimlab: error: tracking.uri=foo://bar: MLflow has no tracking store for foo://; valid: ",
        "no server": f"slimlab: error: tracking server {url} (tracking.uri) does not answer (",
        "no server, sweep": f"slimlab: error: job 0 (seed=0): tracking server {url} (tracking.uri) does not answer (",
    }[case]
    sweep = ["-m", "seed=0,1"] if case.endswith("sweep") else []
    fresh_cache = tmp_path / "cache"  # nothing may be trained for a refused run
    args = ["run", *sweep, *TINY, *FAST, f"cache_dir={fresh_cache}", f"tracking.uri={uri}"]
    with read_only(tmp_path / "mlflow.db") if case == "read-only" else contextlib.nullcontext():
        # Without the check, a missing server is retried for minutes: the timeout fails the test instead.
        result = slimlab(*args, cwd=tmp_path, timeout=90)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr[-3000:]
    assert "autoflush" not in result.stderr
    assert not fresh_cache.exists() and not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_a_read_only_error_from_sqlite_is_one_line(tmp_path, store):
    # The store looked writable up front but sqlite refused (e.g. a read-only mount found late): same line.
    error = RuntimeError("(raised as a result of Query-invoked autoflush ...)")
    error.__cause__ = OSError("(sqlite3.OperationalError) attempt to write a readonly database")
    with pytest.raises(ConfigError, match="is read-only"), tracking.read_only_as_config_error(store):
        raise error
    with pytest.raises(RuntimeError), tracking.read_only_as_config_error(store):
        raise RuntimeError("something else")


# 5. a report never creates a store: tests/test_reliability.py (through the command line)


def test_a_report_reads_a_store_it_cannot_write(store, tmp_path, capsys):
    """An archived or shared mlflow.db this process cannot write is still reported on (it is only read)."""
    from slimlab.cli import report_command

    writer = tracking.MlflowStore(store)
    run_id = writer.create_run(writer.experiment("archived"), "lenet prune(0.5)", {})
    writer.log_metrics(run_id, {"accuracy": 0.9, "baseline_accuracy": 0.95, "accuracy_drop": 0.05, "size_bytes": 1e3})
    writer.end_run(run_id, "FINISHED")
    with read_only(tmp_path / "mlflow.db"):
        code = report_command(["--experiment", "archived", "--uri", store, "--out", str(tmp_path / "report")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "lenet prune(0.5)" in captured.out and (tmp_path / "report" / "report.csv").exists()
