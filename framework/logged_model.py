"""The compressed model as an MLflow model: ``mlflow.pytorch.log_model``, loadable with ``mlflow.pytorch.load_model``.

This is the model to deploy, beside the run's measured artifact (``model/model.pt``, the file whose bytes are
``size_bytes``). Each technique declares the ``serialization_format`` its output needs (``pt2``: torch.export,
loads without slimlab; ``pickle``: any module, e.g. ``torch.ao`` quantized ones). A pipeline whose model
torch.export cannot trace falls back to ``pickle``, and the run's ``slimlab.model_format`` tag says why.
"""

from __future__ import annotations

import copy
import logging
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from framework.context import RunContext

NAME = "model"  # the logged model's name: runs:/<run id>/model
EXAMPLE_ROWS = 2  # rows of the input example stored with the model
LOAD_NOTE = {"before_loading": "import torchao  # registers the quantized ops this graph calls"}  # in MLmodel
log = logging.getLogger("slimlab")


def log_compressed_model(uri: str, run_id: str, ctx: RunContext) -> str:
    """Log ``ctx.model`` to run ``run_id`` in store ``uri``; return the model's URI (``models:/<id>``)."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from framework.artifact import deployable
    from framework.registry import serialization_format

    model = _on_cpu(deployable(ctx.model))
    example = ctx.data.example_batch(EXAMPLE_ROWS).cpu()
    with torch.inference_mode():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy())
    fmt = serialization_format(ctx.steps)

    def log_as(fmt: str):
        # log_model takes its store and experiment from the active run: resume ours for the call
        with _use_tracking_uri(uri), mlflow.start_run(run_id=run_id):
            return mlflow.pytorch.log_model(
                model,
                name=NAME,
                serialization_format=fmt,
                signature=signature,
                input_example=example.numpy(),
                pip_requirements=requirements(model, fmt),  # inferring them loads the model in a subprocess
                metadata=LOAD_NOTE if fmt == "pt2" and uses_quantized_ops(model) else None,
            )

    try:
        info = log_as(fmt)
    except Exception as error:
        if fmt == "pickle":
            raise
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"[:300]
        log.warning("torch.export cannot trace this model (%s); logging it as pickle", reason)
        fmt = f"pickle (pt2 failed: {reason})"
        info = log_as("pickle")
    ctx.tags["slimlab.model_format"] = fmt
    ctx.tags["slimlab.model_uri"] = info.model_uri
    return info.model_uri


def requirements(model: nn.Module, fmt: str) -> list[str]:
    """Pinned distributions the model needs where it is loaded: torch, and what its classes and ops come from.

    ``pt2`` holds a traced graph: the tensor classes (torchao's) and the graph's quantized ops (registered by
    torchao) matter. ``pickle`` also needs the module classes (slimlab's models, a plugin's layers).
    """
    classes = {type(t) for t in [*model.parameters(), *model.buffers()]}
    if fmt == "pickle":
        classes |= {type(m) for m in model.modules()}
    packages = {"torch"} | {cls.__module__.split(".")[0] for cls in classes}
    if uses_quantized_ops(model):
        packages.add("torchao")
    by_package = metadata.packages_distributions()
    dists = {dist for package in packages for dist in by_package.get(package, [])}
    # a local label (2.13.0+cpu) names a build no index serves
    return sorted(f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in dists)


def uses_quantized_ops(model: nn.Module) -> bool:
    """A pt2e graph calls ``quantized_decomposed`` ops: torch.export.load needs them registered (import torchao)."""
    graph = getattr(model, "graph", None)
    return graph is not None and any(str(node.target).startswith("quantized_decomposed.") for node in graph.nodes)


def _on_cpu(model: nn.Module) -> nn.Module:
    """The model as it is, or a CPU copy: the input example and the loaded model live on the CPU."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()
