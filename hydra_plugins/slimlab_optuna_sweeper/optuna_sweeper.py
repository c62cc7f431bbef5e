"""``hydra/sweeper=slimlab_optuna``: a Hydra sweeper on current Optuna, multi-objective and resumable.

hydra-optuna-sweeper 1.3.0 pins optuna<3 and its persistent storage crashes with SQLAlchemy 2.1, so slimlab
ships this small one, found by Hydra in the ``hydra_plugins`` namespace like any sweeper plugin::

    slimlab run -m hydra/sweeper=slimlab_optuna 'technique=[prune,quantize]' \\
        'technique.prune.amount=interval(0.5, 0.98)' 'technique.quantize.backend=choice(torchao, pt2e)' \\
        hydra.sweeper.n_trials=12

Swept overrides (``choice``, ``range``, ``interval``, ``tag(log, interval(...))``) are the search space;
plain ones are fixed. Each trial is one slimlab job; the job's metrics (the task function returns them all)
are the objectives, ``hydra.sweeper.objectives`` mapping metric to direction. The study lives in
``storage`` (default: ``sqlite:///<launch dir>/optuna.db``). A search is its search space, its objectives and
its fixed overrides (but those that only say where results go: tracking, cache_dir, resume, experiment_name);
the study is named ``<experiment_name>-<digest of the search>`` unless ``study_name`` is given, and records the
search it holds (user attr ``slimlab.search``): a study of another search is refused, never continued. The
same search started again counts the COMPLETE trials already there and runs only the rest; trials left
RUNNING by an interruption are marked FAIL and redone. The Pareto front (``study.best_trials``) is printed
and written to ``<sweep dir>/pareto_front.json``.
"""

# No `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in sys.modules,
# where dataclasses cannot resolve string annotations (and OmegaConf needs the real types anyway).
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("slimlab")
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "nsga2", "random")
SEARCH_ATTR = "slimlab.search"  # the study's user attr recording the search it holds
# Overrides that say where results are kept, not what they are: changing them continues the same search.
NOT_THE_SEARCH = ("tracking", "cache_dir", "resume", "experiment_name")


@dataclass
class SlimlabOptunaSweeperConf:
    _target_: str = "hydra_plugins.slimlab_optuna_sweeper.optuna_sweeper.SlimlabOptunaSweeper"
    objectives: dict[str, str] = field(default_factory=lambda: {"accuracy": "maximize", "size_bytes": "minimize"})
    n_trials: int = 12
    n_jobs: int = 1  # trials launched together (a parallel launcher runs them at once)
    max_failures: int | None = None  # failed trials before the search gives up; None: n_trials
    sampler: str = "tpe"  # tpe | nsga2 | random
    seed: int = 0
    storage: str | None = None  # None: sqlite:///<launch dir>/optuna.db
    study_name: str | None = None  # None: <experiment_name>-<digest of the search space, objectives, fixed overrides>
    params: dict[str, str] = field(default_factory=dict)  # the search space, as Hydra sweep overrides


ConfigStore.instance().store(group="hydra/sweeper", name="slimlab_optuna", node=SlimlabOptunaSweeperConf)


def distribution(override: Any) -> Any:
    """The Optuna distribution of a Hydra sweep override: choice, range or interval (tag 'log': log scale)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution([str(v) if not isinstance(v, int | float) else v for v in value.list])
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(x, int) for x in (start, stop, step)):
            return IntDistribution(int(start), int(stop) - 1, step=int(step))
        values = []
        while start < stop:
            values.append(start)
            start += step
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"cannot search over {override.input_line!r}: use choice(...), range(...) or interval(...)")


def _show(dist: Any) -> str:
    """A distribution in a readable form that holds everything that defines it."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return f"choice({', '.join(map(repr, dist.choices))})"
    kind = "int" if type(dist).__name__.startswith("Int") else "float"
    extra = (", log" if dist.log else "") + (f", step={dist.step!r}" if dist.step not in (None, 1) else "")
    return f"{kind}[{dist.low!r}, {dist.high!r}{extra}]"


