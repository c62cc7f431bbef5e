"""The compressed model as an MLflow model: ``mlflow.pytorch.log_model``, loadable with ``mlflow.pytorch.load_model``.

This is the model to deploy, beside the run's measured artifact (``model.pt``, the file whose bytes are
``size_bytes``). Each technique declares the ``serialization_format`` its output needs (``pt2``: torch.export,
loads without slimlab; ``pickle``: any module, e.g. ``torch.ao`` quantized ones). A pipeline whose model
cannot be saved in the declared format (torch.export cannot trace it; a pt2e graph cannot be pickled) is logged
in the other one, and the run's ``slimlab.model_format`` tag says why.

A model deployed in ONNX Runtime (``technique=[...,onnx]``: a module with ``slimlab_onnx_model()``) is logged
with ``mlflow.onnx.log_model`` instead (format ``onnx``), loadable with ``mlflow.onnx.load_model`` or as a
pyfunc; its ``.onnx`` file is the same bytes as the measured artifact.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import traceback
from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING

import torch  # imported by the tracking plugin only when it logs a model
from torch import nn

if TYPE_CHECKING:
    from slimlab.context import RunContext

NAME = "model"  # the logged model's name: runs:/<run id>/model
EXAMPLE_ROWS = 2  # rows of the input example stored with the model
LOAD_NOTE = {"before_loading": "import torchao  # registers the quantized ops this graph calls"}  # in MLmodel
log = logging.getLogger("slimlab")


def log_compressed_model(uri: str, run_id: str, ctx: RunContext) -> str:
    """Log ``ctx.model`` to run ``run_id`` in store ``uri``; return the model's URI (``models:/<id>``)."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from slimlab import batches
    from slimlab.artifact import deployable
    from slimlab.registry import serialization_format

    if callable(getattr(deployable(ctx.model), "slimlab_onnx_model", None)):
        return log_onnx_model(uri, run_id, ctx)
    inputs = batches.to_device(ctx.example_inputs(EXAMPLE_ROWS), "cpu")
    model = tensor_interface(portable(ctx.model), inputs)
    args = batches.as_args(inputs)[0] if not isinstance(inputs, dict) else tuple(inputs.values())
    with torch.inference_mode():
        output = model(*args)
    named = dict(inputs) if isinstance(inputs, dict) else None
    signature = infer_signature(
        {k: v.numpy() for k, v in named.items()} if named else args[0].numpy() if len(args) == 1 else
        {f"input_{i}": a.numpy() for i, a in enumerate(args)},
        output.numpy(),
    )  # fmt: skip
    example = args[0].numpy() if len(args) == 1 else tuple(a.numpy() for a in args)
    declared = serialization_format(ctx.steps)

    def log_as(fmt: str):
        # log_model takes its store and experiment from the active run: resume ours for the call
        with using_tracking_uri(uri), mlflow.start_run(run_id=run_id):
            return mlflow.pytorch.log_model(
                model,
                name=NAME,
                serialization_format=fmt,
                signature=signature,
                input_example=example,
                pip_requirements=requirements(model, fmt),  # inferring them loads the model in a subprocess
                metadata=LOAD_NOTE if fmt == "pt2" and uses_quantized_ops(model) else None,
            )

    fmt = declared
    try:
        info = log_as(declared)
    except Exception as error:
        if not _failed_to_serialize(error):  # the store, the network, the caller's own run: not the format
            raise
        with using_tracking_uri(uri):  # MLflow recorded the model before serializing failed: keep only one
            failed = mlflow.last_logged_model()
        if failed is not None and failed.source_run_id == run_id and str(failed.status) != "READY":
            mlflow.MlflowClient(uri).delete_logged_model(failed.model_id)
        other = "pickle" if declared == "pt2" else "pt2"
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"[:300]
        log.warning("the model cannot be saved as %s (%s); logging it as %s", declared, reason, other)
        fmt = f"{other} ({declared} failed: {reason})"
        info = log_as(other)
    ctx.tags["slimlab.model_format"] = fmt
    ctx.tags["slimlab.model_uri"] = info.model_uri
    return info.model_uri


