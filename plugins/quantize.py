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

import copy
import functools
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimlab import hookimpl
from slimlab.config import Choice, LayerType

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch import nn

    from slimlab.context import RunContext

log = logging.getLogger("slimlab")

# backend -> its schemes, the first one being the default
BACKENDS: dict[str, tuple[str, ...]] = {
    "torchao": ("int8_weight_only", "int8_dynamic", "int4_weight_only", "int8_dynamic_int4", "float8", "sparse_2_4"),
    "pt2e": ("static",),
    "eager": ("dynamic", "static"),
}
LABELS = {
    ("torchao", "int8_weight_only"): "int8-wo",
    ("torchao", "int8_dynamic"): "int8-dyn",
    ("torchao", "int4_weight_only"): "int4-wo",
    ("torchao", "int8_dynamic_int4"): "int8-dyn-int4",
    ("torchao", "float8"): "fp8-dyn",
    ("torchao", "sparse_2_4"): "sparse-2:4",
    ("pt2e", "static"): "pt2e-static",
    ("eager", "dynamic"): "eager-dyn",
    ("eager", "static"): "eager-static",
}
# An enum built from BACKENDS (its members' names are their values: OmegaConf looks members up by name). The
# scheme stays a str: which schemes are valid depends on the backend, and __post_init__ says which.
Backend = Choice("Backend", [(name, name) for name in BACKENDS], module=__name__)


class Granularity(Choice):
    per_channel = "per_channel"
    per_tensor = "per_tensor"


STATIC_TARGETS = ("Linear", "Conv2d")  # static schemes also quantize convolutions
# int4 weights in int8 storage, group-wise along each row (torchao IntxUnpackedToInt8Tensor; dequantized at each
# call on this CPU: smaller, not faster). int8_dynamic_int4 also fake-quantizes the activations per token.
INT4_SCHEMES = ("int4_weight_only", "int8_dynamic_int4")
DEFAULT_GROUP_SIZE = 32
# Schemes that are not per-channel/per-tensor int8 or float8: int4 is group-wise, 2:4 is sparsity.
NO_GRANULARITY = (*INT4_SCHEMES, "sparse_2_4")
ACTIVATION_QPARAMS = "slimlab_activation_qparams"  # pt2e: the graph's activation scales, kept in the state dict


def valid_targets(scheme: str | None) -> tuple[str, ...]:
    """Static schemes, int4 weight-only (torchao's IntxWeightOnlyConfig takes conv weights) and a torchao config
    (``scheme`` None) may also quantize convolutions; the others only Linear layers."""
    return STATIC_TARGETS if scheme in ("static", "int4_weight_only", None) else ("Linear",)