def search(space: dict[str, Any], fixed: list[str], objectives: dict[str, str]) -> dict[str, list[str]]:
    """What identifies a search: its space, its objectives in order, and the fixed overrides that shape results."""

    def root(override: str) -> str:
        return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0]

    return {
        "search_space": [f"{key}={_show(dist)}" for key, dist in sorted(space.items())],
        "objectives": [f"{metric}:{direction}" for metric, direction in objectives.items()],
        "fixed": sorted(o for o in fixed if root(o) not in NOT_THE_SEARCH),
    }


def search_digest(description: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:8]


def _differences(stored: dict[str, list[str]], wanted: dict[str, list[str]]) -> str:
    parts = [
        f"{part.replace('_', ' ')} {' '.join(stored.get(part, [])) or 'none'} there, "
        f"{' '.join(wanted[part]) or 'none'} here"
        for part in wanted
        if stored.get(part) != wanted[part]
    ]
    return "; ".join(parts)


class SlimlabOptunaSweeper(Sweeper):
    def __init__(
        self,
        objectives: dict[str, str],
        n_trials: int,
        n_jobs: int,
        max_failures: int | None,
        sampler: str,
        seed: int,
        storage: str | None,
        study_name: str | None,
        params: dict[str, str],
    ) -> None:
        from slimlab.extras import require

        require("optuna", "search", "hydra/sweeper=slimlab_optuna")  # before anything reads a search space
        bad = {metric: d for metric, d in objectives.items() if d not in DIRECTIONS}
        if not objectives or bad:
            raise ValueError(f"hydra.sweeper.objectives maps metrics to {' or '.join(DIRECTIONS)}; got {bad or {}}")
        if sampler not in SAMPLERS:
            raise ValueError(f"hydra.sweeper.sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials and n_jobs must be >= 1; got {n_trials}, {n_jobs}")
        self.objectives = dict(objectives)
        self.n_trials, self.n_jobs, self.sampler_name, self.seed = n_trials, n_jobs, sampler, seed
        self.storage, self.study_name, self.params = storage, study_name, dict(params or {})
        self.max_failures = n_trials if max_failures is None else max_failures

    @classmethod
    def check_sweep(cls, config: DictConfig) -> None:
        """Refuse a bad sweeper setting or an empty search space before the sweep starts (slimlab calls this)."""
        from hydra.utils import instantiate

        try:
            sweeper = instantiate(config.hydra.sweeper)  # the constructor checks objectives, sampler, counts
        except Exception as error:  # Hydra wraps the constructor's ValueError: report the ValueError itself
            cause = error.__cause__
            raise (cause if isinstance(cause, ValueError) else error) from None
        space, fixed = sweeper._space_and_fixed(list(config.hydra.overrides.task), parser=None)
        sweeper._study(space, fixed, str(config.experiment_name), create=False)  # another search's study: refused

    def _storage(self) -> str:
        return self.storage or f"sqlite:///{Path.cwd().resolve() / 'optuna.db'}"

    def _study(self, space: dict[str, Any], fixed: list[str], experiment: str, create: bool) -> Any:
        """The study of this search, created (``create``) or None if it does not exist yet.

        A study is one search: an existing study that holds another search (or whose search is unknown and
        that has trials) is refused, naming both, rather than continued with points it was not asked for.
        """
        import optuna

        from slimlab.errors import ConfigError

        wanted = search(space, fixed, self.objectives)
        name = self.study_name or f"{experiment}-{search_digest(wanted)}"
        storage = self._storage()
        database = Path(storage.removeprefix("sqlite:///")) if storage.startswith("sqlite:///") else None
        if database is not None and not database.parent.is_dir():
            raise ConfigError(f"hydra.sweeper.storage={storage!r}: directory {database.parent} does not exist")
        try:
            if create:
                study = optuna.create_study(
                    study_name=name,
                    storage=storage,
                    directions=[self.objectives[m] for m in self.objectives],
                    sampler=self._sampler(),
                    load_if_exists=True,
                )
            elif database is not None and not database.exists():
                return None  # no study yet; looking must not create the database
            else:
                study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # Optuna's "Record does not exist." (only when looking)
            return None
        except Exception as error:  # the storage is the user's input: say so in one line
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(f"hydra.sweeper.storage={storage!r} cannot be opened: {reason}") from error
        stored = study.user_attrs.get(SEARCH_ATTR)
        if stored is None and not study.trials:  # just created (or empty): it holds this search from now on
            if create:
                study.set_user_attr(SEARCH_ATTR, wanted)
            return study
        if stored != wanted:
            what = _differences(stored, wanted) if stored else "it records no search and has trials"
            raise ConfigError(
                f"hydra.sweeper.study_name={name!r} in {storage} is another search ({what}); "
                "give another hydra.sweeper.study_name, or none for one named after this search"
            )
        return study

    def _space_and_fixed(self, arguments: list[str], parser: Any) -> tuple[dict[str, Any], list[str]]:
        """The search space (swept overrides as Optuna distributions) and the fixed overrides."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = parser or OverridesParser.create()
        overrides = parser.parse_overrides([*(f"{k}={v}" for k, v in self.params.items()), *arguments])
        space = {o.get_key_element(): distribution(o) for o in overrides if o.is_sweep_override()}
        plain = [o for o in overrides if not o.is_sweep_override()]
        if not space:
            raise ValueError("slimlab_optuna needs a search space: e.g. 'technique.prune.amount=interval(0.5, 0.95)'")
        return space, [f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in plain]

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _sampler(self) -> Any:
        import optuna

        if self.sampler_name == "random":
            return optuna.samplers.RandomSampler(seed=self.seed)
        if self.sampler_name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed)

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space, fixed = self._space_and_fixed(arguments, parser)

        study = self._study(space, fixed, str(self.config.experiment_name), create=True)
        name, storage = study.study_name, self._storage()
        # Left RUNNING by an interruption (one sweeper per study): failed, so their points are asked again.
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        log.info("optuna study %r in %s: %d of %d trials complete", name, storage, done, self.n_trials)

        results, failures = [], 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [[*fixed, *(f"{key}={value}" for key, value in t.params.items())] for t in trials]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, job in zip(trials, returns, strict=True):
                values = self._values(job)
                if values is None:
                    study.tell(trial, state=TrialState.FAIL)
                    failures += 1
                else:
                    study.tell(trial, values)
                    done += 1
            results.append(returns)
            if failures >= self.max_failures:
                raise RuntimeError(
                    f"{failures} trials failed (hydra.sweeper.max_failures={self.max_failures}); "
                    f"{done} of {self.n_trials} complete: see the failed runs' tracebacks in the tracking store"
                )
        self._report(study)
        return results

    def _values(self, job: Any) -> list[float] | None:
        """The objectives from a job's metrics, or None when the job failed or lacks one of them."""
        from hydra.core.utils import JobStatus

        if job.status != JobStatus.COMPLETED or not isinstance(job.return_value, dict):
            return None
        metrics = job.return_value
        missing = [m for m in self.objectives if m not in metrics]
        if missing:  # every trial would lack it: stop now, with what the runs do measure
            raise ValueError(
                f"hydra.sweeper.objectives names {missing}, which the runs do not log; "
                f"they log: {', '.join(sorted(metrics))}"
            )
        return [float(metrics[m]) for m in self.objectives]

    def _report(self, study: Any) -> None:
        front = [
            {"trial": t.number, "params": t.params, "values": dict(zip(self.objectives, t.values, strict=True))}
            for t in sorted(study.best_trials, key=lambda t: t.number)
        ]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "pareto_front.json").write_text(json.dumps(front, indent=2))
        from slimlab import sweep

        tracked = sweep.active_parent()
        if tracked:  # beside the sweep's report in the tracking store
            store, parent = tracked
            store.log_text(parent, json.dumps(front, indent=2), "report/optuna_pareto_front.json")
        print(f"Pareto front of study {study.study_name!r} ({len(front)} of {len(study.trials)} trials):", flush=True)
        for entry in front:
            values = ", ".join(f"{m}={v:.4g}" for m, v in entry["values"].items())
            params = " ".join(f"{k}={v}" for k, v in entry["params"].items())
            print(f"  trial {entry['trial']}: {values}  ({params})", flush=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
