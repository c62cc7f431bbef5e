"""ONNX export and ONNX Runtime: the model as a user would deploy it outside PyTorch, measured like any other.

The model this technique gets is exported with ``torch.onnx.export`` (the dynamo exporter where it works,
else the TorchScript one; the run's tag ``slimlab.onnx.exporter`` says which) with a dynamic batch dimension
(and sequence dimension for token inputs), optionally quantized by ONNX Runtime's own tools
(``quantize_dynamic``, or ``quantize_static`` calibrated on training batches), and returned as a module that
runs an ``InferenceSession`` on the CPU. The run's latency, fidelity and size are then ONNX Runtime's, by
the same protocol as every run; the technique also reports ``ort_latency_ms`` and ``ort_speedup``: the
exported model against the torch model it got, timed side by side.

``params`` of the deployed model are the elements of the ONNX initializers that hold weights: float ones, and
quantized ones (int8 weights, int32 biases) counted as the weights they stand for, without their scales and
zero points, the exporter's scalar constants, or integer constants (shapes, indices). A quantized value
counts as zero when it equals its zero point. Initializers are named after the torch parameters they hold
(matched by value, transposed or not), so per-layer sparsity reads like the torch model's.

Exporting is the deployment step: nothing may follow it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slimlab import hookimpl
from slimlab.config import Choice

if TYPE_CHECKING:
    from collections.abc import Iterator

    from omegaconf import DictConfig
    from torch import nn

    from slimlab.context import RunContext

log = logging.getLogger("slimlab")
INSTALL = "pip install slimlab[onnx]"
TS_OPSET = 17  # the TorchScript exporter's opset: what ONNX Runtime's quantization tools handle best
STATIC_OPS = ["MatMul", "Gemm", "Conv"]  # what quantize=static quantizes (weights and their input activations)
SEQUENCE_DIM = 1  # of integer (token) inputs: input_ids, attention_mask, token_type_ids
# Quantized weights: (op, input index of the integer weight, of its zero point, the axis of per-channel ones)
QUANTIZED_INPUTS = (
    ("DequantizeLinear", 0, 2, 1),  # the axis attribute, 1 if unset
    ("MatMulInteger", 0, 2, 0),
    ("MatMulInteger", 1, 3, -1),  # B is [in, out]: a zero point per output column
    ("ConvInteger", 0, 2, 0),
    ("ConvInteger", 1, 3, 0),  # a zero point per output channel
)


class Quantize(Choice):
    none = "none"
    dynamic = "dynamic"  # onnxruntime.quantization.quantize_dynamic, its defaults: int8 weights (embeddings too)
    static = "static"  # quantize_static (QDQ): int8 weights and inputs of STATIC_OPS, calibrated on training batches


class Granularity(Choice):  # of the int8 weight scales; quantize's option of the same name and values
    per_tensor = "per_tensor"  # ONNX Runtime's default
    per_channel = "per_channel"


class Exporter(Choice):
    auto = "auto"  # dynamo, falling back to torchscript
    dynamo = "dynamo"
    torchscript = "torchscript"


@dataclass
class OnnxConfig:
    """How the model is exported and what ONNX Runtime's quantization does to it."""

    quantize: Quantize = Quantize.none
    granularity: Granularity = Granularity.per_tensor
    reduce_range: bool = False  # 7-bit weights: avoids u8s8 overflow on CPUs without VNNI (AVX2, AVX-512F)
    calibration_batches: int = 16  # static: training minibatches that calibrate the activation ranges
    exporter: Exporter = Exporter.auto

    def __post_init__(self) -> None:
        # Built from a plain dict (not through OmegaConf), the choices are still strings.
        self.quantize = Quantize.parse(self.quantize, "quantize")
        self.granularity = Granularity.parse(self.granularity, "granularity")
        self.exporter = Exporter.parse(self.exporter, "exporter")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.quantize == "none" and (self.granularity != "per_tensor" or self.reduce_range):
            raise ValueError("granularity and reduce_range apply to quantize=dynamic or static, not none")


def label(config: OnnxConfig) -> str:
    details = ["fp32" if config.quantize == "none" else f"int8 {config.quantize}"]
    details += [str(config.granularity)] if config.granularity != "per_tensor" else []
    details += ["reduce_range"] if config.reduce_range else []
    if config.exporter != "auto":
        details.append(str(config.exporter))
    return f"onnx({','.join(details)})"


