"""Technique registry: name -> (schema dataclass, apply); feeds Hydra's ConfigStore."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from slimlab.errors import ConfigError, PluginError

log = logging.getLogger("slimlab")

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import nn

    from slimlab.context import RunContext

Apply = Callable[["nn.Module", Any, "RunContext"], "nn.Module"]


class Register(Protocol):
    """The callable that ``register_techniques`` receives."""

    def __call__(
        self,
        name: str,
        schema: type,
        apply: Apply,
        *,
        label: Callable[[Any], str] | None = None,
        followed_by: Iterable[str] | None = None,
        check: Callable[[Any], None] | None = None,
        max_speedup: Callable[[Any], float | None] | None = None,
        key_params: Iterable[str] | None = None,
        serialization_format: str | Callable[[Any], str] = "pt2",
        module_options: Iterable[str] | None = None,
        keeps_module_names: bool | Callable[[Any], bool] = False,
        label_shows: Iterable[str] | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class Technique:
    """One registered compression technique."""

    name: str
    schema: type
    apply: Apply
    plugin: str
    label: Callable[[Any], str] | None = None
    followed_by: frozenset[str] | None = None  # None: anything may follow
    check: Callable[[Any], None] | None = None  # raises ValueError when this machine cannot run the config
    max_speedup: Callable[[Any], float | None] | None = None  # the physical bound of the speedup it can give
    key_params: tuple[str, ...] | None = None  # the fields that matter when comparing runs; None: every scalar
    serialization_format: str | Callable[[Any], str] = "pt2"  # how MLflow saves its output: pt2 or pickle
    module_options: tuple[str, ...] = ()  # fields that name modules of the model it gets (a list, or dict keys)
    keeps_module_names: bool | Callable[[Any], bool] = False  # its output has the module names of its input
    label_shows: tuple[str, ...] | None = None  # fields its label shows (or that do not change results); None: guessed

    def describe(self, config: Any) -> str:
        return self.label(config) if self.label else self.name


@dataclass(frozen=True)
class Step:
    """A technique with its validated config, one step of a pipeline."""

    technique: Technique
    config: Any

    @property
    def name(self) -> str:
        return self.technique.name

    def describe(self) -> str:
        """The label, with every other option set away from its default: two runs that differ get two names."""
        text = self.technique.describe(self.config)
        others = [f"{name}={_short(value)}" for name, value in self.changed_options(text).items()]
        if not others:
            return text
        return f"{text[:-1]},{','.join(others)})" if text.endswith(")") else f"{text}({','.join(others)})"

    def changed_options(self, label: str) -> dict[str, Any]:
        """``{field: value}`` for the fields set to other than the schema's default that ``label`` does not show."""
        shown = self.technique.label_shows
        # undeclared: a value the label already holds as a token (``zero_small(0.02)``) is taken as shown
        tokens = set(re.split(r"[(),=+ ]", label)) if shown is None else set()
        changed = {}
        for field in dataclasses.fields(self.config):
            if (shown is not None and field.name in shown) or not field.init:
                continue
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:  # a required field: every run sets it, the label should show it
                continue
            value = getattr(self.config, field.name)
            if _plain(value) != _plain(default) and _short(value) not in tokens:
                changed[field.name] = value
        return changed

    def max_speedup(self) -> float | None:
        bound = self.technique.max_speedup
        return bound(self.config) if bound else None

    def key_params(self) -> dict[str, Any]:
        """``{"<technique>.<field>": value}`` for the fields that matter when comparing runs."""
        names = self.technique.key_params
        if names is None:  # every scalar field: lists and nested settings do not fit a table column
            names = tuple(f.name for f in dataclasses.fields(self.config) if _is_scalar(getattr(self.config, f.name)))
        return {f"{self.name}.{name}": _plain(getattr(self.config, name)) for name in names}

    def options(self) -> dict[str, Any]:
        """``{"<technique>.<field>": value}`` for every field, as the technique runs it (defaults resolved)."""
        return {
            f"{self.name}.{f.name}": _plain_deep(getattr(self.config, f.name)) for f in dataclasses.fields(self.config)
        }

    def named_modules(self) -> dict[str, list[str]]:
        """``{"<option>": [module names]}`` for the options that name modules of the model this step gets."""
        named = {}
        for option in self.technique.module_options:
            value = getattr(self.config, option)
            names = list(value) if isinstance(value, dict | list | tuple) else [] if value is None else [value]
            if names:
                named[option] = [str(name) for name in names]
        return named

    def keeps_module_names(self) -> bool:
        keeps = self.technique.keeps_module_names
        return bool(keeps(self.config) if callable(keeps) else keeps)

    def serialization_format(self) -> str:
        chosen = self.technique.serialization_format
        return chosen(self.config) if callable(chosen) else chosen


def _plain(value: Any) -> Any:
    """An enum option as its plain value (``"torchao"``, not ``Backend.torchao``), for MLflow params."""
    import enum

    return value.value if isinstance(value, enum.Enum) else value


