"""The report of a sweep or an experiment: a table, Pareto fronts (quality vs size and vs speedup), CSV, markdown.

``slimlab report [--experiment NAME] [--sweep PARENT_RUN_ID]`` prints the table and writes ``report.csv``,
``report.md``, ``report.html`` and ``pareto.png``; for a sweep it also logs them to the parent run (artifacts
``report/``), which a sweep does by itself when it ends.

Quality is the runs' primary metric (``accuracy``, ``cosine_to_baseline``, ``mse``...); a run is on a front
when no other run is at least as good on quality (smaller ``<primary>_drop``) and on cost (smaller
``size_bytes``, or larger ``speedup``) and better on one of them. Speed is compared by ``speedup`` alone: each
run's latency against its own baseline, timed side by side in one process. A run's ``latency_ms`` was timed in
its own process at another moment than the others': across runs it ranks the machine's load, not the models.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

# The figures runs are compared by (the report's columns and the MLflow comparison view's): no latency_ms.
from slimlab.tracking import COLUMNS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from slimlab.tracking import RunRecord, TrackingStore

log = logging.getLogger("slimlab")
# In report.csv only: each run's own pair of timings, which its speedup is the ratio of.
TIMINGS = ("latency_ms", "baseline_latency_ms")
HIGHER_IS_BETTER = frozenset({"speedup"})  # the front's other cost, size_bytes, is lower-better
SPEEDUP_NOTE = (
    "speedup: against the run's own baseline, timed side by side in one process. Each run's latency_ms was "
    "timed in its own process at another moment: it is in report.csv, and runs are not compared by it."
)
FRONT_NOTE = "front: on the Pareto front of quality vs size, or of quality vs speedup."
IMAGE_NOTE = (
    "In the MLflow UI open report.html: the same report with its plot inline (MLflow's markdown preview shows "
    "no images, and the plot is pareto.png beside this file)."
)


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


def rows_of(runs: Sequence[RunRecord]) -> list[Row]:
    """Report rows of runs that finished with slimlab's metrics (others, like parents, are left out).

    Runs of different tasks (accuracy, cosine, mse) cannot share a table or a front: the largest group is
    kept and the others are named in a warning.
    """
    rows = []
    for run in runs:
        metrics = dict(run.metrics)
        primary = primary_metric(metrics)
        if run.status != "FINISHED" or primary is None or "size_bytes" not in metrics:
            continue
        name = run.name or run.run_id
        chain = name.split(" ", 1)[1] if " " in name else name  # "lenet prune(0.9)+quantize(int8-wo)" -> the chain
        rows.append(Row(run.run_id, name, chain, metrics, primary))
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
    """The rows with ``cost`` that no other row dominates on (quality drop, ``cost``), by increasing ``cost``.

    ``cost`` is lower-better (``size_bytes``) unless it is in ``HIGHER_IS_BETTER`` (``speedup``).
    """
    sign = -1 if cost in HIGHER_IS_BETTER else 1
    measured = [row for row in rows if cost in row.metrics]

    def key(row: Row) -> tuple[float, float]:
        return row.drop, sign * row.metrics[cost]

    front = [
        row
        for row in measured
        if not any(
            key(other) != key(row) and key(other)[0] <= key(row)[0] and key(other)[1] <= key(row)[1]
            for other in measured
        )
    ]
    return sorted(front, key=lambda row: row.metrics[cost])


def sweep_runs(store: TrackingStore, parent: str) -> list[RunRecord]:
    """The children of a sweep's parent run, plus the earlier runs its resumed jobs were skipped for."""
    from slimlab.sweep_job import outcomes_of
    from slimlab.tracking import children

    runs = children(store, parent)
    seen = {run.run_id for run in runs}
    for outcome in outcomes_of(store, parent).values():
        if outcome["status"] == "SKIPPED" and outcome.get("run_id") and outcome["run_id"] not in seen:
            runs.append(store.get_run(outcome["run_id"]))
            seen.add(outcome["run_id"])
    return runs


def latest_sweep(store: TrackingStore) -> str:
    """The most recently started sweep parent run in the store."""
    runs = store.search(None, tags={"slimlab.sweep": "parent"})
    if not runs:
        raise ValueError("no sweep in this store; run one with `slimlab run -m ...` or pass --experiment NAME")
    return runs[0].run_id


def experiment_runs(store: TrackingStore, experiment: str) -> list[RunRecord]:
    found = store.experiment(experiment, create=False)
    if found is None:
        from slimlab.summary import shown_uri

        raise ValueError(f"no experiment named {experiment!r} in {shown_uri(store.uri)}")
    return store.search([found], status="FINISHED")


def front_ids(rows: Sequence[Row]) -> tuple[set[str], set[str]]:
    """Run ids on the quality-vs-size front and on the quality-vs-speedup front."""
    return ({r.run_id for r in pareto_front(rows, "size_bytes")}, {r.run_id for r in pareto_front(rows, "speedup")})