def max_speedup(config: OnnxConfig) -> float | None:
    """None: the bound of int8 arithmetic is against fp32 in the same runtime, and ONNX Runtime's fp32 itself
    can beat torch eager (fused ops, no Python dispatch), which is what the run's speedup divides by."""
    return None


def check(config: OnnxConfig) -> None:
    """Refuse, before any work, what this environment cannot do: never a silent fallback."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if config.exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        missing.append("onnxscript")  # the dynamo exporter builds its graph with it
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed: {INSTALL}")


@hookimpl
def check_config(cfg: DictConfig, host: bool) -> None:
    """ONNX Runtime runs here on its CPU provider: a run on another device would compare unlike things."""
    from omegaconf import OmegaConf

    from slimlab.errors import ConfigError

    node = (cfg.get("technique") or {}).get("onnx")
    if node is None or OmegaConf.get_type(node) is not OnnxConfig:  # not in this run's pipeline
        return
    if cfg.artifact.codec != "none":  # the file must stay an ONNX file that ONNX Runtime and mlflow.onnx load
        raise ConfigError(
            f"artifact.codec={cfg.artifact.codec} cannot code an ONNX model file (it must load as it is); "
            "use artifact.codec=none with technique onnx"
        )
    if not host:
        return
    from slimlab.runner import resolve_device

    device = resolve_device(cfg.device.name)
    if device != "cpu":
        raise ConfigError(
            f"technique onnx runs the model on ONNX Runtime's CPU provider, but device={cfg.device.name} "
            f"resolves to {device} here; valid: device=cpu"
        )


# --- inputs -------------------------------------------------------------------------------------------------------


def input_names(inputs: Any) -> list[str]:
    """The ONNX graph's input names: a dict's keys, ``input_<i>`` for positional inputs, ``input`` for one."""
    import torch

    if isinstance(inputs, dict):
        return [str(name) for name in inputs]
    if isinstance(inputs, torch.Tensor):
        return ["input"]
    return [f"input_{i}" for i in range(len(inputs))]


def _positional(inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(inputs, dict):
        return tuple(inputs.values())
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _dynamic_dims(tensor: Any) -> dict[int, str]:
    """Batch everywhere; sequence too for integer inputs of two or more dimensions (token ids, masks)."""
    dims = {0: "batch"}
    if not tensor.is_floating_point() and tensor.dim() > SEQUENCE_DIM:
        dims[SEQUENCE_DIM] = "sequence"
    return dims


def _feeds(names: list[str], inputs: Any) -> dict[str, Any]:
    """Inputs as ONNX Runtime takes them: numpy arrays by input name."""
    import numpy as np

    values = _positional(inputs)
    if len(values) != len(names):
        raise ValueError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), got {len(values)}")
    return {name: np.ascontiguousarray(value.detach().cpu().numpy()) for name, value in zip(names, values, strict=True)}


# --- export -------------------------------------------------------------------------------------------------------


@functools.cache
def _exported_class() -> type:
    """A module that takes the inputs positionally and returns one tensor, which both exporters can trace."""
    from torch import nn

    from slimlab.batches import output_tensor

    class Exported(nn.Module):
        def __init__(self, inner: nn.Module, names: list[str] | None) -> None:
            super().__init__()
            self.inner, self.names = inner, names

        def forward(self, *args: Any) -> Any:
            output = self.inner(**dict(zip(self.names, args, strict=True))) if self.names else self.inner(*args)
            return output_tensor(output)  # a Hugging Face output: its logits / last hidden state

    return Exported


def export(model: nn.Module, inputs: Any, exporter: str) -> tuple[bytes, str, str | None]:
    """``model`` as ONNX bytes; which exporter made them, and why dynamo did not (auto), if it did not."""
    import io

    import torch

    names = input_names(inputs)
    wrapped = _exported_class()(model, names if isinstance(inputs, dict) else None)
    args = _positional(inputs)
    was_training = model.training
    # Both exporters put the module back in the mode they found it in, recursively: a fresh wrapper is in
    # training mode and would leave the model training (dropout on). Trace and leave it in eval mode.
    wrapped.eval()
    reason = None
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings: not the user's
            if exporter in ("auto", "dynamo"):
                try:
                    # auto: what a failed attempt prints (torch.export's partial graphs on stderr, guard warnings)
                    # is noise beside the fallback; its reason is logged below
                    auto = exporter == "auto"
                    stderr = contextlib.redirect_stderr(io.StringIO()) if auto else contextlib.nullcontext()
                    with stderr, _logs_at(ERROR_ONLY if auto else QUIET):
                        return _export_dynamo(wrapped, args, names), "dynamo", None
                except Exception as error:
                    if exporter == "dynamo":
                        raise
                    reason = _reason(error)
                    log.warning("onnx: the dynamo exporter failed (%s); using the TorchScript exporter", reason)
            return _export_torchscript(wrapped, args, names), "torchscript", reason
    finally:
        model.train(was_training)


# Loggers quieted while exporting: their per-pass progress (INFO) and torch.onnx's note that torchvision's ops are
# not registered; with exporter=auto, also torch's own, whose warnings and graph dumps a failed attempt prints.
QUIET = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx": logging.ERROR}
ERROR_ONLY = {**QUIET, "torch": logging.ERROR}


@contextlib.contextmanager
def _logs_at(levels: dict[str, int]) -> Iterator[None]:
    loggers = {name: logging.getLogger(name) for name in levels}
    before = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.setLevel(max(levels[name], logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(before[name])


def _reason(error: BaseException) -> str:
    """The first line of what went wrong: torch.onnx wraps torch.export's error in advice on how to report it."""
    import re

    cause = error.__cause__ or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    text = re.sub(r"\x1b\[[0-9;]*m", "", lines[0] if lines else "")
    return f"{type(cause).__name__}: {text}"[:300]


