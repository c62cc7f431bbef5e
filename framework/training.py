"""Training and evaluation loops over a :class:`~slimlab.data.Data`'s loaders, shared by the baseline and by
techniques that fine-tune. Every split is streamed batch by batch: nothing holds a whole split in memory."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimlab import batches
from slimlab.data import Data, iterate, loader
from slimlab.progress import progress
from slimlab.tasks import Scored

# loss(model, inputs, target) -> scalar; the default is the task's loss of the model's output against the target
Loss = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]
# A technique's own part of each training step, given the model: before_step sees the gradients (transform them:
# centroid sharing sums them per cluster), after_step the updated weights (project them back onto a constraint)
StepHook = Callable[[nn.Module], None]
# Intra-op threads while training: a fixed count, so a process's thread count (a joblib worker gets fewer) does
# not change the trained bytes. One: the only count that never oversubscribes parallel jobs.
TRAIN_THREADS = 1


def train_threads(settings: Any) -> int:
    """The intra-op thread count training uses: ``train.threads`` when the config has it, else ``TRAIN_THREADS``."""
    return int(getattr(settings, "threads", None) or TRAIN_THREADS)


@contextmanager
def reproducible(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Same inputs, same bytes, whatever the process's thread count: float sums are split per thread, so the
    count changes the rounding; fix it, and ask torch for its deterministic kernels (CUDA's mostly; on the CPU a
    few scatter/index ops). Both restored afterwards."""
    previous = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without one warns instead of failing the run
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])


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
    before_step: StepHook | None = None,
    after_step: StepHook | None = None,
    keep_zeros: bool = False,
) -> None:
    """Minibatch Adam on the training split; ``settings`` is the ``train`` config node.

    ``loss`` replaces the task loss (distillation); ``extra_parameters`` are trained alongside the model's
    (e.g. a projection head). ``targets_from``: for a task without labels, the model whose outputs are the
    targets (the baseline). Each step: loss, backward, ``before_step(model)``, the optimizer's step, the zeros
    put back (``keep_zeros``: every weight of a matrix or kernel that is exactly zero now stays exactly zero),
    ``after_step(model)``; both hooks run under ``torch.no_grad()``. Trained under :func:`reproducible`: the
    same bytes in every process.
    """
    epochs = settings.epochs if epochs is None else epochs
    if epochs <= 0:
        return
    if not task.labelled and targets_from is None and loss is None:
        raise ValueError(f"task {task.name} has no labels: training needs the model whose outputs are the targets")
    loss = loss or (lambda m, inputs, target: task.loss(batches.call(m, inputs), target))
    parameters = [*model.parameters(), *(extra_parameters or [])]
    with torch.no_grad():  # what pruning left at zero, per weight matrix or kernel (biases are not pruned)
        zeros = [(p, p.eq(0)) for p in model.parameters() if keep_zeros and p.dim() > 1 and bool(p.eq(0).any())]
    optimizer = torch.optim.Adam(parameters, lr=settings.lr if lr is None else lr)
    split = loader(data.train, settings.batch_size, shuffle=True, seed=int(settings.seed))
    model.to(device).train()
    if targets_from is not None:
        targets_from.to(device).eval()
    with reproducible(train_threads(settings)):
        for _ in progress(range(epochs), description, total=epochs):
            for inputs, target in iterate(split, device):
                if not task.labelled and targets_from is not None:
                    with torch.no_grad():
                        target = batches.call(targets_from, inputs).detach()
                elif target is None and task.labelled:
                    raise ValueError(f"task {task.name} trains on targets, but a training batch has none")
                optimizer.zero_grad()
                loss(model, inputs, target).backward()
                if before_step is not None:
                    with torch.no_grad():  # the hooks change .grad and weights in place, outside autograd
                        before_step(model)
                optimizer.step()
                with torch.no_grad():
                    for weight, zero in zeros:
                        weight.masked_fill_(zero, 0)
                    if after_step is not None:
                        after_step(model)
    model.eval()


def test_split(data: Data, batch_size: int) -> Any:
    """The test split's batches, always in the same order."""
    return loader(data.test, batch_size)


@dataclass(frozen=True)
class Reference:
    """What the baseline left for one test batch: the task's reference, and which rows the batch held."""

    rows: int
    checksum: float  # the float64 sum of every input tensor of the batch
    value: Any


def _order(inputs: Any) -> tuple[int, float]:
    return batches.rows(inputs), sum(float(t.sum(dtype=torch.float64)) for t in batches._tensors(inputs))


@torch.inference_mode()
def _outputs(model: nn.Module, data: Data, device: str, batch_size: int) -> Iterator[tuple[Any, Any, tuple]]:
    model.eval()
    for inputs, target in iterate(test_split(data, batch_size), device):
        output = batches.call(model, inputs).float().cpu()
        yield output, None if target is None else target.cpu(), _order(inputs)


def outputs(model: nn.Module, data: Data, device: str = "cpu", batch_size: int = 512) -> Iterator[tuple[Any, Any]]:
    """``(output, target)`` of every test batch, on the CPU, outputs in float32."""
    for output, target, _ in _outputs(model, data, device, batch_size):
        yield output, target


def _scored(stream, references: list[Reference], task: Any) -> Iterator[Scored]:
    seen = 0
    for index, (output, target, (rows, checksum)) in enumerate(stream):
        seen = index + 1
        if not references and not task.labelled:
            raise ValueError(f"task {task.name} compares with the baseline's outputs, and none were recorded")
        reference = None
        if references:
            recorded = references[index] if index < len(references) else None
            if recorded is None or recorded.rows != rows or not math.isclose(recorded.checksum, checksum, rel_tol=1e-9):
                raise ValueError(
                    f"test batch {index} holds other rows than when the baseline was scored: every model is compared "
                    "with the baseline batch by batch, so the test split must come in the same order each time "
                    "(do not shuffle it; an IterableDataset must yield its rows in a fixed order)"
                )
            reference = recorded.value
        if task.labelled and target is None:
            raise ValueError(f"task {task.name} is scored against targets, but a test batch has none")
        yield Scored(output, target if task.labelled else reference, reference)
    if references and seen != len(references):
        raise ValueError(f"the test split yielded {seen} batches, {len(references)} when the baseline was scored")


def evaluate(
    model: nn.Module, data: Data, task: Any, references: list[Reference], device: str = "cpu", batch_size: int = 512
) -> dict[str, float]:
    """Every metric of ``task`` on the test split; ``references`` are the baseline's, per batch."""
    return task.evaluate(_scored(_outputs(model, data, device, batch_size), references, task))


def score_baseline(
    model: nn.Module, data: Data, task: Any, device: str = "cpu", batch_size: int = 512
) -> tuple[dict[str, float], list[Reference]]:
    """The baseline's metrics (its own reference: agreement 1, cosine 1) and its references, in one pass."""
    references: list[Reference] = []

    def stream() -> Iterator[Scored]:
        for output, target, (rows, checksum) in _outputs(model, data, device, batch_size):
            reference = task.reference(output)
            references.append(Reference(rows, checksum, reference))
            yield Scored(output, target if task.labelled else reference, reference)

    metrics = task.evaluate(stream())
    return metrics, references
