"""docs/plugins.md, followed word for word in a fresh virtual environment: its files written, its commands run.

The fresh environment gets slimlab installed with pip (``--no-deps``) and sees slimlab's dependencies
(torch and the rest, already installed for this suite) through a path file, so the test does not
download gigabytes; everything the tutorial does, it does there, with that environment's pip.
"""

from __future__ import annotations

import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

import slimlab.hookspecs as hookspecs
from tests.conftest import REPO, venv_seeing

TUTORIAL = REPO / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def tutorial_script(document: Path = TUTORIAL) -> str:
    """A bash script: each ``$ command`` of a console block, each file block written where it appears."""
    lines = ["set -euo pipefail"]
    for language, body in FENCE.findall(document.read_text()):
        first = body.splitlines()[0] if body.strip() else ""
        if language == "console":
            lines += [line[2:] for line in body.splitlines() if line.startswith("$ ")]
        elif language in ("python", "toml", "yaml") and first.startswith("# ") and "." in first:
            path = first[2:].strip()
            lines += [f"mkdir -p $(dirname {path})", f"cat > {path} <<'SLIMLAB_EOF'", body.rstrip("\n"), "SLIMLAB_EOF"]
    return "\n".join(lines) + "\n"


def test_the_tutorial_has_files_and_commands():
    script = tutorial_script()
    for expected in ("cat > slimlab_zero_small.py", "cat > pyproject.toml", "pip install", "slimlab run -m"):
        assert expected in script


def test_every_hook_is_in_the_reference():
    text = TUTORIAL.read_text()
    for name in hookspecs.hook_names():
        assert re.search(rf"^### {name}\(", text, re.M), f"docs/plugins.md: no reference entry for hook {name}"


def fresh_environment(root: Path) -> dict[str, str]:
    """A new venv with slimlab pip-installed and its dependencies visible (this suite's site-packages minus
    slimlab itself): the dependencies, not the package."""
    entries = Path(sysconfig.get_paths()["purelib"]).iterdir()
    return venv_seeing(
        root, [e.name for e in entries if "slimlab" not in e.name and e.name not in ("pip", "setuptools")]
    )


@pytest.mark.slow
def test_following_the_tutorial_word_for_word_gives_a_working_plugin(tmp_path):
    env = fresh_environment(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        ["bash", "-c", tutorial_script()], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "zero_small  (slimlab-zero-small 0.1.0, slimlab_zero_small)  [loaded]" in result.stdout
    assert "sweep: 2 finished, 0 failed, 0 skipped of 2 jobs" in result.stdout
    assert re.search(r"\b8 passed\b", result.stdout), result.stdout[-2000:]  # the conformance contract
    plugin_files = work / "slimlab-zero-small"
    assert (plugin_files / "slimlab_zero_small.py").exists() and (plugin_files / "mlflow.db").exists()
    # the sweep fine-tuned with keep_zeros: every weight the technique zeroed is still zero in the model it logged
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{plugin_files / 'mlflow.db'}")
    swept = [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` != ''")
    ]
    assert len(swept) == 2, [run.info.run_name for run in swept]
    for run in swept:
        metrics = run.data.metrics
        assert "fine_tune_epochs=1" in run.info.run_name, run.info.run_name
        assert metrics["nonzero_param_count"] <= metrics["param_count"] - metrics["zeroed_weights"], metrics