def _export_dynamo(wrapped: nn.Module, args: tuple[Any, ...], names: list[str]) -> bytes:
    import torch
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = tuple({i: dims.setdefault(d, Dim(d)) for i, d in _dynamic_dims(a).items()} for a in args)
    program = torch.onnx.export(
        wrapped, args, dynamo=True, input_names=names, output_names=["output"],
        dynamic_shapes={"args": shapes}, verbose=False, report=False,
    )  # fmt: skip
    return program.model_proto.SerializeToString()


def _export_torchscript(wrapped: nn.Module, args: tuple[Any, ...], names: list[str]) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    with _logs_at(QUIET):
        torch.onnx.export(
            wrapped, args, buffer, dynamo=False, input_names=names, output_names=["output"], opset_version=TS_OPSET,
            dynamic_axes={name: _dynamic_dims(a) for name, a in zip(names, args, strict=True)},
        )  # fmt: skip
    return buffer.getvalue()


# --- ONNX Runtime's quantization ----------------------------------------------------------------------------------


def quantize(
    model_bytes: bytes,
    config: OnnxConfig,
    names: list[str],
    ctx: RunContext | None,
    op_types: list[str] | None = None,
) -> bytes:
    """The model quantized by ONNX Runtime: int8 weights (dynamic), or int8 weights and activations (static,
    calibrated on ``ctx``'s batches). ``op_types``: the ONNX ops to quantize (default: the quantizer's own for
    dynamic, every op type it can quantize; STATIC_OPS for static)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    # its quantizer logs advice (run its pre-processing, which fails on dynamo's graphs) on the root logger
    with tempfile.TemporaryDirectory(prefix="slimlab-onnx-") as tmp, _logs_at({"": logging.ERROR}):
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "quantized.onnx"
        source.write_bytes(model_bytes)
        per_channel = config.granularity == "per_channel"
        common = dict(per_channel=per_channel, reduce_range=config.reduce_range, weight_type=QuantType.QInt8)
        if config.quantize == "dynamic":
            quantize_dynamic(source, target, op_types_to_quantize=op_types, **common)
        else:

            class Batches(CalibrationDataReader):
                def __init__(self) -> None:
                    self.batches = (_feeds(names, b) for b in ctx.calibration_batches(config.calibration_batches))

                def get_next(self) -> dict[str, Any] | None:
                    return next(self.batches, None)

            # The layers with weights, as quantize's static schemes: every op (softmax, layer norm, residual adds)
            # gave MiniLM a cosine of 0.39 to fp32; matmuls of two activations (attention) stay float too.
            quantize_static(
                source, target, Batches(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                op_types_to_quantize=op_types or STATIC_OPS, extra_options={"MatMulConstBOnly": True}, **common,
            )  # fmt: skip
        return target.read_bytes()


# --- the deployed module ------------------------------------------------------------------------------------------


def session(model_bytes: bytes, threads: int):
    """An ONNX Runtime session on the CPU with ``threads`` intra-op threads, nodes run one after another."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Its threads spin while a call runs, not after it returns: measured side by side with torch (calls
    # interleaved), spinning after the call slowed the next torch call by 20-30% (MiniLM, 2 threads).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only: not its notes on which nodes run where
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def weight_names(model: nn.Module, model_bytes: bytes) -> dict[str, str]:
    """ONNX initializer name -> the torch parameter it holds (same values, or transposed: exporters fold the
    transpose of a linear layer's weight), for the initializers that exporters name after nodes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def key(array: Any) -> tuple[tuple[int, ...], str]:
        return tuple(array.shape), hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()

    by_value: dict[tuple[tuple[int, ...], str], str] = {}
    for name, parameter in model.named_parameters():
        values = parameter.detach().cpu().numpy()
        by_value.setdefault(key(values), name)
        if values.ndim == 2:
            by_value.setdefault(key(values.T), name)
    names = {}
    for initializer in onnx.load_from_string(model_bytes).graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.dtype.kind == "f" and array.ndim >= 1:
            found = by_value.get(key(array))
            if found is not None:
                names[initializer.name] = found
    return names


def onnx_weights(model_bytes: bytes, names: dict[str, str]) -> Iterator[tuple[str, Any]]:
    """(name, float32 numpy values) of every initializer that holds a weight (see the module docstring).

    A quantized weight is given as ``q - zero_point``: its element count and its zeros, not its scale.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes).graph
    initializers = {init.name: init for init in graph.initializer}
    quantized: dict[str, tuple[str | None, int]] = {}  # integer weight -> (its zero point, the channel axis)
    qparams: set[str] = set()  # scales and zero points: quantization parameters, not weights
    for node in graph.node:
        for op, index, zp_index, axis in QUANTIZED_INPUTS:
            if node.op_type == op and len(node.input) > index and node.input[index] in initializers:
                zp = node.input[zp_index] if len(node.input) > zp_index and node.input[zp_index] else None
                if op == "DequantizeLinear":
                    qparams.add(node.input[1])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), axis)
                quantized[node.input[index]] = (zp, axis)
    for name in initializers:  # e.g. a quantized Gather (embedding): by the quantizer's names
        base = name.removesuffix("_quantized")
        if base != name and f"{base}_scale" in initializers and name not in quantized:
            zp = f"{base}_zero_point"
            quantized[name] = (zp if zp in initializers else None, 0)
    for name, (zp, _) in quantized.items():
        base = name.removesuffix("_quantized")
        qparams |= {zp, f"{base}_scale", f"{base}_zero_point"} - {None}
    for name, initializer in initializers.items():
        if name in qparams:
            continue
        array = numpy_helper.to_array(initializer)
        if name in quantized:
            zp, axis = quantized[name]
            values = array.astype(np.int64)
            if zp is not None:
                offset = numpy_helper.to_array(initializers[zp]).astype(np.int64)
                if offset.size > 1:  # per channel, along ``axis``
                    offset = offset.reshape([-1 if i == axis % array.ndim else 1 for i in range(array.ndim)])
                values = values - offset
            base = name.removesuffix("_quantized")
            yield names.get(base, base), values.astype(np.float32)
        elif array.dtype.kind == "f" and array.ndim >= 1:  # shape-() floats: the exporter's scalar constants
            yield names.get(name, name), np.array(array, dtype=np.float32)  # a copy: torch wants it writable


