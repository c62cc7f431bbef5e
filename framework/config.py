"""The root config schema, where the config tree lives, and composing it outside the CLI."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING, SI, DictConfig, OmegaConf

if TYPE_CHECKING:
    from framework.plugins import Plugins

# A checkout has conf/ beside the package; an installed slimlab carries it inside (pyproject's package-dir).
_INSTALLED_CONFIG = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = _INSTALLED_CONFIG if _INSTALLED_CONFIG.is_dir() else Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS_DIR = (CONFIG_DIR / "experiment").resolve()  # experiments/ in a checkout


@dataclass
class TrainConfig:
    """How the baseline is trained (and the defaults for fine-tuning)."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = SI("${seed}")


@dataclass
class MeasureConfig:
    """The latency protocol: same batch and threads for baseline and compressed model."""

    batch_size: int = 64
    warmup: int = 3
    repeats: int = 20
    threads: int = 1


@dataclass
class TrackingConfig:
    """Where runs are recorded; ``backend: none`` records nothing."""

    backend: str = "mlflow"
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlflow.db
    log_model: bool = True  # the compressed model with mlflow.pytorch.log_model (signature, input example)


@dataclass
class ArtifactConfig:
    """How the compressed model's file is written (the baseline stays the plain fp32 file it is compared with)."""

    codec: str = "none"  # none | lzma: entropy-code the file, Deep Compression's last stage


@dataclass
class PluginsConfig:
    disable: list[str] = field(default_factory=list)


@dataclass
class SlimlabConfig:
    """Top-level keys; the groups (model, data, technique, device, tracking) fill the rest."""

    experiment_name: str = "default"
    seed: int = 0
    resume: bool = True  # in a sweep, skip a job whose resolved config already has a FINISHED run
    cache_dir: str = ".slimlab/cache"
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
    """Fill Hydra's ConfigStore: the root schema and every registered technique schema."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="slimlab_schema", node=SlimlabConfig, provider="slimlab")
    plugins.registry.store_schemas()


def compose(overrides: Iterable[str] = (), plugins: Plugins | None = None) -> DictConfig:
    """Compose the config as ``slimlab run`` would, in-process (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from framework.plugins import load_plugins

    register_configs(plugins or load_plugins())
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


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

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
