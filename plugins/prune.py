"""Magnitude pruning: zero the smallest weights, optionally fine-tune, then make it permanent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from framework import hookimpl

if TYPE_CHECKING:
    from torch import nn

    from framework.context import RunContext

SCOPES = ("global", "layer")
MODULE_TYPES = ("Linear", "Conv2d")


@dataclass
class PruneConfig:
    """L1-magnitude unstructured pruning of Linear/Conv2d weights."""

    amount: float = 0.5  # fraction of weights set to zero
    scope: str = "global"  # global: one threshold over all layers; layer: `amount` in each layer
    fine_tune_epochs: int = 0  # training epochs with the mask held, before it is made permanent
    lr: float = 1e-3
    module_types: list[str] = field(default_factory=lambda: list(MODULE_TYPES))

    def __post_init__(self) -> None:
        if not 0 <= self.amount < 1:
            raise ValueError(f"amount must be in [0, 1), got {self.amount}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {self.scope!r}")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"fine_tune_epochs must be >= 0, got {self.fine_tune_epochs}")
        unknown = sorted(set(self.module_types) - set(MODULE_TYPES))
        if unknown:
            raise ValueError(f"module_types may contain {', '.join(MODULE_TYPES)}; got {', '.join(unknown)}")


def apply(model: nn.Module, config: PruneConfig, ctx: RunContext) -> nn.Module:
    import torch.nn.utils.prune as prune
    from torch import nn

    types = tuple(getattr(nn, name) for name in config.module_types)
    targets = [(module, "weight") for module in model.modules() if isinstance(module, types)]
    if not targets:
        raise ValueError(f"the model has no {', '.join(config.module_types)} layers to prune")
    if config.scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=config.amount)
    else:
        for module, name in targets:
            prune.l1_unstructured(module, name, amount=config.amount)
    # The masks stay attached while fine-tuning, so pruned weights stay zero.
    ctx.fine_tune(model, config.fine_tune_epochs, lr=config.lr, description="prune: fine-tune")
    for module, name in targets:
        prune.remove(module, name)  # permanent: no weight_orig / weight_mask left behind
    return model


def label(config: PruneConfig) -> str:
    return f"prune({config.amount:g}{'' if config.scope == 'global' else ',layer'})"


@hookimpl
def register_techniques(register) -> None:
    register("prune", PruneConfig, apply, label=label)