@functools.cache
def runtime_class() -> type:
    """The deployed module (built on first use, so that importing this plugin does not import torch)."""
    import torch
    from torch import nn

    class OnnxRuntimeModel(nn.Module):
        """An ONNX model run by ONNX Runtime, called like the torch model it was exported from.

        ``forward`` takes the same inputs (a tensor, positional tensors, or keyword tensors) and returns the
        model's output as one CPU tensor. ``slimlab_artifact_bytes()`` is the ``.onnx`` file; the parameters
        are the weights it holds (copies, for counting: see the plugin's docstring).
        """

        def __init__(self, model_bytes: bytes, names: list[str], threads: int, weight_names: dict[str, str]) -> None:
            super().__init__()
            self.model_bytes, self.names, self.threads = model_bytes, list(names), threads
            self.weight_names = dict(weight_names)
            self.session = session(model_bytes, threads)

        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs:
                unknown = sorted(set(kwargs) - set(self.names))
                missing = [name for name in self.names[len(args) :] if name not in kwargs]
                if unknown or missing:
                    raise TypeError(
                        f"the ONNX model takes {', '.join(self.names)}; "
                        f"got {', '.join([*map(str, range(len(args))), *kwargs])}"
                    )
                args = (*args, *(kwargs[name] for name in self.names[len(args) :]))
            outputs = self.session.run(None, _feeds(self.names, args))
            return torch.from_numpy(outputs[0])

        slimlab_artifact_suffix = ".onnx"  # the run's model file is model.onnx

        def slimlab_artifact_bytes(self) -> bytes:
            return self.model_bytes

        def slimlab_onnx_model(self):
            """The ONNX ``ModelProto`` (what ``mlflow.onnx.log_model`` logs)."""
            import onnx

            return onnx.load_from_string(self.model_bytes)

        def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
            for name, values in onnx_weights(self.model_bytes, self.weight_names):
                full = f"{prefix}.{name}" if prefix else name
                yield full, nn.Parameter(torch.from_numpy(values), requires_grad=False)

        def __getstate__(self) -> dict[str, Any]:  # an InferenceSession neither pickles nor deep-copies
            state = self.__dict__.copy()
            state.pop("session", None)
            return state

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__dict__.update(state)
            self.session = session(self.model_bytes, self.threads)

        def extra_repr(self) -> str:
            return f"inputs={self.names}, bytes={len(self.model_bytes)}, threads={self.threads}"

    OnnxRuntimeModel.__module__, OnnxRuntimeModel.__qualname__ = __name__, "OnnxRuntimeModel"
    return OnnxRuntimeModel


