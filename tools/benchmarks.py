"""BENCHMARKS.md from the finished runs of the MLflow experiment ``bench``.

``make bench`` runs each bench workload through slimlab itself
(``slimlab run -m experiment=bench_NAME``, all into the experiment ``bench``);
then ``python -m tools.benchmarks [--uri URI] [--out BENCHMARKS.md]`` reads
those runs, groups them by workload (the ``experiment=`` choice recorded in each
run's ``overrides.txt`` artifact) and writes one section per workload: the
command, one row per variant with our figures, whether each target is met (or by
how much it is missed), and the published anchor it is compared with.

Nothing here times anything: it only reads what the runs measured.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

EXPERIMENT = "bench"
OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


@dataclass(frozen=True)
class Workload:
    """What a bench workload is compared with: a published anchor and our targets ``{metric: (op, value)}``."""

    title: str
    anchor: str
    source: str
    targets: dict[str, tuple[str, float]] = field(default_factory=dict)
    note: str = ""
    reference: str = ""  # a further command whose run the report compares with (e.g. the compiled fp32 model)
    columns: tuple[str, ...] = ()  # metrics shown besides the usual ones
    command: str = ""  # how the workload is run, when it is not `slimlab run -m experiment=NAME`


WORKLOADS: dict[str, Workload] = {
    "bench_lenet_deep_compression": Workload(
        title="Deep Compression on LeNet: unstructured pruning + int8",
        anchor="39x smaller LeNet-5 on MNIST with no accuracy loss (pruning + trained quantization + Huffman coding)",
        source="Han, Mao & Dally, Deep Compression, ICLR 2016, Table 1 / Table 3",
        targets={"compression_ratio": (">=", 40.0), "accuracy_drop": ("<=", 0.01)},
        note=(
            "Our artifact stores zeros as a 1-bit mask plus the int8 non-zero values, and `artifact.codec=lzma` "
            "entropy-codes the file (the paper: relative-index encoding, 5-8-bit shared-weight codebooks, Huffman "
            "coding). Without the codec the 1-bit mask caps the ratio near 32x (`uncoded_size_bytes`). The ratio is "
            "against the plain fp32 file, as the paper's is. Digits (1797 8x8 images upsampled to 28x28) is not MNIST: "
            "the accuracy drop is measured on 450 test images, so 0.01 is 4-5 images."
        ),
    ),
    "bench_minilm_int8": Workload(
        title="int8 all-MiniLM-L6-v2 sentence embeddings, 2 threads",
        anchor=(
            "measured on these machines: legacy per-tensor dynamic int8 about 1.5-2x faster at 0.948 "
            "mean cosine to fp32; torchao int8 dynamic + torch.compile about 1.9x at 0.9976"
        ),
        source="measured on this project's machines (torch 2.13, torchao 0.18)",
        targets={"speedup": (">=", 2.0), "cosine_to_baseline": (">=", 0.995), "compression_ratio": (">=", 3.5)},
        columns=("similarity_spearman", "nn_agreement", "compile_time_s"),
        note=(
            "`speedup` is against the fp32 eager model on the same batch (32 test sentences, 2 threads), measured "
            "in the same process. int8 speed depends on the CPU: VNNI (avx512_vnni) runs int8 dot products in one "
            "instruction; on a CPU without it (an earlier machine of this project reported only avx2) the same "
            "compiled torchao model ran at about 1x. Without `embeddings` the word embeddings (half the parameters) "
            "stay fp32 and the file is only about 1.5x smaller."
        ),
    ),
    "bench_pt2e_static": Workload(
        title="Static int8 (PT2E) on LeNet, one thread",
        anchor="3.8x faster for FX static int8 ResNet-18 over fp32 on one CPU thread",
        source="PyTorch quantization docs/blog (figure as cited in issue 4, not re-checked offline)",
        targets={"speedup_vs_compiled_fp32": (">=", 2.0), "accuracy_drop": ("<=", 0.005)},
        note=(
            "slimlab's `speedup` is against the fp32 eager baseline. `speedup_vs_compiled_fp32` divides the latency "
            "of the compiled fp32 reference run with the same batch size (technique `place`, compile=true, one "
            "thread) by this run's; it is blank when no such reference run is recorded (several: their median). "
            "LeNet is small: at a batch of 64 the int8 model's fixed costs (quantizing the input, reordering for "
            "oneDNN) weigh more than at 256, where its arithmetic dominates as it does in the anchor's ResNet-18."
        ),
        reference=(
            "slimlab run experiment=bench_pt2e_static 'technique=[place]' "
            "technique.place.device=cpu technique.place.compile=true technique.place.threads=1 "
            "measure.batch_size=64 (and =256)"
        ),
    ),
    "bench_structured_prune": Workload(
        title="Structured channel pruning of LeNet, fine-tuned",
        anchor="no published anchor for LeNet/digits; our target: >= 1.7x measured speedup within 0.01 accuracy",
        source="slimlab issue 4 (target set by the project)",
        targets={"speedup": (">=", 1.7), "accuracy_drop": ("<=", 0.01)},
    ),
    "bench_structured_prune_minilm": Workload(
        title="Structured pruning of MiniLM's feed-forward neurons, fine-tuned on the sentence set",
        anchor="no published anchor for this sentence set; reported as measured",
        source="slimlab issue 4",
        columns=("similarity_spearman", "nn_agreement"),
        note=(
            "Torch-Pruning removes the same fraction of the 1536 intermediate neurons in each of the 6 layers "
            "(`intermediate.dense` outputs and `output.dense` inputs); the model then trains for a few epochs "
            "on the fp32 model's embeddings of the 235 training sentences (MSE). So few sentences cannot "
            "restore what is cut: fidelity falls quickly with the amount."
        ),
    ),
    "bench_kd": Workload(
        title="Knowledge distillation LeNet -> lenet_small, scratch control, 5 seeds",
        anchor="MNIST: distilled small net 74 test errors vs 146 trained on hard labels alone",
        source="Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, 2015, section 3",
        targets={},
        note="No target: the paired gain (distilled minus its scratch twin, same init and seed) is reported as it is.",
    ),
    "bench_qat": Workload(
        title="Quantization-aware training against post-training quantization with the same weights, 3 seeds",
        anchor=(
            "no published anchor for LeNet/digits; PTQ with the same recipe measured in the same run (ptq_accuracy) "
            "and after as many float epochs (tuned_ptq_accuracy)"
        ),
        source="slimlab issue 14 (QAT: where it beats PTQ)",
        columns=("ptq_accuracy", "tuned_ptq_accuracy", "qat_gain"),
        note=(
            "qat_gain = accuracy - tuned_ptq_accuracy: QAT against PTQ after the same extra training. One test image "
            "is 0.0022. No speed is claimed: int2/int4 weights are dequantized at every call on this CPU."
        ),
    ),
    "bench_memory": Workload(
        title="Evaluating a dataset larger than memory: peak resident memory",
        anchor="the test split's size: 16 and 64 GiB on disk, the larger 3x this machine's free memory (20 of 23 GiB)",
        source="slimlab issue 12 (target set by the project: bounded by a batch, not by the data)",
        targets={"peak_rss_mb": ("<=", 2048.0)},
        columns=("peak_rss_mb",),
        note=(
            "A sparse file of zeros read with os.pread, 1024 rows (16 MiB) per batch, through three full passes "
            "(the baseline's score, the quantized stage's, the final one) and the latency batches. "
            "`peak_rss_mb` is the process's peak resident set (getrusage), torch, MLflow and the model included. "
            "The model is an untrained Linear(4096, 10): accuracy is not the point (0.1, one class of ten)."
        ),
    ),
    "bench_overhead": Workload(
        title="slimlab's own overhead: a one-minute job against a plain script doing the same work",
        anchor="a plain PyTorch script (tools/overhead.py `plain_job`) with the same data, model and steps",
        source="slimlab issue 4 (target set by the project)",
        targets={"overhead": ("<=", 0.05), "help_s": ("<=", 1.0)},
        columns=("slimlab_wall_s", "plain_wall_s", "overhead", "cpu_overhead", "overhead_fastest", "help_s", "pairs"),
        command="python -m tools.overhead",
        note=(
            "Wall time of whole processes (interpreter start, imports, MLflow logging included), plain script and "
            "`slimlab run experiment=bench_overhead` interleaved in pairs, the slimlab run with a fresh baseline "
            "cache so both train the baseline. `overhead` is the median over the pairs of each pair's own ratio (a "
            "pair runs back to back, so a slow stretch of a shared machine slows both); `overhead_fastest` divides "
            "the fastest run of each (as `timeit` reports), which mixes pairs. `cpu_overhead` compares "
            "their CPU time (user + system), which other work on a shared machine disturbs less than wall time. "
            "What slimlab adds is mostly fixed (CPU, measured on an idle machine): importing MLflow and its "
            "SQLAlchemy store (1.3-1.4 s: `import mlflow` brings pandas, pyarrow and fastapi with it; opening the "
            "run in a thread beside the training cost 1.4 s wall and 2.1 s CPU more, the training's short torch "
            "calls and the thread trading the GIL), Hydra, logging the run and its artifacts, and logging the "
            "model with `mlflow.pytorch.log_model` (about 0.9 s: torch.export's first call 0.6 s, the map of "
            "installed packages MLflow checks requirements with 0.25 s; `tracking.log_model=false` skips it). "
            "The per-layer sparsity chart is written as SVG directly (matplotlib's import was 0.35 s). "
            "`help_s` is the median wall time of `slimlab run --help`."
        ),
    ),
}

MACHINE_TAGS = ("slimlab.cpu", "slimlab.cpu_flags", "slimlab.version.torch", "slimlab.measure.threads")


@dataclass
class BenchRun:
    """One finished run of the bench experiment, as the report needs it."""

    run_id: str
    name: str
    workload: str
    overrides: list[str]
    metrics: dict[str, float]
    tags: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        """The compiled fp32 reference of a workload: the `place` technique alone."""
        return self.tags.get("slimlab.techniques") == "place"


def workload_of(overrides: Iterable[str]) -> str | None:
    """The ``experiment=NAME`` choice among a run's Hydra overrides."""
    for override in overrides:
        key, _, value = override.strip().partition("=")
        if key.lstrip("+") == "experiment" and value:
            return value
    return None


