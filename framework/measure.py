"""Measurements of a deployed model: parameter counts, sparsity, latency. One protocol for every run."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """Plain values of a tensor, dequantizing tensor subclasses (torchao) so their zeros count."""
    if type(tensor) is not torch.Tensor and not isinstance(tensor, nn.Parameter) and hasattr(tensor, "dequantize"):
        return tensor.dequantize()
    return tensor.detach()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the model as it will be deployed."""
    total = nonzero = 0
    for parameter in model.parameters():
        values = _dense(parameter.data)
        total += values.numel()
        nonzero += int(values.ne(0).sum())
    return total, nonzero


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zeros in each weight, by parameter name."""
    result = {}
    for name, parameter in model.named_parameters():
        if name.endswith("weight"):
            values = _dense(parameter.data)
            result[name] = 1.0 - int(values.ne(0).sum()) / values.numel()
    return result


def layer_sizes(model: nn.Module) -> dict[str, int]:
    """Number of elements of each weight, by parameter name."""
    return {name: p.numel() for name, p in model.named_parameters() if name.endswith("weight")}


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


@torch.inference_mode()
def measure_latency(
    models: dict[str, nn.Module], batch: torch.Tensor, *, warmup: int = 3, repeats: int = 20, threads: int = 1
) -> dict[str, Latency]:
    """Time each model on the same batch, interleaved round by round so drift hits all alike.

    The input is cloned for every call so that a model mutating its input
    cannot skew the next call.
    """
    if repeats < 5:
        raise ValueError(f"at least 5 timed repeats are needed, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in models}
    with fixed_threads(threads):
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                model(batch.clone())
        for _ in range(repeats):
            for name, model in models.items():
                x = batch.clone()
                start = time.perf_counter()
                model(x)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: Latency(statistics.median(t), _percentile(t, 95), len(t)) for name, t in times.items()}


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))  # nearest-rank
    return ordered[rank]
