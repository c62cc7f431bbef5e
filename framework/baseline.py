"""The uncompressed baseline: built (and trained, unless it comes with weights) once per identity, then cached.

The identity is the model, data and training config plus what they run and read (:mod:`slimlab.identity`):
the code of the model and data callables, the checkpoint's content, the files the config names, the versions
of torch and slimlab. Change any of them and the baseline is built again; nothing stale is served.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from slimlab.artifact import load_state, save_model
from slimlab.config import RESERVED_MODEL_KEYS
from slimlab.data import Data
from slimlab.errors import ConfigError
from slimlab.identity import digest, fingerprint
from slimlab.measure import count_parameters
from slimlab.training import score_baseline, train

BASELINE_KEYS = ("model", "data", "train", "seed")
log = logging.getLogger("slimlab")


@dataclass
class Baseline:
    model: nn.Module
    metrics: dict[str, float]  # every task metric, size_bytes, params, nonzero_params
    path: Path
    key: str
    cached: bool
    trained: bool = True  # False: a model that came with weights, taken as it is
    references: list[Any] | None = None  # the task's reference per test batch, when scored in this process

    @property
    def origin(self) -> str:
        """How this run got it: cached, trained, or pretrained."""
        return "cached" if self.cached else "trained" if self.trained else "pretrained"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load weights into ``model``: a ``.safetensors`` file or a state dict that ``torch.load`` reads with
    ``weights_only=True`` (a Lightning-style ``{"state_dict": ...}`` too). Every key and shape must match."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.checkpoint={path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            first = (str(error).strip().splitlines() or [""])[0]
            raise ValueError(
                f"model.checkpoint={path} is not a state dict torch.load can read with weights_only=True "
                f"(save model.state_dict(), not the module): {type(error).__name__}: {first}"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model.checkpoint={path} holds a {type(state).__name__}, not a state dict")
    misfit = _misfit(state, model)
    if misfit:
        raise ValueError(f"model.checkpoint={path} does not fit the model: {misfit}")
    model.load_state_dict(state)


def _misfit(state: dict[str, Any], model: nn.Module) -> str:
    """How a state dict does not fit ``model`` (shapes, missing and unexpected keys); empty when it fits.
    Nothing is ever reshaped to fit: a file of other shapes is the wrong file."""
    own = model.state_dict()
    mismatched = [
        f"{name} {tuple(value.shape)} (model {tuple(own[name].shape)})"
        for name, value in state.items()
        if name in own and tuple(getattr(value, "shape", ())) != tuple(own[name].shape)
    ]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    parts = [f"shapes differ: {', '.join(mismatched[:5])}"] if mismatched else []
    parts += [f"missing: {', '.join(missing[:5])}"] if missing else []
    parts += [f"unexpected: {', '.join(unexpected[:5])}"] if unexpected else []
    return "; ".join(parts)


def build_model(node: Any) -> nn.Module:
    """Build a model config: call its ``_target_`` with its arguments, then load ``checkpoint`` if set."""
    from hydra.utils import instantiate

    node = _plain(node)
    arguments = {k: v for k, v in node.items() if k not in RESERVED_MODEL_KEYS}
    model = instantiate(arguments, _convert_="all")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model._target_={node.get('_target_')} returned {type(model).__name__}, not a torch nn.Module")
    if node.get("checkpoint"):
        load_checkpoint(model, node["checkpoint"])
    return model


def is_pretrained(node: Any) -> bool:
    """Whether a model config comes with weights: ``pretrained``, else a checkpoint or a ``from_pretrained``."""
    node = _plain(node)
    if node.get("pretrained") is not None:
        return bool(node["pretrained"])
    return bool(node.get("checkpoint")) or str(node.get("_target_", "")).endswith("from_pretrained")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines the baseline: config, code, files, versions."""
    nodes = {key: _plain(cfg[key]) for key in BASELINE_KEYS}
    return {
        "config": nodes,
        **fingerprint({"model": nodes["model"], "data": nodes["data"]}, cfg.model.get("checkpoint")),
    }


def _cached(entry: Path, model: nn.Module) -> dict[str, float] | None:
    """The cached metrics after loading the entry's weights into ``model``; None if the entry cannot serve."""
    if not (entry / "metrics.json").exists():
        return None
    state = load_state(entry / "model.pt")
    misfit = _misfit(state, model)
    if misfit:
        stale = entry.with_name(f"{entry.name}.stale-{int(time.time())}")
        log.warning(
            "baseline cache %s does not fit the model (%s); moved to %s, building the baseline again",
            entry, misfit, stale.name,
        )  # fmt: skip
        os.replace(entry, stale)
        return None
    model.load_state_dict(state)
    return json.loads((entry / "metrics.json").read_text())


