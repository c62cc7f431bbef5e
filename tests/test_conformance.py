"""slimlab's own techniques pass the conformance suite that third-party plugins subclass (slimlab.testing)."""

from __future__ import annotations

from slimlab.testing import TechniqueContract


class TestPrune(TechniqueContract):
    technique = "prune"
    options = ["technique.prune.amount=0.5"]
    presets = ["prune_90"]


class TestQuantize(TechniqueContract):
    technique = "quantize"
    options = ["technique.quantize.allow_slower=true"]  # the contract, not the speed on a tiny model
    presets = ["quantize_legacy", "quantize_ao"]


class TestDistill(TechniqueContract):
    technique = "distill"
    options = ["technique.distill.epochs=1"]


class TestPlace(TechniqueContract):
    technique = "place"
    options = ["technique.place.device=cpu"]
