"""A user's own model and data, from the user's own directory: the findings of issue 12, each as a test.

The user's code lives in a temporary directory on ``sys.path`` (in-process) or ``PYTHONPATH`` (the CLI), as
it would beside a user's notebook or script.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from slimlab.config import compose
from slimlab.errors import ConfigError
from slimlab.runner import run, run_metrics
from tests.conftest import slimlab

USER_MODELS = """
    import torch
    from torch import nn


    class LogitsMLP(nn.Module):
        \"\"\"Returns logits, as torchvision, timm and Hugging Face classifiers do.\"\"\"

        def __init__(self, hidden: int = 64, classes: int = 10):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, classes))

        def forward(self, x):
            return self.net(x)


    def make_mlp(hidden: int = 64, **kwargs):
        \"\"\"A factory, like torchvision.models.resnet18 or timm.create_model.\"\"\"
        return LogitsMLP(hidden=hidden, **kwargs)


    class TwoInputs(nn.Module):
        \"\"\"forward(features, mask): several inputs, given by name from dict batches.\"\"\"

        def __init__(self, width: int = 12, classes: int = 3):
            super().__init__()
            self.layer = nn.Linear(width, 32)
            self.head = nn.Linear(32, classes)

        def forward(self, features, mask):
            return self.head(torch.relu(self.layer(features * mask)))
