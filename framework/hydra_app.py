"""``slimlab run`` as a Hydra application, and its ``--help``.

Hydra's errors are said as one line by ``slimlab.hydra_errors`` (re-exported here). Nothing a launch loads or
finds stays in this module: the plugins are loaded per launch and the sweep's state lives in the ``Sweep`` the
caller hands in.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimlab.config import (
    CONFIG_DIR,
    config_dirs,
    config_groups,
    env_config_dirs,
    group_options,
    refuse_repeated_techniques,
    register_configs,
    retarget_model,
    source_uris,
    use_search_path,
    with_searchpath,
)
from slimlab.errors import ConfigError, PluginError, RunFailed, recorded
from slimlab.hydra_errors import BadInput, describe_hydra_error, is_bad_input

if TYPE_CHECKING:
    from slimlab.plugin_manager import Plugins
    from slimlab.sweep import Sweep

__all__ = ["BadInput", "app_help", "describe_hydra_error", "is_bad_input", "launch"]


def launch(args: list[str], disable: list[str], sweep: Sweep | None = None) -> int:
    """Run Hydra on ``args`` (overrides and Hydra flags) with every plugin's schema registered.

    ``sweep``: where a multirun keeps its parent run and result (the caller closes it if the launch is
    interrupted); a fresh one if not given. It is reachable from the sweep's Hydra callback while Hydra runs.
    """
    import logging

    import hydra

    from slimlab import sweep_job
    from slimlab.plugin_manager import load_plugins
    from slimlab.runner import run_key, run_metrics, tracking_store
    from slimlab.sweep import Sweep, launching
    from slimlab.tracking import finished_run

    log = logging.getLogger("slimlab")

    plugins = load_plugins(disable)
    sweep = sweep if sweep is not None else Sweep()
    sweep.plugins = plugins
    _register(plugins)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; the CLI decides the message and exit code
    flags = _hydra_flags(args)
    if flags is not None and flags.help:
        config_dir = source_uris([flags.config_dir], "--config-dir") if flags.config_dir else []
        print(app_help(with_searchpath(flags.overrides, before=config_dir), plugins))
        return 0
    args = _with_env_searchpath(args, flags)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def task(cfg) -> dict[str, float] | None:
        """One job: every metric of the run (sweepers such as Optuna read them), None when it failed.

        In a sweep a failing job is recorded (FAILED, with its reason) and returns, so the others still run.
        """
        with sweep_job.job_scope() as job:
            return job_task(cfg, job is not None)

    def job_task(cfg, in_sweep: bool) -> dict[str, float] | None:
        from hydra.core.hydra_config import HydraConfig

        fresh = _fresh_job_dir()
        try:
            job = HydraConfig.get()
            use_search_path(job.runtime.config_sources)  # model options etc. are looked up where Hydra looked
            refuse_repeated_techniques(job.overrides.task)
            retarget_model(cfg, job.overrides.task)
            store = tracking_store(cfg, plugins) if in_sweep else None
            if store is not None and cfg.resume:
                done = finished_run(store, cfg.experiment_name, run_key(cfg, plugins))
                if done:
                    log.info("skipped: this config already has a FINISHED run, %s (resume=false runs it)", done.run_id)
                    sweep_job.record_outcome("SKIPPED", done.run_id, store=store)
                    return dict(done.metrics)
            metrics = run_metrics(cfg, plugins)[1]
            if in_sweep and not sweep_job.outcome_recorded():  # tracking=none: nobody else records it
                sweep_job.record_outcome("FINISHED")
            return metrics
        except KeyboardInterrupt:
            raise
        except Exception as error:
            if not in_sweep:
                if isinstance(error, ConfigError | PluginError) and not recorded(error):
                    if fresh:  # refused before any work: it leaves nothing behind
                        _remove_job_dir()
                    raise BadInput(str(error)) from error
                raise RunFailed(f"{type(error).__name__}: {error}") from error
            reason = f"{type(error).__name__}: {error}"
            log.error("job failed: %s", reason)
            if not sweep_job.outcome_recorded():  # failed before its run existed, or without tracking
                sweep_job.record_outcome("FAILED", reason=reason, store=_store_or_none(cfg, plugins))
            return None

    saved = sys.argv
    sys.argv = ["slimlab run", *args]
    try:
        with launching(sweep):
            task()
    except Exception as error:
        if is_bad_input(error):  # e.g. MissingConfigException, which is also an OSError: said as bad input here
            raise ConfigError(describe_hydra_error(error, plugins.infos)) from error
        raise
    finally:
        sys.argv = saved
    return 1 if sweep.result is not None and sweep.result.failed else 0


def _store_or_none(cfg: Any, plugins: Plugins) -> Any:
    """The job's tracking store, or None when even that cannot be made (the job's outcome then goes to a file)."""
    from slimlab.runner import tracking_store

    try:
        return tracking_store(cfg, plugins)
    except Exception:  # the job's own failure is what is reported
        return None


def _register(plugins: Plugins) -> None:
    """Fill Hydra's ConfigStore with this launch's schemas and options and no others: what a plugin loaded by an
    earlier launch in this process (and disabled or gone in this one) registered must not compose."""
    from hydra.core.config_store import ConfigStore

    from slimlab.plugin_manager import OPTION_GROUPS

    for group in ("technique", *OPTION_GROUPS):  # only plugins store there (slimlab's own options are files)
        ConfigStore.instance().repo.pop(group, None)
    register_configs(plugins)


def _job_files() -> tuple[Path, Path, set[str]]:
    """The job's directory, the directory it was launched from and the names of the files Hydra put there."""
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get()
    return Path(job.runtime.output_dir), Path(job.runtime.cwd), {".hydra", f"{job.job.name}.log"}


