"""What a batch is, and how slimlab hands one to any model.

A data loader yields batches in one of three shapes (the conventions of torchvision and Hugging Face):

- ``(inputs, target)``: a tuple or list of two; ``inputs`` is one of the input forms below;
- a dict: keyword inputs, with the target under ``"labels"`` (what Hugging Face models take) or ``"label"``
  (the usual column of a Hugging Face dataset) if the batch has one;
- a tensor, or a tuple of one (``TensorDataset(x)``): inputs without a target.

Inputs are a tensor (``model(x)``), a tuple or list of tensors (``model(*x)``: several positional inputs,
e.g. ``forward(input_ids, attention_mask)``) or a dict of tensors (``model(**x)``). A model's output is a
tensor, or what Hugging Face models return: an object or dict with ``logits`` (a head) or
``last_hidden_state`` (a bare encoder), or a tuple whose first element is the output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

Inputs = Any  # torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | dict[str, torch.Tensor]
TARGET_KEY = "labels"  # the target's key in a dict batch (Hugging Face's convention)
TARGET_KEYS = (TARGET_KEY, "label")  # "label": the column name Hugging Face datasets use


def split(batch: Any) -> tuple[Inputs, torch.Tensor | None]:
    """``(inputs, target)`` of a batch; the target is None when the batch has none."""
    if isinstance(batch, Mapping):
        keys = [key for key in TARGET_KEYS if key in batch]
        if len(keys) > 1:
            raise TypeError(f"a dict batch has both {' and '.join(keys)}: which is the target?")
        inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        return inputs, batch[keys[0]] if keys else None
    if isinstance(batch, tuple | list):
        if len(batch) == 1:  # TensorDataset(x): inputs alone
            return batch[0], None
        if len(batch) != 2:
            raise TypeError(
                f"a batch given as a tuple or list must be (inputs, target); got {len(batch)} elements. "
                "Several positional inputs go in a tuple of their own: ((input_ids, attention_mask), target)"
            )
        return batch[0], batch[1]
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(f"a batch must be a tensor, an (inputs, target) pair or a dict; got {type(batch).__name__}")


def _map(inputs: Inputs, function) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return function(inputs)
    if isinstance(inputs, Mapping):
        return {key: _map(value, function) for key, value in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(_map(value, function) for value in inputs)
    return inputs  # a number or a string: passed as it is


def _tensors(inputs: Inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for value in inputs.values() for t in _tensors(value)]
    if isinstance(inputs, tuple | list):
        return [t for value in inputs for t in _tensors(value)]
    return []


def to_device(inputs: Inputs, device: str | torch.device) -> Inputs:
    """The inputs with every tensor on ``device``."""
    return _map(inputs, lambda t: t.to(device))


def clone(inputs: Inputs) -> Inputs:
    return _map(inputs, torch.clone)


def equal(a: Inputs, b: Inputs) -> bool:
    """Whether two inputs of the same structure hold the same values."""
    left, right = _tensors(a), _tensors(b)
    return len(left) == len(right) and all(torch.equal(x, y) for x, y in zip(left, right, strict=True))


def rows(inputs: Inputs) -> int:
    """The batch size: the first dimension of the first tensor."""
    tensors = _tensors(inputs)
    if not tensors:
        raise TypeError(f"inputs hold no tensor: {type(inputs).__name__}")
    return len(tensors[0])


def take(inputs: Inputs, count: int) -> Inputs:
    """The first ``count`` rows."""
    return _map(inputs, lambda t: t[:count])


def concat(parts: list[Inputs]) -> Inputs:
    """Batches of the same structure joined along the first dimension."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {key: concat([part[key] for part in parts]) for key in first}
    if isinstance(first, tuple | list):
        return type(first)(concat([part[i] for part in parts]) for i in range(len(first)))
    return first


def first_rows(batches: Iterable[Any], count: int) -> Inputs:
    """The inputs of the first ``count`` rows of a stream of batches (fewer if the stream is shorter)."""
    parts, have = [], 0
    for batch in batches:
        inputs = split(batch)[0]
        parts.append(inputs)
        have += rows(inputs)
        if have >= count:
            break
    if not parts:
        raise ValueError("the data yielded no batch")
    return take(concat(parts), count)


def as_args(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for calling a model (and for ``torch.export``)."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, its ``logits`` (Hugging Face), or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        found = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if isinstance(found, torch.Tensor):
            return found
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot read the model's output of type {type(output).__name__}: return a tensor, an object with "
        "`logits`, or a tuple whose first element is the output"
    )


def call(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """``model`` applied to ``inputs`` as its forward takes them; the output as one tensor."""
    args, kwargs = as_args(inputs)
    return output_tensor(model(*args, **kwargs))
