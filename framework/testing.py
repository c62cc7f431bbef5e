"""slimlab's conformance kit for technique plugins: pytest fixtures and a contract suite to subclass.

Registered as a pytest plugin (entry point ``pytest11``), so installing slimlab makes the fixtures
available; it imports nothing heavy until a fixture or test uses it. In a plugin's tests::

    from slimlab.testing import TechniqueContract

    class TestLowRank(TechniqueContract):
        technique = "lowrank"                            # the name the plugin registers
        options = ["technique.lowrank.energy=0.8"]       # settings that keep the run short

The contract checks that the technique is registered under its name, that its presets compose and
validate, that ``apply`` returns a working module, deterministically under a seed, that a run's metrics
are numbers, that the model artifact saves and reloads, that the model logs as an MLflow model in the
``serialization_format`` the technique declares and loads back with the same outputs, and that the config
round-trips through Hydra.
slimlab's own techniques pass the same suite (tests/test_conformance.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

# Small but real: LeNet on digits, two epochs, five timed repeats.
TINY = ["model=lenet", "data=digits", "train.epochs=2", "measure.repeats=5", "measure.warmup=1", "tracking=none"]


def pytest_configure(config: pytest.Config) -> None:
    # MLflow's sqlite store (slimlab_store, the contract's model test) uses SQLAlchemy's deprecated `noload`:
    # not the plugin author's to fix, so not in their test report
    config.addinivalue_line("filterwarnings", "ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.fixture
def slimlab_plugins():
    """A fresh plugin manager: every installed slimlab plugin, loaded through the entry-point group."""
    from slimlab.plugin_manager import load_plugins

    return load_plugins()


@pytest.fixture(scope="session")
def slimlab_cache(tmp_path_factory) -> Path:
    """A baseline cache for the test session: each distinct baseline is trained once."""
    return tmp_path_factory.mktemp("slimlab-baselines")


@pytest.fixture
def slimlab_compose(slimlab_plugins, slimlab_cache):
    """``compose(overrides)``: a config composed as ``slimlab run`` would, its baseline in the session's cache."""
    from slimlab.config import compose

    def composed(overrides: list[str]):
        return compose([*overrides, f"cache_dir={slimlab_cache}"], slimlab_plugins)

    return composed


@pytest.fixture
def slimlab_store(tmp_path) -> str:
    """An embedded sqlite MLflow store in a temp dir (pass ``tracking.uri=<it>`` to a run)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def tiny_data():
    """scikit-learn's bundled digits at 28x28, the data of the founding document's LeNet."""
    from slimlab.datasets import digits

    return digits(seed=0)


@pytest.fixture
def tiny_model():
    """The founding document's LeNet (431,080 parameters), freshly initialised with seed 0."""
    import torch

    from slimlab.models import LeNet

    torch.manual_seed(0)
    return LeNet().eval()


def first_test_inputs(data: Any, rows: int = 8) -> Any:
    """The inputs of the first ``rows`` test rows of a :class:`~slimlab.data.Data` (a tensor, tuple or dict)."""
    from slimlab.batches import first_rows
    from slimlab.data import loader

    return first_rows(loader(data.test, rows), rows)


def context(cfg: Any, data: Any, tmp_path: Path, baseline: Any = None, plugins: Any = None):
    """A RunContext for calling ``apply`` directly, outside the runner, with ``baseline`` as the run's baseline."""
    from slimlab.context import RunContext
    from slimlab.measure import count_parameters
    from slimlab.plugin_manager import load_plugins
    from slimlab.training import score_baseline

    task = (plugins or load_plugins()).task(data.task)
    ctx = RunContext(
        cfg=cfg, data=data, task=task, device="cpu", run_name="contract", config_hash="0", output_dir=tmp_path
    )
    if baseline is not None:
        params, nonzero = count_parameters(baseline)
        ctx.baseline = baseline
        scores, ctx.references = score_baseline(baseline, data, task)
        ctx.baseline_metrics = {**scores, "param_count": params, "nonzero_param_count": nonzero}
    return ctx


