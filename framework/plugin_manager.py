"""Plugin manager factory: every plugin, built-in or not, comes through the ``slimlab`` entry-point group."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from slimlab import API_VERSION, PROJECT, hookspecs
from slimlab.errors import ConfigError, PluginError
from slimlab.registry import TechniqueRegistry

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
    tasks: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)  # "model=NAME", "data=NAME"
    hooks: list[str] = field(default_factory=list)
    status: str = "loaded"  # loaded | disabled | failed
    error: str | None = None


@dataclass
class Plugins:
    """The loaded plugin manager, its technique and task registries, and what was found."""

    manager: pluggy.PluginManager
    registry: TechniqueRegistry
    infos: list[PluginInfo]
    tasks: dict[str, tuple[str, Callable[[], Any]]] = field(default_factory=dict)  # name -> (plugin, factory)
    options: dict[tuple[str, str], tuple[str, dict[str, Any]]] = field(default_factory=dict)  # (group, name) -> ...

    def task(self, spec: Any) -> Any:
        """The task a Data names: a registered name, or a task object used as it is."""
        from slimlab.tasks import check_task

        if isinstance(spec, str):
            if spec not in self.tasks:
                valid = ", ".join(sorted(self.tasks)) or "none"
                raise ConfigError(f"the data's task {spec!r} is unknown; registered tasks: {valid}")
            task = self.tasks[spec][1]()
        else:
            task = spec
        try:
            check_task(task)
        except TypeError as error:
            raise ConfigError(str(error)) from None
        return task

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


def _api_mismatch(plugin: object) -> str | None:
    """Why ``plugin``'s declared ``SLIMLAB_API`` excludes this slimlab's hook API, or None."""
    wanted = getattr(plugin, "SLIMLAB_API", None)
    if wanted is None:
        return None
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        accepted = SpecifierSet(str(wanted))
    except InvalidSpecifier:
        return f"SLIMLAB_API = {wanted!r} is not a version specifier (e.g. '>=1,<2')"
    if API_VERSION in accepted:
        return None
    if any(version in accepted for version in ("1.0", "1.1", "1.9")):  # written for API 1
        return (
            f"needs slimlab plugin API {wanted}; this slimlab provides API {API_VERSION}: in API 2 slimlab is "
            "imported as `slimlab`, the run's data is a slimlab.data.Data of loaders and ctx.task holds the loss and "
            "metrics (docs/plugins.md, 'Changes in API 2')"
        )
    return f"needs slimlab plugin API {wanted}; this slimlab provides API {API_VERSION}"


def _unknown_hooks(manager: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hook implementations of ``plugin`` that match no hook of ``hookspecs`` (a misspelled name)."""
    return sorted(caller.name for caller in manager.get_hookcallers(plugin) or [] if caller.spec is None)


def _refuse(manager: pluggy.PluginManager, info: PluginInfo, error: str) -> None:
    """Take a plugin out, say why (naming it and its distribution); the others keep working."""
    if manager.get_plugin(info.name) is not None:
        manager.unregister(name=info.name)
    info.status, info.error = "failed", error
    log.warning(
        "slimlab plugin %r (entry point %s = %s, distribution %s %s) is not used: %s",
        info.name, PROJECT, info.value, info.distribution, info.version, error,
    )  # fmt: skip


