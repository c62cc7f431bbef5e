"""Optional parts of slimlab and the extras that install them: a missing one is bad input naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from slimlab.errors import ConfigError


def require(module: str, extra: str, what: str) -> ModuleType:
    """``module`` imported, or a ``ConfigError`` saying that ``what`` needs ``pip install 'slimlab[<extra>]'``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but broken inside: its own error is the message
        raise ConfigError(
            f"{what} needs the Python package {module!r}, which is not installed: pip install 'slimlab[{extra}]' "
            "(make install installs every extra)"
        ) from None