class TechniqueContract:
    """The contract every slimlab technique meets. Subclass it, set ``technique`` (and ``options``)."""

    technique: str = ""
    options: list[str] = []  # overrides that keep the technique quick on the tiny model
    presets: list[str] = []  # technique presets (conf/technique/*.yaml or the plugin's own) that must compose

    def overrides(self) -> list[str]:
        return [*TINY, f"technique=[{self.technique}]", *self.options]

    def step(self, cfg: Any, plugins: Any):
        from slimlab.runner import plan

        (step,) = plan(cfg, plugins).steps
        return step

    def test_registered_under_its_name(self, slimlab_plugins):
        assert self.technique, "set `technique` to the name the plugin registers"
        assert self.technique in slimlab_plugins.registry, sorted(slimlab_plugins.registry.names())

    def test_presets_compose_and_validate(self, slimlab_compose, slimlab_plugins):
        from slimlab.runner import plan

        for preset in [self.technique, *self.presets]:
            cfg = slimlab_compose([*TINY, f"technique=[{preset}]"])
            assert plan(cfg, slimlab_plugins).steps, preset

    def test_config_round_trips(self, slimlab_compose, slimlab_plugins):
        from omegaconf import OmegaConf

        cfg = slimlab_compose(self.overrides())
        step = self.step(cfg, slimlab_plugins)
        node = OmegaConf.structured(step.config)
        assert OmegaConf.to_object(node) == step.config
        assert OmegaConf.to_object(OmegaConf.create(OmegaConf.to_yaml(node))) == OmegaConf.to_container(node)

    def _applied(self, cfg, plugins, data, model, tmp_path):
        import copy

        import torch

        torch.manual_seed(int(cfg.seed))
        step = self.step(cfg, plugins)
        ctx = context(cfg, data, tmp_path, copy.deepcopy(model), plugins)
        return step.technique.apply(model, step.config, ctx)

    def test_apply_returns_a_working_module(self, slimlab_compose, slimlab_plugins, tiny_data, tiny_model, tmp_path):
        import torch

        cfg = slimlab_compose(self.overrides())
        model = self._applied(cfg, slimlab_plugins, tiny_data, tiny_model, tmp_path)
        assert isinstance(model, torch.nn.Module)
        with torch.inference_mode():
            output = model(first_test_inputs(tiny_data))
        assert output.shape == (8, 10) and torch.isfinite(output).all()

    def test_deterministic_under_a_seed(self, slimlab_compose, slimlab_plugins, tiny_data, tmp_path):
        import torch

        from slimlab.models import LeNet

        cfg = slimlab_compose(self.overrides())
        outputs = []
        for attempt in range(2):
            torch.manual_seed(0)
            model = self._applied(cfg, slimlab_plugins, tiny_data, LeNet().eval(), tmp_path / str(attempt))
            with torch.inference_mode():
                outputs.append(model(first_test_inputs(tiny_data)))
        torch.testing.assert_close(outputs[0], outputs[1])

    def test_run_metrics_are_numbers(self, slimlab_compose, slimlab_plugins):
        from slimlab.runner import run_metrics

        primary, metrics = run_metrics(slimlab_compose(self.overrides()), slimlab_plugins)
        assert primary in metrics
        bad = {k: v for k, v in metrics.items() if not isinstance(v, int | float) or math.isnan(v)}
        assert not bad, bad

    def test_artifact_saves_and_reloads(self, slimlab_compose, slimlab_plugins, tiny_data, tiny_model, tmp_path):
        import torch

        from slimlab.artifact import deployable, load_state, save_model

        cfg = slimlab_compose(self.overrides())
        model = self._applied(cfg, slimlab_plugins, tiny_data, tiny_model, tmp_path)
        size = save_model(model, tmp_path / "model.pt")
        assert size == (tmp_path / "model.pt").stat().st_size > 0
        stored = load_state(tmp_path / "model.pt")
        original = deployable(model).state_dict()
        assert list(stored) == list(original)
        for name, value in original.items():
            if isinstance(value, torch.Tensor) and not value.is_quantized and type(value) is torch.Tensor:
                torch.testing.assert_close(stored[name], value.detach().cpu(), msg=name)

    def test_logs_as_an_mlflow_model_that_loads_back(
        self, slimlab_compose, slimlab_plugins, slimlab_store, tiny_data, tiny_model, tmp_path
    ):
        import mlflow.pytorch
        import torch
        from mlflow import MlflowClient

        from slimlab.logged_model import log_compressed_model, portable, using_tracking_uri
        from slimlab.tracking import experiment_id

        cfg = slimlab_compose(self.overrides())
        model = self._applied(cfg, slimlab_plugins, tiny_data, tiny_model, tmp_path)
        ctx = context(cfg, tiny_data, tmp_path, plugins=slimlab_plugins)
        ctx.model, ctx.steps = model, [self.step(cfg, slimlab_plugins)]
        client = MlflowClient(slimlab_store)
        run = client.create_run(experiment_id(client, "contract", slimlab_store))
        uri = log_compressed_model(slimlab_store, run.info.run_id, ctx)
        declared = ctx.steps[0].serialization_format()
        assert ctx.tags["slimlab.model_format"] == declared, (
            f"declared serialization_format={declared!r}, but: {ctx.tags['slimlab.model_format']}; "
            "declare 'pickle' for modules torch.export cannot trace"
        )
        batch = first_test_inputs(tiny_data)
        with torch.inference_mode(), using_tracking_uri(slimlab_store):
            torch.testing.assert_close(mlflow.pytorch.load_model(uri)(batch), portable(model)(batch))
