"""slimlab's public API: ``compress`` and ``Data`` for users in Python, ``hookimpl`` and the rest for plugin authors.

What plugins may import from ``framework`` is ``__all__``, pinned by a test. ``API_VERSION`` is the
version of the hooks (``framework/hookspecs.py``): a plugin states the versions it works with as a PEP 440
specifier in a module attribute, ``SLIMLAB_API = ">=2,<3"``, and is refused, with that reason, by a
slimlab whose hook API does not match. ``compress``, ``Compressed``, ``Data`` and ``Task`` import torch, so
they load on first use: ``import framework`` alone stays light (``slimlab plugins``, ``--help``).
"""

from typing import Any

import pluggy

PROJECT = "slimlab"  # pluggy project name and entry-point group: one word to learn
API_VERSION = "2.3"  # the hook API: major when a hook changes incompatibly, minor when one gains an option

hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

from slimlab.context import RunContext  # noqa: E402
from slimlab.errors import ConfigError  # noqa: E402

__all__ = [
    "API_VERSION", "PROJECT", "Compressed", "ConfigError", "Data", "RunContext", "Task", "compress", "hookimpl",
    "hookspec",
]  # fmt: skip
_LAZY = {
    "compress": "slimlab.api",
    "Compressed": "slimlab.api",
    "Data": "slimlab.data",
    "Task": "slimlab.tasks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
