"""Prints a baseline-vs-compressed table at the end of each run (a built-in plugin)."""

from __future__ import annotations

import sys
import urllib.parse
from typing import TYPE_CHECKING

from slimlab import hookimpl

if TYPE_CHECKING:
    from slimlab.context import RunContext


def _row(label: str, base: str, compressed: str, ratio: str = "") -> tuple[str, str, str, str]:
    return label, base, compressed, ratio


def summary_rows(ctx: RunContext, metrics: dict[str, float]) -> list[tuple[str, str, str, str]]:
    primary = ctx.task.primary_metric
    return [
        _row(
            primary,
            f"{metrics[f'baseline_{primary}']:.4f}",
            f"{metrics[primary]:.4f}",
            f"drop {metrics[f'{primary}_drop']:+.4f}",
        ),
        _row(
            "size",
            f"{metrics['baseline_size_bytes'] / 1024:,.1f} KiB",
            f"{metrics['size_bytes'] / 1024:,.1f} KiB",
            f"{metrics['compression_ratio']:.1f}x smaller",
        ),
        _row(
            "non-zero params",
            f"{ctx.baseline_metrics['nonzero_param_count']:,.0f}",
            f"{metrics['nonzero_param_count']:,.0f}",
            f"sparsity {metrics['sparsity']:.1%}",
        ),
        _row(
            "latency (median)",
            f"{metrics['baseline_latency_ms']:.3f} ms",
            f"{metrics['latency_ms']:.3f} ms",
            f"{metrics['speedup']:.2f}x speedup" + (" (slower)" if "slimlab.slower" in ctx.tags else ""),
        ),
    ]


def wide_console():
    """A rich console; in logs and CI (no terminal) 160 columns wide rather than squeezed into 80."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


@hookimpl(trylast=True)  # after tracking, so the run id is known
def after_run(ctx: RunContext, metrics: dict[str, float]) -> None:
    from rich.table import Table

    table = Table(title=ctx.run_name)
    for column in ("", "baseline", "compressed", ""):
        table.add_column(column, justify="right" if column else "left")
    for row in summary_rows(ctx, metrics):
        table.add_row(*row)
    console = wide_console()
    console.print(table)
    tracked = ctx.state.get("tracking")
    if tracked:
        # Plain print: rich would wrap a long link and read brackets in a path as markup.
        backend = "MLflow" if ctx.cfg.tracking.backend == "mlflow" else ctx.cfg.tracking.backend
        print(f"{backend} run {tracked['run_id']} in {shown_uri(ctx.tracking.uri)}")
        print(ctx.tracking.where(tracked["experiment_id"]), flush=True)


def shown_uri(uri: str) -> str:
    """``uri`` for printing: a password in it (``user:secret@host``) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(uri)
        if parts.password is None:
            return uri
    except ValueError:  # not a URL urllib can read: nothing to hide that it could find
        return uri
    user, host = parts.netloc.rpartition("@")[0].partition(":")[0], parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
