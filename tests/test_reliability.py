"""How the ``slimlab`` command ends when its surroundings fail: a closed pipe, a read-only directory."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, slimlab


def test_help_piped_into_a_reader_that_stops_ends_quietly(tmp_path):
    """``slimlab run --help | head``: the reader stops early; no BrokenPipeError traceback, exit 141.

    ``true`` stops before slimlab has started (imports take a second), so every write meets a closed pipe.
    """
    script = f"{shlex.quote(sys.executable)} -m slimlab run --help | true; echo rc=${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.stdout.splitlines() == ["rc=141"]  # 128 + SIGPIPE, as `git log | head` reports


def _read_only(directory: Path, command: str) -> subprocess.CompletedProcess:
    """``command`` run in ``directory`` made read-only by a bind mount in a private mount namespace (as root)."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here ({probe.stderr.decode().strip()}): cannot make a read-only dir")
    where = shlex.quote(str(directory))
    script = f"mount --bind -o ro {where} {where} && cd {where} && {command}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)


def test_read_only_working_directory_is_one_line_exit_2(tmp_path):
    work = tmp_path / "read-only"
    work.mkdir()
    command = f"PYTHONPATH={shlex.quote(str(REPO))} {shlex.quote(sys.executable)} -m slimlab run train.epochs=1"
    result = _read_only(work, command)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"slimlab: error: cannot write {work}/outputs: Read-only"), lines
    assert "Traceback" not in result.stderr
    assert list(work.iterdir()) == []


def test_report_in_an_empty_directory_creates_no_store(tmp_path):
    result = slimlab("report", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    missing = tmp_path / "mlflow.db"
    expected = f"slimlab: error: no tracking store at {missing}; run something first (slimlab run) or pass --uri"
    assert result.stderr.strip().splitlines() == [expected]
    assert list(tmp_path.iterdir()) == []
