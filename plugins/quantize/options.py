"""What the quantize technique takes: backends, their schemes, and the options (``QuantizeConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from slimlab.config import Choice, LayerType

from .ao_config import build_ao_config

# backend -> its schemes, the first one being the default
BACKENDS: dict[str, tuple[str, ...]] = {
    "torchao": ("int8_weight_only", "int8_dynamic", "int4_weight_only", "int8_dynamic_int4", "float8", "sparse_2_4"),
    "pt2e": ("static",),
    "eager": ("dynamic", "static"),
    # ONNX Runtime's own quantize_dynamic / quantize_static on the exported model, run by ONNX Runtime
    "ort": ("dynamic", "static"),
    # each of ``candidates`` tried on the run's model; the fastest whose outputs keep ``min_cosine`` is kept
    "auto": ("fastest",),
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
    ("ort", "dynamic"): "ort-int8-dyn",
    ("ort", "static"): "ort-int8-static",
    ("auto", "fastest"): "auto",
}
# What quantize=auto tries when ``candidates`` is not given: every int8 path of every backend that can be fast on
# a CPU. Which wins depends on the machine (VNNI or not) and the model.
DEFAULT_CANDIDATES = (
    {"backend": "torchao", "scheme": "int8_dynamic", "compile": True},
    {"backend": "pt2e", "scheme": "static"},
    {"backend": "eager", "scheme": "dynamic"},
    {"backend": "ort", "scheme": "dynamic"},
    {"backend": "ort", "scheme": "dynamic", "granularity": "per_tensor"},
)
# What a candidate takes from the auto config unless it says otherwise.
SHARED_OPTIONS = ("targets", "keep_float", "embeddings", "calibration_batches")
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
    # A recipe measured slower than fp32 on this machine is refused (speed.py); true: run it anyway, flagged.
    allow_slower: bool = False
    # auto: the recipes to try, each a mapping of these options (default DEFAULT_CANDIDATES)
    candidates: Any = None
    # auto: the least cosine similarity of a candidate's outputs to the fp32 model's, on calibration batches, to be kept
    min_cosine: float = 0.99

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
        if self.compile and self.backend in ("eager", "ort", "auto"):
            raise ValueError(f"compile=true is not supported by backend {self.backend}")
        if self.backend == "ort":
            if self.keep_float:
                raise ValueError("keep_float is not supported by backend ort (ONNX node names are not module names)")
            if self.embeddings and self.scheme == "static":
                raise ValueError("embeddings=true is not supported by backend ort scheme static; use scheme dynamic")
        if self.candidates is not None and self.backend != "auto":
            raise ValueError(f"candidates apply to backend auto, not {self.backend}")
        if not 0 < self.min_cosine <= 1:
            raise ValueError(f"min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.backend == "auto":
            self.candidate_configs()  # each must be a valid recipe

    def candidate_configs(self) -> list[QuantizeConfig]:
        """auto: the recipes to try, with the options they share with this config."""
        from omegaconf import OmegaConf

        given = self.candidates
        if OmegaConf.is_config(given):
            given = OmegaConf.to_container(given, resolve=True)
        given = DEFAULT_CANDIDATES if given is None else given
        if not isinstance(given, list | tuple) or not given:
            raise ValueError(f"candidates must be a non-empty list of recipes like {dict(DEFAULT_CANDIDATES[0])}")
        shared = {name: getattr(self, name) for name in SHARED_OPTIONS}
        recipes = []
        for index, candidate in enumerate(given):
            if not isinstance(candidate, dict) or candidate.get("backend") in (None, "auto"):
                raise ValueError(f"candidates[{index}] must be a mapping with a backend other than auto")
            unknown = sorted(set(candidate) - {f.name for f in fields(QuantizeConfig)})
            if unknown:
                raise ValueError(f"candidates[{index}] has unknown options {unknown}")
            try:
                recipes.append(QuantizeConfig(**(shared | candidate)))
            except (ValueError, TypeError) as error:
                raise ValueError(f"candidates[{index}]: {error}") from None
        return recipes

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
