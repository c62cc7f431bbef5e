"""Plots logged as run artifacts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def layer_sparsity_chart(sparsity: dict[str, float], path: Path, title: str) -> Path:
    """A horizontal bar chart of each layer's fraction of zero weights."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt

    names = list(sparsity)
    figure, axes = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4))
    bars = axes.barh(names, [sparsity[n] for n in names], color="#4c72b0")
    axes.bar_label(bars, labels=[f"{sparsity[n]:.1%}" for n in names], padding=3, fontsize=8)
    axes.invert_yaxis()  # first layer on top
    axes.set_xlim(0, 1.1)
    axes.set_xlabel("fraction of weights that are zero")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def layer_sparsity_table(sparsity: dict[str, float], params: dict[str, int]) -> str:
    """The same numbers as a markdown table."""
    rows = ["| layer | weights | zero | sparsity |", "|---|---:|---:|---:|"]
    for name, value in sparsity.items():
        rows.append(f"| {name} | {params[name]:,} | {round(value * params[name]):,} | {value:.1%} |")
    return "\n".join(rows) + "\n"
