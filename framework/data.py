"""Datasets that ship offline, as tensors split into train / calibration / test."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskData:
    """A supervised task held in memory: small enough for every dataset slimlab ships."""

    name: str
    task: str  # "classification"
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def primary_metric(self) -> str:
        return {"classification": "accuracy"}[self.task]

    def example_batch(self, size: int) -> torch.Tensor:
        """A fixed batch of test inputs, the same for every model measured in a run."""
        return self.test_x[:size].clone()


def digits(image_size: int = 28, test_fraction: float = 0.25, seed: int = 0) -> TaskData:
    """scikit-learn's bundled 8x8 digits, upsampled to ``image_size`` for LeNet, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(labels, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=test_fraction, stratify=labels, random_state=seed)
    return TaskData(
        name="digits",
        task="classification",
        train_x=x[train_idx],
        train_y=y[train_idx],
        test_x=x[test_idx],
        test_y=y[test_idx],
        num_classes=10,
    )
