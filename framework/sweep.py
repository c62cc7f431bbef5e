"""A sweep in the tracking store: one parent run per ``slimlab run -m``, one child run per job, a summary at the end.

The launching process (Hydra's ``on_multirun_start``) checks every job's config, creates the store, the
experiment and the parent run before any worker starts, and hands the parent's id and store to the jobs
through ``hydra.job.env_set``, which every launcher applies around each job, wherever it runs. Each job's
run is a child of it and each job records its outcome on the parent as a tag
``slimlab.job.<num>`` (without tracking: a file in the sweep directory), so outcomes cross processes and
hosts. A job that raises is recorded and the sweep goes on; ``on_multirun_end`` counts the outcomes (a job
that recorded none counts as failed), prints the summary, logs the report to the parent and closes it
FINISHED or FAILED. Interrupted, the running children and the parent are closed KILLED; killed outright
(SIGKILL, a lost machine), they are closed KILLED by the next sweep or run on the same host
(``tracking.close_dead_runs``: each run records its host and process).

Resume: a job whose run key (``slimlab.run_key``: the resolved config, the code and files behind the baseline,
the versions of torch, slimlab and every plugin; ``runner.run_key``) already has a FINISHED run in the experiment
is skipped (``resume=false`` runs everything).

Everything is recorded and read through the tracking contract (``slimlab.tracking.TrackingStore``), in the store
``tracking.backend`` and ``tracking.uri`` name: MLflow's, or any backend a plugin registers.

What one job knows and records is ``slimlab.sweep_job``; the launching process's side is a ``Sweep``, created by
whoever launches (``slimlab run``) and reachable from the Hydra callback through ``launching``/``current`` for the
duration of the launch: nothing of a sweep stays in this module once it is over.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from slimlab.errors import SweepSetupFailed
from slimlab.sweep_job import OUTCOMES_DIR, PARENT_ENV, URI_ENV, outcome_files, outcomes_of

if TYPE_CHECKING:
    from slimlab.plugin_manager import Plugins
    from slimlab.tracking import RunRecord, TrackingStore

LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher")  # jobs run on this machine: its devices can be checked
log = logging.getLogger("slimlab")


@dataclass
class SweepResult:
    """What a finished sweep did, job by job."""

    parent_run_id: str | None
    jobs: int | None
    outcomes: dict[int, dict[str, str]] = field(default_factory=dict)  # job number -> status, run_id, reason

    def count(self, status: str) -> int:
        return sum(1 for outcome in self.outcomes.values() if outcome["status"] == status)

    @property
    def failed(self) -> int:
        return self.count("FAILED") + self.count("KILLED")

    def headline(self) -> str:
        parts = [f"{self.count('FINISHED')} finished", f"{self.failed} failed", f"{self.count('SKIPPED')} skipped"]
        return f"sweep: {', '.join(parts)}" + (f" of {self.jobs} jobs" if self.jobs else "")

    def job_notes(self) -> list[str]:
        """A line per job that did not simply finish: a failure's reason, or where a skipped job's result is (that
        run is not one of this sweep's children)."""
        notes = []
        for number, outcome in sorted(self.outcomes.items()):
            if outcome["status"] in ("FAILED", "KILLED"):
                notes.append(f"job {number} {outcome['status']}: {outcome.get('reason', '')}")
            elif outcome["status"] == "SKIPPED":
                run = outcome.get("run_id") or "?"
                reason = f"the same run key already FINISHED as run {run}; its result counts for this sweep"
                notes.append(f"job {number} SKIPPED: {reason}")
        return notes

    def summary(self) -> str:
        """What the terminal shows at the end of the sweep."""
        return "\n".join([self.headline(), *(f"  {note}" for note in self.job_notes())])

    def description(self) -> str:
        """The parent run's description (markdown; the MLflow UI shows it)."""
        return "\n".join([self.headline(), "", *(f"- {note}" for note in self.job_notes())]).strip()


def summary_metrics(runs: list[RunRecord]) -> dict[str, float]:
    """The sweep's outcome as its parent run's metrics: ``best_<primary>`` (the finished child with the smallest
    ``<primary>_drop``), ``best_compression_ratio`` and ``best_speedup``. Named apart from the children's metrics,
    so the tradeoff charts plot the children, not the parent."""
    from slimlab.report import primary_metric

    finished = [run.metrics for run in runs if run.status == "FINISHED"]
    primaries = {primary_metric(metrics) for metrics in finished} - {None}
    summary = {}
    if len(primaries) == 1:  # children of different tasks have no one best
        (primary,) = primaries
        best = min(finished, key=lambda metrics: metrics.get(f"{primary}_drop", math.inf))
        summary[f"best_{primary}"] = best[primary]
    for name in ("compression_ratio", "speedup"):
        values = [metrics[name] for metrics in finished if name in metrics]
        if values:
            summary[f"best_{name}"] = max(values)
    return summary


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, as Hydra's basic sweeper will expand them; None for other sweepers."""
    target = str(config.hydra.sweeper.get("_target_", ""))
    if not target.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return [job for batch in BasicSweeper.split_arguments(_sweep_overrides(config), None) for job in batch]


def swept_overrides(config: DictConfig) -> list[str]:
    """What the sweep varies (``technique.prune.amount=0.5,0.9``), from the command line and ``sweeper.params``."""
    try:
        overrides = _sweep_overrides(config)
    except Exception:  # a sweeper's own syntax Hydra cannot parse: name the sweep by all its overrides
        return list(config.hydra.overrides.task)
    return [o.input_line for o in overrides if o.is_sweep_override() and o.input_line]


def _sweep_overrides(config: DictConfig) -> list:
    """The sweeper's ``params`` and the command line's overrides, parsed as Hydra's sweepers parse them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    return OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])


def validate_jobs(
    jobs: list[list[str]], host: bool, hydra_overrides: list[str] | None = None, plugins: Plugins | None = None
) -> None:
    """Compose and check every job's config before the first one starts; raise ConfigError naming the job.

    ``host=False`` when the jobs run elsewhere (Ray, SLURM): this machine's devices and kernels do not count.
    ``hydra_overrides``: the sweep's (``hydra.overrides.hydra``), composed into every job as its launcher will
    (``load_sweep_config``): ``hydra.searchpath`` finds the user's config directories (``--config-dir`` is
    already on the search path of the Hydra instance that runs the sweep). ``plugins``: the launch's (by default
    those each job's ``plugins.disable`` leaves).
    """
    from hydra import compose

    from slimlab.config import finish_composition
    from slimlab.errors import ConfigError
    from slimlab.hydra_errors import describe_hydra_error, is_bad_input
    from slimlab.plugin_manager import load_plugins
    from slimlab.runner import plan

    shared = set.intersection(*(set(job) for job in jobs)) if jobs else set()
    names: dict[str, list[str] | None] = {}  # module names by model config: one build for every job of a model
    for number, overrides in enumerate(jobs):
        swept = " ".join(o for o in overrides if o not in shared)  # what sets this job apart
        try:
            composed = compose("config", overrides=[*(hydra_overrides or []), *overrides], return_hydra_config=True)
            cfg = finish_composition(composed, announce=False)  # each job says what retargeting dropped
            plan(cfg, plugins or load_plugins(list(cfg.plugins.disable)), host=host, names=names)
        except ConfigError as error:
            raise ConfigError(f"job {number} ({swept}): {error}") from None
        except Exception as error:
            if not is_bad_input(error):
                raise
            infos = plugins.infos if plugins else ()
            raise ConfigError(f"job {number} ({swept}): {describe_hydra_error(error, infos)}") from None


def _hand_to_jobs(config: DictConfig, env: dict[str, str]) -> None:
    """Set ``env`` in every job through ``hydra.job.env_set``, which each launcher applies around a job.

    Jobs are composed again from the sweep's Hydra overrides (``load_sweep_config``), wherever they run, so
    the values go there; a Ray worker on another host or a SLURM job gets them like a local one.
    """
    from omegaconf import flag_override

    quoted = {key: value.replace("'", "\\'") for key, value in env.items()}
    with flag_override(config, ["struct", "readonly"], [False, False]):
        config.hydra.overrides.hydra.extend([f"+hydra.job.env_set.{k}='{v}'" for k, v in quoted.items()])


@dataclass
class Sweep:
    """The launching process's side of one sweep: its plugins, parent run, progress line and result.

    Created by whoever launches (``slimlab run``), which reads ``result`` for its exit code and calls
    ``interrupt`` when the launch is stopped; the Hydra callback reaches it through ``current()``.
    """

    plugins: Plugins | None = None
    result: SweepResult | None = None  # set when the multirun starts
    sweep_dir: str = "."
    store: TrackingStore | None = None  # the store and parent run, once the parent is open: an interruption closes them
    run_id: str | None = None
    _stop: threading.Event | None = None
    _progress: threading.Thread | None = None

    def active_parent(self) -> tuple[TrackingStore, str] | None:
        """(store, parent run id) while the sweep is tracked and open."""
        return (self.store, self.run_id) if self.store is not None and self.run_id else None

    def open_parent(self, config: DictConfig, jobs: list[list[str]] | None) -> None:
        """Open the store, close this host's runs whose process is gone, open the parent run."""
        from slimlab.liveness import process_tags
        from slimlab.plugin_manager import load_plugins
        from slimlab.tracking import close_dead_runs, store_for

        store = store_for(config, self.plugins or load_plugins(list(config.plugins.disable)))
        experiment = store.experiment(config.experiment_name)
        close_dead_runs(store, experiment)  # a sweep killed before this one (SIGKILL): its parent and children
        run_id = store.create_run(
            experiment,
            " ".join([f"sweep {config.experiment_name}:", *swept_overrides(config)])[:250],
            {
                "slimlab.sweep": "parent",
                "slimlab.sweep.overrides": " ".join(config.hydra.overrides.task)[:5000],
                "slimlab.sweep.sweeper": str(config.hydra.sweeper.get("_target_", "")),
                "slimlab.sweep.launcher": str(config.hydra.launcher.get("_target_", "")),
                **process_tags(),
            },
        )
        self.store, self.run_id = store, run_id  # from here on, an interruption closes it
        self.result.parent_run_id = run_id
        if jobs is not None:
            store.log_metrics(run_id, {"jobs": len(jobs)})
            store.log_text(run_id, "\n".join(" ".join(job) for job in jobs) + "\n", "jobs.txt")
        _hand_to_jobs(config, {PARENT_ENV: run_id, URI_ENV: store.uri})
        self._stop = threading.Event()
        self._progress = threading.Thread(
            target=_show_progress, args=(store, run_id, self.result.jobs, self._stop), daemon=True
        )
        self._progress.start()
        log.info("sweep: parent run %s in %s", run_id, store.uri)

    def _stop_progress(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._progress.join(timeout=10)
        self._stop = self._progress = None

    def _close(self) -> None:
        """Nothing left open: a later interruption has nothing to close."""
        self._stop_progress()
        self.store = self.run_id = None

    def finish(self) -> SweepResult | None:
        """Count the jobs' outcomes, print the summary, log the report and close the parent run."""
        result = self.result
        if result is None:
            return None
        self._stop_progress()
        parent, store = result.parent_run_id, self.store
        result.outcomes = outcome_files(self.sweep_dir)
        if parent is not None:
            result.outcomes |= outcomes_of(store, parent)
            for run in _close_running_children(store, parent, "FAILED"):
                number = int(run.tags.get("slimlab.job", -1))
                result.outcomes[number] = {"status": "FAILED", "run_id": run.run_id, "reason": "never finished"}
        for number in range(result.jobs or 0):  # a job that died before it could say so
            result.outcomes.setdefault(number, {"status": "FAILED", "run_id": "", "reason": "no outcome recorded"})
        print(result.summary(), flush=True)
        if parent is not None:
            from slimlab.report import sweep_report, sweep_runs

            counts = {"jobs_finished": result.count("FINISHED"), "jobs_failed": result.failed}
            counts["jobs_skipped"] = result.count("SKIPPED")
            counts |= summary_metrics(sweep_runs(store, parent))  # with the earlier runs of skipped jobs
            store.log_metrics(parent, counts)
            store.set_tags(parent, {"mlflow.note.content": result.description()})  # the MLflow UI's description
            try:
                sweep_report(store, parent, show=True)
            except Exception as error:  # the jobs' results stand; a failed report is reported, not fatal
                log.error("sweep report failed: %s: %s", type(error).__name__, error)
            store.end_run(parent, "FAILED" if result.failed else "FINISHED")
            print(store.where(store.get_run(parent).experiment_id), flush=True)
        self._close()
        return result

    def interrupt(self, status: str = "KILLED", wait: float = 30.0) -> None:
        """Ctrl-C or SIGTERM in the launching process: running children and the parent are closed KILLED.

        The closing gets ``wait`` seconds: an interruption that landed inside a store write can leave the store
        locked for a while, and a process asked to stop must stop; what could not be closed is said.
        """
        self._stop_progress()
        if self.active_parent() is not None:
            store, parent = self.store, self.run_id

            def close() -> None:
                try:
                    _close_running_children(store, parent, status)
                    store.end_run(parent, status)
                except Exception as error:  # the store is gone or locked: say so, the process still stops
                    log.error("sweep: could not close run %s: %s: %s", parent, type(error).__name__, error)

            closing = threading.Thread(target=close, daemon=True)
            closing.start()
            closing.join(timeout=wait)
            if closing.is_alive():
                log.error("sweep: could not close run %s and its children in %s within %.0f s", parent, store.uri, wait)
        self._close()


_current: ContextVar[Sweep | None] = ContextVar("slimlab_sweep", default=None)  # set by launching only


@contextmanager
def launching(sweep: Sweep) -> Iterator[Sweep]:
    """``sweep`` is the one ``current()`` gives (to the Hydra callback, a sweeper) for the duration of the block."""
    token = _current.set(sweep)
    try:
        yield sweep
    finally:
        _current.reset(token)


def current() -> Sweep | None:
    """The sweep being launched in this process, if any."""
    return _current.get()


def active_parent() -> tuple[TrackingStore, str] | None:
    """In the launching process: (store, parent run id) of the sweep being run, if it is tracked."""
    sweep = current()
    return sweep.active_parent() if sweep is not None else None


class SweepCallback(Callback):
    """Hydra callback (conf/config.yaml): the parent run around a multirun, and the summary after it.

    Works on the launch's ``Sweep`` (``current()``), or a sweep of its own when Hydra runs outside ``slimlab run``.
    """

    def __init__(self) -> None:
        self.sweep: Sweep | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled with Hydra's context for a launcher's worker process (joblib, submitit, Ray): without the
        sweep, which belongs to the launching process (its progress thread cannot be pickled, and a worker
        never starts or ends the multirun)."""
        return {"sweep": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from slimlab.errors import ConfigError
        from slimlab.hydra_errors import BadInput, describe_hydra_error, is_bad_input

        sweep = self.sweep = current() or Sweep()
        launcher = str(config.hydra.launcher.get("_target_", ""))
        try:
            jobs = job_overrides(config)
            if jobs is not None:
                hydra_overrides = list(config.hydra.overrides.hydra)
                host = launcher.endswith(LOCAL_LAUNCHERS)
                validate_jobs(jobs, host=host, hydra_overrides=hydra_overrides, plugins=sweep.plugins)
            else:  # another sweeper (e.g. slimlab_optuna) may check its own settings before anything starts
                from hydra.utils import get_class

                check = getattr(get_class(str(config.hydra.sweeper._target_)), "check_sweep", None)
                if check is not None:
                    check(config)
        except Exception as error:  # Hydra swallows a callback's Exceptions: bad input must stop the sweep
            infos = sweep.plugins.infos if sweep.plugins else ()
            raise BadInput(describe_hydra_error(error, infos) if is_bad_input(error) else str(error)) from error
        sweep._close()
        sweep.sweep_dir = str(config.hydra.sweep.dir)
        shutil.rmtree(Path(sweep.sweep_dir) / OUTCOMES_DIR, ignore_errors=True)  # an earlier sweep's, same dir
        sweep.result = SweepResult(None, len(jobs) if jobs is not None else None)
        if config.tracking.backend == "none":
            return
        try:
            sweep.open_parent(config, jobs)
        except BaseException as error:  # Hydra would only warn and run the jobs without their parent
            sweep.interrupt(status="FAILED")
            if isinstance(error, ConfigError):  # a store that cannot be used (read-only): bad input, one line
                raise BadInput(str(error)) from error
            if not isinstance(error, Exception):
                raise
            raise SweepSetupFailed(f"{type(error).__name__}: {error}") from error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = self.sweep or current()
        if sweep is None:
            return
        try:
            sweep.finish()
        except BaseException as error:  # Hydra would only warn: the parent must not stay RUNNING
            sweep.interrupt(status="FAILED")
            if not isinstance(error, Exception):
                raise
            raise SweepSetupFailed(f"the sweep's summary failed: {type(error).__name__}: {error}") from error


def _show_progress(
    store: TrackingStore, parent: str, jobs: int | None, stop: threading.Event, every: float = 5.0
) -> None:
    """A progress line in the launching process whenever the counts change: done / failed / running."""
    from slimlab.tracking import children

    shown = None
    while not stop.wait(every):
        try:
            statuses = [o["status"] for o in outcomes_of(store, parent).values()]
            running = sum(1 for run in children(store, parent) if run.status == "RUNNING")
        except Exception:  # a busy store: try again at the next tick
            continue
        line = (
            f"sweep progress: {len(statuses)}{f'/{jobs}' if jobs else ''} done "
            f"({statuses.count('FAILED')} failed, {statuses.count('SKIPPED')} skipped), {running} running"
        )
        if line != shown:
            print(line, flush=True)
            shown = line


def _close_running_children(store: TrackingStore, parent: str, status: str) -> list[RunRecord]:
    """Close the children still RUNNING (their worker died or was stopped) with ``status``; return them."""
    from slimlab.tracking import children

    closed = [run for run in children(store, parent) if run.status == "RUNNING"]
    for run in closed:
        store.end_run(run.run_id, status)
    return closed
