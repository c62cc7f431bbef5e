"""``python -m framework`` is ``slimlab``."""

from framework.cli import entry

entry()