def _plain_deep(value: Any) -> Any:
    """``_plain`` inside lists and mappings too (``targets: [Linear]``), an OmegaConf node as plain data."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    if isinstance(value, dict):
        return {str(k): _plain_deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_deep(v) for v in value]
    return _plain(value)


def _short(value: Any) -> str:
    """An option's value as a run name shows it: ``0.5``, ``global``, ``fc1+fc2``, ``3 items``."""
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "+".join(str(_plain(v)) for v in value) if len(value) <= 2 else f"{len(value)} items"
    if isinstance(value, dict):
        return "custom"
    return str(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


SERIALIZATION_FORMATS = ("pt2", "pickle")  # mlflow.pytorch.log_model's serialization_format


def serialization_format(steps: list[Step]) -> str:
    """How the pipeline's model is saved for ``mlflow.pytorch.log_model``: ``pickle`` if any step needs it.

    ``pt2`` (torch.export, MLflow's default) loads without slimlab's classes but cannot hold ``torch.ao``
    quantized modules; ``pickle`` holds any module whose classes are importable where it is loaded.
    """
    formats = {step.serialization_format() for step in steps}
    return "pickle" if "pickle" in formats else "pt2"


def speedup_bound(steps: list[Step]) -> float | None:
    """The largest speedup the pipeline can physically give: the product of its steps' bounds.

    ``None`` (no bound) as soon as one step declares none: a measured figure
    can only be called impossible when every step says what is possible.
    """
    bound = 1.0
    for step in steps:
        step_bound = step.max_speedup()
        if step_bound is None:
            return None
        bound *= step_bound
    return bound if steps else None


class TechniqueRegistry:
    """All techniques the loaded plugins registered, by name."""

    def __init__(self) -> None:
        self._techniques: dict[str, Technique] = {}

    def register_for(self, plugin: str) -> Register:
        """A ``register`` callable that records ``plugin`` as the owner."""

        def register(
            name,
            schema,
            apply,
            *,
            label=None,
            followed_by=None,
            check=None,
            max_speedup=None,
            key_params=None,
            serialization_format="pt2",
            module_options=None,
            keeps_module_names=False,
            label_shows=None,
        ) -> None:
            if name in self._techniques:
                owner = self._techniques[name].plugin
                raise PluginError(f"plugin {plugin!r} registers technique {name!r}, already registered by {owner!r}")
            if not dataclasses.is_dataclass(schema):
                raise PluginError(f"plugin {plugin!r}: the schema of technique {name!r} must be a dataclass")
            fields = {f.name for f in dataclasses.fields(schema)}
            named = (("key_params", key_params), ("module_options", module_options), ("label_shows", label_shows))
            for kwarg, given in named:
                unknown = sorted(set(given or ()) - fields)
                if unknown:
                    raise PluginError(
                        f"plugin {plugin!r}: {kwarg} {unknown} of technique {name!r} are not fields of its schema "
                        f"(fields: {', '.join(sorted(fields))})"
                    )
            if not callable(serialization_format) and serialization_format not in SERIALIZATION_FORMATS:
                raise PluginError(
                    f"plugin {plugin!r}: serialization_format {serialization_format!r} of technique {name!r}; "
                    f"valid: {', '.join(SERIALIZATION_FORMATS)} or a function of the config returning one"
                )
            follow = None if followed_by is None else frozenset(followed_by)
            keys = None if key_params is None else tuple(key_params)
            self._techniques[name] = Technique(
                name, schema, apply, plugin, label, follow, check, max_speedup, keys, serialization_format,
                tuple(module_options or ()), keeps_module_names, None if label_shows is None else tuple(label_shows),
            )  # fmt: skip

        return register

    def remove_plugin(self, plugin: str) -> None:
        """Forget every technique ``plugin`` registered (it was refused)."""
        for name in self.by_plugin(plugin):
            del self._techniques[name]

    def __contains__(self, name: str) -> bool:
        return name in self._techniques

    def __getitem__(self, name: str) -> Technique:
        return self._techniques[name]

    def names(self) -> list[str]:
        return sorted(self._techniques)

    def by_plugin(self, plugin: str) -> list[str]:
        return sorted(n for n, t in self._techniques.items() if t.plugin == plugin)

    def store_schemas(self) -> None:
        """Put each schema in Hydra's ConfigStore as option ``technique=<name>``.

        The node is ``{name: schema}`` so that ``technique.<name>.<field>`` is
        the override path and a list of options composes in pipeline order.
        """
        from hydra.core.config_store import ConfigStore

        store = ConfigStore.instance()
        for name, technique in self._techniques.items():
            store.store(group="technique", name=name, node={name: technique.schema}, provider=technique.plugin)

    def pipeline(self, cfg: DictConfig, disabled: Iterable[str] = (), probe: bool = True) -> list[Step]:
        """Validate ``cfg.technique`` and return its steps in order, or raise ConfigError.

        ``probe=False`` skips the techniques' capability probes (what this machine can run): a sweep checked
        on a login node may run its jobs elsewhere.
        """
        from omegaconf import OmegaConf

        disabled = set(disabled)
        steps: list[Step] = []
        for name, node in (cfg.get("technique") or {}).items():
            if name not in self._techniques:
                valid = ", ".join(self.names()) or "none"
                raise ConfigError(f"unknown technique {name!r} in 'technique'; registered: {valid}")
            technique = self._techniques[name]
            if OmegaConf.is_config(node) and OmegaConf.get_type(node) is not technique.schema:
                # Settings merged from an experiment's body for a technique that the list does not select
                # (e.g. experiment=quickstart 'technique=[prune]'): the list is the pipeline, so they are ignored.
                log.warning("technique.%s is set but %r is not in the technique list: ignored", name, name)
                continue
            if technique.plugin in disabled:
                raise ConfigError(f"technique {name!r} comes from plugin {technique.plugin!r}, which is disabled")
            try:
                config = OmegaConf.to_object(node) if OmegaConf.is_config(node) else technique.schema(**node)
                if probe and technique.check is not None:
                    technique.check(config)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"technique.{name}: {error}") from None
            if steps and steps[-1].technique.followed_by is not None:
                before = steps[-1].technique
                if name not in before.followed_by:
                    allowed = ", ".join(sorted(before.followed_by)) or "nothing"
                    raise ConfigError(
                        f"technique {name!r} cannot follow {before.name!r} "
                        f"({before.name!r} may be followed by: {allowed}); reorder 'technique=[...]'"
                    )
            steps.append(Step(technique, config))
        return steps
