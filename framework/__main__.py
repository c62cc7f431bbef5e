"""``python -m slimlab`` is ``slimlab``."""

from slimlab.cli import entry

entry()
