"""The report of a sweep or an experiment: a table, Pareto fronts (quality vs size and vs latency), CSV, markdown.

``slimlab report [--experiment NAME] [--sweep PARENT_RUN_ID]`` prints the table and writes
``report.csv``, ``report.md`` and ``pareto.png``; for a sweep it also logs them to the parent run
(artifacts ``report/``), which a sweep does by itself when it ends.

Quality is the runs' primary metric (``accuracy``, ``cosine_to_baseline``, ``mse``...); a run is on the
front when no other run is at least as good on quality (smaller ``<primary>_drop``) and on cost (smaller
``size_bytes``, or ``latency_ms``) and better on one of them.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("slimlab")
COLUMNS = ("compression_ratio", "size_bytes", "speedup", "latency_ms", "sparsity")


@dataclass
class Row:
    """One finished run, as the report shows it."""

    run_id: str
    name: str
    chain: str
    metrics: dict[str, float]
    primary: str

    @property
    def drop(self) -> float:
        return self.metrics.get(f"{self.primary}_drop", float("nan"))


def primary_metric(metrics: dict[str, float]) -> str | None:
    """``accuracy`` when the run logged ``baseline_accuracy`` and ``accuracy_drop``, etc."""
    for name in metrics:
        if name.startswith("baseline_") and f"{name[len('baseline_') :]}_drop" in metrics:
            return name[len("baseline_") :]
    return None


def rows_of(runs: Sequence) -> list[Row]:
    """Report rows of MLflow runs that finished with slimlab's metrics (others, like parents, are left out).

    Runs of different tasks (accuracy, cosine, mse) cannot share a table or a front: the largest group is
    kept and the others are named in a warning.
    """
    rows = []
    for run in runs:
        metrics = dict(run.data.metrics)
        primary = primary_metric(metrics)
        if run.info.status != "FINISHED" or primary is None or "size_bytes" not in metrics:
            continue
        name = run.info.run_name or run.info.run_id
        chain = name.split(" ", 1)[1] if " " in name else name  # "lenet prune(0.9)+quantize(int8-wo)" -> the chain
        rows.append(Row(run.info.run_id, name, chain, metrics, primary))
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.primary, []).append(row)
    if len(groups) > 1:
        kept = max(groups, key=lambda primary: len(groups[primary]))
        others = ", ".join(f"{len(g)} by {p}" for p, g in groups.items() if p != kept)
        log.warning("report: %d runs measured by %s; left out, measured otherwise: %s", len(groups[kept]), kept, others)
        return groups[kept]
    return rows


def pareto_front(rows: Sequence[Row], cost: str) -> list[Row]:
    """The rows no other row dominates on (quality drop, ``cost``), cheapest first."""

    def key(row: Row) -> tuple[float, float]:
        return row.drop, row.metrics.get(cost, float("inf"))

    front = [
        row
        for row in rows
        if not any(
            key(other) != key(row) and key(other)[0] <= key(row)[0] and key(other)[1] <= key(row)[1] for other in rows
        )
    ]
    return sorted(front, key=lambda row: key(row)[1])


def sweep_runs(client: MlflowClient, parent: str) -> list:
    """The children of a sweep's parent run, plus the earlier runs its resumed jobs were skipped for."""
    from slimlab.sweep import children, outcomes_of

    runs = children(client, parent)
    seen = {run.info.run_id for run in runs}
    for outcome in outcomes_of(client, parent).values():
        if outcome["status"] == "SKIPPED" and outcome.get("run_id") and outcome["run_id"] not in seen:
            runs.append(client.get_run(outcome["run_id"]))
            seen.add(outcome["run_id"])
    return runs