def load_runs(uri: str, experiment: str = EXPERIMENT) -> list[BenchRun]:
    """The FINISHED runs of ``experiment`` in the store at ``uri``, oldest first."""
    import os
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]
    )
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            try:
                path = client.download_artifacts(run.info.run_id, "overrides.txt", tmp)
                overrides = [line for line in Path(path).read_text().splitlines() if line.strip()]
            except Exception:  # no overrides.txt: not launched through `slimlab run`
                overrides = []
            workload = workload_of(overrides)
            if workload is None:
                continue
            out.append(
                BenchRun(
                    run_id=run.info.run_id,
                    name=run.info.run_name or run.info.run_id,
                    workload=workload,
                    overrides=overrides,
                    metrics=dict(run.data.metrics),
                    tags=dict(run.data.tags),
                    params=dict(run.data.params),
                )
            )
    return out


def primary_metric(metrics: dict[str, float]) -> str:
    """The run's primary metric (see ``slimlab.report.primary_metric``), ``accuracy`` when it names none."""
    from slimlab.report import primary_metric as named

    return named(metrics) or "accuracy"


def verdict(value: float | None, op: str, target: float) -> str:
    """``met`` or ``missed by X`` (X: how far the value is from the target), ``n/a`` without a value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if OPS[op](value, target):
        return "met"
    return f"missed by {_fmt(abs(value - target))}"


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def _with_derived(runs: Sequence[BenchRun]) -> None:
    """Add the speedup over the compiled fp32 reference measured with the same batch size and threads."""
    references: dict[tuple[str | None, str | None], list[float]] = {}
    for run in runs:
        if run.is_reference and "latency_ms" in run.metrics:
            references.setdefault(_protocol(run), []).append(run.metrics["latency_ms"])
    for run in runs:
        latencies = references.get(_protocol(run))
        if latencies and not run.is_reference and run.metrics.get("latency_ms"):
            run.metrics["speedup_vs_compiled_fp32"] = statistics.median(latencies) / run.metrics["latency_ms"]


def _protocol(run: BenchRun) -> tuple[str | None, str | None]:
    """What a latency depends on besides the model: the batch size and the thread count."""
    return run.params.get("measure.batch_size"), run.params.get("measure.threads")


# Overrides that say where a run is recorded or cached, not what it measures.
PLACE_KEYS = ("cache_dir", "tracking.uri")


def _variant_overrides(run: BenchRun) -> list[str]:
    """The overrides that set a run apart from the plain workload."""
    return [o for o in run.overrides if workload_of([o]) is None and o.partition("=")[0].lstrip("+") not in PLACE_KEYS]


def _variant(run: BenchRun, name: str) -> str:
    """The run name plus the overrides that set it apart from the plain workload."""
    extra = _variant_overrides(run)
    return f"{run.name} ({', '.join(extra)})" if extra else run.name


def cpu_class(run: BenchRun) -> str:
    """What int8 speed depends on most: ``AVX-512 VNNI`` (int8 dot products in one instruction), ``AVX2``, other."""
    flags = run.tags.get("slimlab.cpu_flags", "").split(",")
    kind = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "other"
    return f"{kind}: {run.tags.get('slimlab.cpu', 'unknown CPU')}"


def latest_per_variant(runs: Sequence[BenchRun]) -> list[BenchRun]:
    """The newest run of each workload variant on each CPU class (runs come oldest first), so re-running a workload
    replaces its rows and a run on another kind of machine adds a table."""
    latest: dict[tuple[str, str, tuple[str, ...], str], BenchRun] = {}
    for run in runs:
        latest[(run.workload, run.name, tuple(sorted(_variant_overrides(run))), cpu_class(run))] = run
    kept = {run.run_id for run in latest.values()}
    return [run for run in runs if run.run_id in kept]


def _meets_all(run: BenchRun, workload: Workload, primary: str) -> bool:
    return all(
        verdict(run.metrics.get(m, run.metrics.get(m.replace("accuracy", primary))), op, v) == "met"
        for m, (op, v) in workload.targets.items()
    )


# Targets on what the compressed model computes (not its speed or size): "the fidelity bound" of a workload.
FIDELITY = ("cosine_to_baseline", "accuracy_drop")


def _cell(run: BenchRun, column: str) -> str:
    value = run.metrics.get(column)
    slower = column.startswith("speedup") and value is not None and value < 1 and not run.is_reference
    return f"{_fmt(value)} (slower)" if slower else _fmt(value)


def fastest_meeting_fidelity(runs: Sequence[BenchRun], workload: Workload, primary: str) -> str | None:
    """The sentence naming the fastest variant that meets the workload's fidelity targets, if it has any."""
    bounds = {m: target for m, target in workload.targets.items() if m in FIDELITY}
    if not bounds:
        return None
    meeting = [
        run
        for run in runs
        if not run.is_reference and "speedup" in run.metrics
        if all(
            verdict(run.metrics.get(m, run.metrics.get(m.replace("accuracy", primary))), op, v) == "met"
            for m, (op, v) in bounds.items()
        )
    ]
    bound = ", ".join(f"{m} {op} {_fmt(v)}" for m, (op, v) in bounds.items())
    if not meeting:
        return f"No variant meets the fidelity bound ({bound})."
    best = max(meeting, key=lambda run: run.metrics["speedup"])
    return f"Fastest meeting the fidelity bound ({bound}): {best.name} at {_cell(best, 'speedup')}x."


