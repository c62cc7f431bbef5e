"""The measurement protocol refuses timings it cannot trust."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlab.measure import MeasurementError, check_stable, machine_tags, measure_latency


class MutatesInput(nn.Module):
    def forward(self, x):
        return x.add_(1)


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


def test_stable_model_is_timed_with_median_and_p95():
    latency = measure_latency({"linear": nn.Linear(8, 4)}, torch.randn(16, 8), warmup=1, repeats=5)["linear"]
    assert latency.repeats == 5 and 0 < latency.median_ms <= latency.p95_ms


def test_model_that_writes_into_its_input_is_an_error():
    with pytest.raises(MeasurementError, match="modified its input"):
        measure_latency({"bad": MutatesInput()}, torch.zeros(4, 3), warmup=1, repeats=5)


def test_model_whose_outputs_change_between_calls_is_an_error():
    with pytest.raises(MeasurementError, match="outputs differ"):
        measure_latency({"noisy": Noisy()}, torch.zeros(4, 3), warmup=2, repeats=5)


def test_too_few_repeats_refused():
    with pytest.raises(ValueError, match="at least 5"):
        measure_latency({"linear": nn.Linear(2, 2)}, torch.zeros(1, 2), repeats=4)


def test_machine_tags_name_the_cpu_and_versions():
    tags = machine_tags(threads=2)
    assert tags["slimlab.measure.threads"] == "2"
    assert tags["slimlab.version.torch"] == torch.__version__
    assert tags["slimlab.cpu"]


def test_speedup_above_the_physical_bound_is_a_measurement_error():
    from slimlab.plugin_manager import load_plugins
    from slimlab.plugins.prune import PruneConfig
    from slimlab.plugins.quantize import QuantizeConfig
    from slimlab.registry import Step
    from slimlab.runner import _check_speedup

    registry = load_plugins().registry
    int8 = [Step(registry["quantize"], QuantizeConfig(scheme="int8_dynamic"))]
    _check_speedup(3.9, int8)  # within int8's 4x
    with pytest.raises(MeasurementError, match="exceeds the physical bound 4x"):
        _check_speedup(5.0, int8)
    _check_speedup(9.0, [Step(registry["prune"], PruneConfig(structure="channels")), *int8])  # no bound for pruning
    _check_speedup(9.0, [Step(registry["quantize"], QuantizeConfig(backend="pt2e"))])  # compiled: no fixed bound


def test_stability_check_used_at_lowering_time():
    x = torch.randn(4, 3)
    check_stable(nn.Linear(3, 2), x)
    with pytest.raises(MeasurementError, match="modified its input tensor in place"):
        check_stable(MutatesInput(), x)
    with pytest.raises(MeasurementError, match="outputs differ between identical calls"):
        check_stable(Noisy(), x)
