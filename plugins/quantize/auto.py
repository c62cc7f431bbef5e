"""quantize backend ``auto``: every candidate recipe tried on the run's model, the fastest that keeps the outputs kept.

Which int8 path is fastest depends on the CPU (VNNI or not) and on the model, so it is measured, not guessed:
each candidate (``candidates``, default ``DEFAULT_CANDIDATES``: torchao int8 dynamic compiled, PT2E static,
eager dynamic, ONNX Runtime dynamic per channel and per tensor) quantizes a copy of the model; a candidate
that cannot run here is recorded with its reason. The survivors' outputs are compared with the fp32 model's on
calibration batches (mean per-row cosine; never the test split, which scores the run) and all of them are
timed side by side with fp32 on the run's example batch, interleaved, with the run's ``measure`` settings. The
fastest whose cosine is at least ``min_cosine`` becomes the step's result; the table of all candidates is the
artifact ``quantize_auto.md`` and the choice the tag ``slimlab.quantize.auto``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from slimlab.context import RunContext

    from .options import QuantizeConfig

from .ao_config import _first_line

FIDELITY_BATCHES = 4  # calibration batches the candidates' outputs are compared on


@dataclasses.dataclass
class Trial:
    label: str
    model: Any = None
    cosine: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    error: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def output_cosine(model: nn.Module, batches: list[Any], references: list[Any]) -> float:
    """Mean cosine similarity, row by row, of ``model``'s outputs to the references."""
    import torch
    import torch.nn.functional as F

    from slimlab.batches import call, clone

    scores = []
    with torch.inference_mode():
        for inputs, reference in zip(batches, references, strict=True):
            output = call(model, clone(inputs)).float()
            rows = reference.shape[0]
            scores.append(F.cosine_similarity(output.reshape(rows, -1), reference.reshape(rows, -1), dim=1))
    return float(torch.cat(scores).mean())


def _reset(ctx: RunContext, tags: dict[str, str], metrics: dict[str, float]) -> None:
    """Put the run's tags and metrics back to ``tags`` and ``metrics``: each candidate writes its own."""
    ctx.tags.clear()
    ctx.tags.update(tags)
    ctx.metrics.clear()
    ctx.metrics.update(metrics)


def table(trials: list[Trial], min_cosine: float, chosen: Trial | None) -> str:
    rows = [
        f"Candidates tried by quantize=auto (kept: cosine to fp32 >= {min_cosine}; chosen: the fastest kept).",
        "",
        "| candidate | speedup vs fp32 | latency ms | cosine to fp32 | result |",
        "|---|---:|---:|---:|---|",
    ]
    for trial in trials:
        if trial.error:
            rows.append(f"| {trial.label} | | | | failed: {trial.error.replace('|', '/')} |")
            continue
        verdict = "chosen" if trial is chosen else ("kept" if trial.cosine >= min_cosine else "below min_cosine")
        rows.append(
            f"| {trial.label} | {trial.speedup:.2f}x | {trial.latency_ms:.3f} | {trial.cosine:.4f} | {verdict} |"
        )
    return "\n".join(rows) + "\n"


def apply_auto(
    model: nn.Module,
    config: QuantizeConfig,
    ctx: RunContext,
    quantize: Callable[[nn.Module, QuantizeConfig, RunContext], nn.Module],
    check: Callable[[QuantizeConfig], None],
    describe: Callable[[QuantizeConfig], str],
) -> tuple[nn.Module, float, str]:
    """The fastest candidate that keeps ``min_cosine``: (its model, its speedup over fp32, its label).

    ``quantize``, ``check`` and ``describe`` are the technique's own apply (without the speed guard), capability
    check and label, passed in so that this module needs nothing from the package's entry module.
    """
    import torch

    from slimlab.batches import call, clone
    from slimlab.measure import measure_latency
    from slimlab.progress import progress

    model.eval()
    batches = list(ctx.calibration_batches(FIDELITY_BATCHES))
    with torch.inference_mode():
        references = [call(model, clone(inputs)).float() for inputs in batches]
    tags, metrics = dict(ctx.tags), dict(ctx.metrics)
    trials: list[Trial] = []
    recipes = config.candidate_configs()
    for recipe in progress(recipes, "quantize: auto candidates", total=len(recipes)):
        trial = Trial(describe(recipe))
        _reset(ctx, tags, metrics)
        try:
            check(recipe)
            trial.model = quantize(copy.deepcopy(model), recipe, ctx)
            trial.cosine = output_cosine(trial.model, batches, references)
        except Exception as error:  # a recipe that cannot run here is a finding of the search, not a crash
            trial.error, trial.model = _first_line(error), None
        trial.tags, trial.metrics = dict(ctx.tags), dict(ctx.metrics)
        trials.append(trial)
    ran = [trial for trial in trials if trial.model is not None]
    if ran:
        measure = ctx.cfg.measure
        latency = measure_latency(
            {"fp32": model, **{str(i): trial.model for i, trial in enumerate(ran)}},
            ctx.example_inputs(),
            warmup=measure.warmup,
            repeats=measure.repeats,
            threads=measure.threads,
        )
        for i, trial in enumerate(ran):
            trial.latency_ms = latency[str(i)].median_ms
            trial.speedup = latency["fp32"].median_ms / trial.latency_ms
    kept = [trial for trial in ran if trial.cosine >= config.min_cosine]
    chosen = max(kept, key=lambda trial: trial.speedup, default=None)
    report = ctx.output_dir / "quantize_auto.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(table(trials, config.min_cosine, chosen))
    ctx.artifacts["quantize_auto"] = report
    if chosen is None:
        _reset(ctx, tags, metrics)
        raise ValueError(
            f"quantize=auto: no candidate keeps min_cosine={config.min_cosine} here:\n{report.read_text()}"
        )
    _reset(ctx, chosen.tags, chosen.metrics)
    ctx.tags["slimlab.quantize.auto"] = chosen.label
    ctx.metrics["auto_cosine"] = chosen.cosine
    return chosen.model, chosen.speedup, chosen.label
