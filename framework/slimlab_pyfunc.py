"""The pyfunc loader of the PyTorch models slimlab logs to MLflow: what ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` call, where slimlab is not installed.

``slimlab.logged_model`` ships this file in the model (``code/slimlab_pyfunc.py``) and names it as the
``loader_module`` of the ``python_function`` flavor in ``MLmodel``. It imports what the saved graph needs before
loading it (a pt2e graph calls the ``quantized_decomposed`` ops that ``import torchao`` registers: the flavor's
``imports``), loads the model as ``mlflow.pytorch`` does, and calls a model with several inputs with the arrays
of a dict, in the order of the signature's names. Standalone on purpose: it imports MLflow, numpy and torch only.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

FLAVOR = "python_function"
IMPORTS = "imports"  # the flavor's key: modules to import before loading the graph


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None, weights_only: bool = False) -> Predictor:
    """MLflow's loader protocol: ``path`` is the model's data directory (``<model>/data``)."""
    from mlflow.models import Model
    from mlflow.pytorch import _load_pyfunc as load_pytorch

    meta = Model.load(os.path.join(os.path.dirname(os.path.abspath(path)), "MLmodel"))
    for name in meta.flavors[FLAVOR].get(IMPORTS) or []:
        importlib.import_module(name)
    schema = meta.get_input_schema()
    names = schema.input_names() if schema is not None and schema.has_input_names() else []
    return Predictor(load_pytorch(path, model_config, weights_only), names)


class Predictor:
    """``mlflow.pytorch``'s pyfunc model, which takes one array (or a DataFrame), taking a dict of arrays too."""

    def __init__(self, wrapped: Any, names: list[str]) -> None:
        self.wrapped, self.names = wrapped, names

    def get_raw_model(self) -> Any:
        return self.wrapped.get_raw_model()

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        if not isinstance(data, dict):
            return self.wrapped.predict(data, params)
        import numpy as np
        import torch

        device = self.wrapped.device
        tensors = [torch.from_numpy(np.ascontiguousarray(data[name])).to(device) for name in self.names or data]
        with torch.no_grad():
            output = self.wrapped.get_raw_model()(*tensors)
        return output.cpu().numpy()
