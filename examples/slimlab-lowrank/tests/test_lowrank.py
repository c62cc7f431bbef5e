"""The plugin's own tests, run against the installed distribution (not a path on sys.path)."""

from importlib.metadata import distribution

import pytest
import slimlab_lowrank
import torch
from slimlab_lowrank import LowRankConfig, factorise, rank_for
from torch import nn

from slimlab.testing import TechniqueContract  # slimlab's conformance suite, shipped with slimlab


def test_installed_as_a_slimlab_plugin():
    (entry_point,) = [ep for ep in distribution("slimlab-lowrank").entry_points if ep.group == "slimlab"]
    assert entry_point.name == "lowrank" and entry_point.load() is slimlab_lowrank


def test_rank_keeps_the_asked_energy():
    values = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert rank_for(values, 16 / 22) == 1
    assert rank_for(values, 0.9) == 2
    assert rank_for(values, 1.0) == 4


def test_factorised_layer_is_smaller_and_exact_at_its_rank():
    torch.manual_seed(0)
    low = torch.randn(64, 8) @ torch.randn(8, 128)  # rank 8
    layer = nn.Linear(128, 64)
    with torch.no_grad():
        layer.weight.copy_(low)
    pair = factorise(layer, energy=0.999999)
    assert pair[0].out_features == 8
    assert sum(p.numel() for p in pair.parameters()) < sum(p.numel() for p in layer.parameters())
    x = torch.randn(5, 128)
    torch.testing.assert_close(pair(x), layer(x), rtol=1e-4, atol=1e-4)


def test_a_layer_that_would_grow_is_left_alone():
    assert factorise(nn.Linear(4, 4), energy=1.0) is None


def test_bad_energy_is_refused():
    with pytest.raises(ValueError, match="energy must be in"):
        LowRankConfig(energy=0)


class TestLowRankContract(TechniqueContract):
    technique = "lowrank"
    options = ["technique.lowrank.energy=0.8"]
