"""PT2E static int8: torch.export, X86InductorQuantizer, calibration, convert_pt2e, torch.compile."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch import nn

    from slimlab.context import RunContext

from .ao_config import _import_torchao
from .layers import _compile, _require_cpu, _targets_present
from .options import ACTIVATION_QPARAMS, QuantizeConfig


def _activation_nodes(graph_module) -> list:
    """The per-tensor quantize/dequantize nodes of the activations, in graph order."""
    import torch

    ops = torch.ops.quantized_decomposed
    kinds = (ops.quantize_per_tensor.default, ops.dequantize_per_tensor.default)
    return [node for node in graph_module.graph.nodes if node.op == "call_function" and node.target in kinds]


def _store_activation_qparams(graph_module) -> None:
    """Copy the activation scales and zero points, literals in the graph, into a buffer: the state dict is complete."""
    import torch

    values = [[float(node.args[1]), float(node.args[2])] for node in _activation_nodes(graph_module)]
    graph_module.register_buffer(ACTIVATION_QPARAMS, torch.tensor(values, dtype=torch.float64).reshape(-1, 2))


def _restore_activation_qparams(graph_module, _incompatible_keys=None) -> None:
    """After load_state_dict: put the loaded activation scales back into the graph."""
    stored = getattr(graph_module, ACTIVATION_QPARAMS).tolist()
    nodes = _activation_nodes(graph_module)
    if len(stored) != len(nodes):
        raise ValueError(f"the artifact holds {len(stored)} activation qparams, this graph has {len(nodes)}")
    for node, (scale, zero_point) in zip(nodes, stored, strict=True):
        node.args = (node.args[0], scale, int(zero_point), *node.args[3:])
    graph_module.recompile()


def _dynamic_batch(inputs: Any) -> Any:
    """torch.export's ``dynamic_shapes`` for ``inputs``: the first dimension of every tensor is the batch."""
    import torch

    from slimlab.batches import as_args

    batch = torch.export.Dim("batch", min=1)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: batch} if value.dim() > 0 else None
        if isinstance(value, dict):
            return {key: spec(item) for key, item in value.items()}
        if isinstance(value, tuple | list):
            return type(value)(spec(item) for item in value)
        return None

    args, kwargs = as_args(inputs)
    return spec(kwargs) if kwargs else spec(args)


def _pt2e_convert(model: nn.Module, config: QuantizeConfig, example: Any, calibration: Iterable[Any]) -> nn.Module:
    """export (dynamic batch) -> prepare_pt2e(X86InductorQuantizer) -> calibrate -> convert_pt2e, uncompiled."""
    import dataclasses

    import torch
    from torch import nn

    _import_torchao()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from slimlab.batches import as_args, call

    model.eval()
    # Evaluation runs batches of measure.eval_batch_size, latency batches of measure.batch_size.
    args, kwargs = as_args(example)
    exported = torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_batch(example)).module()

    qconfig = x86.get_default_x86_inductor_quantization_config()  # uint8 histogram activations, int8 weights
    if config.granularity == "per_tensor":
        weight = dataclasses.replace(
            qconfig.weight,
            qscheme=torch.per_tensor_symmetric,
            ch_axis=None,
            observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12),
        )
        qconfig = dataclasses.replace(qconfig, weight=weight)
    quantizer = x86.X86InductorQuantizer()
    for target in config.targets:
        quantizer.set_module_type_qconfig(getattr(nn, target), qconfig)
    for name in config.keep_float:
        quantizer.set_module_name_qconfig(name, None)

    from slimlab.progress import progress

    prepared = prepare_pt2e(exported, quantizer)
    calibration = list(calibration)
    with torch.no_grad():
        for inputs in progress(calibration, "quantize: calibrate", total=len(calibration)):
            call(prepared, inputs)
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)  # the runner calls .eval()

    # convert_pt2e folds the int8 weights into new constants but leaves the fp32 originals attached:
    # drop what the graph no longer reads, or the artifact would carry both.
    used = {node.target for node in converted.graph.nodes if node.op == "get_attr"}
    for name, _ in [*converted.named_parameters(), *converted.named_buffers()]:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(converted.get_submodule(owner) if owner else converted, leaf)
    # The folded int8 weights are buffers; as frozen parameters they count as the model's parameters
    # (the `params` and `sparsity` metrics), and inductor freezing still folds and prepacks them.
    for name, tensor in list(converted.named_buffers(recurse=False)):
        if tensor.dtype == torch.int8:
            delattr(converted, name)
            converted.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    if not any(p.dtype == torch.int8 for p in converted.parameters()):
        raise ValueError(f"X86InductorQuantizer quantized no {', '.join(config.targets)} layer of this model")
    _store_activation_qparams(converted)
    return converted


def _apply_pt2e(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> nn.Module:
    _require_cpu(ctx, "pt2e")
    _targets_present(model, config)
    example = ctx.example_inputs()
    converted = _pt2e_convert(model, config, example, ctx.calibration_batches(config.calibration_batches))
    if not config.compile:
        ctx.tags["slimlab.quantize.lowering"] = "none: the decomposed reference graph (slower than fp32)"
        return converted
    # Inductor 2.13's quantized-conv lowering fails with a symbolic batch (AssertionError on the output
    # strides), so a graph with int8 convolutions is compiled once per batch size instead; Linear-only
    # graphs keep the dynamic batch dimension of the export.
    dynamic = False if "Conv2d" in config.targets else None
    return _compile(converted, config, ctx, dynamic=dynamic)