def write_csv(rows: Sequence[Row], path: Path) -> None:
    primary = rows[0].primary if rows else "accuracy"
    figures = (*COLUMNS, *TIMINGS)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run_id", "run_name", primary, f"{primary}_drop", *figures, "pareto_size", "pareto_speedup"])
        on_size, on_speedup = front_ids(rows)
        for row in rows:
            writer.writerow(
                [row.run_id, row.name, row.metrics.get(primary), row.drop, *(row.metrics.get(c) for c in figures)]
                + [row.run_id in on_size, row.run_id in on_speedup]
            )


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def table_rows(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    primary = rows[0].primary if rows else "accuracy"
    on_size, on_speedup = front_ids(rows)
    header = ["run", primary, "drop", "compression", "size_bytes", "speedup", "sparsity", "front"]
    body = []
    for row in sorted(rows, key=lambda r: (r.drop, r.metrics.get("size_bytes", 0))):
        front = "/".join(name for name, ids in (("size", on_size), ("speedup", on_speedup)) if row.run_id in ids)
        metrics = row.metrics
        body.append(
            [
                row.name,
                _fmt(metrics.get(primary)),
                f"{row.drop:+.4f}",
                f"{metrics.get('compression_ratio', float('nan')):.2f}x",
                _fmt(metrics.get("size_bytes")),
                f"{metrics.get('speedup', float('nan')):.2f}x",
                f"{metrics.get('sparsity', float('nan')):.1%}",
                front,
            ]
        )
    return header, body


def write_markdown(rows: Sequence[Row], path: Path, title: str) -> None:
    """The table and notes; the plot as ``pareto.png`` beside it (``report.html`` embeds it, for MLflow's UI)."""
    header, body = table_rows(rows)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += ["", FRONT_NOTE, "", SPEEDUP_NOTE, "", IMAGE_NOTE, "", "![Pareto fronts](pareto.png)"]
    path.write_text("\n".join(lines) + "\n")


def write_html(rows: Sequence[Row], path: Path, title: str, png: Path) -> None:
    """The report as one self-contained page, the plot inline: MLflow's UI previews HTML artifacts in a frame,
    where a relative ``pareto.png`` would not load; its markdown preview shows no images at all."""
    import base64
    from html import escape

    header, body = table_rows(rows)

    def cells(tag: str, values: list[str]) -> str:
        return "".join(
            f"<{tag}{'' if column in ('run', 'front') else ' class=num'}>{escape(value, quote=False)}</{tag}>"
            for column, value in zip(header, values, strict=True)
        )

    image = base64.b64encode(png.read_bytes()).decode("ascii")
    page = [
        "<!doctype html>",
        f'<html><head><meta charset="utf-8"><title>{escape(title, quote=False)}</title>',
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:2px 8px}.num{text-align:right}img{max-width:100%}</style>",
        f"</head><body><h1>{escape(title, quote=False)}</h1>",
        f"<table><thead><tr>{cells('th', header)}</tr></thead><tbody>",
        *(f"<tr>{cells('td', values)}</tr>" for values in body),
        "</tbody></table>",
        f"<p>{escape(FRONT_NOTE, quote=False)}</p><p>{escape(SPEEDUP_NOTE, quote=False)}</p>",
        f'<img alt="Pareto fronts" src="data:image/png;base64,{image}">',
        "</body></html>",
    ]
    path.write_text("\n".join(page) + "\n")


def show_table(rows: Sequence[Row], title: str) -> None:
    from rich.table import Table

    header, body = table_rows(rows)
    table = Table(title=title, caption=f"{FRONT_NOTE}\n{SPEEDUP_NOTE}")
    for column in header:
        table.add_column(column, justify="left" if column in ("run", "front") else "right")
    for cells in body:
        table.add_row(*cells)
    from slimlab.summary import wide_console

    wide_console().print(table)


SIZE_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"))
LABEL_GAP_PX = 4  # the least room between two tick labels