def workload_section(name: str, runs: Sequence[BenchRun], workload: Workload | None = None) -> str:
    """One workload's markdown: heading, command, anchor, a table of variants per CPU class, notes."""
    workload = workload or WORKLOADS.get(name) or Workload(title=name, anchor="none", source="none")
    _with_derived(runs)
    primary = primary_metric(runs[0].metrics) if runs else "accuracy"
    columns = [primary, f"{primary}_drop", "compression_ratio", "speedup", "latency_ms", "baseline_latency_ms"]
    if name == "bench_pt2e_static" or any("speedup_vs_compiled_fp32" in r.metrics for r in runs):
        columns.append("speedup_vs_compiled_fp32")
    if any("uncoded_size_bytes" in r.metrics for r in runs):
        columns += ["size_bytes", "uncoded_size_bytes"]
    columns += [c for c in workload.columns if c not in columns]
    if any("distill_gain" in r.metrics for r in runs):
        columns += [f"scratch_{primary}", "distill_gain"]
    lines = [
        f"## {workload.title}",
        "",
        f"`{workload.command or f'slimlab run -m experiment={name}'}`",
        "",
        *([f"Reference (compiled fp32): `{workload.reference}`", ""] if workload.reference else []),
        f"Anchor: {workload.anchor}. Source: {workload.source}.",
        "",
    ]
    if workload.targets:
        lines += ["Targets: " + ", ".join(f"{m} {op} {_fmt(v)}" for m, (op, v) in workload.targets.items()) + ".", ""]
    header = ["variant", *columns, *(f"target {m}" for m in workload.targets)]
    by_cpu: dict[str, list[BenchRun]] = {}
    for run in runs:
        by_cpu.setdefault(cpu_class(run), []).append(run)
    for cpu, measured_here in sorted(by_cpu.items()):
        lines += [f"### Measured on {cpu}", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for run in measured_here:
            cells = [_variant(run, name), *(_cell(run, c) for c in columns)]
            for metric, (op, value) in workload.targets.items():
                if run.is_reference:
                    cells.append("reference")
                else:
                    got = run.metrics.get(metric, run.metrics.get(metric.replace("accuracy", primary)))
                    cells.append(verdict(got, op, value))
            lines.append("| " + " | ".join(cells) + " |")
        measured = [r for r in measured_here if not r.is_reference]
        if workload.targets and measured:
            winners = [_variant(r, name) for r in measured if _meets_all(r, workload, primary)]
            lines += [
                "",
                f"Every target met by: {'; '.join(winners)}." if winners else "No variant meets every target.",
            ]
        fastest = fastest_meeting_fidelity(measured_here, workload, primary)
        if fastest:
            lines += ["", fastest]
        if any(r.metrics.get("speedup", 1) < 1 for r in measured):
            lines += [
                "",
                "(slower): the variant is slower than the fp32 baseline on this machine (tag slimlab.slower).",
            ]
        lines.append("")
    gains = [r.metrics["distill_gain"] for r in runs if "distill_gain" in r.metrics]
    if gains:
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        lines += [
            "",
            f"Paired distill_gain over {len(gains)} runs: mean {statistics.mean(gains):+.4f}, "
            f"std {spread:.4f}, min {min(gains):+.4f}, max {max(gains):+.4f}.",
        ]
    if workload.note:
        lines += ["", workload.note]
    return "\n".join(lines) + "\n"


def machine_section(runs: Sequence[BenchRun]) -> str:
    lines = ["## Machine", ""]
    for tag in MACHINE_TAGS:
        values = sorted({r.tags[tag] for r in runs if tag in r.tags})
        lines.append(f"- {tag.removeprefix('slimlab.')}: {', '.join(values) or 'unknown'}")
    return "\n".join(lines) + "\n"


def render(runs: Sequence[BenchRun], workloads: dict[str, Workload] | None = None) -> str:
    """The whole BENCHMARKS.md: known workloads in table order, then any other workload found."""
    workloads = {**WORKLOADS, **(workloads or {})}
    runs = latest_per_variant(runs)
    by_workload: dict[str, list[BenchRun]] = {}
    for run in runs:
        by_workload.setdefault(run.workload, []).append(run)
    order = [w for w in workloads if w in by_workload] + sorted(w for w in by_workload if w not in workloads)
    parts = [
        "# Benchmarks",
        "",
        "Measured by slimlab itself (`make bench`), from the finished runs of the MLflow experiment "
        f"`{EXPERIMENT}`; written by `python -m tools.benchmarks`. Latencies are medians on this machine; "
        "ratios are against the fp32 baseline trained in the same run.",
        "",
    ]
    parts += [workload_section(name, by_workload[name], workloads.get(name)) for name in order]
    missing = [w for w in workloads if w not in by_workload]
    if missing:
        parts.append("Not run yet: " + ", ".join(f"`{w}`" for w in missing) + ".\n")
    parts.append(machine_section(runs))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from slimlab.mlflow_tracking import tracking_uri

    parser = argparse.ArgumentParser(prog="python -m tools.benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=None, help="MLflow tracking URI (default: slimlab's, ./mlflow.db)")
    parser.add_argument("--out", default="BENCHMARKS.md", help="where to write the report")
    parser.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment holding the bench runs")
    args = parser.parse_args(argv)
    uri = args.uri or tracking_uri()
    runs = load_runs(uri, args.experiment)
    if not runs:
        print(f"no finished runs of experiment {args.experiment!r} in {uri}; run `make bench` first", file=sys.stderr)
        return 1
    Path(args.out).write_text(render(runs))
    print(f"{args.out}: {len(runs)} runs, {len({r.workload for r in runs})} workloads from {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
