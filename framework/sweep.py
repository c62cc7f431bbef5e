"""A sweep in MLflow: one parent run per ``slimlab run -m``, one child run per job, a summary at the end.

The launching process (Hydra's ``on_multirun_start``) checks every job's config, creates the store, the
experiment and the parent run before any worker starts, and hands the parent's id to the jobs through
the environment (``SLIMLAB_SWEEP_RUN_ID``: joblib, Ray and submitit workers inherit it). Each job's run is
a child (``mlflow.parentRunId``) and records its outcome on the parent as a tag ``slimlab.job.<num>``, so
outcomes cross processes and hosts through the tracking store alone. A job that raises is recorded and
the sweep goes on; ``on_multirun_end`` counts the outcomes, prints the summary, logs the report to the
parent and closes it FINISHED or FAILED. Interrupted, the running children and the parent are closed KILLED.

Resume: a job whose resolved config (``slimlab.config_hash``) already has a FINISHED run in the experiment
is skipped (``resume=false`` runs everything).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from framework.errors import SweepSetupFailed

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_ENV = "SLIMLAB_SWEEP_RUN_ID"
URI_ENV = "SLIMLAB_SWEEP_URI"
JOB_TAG = "slimlab.job."  # + job number, on the parent: {"status", "run_id", "reason"}
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

    def summary(self) -> str:
        parts = [f"{self.count('FINISHED')} finished", f"{self.failed} failed", f"{self.count('SKIPPED')} skipped"]
        lines = [f"sweep: {', '.join(parts)}" + (f" of {self.jobs} jobs" if self.jobs else "")]
        for number, outcome in sorted(self.outcomes.items()):
            if outcome["status"] in ("FAILED", "KILLED"):
                lines.append(f"  job {number} {outcome['status']}: {outcome.get('reason', '')}")
        return "\n".join(lines)


_active: dict[str, Any] = {}  # the launching process's sweep: uri, parent run id, jobs, progress thread
_local_outcomes: dict[int, dict[str, str]] = {}  # tracking=none: the outcomes of jobs run in this process
last_result: SweepResult | None = None  # read by the CLI for its exit code


def parent_run_id() -> str | None:
    """The parent run of the sweep this process runs a job of, if any."""
    return os.environ.get(PARENT_ENV) or None


def sweep_uri() -> str | None:
    """The tracking store of the sweep this process runs a job of."""
    return os.environ.get(URI_ENV) or None


def in_sweep() -> bool:
    """Whether the current Hydra job is one job of a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # not inside a Hydra job (tests, notebooks)
        return False


def job_number() -> int:
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().job.num)


def record_outcome(status: str, run_id: str | None = None, reason: str = "", uri: str | None = None) -> None:
    """Tell the sweep how this job ended (a tag on the parent run, or in-process without tracking)."""
    if not in_sweep():
        return
    outcome = {
        "status": status,
        "run_id": run_id or "",
        "reason": reason.strip().splitlines()[0][:300] if reason else "",
    }
    parent = parent_run_id()
    if parent is None:
        _local_outcomes[job_number()] = outcome
        return
    from mlflow import MlflowClient

    MlflowClient(uri or sweep_uri()).set_tag(parent, f"{JOB_TAG}{job_number()}", json.dumps(outcome))


@dataclass(frozen=True)
class FinishedRun:
    run_id: str
    metrics: dict[str, float]


def finished_run(cfg: DictConfig, config_hash: str) -> FinishedRun | None:
    """A FINISHED run of the same experiment with the same resolved config, if there is one."""
    from mlflow import MlflowClient

    from framework.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`slimlab.config_hash` = '{config_hash}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return FinishedRun(runs[0].info.run_id, dict(runs[0].data.metrics)) if runs else None


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, as Hydra's basic sweeper will expand them; None for other sweepers."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    target = str(config.hydra.sweeper.get("_target_", ""))
    if not target.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def validate_jobs(jobs: list[list[str]]) -> None:
    """Compose and check every job's config before the first one starts; raise ConfigError naming the job."""
    from hydra import compose

    from framework.errors import ConfigError
    from framework.hydra_app import describe_hydra_error, is_bad_input, loaded_plugins
    from framework.runner import plan

    shared = set.intersection(*(set(job) for job in jobs)) if jobs else set()
    for number, overrides in enumerate(jobs):
        swept = " ".join(o for o in overrides if o not in shared)  # what sets this job apart
        try:
            cfg = compose("config", overrides=overrides)
            plan(cfg, loaded_plugins(list(cfg.plugins.disable)))
        except ConfigError as error:
            raise ConfigError(f"job {number} ({swept}): {error}") from None
        except Exception as error:
            if not is_bad_input(error):
                raise
            raise ConfigError(f"job {number} ({swept}): {describe_hydra_error(error)}") from None