def _fresh_job_dir() -> bool:
    """Whether the job's directory holds only what Hydra just wrote: its .hydra/ and an empty log (an earlier
    job in a reused ``hydra.run.dir`` would have logged there)."""
    try:
        job_dir, _, hydra_files = _job_files()
        log_file = next(job_dir / name for name in hydra_files if name.endswith(".log"))
        if log_file.exists() and log_file.stat().st_size > 0:
            return False
        return all(entry.name in hydra_files for entry in job_dir.iterdir())
    except (OSError, ValueError):  # no job directory to speak of
        return False


def _remove_job_dir() -> None:
    """Remove a refused job's directory (what Hydra wrote there, nothing else), then its parents while they
    are empty, up to the launch directory: a refused command leaves no ``outputs/<date>/<time>/``."""
    import logging
    import shutil

    job_dir, cwd, hydra_files = _job_files()
    job_dir, cwd = job_dir.resolve(), cwd.resolve()
    if cwd not in job_dir.parents or any(entry.name not in hydra_files for entry in job_dir.iterdir()):
        return  # e.g. hydra.run.dir=. or a directory that holds other files
    for handler in list(logging.getLogger().handlers):  # the job's log file handler, before the file goes
        if Path(getattr(handler, "baseFilename", "/")).resolve().parent == job_dir:
            logging.getLogger().removeHandler(handler)
            handler.close()
    for name in hydra_files:
        path = job_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    for directory in [job_dir, *job_dir.parents]:
        if directory == cwd:
            break
        try:
            directory.rmdir()  # only while empty: another job's directory beside it stays
        except OSError:
            break


