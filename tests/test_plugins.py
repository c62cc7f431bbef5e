"""Plugin discovery through the real ``slimlab`` entry-point group, isolation of broken plugins, disabling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimlab.plugin_manager import DISABLE_ENV, load_plugins
from tests.conftest import REPO, slimlab, write_plugin

BUILT_INS = {"mlflow", "tracking", "summary", "prune", "quantize"}


def test_builtins_come_through_the_entry_point_group():
    plugins = load_plugins()
    infos = {info.name: info for info in plugins.infos}
    assert BUILT_INS <= set(infos)
    for name in BUILT_INS:
        assert infos[name].distribution == "slimlab"
        assert infos[name].status == "loaded"
    assert infos["prune"].techniques == ["prune"]
    assert "register_techniques" in infos["quantize"].hooks
    assert {"before_run", "after_run", "on_run_error"} <= set(infos["tracking"].hooks)  # the run recorder
    assert infos["mlflow"].trackers == ["mlflow"] and infos["mlflow"].hooks == ["register_tracking"]


def test_third_party_plugin_discovered(with_plugins):
    plugins = load_plugins()
    info = {i.name: i for i in plugins.infos}["example"]
    assert (info.distribution, info.version, info.status) == ("slimlab-example", "0.3.1", "loaded")
    assert info.techniques == ["zero_small"]
    assert "zero_small" in plugins.registry
    assert plugins.registry["zero_small"].plugin == "example"


def test_disable_by_name_and_env(with_plugins, monkeypatch):
    plugins = load_plugins(disable=["example"])
    assert "zero_small" not in plugins.registry
    assert {i.name: i.status for i in plugins.infos}["example"] == "disabled"
    monkeypatch.setenv(DISABLE_ENV, "prune, example")
    plugins = load_plugins()
    assert "prune" not in plugins.registry and "zero_small" not in plugins.registry
    assert "quantize" in plugins.registry


def test_plugin_that_fails_to_import_is_reported_and_others_load(tmp_path, monkeypatch, caplog):
    site = write_plugin(
        tmp_path, "slimlab-broken", "slimlab_broken", "import not_a_module_xyz\n", {"broken": "slimlab_broken"}
    )
    monkeypatch.syspath_prepend(str(site))
    plugins = load_plugins()
    info = {i.name: i for i in plugins.infos}["broken"]
    assert info.status == "failed" and "not_a_module_xyz" in info.error
    assert "slimlab-broken" in caplog.text and "slimlab_broken" in caplog.text  # entry point and distribution
    assert {"prune", "quantize"} <= set(plugins.registry.names())


def refused(site, name: str) -> str:
    """The error of plugin ``name`` after loading with ``site`` on the path; the built-ins must still work."""
    plugins = load_plugins()
    info = {i.name: i for i in plugins.infos}[name]
    assert info.status == "failed"
    assert {"prune", "quantize", "distill", "place"} <= set(plugins.registry.names())
    return info.error


def test_misspelled_hook_is_refused_with_the_plugin_name(tmp_path, monkeypatch, caplog):
    source = "from slimlab import hookimpl\n\n@hookimpl\ndef befor_run(ctx):\n    pass\n"
    site = write_plugin(tmp_path, "slimlab-typo", "slimlab_typo", source, {"typo": "slimlab_typo"})
    monkeypatch.syspath_prepend(str(site))
    assert "implements befor_run, which is no slimlab hook; hooks: register_techniques" in refused(site, "typo")
    assert "'typo'" in caplog.text and "slimlab-typo" in caplog.text  # the plugin and its distribution
    result = slimlab("plugins", cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert result.returncode == 0 and "typo  (slimlab-typo 0.3.1" in result.stdout and "befor_run" in result.stdout


def test_hook_with_a_wrong_signature_is_refused(tmp_path, monkeypatch):
    source = "from slimlab import hookimpl\n\n@hookimpl\ndef before_run(ctx, budget):\n    pass\n"
    site = write_plugin(tmp_path, "slimlab-sig", "slimlab_sig", source, {"sig": "slimlab_sig"})
    monkeypatch.syspath_prepend(str(site))
    error = refused(site, "sig")
    assert "before_run" in error and "budget" in error


DUPLICATE = """
    from dataclasses import dataclass

    from slimlab import hookimpl


    @dataclass
    class Config:
        amount: float = 0.5


    @hookimpl
    def register_techniques(register):
        register("{name}", Config, lambda model, config, ctx: model)
