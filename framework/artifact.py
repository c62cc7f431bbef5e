"""The model artifact: a state dict whose zeros take bits, not bytes, loadable with ``weights_only=True``.

Each tensor is stored dense, as a packed bitmask of its non-zeros plus the
non-zero values, or, when it has at most 256 distinct values (weight sharing,
codebooks), as a palette of them plus a few-bit index per element (the
non-zeros alone too), whichever is smallest, so pruning and clustering show in
the file size with no flag.
Quantized tensors are stored as their integer values plus scales and zero
points: torchao's tensor subclasses through their ``__tensor_flatten__``
parts, ``torch.ao`` quantized tensors through ``int_repr()``; the integers are
encoded the same way, so pruned-then-quantized weights stay compact.
Sub-byte integers that torchao keeps one per int8 (an int4 weight's ``qdata``,
whose subclass declares ``target_dtype=torch.int4``) are bit-packed: int4 takes
half a byte, so the file shrinks as the weights did. A tensor whose elements
are all equal (the zero points of symmetric quantization) is stored as one value.
The file holds only tensors, numbers, dtypes, strings, lists and dicts:
nothing that runs code on load. ``size_bytes`` is the size of this very file.

The architecture is data too: every tensor keeps its shape, so a layer that
structured pruning narrowed is rebuilt at its new width on load.

``codec="lzma"`` entropy-codes the whole file (stdlib ``lzma``, the last stage
of Deep Compression's pipeline, where the paper uses Huffman coding): the
1-bit masks of a sparse model and the skewed int8 values shrink far below
their raw width. ``load_state`` recognises such a file by its magic bytes.
"""

from __future__ import annotations

import importlib
import io
import lzma
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "slimlab.state/1"
CODECS = ("none", "lzma")  # how the file's bytes are coded on disk
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-len(flat)) % 8))
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS).ne(0)
    return bits.flatten()[:numel]


def _pack_bits(values: torch.Tensor, bits: int, low: int) -> dict[str, Any]:
    """Integers in ``[low, low + 2**bits)`` as ``bits`` bit planes, 8 values a byte each: ``bits`` bits a value."""
    unsigned = (values.flatten().to(torch.int16) - low).to(torch.uint8)
    planes = torch.stack([_pack(unsigned.bitwise_right_shift(bit).bitwise_and(1)) for bit in range(bits)])
    return {"bits": bits, "low": low, "dtype": values.dtype, "shape": list(values.shape), "planes": planes}


def _unpack_bits(stored: dict[str, Any]) -> torch.Tensor:
    numel = 1
    for dim in stored["shape"]:
        numel *= dim
    unsigned = torch.zeros(numel, dtype=torch.int16)
    for bit, plane in enumerate(stored["planes"]):
        unsigned |= _unpack(plane, numel).to(torch.int16) << bit
    return (unsigned + stored["low"]).to(stored["dtype"]).view(stored["shape"])


def narrow_range(dtype: Any) -> tuple[int, int] | None:
    """``(bits, lowest value)`` of a sub-byte integer dtype (``torch.int1``..``uint7``), else None."""
    name = str(dtype).removeprefix("torch.")
    for prefix, signed in (("uint", False), ("int", True)):
        digits = name.removeprefix(prefix)
        if name.startswith(prefix) and digits.isdigit() and 1 <= int(digits) <= 7:
            bits = int(digits)
            return bits, -(2 ** (bits - 1)) if signed else 0
    return None


def _constant(tensor: torch.Tensor) -> bool:
    """Every element has the same bytes (bitwise: -0.0 is not 0.0)."""
    raw = tensor.flatten().view(torch.uint8).view(tensor.numel(), -1)
    return bool((raw == raw[0]).all())


