"""Tasks: what a model's outputs mean. The loss, the metrics, the primary metric and its direction, and how a
model's outputs compare to the uncompressed baseline's.

A task is an object with the attributes and methods of :class:`Task`. slimlab evaluates a model by streaming
the test split through it, batch by batch, and handing :meth:`Task.evaluate` one :class:`Scored` per batch:
the model's output, the batch's target and the *reference*, what :meth:`Task.reference` kept of the
baseline's output for the same batch. Nothing forces a split into memory: a task keeps what its metrics need
(a count, a running sum).

Built-in tasks (registered by this module through the ``register_tasks`` hook, like a plugin's):

- ``classification``: outputs are logits or log-probabilities ``[batch, classes, ...]``, targets class
  indices; loss cross-entropy; metrics ``accuracy`` (primary), ``top5_accuracy`` (more than 5 classes) and
  ``agreement`` (the fraction of predictions equal to the baseline's).
- ``regression``: one value per row; loss and primary metric ``mse`` (lower is better), also ``mae``.
- ``embedding``: no labels: every model's target is the baseline's output for the same input. Primary
  metric ``cosine_to_baseline`` (mean row-wise cosine), also ``cosine_to_baseline_min``,
  ``similarity_spearman`` (Spearman correlation of all pairwise cosine similarities among the test rows
  against the baseline's) and ``nn_agreement`` (rows whose nearest neighbour is the baseline's).
- ``language_modeling``: outputs are next-token logits ``[batch, length, vocabulary]``, targets the token ids
  (``labels``; -100 marks positions to ignore, e.g. padding); the loss is the next-token cross-entropy.
  Primary metric ``perplexity`` (lower is better), also ``next_token_accuracy`` and ``token_agreement``
  (the fraction of positions whose predicted next token is the baseline's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slimlab import hookimpl

if TYPE_CHECKING:
    import torch


@dataclass
class Scored:
    """One test batch as a task sees it: all on the CPU, outputs in float32."""

    output: torch.Tensor
    target: torch.Tensor | None  # unlabelled tasks: the baseline's output
    reference: Any  # what Task.reference kept of the baseline's output for this batch (None: nothing)


class Task:
    """The task contract, with defaults. Subclass it, or provide the same attributes and methods.

    ``labelled=False``: the data has no targets; every model's target is the baseline's output for the same
    inputs (computed by slimlab, for training and evaluation alike).
    """

    name: str = "task"
    primary_metric: str = "score"
    higher_is_better: bool = True
    labelled: bool = True

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch (a scalar with gradients)."""
        raise NotImplementedError

    def reference(self, output: torch.Tensor) -> Any:
        """What later evaluations compare with, kept from the baseline's output of one test batch.

        Keep it small (a task over a large test split keeps one per batch): the predicted class, not the
        logits. ``None`` keeps nothing. Unlabelled tasks must keep the output itself: it is the target.
        """
        return None

    def evaluate(self, batches: Iterable[Scored]) -> dict[str, float]:
        """Every metric over the test split; must include ``primary_metric``."""
        raise NotImplementedError

    def drop(self, baseline: float, compressed: float) -> float:
        """How much worse the compressed model is (positive = worse), whichever way the metric points."""
        return baseline - compressed if self.higher_is_better else compressed - baseline


class Classification(Task):
    name, primary_metric = "classification", "accuracy"

    def __init__(self, top_k: int = 5) -> None:
        self.top_k = top_k

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        # cross_entropy takes logits; on log-probabilities (LeNet's log_softmax) it equals nll_loss, because
        # log_softmax of log-probabilities is the identity.
        return F.cross_entropy(output, target)

    def reference(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=1)

    def evaluate(self, batches: Iterable[Scored]) -> dict[str, float]:
        total = correct = top = agree = compared = 0
        ranked = False
        for batch in batches:
            output, target = batch.output, batch.target
            if output.dim() < 2 or output.shape[1] < 2:
                raise ValueError(
                    f"classification needs outputs of [batch, classes >= 2, ...], got {tuple(output.shape)} "
                    "(a one-output binary model: return two logits, or use the regression task)"
                )
            if tuple(target.shape) != tuple(output.shape[:1]) + tuple(output.shape[2:]):
                raise ValueError(
                    f"classification targets of shape {tuple(target.shape)} do not fit outputs of shape "
                    f"{tuple(output.shape)}: give one class index per row (e.g. y.reshape(-1), not [batch, 1])"
                )
            counted = target != IGNORE  # like the loss, -100 marks a position that does not count
            predicted = output.argmax(dim=1)
            total += int(counted.sum())
            correct += int((predicted == target)[counted].sum())
            classes = output.shape[1]
            if classes > self.top_k and output.dim() == 2:
                ranked = True
                best = output.topk(self.top_k, dim=1).indices
                top += int((best == target.unsqueeze(1)).any(dim=1)[counted].sum())
            if batch.reference is not None:
                agree += int((predicted == batch.reference)[counted].sum())
                compared += int(counted.sum())
        if not total:
            raise ValueError("the test split is empty")
        metrics = {"accuracy": correct / total}
        if compared == total:  # every batch had the baseline's predictions to compare with
            metrics["agreement"] = agree / total
        if ranked:
            metrics[f"top{self.top_k}_accuracy"] = top / total
        return metrics


