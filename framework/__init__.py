"""slimlab's public API for plugin authors: ``from framework import hookimpl``.

What plugins may import from ``framework`` is ``__all__``, pinned by a test. ``API_VERSION`` is the
version of the hooks (``framework/hookspecs.py``): a plugin states the versions it works with as a PEP 440
specifier in a module attribute, ``SLIMLAB_API = ">=1,<2"``, and is refused, with that reason, by a
slimlab whose hook API does not match.
"""

import pluggy

PROJECT = "slimlab"  # pluggy project name and entry-point group: one word to learn
API_VERSION = "2.0"  # the hook API: major when a hook changes incompatibly, minor when one gains an option

hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

from framework.context import RunContext  # noqa: E402
from framework.errors import ConfigError  # noqa: E402

__all__ = ["API_VERSION", "PROJECT", "ConfigError", "RunContext", "hookimpl", "hookspec"]
