"""Shared fixtures: a real sqlite MLflow store in a temp dir, real Hydra composition, tiny settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLIMLAB = [sys.executable, "-m", "slimlab"]

# Small but real: fewer epochs and repeats than the defaults, same code paths.
FAST = ["train.epochs=2", "measure.repeats=5", "measure.warmup=1"]
# For sweeps that test orchestration, not models: the MLflow model's torch.export costs about 3 s in each process.
NO_MLFLOW_MODEL = "tracking.log_model=false"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One baseline cache for the whole session, so each distinct baseline trains once."""
    return tmp_path_factory.mktemp("baseline-cache")


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# What a test that checks the logged MLflow model adds to `overrides`.
LOG_MODEL = "tracking.log_model=true"


@pytest.fixture
def overrides(cache_dir, store) -> list[str]:
    """A fast run tracked in the test's own store; without the MLflow model (torch.export: seconds per run),
    which the tests of the logged model turn back on with ``LOG_MODEL``."""
    return [*FAST, f"cache_dir={cache_dir}", f"tracking.uri={store}", "experiment_name=tests", NO_MLFLOW_MODEL]


def slimlab(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    """Run the real ``slimlab`` command line in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    extra = dict(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), extra.pop("PYTHONPATH", None)]))
    full_env.update(extra)
    return subprocess.run([*SLIMLAB, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    """Poll an MLflow server's ``/health`` until it answers; fail if ``process`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                assert response.status == 200
                return
        except OSError:
            assert process.poll() is None, f"the server exited with code {process.returncode}"
            assert time.monotonic() < deadline, f"{url} did not answer /health in {seconds:g} s"
            time.sleep(0.5)


def write_plugin(site: Path, dist: str, module: str, source: str, entry_points: dict[str, str]) -> Path:
    """Install a plugin the way pip would, minus pip: a module plus a ``.dist-info`` with entry points.

    ``importlib.metadata`` discovers it from ``site`` once ``site`` is on the path: real discovery, no patching.
    """
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    lines = "\n".join(f"{name} = {value}" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[slimlab]\n{lines}\n")
    return site


EXAMPLE_PLUGIN = """
    \"\"\"A third-party plugin as a user would write it: one technique, every hook.\"\"\"
    from dataclasses import dataclass

    from slimlab import hookimpl

    CALLS = []


    @dataclass
    class ZeroSmallConfig:
        threshold: float = 0.01

        def __post_init__(self):
            if self.threshold < 0:
                raise ValueError(f"threshold must be >= 0, got {self.threshold}")


    def zero_small(model, config, ctx):
        import torch

        with torch.no_grad():
            for parameter in model.parameters():
                parameter[parameter.abs() < config.threshold] = 0
        return model


    @hookimpl
    def register_techniques(register):
        register("zero_small", ZeroSmallConfig, zero_small, label=lambda c: f"zero_small({c.threshold:g})")


    @hookimpl
    def check_config(cfg, host):
        from slimlab import ConfigError

        CALLS.append(("check_config", host))
        if "zero_small" in cfg.technique and cfg.technique.zero_small.threshold > 1:  # a plugin's own limit
            raise ConfigError(f"technique.zero_small.threshold={cfg.technique.zero_small.threshold}: at most 1")


    @hookimpl
    def before_run(ctx):
        CALLS.append(("before_run", ctx.run_name))


    @hookimpl
    def after_technique(ctx, name, model, metrics):
        CALLS.append(("after_technique", name))


    @hookimpl
    def evaluate(model):
        return {"example_layers": float(sum(1 for _ in model.modules()))}


    @hookimpl
    def after_run(ctx, metrics):
        CALLS.append(("after_run", metrics["accuracy"]))


    @hookimpl
    def on_run_error(error):
        CALLS.append(("on_run_error", str(error)))


    @hookimpl
    def register_options(register):  # a zoo: a model and a data option
        lenet = {"_target_": "slimlab.zoo.models.LeNet", "conv1": 4, "conv2": 8, "hidden": 32, "num_classes": 10}
        register("model", "example_lenet", {**lenet, "checkpoint": None, "pretrained": None})
        register("data", "example_digits", {"_target_": "slimlab_example.digits_counting_errors", "seed": 0})


    def digits_counting_errors(seed=0):
        from slimlab.zoo.datasets import digits

        data = digits(seed=seed)
        data.task = "counted_classification"
        return data


    @hookimpl
    def register_tasks(register):
        from slimlab.tasks import Classification

        class Counted(Classification):
            \"\"\"Classification that also reports how many test rows are wrong.\"\"\"

            name = "counted_classification"

            def evaluate(self, batches):
                batches = list(batches)
                metrics = super().evaluate(batches)
                wrong = sum(int((b.output.argmax(1) != b.target).sum()) for b in batches)
                return {**metrics, "errors": float(wrong)}

        register("counted_classification", Counted)
"""

EXPLODE_PLUGIN = """
    from dataclasses import dataclass

    from slimlab import hookimpl


    @dataclass
    class ExplodeConfig:
        message: str = "boom"


    def explode(model, config, ctx):
        raise RuntimeError(config.message)


    @hookimpl
    def register_techniques(register):
        register("explode", ExplodeConfig, explode)
"""


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A site directory holding two third-party plugin distributions."""
    site = tmp_path_factory.mktemp("site")
    write_plugin(site, "slimlab-example", "slimlab_example", EXAMPLE_PLUGIN, {"example": "slimlab_example"})
    write_plugin(site, "slimlab-explode", "slimlab_explode", EXPLODE_PLUGIN, {"explode": "slimlab_explode"})
    return site


@pytest.fixture
def with_plugins(plugin_site, monkeypatch) -> Path:
    """The third-party plugins importable and discoverable in this process."""
    monkeypatch.syspath_prepend(str(plugin_site))
    return plugin_site


def venv_seeing(root: Path, names: list[str]) -> dict[str, str]:
    """A new venv with slimlab pip-installed (``--no-deps``) and ``names`` (entries of this suite's site-packages)
    visible through a path file: installed packages without downloading them. Returns the environment to run in."""
    import sysconfig

    venv = root / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)  # type: ignore[attr-defined]
    site, deps = Path(sysconfig.get_paths()["purelib"]), root / "deps"
    deps.mkdir()
    for name in sorted(names):
        if (site / name).exists() and not name.endswith(".pth"):
            (deps / name).symlink_to(site / name)
    (next((venv / "lib").glob("python*/site-packages")) / "slimlab_deps.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    subprocess.run([venv / "bin" / "pip", "install", "--quiet", "--no-deps", str(REPO)], check=True, env=env)
    return env
