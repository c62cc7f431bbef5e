"""Eager ``torch.ao.quantization``: dynamic or static (stubs, fusion, x86 qconfig), deprecated upstream."""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from slimlab.context import RunContext

from .layers import _is_kept, _require_cpu, _selector, _targets_present
from .options import QuantizeConfig

log = logging.getLogger("slimlab")


@functools.cache
def _warn_eager_deprecated() -> None:
    warnings.warn(
        "quantize backend 'eager' uses torch.ao.quantization, which is deprecated upstream and will be "
        "removed; slimlab keeps it because it is still the fastest int8 path on x86 CPUs in eager mode. "
        "For new work prefer backend=pt2e (static) or backend=torchao.",
        FutureWarning,
        stacklevel=4,
    )


# Module patterns torch.ao fuses into one quantized module (e.g. Linear+ReLU -> QuantizedLinearReLU).
_FUSIBLE = (("Conv2d", "BatchNorm2d", "ReLU"), ("Conv2d", "BatchNorm2d"), ("Conv2d", "ReLU"), ("Linear", "ReLU"))


def _fuse(model: nn.Module, config: QuantizeConfig) -> None:
    """Fuse Conv/Linear(+BN)+ReLU where they are modules in an nn.Sequential.

    Only inside Sequential containers is module order the order of execution; elsewhere (e.g. LeNet's
    functional relu) there is nothing to fuse that can be found without tracing.
    """
    import torch.ao.quantization as tq
    from torch import nn

    groups = []
    for name, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        i = 0
        while i < len(children):
            for pattern in _FUSIBLE:
                window = children[i : i + len(pattern)]
                names = [f"{name}.{child}" if name else child for child, _ in window]
                kinds = tuple(type(module).__name__ for _, module in window)
                if kinds == pattern and pattern[0] in config.targets and not _is_kept(names[0], config.keep_float):
                    groups.append(names)
                    i += len(pattern) - 1
                    break
            i += 1
    if groups:
        tq.fuse_modules(model, groups, inplace=True)


def _x86_static_qconfig(granularity: str):
    import torch.ao.quantization as tq

    qconfig = tq.get_default_qconfig("x86")  # histogram activations (uint8), per-channel symmetric int8 weights
    if granularity == "per_tensor":
        qconfig = tq.QConfig(activation=qconfig.activation, weight=tq.default_weight_observer)
    return qconfig


def _eager_units(model: nn.Module, config: QuantizeConfig) -> list[str]:
    """Names of the modules to quantize: targeted leaves, or the fused modules that start with one."""
    from torch import nn
    from torch.ao.nn.intrinsic import _FusedModule

    types = tuple(getattr(nn, t) for t in config.targets)
    units = []
    for name, module in model.named_modules():
        if not name or _is_kept(name, config.keep_float) or any(name.startswith(f"{u}.") for u in units):
            continue
        if isinstance(module, types) or (isinstance(module, _FusedModule) and isinstance(module[0], types)):
            units.append(name)
    return units


def _eager_static(
    model: nn.Module, config: QuantizeConfig, calibration: list[Any], example: Any
) -> tuple[nn.Module, str]:
    """QuantStub/DeQuantStub placement, fusion, x86 qconfig, prepare, calibrate, convert.

    Where the stubs go: wrapping the whole model (quantize the input once, stay int8 between layers,
    dequantize the output) is the fastest, but only models whose every operation accepts quantized
    tensors survive it; LeNet's trailing log_softmax does not, nor does a float layer left between
    quantized ones. Which case a model is cannot be read off its modules (its forward is code), so the
    whole-model wrapping is tried on a copy and kept if the converted model runs; otherwise every targeted
    module gets its own stubs (QuantWrapper: quantize its input, dequantize its output), which works for
    any model at the cost of a quantize/dequantize pair per layer. The choice is recorded as a tag.
    """
    import torch
    import torch.ao.quantization as tq

    from slimlab.batches import call

    qconfig = _x86_static_qconfig(config.granularity)
    _fuse(model, config)
    units = _eager_units(model, config)

    def embeddings_qconfig(root: nn.Module) -> None:
        # nn.Embedding takes indices: no stubs, weight-only per-row int8 (its output stays float)
        selected = _selector(["Embedding"], config.keep_float)
        for name, module in root.named_modules():
            if config.embeddings and selected(module, name):
                module.qconfig = tq.float_qparams_weight_only_qconfig

    def calibrate_and_convert(root: nn.Module) -> nn.Module:
        from slimlab.progress import progress

        tq.prepare(root, inplace=True)
        with torch.no_grad():
            for inputs in progress(calibration, "quantize: calibrate", total=len(calibration)):
                call(root, inputs)
        return tq.convert(root, inplace=True)

    whole = tq.QuantWrapper(copy.deepcopy(model))
    for stub in (whole.quant, whole.dequant):
        stub.qconfig = qconfig
    for name in units:
        whole.module.get_submodule(name).qconfig = qconfig
    embeddings_qconfig(whole.module)
    try:
        calibrate_and_convert(whole)
        with torch.inference_mode():
            call(whole, example)
        return whole, "model"
    except (NotImplementedError, RuntimeError, TypeError) as error:  # TypeError: QuantWrapper takes one input
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.info("quantize(eager-static): stubs around each layer; whole-model stubs fail: %s", reason[:200])

    for name in units:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        wrapper = tq.QuantWrapper(owner.get_submodule(leaf))
        wrapper.qconfig = qconfig
        setattr(owner, leaf, wrapper)
    embeddings_qconfig(model)
    return calibrate_and_convert(model), "per-layer"


def _eager_dynamic(model: nn.Module, config: QuantizeConfig) -> nn.Module:
    import torch
    import torch.ao.quantization as tq
    from torch import nn

    weights = tq.per_channel_dynamic_qconfig if config.granularity == "per_channel" else tq.default_dynamic_qconfig
    spec: dict[Any, Any] = {nn.Linear: weights}
    if config.embeddings:
        spec[nn.Embedding] = tq.float_qparams_weight_only_qconfig
    # A name beats a type in torch.ao's qconfig lookup: None keeps a module (and what it contains) float.
    spec |= {name: None for name, _ in model.named_modules() if name and _is_kept(name, config.keep_float)}
    return tq.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def _eager(model: nn.Module, config: QuantizeConfig, calibration: list[Any], example: Any):
    """The eager recipe without run context (shared by apply and rebuild): (model, stubs placement or None)."""
    with warnings.catch_warnings():
        # the x86 qconfig's reduce_range observers warn once per observer; torch's deprecation warning stays
        warnings.filterwarnings("ignore", message="Please use quant_min and quant_max", category=UserWarning)
        if config.scheme == "dynamic":
            return _eager_dynamic(model, config), None
        return _eager_static(model, config, calibration, example)


def _apply_eager(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> nn.Module:
    _warn_eager_deprecated()
    _require_cpu(ctx, "eager")
    _targets_present(model, config)
    model.eval()
    example = ctx.example_inputs()
    calibration = list(ctx.calibration_batches(config.calibration_batches)) if config.scheme == "static" else []
    model, stubs = _eager(model, config, calibration, example)
    if stubs:
        ctx.tags["slimlab.quantize.stubs"] = stubs
    return model
