"""The baseline cache repairs itself (issue 13): an entry that is corrupted, tampered with or written by an older
slimlab is named in a warning, moved aside and rebuilt, never served and never fatal; and a baseline trained
under any thread count has the same bytes.

One pristine entry is trained once for the module; each test corrupts a copy in its own cache directory. The
baseline's identity is computed once and handed in, as the runner does: it holds slimlab's source digest, which
must not move under the module's tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from slimlab.artifact import load_state, save_model
from slimlab.baseline import CHECKSUMS, get_baseline, identity, seal
from slimlab.config import compose
from slimlab.identity import digest
from slimlab.plugin_manager import load_plugins
from slimlab.runner import _build_data, run_metrics
from slimlab.zoo.models import LeNet

ARGS = ["model=lenet_small", "train.epochs=1", "seed=3", "technique=[]", "tracking=none"]


def _compose(cache: Path, *extra: str):
    return compose([*ARGS, f"cache_dir={cache}", *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The data, task and a pristine cache entry (trained under 2 threads): what every copy is compared with."""
    cache = tmp_path_factory.mktemp("pristine")
    cfg = _compose(cache)
    data = _build_data(cfg)
    task = load_plugins(cfg.plugins.disable).task(data.task)
    found = identity(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        baseline = get_baseline(cfg, data, task, "cpu", found=found)
    finally:
        torch.set_num_threads(threads)
    assert not baseline.cached
    return found, data, task, baseline.path.parent


def _copy(built, tmp_path: Path, key: str | None = None) -> tuple[Path, Path]:
    """A cache directory holding a copy of the pristine entry (under ``key``): (cache_dir, entry)."""
    pristine = built[3]
    entry = tmp_path / "cache" / "baselines" / (key or pristine.name)
    shutil.copytree(pristine, entry)
    return tmp_path / "cache", entry


def _state(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_state(path))


def _assert_same_state(first: Path, second: Path) -> None:
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), "the weights differ"


def _truncate(entry: Path) -> None:
    model = entry / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])


def _zero(entry: Path) -> None:  # what a power cut can leave: the right length, no data
    model = entry / "model.pt"
    model.write_bytes(bytes(model.stat().st_size))


def _garble(entry: Path) -> None:
    (entry / "metrics.json").write_text('{"accuracy": 0.9, "size_')


def _tamper(entry: Path) -> None:  # valid JSON, a wrong number: was trusted and gave a wrong accuracy_drop
    metrics = json.loads((entry / "metrics.json").read_text())
    (entry / "metrics.json").write_text(json.dumps({**metrics, "accuracy": 0.25}, indent=2))


def _unsealed(entry: Path) -> None:  # an entry of an older slimlab: no checksums, so nothing vouches for it
    (entry / CHECKSUMS).unlink()


def _garble_checksums(entry: Path) -> None:
    (entry / CHECKSUMS).write_text("{")


def _no_model(entry: Path) -> None:
    (entry / "model.pt").unlink()


def _old_metric_names(entry: Path) -> None:  # sealed by a slimlab whose count metric was "params"
    metrics = json.loads((entry / "metrics.json").read_text())
    metrics["params"] = metrics.pop("param_count")
    (entry / "metrics.json").write_text(json.dumps(metrics, indent=2))
    seal(entry)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, "model.pt does not match its checksum"),
        (_zero, "model.pt does not match its checksum"),
        (_garble, "metrics.json does not match its checksum"),
        (_tamper, "metrics.json does not match its checksum"),
        (_unsealed, f"no {CHECKSUMS}"),
        (_garble_checksums, f"{CHECKSUMS} is not valid JSON"),
        (_no_model, "model.pt is missing"),
        (_old_metric_names, "metrics.json has no param_count"),
    ],
    ids=["truncated-model", "zeroed-model", "garbled-metrics", "tampered-metrics", "no-checksums",
         "garbled-checksums", "missing-model", "old-metric-names"],
)  # fmt: skip
def test_a_bad_entry_is_named_moved_aside_and_rebuilt(built, tmp_path, caplog, damage, reason):
    found, data, task, pristine = built
    cache, entry = _copy(built, tmp_path)
    damage(entry)
    with caplog.at_level("WARNING", logger="slimlab"):
        baseline = get_baseline(_compose(cache), data, task, "cpu", found=found)  # never raises
    assert f"baseline cache {entry}: {reason}" in caplog.text
    assert "building the baseline again" in caplog.text and "weights_only=False" not in caplog.text
    (aside,) = entry.parent.glob(f"{entry.name}.corrupt-*")  # kept for inspection, named in the warning
    assert aside.name in caplog.text
    assert not baseline.cached and baseline.trained
    # rebuilt: the same weights and metrics as the pristine entry, and a sealed entry that the next run trusts
    assert baseline.metrics == json.loads((pristine / "metrics.json").read_text())
    _assert_same_state(entry / "model.pt", pristine / "model.pt")
    caplog.clear()
    again = get_baseline(_compose(cache), data, task, "cpu", found=found)
    assert again.cached and again.metrics == baseline.metrics and "baseline cache" not in caplog.text


def test_a_sealed_entry_that_does_not_fit_the_model_is_set_aside(built, tmp_path, caplog):
    """Checksums that match are not enough: weights of other shapes (code the identity missed) are not served."""
    found, data, task, pristine = built
    cache, entry = _copy(built, tmp_path)
    save_model(LeNet(conv1=4, conv2=8, hidden=32), entry / "model.pt")
    seal(entry)
    with caplog.at_level("WARNING", logger="slimlab"):
        baseline = get_baseline(_compose(cache), data, task, "cpu", found=found)
    assert f"baseline cache {entry}: it does not fit the model (shapes differ" in caplog.text
    assert list(entry.parent.glob(f"{entry.name}.stale-*"))
    assert not baseline.cached
    _assert_same_state(entry / "model.pt", pristine / "model.pt")


def test_a_run_on_a_tampered_entry_reports_the_true_drop(built, tmp_path, caplog):
    """The run, end to end: it succeeds, and its baseline_accuracy is the baseline's, not the tampered number."""
    found, data, task, pristine = built
    cfg = _compose(tmp_path / "cache", "measure.repeats=5", "measure.warmup=1")
    cache, entry = _copy(built, tmp_path, digest(identity(cfg)))  # where the run looks (the source may have moved)
    _tamper(entry)
    with caplog.at_level("WARNING", logger="slimlab"):
        primary, metrics = run_metrics(cfg)
    true = json.loads((pristine / "metrics.json").read_text())["accuracy"]
    assert primary == "accuracy" and metrics["baseline_accuracy"] == pytest.approx(true, rel=1e-9) != 0.25
    assert metrics["accuracy_drop"] == pytest.approx(0.0)  # no technique: the model is the baseline
    assert f"baseline cache {entry}: metrics.json does not match its checksum" in caplog.text


def test_the_same_config_trains_the_same_bytes_under_any_thread_count(built, tmp_path):
    """A joblib worker (fewer threads) trained a byte-different baseline; the pristine entry had 2 threads."""
    found, data, task, pristine = built
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        baseline = get_baseline(_compose(tmp_path / "cache"), data, task, "cpu", found=found)
        assert torch.get_num_threads() == 1  # the caller's setting is restored after training
    finally:
        torch.set_num_threads(threads)
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert not baseline.cached
    _assert_same_state(baseline.path, pristine / "model.pt")
    assert baseline.path.read_bytes() == (pristine / "model.pt").read_bytes()
    assert (baseline.path.parent / "metrics.json").read_bytes() == (pristine / "metrics.json").read_bytes()
