"""The hooks are the plugin API: each is documented, and each is called during a real run."""

from __future__ import annotations

import inspect

import pytest

import slimlab.hookspecs as hookspecs
from slimlab.config import compose
from slimlab.plugin_manager import load_plugins
from slimlab.runner import run


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
    cfg = compose([*overrides, "technique=[zero_small,quantize]", "tracking=none"], plugins)
    run(cfg, plugins)
    called = [call[0] for call in slimlab_example.CALLS]
    assert called == ["before_run", "after_technique", "after_technique", "after_run"]
    assert [c[1] for c in slimlab_example.CALLS if c[0] == "after_technique"] == ["zero_small", "quantize"]

    slimlab_example.CALLS.clear()
    cfg = compose([*overrides, "technique=[explode]", "tracking=none"], plugins)
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg, plugins)
    assert slimlab_example.CALLS[-1] == ("on_run_error", "boom")
    # register_techniques ran for the example plugin, and evaluate() results are merged (test_runner checks them).
    assert "zero_small" in plugins.registry
