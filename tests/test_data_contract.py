"""The data contract's edges: batch forms, splits slimlab cannot iterate safely, targets that do not fit, test
splits whose order changes. Each would otherwise crash deep inside or give a number about nothing."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from slimlab import batches
from slimlab.config import compose
from slimlab.data import Data, check_data, loader
from slimlab.errors import ConfigError
from slimlab.runner import run_metrics
from slimlab.tasks import Classification, Scored


def test_batch_forms():
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 0])
    assert batches.split((x,))[1] is None  # TensorDataset(x): inputs alone
    inputs, target = batches.split({"input_ids": x, "label": y})  # a Hugging Face dataset's column name
    assert set(inputs) == {"input_ids"} and target is y
    with pytest.raises(TypeError, match="both labels and label"):
        batches.split({"input_ids": x, "labels": y, "label": y})
    from transformers.modeling_outputs import BaseModelOutput

    hidden = torch.ones(3, 4, 8)
    assert batches.output_tensor(BaseModelOutput(last_hidden_state=hidden)) is hidden  # a bare AutoModel


def test_training_leaves_out_a_last_batch_of_one_row():
    """Batch normalisation cannot train on one row; the test split keeps every row."""
    rows = TensorDataset(torch.zeros(65, 2), torch.zeros(65))
    assert [len(b[0]) for b in loader(rows, 64, shuffle=True)] == [64]
    assert [len(b[0]) for b in loader(rows, 64)] == [64, 1]


def test_a_hugging_face_dataset_is_batched_as_tensors():
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 5, "label": [0, 1, 0, 1, 1]})
    inputs, target = batches.split(next(iter(loader(rows, 4))))
    assert inputs["input_ids"].shape == (4, 3) and target.tolist() == [0, 1, 0, 1]


def test_splits_slimlab_cannot_iterate_safely_are_refused():
    rows = TensorDataset(torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"Data.train is a one-shot iterator \(generator\)"):
        check_data(Data((b for b in [rows[:4]]), rows), "mine.data")
    with pytest.raises(TypeError, match="the test DataLoader shuffles"):
        check_data(Data(rows, DataLoader(rows, batch_size=4, shuffle=True)), "mine.data")
    assert check_data(Data(rows, DataLoader(rows, batch_size=4)), "mine.data")


def test_classification_refuses_targets_and_outputs_that_do_not_fit():
    task = Classification()
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    with pytest.raises(ValueError, match=r"targets of shape \(3, 1\) do not fit outputs of shape \(3, 2\)"):
        task.evaluate([Scored(logits, torch.tensor([[0], [1], [1]]), None)])
    with pytest.raises(ValueError, match=r"outputs of \[batch, classes >= 2, ...\], got \(3, 1\)"):
        task.evaluate([Scored(logits[:, :1], torch.tensor([0, 1, 1]), None)])
    # -100 marks a row that does not count, for the accuracy as for the loss
    assert task.evaluate([Scored(logits, torch.tensor([0, 1, -100]), None)]) == {"accuracy": 1.0}


class Reshuffled(IterableDataset):
    """An IterableDataset whose order changes at every pass: the baseline's references would not line up."""

    def __init__(self, x, y):
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        self.passes += 1
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.passes))
        for i in order.tolist():
            yield self.x[i], self.y[i]


USER_DATA = """
    import torch
    from torch.utils.data import TensorDataset

    from slimlab.data import Data
    from tests.test_data_contract import Reshuffled


    def reshuffled(seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(300, 12, generator=generator)
        y = (x[:, 0] > 0).long()
        return Data(TensorDataset(x[:200], y[:200]), Reshuffled(x[200:], y[200:]), "classification")
"""


def test_a_test_split_whose_order_changes_fails_the_run_instead_of_misscoring(tmp_path, monkeypatch, overrides):
    (tmp_path / "reshuffled_data.py").write_text(textwrap.dedent(USER_DATA))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose(
        [
            *overrides, "model=mlp", "model.in_features=12", "model.num_classes=2",
            "data._target_=reshuffled_data.reshuffled", "technique=[prune]", "measure.eval_batch_size=32",
        ]
    )  # fmt: skip
    with pytest.raises(ValueError, match="test batch 0 holds other rows than when the baseline was scored"):
        run_metrics(cfg)


def test_a_new_head_is_not_scored_as_a_baseline(tmp_path, overrides):
    """A Hugging Face base model given a classification head it does not have: the head is random."""
    from slimlab.zoo.datasets import minilm_path

    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(f'{{"review": "text {i}", "label": {i % 2}}}\n' for i in range(20)))
    args = [
        *overrides, "model=huggingface", f"model.path={minilm_path()}", "+model.num_labels=2", "data=table",
        f"data.path={path}", "data.text=review", f"data.tokenizer={minilm_path()}", "technique=[]",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"classifier.bias, classifier.weight are not in its weights"):
        run_metrics(compose(args))