def readable_bytes(value: float, _position: object = None) -> str:
    """``1724000`` -> ``1.72 MB``: a size axis in bytes reads as seven-digit numbers."""
    for scale, unit in SIZE_UNITS:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def figure_of(rows: Sequence[Row], title: str) -> Figure:
    """Quality against size and against speedup: every run, the fronts highlighted, the baseline marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    primary = rows[0].primary
    figure = Figure(figsize=(13, 5.5), dpi=110)  # no pyplot: no global figure state, no backend switch
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    panels = (
        (axes[0], "size_bytes", "model file size"),
        (axes[1], "speedup", "speedup over the run's own baseline, timed side by side in one process"),
    )
    for axis, cost, label in panels:
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
        costs = [r.metrics[cost] for r in points]
        baselines = [r.metrics for r in points if f"baseline_{primary}" in r.metrics]
        # The baseline's speedup over itself is 1 by definition; its size is each run's baseline_size_bytes.
        base_cost = None
        if baselines:
            base_cost = 1.0 if cost == "speedup" else baselines[0].get("baseline_size_bytes")
        if base_cost is not None:
            base_quality = baselines[0][f"baseline_{primary}"]
            axis.scatter([base_cost], [base_quality], marker="*", s=220, color="tab:blue", zorder=4)
            axis.annotate(
                "baseline", (base_cost, base_quality), xytext=(4, -10), textcoords="offset points", fontsize=8,
                color="tab:blue",
            )  # fmt: skip
            costs.append(base_cost)
        if cost == "speedup":  # left of it: slower than the baseline
            axis.axvline(1.0, color="tab:blue", linestyle=":", linewidth=1, alpha=0.6, zorder=1)
        axis.margins(x=0.08)  # room for the labels of the outermost points
        _cost_axis(axis, cost, costs, label)
        axis.set_ylabel(primary)
        axis.grid(True, alpha=0.3)
        axis.legend(loc="best")
    figure.suptitle(title)
    figure.tight_layout()
    for axis, cost, _ in panels:
        _readable_ticks(figure, axis, cost)
    return figure


def _cost_axis(axis, cost: str, values: list[float], label: str) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 10:  # sizes from 20 kB to 90 MB
        axis.set_xscale("log")
        label += ", log scale"
    axis.set_xlabel(label)


def _tick_candidates(axis) -> list:
    """x tick locators from the densest to the sparsest."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    if axis.get_xscale() == "log":
        return [LogLocator(subs=subs, numticks=n) for subs, n in (((1, 2, 5), 20), ((1, 3), 20), ((1,), 20), ((1,), 4))]
    return [MaxNLocator(nbins=n, steps=[1, 2, 2.5, 5, 10]) for n in (6, 4, 3, 2)]


def _readable_ticks(figure: Figure, axis, cost: str) -> None:
    """Labels in kB/MB (or ``2x``), as many as fit: the densest tick spacing whose labels do not touch."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.xaxis.set_major_formatter(FuncFormatter(readable_bytes if cost == "size_bytes" else _times))
    axis.xaxis.set_minor_formatter(NullFormatter())  # a log axis labels its minor ticks (3x10^5...) otherwise
    limits = axis.get_xlim()
    for locator in _tick_candidates(axis):
        axis.xaxis.set_major_locator(locator)
        axis.set_xlim(limits)  # a locator must not widen the view
        if not overlapping_labels(figure, axis):
            return
    while overlapping_labels(figure, axis):  # the sparsest still collides (a very narrow plot): every other one
        ticks = [t for t in axis.get_xticks() if min(limits) <= t <= max(limits)]
        if len(ticks) < 2:
            return
        axis.set_xticks(ticks[::2])
        axis.set_xlim(limits)


def _times(value: float, _position: object = None) -> str:
    return f"{value:g}x"


def overlapping_labels(figure: Figure, axis) -> bool:
    """Whether two of ``axis``'s drawn x tick labels touch (within ``LABEL_GAP_PX``)."""
    figure.draw_without_rendering()  # lays out the ticks and labels; no pixels
    low, high = sorted(axis.get_xlim())
    locations = axis.xaxis.get_majorticklocs()
    boxes = sorted(
        (
            tick.label1.get_window_extent()
            for location, tick in zip(locations, axis.xaxis.get_major_ticks(len(locations)), strict=True)
            if low <= location <= high and tick.label1.get_visible() and tick.label1.get_text()
        ),
        key=lambda box: box.x0,
    )
    return any(left.x1 + LABEL_GAP_PX > right.x0 for left, right in pairwise(boxes))


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """``figure_of`` saved as a PNG."""
    figure_of(rows, title).savefig(path)


def write_report(rows: Sequence[Row], out: Path, title: str) -> list[Path]:
    """report.csv, report.md, report.html and pareto.png in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.csv", out / "report.md", out / "report.html", out / "pareto.png"]
    write_csv(rows, paths[0])
    write_markdown(rows, paths[1], title)
    plot(rows, paths[3], title)
    write_html(rows, paths[2], title, paths[3])
    return paths


def sweep_report(store: TrackingStore, parent: str, *, out: Path | None = None, show: bool = False) -> int:
    """The report of a sweep, logged to its parent run (artifacts ``report/``); returns the number of rows."""
    rows = rows_of(sweep_runs(store, parent))
    if not rows:
        return 0
    title = f"sweep {parent[:8]}: {len(rows)} finished runs"
    if show:
        show_table(rows, title)
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_report(rows, out or Path(tmp), title):
            store.log_file(parent, path, "report")
    return len(rows)


def missing_store(store: TrackingStore, backend: str) -> str | None:
    """Why there is nothing to report in ``store`` yet (an embedded MLflow sqlite store that does not exist): a
    report reads runs, it never creates an empty ``mlflow.db``."""
    if backend != "mlflow":
        return None
    from slimlab.mlflow_tracking import sqlite_path

    database = sqlite_path(store.uri)
    if database is not None and not database.is_file():
        return f"no tracking store at {database}; run something first (slimlab run) or pass --uri"
    return None