def encode_tensor(
    tensor: torch.Tensor, compact: bool = True, narrow: tuple[int, int] | None = None
) -> torch.Tensor | dict[str, Any]:
    """Dense, ``{"mask", "values", "shape"}`` or ``{"fill", "shape"}``, whichever takes fewer bytes.

    ``narrow=(bits, low)``: the integers are known to be ``bits`` wide (torchao keeps int4 in int8); if every value
    lies in ``[low, low + 2**bits)`` they are bit-packed (dense or as the non-zero values). Exact either way.
    """
    tensor = tensor.detach().cpu().contiguous()
    if narrow is not None:
        bits, low = narrow
        if (
            tensor.is_floating_point()
            or tensor.numel() == 0
            or not (low <= int(tensor.min()) and int(tensor.max()) < low + 2**bits)
        ):
            narrow = None  # not what the attributes promised: stored as it is, never clipped
    if not compact:
        return _pack_bits(tensor, *narrow) if narrow else tensor
    if tensor.numel() >= 64 and _constant(tensor):
        return {"shape": list(tensor.shape), "fill": tensor.flatten()[:1].clone()}  # e.g. symmetric zero points
    nonzero = tensor.ne(0)
    count = int(nonzero.sum())
    bits = narrow[0] if narrow else tensor.element_size() * 8
    dense_bytes = (tensor.numel() * bits + 7) // 8
    if tensor.numel() < 64:
        return _pack_bits(tensor, *narrow) if narrow else tensor
    # Weight sharing (k-means, codebooks) leaves few distinct values: a palette and an index of a few bits each,
    # for the whole tensor or for its non-zeros, whichever of the forms takes the fewest bytes.
    palette = None if narrow else _palette(tensor)
    sparse_bytes = (tensor.numel() + 7) // 8 + (count * bits + 7) // 8
    value_palette = None
    if palette and 0 < count < tensor.numel():  # the non-zeros have no more distinct values than the whole
        value_palette = _palette(tensor[nonzero])
        if value_palette:
            sparse_bytes = min(sparse_bytes, (tensor.numel() + 7) // 8 + _palette_bytes(value_palette))
    palette_bytes = _palette_bytes(palette) if palette else dense_bytes
    best = min(dense_bytes, sparse_bytes, palette_bytes)
    if best == dense_bytes:
        return _pack_bits(tensor, *narrow) if narrow else tensor
    if palette and best == palette_bytes:
        return palette
    if value_palette and best < (tensor.numel() + 7) // 8 + (count * bits + 7) // 8:
        stored_values = value_palette
    else:
        values = tensor[nonzero].clone()
        stored_values = _pack_bits(values, *narrow) if narrow else values
    return {"shape": list(tensor.shape), "mask": _pack(nonzero), "values": stored_values}


PALETTE_MAX = 256  # distinct values a palette holds: indices of at most 8 bits


def _palette(tensor: torch.Tensor) -> dict[str, Any] | None:
    """``{"palette", "indices", "shape"}``: the distinct values and, per element, its index in ``bits`` bits; None
    when the tensor has more than ``PALETTE_MAX`` distinct values or the indices would be no narrower than the
    elements. Exact (``torch.unique`` sees -0.0 as 0.0, as the sparse form does)."""
    if tensor.numel() < 64 or tensor.dtype == torch.bool or tensor.is_complex():
        return None
    flat = tensor.flatten()
    # at most this many values give indices narrower than the elements (int8: 128, 7 bits)
    most = min(PALETTE_MAX, 2 ** (tensor.element_size() * 8 - 1))
    if torch.unique(flat[:4096]).numel() > most:  # most weights: rejected on a sample, not a full sort
        return None
    distinct, indices = torch.unique(flat, sorted=True, return_inverse=True)
    bits = max(1, (distinct.numel() - 1).bit_length())
    if distinct.numel() > most:
        return None
    return {"shape": list(tensor.shape), "palette": distinct, "indices": _pack_bits(indices, bits, 0)}


def _palette_bytes(coded: dict[str, Any]) -> int:
    planes = coded["indices"]["planes"]
    return coded["palette"].numel() * coded["palette"].element_size() + planes.numel()


def decode_tensor(stored: torch.Tensor | dict[str, Any]) -> torch.Tensor:
    if isinstance(stored, torch.Tensor):
        return stored
    if "planes" in stored:
        return _unpack_bits(stored)
    if "palette" in stored:
        return stored["palette"][_unpack_bits(stored["indices"]).long()].view(stored["shape"])
    if "fill" in stored:
        return stored["fill"].expand(stored["shape"]).clone()
    values = decode_tensor(stored["values"])
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


def _encode_entry(tensor: Any, compact: bool = True) -> Any:
    if isinstance(tensor, tuple | list):  # torch.ao packed params: (weight, bias)
        return {"sequence": [_encode_entry(item, compact) for item in tensor]}
    if not isinstance(tensor, torch.Tensor):  # e.g. the dtype torch.ao keeps in its state dict
        return {"value": tensor}
    if isinstance(tensor, nn.Parameter):
        tensor = tensor.data
    if tensor.is_quantized:
        return _encode_quantized(tensor, compact)
    if not _is_subclass(tensor):
        return encode_tensor(tensor, compact)
    names, context = tensor.__tensor_flatten__()
    cls = type(tensor)
    # torchao keeps sub-byte integers one per int8 and says so in target_dtype (IntxUnpackedToInt8Tensor:
    # qdata, and the zero points of asymmetric mappings): encode_tensor packs the int8 parts that fit.
    narrow = narrow_range(getattr(tensor, "target_dtype", None))
    return {
        "subclass": f"{cls.__module__}:{cls.__qualname__}",
        "context": context,
        "inner": {
            name: encode_tensor(part, compact, narrow if part.dtype == torch.int8 else None)
            for name in names
            for part in [getattr(tensor, name)]
        },
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


def _encode_quantized(tensor: torch.Tensor, compact: bool) -> dict[str, Any]:
    encoded: dict[str, Any] = {"quantized": tensor.dtype, "int_repr": encode_tensor(tensor.int_repr(), compact)}
    # per_channel_affine_float_qparams: torch.ao's int8 embeddings (a float scale and zero point per row)
    per_channel = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)
    if tensor.qscheme() in per_channel:
        encoded |= {
            "scales": tensor.q_per_channel_scales(),
            "zero_points": tensor.q_per_channel_zero_points(),
            "axis": tensor.q_per_channel_axis(),
        }
    else:
        encoded |= {"scale": tensor.q_scale(), "zero_point": tensor.q_zero_point()}
    return encoded


def _decode_quantized(stored: dict[str, Any]) -> torch.Tensor:
    values = decode_tensor(stored["int_repr"])
    if "axis" in stored:
        return torch._make_per_channel_quantized_tensor(values, stored["scales"], stored["zero_points"], stored["axis"])
    return torch._make_per_tensor_quantized_tensor(values, stored["scale"], stored["zero_point"])


def _decode_entry(stored: Any) -> Any:
    if isinstance(stored, dict) and "sequence" in stored:
        return tuple(_decode_entry(item) for item in stored["sequence"])
    if isinstance(stored, dict) and "value" in stored:
        return stored["value"]
    if isinstance(stored, dict) and "quantized" in stored:
        return _decode_quantized(stored)
    if isinstance(stored, dict) and "subclass" in stored:
        inner = {name: decode_tensor(part) for name, part in stored["inner"].items()}
        cls = _subclass(stored["subclass"])
        return cls.__tensor_unflatten__(inner, stored["context"], torch.Size(stored["size"]), tuple(stored["stride"]))
    return decode_tensor(stored)


def deployable(model: nn.Module) -> nn.Module:
    """The module whose weights are the artifact: wrappers (e.g. placement) expose it as ``slimlab_inner``."""
    while hasattr(model, "slimlab_inner"):
        model = model.slimlab_inner
    return model


def artifact_name(model: nn.Module) -> str:
    """The model file's name: ``model.pt``, or ``model`` + the deployable's ``slimlab_artifact_suffix`` (``.onnx``)."""
    return "model" + getattr(deployable(model), "slimlab_artifact_suffix", ".pt")


def save_model(
    model: nn.Module,
    path: Path,
    metadata: dict[str, Any] | None = None,
    compact: bool = True,
    codec: str = "none",
) -> int:
    """Write ``model``'s state to ``path``; return the file's size in bytes.

    ``compact=False`` stores every tensor dense: the size the model would
    take without sparse storage (logged as ``dense_size_bytes``).
    ``codec="lzma"`` entropy-codes the file (see the module docstring).
    A deployable module with a ``slimlab_artifact_bytes()`` method (a model in another runtime's format, e.g. an
    ONNX Runtime session) is saved as the bytes it returns.
    """
    if codec not in CODECS:
        raise ValueError(f"artifact codec must be one of {', '.join(CODECS)}; got {codec!r}")
    model = deployable(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    own_format = getattr(model, "slimlab_artifact_bytes", None)
    if callable(own_format):  # a model that is not a state dict (an ONNX Runtime session): its own file's bytes
        encoded = own_format()
    else:
        state_dict = model.state_dict()
        state = {name: _encode_entry(t, compact) for name, t in state_dict.items()}
        # Module versions tell torch.ao's loaders which layout the state is in.
        versions = {prefix: dict(info) for prefix, info in getattr(state_dict, "_metadata", {}).items()}
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "metadata": metadata or {}, "versions": versions, "state": state}, buffer)
        encoded = buffer.getvalue()
    if codec == "lzma":
        encoded = lzma.compress(encoded, preset=9 | lzma.PRESET_EXTREME)
    path.write_bytes(encoded)
    return path.stat().st_size


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict written by ``save_model``; never unpickles code (``weights_only=True``)."""
    raw = Path(path).read_bytes()
    if raw.startswith(_XZ_MAGIC):
        raw = lzma.decompress(raw)
    payload = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a slimlab model artifact ({FORMAT})")
    state = OrderedDict((name, _decode_entry(stored)) for name, stored in payload["state"].items())
    state._metadata = OrderedDict(payload.get("versions", {}))  # type: ignore[attr-defined]
    return state


def load_model(model: nn.Module, path: Path) -> nn.Module:
    """Load an artifact into ``model``, a fresh instance of the same class.

    Quantized weights are assigned as stored. Layers whose stored shapes
    differ (structured pruning) are resized first. For ``torch.ao`` quantized
    modules, pass a model converted by the same recipe (the module types must
    match; their weights and scales come from the file).
    """
    state = load_state(path)
    _resize_to(model, state)
    model.load_state_dict(state, assign=True)
    return model


# Attributes that record a layer's width, rebuilt from its stored weight shape: (dim of weight, attribute)
_WIDTH_ATTRIBUTES = {
    nn.Linear: ((0, "out_features"), (1, "in_features")),
    nn.Conv1d: ((0, "out_channels"), (1, "in_channels")),
    nn.Conv2d: ((0, "out_channels"), (1, "in_channels")),
    nn.Conv3d: ((0, "out_channels"), (1, "in_channels")),
}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)


def _resize_to(model: nn.Module, state: dict[str, Any]) -> None:
    """Give every parameter and buffer the shape stored for it, fixing the layer's width attributes."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        resized = False
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            stored = state.get(prefix + name)
            if isinstance(stored, torch.Tensor) and stored.shape != tensor.shape and not stored.is_quantized:
                empty = torch.empty(stored.shape, dtype=tensor.dtype)
                setattr(module, name, nn.Parameter(empty) if isinstance(tensor, nn.Parameter) else empty)
                resized = True
        if not resized:
            continue
        for dim, attribute in _WIDTH_ATTRIBUTES.get(type(module), ()):
            setattr(
                module,
                attribute,
                module.weight.shape[dim] * (module.groups if dim == 1 and hasattr(module, "groups") else 1),
            )
        if isinstance(module, _NORMS) and isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = module.weight.shape[0]
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(module.weight.shape)
