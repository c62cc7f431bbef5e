"""What determines a result, as a hash: the config, the code of the callables it names, the files it reads,
and the versions of the libraries that ran it.

The baseline cache and sweep resume key on these, so that editing a model's code, a data function or
overwriting a checkpoint at the same path is never answered with a stale result:

- code: the module of every ``_target_`` in the model and data configs. Code installed in site-packages (a
  library: torch, transformers, a plugin's wheel) counts by its distribution's name, version and RECORD (the
  sha256 of each installed file); local code (the user's own files, an editable checkout) by the content of
  its source files: every ``.py`` file of its top-level package, or for a top-level module every ``.py`` file
  beside it, and every local module it reaches through its imports (a helper package in another folder;
  reached through the classes and functions it imports, or the module itself, not through a bare constant).
- files: every config value that names an existing file or directory. A file counts by its content
  (``sha256``) up to ``HASHED_FILE_LIMIT`` bytes, above that by size and modification time; a directory by
  the relative path, size and modification time of each file in it. ``model.checkpoint`` always counts by
  its content.
- versions: torch and slimlab (and, for a run, every loaded plugin's distribution).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sys
import sysconfig
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

HASHED_FILE_LIMIT = 256 * 2**20  # files above this count by size and mtime: hashing a dataset per run is too slow


def _library_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    return [Path(root).resolve() for root in roots]


def _is_installed(path: Path) -> bool:
    """Whether a source file belongs to the standard library or an installed distribution."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in _library_roots()) or "site-packages" in resolved.parts


def file_digest(path: Path, always_content: bool = False) -> str:
    """sha256 of a file's content; above HASHED_FILE_LIMIT (unless ``always_content``) its size and mtime."""
    stat = path.stat()
    if stat.st_size > HASHED_FILE_LIMIT and not always_content:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def path_digest(path: Path) -> str:
    """A file by :func:`file_digest`; a directory by each file's relative path, size and mtime."""
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _distribution_versions(top_level: str) -> list[str]:
    """``name==version record-sha`` of the distributions that install ``top_level``: the RECORD file lists every
    installed file's sha256, so reinstalling changed code under the same version changes it too."""
    found = []
    for name in _distributions().get(top_level, []):
        record = metadata.distribution(name).read_text("RECORD") or ""
        found.append(f"{name}=={metadata.version(name)} {hashlib.sha256(record.encode()).hexdigest()[:12]}")
    return sorted(found)


def _local_modules(module_name: str) -> list[Path]:
    """The source files of the local (not installed) modules that ``module_name`` reaches through its globals:
    what it imports, and what those import, so a helper module in another folder counts too."""
    try:
        root = importlib.import_module(module_name)
    except Exception:  # not importable here: the plan reports it; the identity keeps what it has
        return []
    seen: dict[str, Path] = {}
    stack = [root]
    while stack:
        module = stack.pop()
        for value in list(vars(module).values()):
            if isinstance(value, ModuleType):
                found = value
            else:
                try:
                    found = sys.modules.get(getattr(value, "__module__", None) or "")
                except Exception:  # an object whose attributes raise
                    continue
            file = getattr(found, "__file__", None) if found is not None else None
            if not file or found.__name__ in seen or _is_installed(Path(file)) or not file.endswith(".py"):
                continue
            seen[found.__name__] = Path(file)
            stack.append(found)
    return list(seen.values())


def module_digest(module_name: str) -> str:
    """What a module's code is: distribution versions if installed, else a hash of the local source files."""
    top_level = module_name.split(".")[0]
    spec = importlib.util.find_spec(top_level)
    if spec is None:
        return f"{module_name}: not importable"
    locations = list(spec.submodule_search_locations or [])
    origin = Path(spec.origin) if spec.origin and spec.origin not in ("built-in", "frozen") else None
    files: list[Path]
    if locations:  # a package: all of its source, and its subpackages mapped from elsewhere (slimlab.plugins)
        roots = [Path(location) for location in locations]
        own = importlib.util.find_spec(module_name) if module_name != top_level else None
        if own is not None and own.origin and not any(Path(own.origin).is_relative_to(r) for r in roots):
            roots.append(Path(own.origin).parent)
        files = sorted(p for root in roots for p in root.rglob("*.py"))
    elif origin is not None:  # a top-level module: it and the modules beside it, which it may import
        files = sorted(origin.parent.glob("*.py"))
    else:
        return f"{top_level}: built-in, python {sys.version.split()[0]}"
    if files and all(_is_installed(f) for f in files):
        versions = _distribution_versions(top_level)
        if versions:
            return f"{top_level}: {', '.join(versions)}"
    files = sorted({*files, *_local_modules(module_name)})
    digest = hashlib.sha256()
    for file in files:
        if "__pycache__" not in file.parts:
            digest.update(str(file).encode() + b"\0" + file.read_bytes())
    return f"{top_level}: source {digest.hexdigest()[:16]}"


def _targets(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str):
            yield target
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def _paths(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "_target_":
                yield from _paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _paths(value)
    elif isinstance(node, str) and node.strip(".") and Path(node).expanduser().exists():
        yield node


def _module_of(target: str) -> str:
    """The importable module a dotted ``_target_`` lives in (``pkg.mod.Class.method`` -> ``pkg.mod``)."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return parts[0]


def fingerprint(nodes: dict[str, Any], checkpoint: str | None = None) -> dict[str, Any]:
    """The code, files and versions behind config ``nodes`` (plain containers), as a JSON-able dict."""
    import torch

    from slimlab import PROJECT

    targets = sorted({_module_of(t) for t in _targets(nodes)} | {PROJECT})
    files = sorted(set(_paths(nodes)) - {checkpoint})
    found: dict[str, Any] = {
        "code": [module_digest(name) for name in targets],
        "files": {path: path_digest(Path(path).expanduser()) for path in files},
        "torch": torch.__version__,
        PROJECT: _version(PROJECT),
    }
    if checkpoint:
        found["checkpoint"] = file_digest(Path(checkpoint).expanduser(), always_content=True)
    return found


# Libraries the built-in techniques compute with: a new version can change a run's size, speed or fidelity.
RUNTIMES = ("torchao", "onnxruntime", "onnx", "onnxscript", "torch-pruning", "transformers", "accelerate")


def techniques_fingerprint(nodes: Any) -> dict[str, Any]:
    """The code behind the techniques' options (a torchao config's ``_target_``) and the runtime libraries'
    versions: what a run's result depends on beyond its config and its baseline."""
    return {
        "code": [module_digest(name) for name in sorted({_module_of(t) for t in _targets(nodes)})],
        "runtimes": {name: _version(name) for name in RUNTIMES},
    }


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
