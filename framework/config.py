"""The root config schema, where the config tree lives, and composing it outside the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING, SI, DictConfig, OmegaConf

if TYPE_CHECKING:
    from slimlab.plugin_manager import Plugins

# A checkout has conf/ beside the package; an installed slimlab carries it inside (pyproject's package-dir).
_INSTALLED_CONFIG = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = _INSTALLED_CONFIG if _INSTALLED_CONFIG.is_dir() else Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS_DIR = (CONFIG_DIR / "experiment").resolve()  # experiments/ in a checkout
# The user's own config directories (os.pathsep-separated), searched after conf/ like Hydra's --config-dir.
CONFIG_PATH_ENV = "SLIMLAB_CONFIG_PATH"
# Keys of a model node that slimlab reads itself; they are not arguments of the model's constructor.
RESERVED_MODEL_KEYS = ("name", "checkpoint", "pretrained")
log = logging.getLogger("slimlab")


class Choice(str, Enum):
    """A config option with a fixed set of values: OmegaConf refuses any other at compose time, listing them.

    A ``str`` whose name is its value, so configs, comparisons (``backend == "torchao"``), dict lookups, JSON,
    config hashes and MLflow params see the plain string, as before these options were enums.
    """

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    __format__ = str.__format__

    @classmethod
    def parse(cls, value: Any, option: str) -> Choice:
        """``value`` as a member (a schema built from a plain ``str`` too); ValueError listing the valid ones."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(member.value for member in cls)
            raise ValueError(f"{option} must be one of {valid}; got {value!r}") from None


class LayerType(Choice):
    """The layer types techniques compress (prune's ``module_types``, quantize's ``targets``)."""

    Linear = "Linear"
    Conv2d = "Conv2d"


class Codec(Choice):
    """How the compressed model's file is coded: the values of ``slimlab.artifact.CODECS`` (no torch import)."""

    none = "none"
    lzma = "lzma"


@dataclass
class TrainConfig:
    """How the baseline is trained (and the defaults for fine-tuning)."""

    epochs: int = 10  # of the baseline's training; 0 keeps the model as built
    lr: float = 1e-3  # Adam's learning rate
    batch_size: int = 64  # rows per training batch
    seed: int = SI("${seed}")  # shuffles the training batches
    fine_tune_pretrained: bool = False  # also train a model that comes with weights (else it is the baseline as is)
    # Threads while training: float sums split per thread, so a fixed count gives the same bytes in any process
    # (a sweep's worker, a bigger machine). 1 never oversubscribes parallel jobs; raise it for one big run.
    threads: int = 1


@dataclass
class MeasureConfig:
    """The latency protocol: same batch and threads for baseline and compressed model."""

    batch_size: int = 64  # rows per timed batch
    warmup: int = 3  # untimed calls before timing
    repeats: int = 20  # timed calls per model (at least 5): latency_ms is their median, latency_ms_p95 their p95
    threads: int = 1  # torch threads while timing, the same for baseline and compressed model
    eval_batch_size: int = 512  # rows per batch when scoring the test split (a Dataset; a DataLoader keeps its own)


@dataclass
class TrackingConfig:
    """Where runs are recorded; ``backend: none`` records nothing."""

    # a tracking backend a plugin registers (register_tracking: mlflow built in), or none: nothing is recorded
    backend: str = "mlflow"
    uri: str | None = None  # the backend's store; None: its default (mlflow: $MLFLOW_TRACKING_URI, else ./mlflow.db)
    log_model: bool = True  # the compressed model with mlflow.pytorch.log_model (signature, input example)


@dataclass
class ArtifactConfig:
    """How the compressed model's file is written (the baseline stays the plain fp32 file it is compared with)."""

    codec: Codec = Codec.none  # lzma: entropy-code the file, Deep Compression's last stage


@dataclass
class PluginsConfig:
    """Which plugins are loaded."""

    disable: list[str] = field(default_factory=list)  # plugin names (as `slimlab plugins` lists them) left out


