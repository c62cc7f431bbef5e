"""MLflow tracking as a built-in plugin: one MLflow run per slimlab run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimlab import hookimpl

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from slimlab.context import RunContext

BATCH_LIMIT = 100  # MLflow accepts at most 100 params per log_batch call

# The MLflow UI opens a shared view from an experiment tag mlflow.sharedViewState.<key> (what its Share button
# writes): slimlab's shows the metrics of DESIGN.md section 4 and the comparison params as columns.
# `slimlab ui` prints its link.
VIEW_KEY = "slimlab"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_PARAMS = ("model", "data", "techniques")


def comparison_view(primary: str = "accuracy") -> str:
    """The shared view's state, as the MLflow UI stores it (JSON): the columns of ``slimlab report``."""
    from slimlab.report import COLUMNS

    metrics = [primary, f"{primary}_drop", *COLUMNS]
    columns = [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in VIEW_PARAMS]
    # No sort key: the UI nests a sweep's children under their parent only when runs are sorted by time.
    return json.dumps({"selectedColumns": columns})


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    uri = cfg.tracking.get("uri") if cfg is not None else None
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an embedded ``sqlite:///`` store; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """For an embedded sqlite store, keep artifacts beside the database (never ./mlruns)."""
    database = sqlite_path(uri)
    return (database.parent / "mlartifacts").resolve().as_uri() if database else None


def experiment_id(client: Any, name: str, uri: str, primary: str | None = None) -> str:
    """The experiment's id, created if new, its comparison view (for task metric ``primary``) kept current."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=artifact_location(uri))
        tags: dict[str, str] = {}
    else:
        experiment_id, tags = experiment.experiment_id, experiment.tags
    view = comparison_view(primary or "accuracy")
    if VIEW_TAG not in tags or (primary and tags[VIEW_TAG] != view):  # new, or this run's task metric differs
        client.set_experiment_tag(experiment_id, VIEW_TAG, view)
    return experiment_id


def comparison_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table with slimlab's comparison columns (a view the MLflow UI can share)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def comparison_params(ctx: RunContext) -> dict[str, str]:
    """The few params that matter when comparing runs, short and top-level: model, data, chain, key settings."""
    params = {
        "model": str(ctx.cfg.model.get("name", "model")),
        "data": str(ctx.cfg.data.get("name", "data")),
        "techniques": "+".join(step.name for step in ctx.steps) or "none",
    }
    for step in ctx.steps:
        params |= {key: str(value) for key, value in step.key_params().items()}
    return params


class MlflowTracking:
    """Opens the run in ``before_run``; logs and closes it in ``after_run`` or ``on_run_error``."""

    @hookimpl
    def before_run(self, ctx: RunContext) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from slimlab import sweep
        from slimlab.config import flatten

        tags = dict(ctx.tags)
        parent = sweep.parent_run_id() if sweep.in_sweep() else None
        if parent:  # one job of a sweep: a child of the sweep's run, in its store, grouped under it in the UI
            uri = sweep.sweep_uri() or tracking_uri(ctx.cfg)
            tags |= {"mlflow.parentRunId": parent, "slimlab.job": str(sweep.job_number())}
        else:
            uri = tracking_uri(ctx.cfg)
        client = MlflowClient(uri)
        experiment = experiment_id(client, ctx.cfg.experiment_name, uri, ctx.task.primary_metric)
        run = client.create_run(experiment, run_name=ctx.run_name, tags=tags)
        ctx.state["mlflow"] = {"uri": uri, "run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
        flat = flatten(ctx.cfg)
        short = {k: v for k, v in comparison_params(ctx).items() if k not in flat}
        params = [Param(k, v[:6000]) for k, v in {**short, **flat}.items()]
        for start in range(0, len(params), BATCH_LIMIT):
            client.log_batch(run.info.run_id, params=params[start : start + BATCH_LIMIT])

    @hookimpl
    def after_run(self, ctx: RunContext, metrics: dict[str, float]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, RunTag
        from omegaconf import OmegaConf

        state = ctx.state["mlflow"]
        client, run_id = MlflowClient(state["uri"]), state["run_id"]
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(name, float(value), now, 0) for name, value in metrics.items()],
            tags=[RunTag(k, v) for k, v in ctx.tags.items()],  # tags added while running (baseline, threads)
        )
        client.log_text(run_id, OmegaConf.to_yaml(ctx.cfg, resolve=True), "config.yaml")
        client.log_text(run_id, "\n".join(_overrides()) + "\n", "overrides.txt")
        for path in ctx.artifacts.values():  # at the root: runs:/<id>/model is the logged MLflow model
            client.log_artifact(run_id, str(path))
        if ctx.cfg.tracking.log_model:  # after the metrics, which MLflow links to the logged model
            from slimlab.logged_model import log_compressed_model

            log_compressed_model(state["uri"], run_id, ctx)
            model_tags = ("slimlab.model_format", "slimlab.model_uri")
            client.log_batch(run_id, tags=[RunTag(k, ctx.tags[k]) for k in model_tags])
        client.set_terminated(run_id, "FINISHED")
        from slimlab import sweep

        sweep.record_outcome("FINISHED", run_id)

    @hookimpl
    def on_run_error(self, ctx: RunContext, error: BaseException, traceback_text: str) -> None:
        from mlflow import MlflowClient

        state = ctx.state.get("mlflow")
        if state is None:  # failed before the run was opened: nothing recorded, nothing to close
            return
        client = MlflowClient(state["uri"])
        client.log_text(state["run_id"], traceback_text, "traceback.txt")
        client.set_tag(state["run_id"], "slimlab.error", f"{type(error).__name__}: {error}"[:5000])
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        client.set_terminated(state["run_id"], status)
        from slimlab import sweep

        sweep.record_outcome(status, state["run_id"], f"{type(error).__name__}: {error}")


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # composed outside a Hydra job
        return []


plugin = MlflowTracking()
