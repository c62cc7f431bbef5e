"""The sweep report: fronts by figures measured side by side, readable plot ticks, a report MLflow's UI shows."""

from __future__ import annotations

import base64
import csv
import re
from itertools import pairwise

import pytest

from slimlab.report import COLUMNS, Row, figure_of, front_ids, pareto_front, table_rows, write_report


def row(name: str, drop: float, size: float = 1e6, speedup: float = 1.0, latency_ms: float = 1.0) -> Row:
    metrics = {
        "accuracy": 0.97 - drop,
        "baseline_accuracy": 0.97,
        "accuracy_drop": drop,
        "size_bytes": size,
        "baseline_size_bytes": 1_724_000,
        "compression_ratio": 1_724_000 / size,
        "speedup": speedup,
        "latency_ms": latency_ms,
        "baseline_latency_ms": latency_ms * speedup,
        "sparsity": 0.5,
    }
    return Row(name, f"lenet {name}", name, metrics, "accuracy")


# "idle" was timed while the machine was idle: the lowest latency_ms of all, yet against its own baseline, timed
# beside it in the same process, it is slower than "fast" at the same quality.
RUNS = [
    row("fast", 0.01, speedup=2.0, latency_ms=5.0),
    row("idle", 0.01, speedup=1.5, latency_ms=1.0),
    row("exact", 0.0, speedup=1.0, latency_ms=3.0),
    row("slow", 0.02, speedup=0.8, latency_ms=0.5),
]


def test_the_speed_front_ranks_speedup_not_latency_timed_in_other_processes():
    assert [r.run_id for r in pareto_front(RUNS, "speedup")] == ["exact", "fast"]  # by increasing speedup
    _, on_speed_front = front_ids(RUNS)
    assert on_speed_front == {"exact", "fast"}  # not "idle" nor "slow", the two lowest latency_ms


def test_a_run_without_the_figure_is_on_no_front_by_it():
    unmeasured = Row("old", "lenet old", "old", {"accuracy": 0.99, "accuracy_drop": -0.02}, "accuracy")
    assert [r.run_id for r in pareto_front([*RUNS, unmeasured], "speedup")] == ["exact", "fast"]


def test_table_and_csv_show_speedup_and_say_it_is_against_the_runs_own_baseline(tmp_path):
    assert "latency_ms" not in COLUMNS  # the MLflow comparison view's columns too
    header, body = table_rows(RUNS)
    assert "latency_ms" not in header and "speedup" in header
    fronts = {cells[0]: cells[header.index("front")] for cells in body}
    assert fronts["lenet fast"] == "speedup" and "speedup" not in fronts["lenet idle"]

    paths = write_report(RUNS, tmp_path, "a sweep")
    assert [p.name for p in paths] == ["report.csv", "report.md", "report.html", "pareto.png"]
    with open(paths[0]) as handle:
        table = {r["run_id"]: r for r in csv.DictReader(handle)}
    assert table["fast"]["pareto_speedup"] == "True" and table["idle"]["pareto_speedup"] == "False"
    assert "pareto_latency" not in table["fast"]
    assert table["idle"]["latency_ms"] == "1.0"  # each run's own timings stay in the CSV, for the record
    for text in (paths[1].read_text(), paths[2].read_text()):
        assert "speedup: against the run's own baseline, timed side by side in one process" in text
        assert "quality vs speedup" in text


def test_the_html_report_carries_its_plot_inline(tmp_path):
    """MLflow's UI shows an HTML artifact in a frame of its own (a blob URL), where a relative pareto.png does
    not load; its markdown preview shows no images at all (checked in Chromium on MLflow 3.17.2). So the page
    holds the plot as a data: URI, and the markdown, which keeps pareto.png for other viewers, points to it."""
    csv_path, markdown, html, png = write_report(RUNS, tmp_path, "a sweep")
    page = html.read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == png.read_bytes()
    assert "<td>lenet fast</td>" in page
    text = markdown.read_text()
    assert "In the MLflow UI open report.html" in text and "![Pareto fronts](pareto.png)" in text


def tick_label_boxes(figure, axis) -> list:
    figure.canvas.draw()
    low, high = sorted(axis.get_xlim())
    locations = axis.xaxis.get_majorticklocs()
    ticks = axis.xaxis.get_major_ticks(len(locations))
    shown = [t.label1 for loc, t in zip(locations, ticks, strict=True) if low <= loc <= high and t.label1.get_text()]
    return sorted(((label.get_window_extent(), label.get_text()) for label in shown), key=lambda b: b[0].x0)


@pytest.mark.parametrize(
    "sizes",
    [
        [23_000, 1_724_000, 90_000_000, 450_000],  # 20 kB to 90 MB: log scale
        [120_000, 430_000, 900_000],  # one decade: a log axis labels its minor ticks, 3x10^5 on 4x10^5
        [1_100_000, 1_250_000, 1_500_000, 1_724_000],  # within 2x: linear
    ],
)
def test_plot_tick_labels_are_readable_and_do_not_overlap(sizes):
    rows = [row(f"r{i}", 0.01 * i, size=size, speedup=1 + 0.4 * i) for i, size in enumerate(sizes)]
    figure = figure_of(rows, "sizes far apart")
    size_axis, speed_axis = figure.axes
    for axis, unit in ((size_axis, r" (kB|MB)$"), (speed_axis, r"x$")):
        labels = tick_label_boxes(figure, axis)
        assert len(labels) >= 2, [text for _, text in labels]
        assert all(re.search(unit, text) for _, text in labels), [text for _, text in labels]
        for (left, left_text), (right, right_text) in pairwise(labels):
            assert left.x1 < right.x0, f"{left_text!r} overlaps {right_text!r}"
    assert "speedup over the run's own baseline" in speed_axis.get_xlabel()
