"""Heterogeneous placement: run each piece of work on the processor that suits it.

The whole model goes to one device (``cuda``, ``mps``, ``cpu``) in one dtype,
optionally with its own intra-op threads and ``torch.compile``; or accelerate
splits it across devices by module (``device_map``) or by memory budget
(``max_memory``), offloading to CPU memory or to disk what does not fit, so a
model larger than its budget still runs.

The placed model is wrapped so that the runner can keep handing it CPU float32
inputs: the wrapper moves and casts inputs to the model's device and dtype and
returns float32 CPU outputs (which also waits for CUDA, so latency is measured
end to end). Its ``slimlab_inner`` is the module whose weights are the
artifact; weights that accelerate offloaded (the module holds them on the
``meta`` device) are read back from its offload store when the model is saved
or its parameters are counted.

Placement is the deployment step: nothing may follow it.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimlab import hookimpl
from slimlab.config import Choice

if TYPE_CHECKING:
    from torch import nn

    from slimlab.context import RunContext

DEVICES = "auto, cpu, cuda, cuda:N, mps"
MAP_DEVICES = "cpu, disk, cuda, cuda:N, mps"
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
Dtype = Choice("Dtype", [(name, name) for name in DTYPES], module=__name__)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_MAP_DEVICE = re.compile(r"cpu|disk|mps|cuda(:\d+)?|\d+")  # a bare number is a CUDA index, as in accelerate
_BUDGET_KEY = re.compile(r"cpu|mps|cuda(:\d+)?|\d+")
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([KMG]i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
TAG_LIMIT = 5000  # longer device maps are summarised in the tag and kept whole in the device_map artifact


def parse_size(size: str | int) -> int:
    """Bytes from ``1000000``, ``"1MB"``, ``"1.5GiB"`` (units are bytes whatever their case)."""
    match = _SIZE.fullmatch(str(size).strip())
    if not match:
        raise ValueError(f"a size is a number of bytes or a number with KB, MB, GB, KiB, MiB or GiB; got {size!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


@dataclass
class PlaceConfig:
    """Where and how the compressed model runs.

    ``device`` is where inputs enter and where every module goes that
    ``device_map`` does not name (``auto``: CUDA when present, else the CPU).
    ``device_map`` pins modules by name to ``cpu``, ``disk``, ``cuda[:N]`` or
    ``mps``. On a CPU ``device`` a module pinned to a GPU computes there and
    the rest computes on the CPU; on a GPU ``device`` a module pinned to
    ``cpu`` keeps its weights in CPU memory and computes on the GPU
    (accelerate's CPU offload). ``disk`` always offloads: the weights are
    read from files under the run's output directory at each call.
    ``max_memory`` budgets devices (``{"cpu": "1MB"}``); accelerate fills the
    GPU, then the CPU, then the disk with the modules ``device_map`` leaves
    free. Unbudgeted devices get their real free memory.
    """

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Dtype = Dtype.float32  # of weights and activations
    threads: int | None = None  # intra-op CPU threads while the placed model runs; None leaves them as they are
    compile: bool = False  # torch.compile; the first (compiling) call is timed as compile_time_s
    device_map: dict[str, str] = field(default_factory=dict)  # module name -> cpu | disk | cuda[:N] | mps
    max_memory: dict[str, str] = field(default_factory=dict)  # cpu | cuda[:N] | mps -> size, e.g. 1MB, 2GiB

    def __post_init__(self) -> None:
        if not _DEVICE.fullmatch(str(self.device)):
            raise ValueError(f"device must be one of {DEVICES}; got {self.device!r}")
        self.dtype = Dtype.parse(self.dtype, "dtype")  # a plain str when built from a dict
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null (leave as is); got {self.threads}")
        bad = {name: device for name, device in self.device_map.items() if not _MAP_DEVICE.fullmatch(str(device))}
        if bad:
            raise ValueError(f"device_map values must be one of {MAP_DEVICES}; got {bad}")
        bad_keys = [key for key in self.max_memory if not _BUDGET_KEY.fullmatch(str(key))]
        if bad_keys:
            raise ValueError(
                f"max_memory keys must be cpu, cuda, cuda:N or mps (disk takes what does not fit); got {bad_keys}"
            )
        for key, size in self.max_memory.items():
            try:
                if parse_size(size) <= 0:
                    raise ValueError(f"a budget must be more than 0 bytes; got {size!r}")
            except ValueError as error:
                raise ValueError(f"max_memory.{key}: {error}") from None

    @property
    def splits(self) -> bool:
        return bool(self.device_map or self.max_memory)


# --- devices -------------------------------------------------------------------------------------------------------


def _unavailable(device: str) -> str | None:
    """Why this machine cannot run on ``device``, or None when it can."""
    import torch

    if device in ("auto", "cpu", "disk"):
        return None
    if device == "mps":
        return None if torch.backends.mps.is_available() else "this machine has no MPS (Apple GPU) device"
    index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else int(device)
    if not torch.cuda.is_available():
        return "torch sees no CUDA device on this machine"
    count = torch.cuda.device_count()
    if index >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def _valid_here(first: tuple[str, ...]) -> str:
    """``first`` and the accelerators this machine has."""
    import torch

    valid = list(first)
    if torch.cuda.is_available():
        valid += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        valid.append("mps")
    return ", ".join(valid)


def _normal(device: str | int) -> str:
    """A torch device string: ``cuda`` gets its index, a bare number is a CUDA index."""
    import torch

    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    if device.isdigit():
        return f"cuda:{device}"
    return device


def _budget_key(device: str) -> str | int:
    """accelerate's name for a device in ``max_memory``: GPUs are numbers."""
    return int(device.partition(":")[2]) if device.startswith("cuda:") else device


def probe(config: PlaceConfig) -> None:
    """Refuse, before any work, a placement this machine cannot run (raises ValueError with the reason)."""
    import os
    import shutil

    named = [(f"device={config.device}", config.device, ("auto", "cpu"))]
    named += [(f"device_map.{k}={v}", v, ("cpu", "disk")) for k, v in config.device_map.items()]
    named += [(f"max_memory budgets {key}", key, ("cpu",)) for key in config.max_memory]
    for what, device, always in named:
        reason = _unavailable(str(device))
        if reason:
            raise ValueError(f"{what} but {reason}; valid here: {_valid_here(always)}")
    main = _normal(config.device)
    if config.dtype == "bfloat16" and main.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"dtype=bfloat16 but {main} does not support bfloat16; use float16 or float32")
    runs_on_cpu = main == "cpu" or "cpu" in config.device_map.values() or "disk" in config.device_map.values()
    if config.compile and runs_on_cpu:
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise ValueError(f"compile=true on the CPU needs a C++ compiler for TorchInductor; {compiler!r} not found")


