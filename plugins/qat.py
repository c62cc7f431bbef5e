"""Quantization-aware training (torchao's QAT flow): fake-quantize, fine-tune, convert.

``prepare`` puts fake quantization on the targeted weights (and, with ``activations=int8``, on the Linear
layers' inputs, per token) with torchao's ``QATConfig(base_config, step="prepare")``: the forward pass sees the
rounded values, the gradients pass straight through, so the weights move to where rounding hurts least.
The model is then fine-tuned for ``epochs`` on the run's training split (the run's training loop), and
``QATConfig(base_config, step="convert")`` quantizes it for real with the same base config as a post-training
``quantize_`` would (``IntxWeightOnlyConfig``, or ``Int8DynamicActivationIntxWeightConfig`` with int8
activations): the converted model computes exactly what the fake-quantized one did.

torchao's QATConfig swaps Linear (and Embedding) layers only. Conv2d weights get the same fake quantizer
(torchao's ``IntxFakeQuantizer``, grouped along the input channels as ``IntxWeightOnlyConfig`` groups them)
through a parametrization, and are converted by the same ``quantize_``. Per-tensor scales are not offered:
torchao's fake quantizer has none (per group, per channel, per token).

Layers whose rows are not a multiple of ``group_size`` get one scale per row; a row of one value (a
convolution with one input channel) stays float, as ``quantize`` does. Weights that are exactly zero in the
incoming model (pruning removed its masks) are held at zero while fine-tuning and stay zero once converted.
``control=true`` also measures post-training quantization with the same recipe, in the same run: of the incoming
model (``ptq_<metric>``, what ``quantize`` gives) and of a twin fine-tuned in float for the same epochs, seed and
lr (``tuned_ptq_<metric>``); ``qat_gain`` is QAT's score against the latter (positive: QAT beats PTQ, not
merely thanks to the extra epochs).
Not faster: on a CPU without torchao's low-bit kernels the weights are dequantized at every call.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimlab import hookimpl
from slimlab.config import Choice, LayerType

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import nn

    from slimlab.context import RunContext

log = logging.getLogger("slimlab")


class Weights(Choice):
    int2 = "int2"
    int4 = "int4"
    int8 = "int8"


class Activations(Choice):
    none = "none"
    int8 = "int8"  # dynamic, per token, asymmetric (torchao Int8DynamicActivationIntxWeightConfig)


class Granularity(Choice):
    per_group = "per_group"  # one scale per `group_size` weights along each row
    per_channel = "per_channel"  # one scale per output row


DEFAULT_GROUP_SIZE = 32
BITS = {"int2": 2, "int4": 4, "int8": 8}


@dataclass
class QatConfig:
    """Which weights are fake-quantized while fine-tuning, how, and for how long."""

    weights: Weights = Weights.int4
    activations: Activations = Activations.none  # int8: Linear inputs fake-quantized per token (Linear targets only)
    granularity: Granularity = Granularity.per_group  # no per_tensor: torchao's QAT fake quantizer has none
    group_size: int | None = None  # per_group only: a power of two; None: 32
    targets: list[LayerType] = field(default_factory=lambda: [LayerType.Linear])
    epochs: int = 1  # of fine-tuning with fake quantization
    lr: float = 1e-4  # LeNet on digits: 1e-4 recovered int2 accuracy, the training lr (1e-3) lost 1 point
    control: bool = False  # also measure PTQ with the same recipe: ptq_<metric>, tuned_ptq_<metric>, qat_gain

    def __post_init__(self) -> None:
        # Built from a plain dict (not through OmegaConf), the choices are still strings.
        self.weights = Weights.parse(self.weights, "weights")
        self.activations = Activations.parse(self.activations, "activations")
        self.granularity = Granularity.parse(self.granularity, "granularity")
        self.targets = [LayerType.parse(target, "targets") for target in self.targets]
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be a non-empty list of distinct Linear, Conv2d; got {list(self.targets)}")
        if self.activations == "int8" and "Conv2d" in self.targets:
            raise ValueError(
                "activations=int8 fake-quantizes Linear inputs only (torchao's Int8DynamicActivationIntxWeightConfig "
                "quantizes Linear layers): use targets=[Linear], or activations=none for Conv2d weights"
            )
        if self.granularity == "per_group":
            if self.group_size is None:
                self.group_size = DEFAULT_GROUP_SIZE
            size = self.group_size
            if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size & (size - 1):
                raise ValueError(f"group_size must be a power of two >= 2 (16, 32, 64...), got {size}")
        elif self.group_size is not None:
            raise ValueError(f"group_size applies to granularity=per_group, not {self.granularity} (leave it unset)")
        if isinstance(self.epochs, bool) or self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (QAT is fake-quantized fine-tuning), got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def _torchao():
    # torchao tries to load its CUDA kernels on import and logs each failure; on a CPU-only machine that is noise.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import torchao.quantization

    return torchao.quantization


# --- the recipe, layer by layer --------------------------------------------------------------------------------


@dataclass
class Plan:
    """Each targeted layer's scale granularity (``None``: stays float), by module name."""

    layers: dict[str, Any]
    per_row: list[str]  # per_group asked, rows not a multiple of group_size: one scale per row
    left_float: list[str]  # rows of one value


