"""MLflow, the built-in tracking backend (``tracking.backend=mlflow``): slimlab's tracking contract
(``slimlab.tracking.TrackingStore``) on an MLflow tracking store, plus what only MLflow has.

The store is refused in the plan when MLflow cannot use it (``check``: its scheme, a server that does not answer, a
read-only sqlite file); a new sqlite store is created and migrated under a file lock, so runs started together do
not race MLflow's migrations. Beyond the contract: each experiment carries slimlab's comparison view for the MLflow
UI, each run's compressed model is logged as an MLflow model (``tracking.log_model``), and ``where`` prints the UI
link.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimlab import hookimpl
from slimlab.errors import ConfigError
from slimlab.tracking import COLUMNS, RunRecord

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from omegaconf import DictConfig

    from slimlab.context import RunContext

log = logging.getLogger("slimlab")

BATCH_LIMIT = 100  # MLflow accepts at most 100 params per log_batch call

# The MLflow UI opens a shared view from an experiment tag mlflow.sharedViewState.<key> (what its Share button
# writes): slimlab's shows the tradeoff at a glance, scatter charts of the task metric against size and against
# speedup with every run, and the metrics every run records (README) as columns. Every run prints its link.
VIEW_KEY = "slimlab"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_PARAMS = ("model.name", "data.name", "techniques")
TRADEOFF_SECTION = "slimlab-tradeoffs"
# The experiment's kind as MLflow records it: model training, not GenAI. (MLflow 3.17's UI itself follows its
# GenAI / Model training switch, which the comparison link sets: in GenAI mode it files a run that logged no model,
# such as a sweep's parent, under "Evaluations".)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
UI_HOST, UI_PORT = "127.0.0.1", 5000  # where `slimlab ui` listens unless told: the runs' hints link there


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str = "", **kwargs: Any) -> list:
    """Every run that matches, page by page (MLflow returns at most 1000 at a time)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, page_token=token, **kwargs)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def comparison_view(primary: str = "accuracy", higher_is_better: bool = True, params: Iterable[str] = ()) -> str:
    """The shared view's state, as the MLflow UI stores it (JSON).

    Sorted by the task metric, best first: sorted by anything but time, the UI lists a sweep's children flat
    instead of folded under their parent, so the table and the charts show every run. ``SHOW_ALL``: the charts
    plot every run, not the UI's default first ten. Scatter charts of ``primary`` against ``size_bytes`` and
    against ``speedup`` (each run's own baseline timed beside it, the one speed figure comparable across runs);
    the UI's own per-metric charts go to a folded section below them.
    """
    metrics = [primary, f"{primary}_drop", *COLUMNS]
    columns = [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in (*VIEW_PARAMS, *params)]
    charts = [
        {
            "uuid": f"slimlab-{cost}", "type": "SCATTER", "metricSectionId": TRADEOFF_SECTION,
            "displayName": f"{primary} vs {cost}", "runsCountToCompare": 1000, "deleted": False,
            "isGenerated": False, "xaxis": {"key": cost, "type": "METRIC"}, "yaxis": {"key": primary, "type": "METRIC"},
        }
        for cost in ("size_bytes", "speedup")
    ]  # fmt: skip
    sections = [
        {"uuid": TRADEOFF_SECTION, "name": "Tradeoffs", "display": True, "isReordered": False},
        {"uuid": "slimlab-metrics", "name": "Model metrics", "display": False, "isReordered": False},
    ]
    return json.dumps(
        {
            "selectedColumns": list(dict.fromkeys(columns)),
            "orderByKey": f"metrics.`{primary}`",
            "orderByAsc": not higher_is_better,
            "runsHiddenMode": "SHOW_ALL",
            # wide enough for a technique chain and a metric's digits (the UI's default cuts both with "..."); the
            # UI applies a width only to a column in columnOrder
            "columnOrder": ["attributes.`Run Name`", *dict.fromkeys(columns)],
            "columnWidths": {"attributes.`Run Name`": 380} | {f"metrics.`{m}`": 130 for m in metrics},
            "compareRunCharts": charts,
            "compareRunSections": sections,
        }
    )


