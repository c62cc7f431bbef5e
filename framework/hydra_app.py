"""``slimlab run`` as a Hydra application, and Hydra's errors turned into one-line messages."""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

from framework.config import CONFIG_DIR, register_configs
from framework.errors import ConfigError, RunFailed

if TYPE_CHECKING:
    from framework.plugins import Plugins

_plugins: Plugins | None = None  # loaded once per process


def loaded_plugins(disable: list[str]) -> Plugins:
    global _plugins
    if _plugins is None:
        from framework.plugins import load_plugins

        _plugins = load_plugins(disable)
    return _plugins


class BadInput(BaseException):  # noqa: N818 - it carries a ConfigError, it is not one
    """Carries a ConfigError out of a Hydra job.

    Hydra's ``run_job`` records any ``Exception`` from the task as a failed
    job and prints its own banner; bad input is not a failed job, so it
    travels as a ``BaseException`` (like Ctrl-C) and the CLI unwraps it.
    """


def launch(args: list[str], disable: list[str]) -> int:
    """Run Hydra on ``args`` (overrides and Hydra flags) with every plugin's schema registered."""
    import logging

    import hydra

    from framework import sweep
    from framework.config import config_hash
    from framework.runner import RUN_KEYS, run_metrics

    log = logging.getLogger("slimlab")

    plugins = loaded_plugins(disable)
    register_configs(plugins)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; the CLI decides the message and exit code
    if "--help" in args or "-h" in args:
        print(app_help([a for a in args if not a.startswith("-")], plugins))  # overrides, not Hydra's flags
        return 0

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def task(cfg) -> dict[str, float] | None:
        """One job: every metric of the run (sweepers such as Optuna read them), None when it failed.

        In a sweep a failing job is recorded (FAILED, with its reason) and returns, so the others still run.
        """
        in_sweep = sweep.in_sweep()
        try:
            if in_sweep and cfg.resume and cfg.tracking.backend == "mlflow":
                done = sweep.finished_run(cfg, config_hash(cfg, RUN_KEYS))
                if done:
                    log.info("skipped: this config already has a FINISHED run, %s (resume=false runs it)", done.run_id)
                    sweep.record_outcome("SKIPPED", done.run_id)
                    return dict(done.metrics)
            metrics = run_metrics(cfg, plugins)[1]
            if in_sweep and not sweep.outcome_recorded():  # tracking=none: nobody else records it
                sweep.record_outcome("FINISHED")
            return metrics
        except KeyboardInterrupt:
            raise
        except Exception as error:
            if not in_sweep:
                if isinstance(error, ConfigError):
                    raise BadInput(str(error)) from error
                raise RunFailed(f"{type(error).__name__}: {error}") from error
            reason = f"{type(error).__name__}: {error}"
            log.error("job failed: %s", reason)
            if not sweep.outcome_recorded():  # failed before its MLflow run existed, or without tracking
                sweep.record_outcome("FAILED", reason=reason)
            return None

    saved = sys.argv
    sys.argv = ["slimlab run", *args]
    sweep.last_result = None
    try:
        task()
    finally:
        sys.argv = saved
    if sweep.last_result is not None and sweep.last_result.failed:
        return 1
    return 0


def app_help(overrides: list[str], plugins: Plugins) -> str:
    """``slimlab run --help``: Hydra's app help (groups, the composed config) plus every technique's options.

    Built here rather than by Hydra, whose help deep-copies every registered config (launchers and sweepers
    included) once per config group: about 1 s with the Ray, submitit and Optuna plugins installed.
    """
    from omegaconf import OmegaConf

    from framework.config import compose

    cfg = compose(overrides, plugins)
    groups = sorted(path.name for path in CONFIG_DIR.iterdir() if path.is_dir())
    text = OmegaConf.load(CONFIG_DIR / "config.yaml").hydra.help
    lines = [
        str(text.header).rstrip(),
        "",
        "== Configuration groups ==",
        "Compose your configuration from those groups (group=option)",
        "",
        *(f"{group}: {', '.join(_group_options(group))}" for group in groups),
        "",
        "== Config ==",
        "Override anything in the config (foo.bar=value)",
        "",
        OmegaConf.to_yaml(cfg),
        str(text.footer).rstrip(),
        "",
        technique_help(plugins),
    ]
    return "\n".join(lines)


def technique_help(plugins: Plugins) -> str:
    """Every registered technique with its options, types and defaults."""
    import dataclasses

    lines = ["== Technique options ==", "Set with technique.NAME.OPTION=value once NAME is in 'technique=[...]'", ""]
    for name in plugins.registry.names():
        technique = plugins.registry[name]
        lines.append(f"{name} (plugin {technique.plugin}):")
        for field in dataclasses.fields(technique.schema):
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
            lines.append(f"  {field.name}: {kind} = {default!r}")
    return "\n".join(lines)


def is_bad_input(error: BaseException) -> bool:
    """Errors Hydra or OmegaConf raise while composing: the user's config or overrides are wrong."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(error, (HydraException, OmegaConfBaseException))


def describe_hydra_error(error: BaseException) -> str:
    """One line that names the bad key or value and, where known, the valid choices."""
    import dataclasses

    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        choices = ", ".join(sorted(error.options or _group_options(group))) or "none"
        infos = _plugins.infos if _plugins else []
        disabled = [i.name for i in infos if i.status == "disabled"]
        refused = [f"{i.name} ({i.distribution}): {i.error}" for i in infos if i.status == "failed"]
        notes = []
        if disabled:
            notes.append(f"disabled plugins: {', '.join(disabled)}")
        if refused:
            notes.append(f"refused plugins: {'; '.join(refused)}")
        note = f" ({'; '.join(notes)})" if group == "technique" and notes else ""
        if group:
            return f"unknown {group} {option!r}; valid {group} options: {choices}{note}"
        return f"config {option!r} not found"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        lines += [line.strip() for line in str(cause).splitlines() if line.strip()]
    # Drop Hydra's hints and OmegaConf's debugging detail; keep what names the key and the problem.
    noise = re.compile(r"^(full_key|object_type|reference_type|To append to your config|Set the environment)")
    message = "; ".join(dict.fromkeys(line for line in lines if not noise.match(line)))
    object_type = getattr(cause, "object_type", None) or getattr(error, "object_type", None)
    if "not in" in message and object_type is not None and dataclasses.is_dataclass(object_type):
        message += f"; valid keys: {', '.join(f.name for f in dataclasses.fields(object_type))}"
    return message


def _group_options(group: str) -> list[str]:
    """Every option of a config group: YAML files in conf/ and ConfigStore entries (plugin schemas)."""
    from hydra.core.config_store import ConfigStore

    options = {path.stem for path in (CONFIG_DIR / group).glob("*.yaml")}
    try:
        options |= {name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)}
    except OSError:  # the group has no ConfigStore entries
        pass
    return sorted(options)
