"""slimlab's own techniques pass the conformance suite that third-party plugins subclass (slimlab.testing); the
kit and the runner fail an ``apply`` that changes its config; the kit's fast mode runs a plugin's contract."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import pytest
from mlflow import MlflowClient

from slimlab.errors import PluginError
from slimlab.registry import Step, Technique
from slimlab.runner import apply_technique
from slimlab.testing import TechniqueContract
from tests.conftest import write_plugin


class TestPrune(TechniqueContract):
    technique = "prune"
    options = ["technique.prune.amount=0.5"]
    presets = ["prune_90"]


class TestQuantize(TechniqueContract):
    technique = "quantize"
    options = ["technique.quantize.allow_slower=true"]  # the contract, not the speed on a tiny model
    presets = ["quantize_legacy", "quantize_ao"]
    thorough = True  # one built-in in thorough mode: the founding LeNet, and its model logged (pickle) to MLflow


class TestDistill(TechniqueContract):
    technique = "distill"
    options = ["technique.distill.epochs=1"]


class TestPlace(TechniqueContract):
    technique = "place"
    options = ["technique.place.device=cpu"]


# Issue 16's k-means plugin, reduced: apply picks "a better" cluster count and writes it back into its config, so
# the run's params (logged before it runs) said n_clusters=8 while 16 ran.
SHARING_PLUGIN = """
    from dataclasses import dataclass

    from slimlab import hookimpl


    @dataclass
    class ShareConfig:
        n_clusters: int = 8


    def share(model, config, ctx):
        import torch

        if config.n_clusters < 16:
            config.n_clusters = 16  # the bug: a derived value written into the config
        with torch.no_grad():
            for parameter in model.parameters():
                levels = torch.linspace(float(parameter.min()), float(parameter.max()), config.n_clusters)
                parameter.copy_(levels[(parameter.unsqueeze(-1) - levels).abs().argmin(-1)])
        return model


    @hookimpl
    def register_techniques(register):
        register("share", ShareConfig, share, label=lambda c: f"share({c.n_clusters})")
"""

ROUNDING_PLUGIN = """
    from dataclasses import dataclass

    from slimlab import hookimpl


    @dataclass
    class RoundConfig:
        decimals: int = 2


    def round_weights(model, config, ctx):
        import torch

        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.round(parameter, decimals=config.decimals))
        ctx.metrics["rounded_to_decimals"] = config.decimals  # a value to record goes here, not into config
        return model


    @hookimpl
    def register_techniques(register):
        register("round", RoundConfig, round_weights, label=lambda c: f"round({c.decimals})")
