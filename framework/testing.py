"""slimlab's conformance kit for technique plugins: pytest fixtures and a contract suite to subclass.

Registered as a pytest plugin (entry point ``pytest11``), so installing slimlab makes the fixtures
available; it imports nothing heavy until a fixture or test uses it. In a plugin's tests::

    from slimlab.testing import TechniqueContract

    class TestLowRank(TechniqueContract):
        technique = "lowrank"                            # the name the plugin registers
        options = ["technique.lowrank.energy=0.8"]       # settings that keep the run short

The contract checks that the technique is registered under its name, that its presets compose and
validate, that its config round-trips through Hydra, that ``apply`` leaves its config as configured (the
run logs the configured options as its params), returns a working module, deterministically under a seed,
that a run's metrics are numbers and that the model artifact saves and reloads.

Two modes. Fast, the default: a tiny LeNet (4/8/32 channels) trained one epoch on digits, one baseline
trained once and one ``apply`` shared by the checks of a contract class, no MLflow. Thorough
(``pytest --slimlab-thorough``, or ``thorough = True`` on the class), for CI: the founding document's LeNet
trained two epochs, and the model logged as an MLflow model in the ``serialization_format`` the technique
declares, loaded back with the same outputs.
slimlab's own techniques pass the same suite (tests/test_conformance.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Thorough mode, small but real: LeNet on digits, two epochs, five timed repeats.
TINY = ["model=lenet", "data=digits", "train.epochs=2", "measure.repeats=5", "measure.warmup=1", "tracking=none"]
# Fast mode: a LeNet of 5,370 parameters (the founding one has 431,080), one epoch, nothing tracked.
FAST_MODEL = ["model=lenet", "model.conv1=4", "model.conv2=8", "model.hidden=32"]
FAST = ["data=digits", "train.epochs=1", "measure.repeats=5", "measure.warmup=0", "tracking=none"]
# Checks that only thorough mode runs (a fast run skips them, saying how to run them).
THOROUGH_ONLY = frozenset({"test_logs_as_an_mlflow_model_that_loads_back"})


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("slimlab", "slimlab's conformance kit")
    group.addoption(
        "--slimlab-thorough",
        action="store_true",
        help="run TechniqueContract thoroughly (CI): the full-size LeNet and the logged MLflow model; default fast",
    )


def is_thorough(config: pytest.Config, cls: type | None) -> bool:
    """Whether the contract of ``cls`` runs thoroughly: its ``thorough`` attribute, else ``--slimlab-thorough``."""
    chosen = getattr(cls, "thorough", None)
    return bool(config.getoption("slimlab_thorough", False)) if chosen is None else bool(chosen)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is None or not issubclass(cls, TechniqueContract) or is_thorough(config, cls):
            continue
        if getattr(item, "originalname", item.name) in THOROUGH_ONLY:
            item.add_marker(pytest.mark.skip(reason="slimlab conformance: thorough mode only (--slimlab-thorough)"))


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
    from slimlab.zoo.datasets import digits

    return digits(seed=0)


@pytest.fixture
def tiny_model():
    """The founding document's LeNet (431,080 parameters), freshly initialised with seed 0."""
    import torch

    from slimlab.zoo.models import LeNet

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


@dataclass
class Shared:
    """What the checks of one contract class share: plugins, config, data, one trained baseline, one ``apply``."""

    contract: TechniqueContract
    plugins: Any
    cfg: Any
    step: Any
    data: Any
    task: Any
    baseline: Any  # slimlab.baseline.Baseline, trained once (and cached for the run check)
    references: list[Any]
    tmp: Path
    cache: Path
    applied: Any = None  # the model ``apply`` returned, or the error it raised
    error: BaseException | None = None
    applies: int = 0

    def compose(self, overrides: list[str]):
        from slimlab.config import compose

        return compose([*overrides, f"cache_dir={self.cache}"], self.plugins)

    def context(self):
        """A RunContext as the runner hands to ``apply``: the shared baseline, its metrics and references."""
        from slimlab.context import RunContext

        self.applies += 1
        output = self.tmp / f"apply-{self.applies}"
        output.mkdir()
        ctx = RunContext(
            cfg=self.cfg, data=self.data, task=self.task, device="cpu", run_name="contract", config_hash="0",
            output_dir=output, steps=[self.step], baseline=self.baseline.model,
            baseline_metrics=dict(self.baseline.metrics), references=self.references,
        )  # fmt: skip
        return ctx

    def apply(self):
        """``apply`` on a copy of the baseline, seeded, through the runner's call (which checks the config)."""
        import copy

        import torch

        from slimlab.runner import apply_technique

        torch.manual_seed(int(self.cfg.seed))
        return apply_technique(self.step, copy.deepcopy(self.baseline.model), self.context())

    def model(self):
        """The shared applied model; a failed ``apply`` fails the check that needs it, with apply's reason."""
        from slimlab.errors import PluginError

        if isinstance(self.error, PluginError):  # its message says it all
            pytest.fail(str(self.error), pytrace=False)
        if self.error is not None:
            raise self.error
        return self.applied


