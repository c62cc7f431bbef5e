"""slimlab's public API for plugin authors: ``from framework import hookimpl``."""

import pluggy

PROJECT = "slimlab"  # pluggy project name and entry-point group: one word to learn

hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

from framework.context import RunContext  # noqa: E402
from framework.errors import ConfigError  # noqa: E402

__all__ = ["PROJECT", "ConfigError", "RunContext", "hookimpl", "hookspec"]
