"""ONNX Runtime's own int8 (``quantize_dynamic`` / ``quantize_static``) as a quantize backend.

What a user would pick instead of slimlab, run inside slimlab under the same protocol: the model is exported
to ONNX, quantized by ``onnxruntime.quantization`` on the ONNX ops of the targeted layers, and deployed as a
module that runs it on ONNX Runtime (the ``onnx`` technique's machinery: ``slimlab.plugins.onnx.deploy``).
ONNX Runtime has no place in a torch graph afterwards: nothing may follow it in the pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from slimlab.context import RunContext

    from .options import QuantizeConfig

# The ONNX ops that hold each targeted layer type's weights after export.
OPS = {"Linear": ["MatMul", "Gemm"], "Conv2d": ["Conv"]}


def onnx_config(config: QuantizeConfig):
    """The onnx technique's options for this recipe."""
    from slimlab.plugins.onnx import OnnxConfig

    return OnnxConfig(
        quantize=config.scheme, granularity=config.granularity, calibration_batches=config.calibration_batches
    )


def check(config: QuantizeConfig) -> None:
    """onnx, onnxruntime (and onnxscript for the exporter) must be installed."""
    from slimlab.plugins.onnx import check as onnx_check

    onnx_check(onnx_config(config))


def apply_ort(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> nn.Module:
    from slimlab.plugins.onnx import deploy

    from .layers import _targets_present

    _targets_present(model, config)
    op_types = [op for target in config.targets for op in OPS[target]]
    if config.embeddings:
        op_types.append("Gather")  # an embedding lookup: int8 per-row weights
    return deploy(model, onnx_config(config), ctx, op_types)
