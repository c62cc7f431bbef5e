"""The Python API, for notebooks and scripts: compress a model object on a Data object with the same runner,
plugins and tracking as ``slimlab run``, without a config directory."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slimlab import hookimpl

if TYPE_CHECKING:
    from torch import nn

    from slimlab.data import Data


@dataclass
class Compressed:
    """What :func:`compress` returns: the compressed model as deployed, every metric of the run, and the MLflow
    run it was logged to (``None`` with ``tracking=False``)."""

    model: nn.Module
    metrics: dict[str, float]
    primary_metric: str
    run_id: str | None

    @property
    def score(self) -> float:
        """The task's primary metric of the compressed model (e.g. accuracy)."""
        return self.metrics[self.primary_metric]


class _Capture:
    """A plugin for one run: keeps what the run deployed and where tracking logged it."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.run_id: str | None = None

    @hookimpl(trylast=True)  # after tracking logged the run (the built-ins are registered first)
    def after_run(self, ctx: Any) -> None:
        self.model = ctx.model
        self.run_id = (ctx.state.get("tracking") or {}).get("run_id")


def compress(
    model: nn.Module,
    data: Data,
    /,
    techniques: Iterable[str] = ("prune", "quantize"),
    *,
    tracking: bool | str = True,
    experiment_name: str = "slimlab",
    **options: Any,
) -> Compressed:
    """Compress ``model`` with ``techniques``, in order, and measure it against itself on ``data``.

    ``model`` is the baseline as it is (pass ``train={"fine_tune_pretrained": True}`` to train it first on the
    training split); it is copied, never changed. ``data`` is a :class:`slimlab.data.Data`. ``options`` set
    config values by their top-level key: a technique's options under its name (``prune={"amount": 0.7}``),
    ``train={...}``, ``measure={...}``, ``device={"name": "cuda"}``, ``seed=1``, ``artifact={"codec": "lzma"}``;
    a wrong key, type or value raises ``ConfigError`` before any work. ``tracking``: ``True`` logs to MLflow
    (``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``), a string is a tracking URI, ``False`` logs nothing.

    >>> result = compress(net, Data.from_tensors(x_train, y_train, x_test, y_test), ["prune"], prune={"amount": 0.5})
    >>> result.metrics["accuracy_drop"], result.metrics["size_bytes"]  # doctest: +SKIP
    """
    from omegaconf import open_dict

    from slimlab.config import compose
    from slimlab.errors import ConfigError
    from slimlab.plugin_manager import load_plugins
    from slimlab.runner import run_metrics

    techniques = list(techniques)
    plugins = load_plugins()
    unknown = [name for name in techniques if name not in plugins.registry]
    if unknown:
        raise ConfigError(f"unknown technique(s) {unknown}; registered: {', '.join(plugins.registry.names())}")
    overrides = [f"technique=[{','.join(techniques)}]"]
    if tracking is False:
        overrides.append("tracking=none")
    cfg = compose(overrides, plugins)
    # values set on the composed config, not as override strings: a path or a name may hold any character
    settings: dict[str, Any] = {"experiment_name": experiment_name, **options}
    if isinstance(tracking, str):
        settings["tracking"] = {**settings.get("tracking", {}), "uri": tracking}
    _apply(cfg, settings, set(techniques))
    cls = type(model)
    placeholder = {"name": cls.__name__, "_target_": f"{cls.__module__}.{cls.__qualname__}", "pretrained": True}
    with open_dict(cfg):
        cfg.model = placeholder
        cfg.data = {"name": getattr(data, "name", "data"), "_target_": None}
    capture = _Capture()
    plugins.manager.register(capture, name="slimlab-compress-capture")
    try:
        primary, metrics = run_metrics(cfg, plugins, model=model, data=data)
    finally:
        plugins.manager.unregister(capture)
    return Compressed(capture.model, metrics, primary, capture.run_id)


def _apply(cfg: Any, options: Mapping[str, Any], techniques: set[str]) -> None:
    """Set ``options`` on the composed config through OmegaConf, which checks keys and types against the schemas."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from slimlab.errors import ConfigError

    def walk(prefix: str, value: Any) -> None:
        # Into a section of the config key by key (each checked); a mapping for an option that is unset or
        # free-form (technique.quantize.config: a torchao config node) is set whole.
        if isinstance(value, Mapping) and OmegaConf.is_dict(OmegaConf.select(cfg, prefix, default=None)):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
            return
        try:
            OmegaConf.update(cfg, prefix, value, merge=False, force_add=False)
        except OmegaConfBaseException as error:
            first = (str(error).strip().splitlines() or [""])[0]
            raise ConfigError(f"{prefix}={value!r}: {first}") from None

    for key, value in options.items():
        if key in ("model", "data", "technique"):
            raise ConfigError(f"{key} is an argument of compress(), not an option")
        walk(f"technique.{key}" if key in techniques else key, value)
