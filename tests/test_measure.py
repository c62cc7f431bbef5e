"""The measurement protocol refuses timings it cannot trust."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from slimlab.measure import MeasurementError, accelerators, check_stable, machine_tags, measure_latency


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


def on_gpu(index: int) -> torch.Tensor:
    """A tensor that says it is on ``cuda:<index>``, made without a GPU (torch's fake tensors hold no data)."""
    with FakeTensorMode():
        return torch.empty(1, device=f"cuda:{index}")


class Recorded(nn.Module):
    """A CPU model whose weights say they live on a GPU; it notes each call in ``events``."""

    def __init__(self, name: str, events: list, gpu: int | None = None):
        super().__init__()
        self.name, self.events, self.linear = name, events, nn.Linear(3, 2)
        if gpu is not None:
            self.register_buffer("gpu_weight", on_gpu(gpu))

    def forward(self, x):
        self.events.append(("call", self.name))
        return self.linear(x)


@pytest.fixture
def events(monkeypatch) -> list:
    """What measure_latency does, in order: model calls, device synchronisations and clock reads."""
    recorded: list = []
    clock = time.perf_counter
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: recorded.append(("sync", str(device))))
    monkeypatch.setattr(time, "perf_counter", lambda: recorded.append(("clock",)) or clock())
    return recorded


def test_on_an_accelerator_the_clock_starts_and_stops_with_the_device_idle(events):
    models = {"baseline": Recorded("baseline", events, gpu=0), "compressed": Recorded("compressed", events, gpu=1)}
    measure_latency(models, torch.zeros(4, 3), warmup=1, repeats=5)
    warmup = [("call", "baseline"), ("call", "compressed")]
    assert events[:2] == warmup
    # Interleaved round by round; each call between a synchronisation of its own device and the clock.
    one_round = [
        *(("sync", "cuda:0"), ("clock",), ("call", "baseline"), ("sync", "cuda:0"), ("clock",)),
        *(("sync", "cuda:1"), ("clock",), ("call", "compressed"), ("sync", "cuda:1"), ("clock",)),
    ]
    assert events[2:] == one_round * 5


def test_on_the_cpu_nothing_is_synchronised(events):
    measure_latency({"cpu": Recorded("cpu", events)}, torch.zeros(4, 3), warmup=1, repeats=5)
    assert ("sync", "cuda:0") not in events and not [e for e in events if e[0] == "sync"]
    assert events.count(("clock",)) == 2 * 5


def test_the_devices_to_wait_for_are_every_accelerator_the_model_or_its_inputs_use():
    assert accelerators(nn.Linear(3, 2), torch.zeros(1, 3)) == []
    split = Recorded("split", [], gpu=1)
    split.register_buffer("other", on_gpu(0))  # a model spread over two GPUs (device_map) queues work on both
    assert accelerators(split) == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert accelerators(nn.Linear(3, 2), {"x": on_gpu(2)}) == [torch.device("cuda:2")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; the fake-device tests above cover it")
def test_cuda_latency_covers_the_kernels_not_only_their_launch():
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(8)]).cuda()
    x = torch.randn(4096, 4096, device="cuda")
    latency = measure_latency({"gpu": model}, x, warmup=2, repeats=5)["gpu"]
    kernels = []  # the device's own time for the same work, from CUDA events
    with torch.inference_mode():
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            kernels.append(start.elapsed_time(end))
    # Launching eight 4096x4096 matmuls takes well under a millisecond, running them far more: a clock that
    # stopped at the launch would read a small fraction of the device's time.
    assert latency.median_ms >= 0.9 * min(kernels)
