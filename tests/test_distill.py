"""Knowledge distillation end to end through the runner, against a real sqlite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.plugins.distill import DistillConfig, label
from slimlab.runner import run
from tests.conftest import FAST, slimlab

SEED_METRICS = {
    "mse", "baseline_mse", "mse_drop", "size_bytes", "compression_ratio", "latency_ms", "speedup",
    "scratch_mse", "distill_gain", "teacher_mse",
}  # fmt: skip


def runs_of(store: str):
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return client, sorted(runs, key=lambda r: r.info.start_time)


def only_run(store: str):
    client, runs = runs_of(store)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def stages(client, run_id: str, tmp_path: Path) -> list[dict]:
    return json.loads(Path(client.download_artifacts(run_id, "stages.json", str(tmp_path))).read_text())["stages"]


def test_seed_distillation_student_learns_from_the_teacher_with_a_measured_control(overrides, store):
    mse = run(compose(["experiment=seed_distillation", *overrides, "technique.distill.epochs=2"]))
    _, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "big_model distill(small_model,mse,a=1,epochs=2,lr=0.01)"
    metrics, tags = logged.data.metrics, logged.data.tags
    assert SEED_METRICS <= set(metrics)
    assert metrics["mse"] == mse
    assert metrics["teacher_mse"] == metrics["baseline_mse"]  # the teacher is the baseline, BigModel
    # lower mse is better: a positive gain means the distilled student beat its scratch twin
    assert metrics["distill_gain"] == pytest.approx(metrics["scratch_mse"] - metrics["mse"])
    assert metrics["compression_ratio"] > 10  # Linear 10 -> 1 against an MLP with 68,865 params
    assert metrics["param_count"] == 11
    assert tags["slimlab.distill.loss"] == "mse" and tags["slimlab.distill.student"] == "small_model"
    assert tags["slimlab.distill.student_class"] == "slimlab.zoo.models.SmallModel"


@pytest.mark.slow
def test_kd_lenet_to_lenet_small_reports_scratch_accuracy_and_gain(overrides, store):
    run(compose(["experiment=kd_lenet", *overrides, "technique.distill.epochs=1"]))
    _, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "lenet distill(lenet_small,T=4,a=0.5,epochs=1)"
    metrics = logged.data.metrics
    assert {"scratch_accuracy", "distill_gain", "teacher_accuracy"} <= set(metrics)
    assert metrics["distill_gain"] == pytest.approx(metrics["accuracy"] - metrics["scratch_accuracy"])
    assert metrics["compression_ratio"] > 1 and metrics["param_count"] < 431_080 / 5  # lenet_small: 34,622
    assert metrics["teacher_accuracy"] == metrics["baseline_accuracy"]
    assert logged.data.tags["slimlab.distill.loss"] == "kl"


def test_alpha_zero_is_exactly_the_scratch_twin(overrides, store):
    """With no teacher term, KD and its control are the same training: same init, same batches, zero gain."""
    regression = ["model=big_model", "data=regression", "technique=[distill]", "technique.distill.student=small_model"]
    run(compose([*overrides, *regression, "technique.distill.alpha=0", "technique.distill.control=true"]))
    _, logged = only_run(store)
    assert logged.data.metrics["distill_gain"] == pytest.approx(0, abs=1e-7)
    assert logged.data.metrics["scratch_mse"] == pytest.approx(logged.data.metrics["mse"], abs=1e-7)


def test_scratch_never_touches_the_teacher(store, tmp_path, monkeypatch):
    import slimlab.plugins.distill

    def no_teacher(*args, **kwargs):
        raise AssertionError("scratch=true must not build, load or run a teacher")

    monkeypatch.setattr(slimlab.plugins.distill, "_teacher", no_teacher)
    cache = tmp_path / "fresh-cache"
    config = [
        *FAST, f"cache_dir={cache}", f"tracking.uri={store}", "experiment_name=tests",
        "model=small_model", "data=regression", "technique=[distill]",
        "technique.distill.teacher=big_model", "technique.distill.scratch=true", "technique.distill.control=true",
    ]  # fmt: skip
    run(compose(config))
    _, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "small_model distill(scratch)"
    assert logged.data.tags["slimlab.distill.mode"] == "scratch"
    assert not {"teacher_mse", "scratch_mse", "distill_gain"} & set(logged.data.metrics)
    assert len(list((cache / "baselines").iterdir())) == 1  # small_model's baseline only: big_model never trained


def test_named_teacher_is_trained_and_cached_like_a_baseline(overrides, store):
    regression = ["data=regression", "technique=[distill]", "technique.distill.epochs=1"]
    for _ in range(2):
        run(compose([*overrides, *regression, "model=small_model", "technique.distill.teacher=big_model"]))
    _, runs = runs_of(store)
    assert [r.data.tags["slimlab.distill.teacher"] for r in runs] == ["big_model", "big_model"]
    assert runs[1].data.tags["slimlab.distill.teacher_baseline"].endswith("(cached)")
    assert runs[0].data.metrics["teacher_mse"] == runs[1].data.metrics["teacher_mse"]
    assert runs[0].data.metrics["teacher_mse"] < runs[0].data.metrics["baseline_mse"]  # BigModel beats SmallModel
    assert runs[0].info.run_name == "small_model distill(teacher=big_model,T=4,a=0.5,epochs=1)"


@pytest.mark.slow
def test_prune_distill_quantize_keeps_the_pruned_zeros(overrides, store, tmp_path):
    pipeline = [
        "technique=[prune,distill,quantize]",
        "technique.prune.amount=0.5",
        "technique.distill.epochs=1",
        "technique.quantize.allow_slower=true",
    ]
    run(compose([*overrides, *pipeline]))
    client, logged = only_run(store)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "lenet prune(0.5)+distill(T=4,a=0.5,epochs=1)+quantize(int8-wo)"
    assert logged.data.metrics["sparsity"] >= 0.49  # 50% of the weights pruned; biases are kept
    pruned, distilled, _ = stages(client, logged.info.run_id, tmp_path)
    assert distilled["nonzero_param_count"] <= pruned["nonzero_param_count"]
    for name, sparsity in pruned["layer_sparsity"].items():
        assert distilled["layer_sparsity"][name] >= sparsity, name
    assert distilled["accuracy"] > 0.5  # it trained, with the masks held, and the masks were made permanent
    assert logged.data.tags["slimlab.distill.student"] == "the incoming model"


def test_projection_when_student_and_teacher_widths_differ(tmp_path):
    """Feature distillation: a 1-wide student matches a 4-wide teacher through a projection it does not keep."""
    from slimlab.context import RunContext
    from slimlab.plugins.distill import apply
    from slimlab.tasks import Regression
    from slimlab.zoo.datasets import regression
    from slimlab.zoo.models import SimpleNet

    torch.manual_seed(0)
    teacher = nn.Linear(10, 4).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = SimpleNet()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    ctx = RunContext(
        cfg=compose([*FAST, "model=simple_net", "data=regression", "technique=[distill]"]),
        data=regression(samples=200),
        task=Regression(),
        device="cpu",
        run_name="test",
        config_hash="0",
        output_dir=tmp_path,
        baseline=teacher,
        baseline_metrics={"mse": 1.0},
    )
    out = apply(student, DistillConfig(loss="mse", alpha=1.0, epochs=2), ctx)
    assert out is student and set(out.state_dict()) == set(start)  # the projection is not part of the student
    assert not torch.equal(out.fc.weight, start["fc.weight"])
    assert ctx.tags["slimlab.distill.projection"].startswith("Linear(1->4)")
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())  # the teacher is untouched


@pytest.mark.parametrize(
    "override,message",
    [
        ("technique.distill.alpha=2", r"alpha must be in \[0, 1\], got 2"),
        ("technique.distill.student=resnet", r"student: unknown model 'resnet'; valid model options: .*lenet_small"),
        ("technique.distill.teacher=nope", r"teacher: unknown model 'nope'; valid model options: big_model"),
        ("technique.distill.loss=huber", r"loss must be one of auto, kl, mse"),
        ("technique.distill.temperature=0", r"temperature must be > 0"),
        ("technique.distill.epochs=0", r"epochs must be >= 1"),
        ("technique.distill.lr=0", r"lr must be > 0"),
    ],
)
def test_bad_values_are_config_errors_and_record_nothing(overrides, tmp_path, override, message):
    with pytest.raises(ConfigError, match=r"technique\.distill: " + message):
        run(compose([*overrides, "technique=[distill]", override]))
    assert not (tmp_path / "mlflow.db").exists()


def test_kl_on_a_regression_task_fails_with_the_reason(overrides):
    regression = ["model=small_model", "data=regression", "technique=[distill]", "tracking=none"]
    with pytest.raises(ValueError, match="loss=kl needs a classification task"):
        run(compose([*overrides, *regression, "technique.distill.loss=kl"]))


def test_a_named_student_after_another_technique_is_refused(overrides):
    pipeline = ["tracking=none", "model=big_model", "data=regression", "technique=[prune,distill]"]
    pipeline += ["technique.distill.student=small_model"]
    with pytest.raises(ValueError, match="would be thrown away"):
        run(compose([*overrides, *pipeline]))


def test_labels():
    assert label(DistillConfig()) == "distill(T=4,a=0.5)"
    assert label(DistillConfig(scratch=True)) == "distill(scratch)"
    assert label(DistillConfig(student="small_model", loss="mse", alpha=1)) == "distill(small_model,mse,a=1)"
    assert label(DistillConfig(student="lenet_small", scratch=True)) == "distill(lenet_small,scratch)"


@pytest.mark.slow
def test_sweep_logs_the_distilled_and_the_scratch_run_separately(tmp_path, cache_dir):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = slimlab(
        "run", "-m", "experiment=seed_distillation", "technique.distill.scratch=false,true",
        "technique.distill.epochs=2", *FAST, f"cache_dir={cache_dir}", f"tracking.uri={store}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, runs = runs_of(store)
    runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # the jobs, without the sweep's parent
    assert [r.info.run_name for r in runs] == [
        "big_model distill(small_model,mse,a=1,epochs=2,lr=0.01)",
        "big_model distill(small_model,scratch,epochs=2,lr=0.01)",
    ]
    assert [r.data.params["technique.distill.scratch"] for r in runs] == ["False", "True"]
    assert "distill_gain" in runs[0].data.metrics and "distill_gain" not in runs[1].data.metrics
