"""RunContext: what a technique or plugin can see of the run it is part of."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from omegaconf import DictConfig
    from torch import nn

    from framework.data import TaskData
    from framework.registry import Step


@dataclass
class RunContext:
    """The state of one run, handed to every technique and hook.

    ``baseline`` is the trained, uncompressed model (the default teacher);
    techniques must not modify it. ``steps`` is the pipeline (each technique
    with its validated config); ``model`` is the compressed model as
    deployed, set once the last technique ran. ``state`` is scratch space for
    plugins (e.g. a tracking run id), keyed by plugin name by convention. Techniques
    put measurements about themselves (compile time, dense size) in
    ``metrics`` and readable facts (placement) in ``tags``; both are logged.
    """

    cfg: DictConfig
    data: TaskData
    device: str
    run_name: str
    config_hash: str
    output_dir: Path
    steps: list[Step] = field(default_factory=list)
    baseline: nn.Module | None = None
    model: nn.Module | None = None
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # what techniques report about themselves
    state: dict[str, Any] = field(default_factory=dict)

    def fine_tune(self, model: nn.Module, epochs: int, lr: float | None = None, description: str = "fine-tune") -> None:
        """Train ``model`` further on the run's training split with the run's training settings."""
        from framework.training import train

        train(model, self.data, self.cfg.train, epochs=epochs, lr=lr, device=self.device, description=description)

    def calibration_batches(self, batches: int) -> Iterator[torch.Tensor]:
        """Training-split minibatches (``train.batch_size`` rows each) for calibrating observers."""
        return self.data.calibration_batches(batches, self.cfg.train.batch_size)

    def evaluate(self, model: nn.Module) -> float:
        """The task's primary metric of ``model`` on the test split."""
        from framework.training import evaluate

        return evaluate(model, self.data, device=self.device)
