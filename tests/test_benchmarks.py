"""The bench workloads compose, sweep their variants, and the report reads a real MLflow store."""

from __future__ import annotations

import pytest

from slimlab.config import EXPERIMENTS_DIR, compose
from tests.conftest import FAST, NO_MLFLOW_MODEL, slimlab
from tools.benchmarks import (
    WORKLOADS,
    BenchRun,
    latest_per_variant,
    load_runs,
    render,
    verdict,
    workload_of,
    workload_section,
)
from tools.overhead import PLAIN

BENCHES = sorted(path.stem for path in EXPERIMENTS_DIR.glob("bench_*.yaml"))
UNSWEPT = {"bench_overhead"}  # one job, timed by its own driver (WORKLOADS[...].command)


def test_every_bench_workload_has_metadata():
    assert set(BENCHES) == set(WORKLOADS)


@pytest.mark.parametrize("name", BENCHES)
def test_bench_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.experiment_name == "bench"
    assert cfg.measure.threads in (1, 2)
    assert cfg.technique  # a pipeline
    first = (EXPERIMENTS_DIR / f"{name}.yaml").read_text().splitlines()[:2]
    sweep = "" if name in UNSWEPT else "-m "
    assert first == ["# @package _global_", f"# slimlab run {sweep}experiment={name}"]


@pytest.mark.parametrize("name", sorted(set(BENCHES) - UNSWEPT))
def test_bench_experiment_sweeps_its_variants(name):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from slimlab.config import CONFIG_DIR, register_configs
    from slimlab.plugin_manager import load_plugins

    register_configs(load_plugins())
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params and all("," in str(values) for values in params.values())


def test_overhead_plain_script_mirrors_the_experiment():
    """The plain script does by hand what bench_overhead asks slimlab to do; a change to one must reach the other."""
    cfg = compose(["experiment=bench_overhead"])
    prune = cfg.technique.prune
    assert list(cfg.technique) == ["prune"] and cfg.model.name == "lenet" and cfg.data.name == "digits"
    assert (prune.scope, prune.structure, prune.method, prune.schedule) == ("global", "unstructured", "l1", "oneshot")
    assert PLAIN == {
        "epochs": cfg.train.epochs,
        "fine_tune_epochs": prune.fine_tune_epochs,
        "amount": prune.amount,
        "lr": prune.lr,
        "batch_size": cfg.train.batch_size,
        "seed": cfg.seed,
        "measure_batch": cfg.measure.batch_size,
        "warmup": cfg.measure.warmup,
        "repeats": cfg.measure.repeats,
        "threads": cfg.measure.threads,
        "train_threads": cfg.train.threads,
    }
    assert cfg.train.lr == prune.lr  # the plain script uses one learning rate for both


def test_rerunning_a_variant_replaces_its_row():
    def bench_run(run_id, overrides):
        return BenchRun(run_id, "lenet prune(0.5)", "bench_structured_prune", overrides, {}, {})

    old = bench_run("a", ["experiment=bench_structured_prune", "technique.prune.amount=0.5"])
    other = bench_run("b", ["experiment=bench_structured_prune", "technique.prune.amount=0.7"])
    new = bench_run("c", ["technique.prune.amount=0.5", "experiment=bench_structured_prune", "cache_dir=/tmp/x"])
    assert [r.run_id for r in latest_per_variant([old, other, new])] == ["b", "c"]


def test_verdict():
    assert verdict(41.0, ">=", 40.0) == "met"
    assert verdict(22.5, ">=", 40.0) == "missed by 17.50"
    assert verdict(0.012, "<=", 0.01) == "missed by 0.0020"
    assert verdict(None, "<=", 0.01) == "n/a"
    assert workload_of(["technique.prune.amount=0.5", "experiment=bench_kd"]) == "bench_kd"


