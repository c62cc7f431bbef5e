"""Whether a scheme makes this run's model faster on this machine, measured before the model is quantized.

The same int8 recipe can be 2.5x faster than fp32 on a CPU with AVX-512 VNNI and 14x slower on one with only
AVX2, so the capability probe (``capability.py``: can it run at all) is not enough. Before quantizing, the
run's own layers are called once on its example batch (forward hooks record each targeted layer's input);
the costliest distinct layers (weight size x rows x calls) are copied, quantized with the run's recipe (and
compiled if it is), and timed against their fp32 copies on those inputs, interleaved, with the run's
``measure`` settings. A recipe measured below ``SLOWER`` times fp32 speed is refused, with the ratio, unless
``allow_slower=true`` (then it runs, flagged by the tag ``slimlab.quantize.slower``).

Why at the start of the step and not at plan time: a layer's input shape (the rows of a Linear in a
transformer are batch x sequence length) is known only from the data, which the plan does not load.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

from slimlab.errors import Refused

if TYPE_CHECKING:
    from torch import nn

    from slimlab.context import RunContext

    from .options import QuantizeConfig

SLOWER = 0.95  # below this ratio to fp32 a recipe is slower, not lost in timing noise
PROBED_LAYERS = 3  # the costliest distinct layers are timed; together they are most of the model's work


class SlowerThanFloat(Refused):
    """The recipe was measured slower than fp32 on this machine, on this run's layers."""


@dataclasses.dataclass
class LayerCall:
    """A distinct targeted layer (type, weight shape, input shape) and how often the model calls such a layer."""

    name: str
    module: Any
    inputs: Any
    calls: int
    cost: float  # weight elements x rows of the input: its share of the work

    def describe(self) -> str:
        shape = "x".join(str(size) for size in self.inputs.shape)
        return f"{self.name} ({type(self.module).__name__}, input {shape}, x{self.calls})"


def layer_calls(model: nn.Module, selected, example: Any) -> list[LayerCall]:
    """The distinct targeted layers the model calls on ``example``, costliest first."""
    import torch

    from slimlab.batches import call, clone

    seen: dict[tuple, LayerCall] = {}
    handles = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            key = (type(module), tuple(module.weight.shape), tuple(x.shape), x.dtype)
            if key in seen:
                seen[key].calls += 1
                return
            rows = output.numel() / output.shape[1 if isinstance(module, torch.nn.Conv2d) else -1]
            seen[key] = LayerCall(name, module, x.detach().clone(), 1, float(module.weight.numel()) * rows)

        return hook

    for name, module in model.named_modules():
        if selected(module, name) and isinstance(getattr(module, "weight", None), torch.Tensor):
            handles.append(module.register_forward_hook(record(name)))
    training = model.training
    model.eval()  # in training mode a BatchNorm would update its running statistics: the probe changes nothing
    try:
        with torch.no_grad():  # not inference_mode: the recorded inputs also feed torch.export (pt2e), which traces
            call(model, clone(example))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return sorted(seen.values(), key=lambda layer: layer.cost * layer.calls, reverse=True)


def _quantized_copy(layer: LayerCall, config: QuantizeConfig) -> nn.Module:
    """The layer alone, quantized and lowered as the run's recipe would do it."""
    import torch
    from torch import nn

    from .ao_config import _import_torchao, build_ao_config
    from .eager import _eager
    from .layers import _lowered_class, _selector
    from .pt2e import _pt2e_convert
    from .torchao_backend import _torchao_quantize

    alone = nn.Sequential(copy.deepcopy(layer.module)).eval()
    single = dataclasses.replace(config, keep_float=[], embeddings=False)
    if config.backend == "torchao":
        if config.config is not None:
            _import_torchao().quantize_(alone, build_ao_config(config.config))
        else:
            selected = _selector(config.targets, ())
            _torchao_quantize(alone, config.scheme, config.granularity, selected, config.group_size)
    elif config.backend == "pt2e":
        alone = _pt2e_convert(alone, single, layer.inputs, [layer.inputs])
    else:
        alone = _eager(alone, single, [layer.inputs], layer.inputs)[0]
    if config.compile:
        alone = _lowered_class()(torch.compile(alone, dynamic=False), alone, config.freezing)
    return alone


def measure_layers(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> tuple[float, str] | None:
    """(fp32 time / quantized time over the probed layers, weighted by their calls; what was probed), or None
    when the model calls no targeted layer on the example batch."""
    from slimlab.measure import measure_latency

    from .layers import _selector

    layers = layer_calls(model, _selector(config.targets, config.keep_float), ctx.example_inputs())[:PROBED_LAYERS]
    if not layers:
        return None
    measure = ctx.cfg.measure
    fp32_ms = quantized_ms = 0.0
    for layer in layers:
        latency = measure_latency(
            {"fp32": copy.deepcopy(layer.module).eval(), "quantized": _quantized_copy(layer, config)},
            layer.inputs,
            warmup=measure.warmup,
            repeats=max(5, measure.repeats),
            threads=measure.threads,
        )
        fp32_ms += layer.calls * latency["fp32"].median_ms
        quantized_ms += layer.calls * latency["quantized"].median_ms
    return fp32_ms / quantized_ms, ", ".join(layer.describe() for layer in layers)


def guard(model: nn.Module, config: QuantizeConfig, ctx: RunContext, label: str) -> None:
    """Refuse a recipe measured slower than fp32 here on the model's layers, unless ``allow_slower``."""
    from .ao_config import build_ao_config

    if config.config is not None and type(build_ao_config(config.config)).__name__ == "FqnToConfig":
        return  # the config names the model's layers: a layer alone would match none of them
    measured = measure_layers(model, config, ctx)
    if measured is not None:
        ratio, probed = measured
        ctx.metrics["probe_speedup"] = ratio
        judge(ratio, f"measured on the model's layers {probed}", config, ctx, label)


def judge(ratio: float, how: str, config: QuantizeConfig, ctx: RunContext, label: str) -> None:
    """Record ``ratio`` (fp32 time / quantized time); below SLOWER, refuse or (``allow_slower``) flag it."""
    from slimlab.measure import machine_tags

    ctx.tags["slimlab.quantize.probe"] = f"{ratio:.2f}x fp32, {how}"
    if ratio >= SLOWER:
        return
    machine = machine_tags(ctx.cfg.measure.threads)
    flags = machine.get("slimlab.cpu_flags", "unknown")
    where = f"on this machine ({machine['slimlab.cpu']}, flags {flags}, {ctx.cfg.measure.threads} thread(s))"
    if config.allow_slower:
        ctx.tags["slimlab.quantize.slower"] = f"{ratio:.2f}x fp32 speed {where}; run anyway: allow_slower=true"
        return
    raise SlowerThanFloat(
        f"{label} runs {ratio:.2f}x as fast as fp32 {where}, {how}: it would make the model slower. Use technique "
        "quantize_auto (the fastest recipe here that keeps the outputs), or set technique.quantize.allow_slower=true "
        "to run it for its size"
    )
