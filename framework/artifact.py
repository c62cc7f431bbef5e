"""The model artifact: a state dict whose zeros take bits, not bytes, loadable with ``weights_only=True``.

Each tensor is stored dense or as a packed bitmask of its non-zeros plus the
non-zero values, whichever is smaller, so pruning shows in the file size.
Quantized tensor subclasses (torchao) are stored through their
``__tensor_flatten__`` parts (int8 data, scales), each encoded the same way.
The file holds only tensors, numbers, strings, lists and dicts: nothing that
runs code on load. ``size_bytes`` is the size of this very file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "slimlab.state/1"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-len(flat)) % 8))
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS).ne(0)
    return bits.flatten()[:numel]


def encode_tensor(tensor: torch.Tensor) -> torch.Tensor | dict[str, Any]:
    """Dense, or ``{"mask", "values", "shape"}`` when that takes fewer bytes."""
    tensor = tensor.detach().cpu().contiguous()
    nonzero = tensor.ne(0)
    count = int(nonzero.sum())
    dense_bytes = tensor.numel() * tensor.element_size()
    sparse_bytes = (tensor.numel() + 7) // 8 + count * tensor.element_size()
    if tensor.numel() < 64 or sparse_bytes >= dense_bytes:
        return tensor
    return {"shape": list(tensor.shape), "mask": _pack(nonzero), "values": tensor[nonzero].clone()}


def decode_tensor(stored: torch.Tensor | dict[str, Any]) -> torch.Tensor:
    if isinstance(stored, torch.Tensor):
        return stored
    values = stored["values"]
    numel = 1
    for dim in stored["shape"]:
        numel *= dim
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[_unpack(stored["mask"], numel)] = values
    return dense.view(stored["shape"])


def _is_subclass(tensor: torch.Tensor) -> bool:
    return (
        type(tensor) is not torch.Tensor
        and not isinstance(tensor, nn.Parameter)
        and hasattr(tensor, "__tensor_flatten__")
    )


def _encode_entry(tensor: torch.Tensor) -> Any:
    if isinstance(tensor, nn.Parameter):
        tensor = tensor.data
    if not _is_subclass(tensor):
        return encode_tensor(tensor)
    names, context = tensor.__tensor_flatten__()
    cls = type(tensor)
    return {
        "subclass": f"{cls.__module__}:{cls.__qualname__}",
        "context": context,
        "inner": {name: encode_tensor(getattr(tensor, name)) for name in names},
        "size": list(tensor.shape),
        "stride": list(tensor.stride()),
    }


def _subclass(path: str) -> type:
    """Resolve a stored tensor-subclass name, accepting only torchao's tensor classes."""
    module_name, _, qualname = path.partition(":")
    if not module_name.startswith("torchao."):
        raise ValueError(f"refusing tensor subclass {path!r}: only torchao tensor classes are loaded")
    cls: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, torch.Tensor)):
        raise ValueError(f"refusing {path!r}: not a tensor class")
    return cls


def _decode_entry(stored: Any) -> torch.Tensor:
    if isinstance(stored, dict) and "subclass" in stored:
        inner = {name: decode_tensor(part) for name, part in stored["inner"].items()}
        cls = _subclass(stored["subclass"])
        return cls.__tensor_unflatten__(inner, stored["context"], torch.Size(stored["size"]), tuple(stored["stride"]))
    return decode_tensor(stored)


def save_model(model: nn.Module, path: Path, metadata: dict[str, Any] | None = None) -> int:
    """Write ``model``'s state to ``path`` in the compact format; return the file's size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: _encode_entry(t) for name, t in model.state_dict().items()}
    torch.save({"format": FORMAT, "metadata": metadata or {}, "state": state}, path)
    return path.stat().st_size


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict written by ``save_model``; never unpickles code (``weights_only=True``)."""
    payload = torch.load(Path(path), weights_only=True, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a slimlab model artifact ({FORMAT})")
    return {name: _decode_entry(stored) for name, stored in payload["state"].items()}


def load_model(model: nn.Module, path: Path) -> nn.Module:
    """Load an artifact into ``model`` (same architecture); quantized weights are assigned as stored."""
    model.load_state_dict(load_state(path), assign=True)
    return model
