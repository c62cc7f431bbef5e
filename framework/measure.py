"""Measurements of a deployed model: parameter counts, sparsity, latency. One protocol for every run."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimlab import batches


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """Plain values of a tensor, dequantizing quantized ones (torch.ao, torchao) so their zeros count."""
    if tensor.is_quantized or (type(tensor) is not torch.Tensor and hasattr(tensor, "dequantize")):
        return tensor.dequantize()
    return tensor.detach()


def _named_tensors(model: nn.Module):
    """(name, values) of every parameter, including torch.ao's packed int8 weights, which are not parameters."""
    for name, parameter in model.named_parameters():  # the model's own listing: wrappers may override it
        yield name, _dense(parameter.data)
    for module_name, module in model.named_modules():
        packed = hasattr(module, "_packed_params") or hasattr(module, "_weight_bias")
        if packed and callable(getattr(module, "weight", None)):
            prefix = f"{module_name}." if module_name else ""
            yield prefix + "weight", _dense(module.weight())
            bias = module.bias() if callable(getattr(module, "bias", None)) else None
            if bias is not None:
                yield prefix + "bias", bias.detach()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the model as it will be deployed."""
    total = nonzero = 0
    for _, values in _named_tensors(model):
        total += values.numel()
        nonzero += int(values.ne(0).sum())
    return total, nonzero


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zeros in each weight, by parameter name."""
    return {
        name: 1.0 - int(values.ne(0).sum()) / values.numel()
        for name, values in _named_tensors(model)
        if name.endswith("weight")
    }


def layer_sizes(model: nn.Module) -> dict[str, int]:
    """Number of elements of each weight, by parameter name."""
    return {name: values.numel() for name, values in _named_tensors(model) if name.endswith("weight")}


@dataclass(frozen=True)
class Latency:
    """Batch latency in milliseconds over the timed repeats."""

    median_ms: float
    p95_ms: float
    repeats: int


@contextmanager
def fixed_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class MeasurementError(RuntimeError):
    """A measurement that cannot be trusted: the run fails rather than report it."""


@torch.inference_mode()
def measure_latency(
    models: dict[str, nn.Module], inputs: Any, *, warmup: int = 3, repeats: int = 20, threads: int = 1
) -> dict[str, Latency]:
    """Time each model on the same inputs, interleaved round by round so drift hits all alike.

    ``inputs`` is a batch's inputs in any form of :mod:`slimlab.batches` (a tensor, a tuple, a dict).
    Every call gets a fresh clone of them. A model whose output changes between calls, or that writes into
    its input, is a measurement error (a compiled int8 graph was seen mutating its input), not a
    result. On an accelerator (CUDA, XPU, MPS...) the clock starts and stops with the device idle
    (``torch.accelerator.synchronize``): a call returns once its kernels are queued, not done.
    """
    if repeats < 5:
        raise ValueError(f"at least 5 timed repeats are needed, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in models}
    reference: dict[str, torch.Tensor] = {}
    with fixed_threads(threads):
        for name, model in models.items():
            model.eval()
            for _ in range(warmup):
                reference[name] = _checked_call(name, model, inputs, reference.get(name))
        devices = {name: accelerators(model, inputs, reference.get(name)) for name, model in models.items()}
        for _ in range(repeats):
            for name, model in models.items():
                x = batches.clone(inputs)
                _synchronize(devices[name])  # the clone and the other model's work are not this call's time
                start = time.perf_counter()
                output = batches.call(model, x)
                _synchronize(devices[name])
                times[name].append((time.perf_counter() - start) * 1000)
                _check(name, x, inputs, output, reference.get(name))
    return {name: Latency(statistics.median(t), _percentile(t, 95), len(t)) for name, t in times.items()}


def accelerators(model: nn.Module, inputs: Any = None, output: torch.Tensor | None = None) -> list[torch.device]:
    """The devices other than the CPU that ``model``'s weights, ``inputs`` or ``output`` live on.

    All of them: a model split over several GPUs (``device_map``) queues work on each.
    """
    tensors = [*model.parameters(), *model.buffers(), *batches._tensors(inputs)]
    if output is not None:
        tensors.append(output)
    found = {tensor.device for tensor in tensors if tensor.device.type not in ("cpu", "meta")}
    return sorted(found, key=str)


def _synchronize(devices: list[torch.device]) -> None:
    for device in devices:
        torch.accelerator.synchronize(device)


def check_stable(
    model: nn.Module,
    example: Any,
    *,
    first: torch.Tensor | None = None,
    touched: Any = None,
    name: str = "the model",
    calls: int = 3,
) -> None:
    """Raise MeasurementError unless ``model`` leaves its input untouched and repeats its outputs exactly.

    ``first`` is the output of an earlier call on ``example`` and ``touched`` the input that call got.
    """
    if touched is not None:
        _check(name, touched, example, first, None)
    reference = None if first is None else batches.output_tensor(first).detach().clone()
    with torch.inference_mode():
        for _ in range(calls):
            output = _checked_call(name, model, example, reference)
            reference = output if reference is None else reference


def _checked_call(name: str, model: nn.Module, inputs: Any, reference: torch.Tensor | None) -> torch.Tensor:
    x = batches.clone(inputs)
    output = batches.call(model, x)
    _check(name, x, inputs, output, reference)
    return output.detach().clone()


def _check(name: str, x: Any, inputs: Any, output: torch.Tensor, reference: torch.Tensor | None):
    if not batches.equal(x, inputs):
        raise MeasurementError(f"{name}: the model modified its input tensor in place; its timings are not valid")
    if reference is not None and not torch.equal(batches.output_tensor(output), reference):
        raise MeasurementError(f"{name}: outputs differ between identical calls; its timings are not valid")


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))  # nearest-rank
    return ordered[rank]


def machine_tags(threads: int) -> dict[str, str]:
    """What the timings depend on: CPU model and int8/bf16 features, library versions, threads."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    tags = {"slimlab.measure.threads": str(threads), "slimlab.cpu": platform.processor() or platform.machine()}
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            tags["slimlab.cpu"] = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
            tags["slimlab.cpu_flags"] = ",".join(f for f in wanted if f in flags) or "none"
            break
    for package in ("torch", "torchao", "transformers"):
        try:
            tags[f"slimlab.version.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        tags["slimlab.gpu"] = torch.cuda.get_device_name()
    return tags


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process so far (it covers everything the run did), and CUDA's peak."""
    import resource

    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
    if torch.cuda.is_available():
        peaks["cuda_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks
