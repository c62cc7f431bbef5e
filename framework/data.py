"""The data contract: what a data ``_target_`` returns, and how slimlab turns it into batches.

A data callable returns a :class:`Data`: a training and a test split, each a torch ``Dataset`` (map-style or
iterable) or anything re-iterable that yields batches (a ``DataLoader``), and the task they pose (a name
registered with the ``register_tasks`` hook, or a task object). slimlab batches a ``Dataset`` itself
(``train.batch_size`` rows, shuffled with the run's seed; ``measure.eval_batch_size`` for the test split,
in order); a ``DataLoader`` is used as it is. Batches follow :mod:`slimlab.batches`: ``(inputs, target)``,
a dict with ``labels``, or bare inputs. Nothing forces a split into memory; :meth:`Data.from_tensors` is the
short way for data that fits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from slimlab import batches


class TensorRows(Dataset):
    """Rows of in-memory tensors: inputs (a tensor, a tuple or a dict of tensors) and optional targets.

    Indexed with a list of rows it returns the whole batch at once (slimlab's loaders do that), so an
    in-memory split is batched by slicing, not row by row.
    """

    def __init__(self, inputs: batches.Inputs, targets: torch.Tensor | None = None) -> None:
        self.inputs, self.targets = inputs, targets
        self.length = batches.rows(inputs)
        if targets is not None and len(targets) != self.length:
            raise ValueError(f"{len(targets)} targets for {self.length} rows of inputs")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        inputs = batches._map(self.inputs, lambda t: t[index])
        if self.targets is None:
            return inputs
        if isinstance(inputs, Mapping):
            return {**inputs, batches.TARGET_KEY: self.targets[index]}
        return inputs, self.targets[index]


@dataclass
class Data:
    """A task's data: what a data ``_target_`` returns.

    ``train``/``test``: a torch ``Dataset`` (or a Hugging Face ``datasets.Dataset``) or a re-iterable of batches
    (a ``DataLoader``, a list). ``task``: the name
    of a registered task (``classification``, ``regression``, ``embedding``, ``language_modeling``, or a
    plugin's) or a task object. ``calibration``: batches for calibrating quantization observers (default: the
    training split, unshuffled). ``name``: a label for run names and params.
    """

    train: Any
    test: Any
    task: Any = "classification"
    name: str = "data"
    calibration: Any = None

    @classmethod
    def from_tensors(
        cls,
        train_inputs: batches.Inputs,
        train_targets: torch.Tensor | None,
        test_inputs: batches.Inputs,
        test_targets: torch.Tensor | None,
        task: Any = "classification",
        name: str = "data",
    ) -> Data:
        """Data held in memory: inputs as a tensor, a tuple or a dict of tensors, targets a tensor (or None)."""
        return cls(TensorRows(train_inputs, train_targets), TensorRows(test_inputs, test_targets), task, name)


def _is_hugging_face(split: Any) -> bool:
    """A Hugging Face ``datasets`` Dataset or IterableDataset (no torch Dataset subclass)."""
    return type(split).__module__.startswith("datasets.") and hasattr(split, "with_format")


def _is_dataset(split: Any) -> bool:
    """A map-style or iterable torch Dataset, a Hugging Face dataset, or anything indexable with a length that is
    not a list of batches."""
    if isinstance(split, DataLoader | list | tuple):
        return False
    if isinstance(split, Dataset) or _is_hugging_face(split):
        return True
    return hasattr(split, "__getitem__") and hasattr(split, "__len__")


def loader(split: Any, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterable[Any]:
    """Batches of one split: a Dataset batched here (shuffled with ``seed`` if asked), anything else as it is.

    Training (``shuffle``) leaves out a last batch of a single row, which batch normalisation cannot train on.
    """
    if not _is_dataset(split):
        if not isinstance(split, Iterable):
            raise TypeError(f"a data split must be a torch Dataset or an iterable of batches; got {type(split)}")
        return split
    if _is_hugging_face(split):  # rows of tensors, not of Python lists that collate per position
        split = split.with_format("torch")
    if isinstance(split, IterableDataset) or not hasattr(split, "__len__"):  # its own order: nothing to shuffle
        return DataLoader(split, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(split, generator=generator) if shuffle else SequentialSampler(split)
    drop_last = shuffle and len(split) % batch_size == 1 and len(split) > 1
    if isinstance(split, TensorRows):  # a whole batch per index list: slicing, not row-by-row collation
        return DataLoader(split, sampler=BatchSampler(sampler, batch_size, drop_last=drop_last), batch_size=None)
    return DataLoader(split, batch_size=batch_size, sampler=sampler, drop_last=drop_last)


def check_data(data: Any, target: str) -> Data:
    """``data`` if it is a :class:`Data` slimlab can iterate as often as it needs, in a fixed test order; a
    TypeError naming the callable and what is wrong otherwise."""
    if not isinstance(data, Data):
        raise TypeError(
            f"data._target_={target} returned {type(data).__name__}; a data callable must return "
            "slimlab.data.Data(train=..., test=..., task=...) (see docs/own-model.md)"
        )
    for split in ("train", "test"):
        value = getattr(data, split)
        if not (_is_dataset(value) or isinstance(value, Iterable)):
            raise TypeError(f"data._target_={target}: Data.{split} must be a torch Dataset or an iterable of batches")
        if not _is_dataset(value) and iter(value) is value:  # a generator: the first epoch would use it up
            raise TypeError(
                f"data._target_={target}: Data.{split} is a one-shot iterator ({type(value).__name__}); slimlab "
                "iterates a split once per epoch and per evaluation: give a Dataset, a DataLoader or a list"
            )
    if isinstance(data.test, DataLoader) and isinstance(data.test.sampler, RandomSampler):
        raise TypeError(
            f"data._target_={target}: the test DataLoader shuffles; every model is compared with the baseline "
            "batch by batch, so the test split must come in the same order each time (shuffle=False)"
        )
    return data


def iterate(split: Iterable[Any], device: str) -> Iterator[tuple[batches.Inputs, torch.Tensor | None]]:
    """``(inputs, target)`` of every batch, on ``device``."""
    for batch in split:
        inputs, target = batches.split(batch)
        yield batches.to_device(inputs, device), None if target is None else target.to(device)