"""


def test_a_technique_name_already_taken_is_refused_never_shadowed(tmp_path, monkeypatch, with_plugins):
    site = write_plugin(
        tmp_path, "slimlab-copycat", "slimlab_copycat", DUPLICATE.format(name="prune"), {"copycat": "slimlab_copycat"}
    )
    twin = DUPLICATE.format(name="zero_small")
    write_plugin(tmp_path, "slimlab-twin", "slimlab_twin", twin, {"twin": "slimlab_twin"})
    monkeypatch.syspath_prepend(str(site))
    assert "registers technique 'prune', already registered by 'prune'" in refused(site, "copycat")
    assert "registers technique 'zero_small', already registered by 'example'" in refused(site, "twin")
    plugins = load_plugins()
    assert plugins.registry["prune"].plugin == "prune" and plugins.registry["zero_small"].plugin == "example"
    # runs go on, with the first plugin's technique
    assert slimlab("run", "technique=[zero_small]", "tracking=none", "train.epochs=1", "measure.repeats=5",
                   cwd=tmp_path, env={"PYTHONPATH": f"{site}:{with_plugins}"}).returncode == 0  # fmt: skip


def test_a_plugin_for_another_hook_api_is_refused_with_the_versions_it_needs(tmp_path, monkeypatch):
    source = 'SLIMLAB_API = ">=3,<4"\n'
    site = write_plugin(tmp_path, "slimlab-future", "slimlab_future", source, {"future": "slimlab_future"})
    monkeypatch.syspath_prepend(str(site))
    assert refused(site, "future") == "needs slimlab plugin API >=3,<4; this slimlab provides API 2.3"


def test_a_plugin_written_for_api_1_is_refused_with_a_pointer_to_the_change(tmp_path, monkeypatch):
    source = 'SLIMLAB_API = ">=1.1,<2"\n'
    site = write_plugin(tmp_path, "slimlab-old", "slimlab_old", source, {"old": "slimlab_old"})
    monkeypatch.syspath_prepend(str(site))
    reason = refused(site, "old")
    assert reason.startswith("needs slimlab plugin API >=1.1,<2; this slimlab provides API 2.3: in API 2 ")
    assert "docs/plugins.md" in reason and "\n" not in reason


def test_the_public_api_is_small_and_stable():
    import slimlab

    assert slimlab.__all__ == [
        "API_VERSION", "PROJECT", "Compressed", "ConfigError", "Data", "RunContext", "Task", "compress", "hookimpl",
        "hookspec",
    ]  # fmt: skip
    assert all(hasattr(slimlab, name) for name in slimlab.__all__)
    assert slimlab.API_VERSION == "2.3"


def test_plugins_json_lists_builtins_and_third_party(plugin_site, tmp_path):
    result = slimlab("plugins", "--json", cwd=tmp_path, env={"PYTHONPATH": str(plugin_site)})
    assert result.returncode == 0, result.stderr
    listed = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert all(listed[name]["distribution"] == "slimlab" for name in BUILT_INS)
    assert listed["example"]["distribution"] == "slimlab-example"
    assert listed["example"]["techniques"] == ["zero_small"]
    assert listed["example"]["tasks"] == ["counted_classification"]
    assert listed["example"]["options"] == ["data=example_digits", "model=example_lenet"]
    assert listed["tasks"]["tasks"] == ["classification", "embedding", "language_modeling", "regression"]


def test_help_and_plugins_do_not_import_torch_or_mlflow():
    """Start-up stays fast because the heavy libraries load only when a run needs them."""
    code = (
        "import sys, contextlib, io\n"
        "from slimlab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help']); main(['plugins'])\n"
        "import slimlab.testing\n"  # the conformance kit, which pytest loads in every test session
        "print(sorted(m for m in ('torch', 'mlflow', 'torchao', 'sklearn') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- a broken plugin is refused, whatever it raises, with everything it registered ---------------------------------

TECHNIQUE = """
from dataclasses import dataclass