@pytest.fixture(scope="class")
def slimlab_contract(request, slimlab_cache, tmp_path_factory) -> Shared:
    """The state a :class:`TechniqueContract` class's checks share: built once per class, in its mode."""
    import torch

    from slimlab.baseline import get_baseline
    from slimlab.config import compose
    from slimlab.plugin_manager import load_plugins
    from slimlab.runner import _build_data, plan
    from slimlab.training import score_baseline

    contract = request.cls()
    plugins = load_plugins()
    fast = not is_thorough(request.config, request.cls)
    cfg = compose([*contract.overrides(fast=fast), f"cache_dir={slimlab_cache}"], plugins)
    (step,) = plan(cfg, plugins).steps
    data = _build_data(cfg)
    task = plugins.task(data.task)
    batch = cfg.measure.eval_batch_size
    baseline = get_baseline(cfg, data, task, "cpu", batch)
    references = baseline.references or score_baseline(baseline.model, data, task, "cpu", batch)[1]
    tmp = tmp_path_factory.mktemp(f"contract-{contract.technique}")
    shared = Shared(contract, plugins, cfg, step, data, task, baseline, references, tmp, slimlab_cache)
    try:
        shared.applied = shared.apply()
    except Exception as error:  # each check that needs the model reports it
        shared.error = error
    torch.manual_seed(int(cfg.seed))
    return shared


class TechniqueContract:
    """The contract every slimlab technique meets. Subclass it, set ``technique`` (and ``options``)."""

    technique: str = ""
    options: list[str] = []  # overrides that keep the technique quick on the tiny model
    presets: list[str] = []  # technique presets (conf/technique/*.yaml or the plugin's own) that must compose
    thorough: bool | None = None  # None: --slimlab-thorough decides; True/False: this class always/never

    def overrides(self, fast: bool = False) -> list[str]:
        """The run's overrides: fast mode's tiny LeNet (unless ``options`` choose a model) or thorough mode's."""
        if not fast:
            return [*TINY, f"technique=[{self.technique}]", *self.options]
        own_model = any(option.startswith("model=") for option in self.options)
        return [*([] if own_model else FAST_MODEL), *FAST, f"technique=[{self.technique}]", *self.options]

    def step(self, cfg: Any, plugins: Any):
        from slimlab.runner import plan

        (step,) = plan(cfg, plugins).steps
        return step

    def test_registered_under_its_name(self, slimlab_plugins):
        assert self.technique, "set `technique` to the name the plugin registers"
        assert self.technique in slimlab_plugins.registry, sorted(slimlab_plugins.registry.names())

    def test_presets_compose_and_validate(self, slimlab_contract):
        from slimlab.runner import plan

        base = [o for o in slimlab_contract.contract.overrides(fast=True) if not o.startswith("technique")]
        for preset in [self.technique, *self.presets]:
            cfg = slimlab_contract.compose([*base, f"technique=[{preset}]"])
            assert plan(cfg, slimlab_contract.plugins).steps, preset

    def test_config_round_trips(self, slimlab_contract):
        from omegaconf import OmegaConf

        step = slimlab_contract.step
        node = OmegaConf.structured(step.config)
        assert OmegaConf.to_object(node) == step.config
        assert OmegaConf.to_object(OmegaConf.create(OmegaConf.to_yaml(node))) == OmegaConf.to_container(node)

    def test_apply_leaves_its_config_unchanged(self, slimlab_contract):
        """The run logs the configured options as its params: ``apply`` must not change them (the runner fails a
        run whose ``apply`` does, with this message)."""
        slimlab_contract.model()

    def _applied(self, cfg, plugins, data, model, tmp_path):
        import copy

        import torch

        from slimlab.runner import apply_technique

        torch.manual_seed(int(cfg.seed))
        step = self.step(cfg, plugins)
        ctx = context(cfg, data, tmp_path, copy.deepcopy(model), plugins)
        return apply_technique(step, model, ctx)

    def test_apply_returns_a_working_module(self, slimlab_contract):
        import torch

        model = slimlab_contract.model()
        assert isinstance(model, torch.nn.Module), f"apply returned a {type(model).__name__}, not a torch.nn.Module"
        with torch.inference_mode():
            output = model(first_test_inputs(slimlab_contract.data))
        assert output.shape == (8, 10) and torch.isfinite(output).all()

    def test_deterministic_under_a_seed(self, slimlab_contract):
        import torch

        first = slimlab_contract.model()
        again = slimlab_contract.apply()  # from the same baseline, under the same seed
        inputs = first_test_inputs(slimlab_contract.data)
        with torch.inference_mode():
            torch.testing.assert_close(again(inputs), first(inputs))

    def test_run_metrics_are_numbers(self, slimlab_contract):
        from slimlab.runner import run_metrics

        # The whole pipeline, its baseline the shared one (from the session's cache).
        primary, metrics = run_metrics(slimlab_contract.cfg, slimlab_contract.plugins)
        assert primary in metrics
        bad = {k: v for k, v in metrics.items() if not isinstance(v, int | float) or math.isnan(v)}
        assert not bad, bad

    def test_artifact_saves_and_reloads(self, slimlab_contract, tmp_path):
        import torch

        from slimlab.artifact import deployable, load_state, save_model

        model = slimlab_contract.model()
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
        """Thorough mode only (torch.export and an MLflow store: seconds per technique)."""
        import mlflow.pytorch
        import torch
        from mlflow import MlflowClient

        from slimlab.logged_model import log_compressed_model, portable, using_tracking_uri
        from slimlab.mlflow_tracking import experiment_id

        cfg = slimlab_compose(self.overrides())
        if any(option.startswith("model=") for option in self.options):  # the model the options chose
            from slimlab.baseline import build_model

            torch.manual_seed(0)
            tiny_model = build_model(cfg.model).eval()
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
