"""int8 quantization of Linear layers with torchao's ``quantize_``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from framework import hookimpl

if TYPE_CHECKING:
    from torch import nn

    from framework.context import RunContext

SCHEMES = {
    "int8_weight_only": ("Int8WeightOnlyConfig", "int8-wo"),
    "int8_dynamic": ("Int8DynamicActivationInt8WeightConfig", "int8-dyn"),
}


@dataclass
class QuantizeConfig:
    """Weights stored as int8 with per-channel scales; ``int8_dynamic`` also quantizes activations at run time."""

    scheme: str = "int8_weight_only"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")


def _import_torchao():
    # torchao tries to load its CUDA kernels on import and logs each failure;
    # on a CPU-only machine that is noise, not a problem.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import torchao.quantization

    return torchao.quantization


def apply(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> nn.Module:
    quantization = _import_torchao()
    config_class = getattr(quantization, SCHEMES[config.scheme][0])
    quantization.quantize_(model, config_class())  # Linear layers by default
    return model


def label(config: QuantizeConfig) -> str:
    return f"quantize({SCHEMES[config.scheme][1]})"


@hookimpl
def register_techniques(register) -> None:
    # int8 weights cannot be pruned or fine-tuned further: quantization is final.
    register("quantize", QuantizeConfig, apply, label=label, followed_by=())
