"""What every backend shares: which layers are quantized, CPU-only backends, lowering with torch.compile."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch import nn

    from slimlab.context import RunContext

from .options import QuantizeConfig


def _is_kept(name: str, keep_float: Iterable[str]) -> bool:
    """A module stays float if it, or a module containing it, is named in ``keep_float``."""
    return any(name == kept or name.startswith(f"{kept}.") for kept in keep_float)


def _selector(targets: Iterable[str], keep_float: Iterable[str]):
    """filter_fn(module, name) for the targeted, not-kept modules."""
    from torch import nn

    types = tuple(getattr(nn, t) for t in targets)
    keep = tuple(keep_float)
    return lambda module, name: isinstance(module, types) and not _is_kept(name, keep)


def _check_keep_float(model: nn.Module, keep_float: Iterable[str]) -> None:
    names = {name for name, _ in model.named_modules() if name}
    unknown = [name for name in keep_float if name not in names]
    if unknown:
        raise ValueError(f"keep_float names no module of the model: {unknown}; its modules: {sorted(names)}")


def _require_cpu(ctx: RunContext, backend: str) -> None:
    if ctx.device != "cpu":
        raise ValueError(f"backend {backend} quantizes for the CPU; run it with device=cpu (got {ctx.device})")


def _targets_present(model: nn.Module, config: QuantizeConfig) -> list[str]:
    selected = _selector(config.targets, config.keep_float)
    names = [name for name, module in model.named_modules() if selected(module, name)]
    if not names:
        kept = f" (keep_float: {', '.join(config.keep_float)})" if config.keep_float else ""
        raise ValueError(f"the model has no {', '.join(config.targets)} layers to quantize{kept}")
    return names


@functools.cache
def _lowered_class() -> type:
    import torch
    import torch._inductor.config
    from torch import nn

    class Lowered(nn.Module):
        """A torch.compile'd module, always called with the inductor freezing setting it was compiled with.

        Inductor's ``freezing`` must be set while dynamo traces (it decides there whether weights are
        constants), not only in ``torch.compile(options=...)``, which leaves int8 weights as graph inputs
        that onednn's prepack cannot take. Recompiles happen at later calls (a new batch size in
        evaluation), so the setting travels with every call instead of being changed for the process.
        """

        def __init__(self, compiled: nn.Module, inner: nn.Module, freezing: bool) -> None:
            super().__init__()
            self.compiled = compiled
            self.freezing = freezing
            # save_model follows `slimlab_inner`: the artifact holds the quantized module's weights.
            # Set through object.__setattr__ so that it is not registered as a second submodule.
            object.__setattr__(self, "slimlab_inner", inner)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if torch._inductor.config.freezing == self.freezing:
                return self.compiled(*args, **kwargs)
            with torch._inductor.config.patch(freezing=self.freezing):
                return self.compiled(*args, **kwargs)

    return Lowered


def _compile(model: nn.Module, config: QuantizeConfig, ctx: RunContext, *, dynamic: bool | None) -> nn.Module:
    """torch.compile ``model``; time the first (compiling) call; check it; expose ``model`` as the artifact."""
    import torch

    from slimlab.batches import call, clone
    from slimlab.measure import MeasurementError, check_stable

    lowered = _lowered_class()(torch.compile(model, dynamic=dynamic), model, config.freezing)
    example = ctx.example_inputs()
    x = clone(example)
    with torch.inference_mode():  # as the runner evaluates and times: no recompilation for grad mode
        start = time.perf_counter()
        first = call(lowered, x)
        ctx.metrics["compile_time_s"] = time.perf_counter() - start
    try:  # fail here, at lowering, rather than later while timing
        check_stable(lowered, example, first=first, touched=x, name="the lowered model")
    except MeasurementError as error:
        raise MeasurementError(f"{error} (a known inductor-freezing hazard: try freezing=false)") from None
    ctx.tags["slimlab.quantize.lowering"] = f"torch.compile(dynamic={dynamic}), inductor freezing={config.freezing}"
    return lowered