def __getattr__(name: str) -> Any:
    if name == "OnnxRuntimeModel":
        return runtime_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the technique ------------------------------------------------------------------------------------------------


def apply(model: nn.Module, config: OnnxConfig, ctx: RunContext) -> nn.Module:
    return deploy(model, config, ctx)


def deploy(model: nn.Module, config: OnnxConfig, ctx: RunContext, op_types: list[str] | None = None) -> nn.Module:
    """``model`` exported, quantized by ONNX Runtime as ``config`` says (only ``op_types`` if given) and wrapped
    in a module that runs it on ONNX Runtime; ``ort_latency_ms`` and ``ort_speedup`` (against ``model``) measured.
    Quantize's backend ort deploys through here too."""
    from slimlab import batches
    from slimlab.measure import measure_latency

    if ctx.device != "cpu":  # the plan refuses it (check_config); a model handed in through the API too
        raise ValueError(f"technique onnx runs on ONNX Runtime's CPU provider; use device=cpu, not {ctx.device}")
    measure = ctx.cfg.measure
    example = ctx.example_inputs()
    if batches.rows(example) < 2:  # torch.export specializes a dimension traced at size 1: it would stay 1
        example = ctx.example_inputs(2)
    model.eval()
    exported, exporter, reason = export(model, example, config.exporter)
    ctx.tags["slimlab.onnx.exporter"] = exporter
    if reason:
        ctx.tags["slimlab.onnx.dynamo_error"] = reason
    names = input_names(example)
    weights = weight_names(model, exported)
    deployed = quantize(exported, config, names, ctx, op_types) if config.quantize != "none" else exported
    ort_model = runtime_class()(deployed, names, measure.threads, weights)
    ctx.tags["slimlab.onnx.ops"] = _op_summary(deployed)
    # What ONNX Runtime adds over the torch model it got: the same inputs, threads and protocol, side by side.
    latency = measure_latency(
        {"torch": model, "ort": ort_model},
        ctx.example_inputs(),
        warmup=measure.warmup,
        repeats=measure.repeats,
        threads=measure.threads,
    )
    ctx.metrics["ort_latency_ms"] = latency["ort"].median_ms
    ctx.metrics["ort_speedup"] = latency["torch"].median_ms / latency["ort"].median_ms
    return ort_model


def _op_summary(model_bytes: bytes) -> str:
    """The graph's most frequent ops, e.g. ``MatMulInteger:36, Mul:101``: what the quantizer changed."""
    from collections import Counter

    import onnx

    counts = Counter(node.op_type for node in onnx.load_from_string(model_bytes).graph.node)
    return ", ".join(f"{op}:{count}" for op, count in counts.most_common(12))


@hookimpl
def register_techniques(register) -> None:
    register(
        "onnx", OnnxConfig, apply, label=label, followed_by=(), check=check, max_speedup=max_speedup,
        key_params=("quantize", "granularity", "reduce_range", "exporter"),
        label_shows=("quantize", "granularity", "reduce_range", "exporter"),
    )  # fmt: skip
