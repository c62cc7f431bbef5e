"""Plugin discovery through the real ``slimlab`` entry-point group, isolation of broken plugins, disabling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from framework.errors import PluginError
from framework.plugins import DISABLE_ENV, load_plugins
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


def test_misspelled_hook_fails_with_the_plugin_name(tmp_path, monkeypatch):
    source = "from framework import hookimpl\n\n@hookimpl\ndef befor_run(ctx):\n    pass\n"
    site = write_plugin(tmp_path, "slimlab-typo", "slimlab_typo", source, {"typo": "slimlab_typo"})
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError, match="'typo'.*befor_run"):
        load_plugins()
    result = slimlab("plugins", cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert result.returncode == 2 and "typo" in result.stderr and "Traceback" not in result.stderr


def test_plugins_json_lists_builtins_and_third_party(plugin_site, tmp_path):
    result = slimlab("plugins", "--json", cwd=tmp_path, env={"PYTHONPATH": str(plugin_site)})
    assert result.returncode == 0, result.stderr
    listed = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert all(listed[name]["distribution"] == "slimlab" for name in BUILT_INS)
    assert listed["example"]["distribution"] == "slimlab-example"
    assert listed["example"]["techniques"] == ["zero_small"]


def test_help_and_plugins_do_not_import_torch_or_mlflow():
    """Start-up stays fast because the heavy libraries load only when a run needs them."""
    code = (
        "import sys, contextlib, io\n"
        "from framework.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help']); main(['plugins'])\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'torchao', 'sklearn') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