def get_baseline(
    cfg: DictConfig,
    data: Data,
    task: Any,
    device: str,
    batch_size: int = 512,
    model: nn.Module | None = None,
    found: dict[str, Any] | None = None,
) -> Baseline:
    """The baseline: a model that comes with weights as it is, or a trained one, from the cache if it was trained.

    A model that comes with weights (``is_pretrained``; a ``model`` handed in by the Python API, copied) is the
    baseline as it is, unless ``train.fine_tune_pretrained``; a task without labels cannot train it either way.
    Such a model is scored afresh in every run and never cached: its weights are what building it gives now
    (a package's, a directory's), which no cache key could vouch for. A trained baseline is cached by its
    identity; the entry is written to a temporary directory and renamed into place, so parallel jobs never read
    a half-written one. The baseline is its own reference: its agreement metrics are 1.
    """
    torch.manual_seed(cfg.seed)
    if model is not None:  # the Python API: nothing identifies it for a later run
        trains = task.labelled and cfg.train.fine_tune_pretrained
        return _as_it_is(copy.deepcopy(model), "given", trains, cfg, data, task, device, batch_size)
    found = found or identity(cfg)  # the runner computes it once for the run key too
    key = digest(found)
    trains = task.labelled and (not is_pretrained(cfg.model) or cfg.train.fine_tune_pretrained)
    start = time.perf_counter()
    model = build_model(cfg.model)
    log.info("baseline: %s built in %.1f s", cfg.model.get("name", "model"), time.perf_counter() - start)
    new = getattr(model, "slimlab_new_weights", None)
    if not trains and task.labelled and new:  # a random head scored as a baseline would be a number about nothing
        raise ConfigError(
            f"model {cfg.model.get('name', 'model')}: {', '.join(new[:4])} are not in its weights (initialised at "
            "random); train them first with train.fine_tune_pretrained=true"
        )
    if not trains:
        why = f"task {task.name} has no labels" if not task.labelled else "the model comes with weights"
        log.info("baseline: %s: the baseline as it is, scored afresh (train.fine_tune_pretrained=true trains it)", why)
        return _as_it_is(model, key, False, cfg, data, task, device, batch_size)

    entry = Path(cfg.cache_dir).expanduser().resolve() / "baselines" / key
    metrics = _cached(entry, model)
    if metrics is not None:
        log.info("baseline %s loaded from cache (%s)", key, entry)
        return Baseline(model.to(device).eval(), metrics, entry / "model.pt", key, cached=True)

    train(model, data, task, cfg.train, device=device, description="baseline: train")
    model.cpu().eval()
    scores, references = score_baseline(model, data, task, batch_size=batch_size)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=entry.parent))
    metrics = {**scores, **_size(model, staging / "model.pt")}
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (staging / "identity.json").write_text(json.dumps(found, indent=2, default=str))
    try:
        os.rename(staging, entry)
    except OSError:  # another job cached the same baseline first: theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    log.info("baseline %s trained: %s=%.4f", key, task.primary_metric, scores[task.primary_metric])
    return Baseline(model.to(device), metrics, entry / "model.pt", key, False, True, references)


def _size(model: nn.Module, path: Path) -> dict[str, float]:
    params, nonzero = count_parameters(model)
    return {"size_bytes": save_model(model, path), "params": params, "nonzero_params": nonzero}


def _as_it_is(
    model: nn.Module, key: str, trains: bool, cfg: DictConfig, data: Data, task: Any, device: str, batch_size: int
) -> Baseline:
    """A baseline that is not cached: fine-tuned if asked, scored, its file written to a temporary directory."""
    if trains:
        train(model, data, task, cfg.train, device=device, description="baseline: fine-tune")
    model.cpu().eval()
    scores, references = score_baseline(model, data, task, batch_size=batch_size)
    path = Path(tempfile.mkdtemp(prefix="slimlab-baseline-")) / "model.pt"
    metrics = {**scores, **_size(model, path)}
    log.info("baseline %s: %s=%.4f", key, task.primary_metric, scores[task.primary_metric])
    return Baseline(model.to(device), metrics, path, key, False, trains, references)
