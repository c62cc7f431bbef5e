"""all-MiniLM-L6-v2 as a first-class model, and the embedding-fidelity task on the fixed sentence set.

The fast tests use a 2-layer MiniLM and a dozen sentences; the slow ones run every technique on the full model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from slimlab.artifact import load_model
from slimlab.config import compose
from slimlab.runner import run
from slimlab.tasks import Classification, Embedding, Scored, embedding_fidelity
from slimlab.zoo.datasets import load_tokenizer, minilm_path, read_sentences, sentences, split_groups
from slimlab.zoo.models import SentenceEmbedding as MiniLM
from slimlab.zoo.models import select_layers
from tests.conftest import LOG_MODEL, REPO

FIDELITY = {"cosine_to_baseline", "cosine_to_baseline_min", "similarity_spearman", "nn_agreement"}
EMBEDDING_METRICS = FIDELITY | {
    "baseline_cosine_to_baseline", "cosine_to_baseline_drop", "size_bytes", "baseline_size_bytes",
    "compression_ratio", "param_count", "nonzero_param_count", "sparsity", "latency_ms", "latency_ms_p95", "speedup",
}  # fmt: skip

# A dozen sentences in groups (paraphrases share a group), enough for a tiny but real run.
FEW = """\
# a tiny sentence file for tests
The cat is sleeping on the sofa.
A cat is asleep on the couch.

It will rain tomorrow morning.
Rain is expected tomorrow morning.

The stock market fell sharply today.

She plays the piano every evening.
Every evening she practises the piano.

The train to Paris was cancelled.

Bake the cake for thirty minutes.
The cake needs to bake for half an hour.

