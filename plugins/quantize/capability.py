"""Whether a scheme can run on this machine at all: tried once per process on a tiny layer (``check``)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

from .ao_config import _ao_recipes, _first_line, _import_torchao, build_ao_config, describe_ao_config
from .layers import _selector
from .options import DEFAULT_GROUP_SIZE, QuantizeConfig
from .torchao_backend import _torchao_quantize


def _probe_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache
def probe(backend: str, scheme: str, granularity: str, device: str = "cpu") -> str | None:
    """Why ``scheme`` cannot run here (the first line of the error), or None. Tried once per process."""
    import torch
    from torch import nn

    try:
        if backend == "torchao":
            tiny = nn.Sequential(nn.Linear(256, 256)).to(device)
            _torchao_quantize(tiny, scheme, granularity, _selector(("Linear",), ()), DEFAULT_GROUP_SIZE)
            with torch.inference_mode():
                tiny(torch.randn(8, 256, device=device))
        elif backend == "eager":
            if "x86" not in torch.backends.quantized.supported_engines:
                return f"torch has no x86 quantized engine (engines: {torch.backends.quantized.supported_engines})"
            if torch.backends.quantized.engine != "x86":
                return f"the quantized engine is {torch.backends.quantized.engine!r}, not 'x86'"
            import torch.ao.quantization as tq

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's deprecation warning comes with the real run
                tiny = tq.quantize_dynamic(nn.Sequential(nn.Linear(16, 16)), {nn.Linear}, dtype=torch.qint8)
                tiny(torch.randn(2, 16))
        elif backend == "pt2e":
            import platform

            machine = platform.machine().lower()
            if machine not in ("x86_64", "amd64", "i386", "i686"):
                return f"X86InductorQuantizer needs an x86 CPU, this is {machine}"
            if not torch.backends.mkldnn.is_available():
                return "torch was built without oneDNN (mkldnn), which inductor's int8 CPU kernels use"
            _import_torchao()  # quiets its CUDA-kernel load failures first
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer  # noqa: F401
    except Exception as error:  # the reason is the point: report whatever the library raised
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return None


@functools.lru_cache
def probe_config(spec: str, device: str = "cpu") -> str | None:
    """Why the torchao config ``spec`` (JSON) cannot run here, or None: each config it holds quantizes and runs a
    Linear(768, 64) (768: a multiple of every group size up to 256, and of 3, 6, 12...)."""
    import json

    import torch
    from torch import nn

    quantization = _import_torchao()
    try:
        for recipe in _ao_recipes(build_ao_config(json.loads(spec))):
            tiny = nn.Sequential(nn.Linear(768, 64)).to(device)
            quantization.quantize_(tiny, recipe)
            with torch.inference_mode():
                tiny(torch.randn(8, 768, device=device))
    except Exception as error:  # the reason is the point: report whatever the library raised
        return _first_line(error)
    return None


def check(config: QuantizeConfig) -> None:
    """Refuse, before any work, a scheme this machine cannot run: never a silent fallback."""
    if config.config is not None:
        import json

        reason = probe_config(json.dumps(_plain_spec(config.config), sort_keys=True), _probe_device())
        if reason:
            raise ValueError(f"config {describe_ao_config(build_ao_config(config.config))} cannot run here: {reason}")
        return
    reason = probe(config.backend, config.scheme, config.granularity, _probe_device())
    if reason:
        raise ValueError(f"backend {config.backend} scheme {config.scheme} cannot run on this machine: {reason}")


def _plain_spec(spec: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec
