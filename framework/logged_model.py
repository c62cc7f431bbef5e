"""The compressed model as an MLflow model: ``mlflow.pytorch``'s, loadable with ``mlflow.pytorch.load_model``, and
with ``mlflow.pyfunc.load_model`` or ``mlflow models serve`` with MLflow alone.

This is the model to deploy, beside the run's measured artifact (``model.pt``, the file whose bytes are
``size_bytes``). Each technique declares the ``serialization_format`` its output needs (``pt2``: torch.export,
loads without slimlab; ``pickle``: any module, e.g. ``torch.ao`` quantized ones). A pipeline whose model
cannot be saved in the declared format (torch.export cannot trace it; a pt2e graph cannot be pickled) is logged
in the other one, and the run's ``slimlab.model_format`` tag says why.

Its pyfunc loader is ``slimlab_pyfunc`` (shipped in the model): it imports what a graph needs before loading it
(torchao for a pt2e graph, which fails to load with ``SerializeError`` otherwise). The logged model's
description (the UI's) says what it is and gives the one-liners that load and serve it.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch  # imported by the tracking plugin only when it logs a model
from torch import nn

if TYPE_CHECKING:
    from slimlab.context import RunContext

NAME = "model"  # the logged model's name: runs:/<run id>/model
EXAMPLE_ROWS = 2  # rows of the input example stored with the model
# in MLmodel: mlflow.pytorch.load_model needs it (mlflow.pyfunc.load_model's loader, slimlab_pyfunc, does it itself)
LOAD_NOTE = {"before_loading": "import torchao  # registers the quantized ops this graph calls"}
LOADER = Path(__file__).with_name("slimlab_pyfunc.py")  # shipped in every PyTorch model as its pyfunc loader
NOTE_TAG = "mlflow.note.content"  # a logged model's description in MLflow's UI
log = logging.getLogger("slimlab")


def log_compressed_model(uri: str, run_id: str, ctx: RunContext) -> str:
    """Log ``ctx.model`` to run ``run_id`` in store ``uri``; return the model's URI (``models:/<id>``)."""
    import mlflow
    from mlflow.models import Model, infer_signature

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
            return Model.log(
                artifact_path=None,
                name=NAME,
                flavor=PytorchFlavor(load_imports(model, fmt)),
                flavor_name="mlflow.pytorch",  # what MLflow records as the flavor (mlflow.pytorch.log_model's)
                pytorch_model=model,
                serialization_format=fmt,
                signature=signature,
                input_example=example,
                pip_requirements=requirements(model, fmt),  # inferring them loads the model in a subprocess
                metadata=LOAD_NOTE if fmt == "pt2" and uses_quantized_ops(model) else None,
            )

    fmt = used = declared
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
        fmt, used = f"{other} ({declared} failed: {reason})", other
        info = log_as(other)
    ctx.tags["slimlab.model_format"] = fmt
    ctx.tags["slimlab.model_uri"] = info.model_uri
    describe(uri, info, ctx, fmt, requirements(model, used), load_imports(model, used))
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
    needs = [f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in ("onnx", "onnxruntime")]
    with using_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            model.slimlab_onnx_model(),
            name=NAME,
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=needs,
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],  # its default lists CUDA first, and warns without
        )
    ctx.tags["slimlab.model_format"] = "onnx"
    ctx.tags["slimlab.model_uri"] = info.model_uri
    describe(uri, info, ctx, "onnx", needs, [])
    return info.model_uri


class PytorchFlavor:
    """``mlflow.pytorch`` as ``Model.log`` calls a flavor, with ``slimlab_pyfunc`` as the pyfunc loader.

    The model directory is ``mlflow.pytorch``'s (``mlflow.pytorch.load_model`` loads it as before), plus
    ``code/slimlab_pyfunc.py``, which the ``python_function`` flavor names: it imports ``imports`` (torchao for
    a pt2e graph) before loading, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need MLflow alone.
    MLflow's own pyfunc flavor imports nothing first, and is left out for a pt2 graph with several inputs.
    """

    def __init__(self, imports: list[str]) -> None:
        self.imports = imports

    def save_model(self, path: str, mlflow_model: Any, **kwargs: Any) -> None:
        import mlflow.pytorch
        from mlflow import pyfunc

        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, code_paths=[str(LOADER)], **kwargs)
        saved = mlflow_model.flavors["pytorch"]
        pyfunc.add_to_model(
            mlflow_model,
            loader_module=LOADER.stem,
            data=saved["model_data"],
            code=saved["code"],
            conda_env="conda.yaml",  # the environment files mlflow.pytorch.save_model wrote
            python_env="python_env.yaml",
            model_config={"device": None},  # as mlflow.pytorch's: the loader picks cuda if there is one
            imports=self.imports,
        )
        mlflow_model.save(os.path.join(path, "MLmodel"))


