"""The built-in readers of a user's own files: tables (csv/json/parquet through Hugging Face datasets) and image
folders (torchvision's layout), through the runner."""

from __future__ import annotations

import pytest
import torch

from slimlab.config import compose
from slimlab.data import loader
from slimlab.runner import run_metrics
from slimlab.zoo.datasets import image_folder, table


@pytest.fixture(scope="module")
def cancer_csv(tmp_path_factory):
    """scikit-learn's breast-cancer rows as a user's csv file: 30 feature columns and a label."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.rename(columns={"target": "label"})
    path = tmp_path_factory.mktemp("table") / "cancer.csv"
    frame.to_csv(path, index=False)
    return path


def test_a_table_of_numbers_gives_feature_batches(cancer_csv):
    data = table(str(cancer_csv), seed=0)
    x, y = next(iter(loader(data.test, 16)))
    assert x.shape == (16, 30) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(data.train) + len(data.test) == 569 and len(data.test) == 114
    with pytest.raises(ValueError, match=r"data.label='diagnosis' is no column of .*; columns: mean radius"):
        table(str(cancer_csv), label="diagnosis")
    with pytest.raises(ValueError, match=r"a table is one of .csv"):
        table(str(cancer_csv.with_suffix(".xlsx")))


def test_a_csv_trains_compresses_and_logs(cancer_csv, overrides):
    cfg = compose(
        [
            *overrides, "data=table", f"data.path={cancer_csv}", "model=mlp", "model.in_features=30",
            "model.num_classes=2", "technique=[prune]", "technique.prune.fine_tune_epochs=3", "train.epochs=5",
        ]
    )  # fmt: skip
    primary, metrics = run_metrics(cfg)
    assert primary == "accuracy" and metrics["baseline_accuracy"] > 0.85 and metrics["accuracy"] > 0.8


def test_a_text_table_gives_tokenizer_batches(tmp_path):
    from slimlab.zoo.datasets import minilm_path

    path = tmp_path / "reviews.jsonl"
    rows = [("a wonderful film", 1), ("dull and far too long", 0), ("I loved it", 1), ("a waste of time", 0)] * 5
    path.write_text("".join(f'{{"review": "{text}", "label": {label}}}\n' for text, label in rows))
    data = table(str(path), text="review", tokenizer=minilm_path(), max_length=16, test_fraction=0.25)
    batch = next(iter(loader(data.train, 4)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (4, 16)


def write_images(root, count: int = 12) -> None:
    """Two classes a model can tell apart: dark and bright noisy squares."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for name, level in (("dark", 40), ("bright", 200)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = (level + 30 * torch.randn(16, 16, 3, generator=generator)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{index}.png")


def test_an_image_folder_trains_and_compresses(tmp_path, overrides):
    write_images(tmp_path / "images")
    data = image_folder(str(tmp_path / "images"), size=8)
    x, y = next(iter(loader(data.train, 4)))
    assert x.shape == (4, 3, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert data.train.dataset.classes == ["bright", "dark"] and len(data.test) == 5  # 20% of 24
    cfg = compose(
        [
            *overrides, "data=image_folder", f"data.path={tmp_path / 'images'}", "data.size=8", "model=mlp",
            "model.in_features=192", "model.num_classes=2", "technique=[quantize]", "train.epochs=30", "train.lr=0.01",
            "technique.quantize.allow_slower=true",
        ]
    )  # fmt: skip
    primary, metrics = run_metrics(cfg)
    assert primary == "accuracy" and metrics["baseline_accuracy"] == 1.0 and metrics["accuracy"] == 1.0


def test_a_split_larger_than_a_batch_is_read_without_holding_it(tmp_path):
    """1 GiB of rows streamed through: the process's peak resident memory grows by about a batch, not the file."""
    import subprocess
    import sys

    code = f"""
import resource
from slimlab.data import iterate
from slimlab.zoo.datasets import disk_rows

data = disk_rows({str(tmp_path / "rows.f32")!r}, gib=1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = sum(len(x) for x, _ in iterate(data.test, "cpu"))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(rows, grown // 1024)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows, grown_mb = map(int, result.stdout.split())
    assert rows == 2**30 // (4 * 4096)  # every row of the file was read
    assert grown_mb < 128  # a 16 MiB batch at a time (a memory map or a loaded split: about 1024)
