"""Plugin manager factory: every plugin, built-in or not, comes through the ``slimlab`` entry-point group."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pluggy

from slimlab import API_VERSION, PROJECT, hookspecs
from slimlab.errors import ConfigError, PluginError
from slimlab.registry import TechniqueRegistry

DISABLE_ENV = "SLIMLAB_DISABLE_PLUGINS"  # comma-separated plugin names

log = logging.getLogger(__name__)
_SLIMLAB_DIR = Path(__file__).resolve().parent  # frames in here are not the plugin's


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
    trackers: list[str] = field(default_factory=list)  # tracking backends: tracking.backend=NAME
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
    trackers: dict[str, tuple[str, Callable[[str | None], Any]]] = field(default_factory=dict)  # name -> (plugin, f)

    def tracking_store(self, backend: str, uri: str | None = None) -> Any:
        """A store of tracking backend ``backend`` at ``uri`` (None: the backend's default); a ``TrackingStore``."""
        if backend not in self.trackers:
            valid = ", ".join(["none", *sorted(self.trackers)])
            raise ConfigError(f"tracking.backend={backend}: no plugin registers it; valid: {valid}")
        return self.trackers[backend][1](uri)

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


def _refuse(plugins: Plugins, info: PluginInfo, error: str) -> None:
    """Take a plugin out completely, say why (naming it and its distribution); the others keep working.

    The one way out for a plugin refused at any step: its hooks, and whatever techniques, tasks and options it
    registered before it failed, are gone.
    """
    if plugins.manager.get_plugin(info.name) is not None:
        plugins.manager.unregister(name=info.name)
    plugins.registry.remove_plugin(info.name)
    for offered in (plugins.tasks, plugins.options):
        for key in [key for key, (owner, _) in offered.items() if owner == info.name]:
            del offered[key]
    info.status, info.error = "failed", error
    info.techniques, info.tasks, info.options, info.hooks = [], [], [], []
    log.warning(
        "slimlab plugin %r (entry point %s = %s, distribution %s %s) is not used: %s",
        info.name, PROJECT, info.value, info.distribution, info.version, error,
    )  # fmt: skip


def _raised(error: BaseException, located: bool = True) -> str:
    """``Type: first line of the message (file.py, line N)``: where it went wrong, outside slimlab, when known."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<")]
    own = [f for f in frames if not Path(f.filename).resolve().is_relative_to(_SLIMLAB_DIR)]
    where = f" ({Path(own[-1].filename).name}, line {own[-1].lineno})" if own else ""
    if isinstance(error, SyntaxError) or not located:  # a SyntaxError's message names the file and line already
        where = ""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}{where}"


def _load(manager: pluggy.PluginManager, entry_point: EntryPoint, info: PluginInfo) -> str | None:
    """Import and register one entry point's plugin; why it is refused, or None."""
    try:
        plugin = entry_point.load()
    except (Exception, SystemExit) as error:  # a broken plugin must not take slimlab down, not even by exiting
        hint = ""
        if isinstance(error, ModuleNotFoundError) and error.name in ("framework", "plugins"):
            hint = " (a plugin written for API 1: slimlab is imported as `slimlab` since API 2, docs/plugins.md)"
        return f"failed to import: {_raised(error)}{hint}"
    try:
        mismatch = _api_mismatch(plugin)
        if mismatch:
            return mismatch
        if manager.is_registered(plugin):
            return f"{info.value} is plugin {manager.get_name(plugin)!r} already: one module cannot be two plugins"
        manager.register(plugin, name=info.name)
    except pluggy.PluginValidationError as error:  # a hook implemented with arguments it does not have
        return str(error)
    except Exception as error:  # whatever else pluggy or the plugin object raises while it is registered
        return f"cannot be registered: {_raised(error)}"
    unknown = _unknown_hooks(manager, plugin)
    if unknown:
        return f"implements {', '.join(unknown)}, which is no slimlab hook; hooks: {', '.join(hookspecs.hook_names())}"
    return None


def load_plugins(disable: Iterable[str] = ()) -> Plugins:
    """Load every ``slimlab`` entry point except the disabled ones, then call their registration hooks.

    A plugin that fails to import (whatever it raises), declares an incompatible ``SLIMLAB_API``, implements a
    hook that does not exist or with arguments the hook does not have, or whose ``register_techniques``,
    ``register_tasks`` or ``register_options`` raises or registers what cannot be used (a name another plugin
    already took, a schema Hydra cannot store), is refused: reported with its entry point and distribution, and
    left out with everything it registered; the others still load. Built-in plugins are no exception (a missing
    optional library must not take slimlab down); they load first, so a third-party plugin cannot take their names.
    """
    disabled = set(disable) | set(disabled_from_env())
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    plugins = Plugins(manager, TechniqueRegistry(), [])

    def order(entry_point: EntryPoint) -> tuple[bool, str]:
        return (entry_point.dist is None or entry_point.dist.name != PROJECT, entry_point.name)

    for entry_point in sorted(entry_points(group=PROJECT), key=order):
        dist = entry_point.dist
        info = PluginInfo(
            name=entry_point.name,
            distribution=dist.name if dist else "?",
            version=dist.version if dist else "?",
            value=entry_point.value,
        )
        plugins.infos.append(info)
        if info.name in disabled:
            info.status = "disabled"
            continue
        if manager.get_plugin(info.name) is not None:  # not _refuse: the plugin under that name is another one
            info.status, info.error = "failed", "another entry point already uses this name"
            log.warning("slimlab plugin %r from %s: %s; skipped", info.name, info.distribution, info.error)
            continue
        reason = _load(manager, entry_point, info)
        if reason:
            _refuse(plugins, info, reason)

    by_name = {info.name: info for info in plugins.infos if info.status == "loaded"}
    registrations = {
        "register_techniques": lambda plugin, offered: plugins.registry.register_for(plugin),
        "register_tasks": lambda plugin, offered: _task_register(plugin, offered, plugins.tasks),
        "register_options": lambda plugin, offered: _option_register(plugin, offered, plugins.options),
        "register_tracking": lambda plugin, offered: _tracking_register(plugin, offered, plugins.trackers),
    }
    for hook, make_register in registrations.items():  # registration order: built-ins first
        for impl in getattr(manager.hook, hook).get_hookimpls():
            if manager.get_plugin(impl.plugin_name) is None:  # refused at an earlier hook
                continue
            offered: Offered = {}
            error = _call_registration(impl, hook, make_register(impl.plugin_name, offered))
            if error is None and hook == "register_techniques":
                error = _unstorable_schema(plugins.registry, impl.plugin_name)
            if error is None and hook == "register_options":
                error = _unstorable_option(offered)
            if error is not None:
                _refuse(plugins, by_name[impl.plugin_name], error)
                continue
            if hook == "register_tasks":
                plugins.tasks.update(offered)
            elif hook == "register_options":
                plugins.options.update(offered)
            elif hook == "register_tracking":
                plugins.trackers.update(offered)

    for info in plugins.infos:
        if info.status != "loaded":  # disabled, or refused at any step above
            continue
        plugin = manager.get_plugin(info.name)
        info.hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
        info.techniques = plugins.registry.by_plugin(info.name)
        info.tasks = sorted(name for name, (owner, _) in plugins.tasks.items() if owner == info.name)
        info.trackers = sorted(name for name, (owner, _) in plugins.trackers.items() if owner == info.name)
        info.options = sorted(
            f"{group}={name}" for (group, name), (owner, _) in plugins.options.items() if owner == info.name
        )
    return plugins


def _call_registration(impl: pluggy.HookImpl, hook: str, register: Callable[..., None]) -> str | None:
    """Call one plugin's registration hook with ``register``; why the plugin is refused, or None."""
    if impl.hookwrapper or impl.wrapper:  # calling it would only make a generator: nothing would be registered
        return f"{hook} is a hook wrapper; registration hooks are plain functions: def {hook}(register)"
    if "register" not in (*impl.argnames, *impl.kwargnames):
        return f"{hook} takes no `register` argument; define it as def {hook}(register)"
    try:
        impl.function(register=register)
    except PluginError as error:  # e.g. a name another plugin already registered
        return str(error)
    except (Exception, SystemExit) as error:  # a bug in the plugin: it is refused, slimlab goes on
        return f"{hook} raised {_raised(error)}"
    return None


def _unstorable_schema(registry: TechniqueRegistry, plugin: str) -> str | None:
    """Why Hydra could not store a technique schema ``plugin`` registered (every ``slimlab run`` would fail)."""
    from omegaconf import OmegaConf

    for name in registry.by_plugin(plugin):
        try:
            OmegaConf.structured({name: registry[name].schema})  # what Hydra's ConfigStore does with it
        except Exception as error:
            return f"the schema of technique {name!r} cannot be a config: {_raised(error, located=False)}"
    return None


def _unstorable_option(offered: Offered) -> str | None:
    """Why Hydra could not store an offered model/data option."""
    from omegaconf import OmegaConf

    for (group, name), (_, node) in offered.items():
        try:
            OmegaConf.structured(node)
        except Exception as error:
            return f"option {group}={name} cannot be a config: {_raised(error, located=False)}"
    return None


RegisterOption = Callable[[str, str, dict[str, Any]], None]  # register(group, name, node)
RegisterTracking = Callable[[str, Callable[[str | None], Any]], None]  # register(name, factory)
OPTION_GROUPS = ("model", "data")
Offered = dict[Any, tuple[str, Any]]  # what a registration hook offered: key -> (plugin, value)


def _tracking_register(plugin: str, offered: Offered, collected: Offered) -> Callable[..., None]:
    def register(name: str, factory: Callable[[str | None], Any]) -> None:
        owner = collected.get(name, offered.get(name, (None,)))[0]
        if name == "none" or owner is not None:
            taken = "slimlab (no tracking)" if name == "none" else repr(owner)
            raise PluginError(f"plugin {plugin!r} registers tracking backend {name!r}, already taken by {taken}")
        if not callable(factory):
            raise PluginError(
                f"plugin {plugin!r} registers tracking backend {name!r} with a {type(factory).__name__}, "
                "not a callable factory(uri)"
            )
        offered[name] = (plugin, factory)

    return register


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