class SweepCallback(Callback):
    """Hydra callback (conf/config.yaml): the parent run around a multirun, and the summary after it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from framework.hydra_app import BadInput

        global last_result
        jobs = job_overrides(config)
        try:
            if jobs is not None:
                validate_jobs(jobs)
        except Exception as error:  # Hydra swallows a callback's Exceptions: bad input must stop the sweep
            raise BadInput(str(error)) from error
        _local_outcomes.clear()
        last_result = SweepResult(None, len(jobs) if jobs is not None else None)
        if config.tracking.backend != "mlflow":
            return
        try:
            self._open_parent(config, jobs)
        except Exception as error:  # Hydra would only warn and run the jobs without their parent
            interrupt(status="FAILED")
            raise SweepSetupFailed(f"{type(error).__name__}: {error}") from error

    def _open_parent(self, config: DictConfig, jobs: list[list[str]] | None) -> None:
        global last_result
        from mlflow import MlflowClient

        from framework.tracking import experiment_id, tracking_uri

        uri = tracking_uri(config)
        client = MlflowClient(uri)
        experiment = experiment_id(client, config.experiment_name, uri)
        overrides = " ".join(config.hydra.overrides.task)
        parent = client.create_run(
            experiment,
            run_name=f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')} {overrides}"[:250],
            tags={
                "slimlab.sweep": "parent",
                "slimlab.sweep.overrides": overrides[:5000],
                "slimlab.sweep.sweeper": str(config.hydra.sweeper.get("_target_", "")),
                "slimlab.sweep.launcher": str(config.hydra.launcher.get("_target_", "")),
            },
        )
        run_id = parent.info.run_id
        if jobs is not None:
            client.log_metric(run_id, "jobs", len(jobs))
            client.log_text(run_id, "\n".join(" ".join(job) for job in jobs) + "\n", "jobs.txt")
        os.environ[PARENT_ENV], os.environ[URI_ENV] = run_id, uri
        _active.update(uri=uri, run_id=run_id)
        _pass_to_ray_workers(config, {PARENT_ENV: run_id, URI_ENV: uri})
        last_result = SweepResult(run_id, len(jobs) if jobs is not None else None)
        stop = threading.Event()
        progress = threading.Thread(target=_show_progress, args=(uri, run_id, last_result.jobs, stop), daemon=True)
        progress.start()
        _active.update(stop=stop, progress=progress)
        log.info("sweep: parent run %s in %s", run_id, uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish(config)


def _pass_to_ray_workers(config: DictConfig, env: dict[str, str]) -> None:
    """Ray workers on another host do not inherit this process's environment: hand it over in Ray's runtime_env.

    The launcher is built from this same config after ``on_multirun_start``. Local workers (joblib, submitit,
    a Ray cluster started here) inherit the environment anyway; SLURM jobs get it from sbatch's default export.
    """
    if "RayLauncher" not in str(config.hydra.launcher.get("_target_", "")):
        return
    from omegaconf import OmegaConf, flag_override

    with flag_override(config, ["struct", "readonly"], [False, False]):
        init = config.hydra.launcher.ray.init
        existing = init.get("runtime_env")
        runtime_env = OmegaConf.to_container(existing, resolve=True) if existing is not None else {}
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
        init.runtime_env = runtime_env


def _outcomes(client: MlflowClient, parent: str) -> dict[int, dict[str, str]]:
    tags = client.get_run(parent).data.tags
    return {int(k[len(JOB_TAG) :]): json.loads(v) for k, v in tags.items() if k.startswith(JOB_TAG)}


def _children(client: MlflowClient, parent: str) -> list:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def _show_progress(uri: str, parent: str, jobs: int | None, stop: threading.Event, every: float = 5.0) -> None:
    """A progress line in the launching process whenever the counts change: done / failed / running."""
    from mlflow import MlflowClient

    client, shown = MlflowClient(uri), None
    while not stop.wait(every):
        try:
            outcomes = _outcomes(client, parent)
            running = sum(1 for run in _children(client, parent) if run.info.status == "RUNNING")
        except Exception:  # a busy store: try again at the next tick
            continue
        statuses = [o["status"] for o in outcomes.values()]
        line = (
            f"sweep progress: {len(statuses)}{f'/{jobs}' if jobs else ''} done "
            f"({statuses.count('FAILED')} failed, {statuses.count('SKIPPED')} skipped), {running} running"
        )
        if line != shown:
            print(line, flush=True)
            shown = line


def _stop_progress() -> None:
    if "stop" in _active:
        _active["stop"].set()
        _active["progress"].join(timeout=10)


def finish(config: DictConfig | None = None) -> SweepResult | None:
    """Count the jobs' outcomes, print the summary, log the report and close the parent run."""
    global last_result
    result = last_result
    if result is None:
        return None
    _stop_progress()
    if result.parent_run_id is None:
        result.outcomes = dict(_local_outcomes)
        print(result.summary(), flush=True)
        return result
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(_active["uri"])
    parent = result.parent_run_id
    result.outcomes = _outcomes(client, parent)
    for run in _children(client, parent):  # a worker that died without reporting: its run is lost, not running
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
            number = int(run.data.tags.get("slimlab.job", -1))
            result.outcomes[number] = {"status": "FAILED", "run_id": run.info.run_id, "reason": "never finished"}
    now = int(time.time() * 1000)
    counts = {"jobs_finished": result.count("FINISHED"), "jobs_failed": result.failed}
    counts["jobs_skipped"] = result.count("SKIPPED")
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in counts.items()])
    print(result.summary(), flush=True)
    try:
        from framework.report import sweep_report

        sweep_report(client, parent, show=True)
    except Exception as error:  # the jobs' results stand; a failed report is reported, not fatal
        log.error("sweep report failed: %s: %s", type(error).__name__, error)
    client.set_terminated(parent, "FAILED" if result.failed else "FINISHED")
    _forget()
    return result


def interrupt(status: str = "KILLED") -> None:
    """Ctrl-C or SIGTERM in the launching process: running children and the parent are closed KILLED."""
    _stop_progress()
    if "run_id" not in _active:
        return
    from mlflow import MlflowClient

    client = MlflowClient(_active["uri"])
    for run in _children(client, _active["run_id"]):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
    client.set_terminated(_active["run_id"], status)
    _forget()


def _forget() -> None:
    for name in (PARENT_ENV, URI_ENV):
        os.environ.pop(name, None)
    _active.clear()