Python is a popular programming language.
"""


def texts_to_batch(texts: list[str]) -> dict[str, torch.Tensor]:
    encoded = load_tokenizer()(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.fixture(scope="module")
def teacher() -> MiniLM:
    return MiniLM()


@pytest.fixture
def few(tmp_path) -> Path:
    path = tmp_path / "few.txt"
    path.write_text(FEW)
    return path


def only_run(store: str):
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


# --- the model ------------------------------------------------------------------------------------------------------


def test_importing_models_does_not_import_transformers():
    code = "import sys, slimlab.zoo.models; assert 'transformers' not in sys.modules, 'transformers imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_select_layers():
    assert select_layers(6) == [0, 1, 2, 3, 4, 5]
    assert select_layers(6, num_layers=3) == [1, 3, 5]  # every other layer, ending with the last
    assert select_layers(6, num_layers=2) == [2, 5]
    assert select_layers(6, num_layers=6) == [0, 1, 2, 3, 4, 5] and select_layers(6, num_layers=1) == [5]
    assert select_layers(6, layers=[1, 5]) == [1, 5]
    for bad in ({"layers": [6]}, {"layers": [1, 1]}, {"layers": []}, {"num_layers": 0}, {"num_layers": 7}):
        with pytest.raises(ValueError):
            select_layers(6, **bad)
    with pytest.raises(ValueError, match="not both"):
        select_layers(6, layers=[0], num_layers=1)


def test_minilm_gives_sentence_transformers_embeddings(teacher):
    """Mean pooling over the mask + L2 normalisation: the embeddings all-MiniLM-L6-v2 is published with."""
    texts = ["The cat sits on the mat.", "A stock market crash.", "Short."]  # different lengths: padding matters
    with torch.inference_mode():
        ours = teacher(**texts_to_batch(texts))
        alone = torch.cat([teacher(**texts_to_batch([text])) for text in texts])  # unpadded, one at a time
    assert ours.shape == (3, 384) and ours.dtype == torch.float32
    assert torch.allclose(ours.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(ours, alone, atol=1e-5)  # padding does not leak into the mean
    assert sum(p.numel() for p in teacher.parameters()) == 22_565_376  # 22.7M less the unused pooler

    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer  # an optional cross-check
    reference = SentenceTransformer(minilm_path(), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_student_layers_come_from_the_teacher(teacher):
    student = MiniLM(layers=[0, 2])
    assert student.layers == [0, 2] and len(student.bert.encoder.layer) == 2
    assert student.bert.config.num_hidden_layers == 2
    for mine, index in zip(student.bert.encoder.layer, (0, 2), strict=True):
        theirs = teacher.bert.encoder.layer[index].state_dict()
        assert mine.state_dict().keys() == theirs.keys()
        assert all(torch.equal(value, theirs[name]) for name, value in mine.state_dict().items())
    x = texts_to_batch(["A student model.", "Fewer layers, same embedding width."])
    with torch.inference_mode():
        assert student(**x).shape == (2, 384)
        # positional inputs as the tokenizer orders them, and no mask meaning every token counts
        assert torch.equal(student(x["input_ids"], x["attention_mask"]), student(**x))
        ones = {"input_ids": x["input_ids"][:1], "attention_mask": torch.ones_like(x["input_ids"][:1])}
        assert torch.allclose(student(x["input_ids"][:1]), student(**ones))


# --- the data and the task ------------------------------------------------------------------------------------------


def test_sentence_set_is_large_varied_and_split_by_group():
    groups = read_sentences()
    flat = [s for g in groups for s in g]
    assert len(flat) >= 256 and len(set(flat)) == len(flat)
    assert sum(len(g) > 1 for g in groups) >= 20  # near-paraphrase pairs
    assert min(map(len, flat)) < 20 and max(map(len, flat)) > 150  # short and long sentences

    data = sentences(seed=0)
    assert data.task == "embedding" and data.train.targets is None and data.test.targets is None
    assert len(data.train) + len(data.test) == len(flat)
    ids = data.train.inputs["input_ids"]
    assert set(data.train.inputs) == {"input_ids", "attention_mask"} and ids.dtype == torch.long
    assert ids.shape[1] <= 64 and data.train.inputs["attention_mask"].shape == ids.shape
    assert abs(len(data.test) / len(flat) - 0.25) < 0.02
    assert torch.equal(sentences(seed=0).test.inputs["input_ids"], data.test.inputs["input_ids"])  # from the seed
    assert not torch.equal(sentences(seed=1).test.inputs["input_ids"][:10], data.test.inputs["input_ids"][:10])


def test_split_keeps_paraphrase_groups_together(few):
    groups = read_sentences(few)
    assert len(groups) == 7 and sum(map(len, groups)) == 11
    for seed in range(5):
        train, test = split_groups(groups, 0.5, seed)
        assert sorted(train + test) == sorted(s for g in groups for s in g)
        for group in groups:
            assert set(group) <= set(test) or set(group) <= set(train), (seed, group)
    # sentences() tokenises exactly that split, test rows last
    train, test = split_groups(groups, 0.5, 3)
    data = sentences(path=str(few), test_fraction=0.5, seed=3)
    width = data.test.inputs["input_ids"].shape[1]
    ids = load_tokenizer()(test, padding="max_length", max_length=width, return_tensors="pt")
    assert torch.equal(data.test.inputs["input_ids"], ids["input_ids"])
    assert torch.equal(data.test.inputs["attention_mask"], ids["attention_mask"])
    assert len(data.train) == len(train)


def test_embedding_task_scores_fidelity():
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    task = Embedding()
    assert not task.labelled and task.primary_metric == "cosine_to_baseline" and task.higher_is_better

    def scores(outputs):  # two batches, the targets being the baseline's outputs (what the runner hands it)
        return task.evaluate(Scored(o, b, b) for o, b in zip(outputs.split(12), base.split(12), strict=True))

    assert scores(base) == pytest.approx(
        {"cosine_to_baseline": 1.0, "cosine_to_baseline_min": 1.0, "similarity_spearman": 1.0, "nn_agreement": 1.0}
    )
    noisy = base + 0.3 * torch.randn(20, 8)
    found = scores(noisy)
    assert 0 < found["cosine_to_baseline_min"] < found["cosine_to_baseline"] < 1
    assert 0 < found["similarity_spearman"] < 1 and 0 <= found["nn_agreement"] <= 1
    assert task.drop(1.0, found["cosine_to_baseline"]) == pytest.approx(1 - found["cosine_to_baseline"])
    assert task.loss(noisy, base).item() == pytest.approx(torch.nn.functional.mse_loss(noisy, base).item())

    # nearest neighbours: 0<->1 and 2<->3 are pairs; swapping which of 2/3 is closest to 4 flips one row
    points = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [0.06, 1.0]])
    moved = points.clone()
    moved[4] = torch.tensor([0.0, 1.0])
    assert embedding_fidelity(points, points)["nn_agreement"] == 1.0
    assert embedding_fidelity(moved, points)["nn_agreement"] == pytest.approx(3 / 5)


def test_classification_scores_accuracy_and_agreement():
    labels = torch.tensor([0, 1, 1, 0])
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    task = Classification()
    baseline = task.reference(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    assert task.labelled and task.evaluate([Scored(logits, labels, baseline)]) == {"accuracy": 0.75, "agreement": 0.5}


# --- through the runner ---------------------------------------------------------------------------------------------


def test_tiny_minilm_run_logs_fidelity_not_accuracy(overrides, store, few, tmp_path):
    """A 2-layer MiniLM on a dozen sentences, pruned and fine-tuned on the baseline's embeddings."""
    args = [
        *overrides, LOG_MODEL, "model=minilm", "model.num_layers=2", "data=sentences", f"data.path={few}",
        "data.test_fraction=0.5", "technique=[prune]", "technique.prune.amount=0.3",
        "technique.prune.module_types=[Linear]", "technique.prune.fine_tune_epochs=1", "technique.prune.lr=1e-5",
    ]  # fmt: skip
    cosine = run(compose(args))
    client, logged = only_run(store)
    metrics, tags = logged.data.metrics, logged.data.tags
    assert (
        logged.info.status == "FINISHED"
        and logged.info.run_name == "minilm prune(0.3,fine_tune_epochs=1,lr=1e-05,module_types=Linear)"
    )
    assert EMBEDDING_METRICS <= set(metrics)
    assert not [name for name in metrics if "accuracy" in name or name.startswith("mse")]
    assert metrics["cosine_to_baseline"] == cosine and 0.5 < cosine < 1
    assert metrics["baseline_cosine_to_baseline"] == pytest.approx(1.0)
    assert metrics["cosine_to_baseline_drop"] == pytest.approx(1 - cosine)
    assert metrics["cosine_to_baseline_min"] <= cosine
    linear_weights = 2 * (4 * 384 * 384 + 2 * 384 * 1536)  # the embeddings are not pruned
    assert metrics["param_count"] - metrics["nonzero_param_count"] == pytest.approx(0.3 * linear_weights, abs=10)
    assert tags["slimlab.baseline"].endswith("(pretrained)")
    stages = json.loads(Path(client.download_artifacts(logged.info.run_id, "stages.json", str(tmp_path))).read_text())
    assert stages["stages"][0]["cosine_to_baseline"] == pytest.approx(cosine)

    # the artifact reloads into a fresh 2-layer MiniLM and gives the same embeddings
    model_file = Path(client.download_artifacts(logged.info.run_id, "model.pt", str(tmp_path)))
    reloaded = load_model(MiniLM(num_layers=2), model_file).eval()
    baseline = MiniLM(num_layers=2).eval()
    data = sentences(path=str(few), test_fraction=0.5, seed=0)
    inputs = data.test.inputs
    with torch.inference_mode():
        again = torch.nn.functional.cosine_similarity(reloaded(**inputs), baseline(**inputs)).mean().item()
    assert again == pytest.approx(cosine, abs=1e-5)

    # the MLflow model: torch.export'ed, taking the tokenizer's tensors positionally (input_ids, attention_mask)
    import mlflow.pytorch

    from slimlab.logged_model import using_tracking_uri

    assert tags["slimlab.model_format"] == "pt2"
    with using_tracking_uri(store):
        logged = mlflow.pytorch.load_model(tags["slimlab.model_uri"])
    with torch.inference_mode():
        served = logged(inputs["input_ids"], inputs["attention_mask"])
        assert torch.allclose(served, reloaded(**inputs), atol=1e-5)