def test_report_from_a_real_store(tmp_path, cache_dir, store):
    """Two tiny bench runs through the real CLI into a sqlite store, then the markdown rows."""
    common = [*FAST, NO_MLFLOW_MODEL, f"cache_dir={cache_dir}", f"tracking.uri={store}"]
    tiny_dc = [
        "experiment=bench_lenet_deep_compression",
        "technique.prune.amount=0.9",
        "technique.prune.schedule=oneshot",
        "technique.prune.fine_tune_epochs=0",
        "technique.quantize.backend=torchao",
        "technique.quantize.scheme=int8_weight_only",
        "technique.quantize.targets=[Linear]",
        "technique.quantize.compile=false",
    ]
    tiny_sp = ["experiment=bench_structured_prune", "technique.prune.fine_tune_epochs=1"]
    for args in (tiny_dc, tiny_sp):
        result = slimlab("run", *args, *common, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]

    runs = load_runs(store)
    assert sorted(r.workload for r in runs) == ["bench_lenet_deep_compression", "bench_structured_prune"]
    markdown = render(runs)
    rows = [line for line in markdown.splitlines() if line.startswith("| lenet ")]
    assert len(rows) == 2
    dc = next(row for row in rows if "prune(0.9" in row)
    cells = [cell.strip() for cell in dc.strip("|").split("|")]
    dc_run = next(r for r in runs if r.workload == "bench_lenet_deep_compression")
    assert dc_run.metrics["uncoded_size_bytes"] > dc_run.metrics["size_bytes"]  # the experiment's lzma codec
    assert cells[-2] == verdict(dc_run.metrics["compression_ratio"], ">=", 40.0)
    assert "`slimlab run -m experiment=bench_lenet_deep_compression`" in markdown
    assert "Deep Compression, ICLR 2016" in markdown
    sp = next(row for row in rows if "channels" in row)
    assert all(c == "met" or c.startswith("missed by ") for c in sp.strip("|").split("|")[-2:] for c in [c.strip()])
    assert (
        "Not run yet: `bench_minilm_int8`, `bench_pt2e_static`, `bench_structured_prune_minilm`, `bench_kd`, "
        in markdown
    )
    assert "version.torch: " in markdown and "measure.threads: 1" in markdown


def test_plain_overhead_script_does_the_work(monkeypatch, tmp_path):
    """The plain script really trains, prunes and saves (tiny here: one epoch each)."""
    import torch

    from tools import overhead

    monkeypatch.setitem(overhead.PLAIN, "epochs", 1)
    monkeypatch.setitem(overhead.PLAIN, "fine_tune_epochs", 1)
    monkeypatch.setitem(overhead.PLAIN, "repeats", 5)
    result = overhead.plain_job(tmp_path)
    assert result["baseline_accuracy"] > 0.5 and result["accuracy"] > 0.5
    pruned = torch.load(tmp_path / "model.pt", weights_only=True)
    zeros = sum(int(t.eq(0).sum()) for name, t in pruned.items() if name.endswith("weight"))
    weights = sum(t.numel() for name, t in pruned.items() if name.endswith("weight"))
    assert zeros / weights == pytest.approx(0.9, abs=0.001)


def test_a_table_per_cpu_class_names_the_fastest_variant_meeting_the_fidelity_bound_and_flags_slower_ones():
    vnni = {"slimlab.cpu": "Xeon A", "slimlab.cpu_flags": "avx2,avx512f,avx512_vnni"}
    avx2 = {"slimlab.cpu": "Xeon B", "slimlab.cpu_flags": "avx2"}

    def bench_run(run_id, name, tags, speedup, cosine):
        metrics = {"speedup": speedup, "cosine_to_baseline": cosine, "compression_ratio": 4.0}
        return BenchRun(run_id, name, "bench_minilm_int8", ["experiment=bench_minilm_int8"], metrics, tags)

    runs = [
        bench_run("a", "minilm quantize(int8-dyn,compiled)", vnni, 2.5, 0.997),
        bench_run("b", "minilm onnx(int8 dynamic)", vnni, 2.9, 0.96),  # faster, but below the bound
        bench_run("c", "minilm quantize(int8-dyn,compiled)", avx2, 0.07, 0.997),  # same variant, other machine
        bench_run("d", "minilm quantize(ort-int8-dyn)", avx2, 1.6, 0.996),
    ]
    assert len(latest_per_variant(runs)) == 4  # a run on another CPU class adds a row, it does not replace one
    text = workload_section("bench_minilm_int8", runs)
    on_vnni, on_avx2 = text.split("### Measured on AVX2: Xeon B")
    assert "### Measured on AVX-512 VNNI: Xeon A" in on_vnni
    assert "(cosine_to_baseline >= 0.9950): minilm quantize(int8-dyn,compiled) at 2.50x." in on_vnni
    assert "(cosine_to_baseline >= 0.9950): minilm quantize(ort-int8-dyn) at 1.60x." in on_avx2
    assert "| 0.0700 (slower) |" in on_avx2 and "(slower)" not in on_vnni