"""

USER_DATA = """
    import torch
    from torch.utils.data import Dataset, IterableDataset

    from slimlab.data import Data


    class Rows(Dataset):
        \"\"\"Map-style, one dict per row: collated into dict batches by a DataLoader.\"\"\"

        def __init__(self, features, labels):
            self.features, self.labels = features, labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            mask = (self.features[i] != 0).float()
            return {"features": self.features[i], "mask": mask, "labels": self.labels[i]}


    class Stream(IterableDataset):
        \"\"\"An iterable dataset: rows come in their own order, nothing is indexed.\"\"\"

        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            for i in range(len(self.rows)):
                yield self.rows[i]


    def blobs(rows: int = 600, width: int = 12, seed: int = 0, iterable_test: bool = False):
        generator = torch.Generator().manual_seed(seed)
        centres = 3 * torch.randn(3, width, generator=generator)
        labels = torch.randint(0, 3, (rows,), generator=generator)
        features = centres[labels] + torch.randn(rows, width, generator=generator)
        split = rows * 3 // 4
        test = Rows(features[split:], labels[split:])
        return Data(Rows(features[:split], labels[:split]), Stream(test) if iterable_test else test, "classification")


    def blobs_for(task: str):
        data = blobs()
        data.task = task
        return data
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch) -> Path:
    """The user's own directory: their model and data modules, importable like a script's neighbours."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "user_models.py").write_text(textwrap.dedent(USER_MODELS))
    (folder / "user_data.py").write_text(textwrap.dedent(USER_DATA))
    monkeypatch.syspath_prepend(str(folder))
    return folder


def baseline_tag(store: str) -> list[str]:
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return [r.data.tags["slimlab.baseline"] for r in sorted(runs, key=lambda r: r.info.start_time)]


# --- 2. logits train: the loss is cross-entropy ------------------------------------------------------------------


def test_a_model_returning_logits_trains(user_dir, overrides):
    """With nll_loss, a logits model 'trained' to about 0.1 accuracy on digits without a word."""
    cfg = compose([*overrides, "model._target_=user_models.LogitsMLP", "technique=[]", "train.epochs=3"])
    assert run(cfg) > 0.85


# --- 4. any callable: factories, and a group's arguments do not leak -----------------------------------------------


def test_a_factory_function_is_a_model(user_dir, overrides):
    cfg = compose([*overrides, "model._target_=user_models.make_mlp", "model.hidden=32", "technique=[prune]"])
    assert set(cfg.model) <= {"_target_", "name", "checkpoint", "pretrained", "hidden"}  # no LeNet conv1/conv2
    primary, metrics = run_metrics(cfg)
    assert primary == "accuracy" and metrics["param_count"] == 784 * 32 + 32 + 32 * 10 + 10


def test_a_target_that_is_not_callable_or_missing_is_bad_input(user_dir, overrides):
    with pytest.raises(ConfigError, match=r"model._target_='user_models.nope' cannot be imported"):
        run(compose([*overrides, "model._target_=user_models.nope"]))
    with pytest.raises(ConfigError, match=r"is a str, not a callable"):
        run(compose([*overrides, "model._target_=user_models.__name__"]))
    # a config written when slimlab's models were slimlab.models is pointed at the zoo
    moved = r"'slimlab.models.LeNet' cannot be imported: .*slimlab.zoo.models now: slimlab.zoo.models.LeNet$"
    with pytest.raises(ConfigError, match=moved):
        run(compose([*overrides, "model=lenet", "model._target_=slimlab.models.LeNet"]))


# --- 3. a model that comes with weights is the baseline as it is ---------------------------------------------------


def test_a_checkpoint_is_the_baseline_as_it_is(user_dir, overrides, store, tmp_path):
    from user_models import LogitsMLP

    from slimlab.zoo.datasets import digits

    torch.manual_seed(0)
    model = LogitsMLP().eval()  # untrained: any training would change its accuracy
    data = digits(seed=0)
    with torch.inference_mode():
        expected = (model(data.test.inputs).argmax(1) == data.test.targets).float().mean().item()
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)

    base = [*overrides, "model._target_=user_models.LogitsMLP", f"model.checkpoint={checkpoint}", "technique=[]"]
    assert run(compose(base)) == pytest.approx(expected)  # not trained for train.epochs
    assert run(compose([*base, "train.fine_tune_pretrained=true"])) > expected + 0.3  # asked to fine-tune
    assert baseline_tag(store)[0].endswith("(pretrained)") and baseline_tag(store)[1].endswith("(trained)")

    from safetensors.torch import save_file

    safetensors = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(safetensors))
    as_safetensors = [*overrides, "model._target_=user_models.LogitsMLP", f"model.checkpoint={safetensors}"]
    assert run(compose([*as_safetensors, "technique=[]"])) == pytest.approx(expected)


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(user_dir, overrides, tmp_path):
    from user_models import LogitsMLP

    checkpoint = tmp_path / "wide.pt"
    torch.save(LogitsMLP(hidden=128).state_dict(), checkpoint)
    cfg = compose([*overrides, "model._target_=user_models.LogitsMLP", f"model.checkpoint={checkpoint}"])
    with pytest.raises(ValueError, match=r"does not fit the model: shapes differ: net.1.weight \(128, 784\)"):
        run(cfg)
    with pytest.raises(ConfigError, match=r"model.checkpoint=.*nothing.pt: no such file"):
        run(compose([*overrides, f"model.checkpoint={tmp_path / 'nothing.pt'}"]))


# --- 1. the baseline is never stale ---------------------------------------------------------------------------------


def test_overwriting_a_checkpoint_builds_a_new_baseline(user_dir, overrides, store, tmp_path):
    from user_models import LogitsMLP

    checkpoint = tmp_path / "weights.pt"
    args = [*overrides, "model._target_=user_models.LogitsMLP", f"model.checkpoint={checkpoint}", "technique=[]"]
    scores = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(LogitsMLP().state_dict(), checkpoint)  # the same path, other weights
        scores.append(run(compose(args)))
    assert scores[0] != scores[1]
    first, second = baseline_tag(store)
    assert first.split()[0] != second.split()[0] and second.endswith("(pretrained)")  # another key, not cached
    # Fine-tuned from the checkpoint, a baseline is cached: the checkpoint's content keys it, not its path.
    tuned = [*args, "train.fine_tune_pretrained=true"]
    run(compose(tuned))
    torch.manual_seed(2)
    torch.save(LogitsMLP().state_dict(), checkpoint)
    run(compose(tuned))
    run(compose(tuned))
    assert [tag.split()[1] for tag in baseline_tag(store)[2:]] == ["(trained)", "(trained)", "(cached)"]


def test_editing_the_model_or_data_code_retrains_the_baseline(tmp_path, cache_dir):
    """Through the CLI, in fresh processes, as a user edits their files between runs."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "user_models.py").write_text(textwrap.dedent(USER_MODELS))
    (project / "user_data.py").write_text(textwrap.dedent(USER_DATA))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "model._target_=user_models.TwoInputs", "data._target_=user_data.blobs", "+data.rows=300", "technique=[]",
        "train.epochs=2", "measure.repeats=5", "measure.warmup=1", f"cache_dir={cache_dir}", f"tracking.uri={store}",
        "tracking.log_model=false",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(project)}

    def baseline() -> tuple[str, float]:
        result = slimlab("run", *args, cwd=project, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(store)
        (experiment,) = [e for e in client.search_experiments() if e.name == "slimlab"]
        newest = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
        return newest.data.tags["slimlab.baseline"], newest.data.metrics["baseline_accuracy"]

    first = baseline()
    assert baseline()[0] == first[0].replace("(trained)", "(cached)")  # nothing changed: served from the cache
    models = project / "user_models.py"
    models.write_text(models.read_text().replace("32", "2"))  # TwoInputs narrowed from 32 to 2 hidden units
    second = baseline()
    assert second[0].endswith("(trained)") and second[0].split()[0] != first[0].split()[0]
    data = project / "user_data.py"
    data.write_text(data.read_text().replace("centres = 3 * torch.randn", "centres = 0.1 * torch.randn"))  # harder
    third = baseline()
    assert third[0].endswith("(trained)") and third[1] != second[1]


# --- 7. the data contract: loaders, dict batches, several inputs ---------------------------------------------------


@pytest.mark.parametrize("iterable_test", [False, True], ids=["map-style", "iterable"])
def test_dict_batches_and_a_two_input_model_compress(user_dir, overrides, store, iterable_test):
    """A Dataset of dict rows (collated by a DataLoader) into forward(features, mask); prune then quantize."""
    cfg = compose(
        [
            *overrides, "model._target_=user_models.TwoInputs", "data._target_=user_data.blobs",
            f"+data.iterable_test={iterable_test}", "technique=[prune,quantize]", "train.epochs=15",
            "technique.quantize.allow_slower=true",
        ]
    )  # fmt: skip
    primary, metrics = run_metrics(cfg)
    assert primary == "accuracy" and metrics["accuracy"] > 0.8 and metrics["baseline_accuracy"] > 0.8
    assert metrics["agreement"] > 0.8 and metrics["sparsity"] > 0.45
    client = MlflowClient(store)
    (logged,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert logged.info.status == "FINISHED" and logged.data.tags["slimlab.task"] == "classification"
    stages = json.loads(Path(client.download_artifacts(logged.info.run_id, "stages.json")).read_text())
    assert [s["technique"] for s in stages["stages"]] == ["prune", "quantize"]


def test_a_data_callable_that_returns_something_else_is_named(user_dir, overrides):
    with pytest.raises(ConfigError, match=r"data._target_=slimlab.zoo.models.select_layers returned list"):
        run(compose([*overrides, "data._target_=slimlab.zoo.models.select_layers", "+data.total=3"]))


@pytest.mark.slow
def test_a_sweep_resumes_only_while_the_code_is_unchanged(tmp_path, cache_dir):
    """Resume skips a job whose result exists; after an edit of the model's code nothing is skipped."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "user_models.py").write_text(textwrap.dedent(USER_MODELS))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "-m", "model._target_=user_models.LogitsMLP", "model.hidden=16", "technique=[prune]",
        "technique.prune.amount=0.3,0.6", "train.epochs=1", "measure.repeats=5", "measure.warmup=1",
        f"cache_dir={cache_dir}", f"tracking.uri={store}", "tracking.log_model=false",
    ]  # fmt: skip

    def sweep() -> str:
        result = slimlab("run", *args, cwd=project)
        assert result.returncode == 0, result.stderr[-3000:]
        return next(line for line in result.stdout.splitlines() if line.startswith("sweep: "))

    assert sweep() == "sweep: 2 finished, 0 failed, 0 skipped of 2 jobs"
    assert sweep() == "sweep: 0 finished, 0 failed, 2 skipped of 2 jobs"
    models = project / "user_models.py"
    models.write_text(models.read_text().replace("nn.ReLU()", "nn.Tanh()"))
    assert sweep() == "sweep: 2 finished, 0 failed, 0 skipped of 2 jobs"


def test_an_unknown_task_is_bad_input_naming_the_registered_ones(user_dir, overrides):
    cfg = compose([*overrides, "model._target_=user_models.TwoInputs", "data._target_=user_data.blobs_for",
                   "+data.task=segmentation"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"the data's task 'segmentation' is unknown; registered tasks: "
                       r"classification, embedding, language_modeling, regression"):  # fmt: skip
        run(cfg)


def test_a_torchvision_constructor_is_a_model(overrides, tmp_path):
    """Where torchvision imports (its PyPI wheel does not beside torch 2.13's CPU build)."""
    pytest.importorskip("torchvision", reason="torchvision does not import beside this torch build")
    from tests.test_data_options import write_images

    write_images(tmp_path / "images", count=6)
    cfg = compose(
        [
            *overrides, "model._target_=torchvision.models.resnet18", "+model.num_classes=2", "data=image_folder",
            f"data.path={tmp_path / 'images'}", "technique=[prune]", "train.epochs=1",
        ]
    )  # fmt: skip
    primary, metrics = run_metrics(cfg)
    assert primary == "accuracy" and metrics["sparsity"] > 0.45


def test_a_helper_module_in_another_folder_is_part_of_the_identity(tmp_path, monkeypatch):
    """nets.py imports helpers/blocks.py: editing the helper changes the baseline's identity."""
    from slimlab.identity import fingerprint

    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("")
    block = "from torch import nn\n\n\nclass Block(nn.Linear):\n    def __init__(self):\n"
    block += "        super().__init__({}, 2)\n"
    (tmp_path / "helpers" / "blocks.py").write_text(block.format(8))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "nets_with_helper.py").write_text(
        "from helpers.blocks import Block\n\n\ndef net():\n    return Block()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "project"))
    node = {"model": {"_target_": "nets_with_helper.net"}, "data": {}}
    before = fingerprint(node)["code"]
    (tmp_path / "helpers" / "blocks.py").write_text(block.format(16))
    assert fingerprint(node)["code"] != before