def _plan(model: nn.Module, config: QatConfig) -> Plan:
    from torch import nn

    quantization = _torchao()
    types = tuple(getattr(nn, name) for name in config.targets)
    layers: dict[str, Any] = {}
    per_row, left_float = [], []
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        width = module.weight.shape[1]  # Linear in_features, Conv2d in_channels/groups: what a group splits
        if width == 1:  # a scale per weight would outweigh the weight, and torchao cannot build it
            layers[name] = None
            left_float.append(name)
        elif config.granularity == "per_group" and width % config.group_size == 0:
            layers[name] = quantization.PerGroup(config.group_size)
        else:
            layers[name] = quantization.PerAxis(0)
            if config.granularity == "per_group":
                per_row.append(name)
    if not layers:
        raise ValueError(f"the model has no {', '.join(config.targets)} layers to quantize")
    if all(granularity is None for granularity in layers.values()):
        raise ValueError(f"no layer of this model can be quantized (rows of one value: {', '.join(left_float)})")
    return Plan(layers, per_row, left_float)


def _base_config(config: QatConfig, granularity: Any) -> Any:
    """The post-training config that convert applies (and whose fake quantization prepare inserts)."""
    import torch

    quantization = _torchao()
    dtype = getattr(torch, str(config.weights))
    if config.activations == "int8":
        return quantization.Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    return quantization.IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def _by_granularity(model: nn.Module, plan: Plan, kind: type) -> list[tuple[Any, set[str]]]:
    """The planned layers of type ``kind``, grouped by granularity (one ``quantize_`` call each)."""
    groups: dict[str, tuple[Any, set[str]]] = {}
    for name, granularity in plan.layers.items():
        if granularity is not None and isinstance(model.get_submodule(name), kind):
            groups.setdefault(repr(granularity), (granularity, set()))[1].add(name)
    return list(groups.values())


def _quantize(model: nn.Module, plan: Plan, config: QatConfig, step: str | None) -> None:
    """``quantize_`` the planned layers: ``step`` None is post-training quantization, else QATConfig's step."""
    from torch import nn
    from torchao.quantization.qat import QATConfig

    quantization = _torchao()
    kinds = (nn.Linear,) if step == "prepare" else (nn.Linear, nn.Conv2d)  # convs are prepared by _fake_quantize_convs
    for kind in kinds:
        for granularity, names in _by_granularity(model, plan, kind):
            base = _base_config(config, granularity)
            recipe = base if step is None or kind is nn.Conv2d else QATConfig(base, step=step)
            quantization.quantize_(model, recipe, filter_fn=lambda _, name, names=names: name in names)


# --- Conv2d: torchao's fake quantizer through a parametrization ------------------------------------------------


