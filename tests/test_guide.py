"""docs/own-model.md, followed word for word in a directory of the user's own, outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.test_tutorial import tutorial_script

GUIDE = REPO / "docs" / "own-model.md"
RUN_LINE = re.compile(
    r"^(\w+) \| (.+?) \| accuracy ([\d.]+) \| baseline ([\d.]+) \((\d+) bytes\) \| (\S+) \((\w+)\)$", re.M
)


def test_the_guide_writes_its_files_and_runs_its_commands():
    script = tutorial_script(GUIDE)
    for expected in ("cat > nets.py", "cat > conf/model/tiny_net.yaml", "slimlab run -m", "python in_python.py"):
        assert expected in script


@pytest.mark.slow
def test_following_the_guide_word_for_word(tmp_path):
    work = tmp_path / "my project"  # the user's own directory, with a space in its name
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "SLIMLAB_CONFIG_PATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # slimlab and python of this suite
    result = subprocess.run(
        ["bash", "-c", tutorial_script(GUIDE)], cwd=work, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "sweep: 3 finished, 0 failed, 0 skipped of 3 jobs" in result.stdout

    runs = RUN_LINE.findall(result.stdout)
    # runs.py printed twice: 5 runs (compress, distil, 3 sweep jobs), then those, the checkpoint's, the Hugging Face
    # model's and the edited one
    first, second = runs[:5], runs[5:]
    assert len(first) == 5 and len(second) == 8, result.stdout[-3000:]
    assert all(status == "FINISHED" for status, *_ in second)
    origins = [origin for *_, origin in second]
    assert origins == ["trained", "cached", "cached", "cached", "cached", "pretrained", "trained", "trained"], origins
    names = [name for _, name, *_ in second]
    assert names[1] == "cancer_net distill(tiny_net,T=4,a=0.5)" and names[5] == "cancer_net quantize(int8-wo)"
    assert names[6] == "huggingface quantize(int8-dyn)"  # fine-tuned first: a new head on MiniLM's encoder
    assert all(float(accuracy) > 0.85 for _, _, accuracy, *_ in second)  # honest numbers of working models

    assert second[5][5] != second[0][5]  # the checkpoint's baseline is its own (its content is in the key)
    edited = second[-1]
    assert edited[-1] == "trained" and edited[-2] != first[0][-2]  # another baseline, trained again
    assert int(edited[4]) < int(first[0][4])  # 16 hidden units instead of 64: a smaller file

    in_python = re.search(r"^accuracy ([\d.]+) -> ([\d.]+), run (\w+)$", result.stdout, re.M)
    assert in_python and float(in_python[1]) > 0.85, result.stdout[-2000:]  # the checkpoint's weights, compressed

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert client.get_run(in_python[3]).info.run_name == "CancerNet prune(0.8)+quantize(int8-wo)"

    experiment = client.get_experiment_by_name("slimlab")
    parents = client.search_runs([experiment.experiment_id], "tags.`slimlab.sweep` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
