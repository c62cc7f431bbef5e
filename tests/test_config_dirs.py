"""The user's own config directory, added three ways (--config-dir, hydra.searchpath, $SLIMLAB_CONFIG_PATH), works
in single runs, sweeps, --help, error messages and distill's student/teacher; and a model retargeted from the
command line (model._target_=...) keeps none of the selected option's constructor arguments."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from slimlab.config import CONFIG_PATH_ENV, RESERVED_MODEL_KEYS, compose
from slimlab.errors import ConfigError
from tests.conftest import slimlab

QUICK = ["train.epochs=1", "measure.repeats=5", "measure.warmup=1"]
WAYS = ["config-dir", "searchpath", "env"]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A user's config directory (a space in its name: paths are quoted where they become overrides)."""
    root = tmp_path / "my configs"
    write(
        root / "model" / "tiny_user.yaml",
        """\
        name: tiny_user
        _target_: slimlab.zoo.models.LeNet
        conv1: 4
        conv2: 8
        hidden: 16
        num_classes: 10
        """,
    )
    write(
        root / "experiment" / "user_exp.yaml",
        """\
        # @package _global_
        defaults:
          - override /model: tiny_user
          - override /technique: []
        experiment_name: user_exp
        """,
    )
    return root


def added(way: str, root: Path) -> tuple[list[str], dict[str, str]]:
    """The command-line arguments and environment that add ``root`` to the config search path ``way``."""
    if way == "config-dir":
        return ["--config-dir", str(root)], {}
    if way == "searchpath":
        return [f"hydra.searchpath=['file://{root}']"], {}
    return [], {CONFIG_PATH_ENV: str(root)}


def run(way: str, root: Path, *args: str, cwd: Path):
    extra, env = added(way, root)
    return slimlab("run", *args, *extra, cwd=cwd, env=env)