def load_plugins(disable: Iterable[str] = ()) -> Plugins:
    """Load every ``slimlab`` entry point except the disabled ones, then register their techniques.

    A plugin that fails to import, declares an incompatible ``SLIMLAB_API``, implements a hook that does
    not exist or with arguments the hook does not have, or registers a technique name another plugin
    already took, is refused: reported with its entry point and distribution, and left out; the others
    still load. slimlab's own plugins load first, so a third-party plugin cannot take a built-in's name.
    """
    disabled = set(disable) | set(disabled_from_env())
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []

    def order(entry_point) -> tuple[bool, str]:
        return (entry_point.dist is None or entry_point.dist.name != PROJECT, entry_point.name)

    for entry_point in sorted(entry_points(group=PROJECT), key=order):
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
            hint = ""
            if isinstance(error, ModuleNotFoundError) and error.name in ("framework", "plugins"):
                hint = " (a plugin written for API 1: slimlab is imported as `slimlab` since API 2, docs/plugins.md)"
            _refuse(manager, info, f"failed to import: {type(error).__name__}: {error}{hint}")
            continue
        mismatch = _api_mismatch(plugin)
        if mismatch:
            _refuse(manager, info, mismatch)
            continue
        try:
            manager.register(plugin, name=info.name)
        except pluggy.PluginValidationError as error:  # a hook implemented with arguments it does not have
            _refuse(manager, info, str(error))
            continue
        unknown = _unknown_hooks(manager, plugin)
        if unknown:
            valid = ", ".join(hookspecs.hook_names())
            _refuse(manager, info, f"implements {', '.join(unknown)}, which is no slimlab hook; hooks: {valid}")

    registry = TechniqueRegistry()
    by_name = {info.name: info for info in infos}
    for impl in manager.hook.register_techniques.get_hookimpls():  # registration order: built-ins first
        try:
            impl.function(register=registry.register_for(impl.plugin_name))
        except PluginError as error:  # e.g. a technique name another plugin already registered
            registry.remove_plugin(impl.plugin_name)
            _refuse(manager, by_name[impl.plugin_name], str(error))
    tasks = _collect(manager, "register_tasks", by_name, registry, _task_register)
    options = _collect(manager, "register_options", by_name, registry, _option_register)
    tasks = {name: entry for name, entry in tasks.items() if manager.get_plugin(entry[0]) is not None}
    for info in infos:
        plugin = manager.get_plugin(info.name)
        if plugin is None:  # disabled, or refused at any step above
            continue
        info.hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
        info.techniques = registry.by_plugin(info.name)
        info.tasks = sorted(name for name, (owner, _) in tasks.items() if owner == info.name)
        info.options = sorted(f"{group}={name}" for (group, name), (owner, _) in options.items() if owner == info.name)
    return Plugins(manager, registry, infos, tasks, options)


RegisterOption = Callable[[str, str, dict[str, Any]], None]  # register(group, name, node)
OPTION_GROUPS = ("model", "data")
Offered = dict[Any, tuple[str, Any]]  # what a registration hook offered: key -> (plugin, value)


def _collect(
    manager: pluggy.PluginManager,
    hook: str,
    by_name: dict[str, PluginInfo],
    registry: TechniqueRegistry,
    make_register: Callable[[str, Offered, Offered], Callable[..., None]],
) -> Offered:
    """Call every loaded plugin's registration ``hook`` with a ``register`` made by ``make_register(plugin,
    offered, collected)``. A plugin whose registration raises ``PluginError`` is refused, its techniques and
    what it offered dropped; the others keep theirs."""
    collected: Offered = {}
    for impl in getattr(manager.hook, hook).get_hookimpls():
        if manager.get_plugin(impl.plugin_name) is None:  # refused earlier
            continue
        offered: Offered = {}
        try:
            impl.function(register=make_register(impl.plugin_name, offered, collected))
        except PluginError as error:
            registry.remove_plugin(impl.plugin_name)
            _refuse(manager, by_name[impl.plugin_name], str(error))
            continue
        collected.update(offered)
    return collected


def _task_register(plugin: str, offered: Offered, collected: Offered) -> Callable[..., None]:
    def register(name: str, factory: Callable[[], Any]) -> None:
        owner = collected.get(name, offered.get(name, (None,)))[0]
        if owner is not None:
            raise PluginError(f"plugin {plugin!r} registers task {name!r}, already registered by {owner!r}")
        offered[name] = (plugin, factory)

    return register


def _option_register(plugin: str, offered: Offered, collected: Offered) -> Callable[..., None]:
    from slimlab.config import CONFIG_DIR

    def register(group: str, name: str, node: dict[str, Any]) -> None:
        if group not in OPTION_GROUPS:
            raise PluginError(f"plugin {plugin!r} registers {group}={name}; groups: {', '.join(OPTION_GROUPS)}")
        if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
            raise PluginError(f"plugin {plugin!r}: option {group}={name} needs a dict with a _target_")
        owner = collected.get((group, name), offered.get((group, name), (None,)))[0]
        if (CONFIG_DIR / group / f"{name}.yaml").exists():
            owner = "slimlab's conf/"
        if owner is not None:
            raise PluginError(f"plugin {plugin!r} registers {group}={name}, which {owner} already has")
        offered[(group, name)] = (plugin, {"name": name, **node})

    return register
