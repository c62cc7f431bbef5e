"""Weight sharing (Deep Compression's second stage): each layer's weights are replaced by the nearest of
``clusters`` centroids, found by k-means on that layer's values.

Zeros stay zero, so it composes after pruning: only the non-zero weights are clustered. The plugin declares
nothing about storage: slimlab's artifact stores a tensor of few distinct values as a palette plus a few-bit index
per weight, so ``size_bytes`` shows the sharing (16 clusters: 4 bits a weight) with no flag.
"""

from dataclasses import dataclass, field

from slimlab import hookimpl

SLIMLAB_API = ">=2.2,<3"  # the slimlab hook API this plugin is written for


@dataclass
class KMeansConfig:
    clusters: int = 16  # centroids per layer (at most 256: the artifact's palette holds indices of up to 8 bits)
    iterations: int = 25  # Lloyd iterations, from centroids spread evenly between the layer's extremes
    layers: list[str] = field(default_factory=list)  # Linear/Conv2d module names; empty: every such layer
    fine_tune_epochs: int = 0  # centroid fine-tuning: train, then each cluster's weights share their mean again

    def __post_init__(self) -> None:
        if not 2 <= self.clusters <= 256:
            raise ValueError(f"clusters must be in [2, 256], got {self.clusters}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"fine_tune_epochs must be >= 0, got {self.fine_tune_epochs}")


def cluster(values, clusters: int, iterations: int):
    """1-D k-means (Lloyd) on ``values``: (centroids, index of each value's centroid). Linear initialisation,
    which Han et al. found best for weight sharing (it keeps the rare large weights)."""
    import torch

    centroids = torch.linspace(float(values.min()), float(values.max()), clusters, dtype=values.dtype)
    for _ in range(iterations):
        nearest = (values[:, None] - centroids[None, :]).abs().argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, values)
        counts = torch.zeros_like(centroids).index_add_(0, nearest, torch.ones_like(values))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids, (values[:, None] - centroids[None, :]).abs().argmin(dim=1)


def apply(model, config: KMeansConfig, ctx):
    import torch
    from torch import nn

    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    unknown = sorted(set(config.layers) - set(layers))
    if unknown:
        raise ValueError(f"layers {unknown} are not Linear/Conv2d layers of the model; they are: {sorted(layers)}")
    assignments = {}  # layer -> (its non-zero positions, each one's cluster)
    with torch.no_grad():
        for name in config.layers or list(layers):
            weight = layers[name].weight
            nonzero = weight != 0  # pruned weights stay exactly zero
            values = weight[nonzero]
            if values.numel() <= config.clusters:
                continue
            centroids, nearest = cluster(values, config.clusters, config.iterations)
            weight[nonzero] = centroids[nearest]
            assignments[name] = (nonzero, nearest)
    ctx.metrics["kmeans_layers"] = len(assignments)

    def share(model) -> None:
        """After each training step: the weights of a cluster take their mean, so the layer keeps its centroids
        (the shared update of Deep Compression's centroid fine-tuning)."""
        for name, (nonzero, nearest) in assignments.items():
            weight = model.get_submodule(name).weight
            values = weight[nonzero]
            sums = torch.zeros(config.clusters, dtype=values.dtype).index_add_(0, nearest, values)
            counts = torch.zeros(config.clusters, dtype=values.dtype).index_add_(0, nearest, torch.ones_like(values))
            weight[nonzero] = (sums / counts.clamp(min=1))[nearest]

    if config.fine_tune_epochs:
        ctx.fine_tune(model, config.fine_tune_epochs, description="kmeans: fine-tune centroids", keep_zeros=True,
                      after_step=share)  # fmt: skip
    return model


def label(config: KMeansConfig) -> str:
    return f"kmeans({config.clusters})"


@hookimpl
def register_techniques(register) -> None:
    register("kmeans", KMeansConfig, apply, label=label, label_shows=("clusters",))