@pytest.mark.parametrize("way", WAYS)
def test_a_single_run_uses_the_users_experiment_and_model(way, user_dir, tmp_path, cache_dir):
    result = run(way, user_dir, "experiment=user_exp", "tracking=none", *QUICK, f"cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_user baseline" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_a_sweep_uses_the_users_model_in_every_job(way, user_dir, tmp_path, cache_dir):
    swept = ["-m", "model=tiny_user", "technique=[]", "seed=0,1", "tracking=none", f"cache_dir={cache_dir}"]
    result = run(way, user_dir, *swept, *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep: 2 finished, 0 failed, 0 skipped of 2 jobs" in result.stdout


@pytest.mark.parametrize("way", WAYS)
def test_help_lists_the_users_options_and_directory(way, user_dir, tmp_path):
    result = run(way, user_dir, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    listed = result.stdout.split("== Config ==")[0].splitlines()
    groups = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in listed if ": " in line}
    assert {"tiny_user", "lenet"} <= set(groups["model"])
    assert {"user_exp", "quickstart"} <= set(groups["experiment"])
    assert str(user_dir) in groups["Config directories"]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("sweep", [False, True])
def test_an_unknown_model_lists_the_users_options(way, sweep, user_dir, tmp_path, store):
    args = ["-m", "model=nope,lenet"] if sweep else ["model=nope"]
    result = run(way, user_dir, *args, f"tracking.uri={store}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("slimlab: error:")]
    assert "unknown model 'nope'" in line
    assert {"tiny_user", "lenet"} <= set(line.split("valid model options: ")[1].split(", "))
    assert not (tmp_path / "mlflow.db").exists()


def test_a_missing_directory_in_the_environment_is_bad_input(tmp_path):
    result = slimlab("run", "--cfg", "job", cwd=tmp_path, env={CONFIG_PATH_ENV: str(tmp_path / "nowhere")})
    assert result.returncode == 2
    assert f"{CONFIG_PATH_ENV}: config directory" in result.stderr and "not found" in result.stderr


def test_compose_takes_config_dirs_and_the_environment(user_dir, tmp_path, monkeypatch):
    other = tmp_path / "more"
    write(other / "model" / "other_user.yaml", "name: other_user\n_target_: slimlab.zoo.models.MLP\nhidden: 8\n")
    assert compose(["model=tiny_user"], config_dirs=[user_dir]).model.conv1 == 4
    # Merged into the overrides' own hydra.searchpath, not replacing it: both directories are searched.
    both = [f"hydra.searchpath=['file://{other}']", "model=tiny_user"]
    assert compose(both, config_dirs=[user_dir]).model.name == "tiny_user"
    assert compose([*both[:1], "model=other_user"], config_dirs=[user_dir]).model.hidden == 8
    monkeypatch.setenv(CONFIG_PATH_ENV, f"{other}{os.pathsep}{user_dir}")
    assert compose(["experiment=user_exp"]).model.name == "tiny_user"
    assert compose(["model=other_user"]).model.name == "other_user"
    with pytest.raises(ConfigError, match="config_dirs: config directory"):
        compose([], config_dirs=[tmp_path / "nowhere"])


@pytest.mark.parametrize("way", ["config_dirs", "env"])
def test_distill_takes_a_student_and_teacher_from_the_users_directory(way, user_dir, monkeypatch):
    from slimlab.plugin_manager import load_plugins
    from slimlab.runner import plan

    if way == "env":
        monkeypatch.setenv(CONFIG_PATH_ENV, str(user_dir))
    dirs = [user_dir] if way == "config_dirs" else None
    chosen = ["technique=[distill]", "technique.distill.student=tiny_user", "technique.distill.teacher=tiny_user"]
    plugins = load_plugins()
    (step,) = plan(compose(chosen, plugins, config_dirs=dirs), plugins).steps
    assert (step.config.student, step.config.teacher) == ("tiny_user", "tiny_user")

    from slimlab.plugins.distill import _model_node

    assert OmegaConf.to_container(_model_node("tiny_user"))["hidden"] == 16
    unknown = compose(["technique=[distill]", "technique.distill.student=nope"], plugins, config_dirs=dirs)
    with pytest.raises(ConfigError, match="unknown model 'nope'") as refused:
        plan(unknown, plugins)
    assert {"tiny_user", "lenet"} <= set(str(refused.value).split("valid model options: ")[1].split(", "))


@pytest.mark.parametrize("way", WAYS)
def test_the_cli_refuses_an_unknown_student_listing_the_users_models(way, user_dir, tmp_path):
    args = ["technique=[distill]", "technique.distill.student=nope", "tracking=none"]
    result = run(way, user_dir, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "technique.distill: student: unknown model 'nope'" in result.stderr
    assert "tiny_user" in result.stderr.split("valid model options: ")[1]


def test_a_run_distils_into_the_users_student(user_dir, tmp_path, cache_dir):
    args = ["technique=[distill]", "technique.distill.student=tiny_user", "technique.distill.epochs=1", "tracking=none"]
    args.append(f"cache_dir={cache_dir}")
    result = run("searchpath", user_dir, *args, *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distill(tiny_user" in result.stdout


# --- model._target_ from the command line -----------------------------------------------------------------------


def arguments(model) -> dict:
    """What the model's constructor gets: its keys but slimlab's reserved ones."""
    return {k: v for k, v in OmegaConf.to_container(model).items() if k not in RESERVED_MODEL_KEYS}


def test_a_retargeted_model_keeps_none_of_the_options_arguments(caplog):
    caplog.set_level("INFO", logger="slimlab")
    model = compose(["model._target_=slimlab.zoo.models.MLP"]).model
    assert model.name == "MLP"
    assert arguments(model) == {"_target_": "slimlab.zoo.models.MLP"}
    assert "dropped conv1, conv2, hidden, num_classes" in caplog.text


@pytest.mark.parametrize(
    "option,target", [("lenet", "model._target_"), ("lenet", "++model._target_"), ("bare", "+model._target_")]
)
def test_a_retargeted_model_keeps_the_keys_the_overrides_set(option, target, tmp_path):
    write(tmp_path / "model" / "bare.yaml", "name: bare\nhidden: 7\nwidth: 3\n")  # no _target_: set with +
    chosen = [f"model={option}", f"{target}=slimlab.zoo.models.MLP", "model.hidden=32", "+model.in_features=64"]
    model = compose([*chosen, "model.name=wide"], config_dirs=[tmp_path]).model
    assert model.name == "wide"
    assert arguments(model) == {"_target_": "slimlab.zoo.models.MLP", "hidden": 32, "in_features": 64}
    assert compose(chosen, config_dirs=[tmp_path]).model.name == "MLP"


def test_an_experiments_model_body_does_not_leak_into_a_retargeted_model(user_dir):
    model = compose(["experiment=user_exp", "model._target_=slimlab.zoo.models.MLP"], config_dirs=[user_dir]).model
    assert arguments(model) == {"_target_": "slimlab.zoo.models.MLP"} and model.name == "MLP"
    assert compose(["experiment=user_exp"], config_dirs=[user_dir]).model.conv1 == 4  # untouched without it


def test_the_reserved_keys_stay(tmp_path):
    write(
        tmp_path / "model" / "kept.yaml", "name: kept\n_target_: slimlab.zoo.models.LeNet\ncheckpoint: w.pt\nconv1: 3\n"
    )
    model = compose(["model=kept", "model._target_=slimlab.zoo.models.MLP"], config_dirs=[tmp_path]).model
    assert OmegaConf.to_container(model) == {"name": "MLP", "_target_": "slimlab.zoo.models.MLP", "checkpoint": "w.pt"}


@pytest.mark.slow
def test_runs_and_sweeps_build_a_retargeted_model_without_the_options_arguments(tmp_path, cache_dir):
    common = [
        "model._target_=slimlab.zoo.models.MLP",
        "technique=[]",
        "tracking=none",
        f"cache_dir={cache_dir}",
        *QUICK,
    ]
    single = slimlab("run", *common, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "MLP baseline" in single.stdout
    assert "dropped conv1, conv2, hidden, num_classes" in single.stdout
    swept = slimlab("run", "-m", *common, "model.hidden=16,32", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert "sweep: 2 finished, 0 failed, 0 skipped of 2 jobs" in swept.stdout