@functools.cache
def _conv_fake_quantize_class() -> type:
    from torch import nn

    class ConvWeightFakeQuantize(nn.Module):
        """A Conv2d weight (out, in, kh, kw) fake-quantized in groups along ``in``, as IntxWeightOnlyConfig's
        block (1, group, 1, 1) quantizes it; pruned weights (``mask`` zero) held at zero."""

        def __init__(self, quantizer: nn.Module, mask: torch.Tensor | None) -> None:
            super().__init__()
            self.quantizer = quantizer
            self.register_buffer("mask", mask)

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            if self.mask is not None:
                weight = weight * self.mask
            out, channels, height, width = weight.shape
            rows = weight.permute(0, 2, 3, 1).reshape(-1, channels)
            return self.quantizer(rows).reshape(out, height, width, channels).permute(0, 3, 1, 2)

    return ConvWeightFakeQuantize


def _fake_quantize_convs(model: nn.Module, plan: Plan, config: QatConfig, masks: dict[str, torch.Tensor]) -> list:
    import torch
    import torch.nn.utils.parametrize as parametrize
    from torch import nn
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    prepared = []
    for name, granularity in plan.layers.items():
        module = model.get_submodule(name)
        if granularity is None or not isinstance(module, nn.Conv2d):
            continue
        dtype = getattr(torch, str(config.weights))
        quantizer = IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype=dtype, granularity=granularity, is_symmetric=True))
        parametrize.register_parametrization(
            module, "weight", _conv_fake_quantize_class()(quantizer, masks.pop(name, None))
        )
        prepared.append(module)
    return prepared


def _unparametrize(convs: list) -> None:
    """The trained float weight back in place (masked), ready for the real quantization."""
    import torch
    import torch.nn.utils.parametrize as parametrize

    for module in convs:
        mask = module.parametrizations.weight[0].mask
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        if mask is not None:
            with torch.no_grad():
                module.weight.mul_(mask)


# --- pruned weights stay zero ----------------------------------------------------------------------------------


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where each Linear/Conv2d weight is exactly zero (pruning): ``{module name: mask of the weights kept}``."""
    from torch import nn

    return {
        name: module.weight.detach().ne(0)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d) and bool(module.weight.detach().eq(0).any())
    }


def _hold(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """torch's pruning masks on the remaining weights: applied at every forward, so training keeps zeros zero."""
    import torch.nn.utils.prune as prune

    held = []
    for name, mask in masks.items():
        module = model.get_submodule(name)
        prune.custom_from_mask(module, "weight", mask=mask)
        held.append(module)
    return held


def _release(held: list) -> None:
    import torch.nn.utils.prune as prune

    for module in held:
        prune.remove(module, "weight")  # a plain weight again (the zeros in it), no weight_orig / weight_mask


# --- technique -------------------------------------------------------------------------------------------------


def _train_quantized(model: nn.Module, plan: Plan, config: QatConfig, train: Callable[[nn.Module], None]) -> list[str]:
    """Prepare (fake quantization), ``train(model)``, convert (real quantization), in place; the layers whose zeros
    were held."""
    masks = _zero_masks(model)
    held_names = sorted(masks)
    _quantize(model, plan, config, "prepare")
    convs = _fake_quantize_convs(model, plan, config, masks)  # takes the convs' masks into their parametrization
    held = _hold(model, masks)
    train(model)
    _release(held)
    _unparametrize(convs)
    _quantize(model, plan, config, "convert")
    model.eval()
    return held_names


def _controls(model: nn.Module, plan: Plan, config: QatConfig, ctx: RunContext, train) -> dict[str, float]:
    """Post-training quantization with the same recipe: of the incoming model (what ``quantize`` gives), and of a
    twin fine-tuned in float for the same epochs (so QAT's gain is not the extra training's)."""
    primary = ctx.task.primary_metric
    ptq = copy.deepcopy(model)
    _quantize(ptq, plan, config, None)
    scores = {f"ptq_{primary}": ctx.evaluate(ptq)}
    tuned = copy.deepcopy(model)
    held = _hold(tuned, _zero_masks(tuned))
    train(tuned, "float twin")
    _release(held)
    _quantize(tuned, plan, config, None)
    scores[f"tuned_ptq_{primary}"] = ctx.evaluate(tuned.eval())
    return scores


