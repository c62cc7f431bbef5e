"""One run: validate -> data -> baseline (cached) -> techniques in order -> final measurements -> hooks."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import traceback
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from slimlab.config import CONFIG_DIR, config_hash
from slimlab.context import RunContext
from slimlab.errors import RECORDED, ConfigError, PluginError
from slimlab.plugin_manager import Plugins, load_plugins
from slimlab.registry import Step, speedup_bound
from slimlab.tracking import RUN_KEY_TAG

if TYPE_CHECKING:
    from slimlab.data import Data

MOVED_TO_ZOO = ("models", "datasets")  # were slimlab.<name>, are slimlab.zoo.<name>: a config may name the old path
RECORDER = "tracking"  # the plugin that records runs in the tracking store (slimlab.tracking): out when none
RUN_KEYS = ("model", "data", "train", "seed", "technique", "device", "measure", "artifact")
log = logging.getLogger("slimlab")


def resolve_device(name: str) -> str:
    import torch

    if name == "cpu":
        return "cpu"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but torch sees no CUDA device here; valid here: cpu, auto")
        return name
    raise ConfigError(f"unknown device {name!r}; valid: cpu, auto, cuda")


def run_name(cfg: DictConfig, steps: list[Step]) -> str:
    chain = "+".join(step.describe() for step in steps) or "baseline"
    return f"{cfg.model.get('name', 'model')} {chain}"


def _output_dir() -> tuple[Path, bool]:
    """Where a run writes its artifacts, and whether that place is temporary (removed once the run is over).

    Under Hydra it is the job's directory, which stays. Outside a Hydra job (the Python API, tests) it is a fresh
    temporary directory, removed when the run ends (the tracking backend, if any, has copied what it keeps).
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir) / "artifacts", False
    except Exception:  # composed outside a Hydra job
        return Path(tempfile.mkdtemp(prefix="slimlab-run-")), True


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=CONFIG_DIR.parent, capture_output=True, text=True, timeout=5
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _tags(plugins: Plugins, steps: list[Step], hash_: str) -> dict[str, str]:
    tags = {
        "slimlab.techniques": ",".join(step.name for step in steps) or "none",
        "slimlab.plugins": ",".join(
            f"{i.name}:{i.distribution}=={i.version}" for i in plugins.infos if i.status == "loaded"
        ),
        "slimlab.config_hash": hash_,
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _build_data(cfg: DictConfig):
    from slimlab.config import call_target
    from slimlab.data import check_data

    built = call_target({k: v for k, v in cfg.data.items() if k != "name"}, "data")
    try:
        return check_data(built, cfg.data.get("_target_"))
    except TypeError as error:  # the callable ran, but what it returned is not slimlab's Data: the user's input
        raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class Plan:
    """What a validated config will run: its steps, device and the plugins left out of this run."""

    steps: list[Step]
    device: str
    left_out: frozenset[str]


def plan(
    cfg: DictConfig,
    plugins: Plugins,
    host: bool = True,
    given: Iterable[str] = (),
    model: Any = None,
    names: dict[str, list[str] | None] | None = None,
) -> Plan:
    """Check everything that can be checked before a run starts; raise ConfigError with the reason.

    Cheap and free of side effects: nothing is recorded for a config it refuses. ``host=False`` leaves out
    what depends on the machine (devices, capability probes, the cache directory), for configs that will run
    on another one. ``given``: the groups (``model``, ``data``) handed in as objects (the Python API), not
    built from config; ``model``: the model handed in, if any (module names are checked against it); ``names``: the
    caller's cache of module names by model config, for many plans in one go (a sweep's jobs).
    Last, every plugin's ``check_config`` hook (a plugin's bug there is a ``PluginError`` naming it).
    """
    from slimlab.artifact import CODECS

    given = set(given)
    check_values(cfg)
    _check_disabled(cfg.plugins.disable, plugins)
    steps = plugins.registry.pipeline(cfg, disabled=cfg.plugins.disable, probe=host)
    if cfg.artifact.codec not in CODECS:
        raise ConfigError(f"unknown artifact.codec {cfg.artifact.codec!r}; valid: {', '.join(CODECS)}")
    store = tracking_store(cfg, plugins)  # an unknown backend is refused here
    for group in ("model", "data"):
        if group not in given:
            _check_target(group, cfg[group].get("_target_"))
    checkpoint = cfg.model.get("checkpoint")
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise ConfigError(f"model.checkpoint={checkpoint}: no such file")
    if "data" not in given:
        _check_test_fraction(cfg.data)
    if host and "model" not in given:  # a model handed in has no baseline to cache
        _check_cache_dir(cfg.cache_dir)
    if model is not None or "model" not in given:
        _check_module_names(cfg, steps, model, names)
    device = resolve_device(cfg.device.name) if host else cfg.device.name
    left_out = frozenset(cfg.plugins.disable) | ({RECORDER} if store is None else set())
    if store is not None:
        _check_store(store, cfg.tracking.backend, host)
    check_config(plugins.hooks_without(left_out), cfg, host)
    return Plan(steps, device, left_out)


def tracking_store(cfg: DictConfig, plugins: Plugins) -> Any:
    """The run's tracking store (``slimlab.tracking.TrackingStore``): in a sweep's job the sweep's, else the one
    ``cfg.tracking`` names; None for ``tracking.backend=none``."""
    if cfg.tracking.backend == "none":
        return None
    from slimlab.sweep_job import sweep_uri
    from slimlab.tracking import store_for

    return store_for(cfg, plugins, sweep_uri())


def _check_store(store: Any, backend: str, host: bool) -> None:
    """The store's own check: a ``ConfigError`` is the user's, anything else the backend's bug."""
    try:
        store.check(host)
    except ConfigError:
        raise
    except Exception as error:
        raise PluginError(
            f"tracking backend {backend!r}: its store's check raised {type(error).__name__}: {error}"
        ) from error


def check_config(hooks: Any, cfg: DictConfig, host: bool) -> None:
    """The plugins' ``check_config`` hook: a ``ConfigError`` is the user's, anything else a plugin's bug."""
    caller = hooks.check_config
    try:
        caller(cfg=cfg, host=host)
    except (ConfigError, PluginError):
        raise
    except Exception as error:
        # Which plugin: the implementation whose frame the traceback passes through.
        owners = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
        frame, name = error.__traceback__, None
        while frame is not None and name is None:
            name, frame = owners.get(frame.tb_frame.f_code), frame.tb_next
        if name is None:
            raise
        reason = (str(error).strip().splitlines() or [""])[0]
        raise PluginError(f"plugin {name}'s check_config raised {type(error).__name__}: {reason}") from error


def _check_disabled(disable: Iterable[str], plugins: Plugins) -> None:
    installed = sorted({info.name for info in plugins.infos})
    unknown = [name for name in disable if name not in installed]
    if unknown:
        raise ConfigError(
            f"plugins.disable=[{','.join(disable)}]: no installed plugin is named {', '.join(map(repr, unknown))}; "
            f"installed plugins: {', '.join(installed)}"
        )


def _check_test_fraction(data: DictConfig) -> None:
    """``data.test_fraction``, in any data option that has one: the share of rows held out for testing."""
    value = data.get("test_fraction") if OmegaConf.is_dict(data) else None
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"data.test_fraction={value!r}: the share of rows held out for testing must be in (0, 1)")


