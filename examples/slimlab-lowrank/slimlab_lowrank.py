"""Low-rank factorisation: each Linear layer W (out x in) becomes two, B (out x r) after A (r x in).

The rank r is the smallest that keeps ``energy`` of W's squared singular values (truncated SVD, the
Eckart-Young optimum in Frobenius norm). A layer is factorised only where r * (in + out) < in * out, so
only where it gets smaller; the file and the arithmetic shrink for real, so slimlab measures both.
"""

from dataclasses import dataclass, field

from slimlab import hookimpl

SLIMLAB_API = ">=2,<3"  # the slimlab hook API this plugin is written for


@dataclass
class LowRankConfig:
    energy: float = 0.9  # fraction of the squared singular values each factorised layer keeps, in (0, 1]
    layers: list[str] = field(default_factory=list)  # Linear module names; empty: every Linear layer
    fine_tune_epochs: int = 0  # training on the run's data after factorising

    def __post_init__(self) -> None:
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"fine_tune_epochs must be >= 0, got {self.fine_tune_epochs}")


def rank_for(singular_values, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the total squared ones."""
    import torch

    squared = singular_values.double() ** 2
    kept = torch.cumsum(squared, 0) / squared.sum()
    index = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item())
    return min(index + 1, len(singular_values))


def factorise(linear, energy: float):
    """Two Linear layers whose product approximates ``linear``, or None when that would not be smaller."""
    import torch
    from torch import nn

    weight = linear.weight.detach()
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    rank = rank_for(s, energy)
    out_features, in_features = weight.shape
    if rank * (in_features + out_features) >= in_features * out_features:
        return None
    root = s[:rank].sqrt()
    first = nn.Linear(in_features, rank, bias=False)
    second = nn.Linear(rank, out_features, bias=linear.bias is not None)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).to(weight.dtype))
        second.weight.copy_((u[:, :rank] * root).to(weight.dtype))
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return nn.Sequential(first, second)


def apply(model, config: LowRankConfig, ctx):
    from torch import nn

    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = sorted(set(config.layers) - set(linears))
    if unknown:
        raise ValueError(f"layers {unknown} are not Linear layers of the model; its Linear layers: {sorted(linears)}")
    chosen = config.layers or list(linears)
    ranks = {}
    for name in chosen:
        replacement = factorise(linears[name], config.energy)
        if replacement is None:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, replacement)
        ranks[name] = replacement[0].out_features
    ctx.tags["lowrank.ranks"] = ", ".join(f"{name}:{rank}" for name, rank in ranks.items()) or "none"
    ctx.metrics["lowrank_layers"] = len(ranks)
    if config.fine_tune_epochs:
        ctx.fine_tune(model, config.fine_tune_epochs, description="lowrank: fine-tune")
    return model


def label(config: LowRankConfig) -> str:
    return f"lowrank({config.energy:g})"


@hookimpl
def register_techniques(register) -> None:
    register("lowrank", LowRankConfig, apply, label=label)
