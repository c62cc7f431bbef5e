"""Plugin manager factory: every plugin, built-in or not, comes through the ``slimlab`` entry-point group."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

from framework import PROJECT, hookspecs
from framework.errors import PluginError
from framework.registry import TechniqueRegistry

DISABLE_ENV = "SLIMLAB_DISABLE_PLUGINS"  # comma-separated plugin names

log = logging.getLogger(__name__)


@dataclass
class PluginInfo:
    """What ``slimlab plugins`` shows about one entry point."""

    name: str
    distribution: str
    version: str
    value: str
    techniques: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    status: str = "loaded"  # loaded | disabled | failed
    error: str | None = None


@dataclass
class Plugins:
    """The loaded plugin manager, its technique registry, and what was found."""

    manager: pluggy.PluginManager
    registry: TechniqueRegistry
    infos: list[PluginInfo]

    @property
    def hook(self):
        return self.manager.hook

    def hooks_without(self, names: Iterable[str]):
        """Hook callers that skip the named plugins (used for ``tracking=none`` and ``plugins.disable``)."""
        plugins = [p for n in names if (p := self.manager.get_plugin(n)) is not None]
        if not plugins:
            return self.manager.hook

        class _Subset:
            def __getattr__(_, hook_name):
                return self.manager.subset_hook_caller(hook_name, remove_plugins=plugins)

        return _Subset()


def disabled_from_env() -> list[str]:
    return [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]


def load_plugins(disable: Iterable[str] = ()) -> Plugins:
    """Load every ``slimlab`` entry point except the disabled ones, then register their techniques.

    A plugin that fails to import is reported (entry point and distribution)
    and skipped; the others still load. A plugin that implements a hook that
    does not exist fails with its name (``check_pending``).
    """
    disabled = set(disable) | set(disabled_from_env())
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    for entry_point in sorted(entry_points(group=PROJECT), key=lambda ep: ep.name):
        dist = entry_point.dist
        info = PluginInfo(
            name=entry_point.name,
            distribution=dist.name if dist else "?",
            version=dist.version if dist else "?",
            value=entry_point.value,
        )
        infos.append(info)
        if info.name in disabled:
            info.status = "disabled"
            continue
        if manager.get_plugin(info.name) is not None:
            info.status, info.error = "failed", "another entry point already uses this name"
            log.warning("slimlab plugin %r from %s: %s; skipped", info.name, info.distribution, info.error)
            continue
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken third-party plugin must not take slimlab down
            info.status, info.error = "failed", f"{type(error).__name__}: {error}"
            log.warning(
                "slimlab plugin %r (entry point %s = %s, distribution %s %s) failed to load: %s",
                info.name,
                PROJECT,
                info.value,
                info.distribution,
                info.version,
                info.error,
            )
            continue
        manager.register(plugin, name=info.name)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        name = manager.get_name(error.plugin) or repr(error.plugin)
        raise PluginError(f"plugin {name!r}: {error}") from None

    registry = TechniqueRegistry()
    for impl in manager.hook.register_techniques.get_hookimpls():
        impl.function(register=registry.register_for(impl.plugin_name))
    for info in infos:
        plugin = manager.get_plugin(info.name)
        if plugin is not None:
            info.hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
            info.techniques = registry.by_plugin(info.name)
    return Plugins(manager, registry, infos)