def _check_cache_dir(value: str) -> None:
    """``cache_dir`` must be a directory slimlab can create and write; finding out leaves nothing behind."""
    path = Path(str(value)).expanduser().absolute()
    existing = path
    while not existing.exists():  # the nearest existing ancestor: the cache is created under it
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cache_dir={value}: {existing} is a file, not a directory; give a directory")
    if not _writable(existing):
        where = "" if existing == path else f" (it does not exist, and {existing} is not writable)"
        raise ConfigError(f"cache_dir={value}: cannot write there{where}; give a writable directory")


def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory``: asked, then tried with a directory removed at once (root
    passes ``os.access`` on /proc, where nothing can be created)."""
    import tempfile

    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".slimlab-write-check-", dir=directory))
    except OSError:
        return False
    return True


def module_names(node: DictConfig, cache: dict[str, list[str] | None] | None = None) -> list[str] | None:
    """The module names of the model ``node`` builds (``""`` is the model); None if it cannot be built here.

    Built on the meta device where the model allows it (no memory, no weights), without its checkpoint
    (weights do not change names), leaving the random state as it was. ``cache``: the caller's, by model config
    (no cache lives longer than its caller: the model's code may change between two launches in one process).
    """
    import torch

    from slimlab.baseline import build_model
    from slimlab.config import RESERVED_MODEL_KEYS

    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    plain = {k: v for k, v in node.items() if k not in RESERVED_MODEL_KEYS}
    key = json.dumps(plain, sort_keys=True, default=str)
    cache = {} if cache is None else cache
    if key not in cache:
        built = None
        with torch.random.fork_rng(devices=[]):
            for device in ("meta", "cpu"):
                try:
                    with torch.device(device):
                        built = build_model(plain)
                    break
                except Exception as error:  # the run builds it again and reports what is wrong
                    log.debug("module names: building the model on %s failed: %s", device, error)
        cache[key] = None if built is None else [name for name, _ in built.named_modules()]
    return cache[key]


def _check_module_names(
    cfg: DictConfig, steps: list[Step], model: Any = None, cache: dict[str, list[str] | None] | None = None
) -> None:
    """Options that name modules (``prune.layers``, ``place.device_map``) must name modules of the model.

    A step is checked while every step before it keeps the module names (a distilled student or a compiled
    model has others): the names it gets are then the built model's.
    """
    wanted = []
    for step in steps:
        if step.named_modules():
            wanted.append(step)
        if not step.keeps_module_names():
            break
    if not wanted:
        return
    names = [name for name, _ in model.named_modules()] if model is not None else module_names(cfg.model, cache)
    if names is None:
        return
    valid = set(names)
    for step in wanted:
        for option, listed in step.named_modules().items():
            unknown = [name for name in listed if name not in valid]
            if unknown:
                import difflib

                shown = [n for n in names if n]
                close = [n for u in unknown for n in difflib.get_close_matches(u, shown, n=3)]
                shown = list(dict.fromkeys([*close, *shown]))
                more = f", ... ({len(names) - 1} in all)" if len(shown) > 12 else ""
                owner = "the given model" if model is not None else f"model {cfg.model.get('name', '')}".rstrip()
                what = "is not a module" if len(unknown) == 1 else "are not modules"
                raise ConfigError(
                    f"technique.{step.name}.{option}: {', '.join(map(repr, unknown))} {what} of {owner}; "
                    f"its modules: {', '.join(shown[:12])}{more}"
                )


# (key, lowest valid value, what it is): a value below is refused before any work
LOWER_BOUNDS = (
    ("train.epochs", 0, "epochs of baseline training"),
    ("train.batch_size", 1, "rows per training batch"),
    ("train.threads", 1, "threads while training"),
    ("measure.batch_size", 1, "rows per timed batch"),
    ("measure.eval_batch_size", 1, "rows per scoring batch"),
    ("measure.warmup", 0, "untimed calls before timing"),
    ("measure.repeats", 5, "timed calls per model"),
    ("measure.threads", 1, "threads while timing"),
    ("seed", 0, "the seed"),
)


def check_values(cfg: DictConfig) -> None:
    """Keys the schemas do not have (``+foo=1``, ``+technique.prune.amout=0.3``) and values out of range."""
    import dataclasses

    from omegaconf import OmegaConf

    from slimlab.config import SlimlabConfig

    known = {field.name for field in dataclasses.fields(SlimlabConfig)}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}; the top-level keys are {', '.join(sorted(known))}")
    for name, node in (cfg.get("technique") or {}).items():
        schema = OmegaConf.get_type(node) if OmegaConf.is_config(node) else None
        if schema is not None and dataclasses.is_dataclass(schema):
            fields = {field.name for field in dataclasses.fields(schema)}
            extra = sorted(set(node.keys()) - fields)
            if extra:
                raise ConfigError(
                    f"technique.{name} has no option {', '.join(extra)}; its options: {', '.join(sorted(fields))}"
                )
    for key, lowest, what in LOWER_BOUNDS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise ConfigError(f"{key}={value!r}: {what} must be an integer >= {lowest}")
    if not cfg.train.lr > 0:
        raise ConfigError(f"train.lr={cfg.train.lr!r}: the learning rate must be > 0")
    if not str(cfg.experiment_name or "").strip():
        raise ConfigError("experiment_name is empty; name the MLflow experiment the runs go to")


def _check_target(group: str, target: object) -> None:
    """``<group>._target_`` must name an importable callable: a class, a function, a classmethod."""
    from hydra.utils import get_object

    if not isinstance(target, str) or not target:
        raise ConfigError(f"{group}._target_ is not set; give the import path of a callable, e.g. mypackage.MyNet")
    try:
        found = get_object(target)
    except Exception as error:
        cause = error.__cause__ or error
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        moved = next((m for m in MOVED_TO_ZOO if target.startswith(f"slimlab.{m}.")), None)
        if moved:  # slimlab's own models and data moved into its zoo
            new = target.replace("slimlab.", "slimlab.zoo.", 1)
            reason += f"; slimlab's {moved} are in slimlab.zoo.{moved} now: {new}"
        raise ConfigError(f"{group}._target_={target!r} cannot be imported: {reason}") from None
    if not callable(found):
        raise ConfigError(f"{group}._target_={target!r} is a {type(found).__name__}, not a callable")


def run(cfg: DictConfig, plugins: Plugins | None = None) -> float:
    """Run the pipeline that ``cfg`` describes and return its primary metric (see ``run_metrics``)."""
    primary, metrics = run_metrics(cfg, plugins)
    return metrics[primary]


def run_metrics(
    cfg: DictConfig, plugins: Plugins | None = None, *, model: Any = None, data: Data | None = None
) -> tuple[str, dict[str, float]]:
    """Run the pipeline that ``cfg`` describes; return the name of its primary metric and every metric.

    ``model`` and ``data``, when given (the Python API), are used instead of building ``cfg.model`` and
    ``cfg.data``: the model is the baseline as it is (``train.fine_tune_pretrained`` trains it), scored afresh
    in every run, never cached. Bad input raises ``ConfigError`` before any hook runs, so nothing is recorded
    for it. Any later error is reported to ``on_run_error`` and re-raised.
    """
    plugins = plugins or load_plugins(cfg.plugins.disable)
    given = {name for name, value in (("model", model), ("data", data)) if value is not None}
    checked = plan(cfg, plugins, given=given, model=model)
    steps, hooks = checked.steps, plugins.hooks_without(checked.left_out)
    if data is None:
        data = _build_data(cfg)
    else:
        from slimlab.data import check_data

        try:
            check_data(data, "(a Data object)")
        except TypeError as error:
            raise ConfigError(str(error)) from None
    task = plugins.task(data.task)
    hash_ = config_hash(cfg, RUN_KEYS)
    from slimlab.baseline import identity

    found = None if given else identity(cfg)  # once: the run key and the baseline cache both key on it
    output_dir, temporary = _output_dir()
    ctx = RunContext(
        cfg=cfg,
        data=data,
        task=task,
        device=checked.device,
        run_name=run_name(cfg, steps),
        config_hash=hash_,
        output_dir=output_dir,
        # Objects handed in have no identity a later run could match: such a run is never resumed.
        tags={
            **_tags(plugins, steps, hash_),
            RUN_KEY_TAG: run_key(cfg, plugins, found) if found else f"objects-{uuid.uuid4().hex[:16]}",
            "slimlab.task": task.name,
        },
        steps=steps,
        tracking=tracking_store(cfg, plugins),
        keeps_output=not temporary,
    )
    try:
        hooks.before_run(ctx=ctx)
        try:
            metrics = _run_pipeline(ctx, steps, hooks, model, found)
            hooks.after_run(ctx=ctx, metrics=metrics)
        except BaseException as error:
            setattr(error, RECORDED, True)  # a ConfigError or PluginError from here on is a failed run, not bad input
            hooks.on_run_error(ctx=ctx, error=error, traceback_text=traceback.format_exc())
            raise
    finally:
        if temporary:  # the tracking backend has copied what it keeps
            shutil.rmtree(output_dir, ignore_errors=True)
    return task.primary_metric, metrics


def run_key(cfg: DictConfig, plugins: Plugins, found: dict[str, Any] | None = None) -> str:
    """The identity of a run's result: its config, the baseline's identity (code, files, versions), the code behind
    the techniques' options and the versions of the libraries they compute with, and the version (and local
    source) of every loaded plugin. Sweeps resume on it (the tag ``slimlab.run_key``)."""
    from slimlab.baseline import identity
    from slimlab.identity import digest, module_digest, techniques_fingerprint

    loaded = sorted((i for i in plugins.infos if i.status == "loaded"), key=lambda i: i.name)
    node = cfg.get("technique")
    techniques = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else {}
    return digest(
        {
            "config": config_hash(cfg, RUN_KEYS),
            "baseline": digest(found or identity(cfg)),
            "techniques": techniques_fingerprint(techniques),
            "plugins": [
                f"{i.name} {i.distribution}=={i.version} {module_digest(i.value.split(':')[0])}" for i in loaded
            ],
        }
    )


def _run_pipeline(
    ctx: RunContext, steps: list[Step], hooks, given_model: Any = None, found: dict[str, Any] | None = None
) -> dict[str, float]:
    from slimlab.artifact import artifact_name, save_model
    from slimlab.baseline import get_baseline
    from slimlab.measure import count_parameters, layer_sparsity, machine_tags, measure_latency, peak_memory_mb
    from slimlab.training import score_baseline

    task, eval_batch = ctx.task, ctx.cfg.measure.eval_batch_size
    baseline = get_baseline(ctx.cfg, ctx.data, task, ctx.device, eval_batch, model=given_model, found=found)
    ctx.baseline, ctx.baseline_metrics = baseline.model, baseline.metrics
    ctx.tags["slimlab.baseline"] = f"{baseline.key} ({baseline.origin})"
    # What later evaluations compare with (the targets of a task without labels): the baseline's outputs.
    ctx.references = baseline.references or score_baseline(baseline.model, ctx.data, task, ctx.device, eval_batch)[1]
    primary = task.primary_metric
    model = copy.deepcopy(baseline.model)
    model_path = ctx.output_dir / artifact_name(model)
    metadata = {"techniques": [s.name for s in steps]}
    codec = ctx.cfg.artifact.codec

    for index, step in enumerate(steps, 1):
        log.info("technique %d/%d: %s", index, len(steps), step.describe())
        model = apply_technique(step, model, ctx)
        if model is None:
            raise TypeError(f"technique {step.name!r} returned None; apply() must return the model")
        params, nonzero = count_parameters(model)
        # The last stage's file is the run's model artifact: saved once.
        last = index == len(steps)
        if last:  # named for what it holds: model.pt, or model.onnx for an ONNX Runtime session
            model_path = ctx.output_dir / artifact_name(model)
        stage_path = model_path if last else ctx.output_dir / "stages" / f"{index}-{step.name}.pt"
        stage = {
            "stage": index,
            "technique": step.name,
            "label": step.describe(),
            primary: ctx.evaluate(model),
            "size_bytes": save_model(
                model, stage_path, metadata={**metadata, "model": _class_path(model)}, codec=codec
            ),
            "param_count": params,
            "nonzero_param_count": nonzero,
            "layer_sparsity": layer_sparsity(model),
        }
        ctx.stages.append(stage)
        hooks.after_technique(ctx=ctx, name=step.name, model=model, metrics=stage)

    dense_size = save_model(model, ctx.output_dir / "stages" / "dense.pt", compact=False)
    if steps:
        size = ctx.stages[-1]["size_bytes"]
    else:  # the baseline alone
        size = save_model(model, model_path, metadata={**metadata, "model": _class_path(model)}, codec=codec)
    if codec != "none":  # what the entropy coding itself saved
        ctx.metrics["uncoded_size_bytes"] = save_model(model, ctx.output_dir / "stages" / "uncoded.pt")
    ctx.artifacts["model"] = model_path
    ctx.model = model
    params, nonzero = count_parameters(model)
    measure = ctx.cfg.measure
    latency = measure_latency(
        {"baseline": baseline.model, "compressed": model},
        ctx.example_inputs(),
        warmup=measure.warmup,
        repeats=measure.repeats,
        threads=measure.threads,
    )
    scores = ctx.evaluate_all(model)
    score, base_score = scores.pop(primary), baseline.metrics[primary]
    metrics: dict[str, float] = {
        primary: score,
        f"baseline_{primary}": base_score,
        f"{primary}_drop": task.drop(base_score, score),
        "size_bytes": size,
        "baseline_size_bytes": baseline.metrics["size_bytes"],
        "compression_ratio": baseline.metrics["size_bytes"] / size,
        "dense_size_bytes": dense_size,
        "param_count": params,
        "nonzero_param_count": nonzero,
        "sparsity": 1 - nonzero / params if params else 0.0,
        "latency_ms": latency["compressed"].median_ms,
        "latency_ms_p95": latency["compressed"].p95_ms,
        "baseline_latency_ms": latency["baseline"].median_ms,
        "speedup": latency["baseline"].median_ms / latency["compressed"].median_ms,
    }
    metrics.update(scores)  # the task's further metrics (agreement with the baseline, fidelity)
    _check_speedup(metrics["speedup"], steps)
    ctx.tags.update(machine_tags(measure.threads))
    if steps and metrics["speedup"] < 1:  # said in the run, not left for a reader to notice in a column
        ctx.tags["slimlab.slower"] = (
            f"{metrics['speedup']:.2f}x: the compressed model is slower than the baseline on this machine "
            f"({ctx.tags['slimlab.cpu']}, {measure.threads} thread(s))"
        )
        log.warning("the compressed model is slower than the baseline here: %.2fx speedup", metrics["speedup"])
    metrics.update(peak_memory_mb())
    for extra in [ctx.metrics, *hooks.evaluate(model=model, ctx=ctx)]:
        for name, value in (extra or {}).items():
            if name in metrics:
                raise ValueError(f"metric {name!r} reported twice (by a technique or an evaluate() hook)")
            metrics[name] = float(value)

    metrics = {name: readable(value) for name, value in metrics.items()}
    _log_layer_sparsity(ctx, model)
    stages_path = ctx.output_dir / "stages.json"
    stages_path.write_text(json.dumps({"baseline": baseline.metrics, "stages": ctx.stages, "final": metrics}, indent=2))
    ctx.artifacts["stages"] = stages_path
    return metrics


def apply_technique(step: Step, model: Any, ctx: RunContext) -> Any:
    """``step``'s ``apply`` on a copy of its config, which must come back unchanged: the run's params are the
    configured options (logged before it runs), so a change made in ``apply`` would log a config other than the
    one run. A change is a ``PluginError`` naming the technique, its plugin and each changed field."""
    import dataclasses

    from slimlab.registry import _plain_deep

    unset = "(unset)"

    def fields(config: Any) -> dict[str, Any]:  # attributes apply adds count too
        named = {f.name: getattr(config, f.name, unset) for f in dataclasses.fields(config)}
        return named | getattr(config, "__dict__", {})

    given = copy.deepcopy(step.config)
    model = step.technique.apply(model, given, ctx)
    configured, left = fields(step.config), fields(given)
    changed = []
    for name in dict.fromkeys([*configured, *left]):
        was, now = configured.get(name, unset), left.get(name, unset)
        if not (was is now or was == now):  # `is`: a NaN left as it was is unchanged
            changed.append(f"{name}: configured {_plain_deep(was)!r}, apply left {_plain_deep(now)!r}")
    if changed:
        raise PluginError(
            f"technique {step.name!r} of plugin {step.technique.plugin!r} changed its config in apply "
            f"({'; '.join(changed)}): the run logs the configured options as its params, so apply must leave its "
            "config as it is; record a value it derives in ctx.metrics or ctx.tags"
        )
    return model


def readable(value: float) -> float:
    """A metric at the digits it has: a float32 result (a tensor's ``.item()``, ``0.9800000190734863``) at
    float32's shortest form (``0.98``), float64 arithmetic noise (``0.98 - 0.9756 = 0.0043999999999999595``)
    rounded at 12 significant digits, far below any measurement's own error."""
    import numpy as np

    value = float(value)
    if not math.isfinite(value):
        return value
    single = np.float32(value)
    if float(single) == value:  # exactly a float32: its shortest decimal form is the value it was computed as
        return float(str(single))
    return float(f"{value:.12g}")


def _log_layer_sparsity(ctx: RunContext, model) -> None:
    """A table and a bar chart of per-layer sparsity, when any layer has zeros to show."""
    from slimlab.measure import layer_sizes, layer_sparsity
    from slimlab.plots import layer_sparsity_chart, layer_sparsity_table

    sparsity = layer_sparsity(model)
    if max(sparsity.values(), default=0.0) < 0.01:
        return
    table = ctx.output_dir / "layer_sparsity.md"
    table.write_text(layer_sparsity_table(sparsity, layer_sizes(model)))
    ctx.artifacts["layer_sparsity_table"] = table
    chart = layer_sparsity_chart(sparsity, ctx.output_dir / "layer_sparsity.svg", ctx.run_name)
    ctx.artifacts["layer_sparsity_chart"] = chart


def _class_path(model) -> str:
    """The deployed model's class (a distilled student is not the configured model)."""
    from slimlab.artifact import deployable

    cls = type(deployable(model))
    return f"{cls.__module__}.{cls.__qualname__}"


SPEEDUP_NOISE = 1.05  # timing noise allowed above a physical bound before the figure is called impossible


def _check_speedup(speedup: float, steps: list[Step]) -> None:
    """A speedup above what the pipeline can physically give is a measurement error, not a result."""
    from slimlab.measure import MeasurementError

    bound = speedup_bound(steps)
    if bound is not None and speedup > bound * SPEEDUP_NOISE:
        chain = "+".join(step.describe() for step in steps)
        raise MeasurementError(
            f"measured speedup {speedup:.2f}x exceeds the physical bound {bound:g}x of {chain}: "
            "the measurement is wrong (e.g. the baseline was slowed by other work), not the model fast"
        )
