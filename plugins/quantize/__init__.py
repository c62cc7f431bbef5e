"""Quantization with three backends: torchao's ``quantize_`` (default), PT2E static int8, eager ``torch.ao``.

- ``torchao``: weights quantized in place as torchao tensor subclasses (int8 weight-only, int8 dynamic
  activations; group-wise int4 weights, alone or with int8 dynamic activations; float8 and 2:4 sparsity where
  the hardware has kernels), optionally lowered with ``torch.compile``. Or any torchao config given as
  ``config: {_target_: torchao.quantization.<Config>, ...}`` (see :func:`build_ao_config`), ``FqnToConfig``
  for per-layer recipes.
- ``pt2e``: static post-training quantization: ``torch.export`` with a dynamic batch dimension,
  ``prepare_pt2e`` with torchao's ``X86InductorQuantizer``, observers calibrated on training batches,
  ``convert_pt2e``, lowered with ``torch.compile`` (inductor freezing: int8 oneDNN kernels).
- ``eager``: ``torch.ao.quantization`` dynamic (``quantize_dynamic``) or static (stubs, fusion, x86
  qconfig, calibrated observers). Deprecated upstream, kept because it is still the fastest int8 path
  on x86 CPUs in eager mode.

A scheme the machine cannot run is refused before any work, with the reason (``check``). Heavy
libraries are imported inside functions so that ``slimlab plugins`` stays torch-free.

To reload a ``model.pt`` written for the ``eager`` or ``pt2e`` backend, rebuild the quantized structure
first: ``load_model(rebuild(LeNet(), config, example_input), "model.pt")`` (see :func:`rebuild`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from slimlab import hookimpl

if TYPE_CHECKING:
    from torch import nn

    from slimlab.context import RunContext


from .ao_config import build_ao_config, describe_ao_config
from .auto import apply_auto
from .capability import check, probe, probe_config
from .eager import _apply_eager, _eager, _warn_eager_deprecated
from .layers import _check_keep_float, _selector
from .options import BACKENDS, INT4_SCHEMES, LABELS, Backend, Granularity, QuantizeConfig, valid_targets
from .ort import apply_ort
from .ort import check as check_ort
from .pt2e import _apply_pt2e, _pt2e_convert, _restore_activation_qparams
from .speed import guard, judge
from .torchao_backend import _apply_torchao, _check_groups_fit

log = logging.getLogger("slimlab")

__all__ = [
    "BACKENDS",
    "INT4_SCHEMES",
    "Backend",
    "Granularity",
    "QuantizeConfig",
    "apply",
    "build_ao_config",
    "check",
    "describe_ao_config",
    "label",
    "max_speedup",
    "probe",
    "probe_config",
    "rebuild",
    "_warn_eager_deprecated",
    "valid_targets",
]


def apply(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> nn.Module:
    """Quantize ``model``; a recipe measured slower than fp32 on this machine is refused unless allow_slower."""
    _check_keep_float(model, config.keep_float)
    if config.backend == "auto":
        chosen, ratio, chosen_label = apply_auto(model, config, ctx, _apply_recipe, _check_recipe, label)
        judge(ratio, "the fastest candidate, measured on the whole model", config, ctx, chosen_label)
        return chosen
    if config.backend == "torchao" or (ctx.device == "cpu" and config.backend in ("pt2e", "eager")):
        guard(model, config, ctx, label(config))  # before the work: timed on copies of the model's layers
    quantized = _apply_recipe(model, config, ctx)
    if config.backend == "ort":  # measured on the whole model, against the torch model it got
        judge(ctx.metrics["ort_speedup"], "measured on the whole model", config, ctx, label(config))
    return quantized


def _apply_recipe(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> nn.Module:
    if config.backend == "pt2e":
        return _apply_pt2e(model, config, ctx)
    if config.backend == "eager":
        return _apply_eager(model, config, ctx)
    if config.backend == "ort":
        return apply_ort(model, config, ctx)
    return _apply_torchao(model, config, ctx)


def _check_recipe(config: QuantizeConfig) -> None:
    """Refuse, before any work, a recipe this machine cannot run (auto: each candidate, when it is tried)."""
    if config.backend == "ort":
        check_ort(config)
    elif config.backend != "auto":
        check(config)


def rebuild(model: nn.Module, config: QuantizeConfig, example: Any) -> nn.Module:
    """The quantized structure of ``model`` under ``config``, ready for ``slimlab.artifact.load_model``.

    ``model`` is a fresh instance of the quantized model's class, ``example`` a batch's inputs (a tensor, a
    tuple or a dict). The recipe
    runs with ``example`` as its only calibration batch; the loaded state then replaces every weight,
    scale and zero point (for pt2e also the activation scales in the graph). Not compiled: compile the
    result to get the int8 kernels back. torchao artifacts load into the plain model directly.
    """
    model.eval()
    if config.backend in ("ort", "auto"):
        raise ValueError(
            f"backend {config.backend}'s artifact cannot be rebuilt from the config: an ort model is model.onnx "
            "(load it with onnxruntime or mlflow.onnx); for auto, rebuild with the recipe in the tag "
            "slimlab.quantize.auto"
        )
    if config.backend == "torchao":
        return model
    if config.backend == "eager":
        return _eager(model, config, [example], example)[0]
    converted = _pt2e_convert(model, config, example, [example])
    converted.register_load_state_dict_post_hook(_restore_activation_qparams)
    return converted


def label(config: QuantizeConfig) -> str:
    if config.config is not None:
        parts = [describe_ao_config(build_ao_config(config.config))]
    else:
        parts = [LABELS[(config.backend, config.scheme)]]
    if config.group_size is not None:
        parts.append(f"g{config.group_size}")
    if config.granularity == "per_tensor":
        parts.append("per-tensor")
    if config.embeddings:
        parts.append("emb")
    if config.compile and config.backend != "pt2e":
        parts.append("compiled")
    if not config.compile and config.backend == "pt2e":
        parts.append("uncompiled")
    if config.compile and not config.freezing:
        parts.append("no-freezing")
    if config.backend == "auto":  # what auto chooses from, and how close to fp32 the choice must stay
        parts += ["own candidates"] if config.candidates is not None else []
        parts += [f"min_cosine={config.min_cosine:g}"] if config.min_cosine != QuantizeConfig.min_cosine else []
    return f"quantize({','.join(parts)})"


def keeps_module_names(config: QuantizeConfig) -> bool:
    """Whether the quantized model has the module names of its input (a later ``place.device_map`` can use them).

    torchao swaps weights and eager dynamic swaps modules in place; eager static wraps the model
    (``QuantWrapper``), pt2e exports a graph and compiling wraps the result.
    """
    if config.backend in ("ort", "auto"):
        return False
    in_place = config.backend == "torchao" or (config.backend == "eager" and config.scheme == "dynamic")
    return in_place and not config.compile


def max_speedup(config: QuantizeConfig) -> float | None:
    """8-bit values are 4x narrower than fp32 (4x is also the VNNI int8 peak); int4 8x; 2:4 halves int8's work.

    None when compiled: the baseline runs in eager mode, and what torch.compile saves besides the arithmetic
    (Python and dispatch overhead, fused elementwise ops) has no fixed bound. None for a torchao config too:
    what it can give depends on the config (int2 weights, float8...).
    """
    if config.compile or config.config is not None or config.backend in ("ort", "auto"):
        return None  # ort, auto: ONNX Runtime's fp32 alone can beat torch eager
    return {"int4_weight_only": 8.0, "int8_dynamic_int4": 8.0, "sparse_2_4": 8.0}.get(config.scheme, 4.0)


@hookimpl
def check_config(cfg, host: bool) -> None:
    """Backends ort and auto must be the last step. A group-wise torchao ``config`` must divide the rows of the
    layers it gets: checked before any work on the model built on the meta device, when quantize is the first
    step (after another, the shapes may differ)."""
    from omegaconf import OmegaConf

    from slimlab.errors import ConfigError

    techniques = cfg.get("technique") or {}
    node = techniques.get("quantize") if techniques else None
    if node is None or OmegaConf.get_type(node) is not QuantizeConfig:  # not in this run's pipeline
        return
    if node.backend in ("ort", "auto") and list(techniques)[-1] != "quantize":
        after = list(techniques)[list(techniques).index("quantize") + 1 :]
        raise ConfigError(
            f"technique.quantize.backend={node.backend} deploys an ONNX Runtime model or the fastest recipe found "
            f"here, which {', '.join(after)} cannot take: put quantize last"
        )
    if next(iter(techniques)) != "quantize" or node.get("config") is None:
        return
    try:
        config = OmegaConf.to_object(techniques.quantize)
        recipe = build_ao_config(config.config)
    except (ValueError, TypeError):  # the pipeline has refused it already
        return
    if type(recipe).__name__ == "FqnToConfig":
        return
    model = _meta_model(cfg.model)
    if model is None:
        return
    try:
        _check_groups_fit(model, _selector(config.targets, config.keep_float), recipe)
    except ValueError as error:
        raise ConfigError(f"technique.quantize.config: {error}") from None


def _meta_model(node) -> nn.Module | None:
    """The model a config builds, on the meta device (shapes, no weights), or None if it cannot be built so."""
    import torch
    from omegaconf import OmegaConf

    from slimlab.baseline import build_model

    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    plain.pop("checkpoint", None)  # weights do not change shapes
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return build_model(plain)
    except Exception as error:  # the run builds it again and says what is wrong
        log.debug("quantize: building the model on the meta device failed: %s", error)
        return None


@hookimpl
def register_techniques(register) -> None:
    # int8 weights cannot be pruned or fine-tuned further; only placing the finished model may follow.
    register(
        "quantize",
        QuantizeConfig,
        apply,
        label=label,
        followed_by=("place",),
        check=_check_recipe,
        max_speedup=max_speedup,
        key_params=("backend", "scheme", "granularity", "group_size", "embeddings", "compile", "allow_slower"),
        # torch.export cannot hold torch.ao's quantized modules (packed params); pt2e's graph cannot be pickled
        # (ort: an ONNX file, logged with mlflow.onnx; auto: pt2, pickle if the chosen model cannot be exported)
        serialization_format=lambda config: "pickle" if config.backend == "eager" else "pt2",
        module_options=("keep_float",),
        keeps_module_names=keeps_module_names,
        # allow_slower decides whether a slow recipe runs, not what it gives
        label_shows=("backend", "scheme", "config", "group_size", "granularity", "embeddings", "compile", "freezing",
                     "allow_slower", "candidates", "min_cosine"),
    )  # fmt: skip
