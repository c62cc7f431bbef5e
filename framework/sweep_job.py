"""One job of a sweep: its parent run, store and number, and its outcome recorded where the launching process reads it.

Below tracking and the sweep: tracking records a job's outcome here, the sweep (``slimlab.sweep``) reads them.
The launching process hands the parent's id and store to every job through ``hydra.job.env_set`` (environment
variables, which cross processes and hosts); the job's own state (whether its outcome is recorded yet) lives in a
``Job`` that ``slimlab run``'s task opens with ``job_scope`` for the duration of the job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slimlab.tracking import TrackingStore

PARENT_ENV = "SLIMLAB_SWEEP_RUN_ID"
URI_ENV = "SLIMLAB_SWEEP_URI"
JOB_TAG = "slimlab.job."  # + job number, on the parent: {"status", "run_id", "reason"}
OUTCOMES_DIR = ".slimlab-outcomes"  # in the sweep directory, when nothing is tracked


@dataclass
class Job:
    """One job of a multirun, as this process runs it."""

    sweep_dir: str
    number: int
    recorded: bool = False  # its outcome is recorded (by tracking, which knows the run id)

    @property
    def parent(self) -> str | None:
        """The sweep's parent run, when the sweep is tracked."""
        return parent_run_id()

    @property
    def uri(self) -> str | None:
        """The sweep's tracking store: its children go there too."""
        return sweep_uri()


_job: ContextVar[Job | None] = ContextVar("slimlab_sweep_job", default=None)  # set by job_scope only


def parent_run_id() -> str | None:
    """The parent run of the sweep this process runs a job of, if any."""
    return os.environ.get(PARENT_ENV) or None


def sweep_uri() -> str | None:
    """The tracking store of the sweep this process runs a job of: its children go there too."""
    return os.environ.get(URI_ENV) or None


def in_sweep() -> bool:
    """Whether the current Hydra job is one job of a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # not inside a Hydra job (tests, notebooks)
        return False


def this_job() -> Job | None:
    """The job being run: the one ``job_scope`` opened, else the current Hydra job's if it is one of a multirun."""
    job = _job.get()
    if job is not None or not in_sweep():
        return job
    from hydra.core.hydra_config import HydraConfig

    config = HydraConfig.get()
    return Job(str(config.sweep.dir), int(config.job.num))


@contextmanager
def job_scope() -> Iterator[Job | None]:
    """The current Hydra job (None outside a multirun) for the duration of the block, then nothing left behind."""
    token = _job.set(None)
    job = this_job()
    _job.set(job)
    try:
        yield job
    finally:
        _job.reset(token)


def record_outcome(
    status: str, run_id: str | None = None, reason: str = "", store: TrackingStore | None = None
) -> None:
    """Tell the sweep how this job ended: a tag on the parent run in ``store`` (the sweep's tracking store), or,
    for an untracked sweep, a file in the sweep directory."""
    job = this_job()
    if job is None:
        return
    first_line = reason.strip().splitlines()[0][:300] if reason.strip() else ""
    outcome = {"status": status, "run_id": run_id or "", "reason": first_line}
    if job.parent is not None and store is not None:
        store.set_tags(job.parent, {f"{JOB_TAG}{job.number}": json.dumps(outcome)})
    else:  # untracked, or the job failed before its store could be made: the sweep reads the files too
        folder = Path(job.sweep_dir) / OUTCOMES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{job.number}.json").write_text(json.dumps(outcome))
    job.recorded = True


def outcome_recorded() -> bool:
    """Whether the job ``job_scope`` opened has its outcome recorded already."""
    job = _job.get()
    return job is not None and job.recorded


def outcomes_of(store: TrackingStore, parent: str) -> dict[int, dict[str, str]]:
    """The outcome each job recorded on the parent run, by job number."""
    tags = store.get_run(parent).tags
    return {int(k[len(JOB_TAG) :]): json.loads(v) for k, v in tags.items() if k.startswith(JOB_TAG)}


def outcome_files(sweep_dir: str | Path) -> dict[int, dict[str, str]]:
    """The outcome each job recorded in the sweep directory (an untracked sweep), by job number."""
    folder = Path(sweep_dir) / OUTCOMES_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return {int(f.stem): json.loads(f.read_text()) for f in files}
