"""RunContext: what a technique or plugin can see of the run it is part of."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    from omegaconf import DictConfig
    from torch import nn

    from slimlab.data import Data
    from slimlab.registry import Step
    from slimlab.training import Loss, StepHook


@dataclass
class RunContext:
    """The state of one run, handed to every technique and hook.

    ``data`` is the run's :class:`~slimlab.data.Data` and ``task`` its task object (loss, metrics,
    primary metric). ``baseline`` is the uncompressed model (the default teacher); techniques must not
    modify it. ``steps`` is the pipeline (each technique with its validated config); ``model`` is the
    compressed model as deployed, set once the last technique ran. ``state`` is scratch space for plugins
    (e.g. a tracking run id), keyed by plugin name by convention. Techniques put measurements about
    themselves (compile time, dense size) in ``metrics`` and readable facts (placement) in ``tags``; both
    are logged.

    Models take inputs in the data's form (a tensor, a tuple of positional inputs, or a dict of keyword
    inputs): call them with :func:`slimlab.batches.call`, which also reads Hugging Face outputs.
    """

    cfg: DictConfig
    data: Data
    task: Any
    device: str
    run_name: str
    config_hash: str
    output_dir: Path
    steps: list[Step] = field(default_factory=list)
    baseline: nn.Module | None = None
    model: nn.Module | None = None
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    references: list[Any] = field(default_factory=list)  # the task's reference of the baseline, per test batch
    stages: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # what techniques report about themselves
    state: dict[str, Any] = field(default_factory=dict)
    tracking: Any = None  # the run's slimlab.tracking.TrackingStore; None when nothing is recorded
    keeps_output: bool = True  # output_dir outlives the run (a Hydra job's); False: removed when the run ends

    def fine_tune(
        self,
        model: nn.Module,
        epochs: int,
        lr: float | None = None,
        description: str = "fine-tune",
        loss: Loss | None = None,
        *,
        keep_zeros: bool = False,
        before_step: StepHook | None = None,
        after_step: StepHook | None = None,
    ) -> None:
        """Train ``model`` further on the training split with the run's training settings.

        ``loss(model, inputs, target)`` replaces the task's loss. Weights at zero do not stay zero by default
        (Adam moves them) unless a mask holds them (``torch.nn.utils.prune`` keeps its masks applied while
        training); ``keep_zeros=True`` puts every zero of a weight matrix or kernel back after each step, so a
        pruned model stays as sparse. A technique with its own step (API 2.2): ``before_step(model)`` runs
        after the backward pass (transform the gradients), ``after_step(model)`` after the optimizer's step
        and the zeros (project the weights back, e.g. onto shared centroids); both under ``torch.no_grad()``.
        """
        from slimlab.training import train

        train(
            model,
            self.data,
            self.task,
            self.cfg.train,
            epochs=epochs,
            lr=lr,
            device=self.device,
            description=description,
            loss=loss,
            targets_from=None if self.task.labelled else self.baseline,
            before_step=before_step,
            after_step=after_step,
            keep_zeros=keep_zeros,
        )

    def example_inputs(self, rows: int | None = None) -> Any:
        """The first ``rows`` test inputs (default ``measure.batch_size``) on the run's device: the same batch
        for every model measured in a run, and the example for tracing and compiling."""
        from slimlab import batches
        from slimlab.training import test_split

        rows = rows or self.cfg.measure.batch_size
        inputs = batches.first_rows(test_split(self.data, self.cfg.measure.eval_batch_size), rows)
        return batches.to_device(batches.clone(inputs), self.device)

    def calibration_batches(self, count: int) -> Iterator[Any]:
        """The inputs of the first ``count`` calibration batches (default: the training split, in order,
        ``train.batch_size`` rows each) on the run's device, for calibrating observers."""
        from slimlab.data import iterate, loader

        split = self.data.calibration if self.data.calibration is not None else self.data.train
        for index, (inputs, _) in enumerate(iterate(loader(split, self.cfg.train.batch_size), self.device)):
            if index >= count:
                return
            yield inputs

    def evaluate(self, model: nn.Module) -> float:
        """The task's primary metric of ``model`` on the test split."""
        return self.evaluate_all(model)[self.task.primary_metric]

    def evaluate_all(self, model: nn.Module) -> dict[str, float]:
        """Every metric of the task for ``model`` on the test split, against the baseline's references."""
        from slimlab.training import evaluate

        return evaluate(model, self.data, self.task, self.references, self.device, self.cfg.measure.eval_batch_size)