@dataclass
class QuantizeConfig:
    """Which backend quantizes what, and how.

    ``scheme`` and ``compile`` default to the backend's choice: torchao int8_weight_only uncompiled,
    pt2e static compiled, eager dynamic uncompiled. ``config`` (a torchao config as a ``_target_`` node) takes
    the place of ``scheme``.
    """

    backend: Backend = Backend.torchao
    scheme: str | None = None  # per backend, see BACKENDS; None: the backend's first scheme
    targets: list[LayerType] = field(default_factory=lambda: [LayerType.Linear])  # static schemes: also Conv2d
    keep_float: list[str] = field(default_factory=list)  # module names left in float (sensitive layers)
    granularity: Granularity = Granularity.per_channel  # of the weight scales
    embeddings: bool = False  # also nn.Embedding weights: int8 per row (torchao, eager), int4 group-wise (int4)
    # int4 schemes: weights per group of this many along each row (a power of two; None: 32). A layer whose rows
    # are not a multiple of it gets one group per row, named in the tag slimlab.quantize.per_row.
    group_size: int | None = None
    calibration_batches: int = 16  # training minibatches that calibrate the observers (static schemes)
    compile: bool | None = None  # lower with torch.compile; None: pt2e yes, torchao no; eager cannot
    freezing: bool = True  # inductor freezing when compiling: folds and prepacks the int8 weights
    # Any torchao config, applied with quantize_ to the targeted layers (and embeddings=true: nn.Embedding), e.g.
    # {_target_: torchao.quantization.IntxWeightOnlyConfig, weight_dtype: int4,
    #  granularity: {_target_: torchao.quantization.PerGroup, group_size: 64}}; FqnToConfig picks per layer.
    config: Any = None

    def __post_init__(self) -> None:
        # Built from a plain dict (not through OmegaConf), the choices are still strings.
        self.backend = Backend.parse(self.backend, "backend")
        schemes = BACKENDS[self.backend]
        if self.config is not None:
            self._check_ao_config()
        elif self.scheme is None:
            self.scheme = schemes[0]
        self.targets = [LayerType.parse(target, "targets") for target in self.targets]
        self.granularity = Granularity.parse(self.granularity, "granularity")
        if self.scheme not in (*schemes, None):
            raise ValueError(
                f"scheme {self.scheme!r} is not one of backend {self.backend!r}'s schemes: {', '.join(schemes)}"
            )
        allowed = valid_targets(self.scheme)
        unknown = [t for t in self.targets if t not in allowed]
        if not self.targets or unknown:
            raise ValueError(
                f"targets for {self.backend} {self.scheme} must be a non-empty list of {', '.join(allowed)}; "
                f"got {list(self.targets)}"
            )
        if self.granularity != "per_channel" and self.scheme in NO_GRANULARITY:
            raise ValueError(f"granularity applies to int8 and float8 schemes, not {self.scheme} (keep per_channel)")
        if self.scheme in INT4_SCHEMES:
            if self.group_size is None:
                self.group_size = DEFAULT_GROUP_SIZE
            if isinstance(self.group_size, bool) or self.group_size < 1 or self.group_size & (self.group_size - 1):
                raise ValueError(f"group_size must be a positive power of two (32, 64, 128...), got {self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"group_size applies to int4 schemes ({', '.join(INT4_SCHEMES)}), not {self.scheme}")
        if self.embeddings and self.backend == "pt2e":
            raise ValueError("embeddings=true is not supported by backend pt2e (X86InductorQuantizer); use torchao")
        if self.embeddings and self.backend == "eager" and self.granularity != "per_channel":
            raise ValueError("backend eager quantizes embeddings per row only: use granularity=per_channel")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.compile is None:
            self.compile = self.backend == "pt2e"
        if self.compile and self.backend == "eager":
            raise ValueError("compile=true is not supported by backend eager (torch.ao quantized modules)")

    def _check_ao_config(self) -> None:
        """``config`` replaces scheme, granularity and group_size; it must build into a torchao config."""
        if self.backend != "torchao":
            raise ValueError(f"config is a torchao config: it needs backend=torchao, not {self.backend}")
        for option, value, default in (
            ("scheme", self.scheme, None),
            ("granularity", self.granularity, "per_channel"),
            ("group_size", self.group_size, None),
        ):
            if value != default:
                raise ValueError(f"{option}={value} and config are exclusive: the torchao config says how to quantize")
        recipe = build_ao_config(self.config)
        if type(recipe).__name__ == "FqnToConfig":
            if self.keep_float or self.embeddings or list(self.targets) != ["Linear"]:
                raise ValueError(
                    "with FqnToConfig the config picks the layers: leave targets, keep_float and embeddings "
                    "at their defaults (map a layer to null to keep it float)"
                )


def _import_torchao():
    # torchao tries to load its CUDA kernels on import and logs each failure;
    # on a CPU-only machine that is noise, not a problem.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import torchao.quantization

    return torchao.quantization


# --- torchao configs from YAML -------------------------------------------------------------------------------------


def _types_in(hint: Any) -> list[Any]:
    """The classes a type hint admits (``Optional[torch.dtype]`` -> ``[torch.dtype, NoneType]``)."""
    import typing

    args = typing.get_args(hint)
    return [t for arg in args for t in _types_in(arg)] if args else [hint]


def _from_yaml(value: Any, hint: Any, key: str) -> Any:
    """A string where torchao wants a ``torch.dtype`` or an enum member: ``int4`` -> ``torch.int4``, ``symmetric`` ->
    ``MappingType.SYMMETRIC``, ``unpacked_to_int8`` -> ``IntxPackingFormat.UNPACKED_TO_INT8``."""
    import enum

    import torch

    if not isinstance(value, str):
        return value
    types = _types_in(hint)
    if torch.dtype in types:
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{key}={value!r} is not a torch dtype (e.g. int4, int8, bfloat16, float32)")
        return dtype
    for kind in types:
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            for member in kind:
                if value.upper() == member.name or value == member.value:
                    return member
            valid = ", ".join(member.name.lower() for member in kind)
            raise ValueError(f"{key}={value!r} is not a {kind.__name__}; valid: {valid}")
    return value


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _build(node: Any, key: str) -> Any:
    """Call every ``_target_`` in ``node``, innermost first, converting strings its arguments' type hints ask for."""
    import typing

    from hydra.utils import get_object

    if isinstance(node, list | tuple):
        return [_build(item, f"{key}[{i}]") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {name: _build(value, f"{key}.{name}") for name, value in node.items()}
    target = node["_target_"]
    try:
        factory = get_object(str(target))
    except Exception as error:  # Hydra's message names the module it could not import
        raise ValueError(f"{key}._target_={target!r} cannot be imported ({_first_line(error)})") from None
    if not callable(factory):
        raise ValueError(f"{key}._target_={target!r} is not a class or function")
    hints: dict[str, Any] = {}
    for annotated in (factory, getattr(factory, "__init__", None)) if isinstance(factory, type) else (factory,):
        try:  # a dataclass's fields, a class's __init__ or a function's parameters
            hints |= typing.get_type_hints(annotated)
        except Exception:  # unresolvable annotations: the arguments go as written
            pass
    arguments = {
        name: _from_yaml(_build(value, f"{key}.{name}"), hints.get(name), f"{key}.{name}")
        for name, value in node.items()
        if name != "_target_"
    }
    try:
        return factory(**arguments)
    except (TypeError, ValueError, AssertionError, AttributeError) as error:  # torchao validates with asserts
        raise ValueError(f"{key}: {target} refuses these arguments: {_first_line(error)}") from None


def build_ao_config(spec: Any) -> Any:
    """The torchao config a ``config:`` node describes; ValueError (one line, naming the key) if it cannot be one.

    ``spec`` is a mapping with ``_target_`` (Hydra's convention) whose arguments may nest more ``_target_`` nodes
    (``granularity: {_target_: torchao.quantization.PerGroup, group_size: 32}``); strings become torch dtypes or
    torchao enum members where the config's type hints ask for them (``weight_dtype: int4``, ``mapping_type:
    asymmetric``). ``FqnToConfig(fqn_to_config={name or "re:regex": config or null})`` quantizes per layer.
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ValueError(
            "config must be a torchao config node {_target_: torchao.quantization.<Config>, <argument>: ...}; "
            f"got {spec!r}"
        )
    _import_torchao()
    from torchao.core.config import AOBaseConfig

    recipe = _build(spec, "config")
    if not isinstance(recipe, AOBaseConfig):
        raise ValueError(f"config._target_={spec['_target_']!r} is not a torchao config (AOBaseConfig)")
    return recipe


def _ao_recipes(recipe: Any) -> list[Any]:
    """The configs that quantize something: ``recipe`` itself, or each layer's config of an FqnToConfig."""
    if type(recipe).__name__ == "FqnToConfig":
        return [config for config in recipe.fqn_to_config.values() if config is not None]
    return [recipe]


def describe_ao_config(recipe: Any) -> str:
    """``IntxWeightOnlyConfig,int4,g32``: the config's class, weight dtype and granularity, for run names."""
    parts = [type(recipe).__name__]
    dtype = getattr(recipe, "weight_dtype", None)
    if dtype is not None:
        parts.append(str(dtype).removeprefix("torch."))
    granularity = getattr(recipe, "granularity", None) or getattr(recipe, "weight_granularity", None)
    kind = type(granularity).__name__
    if kind == "PerGroup":
        parts.append(f"g{granularity.group_size}")
    elif kind in ("PerAxis", "PerRow"):
        parts.append("per-row")
    elif kind == "PerTensor":
        parts.append("per-tensor")
    return ",".join(parts)


# --- capability probe ---------------------------------------------------------------------------------------------


def _probe_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache
def probe(backend: str, scheme: str, granularity: str, device: str = "cpu") -> str | None:
    """Why ``scheme`` cannot run here (the first line of the error), or None. Tried once per process."""
    import torch
    from torch import nn

    try:
        if backend == "torchao":
            tiny = nn.Sequential(nn.Linear(256, 256)).to(device)
            _torchao_quantize(tiny, scheme, granularity, _selector(("Linear",), ()), DEFAULT_GROUP_SIZE)
            with torch.inference_mode():
                tiny(torch.randn(8, 256, device=device))
        elif backend == "eager":
            if "x86" not in torch.backends.quantized.supported_engines:
                return f"torch has no x86 quantized engine (engines: {torch.backends.quantized.supported_engines})"
            if torch.backends.quantized.engine != "x86":
                return f"the quantized engine is {torch.backends.quantized.engine!r}, not 'x86'"
            import torch.ao.quantization as tq

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's deprecation warning comes with the real run
                tiny = tq.quantize_dynamic(nn.Sequential(nn.Linear(16, 16)), {nn.Linear}, dtype=torch.qint8)
                tiny(torch.randn(2, 16))
        elif backend == "pt2e":
            import platform

            machine = platform.machine().lower()
            if machine not in ("x86_64", "amd64", "i386", "i686"):
                return f"X86InductorQuantizer needs an x86 CPU, this is {machine}"
            if not torch.backends.mkldnn.is_available():
                return "torch was built without oneDNN (mkldnn), which inductor's int8 CPU kernels use"
            _import_torchao()  # quiets its CUDA-kernel load failures first
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer  # noqa: F401
    except Exception as error:  # the reason is the point: report whatever the library raised
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return None


@functools.lru_cache
def probe_config(spec: str, device: str = "cpu") -> str | None:
    """Why the torchao config ``spec`` (JSON) cannot run here, or None: each config it holds quantizes and runs a
    Linear(768, 64) (768: a multiple of every group size up to 256, and of 3, 6, 12...)."""
    import json

    import torch
    from torch import nn

    quantization = _import_torchao()
    try:
        for recipe in _ao_recipes(build_ao_config(json.loads(spec))):
            tiny = nn.Sequential(nn.Linear(768, 64)).to(device)
            quantization.quantize_(tiny, recipe)
            with torch.inference_mode():
                tiny(torch.randn(8, 768, device=device))
    except Exception as error:  # the reason is the point: report whatever the library raised
        return _first_line(error)
    return None


def check(config: QuantizeConfig) -> None:
    """Refuse, before any work, a scheme this machine cannot run: never a silent fallback."""
    if config.config is not None:
        import json

        reason = probe_config(json.dumps(_plain_spec(config.config), sort_keys=True), _probe_device())
        if reason:
            raise ValueError(f"config {describe_ao_config(build_ao_config(config.config))} cannot run here: {reason}")
        return
    reason = probe(config.backend, config.scheme, config.granularity, _probe_device())
    if reason:
        raise ValueError(f"backend {config.backend} scheme {config.scheme} cannot run on this machine: {reason}")


def _plain_spec(spec: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec


# --- shared helpers -----------------------------------------------------------------------------------------------


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


# --- torchao ------------------------------------------------------------------------------------------------------


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


# --- pt2e ---------------------------------------------------------------------------------------------------------


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


# --- eager torch.ao -----------------------------------------------------------------------------------------------


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


# --- technique ----------------------------------------------------------------------------------------------------


def apply(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> nn.Module:
    _check_keep_float(model, config.keep_float)
    if config.backend == "pt2e":
        return _apply_pt2e(model, config, ctx)
    if config.backend == "eager":
        return _apply_eager(model, config, ctx)
    return _apply_torchao(model, config, ctx)


def rebuild(model: nn.Module, config: QuantizeConfig, example: Any) -> nn.Module:
    """The quantized structure of ``model`` under ``config``, ready for ``slimlab.artifact.load_model``.

    ``model`` is a fresh instance of the quantized model's class, ``example`` a batch's inputs (a tensor, a
    tuple or a dict). The recipe
    runs with ``example`` as its only calibration batch; the loaded state then replaces every weight,
    scale and zero point (for pt2e also the activation scales in the graph). Not compiled: compile the
    result to get the int8 kernels back. torchao artifacts load into the plain model directly.
    """
    model.eval()
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
    return f"quantize({','.join(parts)})"


def keeps_module_names(config: QuantizeConfig) -> bool:
    """Whether the quantized model has the module names of its input (a later ``place.device_map`` can use them).

    torchao swaps weights and eager dynamic swaps modules in place; eager static wraps the model
    (``QuantWrapper``), pt2e exports a graph and compiling wraps the result.
    """
    in_place = config.backend == "torchao" or (config.backend == "eager" and config.scheme == "dynamic")
    return in_place and not config.compile


def max_speedup(config: QuantizeConfig) -> float | None:
    """8-bit values are 4x narrower than fp32 (4x is also the VNNI int8 peak); int4 8x; 2:4 halves int8's work.

    None when compiled: the baseline runs in eager mode, and what torch.compile saves besides the arithmetic
    (Python and dispatch overhead, fused elementwise ops) has no fixed bound. None for a torchao config too:
    what it can give depends on the config (int2 weights, float8...).
    """
    if config.compile or config.config is not None:
        return None
    return {"int4_weight_only": 8.0, "int8_dynamic_int4": 8.0, "sparse_2_4": 8.0}.get(config.scheme, 4.0)


@hookimpl
def check_config(cfg, host: bool) -> None:
    """A group-wise torchao ``config`` must divide the rows of the layers it gets: checked before any work on the
    model built on the meta device, when quantize is the first step (after another, the shapes may differ)."""
    from omegaconf import OmegaConf

    from slimlab.errors import ConfigError

    techniques = cfg.get("technique") or {}
    if not techniques or next(iter(techniques)) != "quantize" or techniques.quantize.get("config") is None:
        return
    if OmegaConf.get_type(techniques.quantize) is not QuantizeConfig:  # set by an experiment, not in the pipeline
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
        check=check,
        max_speedup=max_speedup,
        key_params=("backend", "scheme", "granularity", "group_size", "embeddings", "compile"),
        # torch.export cannot hold torch.ao's quantized modules (packed params); pt2e's graph cannot be pickled
        serialization_format=lambda config: "pickle" if config.backend == "eager" else "pt2",
        module_options=("keep_float",),
        keeps_module_names=keeps_module_names,
    )
