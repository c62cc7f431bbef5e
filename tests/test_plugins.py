"""Plugin discovery through the real ``slimlab`` entry-point group, isolation of broken plugins, disabling."""

from __future__ import annotations

import json
import subprocess
import sys

from slimlab.plugin_manager import DISABLE_ENV, load_plugins
from tests.conftest import REPO, slimlab, write_plugin

BUILT_INS = {"mlflow", "summary", "prune", "quantize"}


def test_builtins_come_through_the_entry_point_group():
    plugins = load_plugins()
    infos = {info.name: info for info in plugins.infos}
    assert BUILT_INS <= set(infos)
    for name in BUILT_INS:
        assert infos[name].distribution == "slimlab"
        assert infos[name].status == "loaded"
    assert infos["prune"].techniques == ["prune"]
    assert "register_techniques" in infos["quantize"].hooks
    assert {"before_run", "after_run", "on_run_error"} <= set(infos["mlflow"].hooks)


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
    assert refused(site, "future") == "needs slimlab plugin API >=3,<4; this slimlab provides API 2.1"


def test_a_plugin_written_for_api_1_is_refused_with_a_pointer_to_the_change(tmp_path, monkeypatch):
    source = 'SLIMLAB_API = ">=1.1,<2"\n'
    site = write_plugin(tmp_path, "slimlab-old", "slimlab_old", source, {"old": "slimlab_old"})
    monkeypatch.syspath_prepend(str(site))
    reason = refused(site, "old")
    assert reason.startswith("needs slimlab plugin API >=1.1,<2; this slimlab provides API 2.1: in API 2 ")
    assert "docs/plugins.md" in reason and "\n" not in reason


def test_the_public_api_is_small_and_stable():
    import slimlab

    assert slimlab.__all__ == [
        "API_VERSION", "PROJECT", "Compressed", "ConfigError", "Data", "RunContext", "Task", "compress", "hookimpl",
        "hookspec",
    ]  # fmt: skip
    assert all(hasattr(slimlab, name) for name in slimlab.__all__)
    assert slimlab.API_VERSION == "2.1"


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
