"""A tracking backend in plain files, written as a third-party plugin would be: it needs only slimlab's tracking
contract (``slimlab.tracking.TrackingStore``), no change to slimlab. ``tracking.backend=files``.

Layout of a store (``tracking.uri``, a directory; ``./slimlab-runs`` by default)::

    experiments.json                  {name: experiment id}
    <experiment id>/<run id>/run.json the run: status, params, metrics, tags, parent
    <experiment id>/<run id>/artifacts/
    .lock                             flock'd around every read-modify-write

A sweep's jobs write the same store from several processes: every change holds the lock, and every file is
written whole to a temporary name then ``os.replace``d, so a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from slimlab import hookimpl
from slimlab.errors import ConfigError
from slimlab.tracking import STATUSES, RunRecord

DEFAULT = "slimlab-runs"


class FileStore:
    """Runs as JSON files under the directory ``uri`` (None: ``./slimlab-runs``)."""

    def __init__(self, uri: str | None = None) -> None:
        self.root = Path(uri or DEFAULT).expanduser().absolute()  # absolute: a job may run from another directory
        self.uri = str(self.root)

    def check(self, host: bool, write: bool = True) -> None:
        existing = self.root
        while not existing.exists() and existing != existing.parent:  # the first write creates what is missing
            existing = existing.parent
        if not existing.is_dir():
            problem = f"{existing} is a file, not a directory"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"the directory {existing} is not writable"
        else:
            return
        raise ConfigError(f"tracking.uri={self.uri}: {problem}; valid: a directory slimlab can write (made if missing)")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released on close, even when the process dies
            yield

    def _write(self, path: Path, data: str | bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)

    def _experiments(self) -> dict[str, str]:
        path = self.root / "experiments.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def experiment(
        self, name: str, *, create: bool = True, primary: str | None = None, higher_is_better: bool = True,
        params: Iterable[str] = (),
    ) -> str | None:  # fmt: skip
        known = self._experiments()
        if name in known or not create:  # a reader never creates the store
            return known.get(name)
        with self._locked():
            known = self._experiments()
            if name not in known:  # another process may have created it while we waited for the lock
                known[name] = str(len(known) + 1)
                self._write(self.root / "experiments.json", json.dumps(known, indent=1))
            return known[name]

    def _run_dir(self, run_id: str) -> Path:
        found = list(self.root.glob(f"*/{run_id}/run.json"))
        if not found:
            raise KeyError(f"no run {run_id} in {self.root}")
        return found[0].parent

    def _update(self, run_id: str, **changes: object) -> None:
        with self._locked():
            path = self._run_dir(run_id) / "run.json"
            run = json.loads(path.read_text())
            for key, values in changes.items():
                run[key] = {**run[key], **values} if isinstance(run[key], dict) else values
            self._write(path, json.dumps(run, indent=1))

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        run_id = uuid.uuid4().hex
        run = {"run_id": run_id, "name": name, "status": "RUNNING", "experiment_id": experiment_id,
               "start_time": time.time_ns() // 1_000_000, "created_ns": time.time_ns(), "parent": parent,
               "metrics": {}, "params": {}, "tags": dict(tags)}  # fmt: skip
        with self._locked():
            self._write(self.root / experiment_id / run_id / "run.json", json.dumps(run, indent=1))
        return run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        self._update(run_id, params={k: str(v) for k, v in params.items()})

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        self._update(run_id, metrics={k: float(v) for k, v in metrics.items()})

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._update(run_id, tags={k: str(v) for k, v in tags.items()})

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self._write(self._run_dir(run_id) / "artifacts" / name, text)

    def log_file(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        target = self._run_dir(run_id) / "artifacts" / (folder or "") / Path(path).name
        self._write(target, Path(path).read_bytes())

    def end_run(self, run_id: str, status: str) -> None:
        if status not in STATUSES[1:]:
            raise ValueError(f"end_run status {status!r}: valid: {', '.join(STATUSES[1:])}")
        self._update(run_id, status=status)

    def get_run(self, run_id: str) -> RunRecord:
        return _record(json.loads((self._run_dir(run_id) / "run.json").read_text()))

    def search(
        self, experiment_ids: list[str] | None = None, *, tags: dict[str, str] | None = None,
        status: str | None = None, parent: str | None = None,
    ) -> list[RunRecord]:  # fmt: skip
        if experiment_ids is None:
            experiment_ids = list(self._experiments().values())
        runs = [json.loads(p.read_text()) for e in experiment_ids for p in self.root.glob(f"{e}/*/run.json")]
        wanted = [
            run for run in runs
            if (status is None or run["status"] == status) and (parent is None or run["parent"] == parent)
            and all(run["tags"].get(k) == v for k, v in (tags or {}).items())
        ]  # fmt: skip
        return [_record(run) for run in sorted(wanted, key=lambda run: run["created_ns"], reverse=True)]

    def where(self, experiment_id: str) -> str:
        return f"runs: {self.root / experiment_id} (a folder per run: run.json and artifacts/)"


def _record(run: dict) -> RunRecord:
    return RunRecord(**{k: v for k, v in run.items() if k != "created_ns"})


class FilesBackend:
    """Registers the ``files`` tracking backend."""

    @hookimpl
    def register_tracking(self, register) -> None:
        register("files", FileStore)


plugin = FilesBackend()