@dataclass
class SlimlabConfig:
    """Top-level keys; the groups (model, data, technique, device, tracking) fill the rest."""

    experiment_name: str = "slimlab"  # the MLflow experiment the runs go to (an experiment config sets its own)
    seed: int = 0  # of the model's initialisation, the data split and training
    resume: bool = True  # in a sweep, skip a job whose resolved config already has a FINISHED run
    cache_dir: str = ".slimlab/cache"  # trained baselines, keyed by their model, data and training config
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    artifact: ArtifactConfig = field(default_factory=ArtifactConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    model: Any = MISSING
    data: Any = MISSING
    technique: dict[str, Any] = field(default_factory=dict)
    device: Any = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def register_configs(plugins: Plugins) -> None:
    """Fill Hydra's ConfigStore: the root schema, every registered technique schema, plugins' model/data options."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="slimlab_schema", node=SlimlabConfig, provider="slimlab")
    plugins.registry.store_schemas()
    for (group, name), (plugin, node) in plugins.options.items():  # plugins' model and data options (a zoo)
        store.store(group=group, name=name, node=node, provider=plugin)


def compose(
    overrides: Iterable[str] = (), plugins: Plugins | None = None, config_dirs: Iterable[str | Path] | None = None
) -> DictConfig:
    """Compose the config as ``slimlab run`` would, in-process (tests, notebooks).

    ``config_dirs``: the user's config directories, searched after slimlab's conf/ and after any
    ``hydra.searchpath=[...]`` in ``overrides``; by default the ones in $SLIMLAB_CONFIG_PATH.
    Bad input (an unknown option or key, a value of the wrong type or not among an option's choices, an
    override Hydra cannot parse) raises ``ConfigError`` with the line ``slimlab run`` prints.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from slimlab.errors import ConfigError
    from slimlab.hydra_errors import describe_hydra_error, is_bad_input
    from slimlab.plugin_manager import load_plugins

    extra = env_config_dirs() if config_dirs is None else source_uris(config_dirs, "config_dirs")
    overrides = with_searchpath(list(overrides), after=extra)
    plugins = plugins or load_plugins()
    register_configs(plugins)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            composed = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        except Exception as error:
            if is_bad_input(error):
                raise ConfigError(describe_hydra_error(error, plugins.infos)) from error
            raise
        return finish_composition(composed)


def finish_composition(cfg: DictConfig, announce: bool = True) -> DictConfig:
    """What every composition from overrides goes through (``compose``, a run, a sweep's check of its jobs).

    ``cfg`` still has its ``hydra`` node: its search path becomes this process's (``search_path``), its task
    overrides retarget the model (``retarget_model``), and the node is dropped.
    """
    from omegaconf import open_dict

    use_search_path(cfg.hydra.runtime.config_sources)
    overrides = list(cfg.hydra.overrides.task)
    refuse_repeated_techniques(overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return retarget_model(cfg, overrides, announce=announce)


def refuse_repeated_techniques(overrides: Iterable[str]) -> None:
    """``technique=[prune,prune]``: Hydra's defaults list would keep one of them, so a stage would be lost."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from slimlab.errors import ConfigError

    for override in OverridesParser.create().parse_overrides(
        [line for line in overrides if line.lstrip("+~").startswith("technique=")]
    ):
        value = override.value()
        if isinstance(value, list):
            repeated = sorted({str(name) for name in value if value.count(name) > 1})
            if repeated:
                raise ConfigError(
                    f"technique={override.get_value_element_as_str()}: {', '.join(repeated)} appears more than once; "
                    "a pipeline runs each technique once (for prune -> fine-tune -> prune, use "
                    "technique.prune.schedule=gradual)"
                )


# --- The config search path: slimlab's conf/, then the user's directories --------------------------------------

_search_path: list[tuple[str, str]] | None = None  # (provider, uri) of the latest composition in this process


def env_config_dirs() -> list[str]:
    """$SLIMLAB_CONFIG_PATH as search-path entries (``file:///abs/dir``; ``pkg://...`` entries kept as they are)."""
    return source_uris(os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep), CONFIG_PATH_ENV)


def source_uris(entries: Iterable[str | Path], origin: str) -> list[str]:
    """Config directories (or Hydra source URIs) as search-path entries: ``file://`` and an absolute path.

    A directory that does not exist is bad input (Hydra would only warn and go on without it).
    """
    from slimlab.errors import ConfigError

    uris = []
    for entry in map(str, entries):
        if not entry.strip():
            continue
        if "://" in entry:
            uris.append(entry)
            continue
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"{origin}: config directory {entry!r} not found")
        uris.append(f"file://{path}")
    return uris


def _quoted(value: str) -> str:
    """``value`` as a quoted string of Hydra's override grammar (a path may hold spaces, commas, brackets)."""
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return f"'{value}'"


def with_searchpath(overrides: Sequence[str], before: Sequence[str] = (), after: Sequence[str] = ()) -> list[str]:
    """``overrides`` with one ``hydra.searchpath=[*before, <its own entries>, *after]`` override.

    Hydra reads only the first ``hydra.searchpath=`` override, so entries are merged into the user's, never
    added as a second one. The override travels in ``hydra.overrides.hydra``, from which every launcher
    composes its jobs (``load_sweep_config``), on this machine or another.
    """
    if not before and not after:
        return list(overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    result = list(overrides)
    for index, line in enumerate(result):
        if not line.lstrip().startswith("hydra.searchpath"):
            continue
        try:
            override = parser.parse_override(line)
        except Exception:  # Hydra will report it
            return result
        if override.get_key_element() != "hydra.searchpath" or override.is_sweep_override():
            continue
        own = override.value()
        if not isinstance(own, list):  # Hydra refuses it with its own message
            return result
        entries = list(dict.fromkeys([*before, *(str(v) for v in own), *after]))
        result[index] = f"hydra.searchpath=[{','.join(_quoted(e) for e in entries)}]"
        return result
    entries = list(dict.fromkeys([*before, *after]))
    return [*result, f"hydra.searchpath=[{','.join(_quoted(e) for e in entries)}]"]


def use_search_path(sources: Iterable[Any]) -> None:
    """Make ``sources`` (Hydra's ``hydra.runtime.config_sources``) this process's config search path."""
    global _search_path
    _search_path = [(str(s.provider), f"{s.schema}://{s.path}") for s in sources]


def search_path() -> list[tuple[str, str]]:
    """(provider, uri) of every config source of this process, slimlab's conf/ first.

    The latest composition's (a Hydra job's, ``compose``'s, a sweep's check of its jobs): it includes
    ``--config-dir``, ``hydra.searchpath`` and $SLIMLAB_CONFIG_PATH. Before any: slimlab's conf/ and
    $SLIMLAB_CONFIG_PATH.
    """
    if _search_path is not None:
        return list(_search_path)
    return [
        ("hydra", "pkg://hydra.conf"),
        ("main", f"file://{CONFIG_DIR}"),
        *((CONFIG_PATH_ENV, uri) for uri in env_config_dirs()),
        ("schema", "structured://"),
    ]


def config_dirs() -> list[Path]:
    """The directories on the config search path, slimlab's conf/ first."""
    return [Path(uri[len("file://") :]) for _, uri in search_path() if uri.startswith("file://")]


def _repository():
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.core.plugins import Plugins

    Plugins.instance()  # registers the config source types (file://, pkg://, structured://)
    path = ConfigSearchPathImpl()
    for provider, uri in search_path():
        path.append(provider, uri)
    return ConfigRepository(path)


def config_groups() -> list[str]:
    """The top-level config groups on the search path (Hydra's own ``hydra`` group left out)."""
    from hydra.core.object_type import ObjectType

    return [g for g in _repository().get_group_options("", results_filter=ObjectType.GROUP) if g != "hydra"]


def group_options(group: str) -> list[str]:
    """Every option of a config group on the search path: yaml files of every directory, ConfigStore entries."""
    return sorted(_repository().get_group_options(group))


def load_option(group: str, name: str) -> DictConfig | None:
    """The config of option ``name`` of ``group`` as found on the search path; None if there is none."""
    from omegaconf import DictConfig

    result = _repository().load_config(f"{group}/{name}")
    return result.config if result is not None and isinstance(result.config, DictConfig) else None


# --- A model's target set from the command line -----------------------------------------------------------------


RESERVED_KEYS = {"model": RESERVED_MODEL_KEYS, "data": ("name",)}  # slimlab's keys, not the callable's arguments


def retarget_model(cfg: DictConfig, overrides: Iterable[str], announce: bool = True) -> DictConfig:
    """When ``overrides`` set ``model._target_`` or ``data._target_``, rebuild that node from the overrides alone.

    The selected option's (or an experiment's) other keys are arguments of *its* target, not of the new one:
    they are dropped, and said so. What stays: the reserved keys (``RESERVED_KEYS``; ``name`` becomes the
    target's last dotted part unless ``<group>.name=`` is set) and every top-level ``<group>.KEY`` the
    overrides set. ``cfg`` is changed in place and returned.
    """
    for group in RESERVED_KEYS:
        _retarget(cfg, overrides, group, announce)
    return cfg


def _retarget(cfg: DictConfig, overrides: Iterable[str], group: str, announce: bool) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict, read_write

    lines = [line for line in overrides if re.match(rf"^[+~]*{group}\.", line.strip())]
    if not lines:
        return
    set_keys = {
        override.key_or_group.split(".")[1]
        for override in OverridesParser.create().parse_overrides(lines)
        if not override.is_delete()
    }
    if "_target_" not in set_keys or not OmegaConf.is_dict(cfg.get(group)):
        return
    node = cfg[group]
    target = str(node._target_)
    keep = [key for key in node if key in RESERVED_KEYS[group] or key in set_keys]
    dropped = [key for key in node if key not in keep]
    if "name" not in set_keys:  # the option's name would name another model or dataset in run names and tags
        keep = [key for key in keep if key != "name"]
    rebuilt = OmegaConf.masked_copy(node, keep)  # interpolations stay as they are
    if "name" not in set_keys:
        rebuilt = OmegaConf.merge({"name": target.rsplit(".", 1)[-1]}, rebuilt)
    with read_write(cfg), open_dict(cfg):
        cfg[group] = rebuilt
    if dropped and announce:
        log.info(
            "%s._target_=%s: dropped %s of the selected %s (arguments of its own target; set any with "
            "%s.KEY=value)",
            group, target, ", ".join(dropped), group, group,
        )  # fmt: skip


def config_hash(cfg: DictConfig, keys: Iterable[str]) -> str:
    """A stable hash of the resolved values under ``keys``."""
    selected = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in keys
    }
    return hashlib.sha256(json.dumps(selected, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(cfg: DictConfig) -> dict[str, str]:
    """``{"technique.prune.amount": "0.9", ...}`` for MLflow params."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = json.dumps(node) if isinstance(node, list) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")  # any enum (a plugin's too) by its name
    return flat


def call_target(node: Any, key: str, **kwargs: Any) -> Any:
    """Call a config node's ``_target_`` with its arguments (Hydra's ``instantiate``).

    What the user's callable raises comes out as itself, noted with the key, rather than inside Hydra's
    ``InstantiationException``, whose first line only says "Error in call to target": a failed job's
    one-line reason then names the real error.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if cause is None:  # Hydra's own complaint (e.g. an argument it cannot pass): its message is the reason
            raise
        cause.add_note(f"(while calling {key}._target_={node.get('_target_')})")
        raise cause from None
