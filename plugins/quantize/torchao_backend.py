"""torchao's ``quantize_``: named schemes (int8, int4, float8, 2:4) or the user's torchao config, in place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from slimlab.context import RunContext

from .ao_config import _import_torchao, build_ao_config, describe_ao_config
from .layers import _compile, _selector, _targets_present
from .options import INT4_SCHEMES, QuantizeConfig


def _row_width(module: nn.Module) -> int:
    """The length of a weight row that int4 groups split: Linear in_features, Conv2d in_channels/groups,
    Embedding embedding_dim (torchao groups conv weights along dim 1, the rest along the last dim)."""
    return module.weight.shape[1]


def _int4(model: nn.Module, selected, group_size: int, make) -> dict[str, list[str]]:
    """Quantize the ``selected`` modules with ``make(granularity)``, ``PerGroup(group_size)`` where it fits.

    A module whose rows are not a multiple of ``group_size`` gets one group per row (``PerAxis(0)``: int4 still,
    with a coarser scale); one whose rows are a single value (a conv with one input channel) stays float: a scale
    per weight would outweigh the weight, and torchao cannot build it. Returns those modules' names by case.
    """
    quantization = _import_torchao()
    widths = {n: _row_width(m) for n, m in model.named_modules() if selected(m, n)}
    notes = {
        "per_row": [n for n, width in widths.items() if width % group_size and width > 1],
        "float": [n for n, width in widths.items() if width == 1],
    }
    grouped = [n for n, width in widths.items() if width % group_size == 0]
    for names, granularity in (
        (grouped, quantization.PerGroup(group_size)),
        (notes["per_row"], quantization.PerAxis(0)),
    ):
        if names:
            quantization.quantize_(model, make(granularity), filter_fn=lambda _, name, names=names: name in names)
    return notes


def _torchao_quantize(
    model: nn.Module, scheme: str, granularity: str, selected, group_size: int | None
) -> dict[str, list[str]]:
    """Quantize the ``selected`` layers with a named scheme; for int4, the layers quantized per row or left float."""
    import torch

    quantization = _import_torchao()
    if scheme == "int4_weight_only":  # IntxWeightOnlyConfig: Int4WeightOnlyConfig needs kernels CPUs lack (mslk)
        return _int4(
            model,
            selected,
            group_size,
            lambda groups: quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=groups),
        )
    if scheme == "int8_dynamic_int4":
        return _int4(
            model,
            selected,
            group_size,
            lambda groups: quantization.Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4, weight_granularity=groups
            ),
        )
    row_or_tensor = quantization.PerRow() if granularity == "per_channel" else quantization.PerTensor()
    # set_inductor_config=False: torchao would otherwise change process-wide inductor settings.
    if scheme == "int8_weight_only":
        recipe = quantization.Int8WeightOnlyConfig(granularity=row_or_tensor, set_inductor_config=False)
    elif scheme == "int8_dynamic":
        recipe = quantization.Int8DynamicActivationInt8WeightConfig(
            granularity=row_or_tensor, set_inductor_config=False
        )
    elif scheme == "float8":
        recipe = quantization.Float8DynamicActivationFloat8WeightConfig(
            granularity=row_or_tensor, set_inductor_config=False
        )
    else:  # sparse_2_4: zero the 2 smallest of every 4 weights along the input, then store them compressed
        from torchao.sparsity.sparse_api import SemiSparseWeightConfig

        with torch.no_grad():
            for name, module in model.named_modules():
                if selected(module, name):
                    groups = module.weight.detach().reshape(-1, 4)
                    smallest = groups.abs().argsort(dim=1)[:, :2]
                    module.weight.copy_(groups.scatter(1, smallest, 0).reshape(module.weight.shape))
        recipe = SemiSparseWeightConfig()
    quantization.quantize_(model, recipe, filter_fn=selected)
    return {}


def _quantized_weights(model: nn.Module) -> int:
    """How many parameters are tensor subclasses (what torchao's quantize_ makes of a weight)."""
    import torch
    from torch import nn

    plain = (torch.Tensor, nn.Parameter)
    return sum(1 for p in model.parameters() if type(p) not in plain and hasattr(p, "__tensor_flatten__"))


def _check_groups_fit(model: nn.Module, selected, recipe: Any) -> None:
    """A group-wise config must divide the rows of every layer it gets; torchao's own assert names no layer."""
    granularity = getattr(recipe, "granularity", None) or getattr(recipe, "weight_granularity", None)
    if type(granularity).__name__ != "PerGroup":
        return
    size = granularity.group_size
    misfits = {
        name: _row_width(module)
        for name, module in model.named_modules()
        if selected(module, name) and getattr(module, "weight", None) is not None and module.weight.dim() >= 2
        if _row_width(module) % size
    }
    if misfits:
        rows = ", ".join(f"{name} ({width})" for name, width in misfits.items())
        raise ValueError(
            f"the config's PerGroup({size}) does not divide the rows of {rows}: keep them float "
            f"(keep_float=[{','.join(misfits)}]), pick a group size that divides them, or use "
            "scheme=int4_weight_only, which gives such layers one group per row"
        )


def _apply_ao_config(model: nn.Module, config: QuantizeConfig) -> None:
    """quantize_ with the user's torchao config: on the targeted layers (and embeddings), or per FqnToConfig."""
    quantization = _import_torchao()
    recipe = build_ao_config(config.config)
    if type(recipe).__name__ == "FqnToConfig":
        quantization.quantize_(model, recipe, filter_fn=None)  # quantize_ refuses a filter with FqnToConfig
    else:
        _targets_present(model, config)
        selected = _selector(config.targets, config.keep_float)
        _check_groups_fit(model, selected, recipe)
        quantization.quantize_(model, recipe, filter_fn=selected)
        if config.embeddings:
            quantization.quantize_(model, recipe, filter_fn=_selector(["Embedding"], config.keep_float))
    if not _quantized_weights(model):
        raise ValueError(f"the torchao config {describe_ao_config(recipe)} quantized no layer of this model")


def _apply_torchao(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> nn.Module:
    import torch

    quantization = _import_torchao()
    embedding = _selector(["Embedding"], config.keep_float)
    if config.embeddings and not any(embedding(module, name) for name, module in model.named_modules()):
        raise ValueError("embeddings=true but the model has no nn.Embedding outside keep_float")
    if config.config is not None:
        _apply_ao_config(model, config)
    else:
        _targets_present(model, config)
        selected = _selector(config.targets, config.keep_float)
        notes = _torchao_quantize(model, config.scheme, config.granularity, selected, config.group_size)
        if config.embeddings and config.scheme in INT4_SCHEMES:  # weight-only: an embedding takes indices
            more = _int4(
                model,
                embedding,
                config.group_size,
                lambda groups: quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=groups),
            )
            notes = {case: notes[case] + more[case] for case in notes}
        elif config.embeddings:
            axis = quantization.PerAxis(0) if config.granularity == "per_channel" else quantization.PerTensor()
            quantization.quantize_(
                model, quantization.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=axis), filter_fn=embedding
            )
        if notes.get("per_row"):  # rows not a multiple of group_size: one group per row (a coarser scale)
            ctx.tags["slimlab.quantize.per_row"] = ", ".join(notes["per_row"])
        if notes.get("float"):
            ctx.tags["slimlab.quantize.left_float"] = ", ".join(notes["float"])
        if config.scheme in INT4_SCHEMES:
            if not _quantized_weights(model):
                raise ValueError(f"no layer of this model could be quantized to int4 (left float: {notes['float']})")
            # torchao's IntxUnpackedToInt8Tensor has no int4 matmul: it dequantizes the weight at every call
            ctx.tags["slimlab.quantize.kernel"] = (
                "int4 values stored in int8, dequantized inside the torch.compile'd graph (inductor fuses it with "
                "the matmul; no int4 kernel); the baseline is timed in eager mode"
                if config.compile
                else "int4 values stored in int8 and dequantized to float at every call (torchao "
                "IntxUnpackedToInt8Tensor has no int4 kernel): a smaller file, not a faster model"
            )
    if config.compile:
        return _compile(model, config, ctx, dynamic=None)
    return model
