"""The uncompressed baseline: built (and trained, unless it comes with weights) once per identity, then cached.

The identity is the model, data and training config plus what they run and read (:mod:`slimlab.identity`):
the code of the model and data callables, the checkpoint's content, the files the config names, the versions
of torch and slimlab. Change any of them and the baseline is built again; nothing stale is served.

A cache entry is a directory: ``model.pt``, ``metrics.json``, ``identity.json`` and, written last,
``checksums.json`` (their sha256). An entry that is incomplete, does not match its checksums, cannot be read or
does not fit the model is never served: it is moved aside (``<key>.corrupt-<time>``, kept for inspection) with a
warning naming it and why, and the baseline is built again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
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
from slimlab.training import reproducible, score_baseline, train, train_threads

BASELINE_KEYS = ("model", "data", "train", "seed")
CHECKSUMS = "checksums.json"  # a cache entry's manifest: sha256 of each file below, written last
SEALED = ("model.pt", "metrics.json", "identity.json")
COUNTED = ("size_bytes", "param_count", "nonzero_param_count")  # what every entry's metrics.json holds
log = logging.getLogger("slimlab")


@dataclass
class Baseline:
    model: nn.Module
    metrics: dict[str, float]  # every task metric, size_bytes, param_count, nonzero_param_count
    path: Path | None  # the cached file; None for a baseline that is not cached
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
    from slimlab.config import call_target

    node = _plain(node)
    arguments = {k: v for k, v in node.items() if k not in RESERVED_MODEL_KEYS}
    model = call_target(arguments, "model", _convert_="all")
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


def _sha256(path: Path) -> str:
    digest_ = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest_.update(block)
    return digest_.hexdigest()


def seal(entry: Path) -> None:
    """Write ``entry``'s checksum manifest: the sha256 of each of its files. Last, after every file is written."""
    sums = {name: _sha256(entry / name) for name in SEALED}
    (entry / CHECKSUMS).write_text(json.dumps(sums, indent=2))


def _read_entry(entry: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """A cache entry's metrics and state, checked against its manifest; ValueError saying why it cannot serve."""
    if not (entry / CHECKSUMS).is_file():
        raise ValueError(f"no {CHECKSUMS} (an entry of an older slimlab, or one not completely written)")
    try:
        sums = json.loads((entry / CHECKSUMS).read_text())
    except ValueError as error:
        raise ValueError(f"{CHECKSUMS} is not valid JSON ({error})") from None
    if not isinstance(sums, dict):
        raise ValueError(f"{CHECKSUMS} holds a {type(sums).__name__}, not a mapping of file to sha256")
    for name in SEALED:
        if name not in sums:
            raise ValueError(f"{CHECKSUMS} has no checksum for {name}")
        if not (entry / name).is_file():
            raise ValueError(f"{name} is missing")
        if _sha256(entry / name) != sums[name]:
            raise ValueError(f"{name} does not match its checksum in {CHECKSUMS}")
    try:
        metrics = json.loads((entry / "metrics.json").read_text())
    except ValueError as error:
        raise ValueError(f"metrics.json is not valid JSON ({error})") from None
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise ValueError("metrics.json is not a mapping of metric names to numbers")
    missing = sorted(set(COUNTED) - metrics.keys())
    if missing:  # an entry of an older slimlab, whose metric names differ
        raise ValueError(f"metrics.json has no {', '.join(missing)}")
    try:
        state = load_state(entry / "model.pt")
    except Exception as error:  # torch's own messages advise weights_only=False: never an option for a cache
        first = (str(error).strip().splitlines() or [""])[0]
        detail = "it holds more than tensors" if "weights_only" in str(error) else f"{type(error).__name__}: {first}"
        raise ValueError(f"model.pt cannot be loaded with weights_only=True ({detail})") from None
    return metrics, state


def _set_aside(entry: Path, why: str, label: str = "corrupt") -> None:
    """Move a cache entry that cannot serve out of the way, kept for inspection, and say so."""
    aside = entry.with_name(f"{entry.name}.{label}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    try:
        os.replace(entry, aside)
    except FileNotFoundError:  # a parallel job moved it first
        return
    except OSError as error:
        log.warning("baseline cache %s: %s; it could not be moved aside (%s), building the baseline again",
                    entry, why, error)  # fmt: skip
        return
    log.warning("baseline cache %s: %s; moved to %s, building the baseline again", entry, why, aside.name)


def _cached(entry: Path, model: nn.Module) -> dict[str, float] | None:
    """The cached metrics after loading the entry's weights into ``model``; None if there is no entry or it
    cannot serve (then it is moved aside). Never raises: a bad entry costs a rebuild, not the run."""
    if not entry.exists():
        return None
    try:
        metrics, state = _read_entry(entry)
    except (OSError, ValueError) as error:
        _set_aside(entry, str(error))
        return None
    misfit = _misfit(state, model)
    if misfit:
        _set_aside(entry, f"it does not fit the model ({misfit})", label="stale")
        return None
    model.load_state_dict(state)
    return metrics


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
    with reproducible(train_threads(cfg.train)):  # the cached metrics too: the same bytes in every process
        scores, references = score_baseline(model, data, task, batch_size=batch_size)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=entry.parent))
    metrics = {**scores, **_size(model, staging / "model.pt")}
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (staging / "identity.json").write_text(json.dumps(found, indent=2, default=str))
    seal(staging)
    try:
        os.rename(staging, entry)
    except OSError:  # another job cached the same baseline first: theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    log.info("baseline %s trained: %s=%.4f", key, task.primary_metric, scores[task.primary_metric])
    return Baseline(model.to(device), metrics, entry / "model.pt", key, False, True, references)


def _size(model: nn.Module, path: Path) -> dict[str, float]:
    params, nonzero = count_parameters(model)
    return {"size_bytes": save_model(model, path), "param_count": params, "nonzero_param_count": nonzero}


def _as_it_is(
    model: nn.Module, key: str, trains: bool, cfg: DictConfig, data: Data, task: Any, device: str, batch_size: int
) -> Baseline:
    """A baseline that is not cached: fine-tuned if asked, scored, its size measured on a file written and removed."""
    if trains:
        train(model, data, task, cfg.train, device=device, description="baseline: fine-tune")
    model.cpu().eval()
    scores, references = score_baseline(model, data, task, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="slimlab-baseline-") as scratch:
        metrics = {**scores, **_size(model, Path(scratch) / "model.pt")}
    log.info("baseline %s: %s=%.4f", key, task.primary_metric, scores[task.primary_metric])
    return Baseline(model.to(device), metrics, None, key, False, trains, references)
