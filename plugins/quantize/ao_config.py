"""torchao configs from YAML: ``config: {_target_: torchao.quantization.<Config>, ...}`` built and described."""

from __future__ import annotations

import logging
from typing import Any


def _import_torchao():
    # torchao tries to load its CUDA kernels on import and logs each failure;
    # on a CPU-only machine that is noise, not a problem.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import torchao.quantization

    return torchao.quantization


def _types_in(hint: Any) -> list[Any]:
    """The classes a type hint admits (``Optional[torch.dtype]`` -> ``[torch.dtype, NoneType]``)."""
    import typing

    args = typing.get_args(hint)
    return [t for arg in args for t in _types_in(arg)] if args else [hint]


def _from_yaml(value: Any, hint: Any, key: str) -> Any:
    """A string where torchao wants a ``torch.dtype`` or an enum member: ``int4`` -> ``torch.int4``, ``symmetric`` ->
    ``MappingType.SYMMETRIC``, ``unpacked_to_int8`` -> ``IntxPackingFormat.UNPACKED_TO_INT8``."""
    import enum

    import torch

    if not isinstance(value, str):
        return value
    types = _types_in(hint)
    if torch.dtype in types:
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{key}={value!r} is not a torch dtype (e.g. int4, int8, bfloat16, float32)")
        return dtype
    for kind in types:
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            for member in kind:
                if value.upper() == member.name or value == member.value:
                    return member
            valid = ", ".join(member.name.lower() for member in kind)
            raise ValueError(f"{key}={value!r} is not a {kind.__name__}; valid: {valid}")
    return value


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _build(node: Any, key: str) -> Any:
    """Call every ``_target_`` in ``node``, innermost first, converting strings its arguments' type hints ask for."""
    import typing

    from hydra.utils import get_object

    if isinstance(node, list | tuple):
        return [_build(item, f"{key}[{i}]") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {name: _build(value, f"{key}.{name}") for name, value in node.items()}
    target = node["_target_"]
    try:
        factory = get_object(str(target))
    except Exception as error:  # Hydra's message names the module it could not import
        raise ValueError(f"{key}._target_={target!r} cannot be imported ({_first_line(error)})") from None
    if not callable(factory):
        raise ValueError(f"{key}._target_={target!r} is not a class or function")
    hints: dict[str, Any] = {}
    for annotated in (factory, getattr(factory, "__init__", None)) if isinstance(factory, type) else (factory,):
        try:  # a dataclass's fields, a class's __init__ or a function's parameters
            hints |= typing.get_type_hints(annotated)
        except Exception:  # unresolvable annotations: the arguments go as written
            pass
    arguments = {
        name: _from_yaml(_build(value, f"{key}.{name}"), hints.get(name), f"{key}.{name}")
        for name, value in node.items()
        if name != "_target_"
    }
    try:
        return factory(**arguments)
    except (TypeError, ValueError, AssertionError, AttributeError) as error:  # torchao validates with asserts
        raise ValueError(f"{key}: {target} refuses these arguments: {_first_line(error)}") from None


def build_ao_config(spec: Any) -> Any:
    """The torchao config a ``config:`` node describes; ValueError (one line, naming the key) if it cannot be one.

    ``spec`` is a mapping with ``_target_`` (Hydra's convention) whose arguments may nest more ``_target_`` nodes
    (``granularity: {_target_: torchao.quantization.PerGroup, group_size: 32}``); strings become torch dtypes or
    torchao enum members where the config's type hints ask for them (``weight_dtype: int4``, ``mapping_type:
    asymmetric``). ``FqnToConfig(fqn_to_config={name or "re:regex": config or null})`` quantizes per layer.
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ValueError(
            "config must be a torchao config node {_target_: torchao.quantization.<Config>, <argument>: ...}; "
            f"got {spec!r}"
        )
    _import_torchao()
    from torchao.core.config import AOBaseConfig

    recipe = _build(spec, "config")
    if not isinstance(recipe, AOBaseConfig):
        raise ValueError(f"config._target_={spec['_target_']!r} is not a torchao config (AOBaseConfig)")
    return recipe


def _ao_recipes(recipe: Any) -> list[Any]:
    """The configs that quantize something: ``recipe`` itself, or each layer's config of an FqnToConfig."""
    if type(recipe).__name__ == "FqnToConfig":
        return [config for config in recipe.fqn_to_config.values() if config is not None]
    return [recipe]


def describe_ao_config(recipe: Any) -> str:
    """``IntxWeightOnlyConfig,int4,g32``: the config's class, weight dtype and granularity, for run names."""
    parts = [type(recipe).__name__]
    dtype = getattr(recipe, "weight_dtype", None)
    if dtype is not None:
        parts.append(str(dtype).removeprefix("torch."))
    granularity = getattr(recipe, "granularity", None) or getattr(recipe, "weight_granularity", None)
    kind = type(granularity).__name__
    if kind == "PerGroup":
        parts.append(f"g{granularity.group_size}")
    elif kind in ("PerAxis", "PerRow"):
        parts.append("per-row")
    elif kind == "PerTensor":
        parts.append("per-tensor")
    return ",".join(parts)
