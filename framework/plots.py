"""Plots logged as run artifacts."""

from __future__ import annotations

from pathlib import Path


def layer_sparsity_chart(sparsity: dict[str, float], path: Path, title: str) -> Path:
    """A horizontal bar chart of each layer's fraction of zero weights, as SVG (the MLflow UI shows it).

    Written directly rather than with matplotlib, whose import alone cost each pruning run about 0.35 s of
    CPU: a third of the margin slimlab's overhead target leaves (BENCHMARKS.md, bench_overhead).
    """
    from html import escape

    row, top, left = 22, 40, 12 + 7 * max((len(name) for name in sparsity), default=4)
    width, bar_room = left + 520, 440  # the bars' 100% mark, then room for their labels
    height = top + row * len(sparsity) + 44
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="13">{escape(title)}</text>',
    ]
    for index, (name, value) in enumerate(sparsity.items()):
        y = top + index * row
        parts += [
            f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{escape(name)}</text>',
            f'<rect x="{left}" y="{y + 3}" width="{value * bar_room:.1f}" height="{row - 6}" fill="#4c72b0"/>',
            f'<text x="{left + value * bar_room + 4:.1f}" y="{y + 15}">{value:.1%}</text>',
        ]
    axis = top + row * len(sparsity) + 4
    parts += [
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis}" stroke="black"/>',
        f'<line x1="{left}" y1="{axis}" x2="{left + bar_room}" y2="{axis}" stroke="black"/>',
        *(
            f'<text x="{left + tick * bar_room}" y="{axis + 16}" text-anchor="middle">{tick:.0%}</text>'
            for tick in (0, 0.25, 0.5, 0.75, 1)
        ),
        f'<text x="{left + bar_room / 2}" y="{axis + 34}" text-anchor="middle">',
        "fraction of weights that are zero</text>",
        "</svg>",
    ]
    path.write_text("\n".join(parts) + "\n")
    return path


def layer_sparsity_table(sparsity: dict[str, float], params: dict[str, int]) -> str:
    """The same numbers as a markdown table."""
    rows = ["| layer | weights | zero | sparsity |", "|---|---:|---:|---:|"]
    for name, value in sparsity.items():
        rows.append(f"| {name} | {params[name]:,} | {round(value * params[name]):,} | {value:.1%} |")
    return "\n".join(rows) + "\n"