def apply(model: nn.Module, config: QatConfig, ctx: RunContext) -> nn.Module:
    import torch

    plan = _plan(model, config)

    def fine_tune(prepared: nn.Module, what: str = "fine-tune") -> None:
        torch.manual_seed(ctx.cfg.seed)  # the QAT model and its float twin see the same randomness
        ctx.fine_tune(prepared, config.epochs, lr=config.lr, description=f"qat: {label(config)} {what}")

    controls = _controls(model, plan, config, ctx, fine_tune) if config.control else {}
    held = _train_quantized(model, plan, config, fine_tune)
    if plan.per_row:
        ctx.tags["slimlab.qat.per_row"] = ", ".join(plan.per_row)
    if plan.left_float:
        ctx.tags["slimlab.qat.left_float"] = ", ".join(plan.left_float)
    if held:
        ctx.tags["slimlab.qat.held_zeros"] = ", ".join(held)[:5000]
    ctx.tags["slimlab.qat.kernel"] = (
        f"{config.weights} values stored in int8 and dequantized to float at every call (torchao "
        "IntxUnpackedToInt8Tensor has no low-bit kernel here): a smaller file, not a faster model"
    )
    if controls:
        primary = ctx.task.primary_metric
        score, tuned = ctx.evaluate(model), controls[f"tuned_ptq_{primary}"]
        ctx.metrics |= controls
        ctx.metrics["qat_gain"] = gain = ctx.task.drop(score, tuned)  # positive: QAT beats PTQ after equal training
        log.info(
            "qat: %s=%.4f; post-training quantization %.4f, after %d float epoch(s) %.4f (gain %+.4f)",
            primary, score, controls[f"ptq_{primary}"], config.epochs, tuned, gain,
        )  # fmt: skip
    return model


def label(config: QatConfig) -> str:
    kind = f"int8-dyn-{config.weights}" if config.activations == "int8" else f"{config.weights}-wo"
    parts = [kind, f"g{config.group_size}" if config.granularity == "per_group" else "per-channel"]
    if config.epochs != QatConfig.epochs:
        parts.append(f"{config.epochs}ep")
    return f"qat({','.join(parts)})"


def max_speedup(config: QatConfig) -> float:
    """Weights 32/bits times narrower than fp32: the bound ``quantize`` uses (int8 4x, int4 8x)."""
    return 32 / BITS[config.weights]


@functools.lru_cache
def probe(weights: str, activations: str, conv: bool) -> str | None:
    """Why this QAT recipe cannot run here (the first line of the error), or None: prepare, a training step,
    convert and a call on a tiny model, once per process."""
    import torch
    from torch import nn

    layers = [nn.Conv2d(2, 4, 3), nn.Flatten()] if conv else []
    tiny = nn.Sequential(*layers, nn.Linear(64 if conv else 8, 64), nn.Linear(64, 4))
    targets = ["Linear", "Conv2d"] if conv else ["Linear"]
    config = QatConfig(weights=weights, activations=activations, targets=targets, granularity="per_channel")
    x = torch.randn(2, 2, 6, 6) if conv else torch.randn(2, 8)
    try:
        _train_quantized(tiny, _plan(tiny, config), config, lambda prepared: prepared(x).sum().backward())
        with torch.inference_mode():
            tiny(x)
    except Exception as error:  # the reason is the point: report whatever the library raised
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return None


def check(config: QatConfig) -> None:
    """Refuse, before any work, a recipe this machine cannot run."""
    reason = probe(str(config.weights), str(config.activations), "Conv2d" in config.targets)
    if reason:
        raise ValueError(f"qat {label(config)} cannot run on this machine: {reason}")


@hookimpl
def register_techniques(register) -> None:
    # Converted weights are torchao tensor subclasses: nothing can prune or fine-tune them; only place may follow.
    register(
        "qat",
        QatConfig,
        apply,
        label=label,
        followed_by=("place",),
        check=check,
        max_speedup=max_speedup,
        key_params=("weights", "activations", "granularity", "group_size", "epochs", "lr"),
        keeps_module_names=True,  # layers are swapped back and quantized in place: the names stay
        label_shows=("weights", "activations", "granularity", "group_size", "epochs", "control"),
    )
