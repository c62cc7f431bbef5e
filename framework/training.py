"""Training and evaluation loops over a :class:`~slimlab.data.Data`'s loaders, shared by the baseline and by
techniques that fine-tune. Every split is streamed batch by batch: nothing holds a whole split in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from slimlab import batches
from slimlab.data import Data, iterate, loader
from slimlab.progress import progress
from slimlab.tasks import Scored

# loss(model, inputs, target) -> scalar; the default is the task's loss of the model's output against the target
Loss = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


def train(
    model: nn.Module,
    data: Data,
    task: Any,
    settings: Any,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    device: str = "cpu",
    description: str = "train",
    loss: Loss | None = None,
    extra_parameters: list[nn.Parameter] | None = None,
    targets_from: nn.Module | None = None,
) -> None:
    """Minibatch Adam on the training split; ``settings`` is the ``train`` config node.

    ``loss`` replaces the task loss (distillation); ``extra_parameters`` are trained alongside the model's
    (e.g. a projection head). ``targets_from``: for a task without labels, the model whose outputs are the
    targets (the baseline).
    """
    epochs = settings.epochs if epochs is None else epochs
    if epochs <= 0:
        return
    if not task.labelled and targets_from is None and loss is None:
        raise ValueError(f"task {task.name} has no labels: training needs the model whose outputs are the targets")
    loss = loss or (lambda m, inputs, target: task.loss(batches.call(m, inputs), target))
    parameters = [*model.parameters(), *(extra_parameters or [])]
    optimizer = torch.optim.Adam(parameters, lr=settings.lr if lr is None else lr)
    split = loader(data.train, settings.batch_size, shuffle=True, seed=int(settings.seed))
    model.to(device).train()
    if targets_from is not None:
        targets_from.to(device).eval()
    for _ in progress(range(epochs), description, total=epochs):
        for inputs, target in iterate(split, device):
            if not task.labelled and targets_from is not None:
                with torch.no_grad():
                    target = batches.call(targets_from, inputs).detach()
            elif target is None and task.labelled:
                raise ValueError(f"task {task.name} trains on targets, but a training batch has none")
            optimizer.zero_grad()
            loss(model, inputs, target).backward()
            optimizer.step()
    model.eval()


def test_split(data: Data, batch_size: int) -> Any:
    """The test split's batches, always in the same order."""
    return loader(data.test, batch_size)


@torch.inference_mode()
def outputs(model: nn.Module, data: Data, device: str = "cpu", batch_size: int = 512) -> Iterator[tuple[Any, Any]]:
    """``(output, target)`` of every test batch, on the CPU, outputs in float32."""
    model.eval()
    for inputs, target in iterate(test_split(data, batch_size), device):
        output = batches.call(model, inputs).float().cpu()
        yield output, None if target is None else target.cpu()


def _scored(stream, references: list[Any], task: Any) -> Iterator[Scored]:
    for index, (output, target) in enumerate(stream):
        if references and index >= len(references):
            raise ValueError("the test split yielded more batches than when the baseline was scored")
        if not references and not task.labelled:
            raise ValueError(f"task {task.name} compares with the baseline's outputs, and none were recorded")
        reference = references[index] if references else None
        if task.labelled and target is None:
            raise ValueError(f"task {task.name} is scored against targets, but a test batch has none")
        yield Scored(output, target if task.labelled else reference, reference)


def evaluate(
    model: nn.Module, data: Data, task: Any, references: list[Any], device: str = "cpu", batch_size: int = 512
) -> dict[str, float]:
    """Every metric of ``task`` on the test split; ``references`` are the baseline's, per batch."""
    return task.evaluate(_scored(outputs(model, data, device, batch_size), references, task))


def score_baseline(
    model: nn.Module, data: Data, task: Any, device: str = "cpu", batch_size: int = 512
) -> tuple[dict[str, float], list[Any]]:
    """The baseline's metrics (its own reference: agreement 1, cosine 1) and its references, in one pass."""
    references: list[Any] = []

    def stream() -> Iterator[Scored]:
        for output, target in outputs(model, data, device, batch_size):
            reference = task.reference(output)
            references.append(reference)
            yield Scored(output, target if task.labelled else reference, reference)

    metrics = task.evaluate(stream())
    return metrics, references