def test_embedding_baseline_is_the_pretrained_model_scored_afresh(overrides, store, few, cache_dir):
    """Its weights are the package's: a cache could serve old ones after an upgrade, so it is never cached."""
    args = [*overrides, "model=minilm", "model.layers=[0]", "data=sentences", f"data.path={few}", "technique=[]"]
    args.append("data.test_fraction=0.5")
    entries = set((cache_dir / "baselines").glob("*")) if (cache_dir / "baselines").exists() else set()
    assert run(compose([*args, "tracking=none"])) == pytest.approx(1.0)
    assert run(compose(args)) == pytest.approx(1.0)  # the baseline alone: a cosine of 1 to itself
    _, logged = only_run(store)
    assert logged.data.tags["slimlab.baseline"].endswith("(pretrained)")
    assert logged.data.metrics["nn_agreement"] == 1.0 and logged.data.metrics["similarity_spearman"] == 1.0
    assert set((cache_dir / "baselines").glob("*")) == entries or not (cache_dir / "baselines").exists()


# --- every technique on the full model ------------------------------------------------------------------------------

FFN = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(6)]
TECHNIQUES = {
    "prune": ["technique=[prune]", "technique.prune.amount=0.5", "technique.prune.module_types=[Linear]"],
    "quantize": [
        "technique=[quantize]", "technique.quantize.scheme=int8_dynamic", "technique.quantize.allow_slower=true",
    ],
    "quantize_embeddings": [
        "technique=[quantize]", "technique.quantize.scheme=int8_dynamic", "technique.quantize.embeddings=true",
        "technique.quantize.allow_slower=true",
    ],
    "prune_ffn": [
        "technique=[prune]", "technique.prune.structure=channels", "technique.prune.scope=layer",
        "technique.prune.amount=0.25", f"technique.prune.layers=[{','.join(FFN)}]",
    ],
    "place": ["technique=[place]", "technique.place.device=cpu", "technique.place.dtype=bfloat16"],
    "distill": [
        "technique=[distill]", "technique.distill.student=minilm_student", "technique.distill.epochs=1",
        "technique.distill.lr=5e-5",
    ],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_every_technique_runs_on_minilm(technique, overrides, store, tmp_path):
    """all-MiniLM-L6-v2 through the runner with each built-in technique, on a slice of the sentence set."""
    lines = [s for g in read_sentences() for s in [*g, ""]][:60]  # about 40 sentences, whole groups
    path = tmp_path / "some.txt"
    path.write_text("\n".join(lines) + "\n")
    args = [
        *overrides, "model=minilm", "data=sentences", f"data.path={path}", "measure.batch_size=8",
        "measure.threads=2", *TECHNIQUES[technique],
    ]  # fmt: skip
    cosine = run(compose(args))
    _, logged = only_run(store)
    metrics = logged.data.metrics
    assert logged.info.status == "FINISHED" and EMBEDDING_METRICS <= set(metrics)
    assert not [name for name in metrics if "accuracy" in name]
    assert 0.5 < cosine <= 1.0 and metrics["cosine_to_baseline"] == cosine
    if technique == "quantize":
        assert cosine > 0.99 and metrics["compression_ratio"] > 1.4  # int8 Linear weights; embeddings stay fp32
    if technique == "quantize_embeddings":
        assert cosine > 0.99 and metrics["compression_ratio"] > 3.5  # the word embeddings are half the weights
    if technique == "prune_ffn":  # a quarter of each feed-forward block's 1536 neurons removed, for real
        shapes = logged.data.tags["slimlab.prune.shapes"]
        assert shapes.count("intermediate.dense:(1152, 384)") == 6 and "output.dense:(384, 1152)" in shapes
        assert metrics["param_count"] == 22_565_376 - 6 * (384 * 384 + 384 + 384 * 384)  # weights in and out, biases
    if technique == "place":
        assert cosine > 0.98 and metrics["compression_ratio"] > 1.9  # bf16 weights
    if technique == "distill":
        assert metrics["param_count"] == 17_241_984  # 3 of 6 layers
        assert logged.data.tags["slimlab.distill.loss"] == "mse"
        assert metrics["teacher_cosine_to_baseline"] == pytest.approx(1.0)