def log_onnx_model(uri: str, run_id: str, ctx: RunContext) -> str:
    """Log ``ctx.model``, an ONNX Runtime module, with ``mlflow.onnx.log_model``; return the model's URI.

    Its inputs are the ONNX graph's, by name (one input: an array), as ``mlflow.onnx``'s pyfunc takes them;
    the model is one file (no external data: the measured artifact's bytes).
    """
    import mlflow.onnx
    from mlflow.models import infer_signature

    from slimlab import batches
    from slimlab.artifact import deployable

    model = deployable(ctx.model)
    inputs = batches.to_device(ctx.example_inputs(EXAMPLE_ROWS), "cpu")
    values = list(inputs.values()) if isinstance(inputs, dict) else batches.as_args(inputs)[0]
    arrays = {name: value.numpy() for name, value in zip(model.names, values, strict=True)}
    with torch.inference_mode():
        output = batches.call(model, inputs).numpy()
    example = next(iter(arrays.values())) if len(arrays) == 1 else arrays
    dists = ("onnx", "onnxruntime")
    with using_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            model.slimlab_onnx_model(),
            name=NAME,
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=[f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in dists],
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],  # its default lists CUDA first, and warns without
        )
    ctx.tags["slimlab.model_format"] = "onnx"
    ctx.tags["slimlab.model_uri"] = info.model_uri
    return info.model_uri


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for a fluent call, then restored, ``$MLFLOW_TRACKING_URI`` too.

    (MLflow's own ``_use_tracking_uri`` restores its module global and unsets the variable it came from.)
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if from_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = from_env


def _failed_to_serialize(error: BaseException) -> bool:
    """Did ``error`` come from saving the module (torch.export tracing, pickling), not from MLflow's store?"""
    frames = traceback.extract_tb(error.__traceback__)
    innermost = frames[-1].filename if frames else ""
    return any(part in innermost for part in (f"{os.sep}torch{os.sep}", "cloudpickle", f"{os.sep}pickle.py"))


def installed_distributions() -> dict[str, list[str]]:
    """Top-level import names -> the installed distributions that provide them.

    MLflow's own map (``mlflow.utils.requirements_utils``), built once per process: ``log_model`` builds it anyway
    to check the requirements it is given, and building it reads every installed distribution's file list (a
    quarter of a second; the standard library's ``packages_distributions`` takes twice that).
    """
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()
        found = requirements_utils._MODULES_TO_PACKAGES
        if isinstance(found, dict):
            return found
    except Exception as error:  # a private MLflow API: the standard library's map, slower but the same
        log.debug("MLflow's map of distributions is not available (%s): building one", error)
    return metadata.packages_distributions()


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
    by_package = installed_distributions()
    dists = {dist for package in packages for dist in by_package.get(package, [])}
    # a local label (2.13.0+cpu) names a build no index serves
    return sorted(f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in dists)


def uses_quantized_ops(model: nn.Module) -> bool:
    """A pt2e graph calls ``quantized_decomposed`` ops: torch.export.load needs them registered (import torchao)."""
    graph = getattr(model, "graph", None)
    return graph is not None and any(str(node.target).startswith("quantized_decomposed.") for node in graph.nodes)


def portable(model: nn.Module) -> nn.Module:
    """The deployed model as one CPU module that takes and returns what the run's data has, like the run's model.

    A placed model (``plugins/place.py``) runs its inner module on other devices, offloaded or in half
    precision, behind a wrapper that moves and casts inputs. The portable form is that inner module on the CPU,
    without accelerate's hooks, its offloaded weights read back, and, when its weights are not float32, a cast
    at each end, so that the logged model has the run's float32 signature.
    """
    from slimlab.artifact import deployable

    inner = deployable(model)
    tensors = [*inner.parameters(), *inner.buffers()]
    hooked = any(hasattr(m, "_hf_hook") for m in inner.modules())  # accelerate's dispatch or offload hooks
    if hooked or any(t.device.type != "cpu" for t in tensors):
        state = {name: value.cpu() for name, value in inner.state_dict().items()}  # offloaded ones read back
        inner = copy.deepcopy(inner)
        if hooked:
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(inner, recurse=True)
        inner = inner.to_empty(device="cpu")
        inner.load_state_dict(state)
    return inner


def tensor_interface(model: nn.Module, inputs: object) -> nn.Module:
    """``model`` as MLflow serves models: positional float32 tensors in, one float32 tensor out.

    A model that takes a dict (Hugging Face) or returns an output object is called through an adapter whose
    positional inputs are the dict's values in order; a model whose weights are not float32 (bfloat16,
    float16) gets a cast at each end. A model that already takes and returns float32 tensors is itself.
    """
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    names = list(inputs) if isinstance(inputs, dict) else None
    if dtype == torch.float32 and isinstance(inputs, torch.Tensor):
        with torch.inference_mode():
            if isinstance(model(inputs), torch.Tensor):
                return model
    count = 1 if isinstance(inputs, torch.Tensor) else len(inputs)
    return FIXED_ARITY.get(count, MultiInputInterface)(model, names, dtype)


class TensorInterface(nn.Module):
    """``inner`` called with one tensor cast to its dtype; its output read as one tensor (``logits`` of a Hugging
    Face output) in float32. One named input: torch.export (MLflow's pt2) traces it."""

    def __init__(self, inner: nn.Module, names: list[str] | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.names, self.dtype = inner, names, dtype

    def _call(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        from slimlab.batches import call

        cast = [t.to(self.dtype) if t.is_floating_point() else t for t in tensors]
        inputs = dict(zip(self.names, cast, strict=True)) if self.names else cast[0] if len(cast) == 1 else tuple(cast)
        return call(self.inner, inputs).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call((x,))


# torch.export (MLflow's pt2) needs a forward with one parameter per input, not *args: one class per arity.
class TwoInputs(TensorInterface):
    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self._call((first, second))


class ThreeInputs(TensorInterface):
    def forward(self, first: torch.Tensor, second: torch.Tensor, third: torch.Tensor) -> torch.Tensor:
        return self._call((first, second, third))


class FourInputs(TensorInterface):
    def forward(self, first: torch.Tensor, second: torch.Tensor, third: torch.Tensor, fourth: torch.Tensor):
        return self._call((first, second, third, fourth))


class MultiInputInterface(TensorInterface):
    """More inputs than the fixed-arity adapters take. MLflow's pt2 cannot export a variable number of inputs, so
    such a model is logged as pickle, with the reason in ``slimlab.model_format``."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._call(tensors)


FIXED_ARITY = {1: TensorInterface, 2: TwoInputs, 3: ThreeInputs, 4: FourInputs}
