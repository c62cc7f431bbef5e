"""Datasets that ship offline, as in-memory tensors, and the task each one poses (loss, primary metric)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# task -> (primary metric, higher is better)
TASKS = {"classification": ("accuracy", True), "regression": ("mse", False)}


@dataclass
class TaskData:
    """A supervised task held in memory: small enough for every dataset slimlab ships.

    Classification models return log-probabilities (the founding document's
    LeNet ends in ``log_softmax``); regression models return one value per row.
    """

    name: str
    task: str  # a key of TASKS
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int | None = None

    @property
    def primary_metric(self) -> str:
        return TASKS[self.task][0]

    @property
    def higher_is_better(self) -> bool:
        return TASKS[self.task][1]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss against labels."""
        if self.task == "classification":
            return F.nll_loss(output, target)
        return F.mse_loss(output.reshape(target.shape), target)

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The primary metric over a whole split."""
        if self.task == "classification":
            return (outputs.argmax(dim=1) == targets).float().mean().item()
        return F.mse_loss(outputs.reshape(targets.shape), targets).item()

    def drop(self, baseline: float, compressed: float) -> float:
        """How much worse the compressed model is (positive = worse), whichever way the metric points."""
        return baseline - compressed if self.higher_is_better else compressed - baseline

    def example_batch(self, size: int) -> torch.Tensor:
        """A fixed batch of test inputs, the same for every model measured in a run."""
        return self.test_x[:size].clone()

    def calibration_batches(self, batches: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The first ``batches`` minibatches of the training split, for calibrating observers."""
        for start in range(0, min(len(self.train_x), batches * batch_size), batch_size):
            yield self.train_x[start : start + batch_size]


def digits(image_size: int = 28, test_fraction: float = 0.25, seed: int = 0) -> TaskData:
    """scikit-learn's bundled 8x8 digits, upsampled to ``image_size`` for LeNet, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(labels, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=test_fraction, stratify=labels, random_state=seed)
    return TaskData("digits", "classification", x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes=10)


def regression(
    samples: int = 2000, features: int = 10, noise: float = 0.1, test_fraction: float = 0.25, seed: int = 0
) -> TaskData:
    """Synthetic regression: y = a fixed linear map of ``features`` Gaussian inputs + Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    weights = torch.randn(features, generator=generator)
    y = x @ weights + noise * torch.randn(samples, generator=generator)
    split = int(samples * (1 - test_fraction))
    return TaskData("regression", "regression", x[:split], y[:split], x[split:], y[split:])