def view_params(view: str) -> list[str]:
    """The params columns of a comparison view (beyond ``VIEW_PARAMS``)."""
    columns = json.loads(view).get("selectedColumns", [])
    found = [c[len("params.`") : -1] for c in columns if c.startswith("params.`")]
    return [p for p in found if p not in VIEW_PARAMS]


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    uri = cfg.tracking.get("uri") if cfg is not None else None
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an embedded ``sqlite:///`` store; None for any other store."""
    return Path(uri[len("sqlite:///") :].split("?", 1)[0]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """For an embedded sqlite store, keep artifacts beside the database (never ./mlruns)."""
    database = sqlite_path(uri)
    return (database.parent / "mlartifacts").resolve().as_uri() if database else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on an embedded sqlite store (``<db>.lock`` beside it) across processes.

    MLflow creates and migrates a fresh sqlite store in whichever process opens it first, without a lock: two
    processes opening it at once both migrate and one dies (``duplicate column name: step``). Other stores
    (a server, PostgreSQL) do their own migrations: no lock.
    """
    database = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: nothing to lock with
        fcntl = None
    if database is None or fcntl is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, even if the process dies
        yield


def open_store(uri: str) -> MlflowClient:
    """A client on ``uri``, the store created and migrated under ``store_lock`` if it is new.

    MLflow opens (and creates, and migrates) a store once per process and URI and reuses it: later
    ``MlflowClient(uri)`` calls in this process do not touch the schema again. A read-only sqlite store is
    refused (``ConfigError``) before anything is written.
    """
    from mlflow import MlflowClient

    refuse_read_only(uri)
    with store_lock(uri), read_only_as_config_error(uri):
        return MlflowClient(uri)


def experiment_id(
    client: Any,
    name: str,
    uri: str,
    primary: str | None = None,
    higher_is_better: bool = True,
    params: Iterable[str] = (),
) -> str:
    """The experiment's id, created if new, its comparison view (for task metric ``primary``) kept current.

    Created under ``store_lock``; against a server, a process that loses the race to create it reads the
    winner's (MLflow answers ``RESOURCE_ALREADY_EXISTS``). A deleted experiment is refused (``ConfigError``).
    The view keeps the params columns earlier runs added (``params``: this run's key params).
    """  # fmt: skip
    from mlflow.exceptions import MlflowException

    with store_lock(uri), read_only_as_config_error(uri):
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                client.create_experiment(name, artifact_location=artifact_location(uri), tags={KIND_TAG: KIND})
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:  # deleted again in between: say so rather than log to nowhere
                raise RuntimeError(f"the MLflow experiment {name!r} vanished while it was being created")
        experiment_id, tags = experiment.experiment_id, experiment.tags
        if experiment.lifecycle_stage == "deleted":  # MLflow would refuse each run in it with a traceback
            raise ConfigError(
                f"experiment_name={name}: the MLflow experiment {name!r} (id {experiment_id}) in {uri} is deleted; "
                f"restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {experiment_id}) "
                "or choose another experiment_name"
            )
        if KIND_TAG not in tags:  # an experiment made before slimlab set it, or by hand
            client.set_experiment_tag(experiment_id, KIND_TAG, KIND)
        current = tags.get(VIEW_TAG)
        if current is None or primary:  # new, or a run that may bring another task metric or other params
            try:
                kept = view_params(current) if current else []
            except (ValueError, AttributeError):  # a view written by hand or by an older slimlab
                kept = []
            view = comparison_view(primary or "accuracy", higher_is_better, [*kept, *params])
            if view != current:
                client.set_experiment_tag(experiment_id, VIEW_TAG, view)
    return experiment_id


# --- a store that cannot be used: refused in the plan (check_config), one line, exit 2 ---

FILE_STORE_SCHEMES = ("", "file")
DATABASE_SCHEMES = ("postgresql", "mysql", "sqlite", "mssql")  # SQLAlchemy stores: <database>[+<driver>]://
KNOWN_SCHEMES = (*DATABASE_SCHEMES, "http", "https", "databricks", "databricks-uc", "uc", "file")  # MLflow's own
HEALTH_TIMEOUT = 5.0  # seconds a tracking server gets to answer /health (an answer takes milliseconds)


def store_schemes() -> list[str]:
    """The URI schemes MLflow has a tracking store for (its registry: built-ins and installed plugins)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return sorted(scheme for scheme in _tracking_store_registry._registry if scheme)
    except Exception:  # the registry is private: MLflow's built-in schemes
        return list(KNOWN_SCHEMES)


def uri_scheme(uri: str) -> str:
    """The store scheme of ``uri`` as MLflow reads it (``mlflow.utils.uri.get_uri_scheme``), without importing MLflow:
    a database's driver (``postgresql+psycopg2``) is dropped, a Windows drive letter is a local path."""
    if uri in ("databricks", "databricks-uc", "uc"):
        return uri
    scheme = urllib.parse.urlparse(uri).scheme
    database = scheme.partition("+")[0]
    if database in DATABASE_SCHEMES and scheme.count("+") <= 1:
        return database
    if len(scheme) == 1 and scheme.isalpha():
        return ""
    return scheme


def uri_source(cfg: DictConfig | None = None) -> str:
    """Where the tracking URI comes from, for messages: ``tracking.uri``, ``$MLFLOW_TRACKING_URI`` or the default."""
    if cfg is not None and cfg.tracking.get("uri"):
        return "tracking.uri"
    return "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default store"


def check_store(uri: str, host: bool = True, key: str = "tracking.uri", write: bool = True) -> None:
    """Refuse a tracking URI MLflow cannot use, a server that does not answer, a read-only sqlite store (unless
    ``write=False``: it is only read).

    ``key`` names where ``uri`` was set. ``host=False`` (the runs happen on other machines) skips the server
    check: only they can tell.
    """
    scheme = uri_scheme(uri)
    example = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    # MLflow's own stores are known without importing it (a second and a half, which a refused config does
    # without); a plugin's scheme is looked up in MLflow's registry.
    if scheme not in KNOWN_SCHEMES and scheme not in FILE_STORE_SCHEMES:
        schemes = [s for s in store_schemes() if s not in FILE_STORE_SCHEMES]
        if scheme not in schemes:
            shown = ", ".join(s if s.startswith("databricks") or s == "uc" else f"{s}://" for s in schemes)
            what = f"{scheme}://" if scheme else "it"
            raise ConfigError(f"{key}={uri}: MLflow has no tracking store for {what}; valid: {shown} (e.g. {example})")
    if scheme in FILE_STORE_SCHEMES and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise ConfigError(
            f"{key}={uri} is a file store, which MLflow refuses unless MLFLOW_ALLOW_FILE_STORE=true; "
            f"use a database, e.g. {example}"
        )
    if scheme == "sqlite" and uri.split("?", 1)[0].removeprefix("sqlite://").lstrip("/") in ("", ":memory:"):
        raise ConfigError(f"{key}={uri} is an in-memory sqlite store: the runs would vanish; e.g. {example}")
    if scheme in ("http", "https") and host:
        check_server(uri, key=key)
    if write:
        refuse_read_only(uri)


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT, key: str = "tracking.uri") -> None:
    """A tracking server must answer ``GET /health`` within ``timeout`` seconds (MLflow would retry for minutes)."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):  # an auth layer in front of a live server: MLflow reports what it needs
            return
        # 404: not an MLflow server; 5xx: a proxy whose server is down. MLflow would retry for minutes.
        raise ConfigError(
            f"tracking server {uri} ({key}) answers /health with HTTP {error.code} {error.reason}: not a running "
            "MLflow server; start it (slimlab server ...) or set tracking.uri to a reachable store"
        ) from None
    except (OSError, ValueError, http.client.HTTPException) as error:  # refused, unknown host, timed out, bad URL
        reason = getattr(error, "reason", None) or error
        raise ConfigError(
            f"tracking server {uri} ({key}) does not answer ({reason}) at /health within {timeout:g} s; "
            "start it (slimlab server ...) or set tracking.uri to a reachable store"
        ) from None


def read_only_reason(uri: str) -> str | None:
    """Why an embedded sqlite store cannot be written (its file, or the directory that holds or will hold it)."""
    database = sqlite_path(uri)
    if database is None:
        return None
    database = database.expanduser().absolute()
    if database.exists():
        if not os.access(database, os.W_OK):
            return "the file is not writable"
        if not os.access(database.parent, os.W_OK | os.X_OK):  # sqlite writes its journal beside it
            return f"its directory {database.parent} is not writable"
        return None
    folder = database.parent
    while not folder.exists() and folder != folder.parent:  # MLflow creates the missing directories
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the directory {folder} is not writable, so the store cannot be created"
    return None


def read_only_error(uri: str, reason: str) -> ConfigError:
    path = sqlite_path(uri)
    return ConfigError(
        f"the tracking store {path} is read-only: {reason}; make it writable or set tracking.uri to a writable store"
    )


def refuse_read_only(uri: str) -> None:
    reason = read_only_reason(uri)
    if reason:
        raise read_only_error(uri, reason)


def is_read_only(error: BaseException) -> bool:
    """Whether sqlite refused a write because its database is read-only (wrapped by SQLAlchemy and MLflow)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if "readonly database" in str(current) or "read-only database" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def read_only_as_config_error(uri: str) -> Iterator[None]:
    """sqlite's ``attempt to write a readonly database`` (under SQLAlchemy's autoflush message) as one line."""
    try:
        yield
    except Exception as error:
        if sqlite_path(uri) is None or not is_read_only(error):
            raise
        raise read_only_error(uri, read_only_reason(uri) or "sqlite refused to write to it") from None


def comparison_url(base_url: str, experiment_id: str, mode: str = "CHART") -> str:
    """The experiment in slimlab's comparison view (a view the MLflow UI can share): the tradeoff charts beside
    the runs (``mode="CHART"``), or the runs table with the comparison columns (``"TABLE"``)."""
    base = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    # workflowType: the UI's model-training pages, not the GenAI ones (traces, judges, evaluation runs) it opens
    # by default
    return f"{base}?viewStateShareKey={VIEW_KEY}&compareRunsMode={mode}&workflowType=machine_learning"


def server_url(uri: str) -> str:
    """The address a browser opens for an ``http(s)://`` tracking URI: without credentials, query or trailing /."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def ui_hint(uri: str, experiment_id: str) -> str:
    """The line that ends a run or a sweep: where to see its experiment in the MLflow UI.

    A tracking server is the UI: its experiment's comparison link. A local sqlite store: ``slimlab ui`` (with
    ``--uri`` unless it is the default store) and the link that UI will serve. Another store (a database behind a
    server): the experiment's page on whatever server is in front of it.
    """
    from slimlab.summary import shown_uri

    if uri_scheme(uri) in ("http", "https"):
        return f"See it in the MLflow UI: {comparison_url(server_url(uri), experiment_id)}"
    if sqlite_path(uri) is not None:
        command = "slimlab ui" if uri == tracking_uri() else f"slimlab ui --uri {shlex.quote(uri)}"
        link = comparison_url(f"http://{UI_HOST}:{UI_PORT}", experiment_id)
        return f"See it in the MLflow UI: {command}, then open {link}"
    return f"See it in the MLflow UI of the tracking server in front of {shown_uri(uri)}: " + comparison_url(
        "<server>", experiment_id
    )


def _record(run: Any) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        name=info.run_name or info.run_id,
        status=info.status,
        experiment_id=info.experiment_id,
        start_time=info.start_time or 0,
        parent=data.tags.get(PARENT_TAG),
        metrics=dict(data.metrics),
        params=dict(data.params),
        tags=dict(data.tags),
    )


PARENT_TAG = "mlflow.parentRunId"  # how the MLflow UI nests a sweep's jobs under its parent


def _quoted(value: str) -> str:
    # MLflow's search grammar has no escape for a quote; what slimlab searches by (run ids, run keys, host names)
    # holds none
    return value.replace("'", "")


class MlflowStore:
    """slimlab's tracking contract on an MLflow tracking store (``uri``: None for ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlflow.db``)."""

    def __init__(self, uri: str | None = None) -> None:
        self.source = "tracking.uri" if uri else uri_source()
        self.uri = uri or tracking_uri()
        self._client: MlflowClient | None = None
        self._reader: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        """Opened (created and migrated under ``store_lock`` if new) on first use."""
        if self._client is None:
            self._client = open_store(self.uri)
        return self._client

    @property
    def reader(self) -> MlflowClient:
        """A client that only reads: a store this process cannot write (an archived mlflow.db) still reads."""
        if self._client is not None:
            return self._client
        if self._reader is None:
            from mlflow import MlflowClient

            self._reader = MlflowClient(self.uri)
        return self._reader

    def check(self, host: bool, write: bool = True) -> None:
        check_store(self.uri, host, self.source, write=write)

    def _absent(self) -> bool:
        """An embedded sqlite store not created yet (MLflow would create it just to look)."""
        database = sqlite_path(self.uri)
        return self._client is None and database is not None and not database.exists()

    def experiment(
        self, name: str, *, create: bool = True, primary: str | None = None, higher_is_better: bool = True,
        params: Iterable[str] = (),
    ) -> str | None:  # fmt: skip
        if not create:
            if self._absent():  # a reader never creates the store
                return None
            found = self.reader.get_experiment_by_name(name)
            return found.experiment_id if found is not None and found.lifecycle_stage != "deleted" else None
        return experiment_id(self.client, name, self.uri, primary, higher_is_better, params)

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        tags = {**tags, PARENT_TAG: parent} if parent else tags
        with read_only_as_config_error(self.uri):
            return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def _log_batch(self, run_id: str, kind: str, entries: list, size: int) -> None:
        """``entries`` in batches of at most ``size`` (MLflow's limit per call for ``kind``)."""
        for start in range(0, len(entries), size):
            self.client.log_batch(run_id, **{kind: entries[start : start + size]})

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self._log_batch(run_id, "params", [Param(k, v[:6000]) for k, v in params.items()], BATCH_LIMIT)

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(name, float(value), now, 0) for name, value in metrics.items()]
        self._log_batch(run_id, "metrics", entries, BATCH_LIMIT * 10)  # MLflow takes 1000 metrics per call

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._log_batch(run_id, "tags", [RunTag(k, v) for k, v in tags.items()], BATCH_LIMIT)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_file(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=folder)

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def get_run(self, run_id: str) -> RunRecord:
        return _record(self.reader.get_run(run_id))

    def search(
        self, experiment_ids: list[str] | None = None, *, tags: dict[str, str] | None = None,
        status: str | None = None, parent: str | None = None,
    ) -> list[RunRecord]:  # fmt: skip
        if self._absent():  # nothing recorded yet: nothing found, no empty store made
            return []
        if experiment_ids is None:
            experiment_ids = [e.experiment_id for e in self.reader.search_experiments()]
        if not experiment_ids:
            return []
        wanted = {**(tags or {}), **({PARENT_TAG: parent} if parent else {})}
        clauses = [f"tags.`{key}` = '{_quoted(value)}'" for key, value in wanted.items()]
        if status:
            clauses.append(f"attributes.status = '{status}'")
        runs = search_all(self.reader, experiment_ids, " and ".join(clauses), order_by=["attributes.start_time DESC"])
        return [_record(run) for run in runs]

    def where(self, experiment_id: str) -> str:
        return ui_hint(self.uri, experiment_id)

    def log_model(self, run_id: str, ctx: RunContext) -> None:
        """The compressed model as an MLflow model (``runs:/<id>/model``), linked to the run's metrics."""
        from slimlab.logged_model import log_compressed_model

        log_compressed_model(self.uri, run_id, ctx)
        self.set_tags(run_id, {k: ctx.tags[k] for k in ("slimlab.model_format", "slimlab.model_uri")})


class MlflowBackend:
    """Registers the ``mlflow`` tracking backend."""

    @hookimpl
    def register_tracking(self, register) -> None:
        register("mlflow", MlflowStore)


plugin = MlflowBackend()
