"""The uncompressed baseline: trained once per model + data + training config, then loaded from a cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from framework.artifact import load_model, save_model
from framework.config import config_hash
from framework.data import TaskData
from framework.measure import count_parameters
from framework.training import evaluate, predict, train

BASELINE_KEYS = ("model", "data", "train", "seed")
log = logging.getLogger("slimlab")


@dataclass
class Baseline:
    model: nn.Module
    metrics: dict[str, float]  # primary metric, size_bytes, params, nonzero_params
    path: Path
    key: str
    cached: bool
    trained: bool = True  # False: a pretrained model taken as is (a task without labels)

    @property
    def origin(self) -> str:
        """How this run got it: cached, trained, or pretrained."""
        return "cached" if self.cached else "trained" if self.trained else "pretrained"


def build_model(cfg: DictConfig) -> nn.Module:
    """Instantiate ``cfg.model`` (its ``name`` is a label, not an argument)."""
    from hydra.utils import instantiate

    arguments = {k: v for k, v in cfg.model.items() if k != "name"}
    return instantiate(arguments)


def get_baseline(cfg: DictConfig, data: TaskData, device: str) -> Baseline:
    """Load the cached baseline for this config, or train, evaluate and cache it.

    The cache entry is written to a temporary directory and renamed into
    place, so parallel jobs never read a half-written baseline.

    A task without labels (``embedding``) has nothing to train on: its baseline is the pretrained model as
    built, and it is its own reference, so its primary metric is computed against its own outputs (a
    cosine of 1.0). The runner then makes those outputs the task's targets.
    """
    key = config_hash(cfg, BASELINE_KEYS)
    entry = Path(cfg.cache_dir).expanduser().resolve() / "baselines" / key
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    model = build_model(cfg)
    log.info("baseline: %s built in %.1f s", cfg.model.get("name", "model"), time.perf_counter() - start)
    if (entry / "metrics.json").exists():
        load_model(model, entry / "model.pt")
        metrics = json.loads((entry / "metrics.json").read_text())
        log.info("baseline %s loaded from cache (%s)", key, entry)
        return Baseline(model.to(device).eval(), metrics, entry / "model.pt", key, cached=True)

    if data.labelled:
        train(model, data, cfg.train, device=device, description="baseline: train")
    else:
        log.info("baseline: task %s has no labels: the pretrained model is the baseline, not trained", data.task)
    model.cpu().eval()
    if data.labelled:
        score = evaluate(model, data)
    else:  # its own reference
        own = predict(model, data.test_x)
        score = data.score(own, own)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=entry.parent))
    params, nonzero = count_parameters(model)
    metrics = {
        data.primary_metric: score,
        "size_bytes": save_model(model, staging / "model.pt"),
        "params": params,
        "nonzero_params": nonzero,
    }
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    trained_with = {k: OmegaConf.to_container(cfg[k], resolve=True) if k != "seed" else cfg.seed for k in BASELINE_KEYS}
    (staging / "config.json").write_text(json.dumps(trained_with, indent=2))
    try:
        os.rename(staging, entry)
    except OSError:  # another job cached the same baseline first: theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    log.info("baseline %s %s: %s=%.4f", key, "trained" if data.labelled else "pretrained", data.primary_metric, score)
    return Baseline(model.to(device), metrics, entry / "model.pt", key, cached=False, trained=data.labelled)
