"""The tracking contract (``slimlab.tracking.TrackingStore``), checked on both of its implementations: MLflow's (a
sqlite store) and ``tests/file_tracker.py``, a file-based backend installed as a third-party plugin would be, which
sweeps, resume and the report must work with unchanged."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from slimlab.errors import ConfigError
from slimlab.liveness import HOST_TAG, PID_TAG, START_TAG, process_tags
from slimlab.tracking import ERROR_TAG, RUN_KEY_TAG, TrackingStore, children, close_dead_runs, finished_run
from tests.conftest import slimlab, write_plugin
from tests.file_tracker import FileStore

KINDS = ["mlflow", "files"]


def make_store(kind: str, where: Path, uri: str | None = "") -> TrackingStore:
    """A store of backend ``kind`` under ``where`` (``uri=None``: the backend's default)."""
    if kind == "files":
        return FileStore(str(where / "runs") if uri == "" else uri)
    from slimlab.mlflow_tracking import MlflowStore

    return MlflowStore(f"sqlite:///{where / 'mlflow.db'}" if uri == "" else uri)


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """A new sqlite MLflow store, created once: each test copies it (MLflow's migrations take seconds a store)."""
    where = tmp_path_factory.mktemp("mlflow-template")
    make_store("mlflow", where).client.search_experiments()
    return where / "mlflow.db"


@pytest.fixture(params=KINDS)
def tracker(request, tmp_path) -> TrackingStore:
    if request.param == "mlflow":
        shutil.copy(request.getfixturevalue("empty_mlflow_db"), tmp_path / "mlflow.db")
    return make_store(request.param, tmp_path)


def artifact(store: TrackingStore, run_id: str, name: str, tmp_path: Path) -> str:
    """The text of a run's artifact, read back from where the store keeps it."""
    if isinstance(store, FileStore):
        (path,) = Path(store.uri).glob(f"*/{run_id}/artifacts/{name}")
        return path.read_text()
    return Path(store.client.download_artifacts(run_id, name, str(tmp_path))).read_text()


def new_run(store: TrackingStore, experiment_id: str, name: str, tags=None, parent=None) -> str:
    """A run started at least a millisecond after the previous one (MLflow orders by its start time in ms)."""
    time.sleep(0.002)
    return store.create_run(experiment_id, name, dict(tags or {}), parent=parent)


@pytest.mark.parametrize("kind", KINDS)
def test_making_a_store_or_checking_it_touches_nothing_on_disk(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for store in (make_store(kind, tmp_path / "new"), make_store(kind, tmp_path, uri=None)):
        assert isinstance(store, TrackingStore)
        store.check(True)
        store.check(False)
        assert list(tmp_path.iterdir()) == []
    default = make_store(kind, tmp_path, uri=None).uri  # the default is absolute: a job may run elsewhere
    assert default == (str(tmp_path / "slimlab-runs") if kind == "files" else f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize("kind", KINDS)
def test_reading_a_store_that_does_not_exist_creates_nothing(kind, tmp_path):
    """What resume and the report ask first: nothing recorded there yet is an answer, not a new empty store."""
    store = make_store(kind, tmp_path / "new")
    assert store.experiment("tests", create=False) is None
    assert finished_run(store, "tests", "key") is None
    assert store.search(None) == [] and store.search(None, tags={"slimlab.sweep": "parent"}) == []
    assert not (tmp_path / "new").exists()


def test_experiments_are_found_by_name_and_created_only_when_asked(tracker):
    assert tracker.experiment("tests", create=False) is None
    first = tracker.experiment("tests", primary="accuracy", params=["technique.prune.amount"])
    assert isinstance(first, str)
    assert tracker.experiment("tests") == first
    assert tracker.experiment("tests", create=False) == first
    other = tracker.experiment("other")
    assert other != first and tracker.experiment("other", create=False) == other
    assert tracker.experiment("missing", create=False) is None


def test_params_metrics_and_tags_round_trip(tracker):
    experiment = tracker.experiment("tests")
    run_id = tracker.create_run(experiment, "prune(0.5)", {"slimlab.sweep": "job", "kept": "yes"})
    run = tracker.get_run(run_id)
    assert (run.run_id, run.name, run.status, run.experiment_id, run.parent) == (
        run_id, "prune(0.5)", "RUNNING", experiment, None,
    )  # fmt: skip
    assert run.start_time > 1_600_000_000_000  # milliseconds since the epoch
    tracker.log_params(run_id, {"model.name": "mlp", "technique.prune.amount": "0.5"})
    tracker.log_metrics(run_id, {"accuracy": 0.9, "size_bytes": 1024})
    tracker.log_metrics(run_id, {"accuracy": 0.95})
    tracker.set_tags(run_id, {"slimlab.job.0": '{"status": "RUNNING"}'})
    tracker.set_tags(run_id, {"slimlab.job.0": '{"status": "FINISHED"}'})  # set again: the last value
    run = tracker.get_run(run_id)
    assert run.params == {"model.name": "mlp", "technique.prune.amount": "0.5"}
    assert run.metrics == {"accuracy": 0.95, "size_bytes": 1024.0}
    tags = {"slimlab.sweep": "job", "kept": "yes", "slimlab.job.0": '{"status": "FINISHED"}'}
    assert tags.items() <= run.tags.items()


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_end_run_closes_with_the_status(tracker, status):
    experiment = tracker.experiment("tests")
    run_id, other = tracker.create_run(experiment, "a", {}), tracker.create_run(experiment, "b", {})
    tracker.end_run(run_id, status)
    assert tracker.get_run(run_id).status == status
    assert tracker.get_run(other).status == "RUNNING"


def test_search_filters_by_tags_status_parent_and_experiment_newest_first(tracker):
    tests, other = tracker.experiment("tests"), tracker.experiment("other")
    parent = new_run(tracker, tests, "sweep", {"slimlab.sweep": "parent"})
    first = new_run(tracker, tests, "job 0", {"slimlab.job": "0", "colour": "red"}, parent=parent)
    second = new_run(tracker, tests, "job 1", {"slimlab.job": "1", "colour": "blue"}, parent=parent)
    alone = new_run(tracker, tests, "alone", {"colour": "red"})
    elsewhere = new_run(tracker, other, "elsewhere", {"colour": "red"})
    tracker.end_run(first, "FINISHED")

    def ids(**filters) -> list[str]:
        return [run.run_id for run in tracker.search(**filters)]

    assert ids(experiment_ids=[tests]) == [alone, second, first, parent]
    assert ids(experiment_ids=None) == [elsewhere, alone, second, first, parent]
    assert ids(experiment_ids=[other]) == [elsewhere]
    assert ids(experiment_ids=[tests], parent=parent) == [second, first]
    assert [run.parent for run in tracker.search([tests], parent=parent)] == [parent, parent]
    assert [run.run_id for run in children(tracker, parent)] == [second, first]
    assert ids(experiment_ids=[tests], tags={"colour": "red"}) == [alone, first]
    assert ids(experiment_ids=None, tags={"colour": "red"}) == [elsewhere, alone, first]
    assert ids(experiment_ids=[tests], tags={"colour": "red", "slimlab.job": "0"}) == [first]
    assert ids(experiment_ids=[tests], status="FINISHED") == [first]
    assert ids(experiment_ids=[tests], status="RUNNING", parent=parent) == [second]
    assert ids(experiment_ids=[tests], tags={"colour": "green"}) == []
    assert children(tracker, first) == []


def test_text_and_files_are_stored_as_artifacts(tracker, tmp_path):
    run_id = tracker.create_run(tracker.experiment("tests"), "a", {})
    tracker.log_text(run_id, "model: mlp\n", "config.yaml")
    local = tmp_path / "local" / "report.csv"
    local.parent.mkdir()
    local.write_text("name,accuracy\nprune,0.9\n")
    tracker.log_file(run_id, local, folder="report")
    tracker.log_file(run_id, local)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    assert artifact(tracker, run_id, "config.yaml", downloads) == "model: mlp\n"
    assert artifact(tracker, run_id, "report/report.csv", downloads) == "name,accuracy\nprune,0.9\n"
    assert artifact(tracker, run_id, "report.csv", downloads) == "name,accuracy\nprune,0.9\n"


def test_finished_run_finds_the_newest_finished_run_with_the_key(tracker):
    assert finished_run(tracker, "tests", "key-1") is None  # no such experiment yet
    experiment = tracker.experiment("tests")
    running = new_run(tracker, experiment, "a", {RUN_KEY_TAG: "key-1"})
    failed = new_run(tracker, experiment, "b", {RUN_KEY_TAG: "key-1"})
    tracker.end_run(failed, "FAILED")
    assert finished_run(tracker, "tests", "key-1") is None
    tracker.end_run(running, "FINISHED")
    assert finished_run(tracker, "tests", "key-1").run_id == running
    newer = new_run(tracker, experiment, "c", {RUN_KEY_TAG: "key-1"})
    tracker.end_run(newer, "FINISHED")
    assert finished_run(tracker, "tests", "key-1").run_id == newer
    assert finished_run(tracker, "tests", "key-2") is None
    assert finished_run(tracker, "other", "key-1") is None


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_close_dead_runs_kills_the_running_runs_of_gone_processes_on_this_host(tracker):
    experiment = tracker.experiment("tests")
    gone = {HOST_TAG: socket.gethostname(), PID_TAG: str(dead_pid()), START_TAG: ""}
    dead = tracker.create_run(experiment, "dead", gone)
    live = tracker.create_run(experiment, "live", process_tags())
    remote = tracker.create_run(experiment, "remote", {**gone, HOST_TAG: "another-host"})
    done = tracker.create_run(experiment, "done", gone)
    tracker.end_run(done, "FINISHED")
    elsewhere = tracker.create_run(tracker.experiment("other"), "other experiment", gone)

    assert close_dead_runs(tracker, experiment) == [dead]
    closed = tracker.get_run(dead)
    assert closed.status == "KILLED" and "is gone" in closed.tags[ERROR_TAG]
    statuses = {run_id: tracker.get_run(run_id).status for run_id in (live, remote, done, elsewhere)}
    assert statuses == {live: "RUNNING", remote: "RUNNING", done: "FINISHED", elsewhere: "RUNNING"}
    assert close_dead_runs(tracker, experiment) == []


def _job(kind: str, uri: str, experiment_id: str, parent: str, worker: int, jobs: int) -> None:
    """What a sweep's job process does to the store: its own run, and its outcome as a tag of the shared parent."""
    store = make_store(kind, Path("."), uri=uri)
    for job in range(worker * jobs, (worker + 1) * jobs):
        run_id = store.create_run(experiment_id, f"job {job}", {"slimlab.job": str(job)}, parent=parent)
        store.log_metrics(run_id, {"accuracy": job / 100})
        store.end_run(run_id, "FINISHED")
        store.set_tags(parent, {f"slimlab.job.{job}": run_id})


@pytest.mark.parametrize("kind", [pytest.param("mlflow", marks=pytest.mark.slow), "files"])  # spawn + mlflow: 15 s
def test_processes_writing_one_store_at_once_lose_nothing(kind, tmp_path):
    store = make_store(kind, tmp_path)
    experiment = store.experiment("tests")  # as a sweep does: the store and its parent exist before any job
    parent = store.create_run(experiment, "sweep", {})
    workers, jobs = 3, 8
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_job, kind, store.uri, experiment, parent, w, jobs) for w in range(workers)]
        for future in futures:
            future.result()
    runs = children(store, parent)
    assert sorted(int(run.tags["slimlab.job"]) for run in runs) == list(range(workers * jobs))
    assert {run.status for run in runs} == {"FINISHED"}
    outcomes = {k: v for k, v in store.get_run(parent).tags.items() if k.startswith("slimlab.job.")}
    assert outcomes == {f"slimlab.job.{run.tags['slimlab.job']}": run.run_id for run in runs}


# --- the file store's own checks ---


def test_a_file_store_uri_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    for uri in (tmp_path / "runs", tmp_path / "runs" / "below"):
        with pytest.raises(ConfigError) as refused:
            FileStore(str(uri)).check(True)
        message = str(refused.value)
        assert message.startswith(f"tracking.uri={uri}: {tmp_path / 'runs'} is a file, not a directory; valid: ")
        assert "\n" not in message


def test_a_file_store_in_a_directory_that_cannot_be_written_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    undo = make_read_only(locked)
    try:
        for uri in (locked, locked / "new" / "runs"):
            with pytest.raises(ConfigError, match=rf"^tracking.uri={uri}: the directory {locked} is not writable; "):
                FileStore(str(uri)).check(False)
        assert list(locked.iterdir()) == []
    finally:
        undo()
    FileStore(str(locked / "new")).check(True)  # writable again: accepted


def make_read_only(path: Path):
    """Make the directory ``path`` unwritable for real (root ignores modes: the immutable attribute); the undo."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        undo = lambda: path.chmod(mode)  # noqa: E731
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(path)], check=True)  # noqa: E731
    else:
        pytest.skip(f"cannot make {path} read-only here")
    if os.access(path, os.W_OK):
        undo()
        pytest.skip(f"cannot make {path} read-only here")
    return undo


def test_where_names_the_directory_of_the_runs(tmp_path):
    store = FileStore(str(tmp_path / "runs"))
    experiment = store.experiment("tests")
    run_id = store.create_run(experiment, "a", {})
    line = store.where(experiment)
    assert "\n" not in line and str(tmp_path / "runs" / experiment) in line
    assert (tmp_path / "runs" / experiment / run_id / "run.json").is_file()


# --- a tracking backend comes as a plugin ---

FILE_TRACKER = (Path(__file__).parent / "file_tracker.py").read_text()
CLAIMS = """
from slimlab import hookimpl


@hookimpl
def register_tracking(register):
    register({name!r}, lambda uri: None)
"""


def install(site: Path, name: str, source: str, value: str = "") -> None:
    """``source`` installed as the distribution slimlab-<name>, entry point ``name`` (``value``: after the module)."""
    write_plugin(site, f"slimlab-{name}", f"slimlab_{name}", source, {name: f"slimlab_{name}{value}"})


def test_the_file_backend_is_discovered_as_a_third_party_plugin(tmp_path, monkeypatch):
    from slimlab.plugin_manager import load_plugins

    install(tmp_path, "files", FILE_TRACKER, ":plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins()
    info = {i.name: i for i in plugins.infos}["files"]
    assert (info.status, info.distribution) == ("loaded", "slimlab-files"), info.error
    assert plugins.trackers["files"][0] == "files"
    store = plugins.tracking_store("files", str(tmp_path / "runs"))
    assert isinstance(store, TrackingStore) and type(store).__module__ == "slimlab_files"
    assert store.uri == str(tmp_path / "runs")
    assert "mlflow" in plugins.trackers  # the built-in, through the same hook
    with pytest.raises(ConfigError, match=r"^tracking.backend=nope: no plugin registers it; valid: none, files, "):
        plugins.tracking_store("nope")


@pytest.mark.parametrize(
    "name,taken_by", [("none", "slimlab \\(no tracking\\)"), ("mlflow", "'mlflow'"), ("files", "'files'")]
)
def test_a_backend_name_already_taken_is_refused(name, taken_by, tmp_path, monkeypatch):
    from slimlab.plugin_manager import load_plugins

    install(tmp_path, "files", FILE_TRACKER, ":plugin")
    claim = f"zclaim_{name}"  # loaded after `files` (by name); a module of its own (imported modules stay)
    install(tmp_path, claim, CLAIMS.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins()
    refused = {i.name: i for i in plugins.infos}[claim]
    assert refused.status == "failed"
    expected = f"plugin '{claim}' registers tracking backend '{name}', already taken by {taken_by}"
    assert re.fullmatch(expected, refused.error), refused.error
    infos = {i.name: i for i in plugins.infos}
    assert infos["files"].status == "loaded" and plugins.trackers["files"][0] == "files"
    assert "none" not in plugins.trackers and plugins.trackers["mlflow"][0] == "mlflow"


# --- end to end: a sweep recorded by the file backend, through the real command line ---


def test_a_sweep_tracked_by_the_file_backend_finishes_resumes_and_reports(tmp_path, overrides):
    site, runs = tmp_path / "site", tmp_path / "runs"
    install(site, "files", FILE_TRACKER, ":plugin")
    env = {"PYTHONPATH": str(site)}
    tiny = [o for o in overrides if not o.startswith("tracking.uri=")] + ["model=mlp", "train.epochs=1"]
    command = ["run", "-m", "tracking.backend=files", f"tracking.uri={runs}", *tiny, "technique=prune"]
    command.append("technique.prune.amount=0.3,0.6")
    first = slimlab(*command, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()  # recorded in the file store only
    store = FileStore(str(runs))
    (parent,) = store.search(tags={"slimlab.sweep": "parent"})
    jobs = children(store, parent.run_id)
    assert sorted((run.status, run.params["technique.prune.amount"]) for run in jobs) == [
        ("FINISHED", "0.3"), ("FINISHED", "0.6"),
    ]  # fmt: skip
    assert all("accuracy" in run.metrics and "size_bytes" in run.metrics for run in jobs)
    assert store.get_run(parent.run_id).status == "FINISHED"

    again = slimlab(*command, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "sweep: 0 finished, 0 failed, 2 skipped of 2 jobs" in again.stdout
    for run in jobs:
        assert f"SKIPPED: the same run key already FINISHED as run {run.run_id}" in again.stdout
    second, first_parent = store.search(tags={"slimlab.sweep": "parent"})
    assert first_parent.run_id == parent.run_id and children(store, second.run_id) == []
    assert second.status == "FINISHED" and (runs / second.experiment_id / second.run_id / "artifacts/report").is_dir()
    outcomes = [json.loads(v) for k, v in second.tags.items() if k.startswith("slimlab.job.")]
    assert sorted((o["status"], o["run_id"]) for o in outcomes) == sorted(("SKIPPED", r.run_id) for r in jobs)

    report = slimlab("report", "--backend", "files", "--uri", str(runs), "--out", str(tmp_path / "report"),
                     cwd=tmp_path, env=env)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"sweep {second.run_id[:8]}: 2 finished runs" in report.stdout
    assert report.stdout.count("prune(0.") >= 2 and (tmp_path / "report" / "report.csv").is_file()


def test_a_file_store_that_cannot_be_used_is_bad_input_before_any_work(tmp_path):
    site = tmp_path / "site"
    install(site, "files", FILE_TRACKER, ":plugin")
    (tmp_path / "taken").write_text("a file")
    result = slimlab("run", "tracking.backend=files", f"tracking.uri={tmp_path / 'taken'}", "model=mlp",
                     cwd=tmp_path, env={"PYTHONPATH": str(site)})  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (
        f"slimlab: error: tracking.uri={tmp_path / 'taken'}: {tmp_path / 'taken'} is a file, not a directory; "
        "valid: a directory slimlab can write (made if missing)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "taken"]  # nothing recorded, no outputs/
