"""The hooks are the plugin API: each is documented, and each is called during a real run."""

from __future__ import annotations

import inspect

import pytest

import slimlab.hookspecs as hookspecs
from slimlab.config import compose
from slimlab.plugin_manager import load_plugins
from slimlab.runner import run, run_metrics


def test_every_hook_documents_when_args_and_return():
    names = hookspecs.hook_names()
    assert names, "no hooks found"
    for name in names:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "When:" in doc, f"{name}: say when it is called"
        assert "Return" in doc, f"{name}: say what it returns"
        for parameter in inspect.signature(getattr(hookspecs, name)).parameters:
            assert f"``{parameter}``" in doc, f"{name}: document argument {parameter!r}"


def test_every_hook_is_called_in_a_run(with_plugins, overrides):
    import slimlab_example

    slimlab_example.CALLS.clear()
    plugins = load_plugins()
    cfg = compose(
        [*overrides, "technique=[zero_small,quantize]", "tracking=none", "technique.quantize.allow_slower=true"],
        plugins,
    )
    run(cfg, plugins)
    called = [call[0] for call in slimlab_example.CALLS]
    assert called == ["check_config", "before_run", "after_technique", "after_technique", "after_run"]
    assert slimlab_example.CALLS[0] == ("check_config", True)  # host: the run is on this machine
    assert [c[1] for c in slimlab_example.CALLS if c[0] == "after_technique"] == ["zero_small", "quantize"]

    slimlab_example.CALLS.clear()
    cfg = compose([*overrides, "technique=[explode]", "tracking=none"], plugins)
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg, plugins)
    assert slimlab_example.CALLS[-1] == ("on_run_error", "boom")
    # register_techniques ran for the example plugin, and evaluate() results are merged (test_runner checks them).
    assert "zero_small" in plugins.registry


def test_check_config_refuses_before_any_work_and_is_skipped_for_plugins_left_out(with_plugins, overrides, tmp_path):
    import slimlab_example

    from slimlab.errors import ConfigError
    from slimlab.runner import plan

    plugins = load_plugins()
    slimlab_example.CALLS.clear()
    cfg = compose([*overrides, "technique=[zero_small]", "technique.zero_small.threshold=2"], plugins)
    with pytest.raises(ConfigError, match=r"technique.zero_small.threshold=2.0: at most 1"):
        run(cfg, plugins)
    assert [call[0] for call in slimlab_example.CALLS] == ["check_config"]  # no before_run: nothing recorded
    assert not (tmp_path / "mlflow.db").exists()

    slimlab_example.CALLS.clear()  # plugins.disable leaves the plugin's hooks out, loaded or not
    plan(compose([*overrides, "technique=[prune]", "plugins.disable=[example]"], plugins), plugins, host=False)
    plan(compose([*overrides, "technique=[prune]"], plugins), plugins, host=False)
    assert slimlab_example.CALLS == [("check_config", False)]


def test_a_check_config_that_crashes_is_a_plugin_error_naming_it(tmp_path, monkeypatch, overrides):
    from slimlab.errors import PluginError
    from slimlab.runner import plan
    from tests.conftest import write_plugin

    source = """
from slimlab import hookimpl

@hookimpl
def check_config(cfg, host):
    raise RuntimeError("cannot reach the licence server\\nretry later")
"""
    site = write_plugin(tmp_path, "slimlab-flaky", "slimlab_flaky", source, {"flaky": "slimlab_flaky"})
    monkeypatch.syspath_prepend(str(site))
    plugins = load_plugins()
    with pytest.raises(
        PluginError, match=r"^plugin flaky's check_config raised RuntimeError: cannot reach [^\n]+server$"
    ):
        plan(compose([*overrides, "technique=[]"], plugins), plugins)
    plan(compose([*overrides, "technique=[]", "plugins.disable=[flaky]"], plugins), plugins)  # left out


def test_a_plugin_ships_model_and_data_options_and_a_task(with_plugins, overrides):
    plugins = load_plugins()
    assert ("model", "example_lenet") in plugins.options and "counted_classification" in plugins.tasks
    cfg = compose([*overrides, "model=example_lenet", "data=example_digits", "technique=[]", "tracking=none"], plugins)
    primary, metrics = run_metrics(cfg, plugins)
    assert primary == "accuracy"
    assert metrics["param_count"] == 25 * 4 + 4 + 25 * 4 * 8 + 8 + 128 * 32 + 32 + 32 * 10 + 10
    assert metrics["errors"] == round((1 - metrics["accuracy"]) * 450)  # the plugin's task's own metric
    from slimlab.hydra_app import app_help

    assert "example_lenet" in app_help([], plugins)


def test_a_plugin_option_that_takes_a_builtin_name_is_refused(tmp_path, monkeypatch):
    from tests.conftest import write_plugin

    source = """
from slimlab import hookimpl

@hookimpl
def register_options(register):
    register("model", "lenet", {"_target_": "slimlab.zoo.models.MLP"})
"""
    site = write_plugin(tmp_path, "slimlab-zoo-clash", "slimlab_zoo_clash", source, {"zoo_clash": "slimlab_zoo_clash"})
    monkeypatch.syspath_prepend(str(site))
    (info,) = [i for i in load_plugins().infos if i.name == "zoo_clash"]
    assert info.status == "failed" and info.error == (
        "plugin 'zoo_clash' registers model=lenet, which slimlab's conf/ already has"
    )