class Regression(Task):
    name, primary_metric, higher_is_better = "regression", "mse", False

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.mse_loss(output.reshape(target.shape), target.to(output.dtype))

    def evaluate(self, batches: Iterable[Scored]) -> dict[str, float]:
        count, squared, absolute = 0, 0.0, 0.0
        for batch in batches:
            error = batch.output.reshape(batch.target.shape).double() - batch.target.double()
            count += error.numel()
            squared += float(error.square().sum())
            absolute += float(error.abs().sum())
        if not count:
            raise ValueError("the test split is empty")
        return {"mse": squared / count, "mae": absolute / count}


def _cosines(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, in float64 so that identical embeddings score 1.0 (clamped to [-1, 1])."""
    import torch.nn.functional as F

    a = F.normalize(outputs.reshape(len(outputs), -1).double(), dim=1)
    b = F.normalize(targets.reshape(len(targets), -1).double(), dim=1)
    return (a * b).sum(dim=1).clamp(-1.0, 1.0)


def _similarities(embeddings: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    unit = F.normalize(embeddings.reshape(len(embeddings), -1).double(), dim=1)
    return unit @ unit.T


def embedding_fidelity(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """How faithfully ``outputs`` reproduce the baseline's embeddings ``targets`` beyond the mean cosine.

    ``cosine_to_baseline_min``: the worst row. ``similarity_spearman``: Spearman's rank correlation of the
    cosine similarities of every pair of rows, ``outputs`` against ``targets`` (does the model rank pairs
    alike?). ``nn_agreement``: the fraction of rows whose nearest other row is the same for both.
    """
    import torch
    from scipy.stats import spearmanr

    rows = len(outputs)
    if rows < 3:
        raise ValueError(f"embedding fidelity needs at least 3 test rows, got {rows}")
    ours, theirs = _similarities(outputs), _similarities(targets)
    pairs = torch.triu_indices(rows, rows, offset=1)
    rho = spearmanr(ours[pairs[0], pairs[1]].numpy(), theirs[pairs[0], pairs[1]].numpy()).statistic
    eye = torch.eye(rows, dtype=torch.bool)
    ours_nn = ours.masked_fill(eye, float("-inf")).argmax(dim=1)
    theirs_nn = theirs.masked_fill(eye, float("-inf")).argmax(dim=1)
    return {
        "cosine_to_baseline_min": _cosines(outputs, targets).min().item(),
        "similarity_spearman": float(rho),
        "nn_agreement": (ours_nn == theirs_nn).double().mean().item(),
    }


class Embedding(Task):
    """Fidelity to the baseline's embeddings. The pairwise metrics hold every test embedding in memory."""

    name, primary_metric, labelled = "embedding", "cosine_to_baseline", False

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.mse_loss(output.reshape(target.shape), target)  # for unit vectors, proportional to 1 - cosine

    def reference(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def evaluate(self, batches: Iterable[Scored]) -> dict[str, float]:
        import torch

        outputs, targets = [], []
        for batch in batches:
            outputs.append(batch.output.reshape(len(batch.output), -1))
            targets.append(batch.target.reshape(len(batch.target), -1))
        if not outputs:
            raise ValueError("the test split is empty")
        ours, theirs = torch.cat(outputs), torch.cat(targets)
        return {"cosine_to_baseline": _cosines(ours, theirs).mean().item(), **embedding_fidelity(ours, theirs)}


IGNORE = -100  # the label of a position that does not count (padding), as in Hugging Face and torch


class LanguageModeling(Task):
    """Next-token prediction: the output at position t predicts the token at t + 1."""

    name, primary_metric, higher_is_better = "language_modeling", "perplexity", False

    @staticmethod
    def _shifted(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return output[:, :-1].reshape(-1, output.shape[-1]), target[:, 1:].reshape(-1)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        logits, labels = self._shifted(output, target)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE)

    def reference(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, :-1].argmax(dim=-1)

    def evaluate(self, batches: Iterable[Scored]) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        tokens, nll, correct, agree, compared = 0, 0.0, 0, 0, 0
        for batch in batches:
            logits, labels = self._shifted(batch.output, batch.target)
            counted = labels != IGNORE
            tokens += int(counted.sum())
            nll += float(F.cross_entropy(logits.double(), labels, ignore_index=IGNORE, reduction="sum"))
            predicted = logits.argmax(dim=-1)
            correct += int((predicted == labels)[counted].sum())
            if batch.reference is not None:
                agree += int((predicted == batch.reference.reshape(-1))[counted].sum())
                compared += int(counted.sum())
        if not tokens:
            raise ValueError("the test split has no token to predict")
        mean_nll = nll / tokens
        metrics = {
            "perplexity": float(torch.tensor(mean_nll).exp()),
            "nll": mean_nll,
            "next_token_accuracy": correct / tokens,
        }
        if compared == tokens:  # every batch had the baseline's predictions to compare with
            metrics["token_agreement"] = agree / tokens
        return metrics


RegisterTask = Callable[[str, Callable[..., Any]], None]  # register(name, factory): factory() -> a task


@hookimpl
def register_tasks(register: RegisterTask) -> None:
    register("classification", Classification)
    register("regression", Regression)
    register("embedding", Embedding)
    register("language_modeling", LanguageModeling)


REQUIRED = ("name", "primary_metric", "higher_is_better", "labelled", "loss", "reference", "evaluate", "drop")


def check_task(task: Any) -> None:
    """Raise TypeError naming what a task object lacks."""
    missing = [attribute for attribute in REQUIRED if not hasattr(task, attribute)]
    if missing:
        raise TypeError(f"task {task!r} lacks {', '.join(missing)} (see slimlab.tasks.Task)")