def _hydra_flags(args: list[str]):
    """``args`` parsed as Hydra's command line (its flags and the overrides); None if Hydra will refuse them."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return get_args_parser().parse_args(args)
    except SystemExit:  # Hydra parses them again and says what is wrong
        return None


def _with_env_searchpath(args: list[str], flags) -> list[str]:
    """``args`` with $SLIMLAB_CONFIG_PATH's directories added to ``hydra.searchpath`` (merged into the user's).

    As a Hydra override it reaches every job of a sweep, whatever the launcher: jobs are composed from the
    sweep's Hydra overrides (``hydra.overrides.hydra``), in this process, a joblib worker or another host.
    """
    extra = env_config_dirs()
    if not extra or flags is None:
        return args
    overrides = list(flags.overrides)
    merged = with_searchpath(overrides, after=extra)
    if not overrides:  # before any flag: an override after --info would be read as its value
        return [merged[-1], *args]
    start = args.index(overrides[0])  # the overrides are one run of positional arguments
    return [*args[:start], *merged, *args[start + len(overrides) :]]


def app_help(overrides: list[str], plugins: Plugins) -> str:
    """``slimlab run --help``: Hydra's app help (groups, the composed config) plus every technique's options.

    Built here rather than by Hydra, whose help deep-copies every registered config (launchers and sweepers
    included) once per config group: about 1 s with the Ray, submitit and Optuna plugins installed.
    """
    from omegaconf import OmegaConf

    from slimlab.config import compose

    cfg = compose(overrides, plugins)  # its search path is the user's: conf/, --config-dir, hydra.searchpath, env
    text = OmegaConf.load(CONFIG_DIR / "config.yaml").hydra.help
    lines = [
        str(text.header).rstrip(),
        "",
        "== Configuration groups ==",
        "Compose your configuration from those groups (group=option)",
        f"Config directories: {', '.join(map(str, config_dirs()))}",
        "",
        *(f"{group}: {', '.join(group_options(group))}" for group in config_groups()),
        f"(tracking.backend: {', '.join(['none', *sorted(plugins.trackers)])}: the tracking backends registered)",
        "",
        "== Config ==",
        "Override anything in the config (foo.bar=value)",
        "",
        OmegaConf.to_yaml(cfg),
        top_level_help(),
        "",
        str(text.footer).rstrip(),
        "",
        technique_help(plugins),
    ]
    return "\n".join(lines)


HELP_WIDTH = 100  # fixed rather than the terminal's: the same text in a terminal, a pipe and a test


def _option_lines(key: str, hint: object, default: object, meaning: str | None, indent: str) -> list[str]:
    """``  key: type = default`` and, below it, what the option means (``field_help``), wrapped."""
    import dataclasses
    import textwrap

    given = " (required)" if default is dataclasses.MISSING else f" = {default!r}"
    lines = [f"{indent}{key}: {_type_text(hint)}{given}"]
    if meaning:
        deeper = indent + "    "
        lines += textwrap.wrap(meaning, HELP_WIDTH, initial_indent=deeper, subsequent_indent=deeper)
    return lines


def _dataclass_lines(schema: type, prefix: str, indent: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Every field of dataclass ``schema`` as ``_option_lines``; a nested dataclass's fields under its own line."""
    import dataclasses
    import textwrap
    import typing

    from slimlab.field_help import class_summary, fields_help

    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # an annotation that does not resolve: show it as written
        hints = {}
    meanings = fields_help(schema)
    lines: list[str] = []
    nested: list[str] = []
    for item in dataclasses.fields(schema):
        if item.name in skip:
            continue
        hint = hints.get(item.name, item.type)
        key = f"{prefix}{item.name}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            meaning = meanings.get(item.name) or class_summary(hint)
            title = f"{key}: {meaning}" if meaning else f"{key}:"
            nested += textwrap.wrap(title, HELP_WIDTH, initial_indent=indent, subsequent_indent=indent + "    ")
            nested += _dataclass_lines(hint, f"{key}.", indent + "  ")
            continue
        if item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = item.default
        lines += _option_lines(key, hint, default, meanings.get(item.name), indent)
    return lines + nested


def top_level_help() -> str:
    """slimlab's own options (``SlimlabConfig``: train.*, measure.*, tracking.*, ...) with what each means."""
    from slimlab.config import SlimlabConfig

    groups = ("model", "data", "technique", "device")  # their options are the groups' (listed above)
    return "\n".join(
        [
            "== Options ==",
            "Set with KEY=value, e.g. train.epochs=1",
            "",
            *_dataclass_lines(SlimlabConfig, "", "", skip=groups),
        ]
    )


def technique_help(plugins: Plugins) -> str:
    """Every registered technique with its options: type (an enum's values: ``l1 | random``), default, meaning."""
    lines = ["== Technique options ==", "Set with technique.NAME.OPTION=value once NAME is in 'technique=[...]'", ""]
    for name in plugins.registry.names():
        technique = plugins.registry[name]
        lines.append(f"{name} (plugin {technique.plugin}):")
        lines += _dataclass_lines(technique.schema, "", "  ")
    return "\n".join(lines)


def _type_text(hint: object) -> str:
    """A field's type as ``--help`` shows it: ``float``, ``l1 | random``, ``list[Linear | Conv2d]``."""
    import enum
    import types
    import typing

    if isinstance(hint, str):
        return hint
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " | ".join(str(member.value) for member in hint)
    if isinstance(hint, type):
        return hint.__name__
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if arg is type(None) else _type_text(arg) for arg in args)
    if origin is not None and args:
        inner = ", ".join(_type_text(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return str(hint)
