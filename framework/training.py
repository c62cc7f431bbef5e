"""Training and evaluation loops shared by the baseline and by techniques that fine-tune."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework.data import TaskData
from framework.progress import progress


def train(
    model: nn.Module,
    data: TaskData,
    settings: Any,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    device: str = "cpu",
    description: str = "train",
) -> None:
    """Minibatch Adam on the training split; ``settings`` is the ``train`` config node."""
    epochs = settings.epochs if epochs is None else epochs
    if epochs <= 0:
        return
    generator = torch.Generator().manual_seed(int(settings.seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr if lr is None else lr)
    x, y = data.train_x.to(device), data.train_y.to(device)
    model.to(device).train()
    for _ in progress(range(epochs), description, total=epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            optimizer.zero_grad()
            loss = F.nll_loss(model(x[batch]), y[batch])  # models return log-probabilities
            loss.backward()
            optimizer.step()
    model.eval()


@torch.inference_mode()
def evaluate(model: nn.Module, data: TaskData, device: str = "cpu", batch_size: int = 512) -> float:
    """Accuracy on the test split."""
    model.eval()
    correct = 0
    for start in range(0, len(data.test_x), batch_size):
        x = data.test_x[start : start + batch_size].to(device)
        correct += (model(x).argmax(dim=1).cpu() == data.test_y[start : start + batch_size]).sum().item()
    return correct / len(data.test_x)
