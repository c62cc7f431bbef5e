"""Pruning: zero the least important weights (unstructured) or remove whole channels (structured).

Unstructured pruning only zeroes weights; the artifact stores zeros as bits, so
the file shrinks, but the model computes as densely as before. Structured
pruning removes output channels/neurons through Torch-Pruning's dependency
graph (so every layer that consumes them shrinks too): layers get narrower and
latency really drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slimlab import hookimpl
from slimlab.config import Choice, LayerType

if TYPE_CHECKING:
    from torch import nn

    from slimlab.context import RunContext


class Method(Choice):
    l1 = "l1"
    random = "random"  # the control: is magnitude any better than chance?


class Structure(Choice):
    unstructured = "unstructured"
    channels = "channels"


# "global" is a keyword, so no class body can name a member after it; OmegaConf looks members up by name.
Scope = Choice("Scope", [("global", "global"), ("layer", "layer")], module=__name__)


class Schedule(Choice):
    oneshot = "oneshot"
    gradual = "gradual"


MODULE_TYPES = tuple(LayerType)


@dataclass
class PruneConfig:
    """What to prune, how much, and how to recover."""

    amount: float = 0.5  # fraction of weights (unstructured) or of channels (structured) removed
    method: Method = Method.l1
    structure: Structure = Structure.unstructured
    scope: Scope = Scope["global"]  # global: one threshold across layers; layer: `amount` in each layer
    schedule: Schedule = Schedule.oneshot  # gradual: Zhu & Gupta's cubic ramp over `steps`, fine-tuning between
    steps: int = 4  # gradual only
    fine_tune_epochs: int = 0  # in total; gradual spreads them over the steps
    lr: float = 1e-3  # of the fine-tuning
    module_types: list[LayerType] = field(default_factory=lambda: list(MODULE_TYPES))
    layers: list[str] = field(default_factory=list)  # module names; empty: every layer of module_types

    def __post_init__(self) -> None:
        # Built from a plain dict (not through OmegaConf), the choices are still strings.
        self.method = Method.parse(self.method, "method")
        self.structure = Structure.parse(self.structure, "structure")
        self.scope = Scope.parse(self.scope, "scope")
        self.schedule = Schedule.parse(self.schedule, "schedule")
        self.module_types = [LayerType.parse(name, "module_types") for name in self.module_types]
        if not 0 <= self.amount < 1:
            raise ValueError(f"amount must be in [0, 1), got {self.amount}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"fine_tune_epochs must be >= 0, got {self.fine_tune_epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def cubic_schedule(final: float, steps: int) -> list[float]:
    """Zhu & Gupta (2017): sparsity after step k of n is final * (1 - (1 - k/n)^3)."""
    return [final * (1 - (1 - k / steps) ** 3) for k in range(1, steps + 1)]


def _targets(model: nn.Module, config: PruneConfig) -> list[tuple[str, nn.Module]]:
    from torch import nn

    types = tuple(getattr(nn, name) for name in config.module_types)
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, types)]
    if config.layers:
        names = {name for name, _ in found}
        missing = sorted(set(config.layers) - names)
        if missing:
            raise ValueError(f"layers {missing} are not {'/'.join(config.module_types)} layers; valid: {sorted(names)}")
        found = [(name, module) for name, module in found if name in config.layers]
    if not found:
        raise ValueError(f"the model has no {', '.join(config.module_types)} layers to prune")
    return found


def _prune_unstructured(model: nn.Module, config: PruneConfig, ctx: RunContext) -> nn.Module:
    import torch.nn.utils.prune as prune

    targets = [(module, "weight") for _, module in _targets(model, config)]
    method = prune.L1Unstructured if config.method == "l1" else prune.RandomUnstructured
    schedule = cubic_schedule(config.amount, config.steps) if config.schedule == "gradual" else [config.amount]
    epochs = _split(config.fine_tune_epochs, len(schedule))
    reached = 0.0
    for step, (target, step_epochs) in enumerate(zip(schedule, epochs, strict=True), 1):
        # torch's pruning containers prune a fraction of what is still unpruned.
        amount = (target - reached) / (1 - reached)
        if config.scope == "global":
            prune.global_unstructured(targets, pruning_method=method, amount=amount)
        else:
            for module, name in targets:
                method.apply(module, name, amount=amount)
        reached = target
        # The masks stay attached while fine-tuning, so pruned weights stay zero.
        ctx.fine_tune(model, step_epochs, lr=config.lr, description=f"prune: step {step}/{len(schedule)} fine-tune")
    for module, name in targets:
        prune.remove(module, name)  # permanent: no weight_orig / weight_mask left behind
    return model


def _prune_channels(model: nn.Module, config: PruneConfig, ctx: RunContext) -> nn.Module:
    import torch_pruning as tp

    from slimlab.batches import output_tensor

    targets = _targets(model, config)
    # The last layer's outputs are the model's outputs (classes, values): never remove them.
    output_layer = targets[-1][1] if not config.layers else None
    chosen = {module for _, module in targets}
    ignored = [m for _, m in _all_prunable(model) if m not in chosen or m is output_layer]
    if config.method == "l1":
        importance = tp.importance.MagnitudeImportance(p=1)
    else:
        importance = tp.importance.RandomImportance()
    steps = config.steps if config.schedule == "gradual" else 1
    pruner = tp.pruner.MetaPruner(
        model,
        ctx.example_inputs(1),
        importance=importance,
        pruning_ratio=config.amount,
        global_pruning=config.scope == "global",
        iterative_steps=steps,
        iterative_pruning_ratio_scheduler=lambda ratio, n: [0.0, *cubic_schedule(ratio, n)],
        ignored_layers=ignored,
        output_transform=output_tensor,  # Hugging Face outputs hold the tensor in `logits`
    )
    for step, epochs in enumerate(_split(config.fine_tune_epochs, steps), 1):
        pruner.step()
        ctx.fine_tune(model, epochs, lr=config.lr, description=f"prune: step {step}/{steps} fine-tune")
    ctx.tags["slimlab.prune.shapes"] = ", ".join(
        f"{name}:{tuple(module.weight.shape)}" for name, module in _all_prunable(model)
    )[:5000]
    return model


def _all_prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch import nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _split(total: int, parts: int) -> list[int]:
    """``total`` epochs spread over ``parts`` steps, the remainder going to the last steps."""
    return [total // parts + (1 if i >= parts - total % parts else 0) for i in range(parts)]


def apply(model: nn.Module, config: PruneConfig, ctx: RunContext) -> nn.Module:
    if config.structure == "channels":
        return _prune_channels(model, config, ctx)
    return _prune_unstructured(model, config, ctx)


def label(config: PruneConfig) -> str:
    defaults = PruneConfig()
    details = [f"{config.amount:g}"] + [
        getattr(config, key) for key in ("structure", "method", "scope", "schedule")
        if getattr(config, key) != getattr(defaults, key)
    ]  # fmt: skip
    if config.layers:  # which layers, while the names stay short enough for a run name
        details.append("+".join(config.layers) if len(config.layers) <= 2 else f"{len(config.layers)} layers")
    return f"prune({','.join(details)})"


@hookimpl
def register_techniques(register) -> None:
    key_params = ("amount", "method", "structure", "scope", "schedule", "fine_tune_epochs")
    register(
        "prune", PruneConfig, apply, label=label, key_params=key_params,
        module_options=("layers",), keeps_module_names=True,  # channels are removed in place, names stay
        label_shows=("amount", "method", "structure", "scope", "schedule", "layers"),
    )  # fmt: skip
