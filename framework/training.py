"""Training and evaluation loops shared by the baseline and by techniques that fine-tune."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from framework.data import TaskData
from framework.progress import progress

# loss(model, x, y) -> scalar; the default is the task's loss against labels
Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train(
    model: nn.Module,
    data: TaskData,
    settings: Any,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    device: str = "cpu",
    description: str = "train",
    loss: Loss | None = None,
    extra_parameters: list[nn.Parameter] | None = None,
) -> None:
    """Minibatch Adam on the training split; ``settings`` is the ``train`` config node.

    ``loss`` replaces the task loss (distillation); ``extra_parameters`` are
    trained alongside the model's (e.g. a projection head).
    """
    epochs = settings.epochs if epochs is None else epochs
    if epochs <= 0:
        return
    loss = loss or (lambda m, x, y: data.loss(m(x), y))
    generator = torch.Generator().manual_seed(int(settings.seed))
    parameters = [*model.parameters(), *(extra_parameters or [])]
    optimizer = torch.optim.Adam(parameters, lr=settings.lr if lr is None else lr)
    x, y = data.train_x.to(device), data.train_y.to(device)
    model.to(device).train()
    for _ in progress(range(epochs), description, total=epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            optimizer.zero_grad()
            loss(model, x[batch], y[batch]).backward()
            optimizer.step()
    model.eval()


@torch.inference_mode()
def predict(model: nn.Module, inputs: torch.Tensor, device: str = "cpu", batch_size: int = 512) -> torch.Tensor:
    """Model outputs for ``inputs``, batched, on the CPU."""
    model.eval()
    outputs = [model(inputs[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(inputs), batch_size)]
    return torch.cat(outputs)


def evaluate(model: nn.Module, data: TaskData, device: str = "cpu") -> float:
    """The task's primary metric on the test split."""
    return data.score(predict(model, data.test_x, device), data.test_y)


def evaluate_all(model: nn.Module, data: TaskData, device: str = "cpu") -> dict[str, float]:
    """The task's primary metric and its further ones (embedding: fidelity to the baseline) on the test split."""
    return data.scores(predict(model, data.test_x, device), data.test_y)
