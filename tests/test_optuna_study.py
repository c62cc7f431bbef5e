"""The Optuna sweeper's study is one search: a new search space gets its own study, a named study of another
search is refused, the same search resumes."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution

from hydra_plugins.slimlab_optuna_sweeper.optuna_sweeper import search, search_digest
from tests.conftest import FAST, NO_MLFLOW_MODEL, slimlab


def digest(fixed: list[str], low: float = 0.1, objectives: dict[str, str] | None = None) -> str:
    space = {"technique.prune.amount": FloatDistribution(low, 0.5)}
    return search_digest(search(space, fixed, objectives or {"accuracy": "maximize", "size_bytes": "minimize"}))


def test_a_search_is_its_space_objectives_and_the_fixed_overrides_that_shape_results():
    base = digest(["technique=[prune]", "train.epochs=2"])
    assert base == digest(["train.epochs=2", "technique=[prune]"])  # order of the overrides does not matter
    # where results go is not the search
    assert base == digest(["technique=[prune]", "train.epochs=2", "tracking.uri=sqlite:///x.db", "cache_dir=/c"])
    assert base == digest(["technique=[prune]", "train.epochs=2", "tracking=none", "resume=false"])
    assert base != digest(["technique=[prune]", "train.epochs=3"])
    assert base != digest(["technique=[prune]", "train.epochs=2"], low=0.2)
    assert base != digest(["technique=[prune]", "train.epochs=2"], objectives={"accuracy": "maximize"})
    assert base != digest(["technique=[prune]", "train.epochs=2"], objectives={"size_bytes": "minimize",
                                                                                "accuracy": "maximize"})  # fmt: skip


def studies(storage: str) -> dict[str, optuna.Study]:
    return {name: optuna.load_study(study_name=name, storage=storage) for name in optuna.get_all_study_names(storage)}


def complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
def test_another_search_space_gets_its_own_study_and_a_named_study_of_another_search_is_refused(tmp_path, cache_dir):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = [
        "-m", "hydra/sweeper=slimlab_optuna", "hydra.sweeper.n_trials=2", "technique=[prune]", *FAST,
        NO_MLFLOW_MODEL, "tracking=none", f"cache_dir={cache_dir}", "experiment_name=tests",
        f"hydra.sweeper.storage={storage}",
    ]  # fmt: skip
    low, high = "technique.prune.amount=interval(0.1, 0.4)", "technique.prune.amount=interval(0.6, 0.9)"

    first = slimlab("run", *common, low, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (name,) = studies(storage)
    assert name.startswith("tests-")
    assert studies(storage)[name].user_attrs["slimlab.search"]["search_space"] == [
        "technique.prune.amount=float[0.1, 0.4]"
    ]

    second = slimlab("run", *common, high, cwd=tmp_path)  # the same storage, another search space
    assert second.returncode == 0, second.stderr[-3000:]
    found = studies(storage)
    (other,) = set(found) - {name}
    assert other.startswith("tests-")
    assert len(complete(found[other])) == 2
    assert all(0.6 <= t.params["technique.prune.amount"] <= 0.9 for t in complete(found[other]))
    assert f"Pareto front of study {other!r}" in second.stdout

    # the first study by name, with the second search: refused in one line naming both, nothing runs
    named = slimlab("run", *common, high, f"hydra.sweeper.study_name={name}", cwd=tmp_path)
    assert named.returncode == 2, named.stderr[-3000:]
    lines = named.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimlab: error: "), named.stderr[-3000:]
    assert f"hydra.sweeper.study_name={name!r}" in lines[0]
    assert "technique.prune.amount=float[0.1, 0.4] there, technique.prune.amount=float[0.6, 0.9] here" in lines[0]
    assert len(complete(studies(storage)[name])) == 2

    # the same search again resumes its study (where results go is not the search): nothing left to run
    moved = [f"cache_dir={tmp_path / 'cache'}" if arg.startswith("cache_dir=") else arg for arg in common]
    again = slimlab("run", *moved, "resume=false", low, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Pareto front of study {name!r}" in again.stdout
    assert set(studies(storage)) == {name, other}
    assert len(studies(storage)[name].trials) == 2


def test_a_named_study_of_another_search_is_refused_before_anything_runs(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = {"technique.prune.amount": FloatDistribution(0.1, 0.4)}
    held = search(space, ["technique=[prune]"], {"accuracy": "maximize", "size_bytes": "minimize"})
    for name, attrs in (("mine", {"slimlab.search": held}), ("legacy", {})):  # legacy: made before studies said
        study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        study.add_trial(optuna.trial.create_trial(params={"technique.prune.amount": 0.2}, distributions=space,
                                                  values=[0.9, 1000.0]))  # fmt: skip
    args = ["run", "-m", "hydra/sweeper=slimlab_optuna", "technique=[prune]", f"hydra.sweeper.storage={storage}",
            "technique.prune.amount=interval(0.6, 0.9)", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    differs = "search space technique.prune.amount=float[0.1, 0.4] there, technique.prune.amount=float[0.6, 0.9] here"
    for name, reason in (("mine", differs), ("legacy", "it records no search and has trials")):
        result = slimlab(*args, f"hydra.sweeper.study_name={name}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith(f"slimlab: error: hydra.sweeper.study_name={name!r} in {storage} is another search")
        assert reason in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # refused before the sweep's parent run
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()
    assert all(len(study.trials) == 1 for study in studies(storage).values())


@pytest.mark.parametrize(
    "storage,message",
    [
        ("sqlite:////nonexistent-dir/optuna.db", "'sqlite:////nonexistent-dir/optuna.db': directory /nonexistent-dir "),
        ("foo://bar", "'foo://bar' cannot be opened: Can't load plugin: sqlalchemy.dialects:foo"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_refused_before_anything_runs(storage, message, tmp_path):
    sweep = ["-m", "hydra/sweeper=slimlab_optuna", "technique.prune.amount=interval(0.1, 0.5)"]
    result = slimlab("run", *sweep, f"hydra.sweeper.storage={storage}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimlab: error: hydra.sweeper.storage="), result.stderr[-3000:]
    assert message in lines[0]
    assert not (tmp_path / "mlflow.db").exists()