# --- the placed model ----------------------------------------------------------------------------------------------


def _move(value: Any, device: Any, dtype: Any) -> Any:
    """Tensors in ``value`` (nested in tuples, lists, dicts) on ``device``; floating ones also cast to ``dtype``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_move(item, device, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _move(item, device, dtype) for key, item in value.items()}
    return value


def _offloaded(module: nn.Module) -> bool:
    """Does accelerate hold some of ``module``'s own tensors in its offload store (CPU memory or disk)?"""
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def _onloaded(module: nn.Module, names: list[str]) -> dict[str, Any]:
    """The values of ``module``'s own tensors ``names``, read back on the CPU from accelerate's offload store.

    accelerate's public ``align_module_device`` loads them for the duration of the block, as a forward pass
    would; the values read inside it stay valid after the module goes back to ``meta``. (Its
    ``get_state_dict_offloaded_model`` does this for a whole model but leaves out the root module's own tensors,
    and is not exported from ``accelerate.utils``.)
    """
    from accelerate.utils import align_module_device

    with align_module_device(module, "cpu"):
        return {name: getattr(module, name).detach() for name in names}


def _real(root: nn.Module, name: str, tensor: Any) -> Any:
    """``tensor`` (``root``'s parameter or buffer ``name``) with its data: read back if accelerate offloaded it."""
    if not getattr(tensor, "is_meta", False):
        return tensor
    owner, _, local = name.rpartition(".")
    module = root.get_submodule(owner)
    if not _offloaded(module):
        raise RuntimeError(f"{name} is on the meta device and no offloaded copy of it was found")
    return _onloaded(module, [local])[local]