"""

MUTATED = "technique 'share' of plugin 'sharing' changed its config in apply (n_clusters: configured 8, apply left 16)"


@dataclass
class Options:
    n_clusters: int = 8
    layers: list[str] = field(default_factory=lambda: ["fc1"])
    tolerance: float = math.nan


def step_of(apply) -> Step:
    return Step(Technique("share", Options, apply, "sharing"), Options())


def test_apply_that_leaves_its_config_alone_passes():
    step = step_of(lambda model, config, ctx: model)
    assert apply_technique(step, "model", None) == "model"  # a NaN option is unchanged, not "changed"


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: setattr(c, "n_clusters", 16), "n_clusters: configured 8, apply left 16"),
        (lambda c: c.layers.append("fc2"), "layers: configured ['fc1'], apply left ['fc1', 'fc2']"),
        (lambda c: setattr(c, "chosen", 16), "chosen: configured '(unset)', apply left 16"),
    ],
    ids=["field", "list-in-place", "added-attribute"],
)
def test_apply_that_changes_its_config_is_a_plugin_error(change, expected):
    def apply(model, config, ctx):
        change(config)
        return model

    step = step_of(apply)
    with pytest.raises(PluginError) as raised:
        apply_technique(step, "model", None)
    message = str(raised.value)
    assert message.startswith(f"technique 'share' of plugin 'sharing' changed its config in apply ({expected})")
    assert "ctx.metrics or ctx.tags" in message and "\n" not in message
    assert step.config == Options()  # apply got a copy: what the run logged is what is left


@pytest.fixture
def sharing_site(tmp_path, monkeypatch):
    site = write_plugin(
        tmp_path / "site", "slimlab-sharing", "slimlab_sharing", SHARING_PLUGIN, {"sharing": "slimlab_sharing"}
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_a_run_whose_apply_changes_its_config_fails_with_the_reason(sharing_site, overrides, store):
    from slimlab.config import compose
    from slimlab.plugin_manager import load_plugins
    from slimlab.runner import run_metrics
    from slimlab.tracking import ERROR_TAG

    plugins = load_plugins()
    cfg = compose(["model=mlp", "technique=[share]", *overrides], plugins)
    with pytest.raises(PluginError, match=r"^" + MUTATED.replace("(", r"\(").replace(")", r"\)")):
        run_metrics(cfg, plugins)
    client = MlflowClient(store)
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG].startswith(f"PluginError: {MUTATED}")
    assert run.data.params["technique.share.n_clusters"] == "8"  # what was configured, and the run says it failed
    assert run.data.metrics == {}  # no result of the run that was not the configured one


@pytest.mark.slow
def test_through_the_cli_a_failed_run_exits_1_and_keeps_its_job_folder(sharing_site, overrides, tmp_path):
    """A PluginError raised after the run was opened is a failed run, not bad input: exit 1 (not 2, which says
    nothing was recorded), and the job folder with its log stays beside the FAILED MLflow run."""
    from tests.conftest import slimlab

    result = slimlab(
        "run", "model=mlp", "technique=[share]", *overrides, cwd=tmp_path, env={"PYTHONPATH": str(sharing_site)}
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert MUTATED in result.stderr
    assert list((tmp_path / "outputs").glob("*/*/.hydra")), "the job folder was removed"


KIT_TESTS = """
from slimlab.testing import TechniqueContract


class TestRound(TechniqueContract):
    technique = "round"
    thorough = False  # fast whatever the command line says


class TestShare(TechniqueContract):  # --slimlab-thorough: the logged-model check runs, and fails the same way
    technique = "share"
"""


@pytest.mark.slow  # a pytest process of its own: about 20 s
def test_the_kit_fails_an_apply_that_changes_its_config_and_passes_a_good_one_fast(tmp_path):
    site = tmp_path / "site"
    write_plugin(site, "slimlab-sharing", "slimlab_sharing", SHARING_PLUGIN, {"sharing": "slimlab_sharing"})
    write_plugin(site, "slimlab-rounding", "slimlab_rounding", ROUNDING_PLUGIN, {"rounding": "slimlab_rounding"})
    (tmp_path / "test_kit.py").write_text(KIT_TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--slimlab-thorough",
         "--junitxml=report.xml", "test_kit.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = {}
    for case in ET.parse(tmp_path / "report.xml").iter("testcase"):
        found = [child for child in case if child.tag in ("failure", "error", "skipped")]
        outcome = found[0] if found else None
        outcomes[(case.get("classname").split(".")[-1], case.get("name"))] = (
            "passed" if outcome is None else outcome.tag,
            "" if outcome is None else outcome.get("message", ""),
        )
    good = {name: outcome for (cls, name), outcome in outcomes.items() if cls == "TestRound"}
    assert good.pop("test_logs_as_an_mlflow_model_that_loads_back")[0] == "skipped"  # fast: no MLflow model
    assert len(good) == 8 and all(outcome == ("passed", "") for outcome in good.values()), good
    bad = {name: outcome for (cls, name), outcome in outcomes.items() if cls == "TestShare"}
    assert bad["test_apply_leaves_its_config_unchanged"][0] == "failure"
    assert MUTATED in bad["test_apply_leaves_its_config_unchanged"][1]
    # Every check that applies it fails the same way: the run, and the thorough logged-model check.
    applying = ("test_apply_returns_a_working_module", "test_run_metrics_are_numbers")
    for name in (*applying, "test_logs_as_an_mlflow_model_that_loads_back"):
        assert bad[name][0] == "failure" and MUTATED in bad[name][1], (name, bad[name])
    for name in ("test_registered_under_its_name", "test_config_round_trips"):
        assert bad[name][0] == "passed", (name, bad[name])