def latest_sweep(client: MlflowClient) -> str:
    """The most recently started sweep parent run in the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, filter_string="tags.`slimlab.sweep` = 'parent'", order_by=["attributes.start_time DESC"]
    )
    if not runs:
        raise ValueError("no sweep in this store; run one with `slimlab run -m ...` or pass --experiment NAME")
    return runs[0].info.run_id


def experiment_runs(client: MlflowClient, experiment: str) -> list:
    from slimlab.sweep import search_all

    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r}")
    return search_all(client, [found.experiment_id], "attributes.status = 'FINISHED'")


def front_ids(rows: Sequence[Row]) -> tuple[set[str], set[str]]:
    """Run ids on the quality-vs-size front and on the quality-vs-latency front."""
    return ({r.run_id for r in pareto_front(rows, "size_bytes")}, {r.run_id for r in pareto_front(rows, "latency_ms")})


def write_csv(rows: Sequence[Row], path: Path) -> None:
    primary = rows[0].primary if rows else "accuracy"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run_id", "run_name", primary, f"{primary}_drop", *COLUMNS, "pareto_size", "pareto_latency"])
        on_size, on_latency = front_ids(rows)
        for row in rows:
            writer.writerow(
                [row.run_id, row.name, row.metrics.get(primary), row.drop, *(row.metrics.get(c) for c in COLUMNS)]
                + [row.run_id in on_size, row.run_id in on_latency]
            )


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def table_rows(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    primary = rows[0].primary if rows else "accuracy"
    on_size, on_latency = front_ids(rows)
    header = ["run", primary, "drop", "compression", "size_bytes", "speedup", "latency_ms", "front"]
    body = []
    for row in sorted(rows, key=lambda r: (r.drop, r.metrics.get("size_bytes", 0))):
        front = "/".join(name for name, ids in (("size", on_size), ("latency", on_latency)) if row.run_id in ids)
        metrics = row.metrics
        body.append(
            [
                row.name,
                _fmt(metrics.get(primary)),
                f"{row.drop:+.4f}",
                f"{metrics.get('compression_ratio', float('nan')):.2f}x",
                _fmt(metrics.get("size_bytes")),
                f"{metrics.get('speedup', float('nan')):.2f}x",
                _fmt(metrics.get("latency_ms")),
                front,
            ]
        )
    return header, body


def write_markdown(rows: Sequence[Row], path: Path, title: str) -> None:
    header, body = table_rows(rows)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += ["", "front: on the Pareto front of quality vs size, or vs latency.", "", "![Pareto fronts](pareto.png)"]
    path.write_text("\n".join(lines) + "\n")


def show_table(rows: Sequence[Row], title: str) -> None:
    from rich.table import Table

    header, body = table_rows(rows)
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column in ("run", "front") else "right")
    for cells in body:
        table.add_row(*cells)
    from slimlab.summary import wide_console

    wide_console().print(table)


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Quality against size and against latency: every run, the front highlighted, the baseline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = rows[0].primary
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for axis, cost, baseline_cost, label in (
        (axes[0], "size_bytes", "baseline_size_bytes", "model file size (bytes"),
        (axes[1], "latency_ms", "baseline_latency_ms", "batch latency (ms"),
    ):
        points = [r for r in rows if cost in r.metrics and primary in r.metrics]
        axis.scatter([r.metrics[cost] for r in points], [r.metrics[primary] for r in points], color="0.6", zorder=2)
        front = pareto_front(points, cost)
        axis.plot(
            [r.metrics[cost] for r in front],
            [r.metrics[primary] for r in front],
            "o-",
            color="tab:red",
            label="Pareto front",
            zorder=3,
        )
        for row in points:
            axis.annotate(
                row.chain, (row.metrics[cost], row.metrics[primary]), xytext=(4, 4), textcoords="offset points",
                fontsize=7, alpha=0.8,
            )  # fmt: skip
        baselines = [r for r in points if baseline_cost in r.metrics]
        if baselines:
            base = baselines[0].metrics
            axis.scatter(
                [base[baseline_cost]], [base[f"baseline_{primary}"]], marker="*", s=220, color="tab:blue", zorder=4
            )
            axis.annotate(
                "baseline", (base[baseline_cost], base[f"baseline_{primary}"]), xytext=(4, -10),
                textcoords="offset points", fontsize=8, color="tab:blue",
            )  # fmt: skip
        costs = [r.metrics[cost] for r in points] + ([base[baseline_cost]] if baselines else [])
        if costs and min(costs) > 0 and max(costs) / min(costs) > 10:  # sizes from 20 KB to 90 MB: log scale
            axis.set_xscale("log")
            label += ", log"
        axis.set_xlabel(label + ")")
        axis.set_ylabel(primary)
        axis.grid(True, alpha=0.3)
        axis.legend(loc="best")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(rows: Sequence[Row], out: Path, title: str) -> list[Path]:
    """report.csv, report.md and pareto.png in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.csv", out / "report.md", out / "pareto.png"]
    write_csv(rows, paths[0])
    write_markdown(rows, paths[1], title)
    plot(rows, paths[2], title)
    return paths


def sweep_report(client: MlflowClient, parent: str, *, out: Path | None = None, show: bool = False) -> int:
    """The report of a sweep, logged to its parent run (artifacts ``report/``); returns the number of rows."""
    rows = rows_of(sweep_runs(client, parent))
    if not rows:
        return 0
    title = f"sweep {parent[:8]}: {len(rows)} finished runs"
    if show:
        show_table(rows, title)
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_report(rows, out or Path(tmp), title):
            client.log_artifact(parent, str(path), artifact_path="report")
    return len(rows)


def open_store(uri: str) -> MlflowClient:
    """A client on an existing store: a report reads runs, it never creates an empty ``mlflow.db``.

    Raises ValueError naming the path when an embedded sqlite store does not exist.
    """
    from mlflow import MlflowClient

    from slimlab.tracking import sqlite_path

    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise ValueError(f"no tracking store at {database}; run something first (slimlab run) or pass --uri")
    return MlflowClient(uri)
