"""Progress for long work: a rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("slimlab")


def progress(items: Iterable[T], description: str, total: int) -> Iterator[T]:
    """Yield ``items`` while showing progress (``total`` steps)."""
    if sys.stderr.isatty():
        from rich.progress import track

        yield from track(items, description=description, total=total, transient=True)
        return
    for index, item in enumerate(items, 1):
        yield item
        log.info("%s: %d/%d", description, index, total)
