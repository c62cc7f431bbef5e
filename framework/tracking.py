"""MLflow tracking as a built-in plugin: one MLflow run per slimlab run."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from framework import hookimpl

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from framework.context import RunContext

BATCH_LIMIT = 100  # MLflow accepts at most 100 params per log_batch call


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    uri = cfg.tracking.get("uri") if cfg is not None else None
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """For an embedded sqlite store, keep artifacts beside the database (never ./mlruns)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


class MlflowTracking:
    """Opens the run in ``before_run``; logs and closes it in ``after_run`` or ``on_run_error``."""

    @hookimpl
    def before_run(self, ctx: RunContext) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from framework import sweep
        from framework.config import flatten

        tags = dict(ctx.tags)
        parent = sweep.parent_run_id() if sweep.in_sweep() else None
        if parent:  # one job of a sweep: a child of the sweep's run, in its store, grouped under it in the UI
            uri = sweep.sweep_uri() or tracking_uri(ctx.cfg)
            tags |= {"mlflow.parentRunId": parent, "slimlab.job": str(sweep.job_number())}
        else:
            uri = tracking_uri(ctx.cfg)
        client = MlflowClient(uri)
        run = client.create_run(experiment_id(client, ctx.cfg.experiment_name, uri), run_name=ctx.run_name, tags=tags)
        ctx.state["mlflow"] = {"uri": uri, "run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
        params = [Param(k, v[:6000]) for k, v in flatten(ctx.cfg).items()]
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
        for name, path in ctx.artifacts.items():
            client.log_artifact(run_id, str(path), artifact_path=name if name == "model" else None)
        client.set_terminated(run_id, "FINISHED")
        from framework import sweep

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
        from framework import sweep

        sweep.record_outcome(status, state["run_id"], f"{type(error).__name__}: {error}")


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # composed outside a Hydra job
        return []


plugin = MlflowTracking()