def _restore_offloaded(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: offloaded tensors are in the state as their values, not as meta placeholders."""
    own = {
        key[len(prefix) :]: key
        for key, value in state_dict.items()
        if key.startswith(prefix) and "." not in key[len(prefix) :] and getattr(value, "is_meta", False)
    }  # the module's own tensors: an offloaded child has a hook of its own
    if own:
        for local, value in _onloaded(module, list(own)).items():
            state_dict[own[local]] = value


@functools.cache
def placed_class() -> type:
    """The wrapper module class (built on first use, so that importing this plugin does not import torch)."""
    import torch
    from torch import nn

    class Placed(nn.Module):
        """Runs ``slimlab_inner`` where it was placed, taking and returning CPU float32 tensors."""

        def __init__(self, inner: nn.Module, device: str, dtype: torch.dtype, threads: int | None) -> None:
            super().__init__()
            self.slimlab_inner = inner  # the artifact: slimlab.artifact.deployable() saves this module
            self.device = torch.device(device)
            self.dtype = dtype
            self.threads = threads

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            args, kwargs = _move((args, kwargs), self.device, self.dtype)
            if self.threads is None:
                output = self.slimlab_inner(*args, **kwargs)
            else:
                previous = torch.get_num_threads()
                torch.set_num_threads(self.threads)
                try:
                    output = self.slimlab_inner(*args, **kwargs)
                finally:
                    torch.set_num_threads(previous)
            return _move(output, torch.device("cpu"), torch.float32)  # .cpu() waits for the device to finish

        def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
            """The inner module's parameters under their own names, offloaded ones read back from their store.

            Read-back values are copies: for counting and inspecting, not training (nothing follows placement).
            """
            if not recurse:
                return
            inner = self.slimlab_inner
            for name, parameter in inner.named_parameters(recurse=True, remove_duplicate=remove_duplicate):
                value = _real(inner, name, parameter)
                if value is not parameter:
                    value = nn.Parameter(value, requires_grad=False)
                yield (f"{prefix}.{name}" if prefix else name), value

        def extra_repr(self) -> str:
            return f"device={self.device}, dtype={self.dtype}, threads={self.threads}"

    Placed.__module__, Placed.__qualname__ = __name__, "Placed"  # pickles as slimlab.plugins.place.Placed
    return Placed


def __getattr__(name: str) -> Any:
    if name == "Placed":
        return placed_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- splitting with accelerate -------------------------------------------------------------------------------------


def _lookup(key: str, device_map: dict[str, str]) -> str | None:
    """The device of the longest module name in ``device_map`` that contains ``key``."""
    best = None
    for name, device in device_map.items():
        if (name == "" or key == name or key.startswith(name + ".")) and (best is None or len(name) > len(best[0])):
            best = (name, device)
    return best[1] if best else None


def _owner_map(model: nn.Module, pinned: dict[str, str], inferred: dict[str, str], default: str) -> dict[str, str]:
    """One device for every module that holds tensors: pinned first, then inferred, then ``default``."""
    owners: dict[str, str] = {}
    for key in [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]:
        owner = key.rpartition(".")[0]
        device = _lookup(key, pinned) or _lookup(key, inferred) or default
        if owners.setdefault(owner, device) != device:
            raise ValueError(f"module {owner!r} would be split across {owners[owner]} and {device}; map it whole")
    for owner in sorted(owners, key=len):  # a module with weights of its own takes its submodules along
        for other in [o for o in owners if o != owner and (owner == "" or o.startswith(owner + "."))]:
            if owners[other] != owners[owner]:
                raise ValueError(
                    f"module {owner or '(root)'!r} holds weights of its own, so its submodule {other!r} goes "
                    f"where it goes ({owners[owner]}), not to {owners[other]}; map {owner or '(root)'!r} as a whole"
                )
            del owners[other]
    return owners


def _budgets(config: PlaceConfig, main: str) -> dict[str | int, int]:
    """``max_memory`` for accelerate: the user's budgets, and the real free memory of the main device and the CPU."""
    from accelerate.utils import get_max_memory

    available = get_max_memory()  # every GPU's free memory and the free RAM (none for the CPU beside MPS)
    budgets = {key: available[key] for key in (_budget_key(main), "cpu") if key in available}
    budgets.update({_budget_key(_normal(key)): parse_size(size) for key, size in config.max_memory.items()})
    return budgets


def split(model: nn.Module, config: PlaceConfig, main: str, ctx: RunContext) -> dict[str, str]:
    """Dispatch ``model`` over devices with accelerate; return the device map (grouped by module)."""
    import shutil
    import tempfile
    import weakref
    from pathlib import Path

    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import offload_state_dict
    from accelerate.utils.modeling import clean_device_map

    modules = dict(model.named_modules())
    unknown = sorted(name for name in config.device_map if name not in modules)
    if unknown:
        names = ", ".join(repr(name) for name in list(modules)[1:21]) + (", ..." if len(modules) > 21 else "")
        raise ValueError(f"device_map names no module {', '.join(map(repr, unknown))} of this model; modules: {names}")
    pinned = {name: _normal(device) for name, device in config.device_map.items()}
    inferred: dict[str, str] = {}
    if config.max_memory:
        found = infer_auto_device_map(model, max_memory=_budgets(config, main), clean_result=False)
        inferred = {name: _normal(device) for name, device in found.items()}
    owners = _owner_map(model, pinned, inferred, main)
    grouped = clean_device_map(dict(owners))
    if set(grouped.values()) == {main}:  # everything fits on the main device: no hooks needed
        model.to(main)
        return grouped
    offload_dir = None
    if "disk" in grouped.values():
        if ctx.keeps_output:  # a Hydra job's directory: the weights stay beside the run's other files
            offload_dir = ctx.output_dir / "offload"
            shutil.rmtree(offload_dir, ignore_errors=True)  # never reuse stale weights (accelerate would)
        else:  # the run's directory goes when it ends, the model (a notebook's) lives on: so do its weights
            offload_dir = Path(tempfile.mkdtemp(prefix="slimlab-offload-"))
            weakref.finalize(model, shutil.rmtree, offload_dir, True)
        # Written here, not by dispatch_model, which writes nothing for a whole-model {"": "disk"} entry.
        on_disk = {key: value for key, value in model.state_dict().items() if _lookup(key, grouped) == "disk"}
        offload_state_dict(offload_dir, on_disk)
    dispatch_model(model, grouped, main_device=main, offload_dir=offload_dir, force_hooks=True)
    for module in model.modules():
        if _offloaded(module):
            module.register_state_dict_post_hook(_restore_offloaded)
    if offload_dir is not None:
        ctx.tags["slimlab.place.offload_dir"] = str(offload_dir)
    return grouped


# --- the technique -------------------------------------------------------------------------------------------------


def apply(model: nn.Module, config: PlaceConfig, ctx: RunContext) -> nn.Module:
    import time

    import torch

    main = _normal(config.device)
    dtype = getattr(torch, config.dtype)
    model = model.eval().to(dtype=dtype)  # cast where the weights are, before they move
    ctx.tags["slimlab.place.device"] = main
    ctx.tags["slimlab.place.dtype"] = str(config.dtype)
    if config.threads is not None:
        ctx.tags["slimlab.place.threads"] = str(config.threads)
    if config.splits:
        device_map = split(model, config, main, ctx)
        text = json.dumps(device_map)
        path = ctx.output_dir / "device_map.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(device_map, indent=2) + "\n")
        ctx.artifacts["device_map"] = path
        if len(text) > TAG_LIMIT:
            counts: dict[str, int] = {}
            for device in device_map.values():
                counts[device] = counts.get(device, 0) + 1
            text = json.dumps({device: f"{count} modules" for device, count in counts.items()})
        ctx.tags["slimlab.place.device_map"] = text
    else:
        model.to(main)
    placed = placed_class()(model, main, dtype, config.threads).eval()
    if config.compile:
        model.compile()  # in place: the state dict keeps its names
        from slimlab.batches import call

        inputs = ctx.example_inputs()
        with torch.inference_mode():
            start = time.perf_counter()
            call(placed, inputs)
            ctx.metrics["compile_time_s"] = time.perf_counter() - start
        ctx.tags["slimlab.place.compile"] = "true"
    return placed


def label(config: PlaceConfig) -> str:
    device = config.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = [device, DTYPES[config.dtype]]
    if config.splits:
        parts.append("split")
    if config.compile:
        parts.append("compiled")
    if config.threads is not None:
        parts.append(f"threads={config.threads}")
    return f"place({','.join(parts)})"


@hookimpl
def register_techniques(register) -> None:
    # Placement is the deployment step: whatever compresses the model comes before it.
    register(
        "place", PlaceConfig, apply, label=label, followed_by=(), check=probe, module_options=("device_map",),
        label_shows=("device", "dtype", "compile", "threads", "device_map", "max_memory"),  # split: a device_map
    )  # fmt: skip
