"""Every hook slimlab calls. Plugins implement them with ``@slimlab.hookimpl``.

A hook's arguments are passed by keyword; an implementation may accept any
subset of them (pluggy matches by name). Hooks are called in LIFO order of
registration, built-in plugins first registered, so third-party plugins run
before built-ins unless they use ``tryfirst``/``trylast``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimlab import hookspec

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import nn

    from slimlab.context import RunContext
    from slimlab.plugin_manager import RegisterOption, RegisterTracking
    from slimlab.registry import Register
    from slimlab.tasks import RegisterTask


@hookspec
def register_techniques(register: Register) -> None:
    """Declare the compression techniques this plugin provides.

    When: once per process, while the plugin manager is built, before Hydra
    composes any config (the schemas must be in Hydra's ConfigStore by then).

    ``register`` is called as
    ``register(name, schema, apply, *, label=None, followed_by=None, check=None, max_speedup=None,
    key_params=None, serialization_format="pt2", module_options=None, keeps_module_names=False,
    label_shows=None)``:

    - ``name``: the technique's option in the ``technique`` config group and
      its key in the composed config (``technique.<name>.<field>``).
    - ``schema``: a dataclass; its fields are the technique's options, typed,
      with defaults. Validate ranges in ``__post_init__`` (raise ``ValueError``
      with what is valid); slimlab reports it as bad input, exit code 2.
    - ``apply(model, config, ctx) -> nn.Module``: compress ``model`` in place
      or return a new module; ``config`` is an instance of ``schema``.
    - ``label(config) -> str``: a short readable form for run names,
      e.g. ``prune(0.9)``; defaults to the name.
    - ``followed_by``: names of techniques that may come after this one in a
      pipeline (``()`` makes it final); ``None`` means any.
    - ``max_speedup(config) -> float | None``: the physical bound of the
      speedup this technique can give over fp32 (int8: 4.0, from the 4x
      narrower arithmetic). A measured speedup above the pipeline's bound
      fails the run as a measurement error. ``None``: no known bound.
    - ``check(config)``: a capability probe, called before any work; raise
      ``ValueError`` with the reason when this machine cannot run ``config``
      (e.g. int4 kernels on a CPU without them). Never fall back silently.
    - ``key_params`` (API 1.1): the schema's fields that matter when comparing runs;
      logged as short top-level params ``<name>.<field>`` beside the full
      config. ``None``: every scalar field.
    - ``serialization_format`` (API 1.1): how the tracking plugin saves this
      technique's output with ``mlflow.pytorch.log_model``: ``"pt2"``
      (torch.export; loads without your classes) or ``"pickle"`` (any module,
      e.g. ``torch.ao`` quantized ones, which torch.export cannot hold), or a
      function of the config returning one. A pipeline with any ``pickle``
      step is saved as ``pickle``.
    - ``module_options`` (API 2.1): the schema's fields that name modules of the model (a list of names, or
      a dict keyed by them, e.g. ``layers``); the plan refuses a name the model does not have, before any work.
    - ``keeps_module_names`` (API 2.1): whether the model this technique returns has its input's module names
      (``True``, or a function of the config), so a later step's ``module_options`` can be checked against the
      configured model too. ``False`` (the default) stops those checks at this step.
    - ``label_shows`` (API 2.2): the schema's fields ``label`` already shows, or that do not change results. A run
      name is the label plus every other field set away from its default (``prune(0.9,fine_tune_epochs=2)``), so
      two runs that differ never share a name. ``None``: a value the label already holds (``0.02`` in
      ``zero_small(0.02)``) counts as shown.

    Returns nothing. Registering a name twice is a ``PluginError``.
    """


@hookspec
def register_tasks(register: RegisterTask) -> None:
    """Declare the tasks this plugin provides (API 2.0).

    When: once per process, while the plugin manager is built, with ``register_techniques``.

    ``register`` is called as ``register(name, factory)``: ``factory()`` returns a task object, with the
    attributes and methods of ``slimlab.tasks.Task`` (``name``, ``primary_metric``, ``higher_is_better``,
    ``labelled``, ``loss``, ``reference``, ``evaluate``, ``drop``). A data callable names it in
    ``Data(task=name)``. slimlab's built-in tasks (classification, regression, embedding, language_modeling)
    come through this hook too. Registering a name twice is a ``PluginError``. Returns nothing.
    """


@hookspec
def register_options(register: RegisterOption) -> None:
    """Declare model and data options this plugin ships (API 2.0): a package can carry a zoo.

    When: once per process, while the plugin manager is built, before Hydra composes any config.

    ``register`` is called as ``register(group, name, node)``: ``group`` is ``"model"`` or ``"data"``, ``name``
    the option (``model=<name>``), ``node`` a dict like a ``conf/model/*.yaml`` file: ``_target_`` (any
    importable callable) and its arguments, and for models ``checkpoint``/``pretrained``. The options are
    listed by ``slimlab run --help`` and usable as ``technique.distill.student=<name>``. A name that slimlab's
    own ``conf/`` or another plugin already has is a ``PluginError``. Returns nothing.
    """


@hookspec
def register_tracking(register: RegisterTracking) -> None:
    """Declare tracking backends this plugin provides (API 2.3): stores that record runs and read them back.

    When: once per process, while the plugin manager is built.

    ``register`` is called as ``register(name, factory)``: ``tracking.backend=<name>`` selects the backend and
    ``factory(uri)`` returns a store for ``tracking.uri`` (None: the backend's default), an object with the methods
    of ``slimlab.tracking.TrackingStore``. Runs, sweeps (their parent run, job outcomes and resume) and
    ``slimlab report`` all record and read through it. Making the store must not touch it (``check`` does, in the
    plan). slimlab's MLflow backend comes through this hook too. A name already taken (``none`` included) is a
    ``PluginError``. Returns nothing.
    """


@hookspec
def check_config(cfg: DictConfig, host: bool) -> None:
    """Refuse a config this plugin cannot serve, before any work (API 2.1).

    When: while a run or a sweep is planned, after slimlab's own checks, before anything is built, trained or
    recorded; in a sweep, in the launching process for every job before the first starts. ``cfg`` is the
    composed config. ``host`` is False when the jobs run on other machines (a cluster launcher): skip what
    only this machine can tell (its devices, its network view). Keep it to a few seconds.
    Returns nothing; raise ``slimlab.ConfigError`` naming the key, what is wrong and what is valid.
    """


@hookspec
def before_run(ctx: RunContext) -> None:
    """A run is about to start.

    When: after the config is validated (so bad input never reaches this
    hook) and the data is loaded, before the baseline is trained or loaded.
    ``ctx`` is the run's context: ``ctx.cfg`` the resolved config,
    ``ctx.run_name`` its readable name, ``ctx.tags`` the run's tags.
    slimlab's recorder (``slimlab.tracking``) opens the run in ``ctx.tracking``, the run's store, here. Returns nothing.
    """


@hookspec
def after_technique(ctx: RunContext, name: str, model: nn.Module, metrics: dict[str, float]) -> None:
    """One technique of the pipeline has been applied.

    When: after ``apply`` returned, once per technique, in pipeline order.
    ``ctx`` is the run's context, ``name`` the technique, ``model`` the model it returned, ``metrics``
    the stage's measurements (accuracy, size, sparsity), also appended to
    ``ctx.stages``. Do not modify the model. Returns nothing.
    """


@hookspec
def evaluate(model: nn.Module, ctx: RunContext) -> dict[str, float] | None:
    """Contribute extra metrics for the final, compressed model.

    When: after the built-in final evaluation, before ``after_run``.
    ``model`` is the compressed model as deployed, ``ctx`` the run's context
    (``ctx.baseline`` is the uncompressed model).
    Return a dict of metric name to number (or ``None``). All results are
    merged into the run's metrics; a name that the run already has, or that
    two plugins return, fails the run with both names.
    """


@hookspec
def after_run(ctx: RunContext, metrics: dict[str, float]) -> None:
    """A run finished successfully.

    When: last, with ``metrics``, every metric of the run (README, "What every run records"
    plus the ``evaluate`` results). ``ctx`` is the run's context: ``ctx.model`` the compressed model as deployed,
    ``ctx.steps`` the pipeline, ``ctx.artifacts`` the local files written for this run (compressed model, stage
    metrics), by name. slimlab's recorder logs and closes the run here. Returns nothing.
    """


@hookspec
def on_run_error(ctx: RunContext, error: BaseException, traceback_text: str) -> None:
    """A run raised (or was interrupted) after ``before_run``.

    When: instead of ``after_run``, with ``error``, the exception
    (``KeyboardInterrupt`` means the run was interrupted), and ``ctx``, the
    run's context. ``traceback_text`` is the formatted
    traceback. slimlab's recorder closes the run FAILED (or KILLED) here.
    Returns nothing; the error is re-raised after every implementation ran.
    """


def hook_names() -> list[str]:
    """Names of every hook declared in this module."""
    return [name for name, value in globals().items() if callable(value) and hasattr(value, "slimlab_spec")]