from slimlab import hookimpl


@dataclass
class HalfConfig:
    amount: float = 0.5


def half(model, config, ctx):
    return model
"""

BROKEN = {  # plugin name -> (module source, what its error says)
    "zerodiv": (
        TECHNIQUE + "\n@hookimpl\ndef register_techniques(register):\n"
        "    register('half_zerodiv', HalfConfig, half)\n    1 / 0\n",
        "register_techniques raised ZeroDivisionError: division by zero (slimlab_zerodiv.py, line 18)",
    ),
    "importer": (
        TECHNIQUE + "\n@hookimpl\ndef register_techniques(register):\n"
        "    register('half_importer', HalfConfig, half)\n    import not_installed_xyz  # noqa\n",
        "register_techniques raised ModuleNotFoundError: No module named 'not_installed_xyz'",
    ),
    "badcall": (
        TECHNIQUE + "\n@hookimpl\ndef register_techniques(register):\n    register('half_badcall', HalfConfig)\n",
        "register_techniques raised TypeError: ",
    ),
    "tasktype": (  # its technique registered fine; its register_tasks raises
        TECHNIQUE + "\n@hookimpl\ndef register_techniques(register):\n    register('half_tasktype', HalfConfig, half)\n"
        "\n@hookimpl\ndef register_tasks(register):\n    register('half_task', lambda: None)\n"
        "    raise TypeError('tasks are broken')\n",
        "register_tasks raised TypeError: tasks are broken",
    ),
    "optionerr": (  # a technique and a task registered fine; its register_options raises
        TECHNIQUE
        + "\n@hookimpl\ndef register_techniques(register):\n    register('half_optionerr', HalfConfig, half)\n"
        "\n@hookimpl\ndef register_tasks(register):\n    register('half_task2', lambda: None)\n"
        "\n@hookimpl\ndef register_options(register):\n"
        "    register('model', 'half_model', {'_target_': 'x.y'})\n    raise KeyError('zoo')\n",
        "register_options raised KeyError: 'zoo'",
    ),
    "noregister": (
        TECHNIQUE + "\n@hookimpl\ndef register_techniques():\n    pass\n",
        "register_techniques takes no `register` argument; define it as def register_techniques(register)",
    ),
    "wrapper": (
        TECHNIQUE + "\n@hookimpl(wrapper=True)\ndef register_techniques(register):\n"
        "    register('half_wrapper', HalfConfig, half)\n    return (yield)\n",
        "register_techniques is a hook wrapper",
    ),
    "badschema": (
        TECHNIQUE + "\nclass Opaque:\n    pass\n\n\n@dataclass\nclass OpaqueConfig:\n    thing: Opaque = None\n"
        "\n\n@hookimpl\ndef register_techniques(register):\n    register('half_badschema', OpaqueConfig, half)\n",
        "the schema of technique 'half_badschema' cannot be a config: ValidationError: Unexpected type annotation",
    ),
    "syntax": ("def broken(:\n", "failed to import: SyntaxError: "),
    "exits": ("import sys\n\nsys.exit(3)\n", "failed to import: SystemExit: 3 (slimlab_exits.py, line 3)"),
    "raises": ("raise RuntimeError('no GPU driver')\n", "failed to import: RuntimeError: no GPU driver"),
}
HALF_REGISTERED = {"half_zerodiv", "half_importer", "half_badcall", "half_tasktype", "half_optionerr", "half_wrapper"}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """One site directory with every kind of broken plugin, and one module under two entry-point names."""
    site = tmp_path_factory.mktemp("broken-site")
    for name, (source, _) in BROKEN.items():
        write_plugin(site, f"slimlab-{name}", f"slimlab_{name}", source, {name: f"slimlab_{name}"})
    twice = TECHNIQUE + "\n@hookimpl\ndef register_techniques(register):\n    register('twice', HalfConfig, half)\n"
    write_plugin(site, "slimlab-twice", "slimlab_twice", twice, {"twice": "slimlab_twice", "twice2": "slimlab_twice"})
    clash = twice.replace("'twice'", "'clash'")
    write_plugin(site, "slimlab-clash", "slimlab_clash", clash, {"tasks": "slimlab_clash"})  # a built-in's name
    return site


def test_broken_plugins_are_refused_with_everything_they_registered(broken_site, monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(broken_site))
    plugins = load_plugins()
    infos = {info.name: info for info in plugins.infos}
    for name, (_, error) in BROKEN.items():
        info = infos[name]
        assert (info.status, info.techniques, info.tasks, info.options) == ("failed", [], [], []), name
        assert error in info.error and "\n" not in info.error, (name, info.error)
        assert plugins.manager.get_plugin(name) is None  # its other hooks are not called either
        assert f"'{name}'" in caplog.text and f"slimlab-{name}" in caplog.text  # a warning naming it and its dist
    assert not HALF_REGISTERED & set(plugins.registry.names())
    assert not {"half_task", "half_task2"} & set(plugins.tasks)
    assert ("model", "half_model") not in plugins.options
    # the same module under a second name is refused; the first keeps its technique
    assert infos["twice"].status == "loaded" and infos["twice"].techniques == ["twice"]
    assert infos["twice2"].status == "failed"
    assert infos["twice2"].error == "slimlab_twice is plugin 'twice' already: one module cannot be two plugins"
    # an entry point named like a built-in is refused, and shows nothing of the built-in's
    (clash,) = [info for info in plugins.infos if info.distribution == "slimlab-clash"]
    assert (clash.name, clash.status, clash.tasks, clash.hooks) == ("tasks", "failed", [], [])
    assert "clash" not in plugins.registry
    assert {"prune", "quantize", "distill", "place"} <= set(plugins.registry.names())
    assert {"classification", "regression"} <= set(plugins.tasks)


def test_the_cli_lists_broken_plugins_as_failed_and_still_runs(broken_site, tmp_path, overrides):
    env = {"PYTHONPATH": str(broken_site)}
    listed = slimlab("plugins", "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    infos = {entry["name"]: entry for entry in json.loads(listed.stdout)}
    for name, (_, error) in BROKEN.items():
        assert infos[name]["status"] == "failed" and error in infos[name]["error"], name
        assert infos[name]["techniques"] == [] and infos[name]["hooks"] == []
    assert infos["prune"]["status"] == "loaded"

    ran = slimlab("run", *overrides, "technique=[prune]", "tracking=none", cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "slimlab plugin 'zerodiv'" in ran.stderr and "division by zero" in ran.stderr  # a warning, not a crash

    half = slimlab("run", *overrides, "technique=[half_zerodiv]", "tracking=none", cwd=tmp_path, env=env)
    assert half.returncode == 2
    error = [line for line in half.stderr.splitlines() if line.startswith("slimlab: error:")]
    assert len(error) == 1 and "unknown technique 'half_zerodiv'" in error[0], half.stderr[-2000:]
    assert "zerodiv (slimlab-zerodiv): register_techniques raised ZeroDivisionError" in error[0]


def test_a_plugins_options_do_not_outlive_the_launch_that_loaded_it(with_plugins):
    """In one process (a notebook, the suite's in-process CLI), a launch without a plugin must not compose the model
    option an earlier launch's plugin registered in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    from slimlab.hydra_app import _register

    def models() -> set[str]:
        return set(ConfigStore.instance().repo.get("model", {}))

    _register(load_plugins())
    assert "example_lenet.yaml" in models()
    _register(load_plugins(["example"]))
    assert "example_lenet.yaml" not in models()


def test_slimlab_plugins_lists_the_tracking_backends(tmp_path):
    result = slimlab("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mlflow  (slimlab " in result.stdout and "    trackers: mlflow" in result.stdout
