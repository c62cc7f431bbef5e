"""The ``slimlab`` command: run | plugins | ui. Heavy imports happen inside the commands that need them."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_BROKEN_PIPE = 130, 143, 141  # 128 + signal, as shells report

USAGE = """\
usage: slimlab <command> [arguments]

Compress models with pipelines of plugin techniques; track every run in MLflow.

commands:
  run [overrides]       one run (a Hydra app): slimlab run experiment=quickstart
  run -m [overrides]    a sweep: slimlab run -m technique.prune.amount=0.5,0.7,0.9
  run --help            config groups, options and the composed config
  plugins [--json]      discovered plugins: distribution, version, techniques, hooks
  report [--sweep ID]   table, Pareto plot, CSV and markdown of a sweep's or an experiment's runs
  ui [--port N]         the MLflow UI on the configured store
  server ...            a shared MLflow tracking server (PostgreSQL) for sweeps across processes and hosts

Exit codes: 0 success, 1 a run failed, 2 bad input, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    commands = {
        "run": run_command,
        "plugins": plugins_command,
        "report": report_command,
        "ui": ui_command,
        "server": server_command,
    }
    if command not in commands:
        print(f"slimlab: error: unknown command {command!r}; valid: {', '.join(commands)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return commands[command](rest)


def _error(message: str) -> int:
    print(f"slimlab: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def plugins_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slimlab plugins", description="List the discovered slimlab plugins.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    options = parser.parse_args(args)
    from dataclasses import asdict

    from slimlab.errors import PluginError
    from slimlab.plugin_manager import load_plugins

    try:
        plugins = load_plugins()
    except PluginError as error:
        return _error(str(error))
    if options.json:
        print(json.dumps([asdict(info) for info in plugins.infos], indent=2))
        return EXIT_OK
    for info in plugins.infos:
        print(f"{info.name}  ({info.distribution} {info.version}, {info.value})  [{info.status}]")
        for kind in ("techniques", "tasks", "options"):
            if getattr(info, kind):
                print(f"    {kind}: {', '.join(getattr(info, kind))}")
        if info.hooks:
            print(f"    hooks: {', '.join(info.hooks)}")
        if info.error:
            print(f"    error: {info.error}")
    return EXIT_OK


def report_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="slimlab report",
        description="A table, the Pareto fronts (quality vs size and vs latency) as pareto.png, report.csv and "
        "report.md, from the finished runs of a sweep (logged to its parent run too) or of an experiment.",
    )
    parser.add_argument("--sweep", metavar="PARENT_RUN_ID", help="a sweep's parent run (default: the latest sweep)")
    parser.add_argument("--experiment", help="every finished run of this MLflow experiment instead of one sweep")
    parser.add_argument("--uri", help="tracking store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--out", default="report", help="directory for the files (default: ./report)")
    options = parser.parse_args(args)
    if options.sweep and options.experiment:
        return _error("give --sweep or --experiment, not both")
    from pathlib import Path

    from slimlab import report
    from slimlab.tracking import tracking_uri

    try:
        client = report.open_store(options.uri or tracking_uri())
    except ValueError as error:  # nothing recorded there yet: say so, do not create an empty store
        return _error(str(error))
    try:
        if options.experiment:
            rows = report.rows_of(report.experiment_runs(client, options.experiment))
            title = f"experiment {options.experiment}: {len(rows)} finished runs"
        else:
            parent = options.sweep or report.latest_sweep(client)
            rows = report.rows_of(report.sweep_runs(client, parent))
            title = f"sweep {parent[:8]}: {len(rows)} finished runs"
    except Exception as error:  # an unknown run id or experiment: the user's input
        return _error(str(error).splitlines()[0])
    if not rows:
        return _error("no finished slimlab runs to report")
    report.show_table(rows, title)
    paths = report.write_report(rows, Path(options.out), title)
    if not options.experiment:
        for path in paths:
            client.log_artifact(parent, str(path), artifact_path="report")
    print("wrote " + ", ".join(str(p) for p in paths) + ("" if options.experiment else f"; logged to run {parent}"))
    return EXIT_OK


def ui_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slimlab ui", description="Start the MLflow UI on slimlab's tracking store.")
    parser.add_argument("--uri", help="tracking store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1, help="web server processes (default: 1)")
    options = parser.parse_args(args)
    from slimlab.tracking import tracking_uri

    uri = options.uri or tracking_uri()
    base_url = f"http://{options.host}:{options.port}"
    print(f"MLflow UI for {uri} at {base_url}  (Ctrl-C stops it)", flush=True)
    try:
        links = comparison_links(uri, base_url)
    except Exception as error:  # the links are a convenience: the UI still starts
        print(f"  (no comparison links: {type(error).__name__}: {error})", flush=True)
        links = []
    for name, url in links:
        print(f"  compare the runs of {name}: {url}", flush=True)
    return _serve(["ui", "--backend-store-uri", uri, *_listen(options)])


def comparison_links(uri: str, base_url: str, limit: int = 5) -> list[tuple[str, str]]:
    """The comparison view of the ``limit`` newest experiments slimlab wrote to, newest first."""
    from slimlab.tracking import VIEW_TAG, comparison_url, sqlite_path

    database = sqlite_path(uri)
    if database is not None and not database.exists():
        return []  # nothing recorded yet; do not create the database just to look
    from mlflow import MlflowClient

    experiments = MlflowClient(uri).search_experiments(
        filter_string=f"tags.`{VIEW_TAG}` != ''", order_by=["creation_time DESC"], max_results=limit
    )
    return [(e.name, comparison_url(base_url, e.experiment_id)) for e in experiments]


def server_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="slimlab server",
        description="A shared MLflow tracking server for sweeps across processes and hosts: runs in a database "
        "(PostgreSQL: postgresql+psycopg2://USER@HOST:PORT/DB), artifacts in a directory the server owns and "
        "serves. Workers only set MLFLOW_TRACKING_URI=http://HOST:PORT.",
    )
    parser.add_argument("--backend-store-uri", required=True, help="where runs are stored, e.g. a PostgreSQL URI")
    parser.add_argument("--artifacts-destination", required=True, help="directory (or s3://...) for artifacts")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other hosts")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="web server processes (default: 2)")
    options = parser.parse_args(args)
    uri = options.backend_store_uri
    if uri.startswith("postgresql://"):  # SQLAlchemy 2.1 reads this as psycopg 3 (NOTES.md): name the driver
        uri = "postgresql+psycopg2://" + uri[len("postgresql://") :]
    print(f"MLflow tracking server at http://{options.host}:{options.port} on {uri}  (Ctrl-C stops it)", flush=True)
    command = ["server", "--backend-store-uri", uri, "--artifacts-destination", options.artifacts_destination]
    return _serve([*command, "--serve-artifacts", *_listen(options)])


def _listen(options: argparse.Namespace) -> list[str]:
    return ["--host", options.host, "--port", str(options.port), "--workers", str(options.workers)]


def _serve(mlflow_args: list[str]) -> int:
    """Run ``mlflow <mlflow_args>`` until Ctrl-C or SIGTERM, then stop its whole process group."""
    import signal
    import subprocess

    # MLflow's background job runner serves GenAI evaluation, not run browsing: a dozen idle processes here.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # mlflow starts uvicorn in child processes: run it as its own process group and stop the whole group.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", *mlflow_args], env=env, start_new_session=True)

    def stop(*_: object) -> None:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    try:
        return server.wait()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        stop()
        server.wait(timeout=30)


def _pre_disabled(args: list[str]) -> list[str]:
    """``plugins.disable=[...]`` from the command line: plugins load before Hydra composes, so read it first."""
    for arg in args:
        if arg.startswith("plugins.disable="):
            from hydra.core.override_parser.overrides_parser import OverridesParser

            value = OverridesParser.create().parse_override(arg).value()
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return []


def _launch_directory_importable() -> None:
    """The launch directory on the import path, as ``python -m`` does, so ``_target_: mymodel.Net`` finds the user's
    ``mymodel.py``; through ``PYTHONPATH`` too, for the processes that launchers start."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *paths])


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``): ends a run or sweep like Ctrl-C, so runs are closed KILLED, not left RUNNING."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def run_command(args: list[str]) -> int:
    import signal

    _launch_directory_importable()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: list[str]) -> int:
    from slimlab import sweep
    from slimlab.errors import ConfigError, PluginError, Refused, RunFailed, SweepSetupFailed
    from slimlab.hydra_app import BadInput, describe_hydra_error, is_bad_input, launch

    try:
        return launch(args, disable=_pre_disabled(args))
    except (BadInput, ConfigError, PluginError) as error:
        sweep.interrupt(status="FAILED")  # a sweep job refused its config after the sweep started
        return _error(str(error))
    except RunFailed as error:
        import traceback

        cause = error.__cause__ or error
        if not isinstance(cause, Refused):
            traceback.print_exception(cause, file=sys.stderr)
        print(f"slimlab: run failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except SweepSetupFailed as error:
        print(f"slimlab: the sweep could not start: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as interrupt:
        sweep.interrupt()
        terminated = isinstance(interrupt, Terminated)
        print(f"slimlab: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception as error:
        sweep.interrupt(status="FAILED")  # whatever stopped a started sweep, its runs do not stay RUNNING
        if is_bad_input(error):
            return _error(describe_hydra_error(error))
        # Hydra's output directory (or another file outside any run) cannot be written: the place is the input.
        if isinstance(error, OSError) and error.filename and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return _error(
                f"cannot write {os.path.abspath(error.filename)}: {error.strerror}; run from a writable directory "
                "or point hydra.run.dir (hydra.sweep.dir), tracking.uri and cache_dir at writable places"
            )
        raise


def entry() -> None:
    """Console-script entry point."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `slimlab run --help | head`: the reader stopped reading, which is not an error of ours
        # Python flushes stdout again at exit: point it at /dev/null so that flush does not raise as well.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)