def describe(uri: str, info: Any, ctx: RunContext, fmt: str, needs: list[str], imports: list[str]) -> None:
    """Set the logged model's description (what MLflow's UI shows on its page): what it is and how to load it."""
    from mlflow import MlflowClient

    MlflowClient(uri).set_logged_model_tags(info.model_id, {NOTE_TAG: description(uri, info, ctx, fmt, needs, imports)})


def description(uri: str, info: Any, ctx: RunContext, fmt: str, needs: list[str], imports: list[str]) -> str:
    """Markdown: the run and technique chain, the format, and the one-liners that load and serve the model."""
    import shlex

    chain = " -> ".join(step.describe() for step in ctx.steps) or "none (the baseline)"
    kind = fmt.split(" ")[0]  # "pickle (pt2 failed: ...)" is a pickle
    if kind == "onnx":
        saved = "an ONNX graph, run by ONNX Runtime"
        native = f'`mlflow.onnx.load_model("{info.model_uri}")` gives the ONNX model.'
    elif kind == "pt2":
        saved = "a torch.export graph (pt2)"
        if imports:
            saved += f" that needs `import {', '.join(imports)}` first (slimlab's pyfunc loader does it)"
        first = f"`import {', '.join(imports)}`, then " if imports else ""
        native = f'In PyTorch: {first}`mlflow.pytorch.load_model("{info.model_uri}")` gives a GraphModule.'
    else:
        saved = f"a pickled module ({fmt}): loading it imports its classes, which must be installed"
        native = f'In PyTorch: `mlflow.pytorch.load_model("{info.model_uri}")` gives the module.'
    where = "with MLflow, where its classes' packages are installed" if kind == "pickle" else "with MLflow alone"
    env = f"MLFLOW_TRACKING_URI={shlex.quote(_without_password(uri))}"
    code = f'import mlflow, numpy as np; print(mlflow.pyfunc.load_model("{info.model_uri}").predict({_zeros(info)}))'
    return "\n".join([
        f"**{ctx.run_name}**: the compressed model of slimlab run `{info.run_id}`.",
        "",
        f"Techniques: {chain}. Saved as {saved}. Needs {', '.join(needs)} (its requirements.txt).",
        "",
        f"Load it and predict {where} (a batch of zeros of the signature's shape):",
        "",
        "```",
        f"{env} python -c {shlex.quote(code)}",
        "```",
        "",
        f"Serve it: `{env} mlflow models serve -m {info.model_uri} --env-manager local`, then POST "
        '`{"inputs": ...}` to `/invocations`.',
        "",
        native,
    ])  # fmt: skip


def _zeros(info: Any) -> str:
    """Python for an input of the model's signature: zeros, one row, as numpy arrays (a dict of them if named)."""
    specs = info.signature.inputs.inputs

    def array(spec: Any) -> str:
        shape = tuple(1 if size == -1 else size for size in spec.shape)
        return f"np.zeros({shape}, np.{spec.type.name})"

    if len(specs) == 1 and not specs[0].name:
        return array(specs[0])
    return "{" + ", ".join(f'"{spec.name}": {array(spec)}' for spec in specs) + "}"


def _without_password(uri: str) -> str:
    """``uri`` for display: a server's password (``postgresql://user:secret@host/db``) is not a description's."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":<password>@", 1)))


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for a fluent call, then restored, ``$MLFLOW_TRACKING_URI`` too.

    MLflow's public API only: ``set_tracking_uri`` also sets the variable (and ``None`` unsets both), so the
    variable is put back by hand. A URI set in this process is restored where it differs from the variable;
    otherwise the variable (or MLflow's default) goes on deciding, as before.
    """
    import mlflow

    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    current = mlflow.get_tracking_uri()
    previous = current if mlflow.is_tracking_uri_set() and current != from_env else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
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


def needed_packages(model: nn.Module, fmt: str) -> set[str]:
    """Top-level packages the model needs where it is loaded: torch, and what its classes and ops come from.

    ``pt2`` holds a traced graph: the tensor classes (torchao's) and the graph's quantized ops (registered by
    torchao) matter. ``pickle`` also needs the module classes (slimlab's models, a plugin's layers).
    """
    classes = {type(t) for t in [*model.parameters(), *model.buffers()]}
    if fmt == "pickle":
        classes |= {type(m) for m in model.modules()}
    packages = {"torch"} | {cls.__module__.split(".")[0] for cls in classes}
    if uses_quantized_ops(model):
        packages.add("torchao")
    return packages


def load_imports(model: nn.Module, fmt: str) -> list[str]:
    """What the pyfunc loader imports before loading the model: a pt2 graph's packages besides torch (torchao
    registers the ops of a pt2e graph). Unpickling imports a pickled module's classes by itself."""
    return sorted(needed_packages(model, fmt) - {"torch", "builtins"}) if fmt == "pt2" else []


def requirements(model: nn.Module, fmt: str) -> list[str]:
    """Pinned distributions of :func:`needed_packages`: what ``requirements.txt`` lists for the model."""
    packages = needed_packages(model, fmt)
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
