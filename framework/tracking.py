"""The tracking contract: what slimlab records of a run and reads back, whatever store keeps it.

A tracking backend is a plugin that registers a store factory with ``register_tracking`` (API 2.3):
``register(name, factory)``; ``tracking.backend=<name>`` selects it and ``factory(uri)`` (``tracking.uri``, None for
the backend's default) returns a ``TrackingStore``. MLflow is the one built-in backend (``slimlab.mlflow_tracking``).

Everything that records or reads runs goes through a store: one run (``Recorder``, below), a sweep's parent run, its
jobs' outcomes and resume (``slimlab.sweep``, ``slimlab.sweep_job``), the report (``slimlab.report``). Runs are plain
``RunRecord`` values. The store's own features beyond the contract (MLflow's comparison view and logged models) stay in
its backend.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from slimlab import hookimpl
from slimlab.liveness import HOST_TAG, PID_TAG, process_gone, process_tags

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from slimlab.context import RunContext
    from slimlab.plugin_manager import Plugins

log = logging.getLogger("slimlab")

STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
ERROR_TAG = "slimlab.error"
RUN_KEY_TAG = "slimlab.run_key"  # a run's identity (runner.run_key): resume finds a FINISHED run by it
COLUMNS = ("compression_ratio", "size_bytes", "speedup", "sparsity")  # the costs beside the task metric, everywhere


@dataclass(frozen=True)
class RunRecord:
    """One run as a store gives it back."""

    run_id: str
    name: str
    status: str  # one of STATUSES
    experiment_id: str
    start_time: int = 0  # milliseconds since the epoch
    parent: str | None = None  # the sweep's parent run, for a job's run
    metrics: dict[str, float] = field(default_factory=dict)  # the last value of each
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class TrackingStore(Protocol):
    """What slimlab needs of a tracking store. ``tests/test_tracking_contract.py`` checks an implementation
    (``tests/file_tracker.py`` is one).

    Statuses are ``STATUSES``. A store is shared by the processes of a sweep (each opens its own from ``uri``), so
    every method must be safe when other processes write the same store at the same time; within the launching
    process, one store object is used by several threads (the sweep's progress line, closing it on Ctrl-C).
    Constructing one does no I/O: ``check`` says whether it can be used, the first write creates it.
    """

    uri: str  # where it is, as a job process opens it again (``factory(uri)``)

    def check(self, host: bool, write: bool = True) -> None:
        """Raise ``ConfigError`` (one line: what is wrong, what is valid) when runs cannot be recorded here.

        ``host=False``: the runs happen on other machines; skip what only they can tell. ``write=False``: the
        caller only reads (a report), so a store it cannot write is fine. Writes nothing."""
        ...

    def experiment(
        self, name: str, *, create: bool = True, primary: str | None = None, higher_is_better: bool = True,
        params: Iterable[str] = (),
    ) -> str | None:  # fmt: skip
        """The id of experiment ``name``, created if new (None when absent and ``create=False``).

        ``primary``, ``higher_is_better`` and ``params`` say how its runs are compared (the task metric, its key
        params), for a store that shows them; a store may ignore them."""
        ...

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """Open a RUNNING run (a child of ``parent`` if given); return its id."""
        ...

    def log_params(self, run_id: str, params: dict[str, str]) -> None: ...

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None: ...

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set tags; a tag set again takes the new value (a sweep's job outcomes are tags of its parent)."""
        ...

    def log_text(self, run_id: str, text: str, name: str) -> None:
        """Store ``text`` as the run's artifact ``name`` (which may hold folders: ``report/front.json``)."""
        ...

    def log_file(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        """Copy the local file ``path`` into the run's artifacts (under ``folder``)."""
        ...

    def end_run(self, run_id: str, status: str) -> None:
        """Close the run with ``status`` (FINISHED, FAILED or KILLED)."""
        ...

    def get_run(self, run_id: str) -> RunRecord: ...

    def search(
        self, experiment_ids: list[str] | None = None, *, tags: dict[str, str] | None = None,
        status: str | None = None, parent: str | None = None,
    ) -> list[RunRecord]:  # fmt: skip
        """Every run of the experiments (None: of every experiment) that has all ``tags``, ``status`` and
        ``parent`` given, newest first."""
        ...

    def where(self, experiment_id: str) -> str:
        """One line that says where to look at the experiment's runs (a UI link, a directory)."""
        ...


def store_for(cfg: DictConfig, plugins: Plugins, uri: str | None = None) -> TrackingStore:
    """The store ``cfg.tracking`` selects (``uri`` overrides ``tracking.uri``: a sweep's store for its jobs)."""
    return plugins.tracking_store(cfg.tracking.backend, uri or cfg.tracking.get("uri"))


def children(store: TrackingStore, parent: str) -> list[RunRecord]:
    """The runs of a sweep's jobs."""
    return store.search([store.get_run(parent).experiment_id], parent=parent)


def close_dead_runs(store: TrackingStore, experiment_id: str) -> list[str]:
    """Close as KILLED the RUNNING runs of the experiment whose process (on this host) is gone; return their ids.

    A SIGKILL (or a lost machine) leaves a run RUNNING: the next run or sweep on the same host closes it, with
    ``slimlab.error`` saying why. Runs recorded on other hosts are left alone: their processes cannot be seen
    from here, so a run of another host stays RUNNING until a command on that host starts.
    """
    host = socket.gethostname()
    closed = []
    for run in store.search([experiment_id], tags={HOST_TAG: host}, status="RUNNING"):
        if not process_gone(run.tags):
            continue
        reason = f"killed: its process {run.tags.get(PID_TAG)} on {host} is gone (found by the next run on this host)"
        try:
            store.set_tags(run.run_id, {ERROR_TAG: reason})
            store.end_run(run.run_id, "KILLED")
        except Exception as error:  # closed by another process meanwhile, or the store is busy: not this run's fault
            log.warning("could not close run %s: %s: %s", run.run_id, type(error).__name__, error)
            continue
        log.warning("closed run %s as KILLED: its process %s is gone", run.run_id, run.tags.get(PID_TAG))
        closed.append(run.run_id)
    return closed


def finished_run(store: TrackingStore, experiment: str, run_key: str) -> RunRecord | None:
    """A FINISHED run of the experiment with the same run key, if there is one (what a resumed sweep skips)."""
    experiment_id = store.experiment(experiment, create=False)
    if experiment_id is None:
        return None
    found = store.search([experiment_id], tags={RUN_KEY_TAG: run_key}, status="FINISHED")
    return found[0] if found else None


def run_params(ctx: RunContext) -> dict[str, str]:
    """One param per option: the resolved config, each technique's options as the technique ran them (a scheme
    the backend chose, not ``None``), and the technique chain (``techniques``) to compare runs by."""
    from slimlab.config import flatten

    params = flatten(ctx.cfg)
    for step in ctx.steps:
        params |= {f"technique.{name}": _param(value) for name, value in step.options().items()}
    params["techniques"] = "+".join(step.name for step in ctx.steps) or "none"
    return params


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


class Recorder:
    """Records every run in the store ``ctx.tracking`` names: opens it in ``before_run``, logs and closes it in
    ``after_run`` or ``on_run_error``. Left out when ``tracking.backend=none``."""

    @hookimpl
    def before_run(self, ctx: RunContext) -> None:
        """Close this host's runs whose process is gone, open the run (a child of the sweep's parent in a sweep)."""
        from slimlab.sweep_job import this_job

        store = ctx.tracking
        tags, parent = dict(ctx.tags), None
        job = this_job()
        if job is not None and job.parent:
            tags["slimlab.job"], parent = str(job.number), job.parent
        key_params = [f"technique.{name}" for step in ctx.steps for name in step.key_params()]
        task = ctx.task
        experiment = store.experiment(
            ctx.cfg.experiment_name, primary=task.primary_metric, higher_is_better=task.higher_is_better,
            params=key_params,
        )  # fmt: skip
        close_dead_runs(store, experiment)
        run_id = store.create_run(experiment, ctx.run_name, tags | process_tags(), parent=parent)
        ctx.state["tracking"] = {"run_id": run_id, "experiment_id": experiment, "uri": store.uri}
        try:
            store.log_params(run_id, run_params(ctx))
        except BaseException as error:  # the runner only reports errors after before_run: close the run here
            close_failed(store, run_id, error, "")
            raise

    @hookimpl
    def after_run(self, ctx: RunContext, metrics: dict[str, float]) -> None:
        from omegaconf import OmegaConf

        from slimlab.sweep_job import record_outcome

        store, run_id = ctx.tracking, ctx.state["tracking"]["run_id"]
        store.log_metrics(run_id, metrics)
        store.set_tags(run_id, dict(ctx.tags))  # tags added while running (baseline, threads)
        store.log_text(run_id, OmegaConf.to_yaml(ctx.cfg, resolve=True), "config.yaml")
        store.log_text(run_id, "\n".join(_overrides()) + "\n", "overrides.txt")
        for path in ctx.artifacts.values():
            store.log_file(run_id, path)
        log_model = getattr(store, "log_model", None)
        if ctx.cfg.tracking.log_model and log_model is not None:  # a store's own model format (MLflow's)
            log_model(run_id, ctx)
        store.end_run(run_id, "FINISHED")
        record_outcome("FINISHED", run_id, store=store)

    @hookimpl
    def on_run_error(self, ctx: RunContext, error: BaseException, traceback_text: str) -> None:
        """Close the run FAILED (KILLED when interrupted) first, then record what can be recorded."""
        state = ctx.state.get("tracking")
        if state is None:  # failed before the run was opened: nothing recorded, nothing to close
            return
        close_failed(ctx.tracking, state["run_id"], error, traceback_text)


def close_failed(store: TrackingStore, run_id: str, error: BaseException, traceback_text: str) -> None:
    """Close a failed run, then tag its error, tell the sweep and log the traceback, each step on its own: a full
    disk that refuses the traceback file must not leave the run RUNNING."""
    from slimlab.sweep_job import record_outcome

    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    reason = f"{type(error).__name__}: {error}"
    steps = [
        ("close the run", lambda: store.end_run(run_id, status)),
        ("tag its error", lambda: store.set_tags(run_id, {ERROR_TAG: reason[:5000]})),
        ("record the job's outcome", lambda: record_outcome(status, run_id, reason, store=store)),
    ]
    if traceback_text:
        steps.append(("log its traceback", lambda: store.log_text(run_id, traceback_text, "traceback.txt")))
    for what, step in steps:
        try:
            step()
        except Exception as failure:  # the run's own error is what the user must see: this one is only logged
            log.error("run %s: could not %s: %s: %s", run_id, what, type(failure).__name__, failure)


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # composed outside a Hydra job
        return []


plugin = Recorder()
