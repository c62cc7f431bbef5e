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
  ui [--port N]         the MLflow UI on the configured local store (a tracking server is its own UI)
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
        for kind in ("techniques", "tasks", "options", "trackers"):
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
    parser.add_argument("--experiment", help="every finished run of this experiment instead of one sweep")
    parser.add_argument(
        "--backend",
        default="mlflow",
        help="tracking backend the runs are in (default: mlflow; slimlab plugins lists them)",
    )
    parser.add_argument(
        "--uri", help="its store (default: the backend's; mlflow: $MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    parser.add_argument("--out", default="report", help="directory for the files (default: ./report)")
    options = parser.parse_args(args)
    if options.sweep and options.experiment:
        return _error("give --sweep or --experiment, not both")
    from pathlib import Path

    from slimlab import report
    from slimlab.errors import ConfigError
    from slimlab.plugin_manager import load_plugins

    try:
        store = load_plugins().tracking_store(options.backend, options.uri)
        missing = report.missing_store(store, options.backend)
        if missing:  # nothing recorded there yet: say so, do not create an empty store
            return _error(missing)
        store.check(True, write=False)  # a report reads; with --sweep it adds files to the parent's artifacts
    except ConfigError as error:
        return _error(str(error).replace("tracking.backend=", "--backend ").replace("tracking.uri=", "--uri "))
    try:
        if options.experiment:
            rows = report.rows_of(report.experiment_runs(store, options.experiment))
            title = f"experiment {options.experiment}: {len(rows)} finished runs"
        else:
            parent = options.sweep or report.latest_sweep(store)
            rows = report.rows_of(report.sweep_runs(store, parent))
            title = f"sweep {parent[:8]}: {len(rows)} finished runs"
    except Exception as error:  # an unknown run id or experiment: the user's input
        return _error(str(error).splitlines()[0])
    if not rows:
        return _error("no finished slimlab runs to report")
    report.show_table(rows, title)
    paths = report.write_report(rows, Path(options.out), title)
    if not options.experiment:
        for path in paths:
            store.log_file(parent, path, "report")
    print("wrote " + ", ".join(str(p) for p in paths) + ("" if options.experiment else f"; logged to run {parent}"))
    return EXIT_OK


def ui_command(args: list[str]) -> int:
    from slimlab.mlflow_tracking import UI_HOST, UI_PORT

    parser = argparse.ArgumentParser(
        prog="slimlab ui",
        description="Start the MLflow UI on slimlab's local sqlite store. A tracking server (http://...) is its own "
        "UI: open its URL.",
    )
    parser.add_argument("--uri", help="tracking store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--host", default=UI_HOST)
    parser.add_argument("--port", type=int, default=UI_PORT)
    parser.add_argument("--workers", type=int, default=1, help="web server processes (default: 1)")
    options = parser.parse_args(args)
    from slimlab.mlflow_tracking import sqlite_path, tracking_uri, uri_source

    uri = options.uri or tracking_uri()
    if sqlite_path(uri) is None:  # `mlflow ui` would fail on a server's URI, or miss a database's artifacts
        return _error(not_local_store(uri, "--uri" if options.uri else uri_source()))
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


def not_local_store(uri: str, key: str) -> str:
    """Why ``slimlab ui`` does not serve ``uri`` (not a local sqlite store), and what to open instead."""
    from slimlab.mlflow_tracking import server_url, uri_scheme
    from slimlab.summary import shown_uri

    if uri_scheme(uri) in ("http", "https"):
        return (
            f"{key}={shown_uri(uri)} is a tracking server, which serves the MLflow UI itself: open "
            f"{server_url(uri)} (each run and sweep logged there prints its experiment's link); slimlab ui serves "
            "only a local sqlite:/// store"
        )
    return (
        f"{key}={shown_uri(uri)} is not a local sqlite:/// store, the only kind slimlab ui serves: open the URL of "
        "the tracking server in front of it, which serves its runs' artifacts too (slimlab server prints its URL "
        "when it starts)"
    )


def comparison_links(uri: str, base_url: str, limit: int = 5) -> list[tuple[str, str]]:
    """The comparison view of the ``limit`` newest experiments slimlab wrote to, newest first."""
    from slimlab.mlflow_tracking import VIEW_TAG, comparison_url, sqlite_path

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
        "(PostgreSQL: postgresql+psycopg2://USER:PASSWORD@HOST/DB, role and database created first, see the README), "
        "artifacts in a directory the server owns and serves. Workers only set MLFLOW_TRACKING_URI to the URL it "
        "prints; browsers open that URL.",
    )
    parser.add_argument("--backend-store-uri", required=True, help="where runs are stored, e.g. a PostgreSQL URI")
    parser.add_argument("--artifacts-destination", required=True, help="directory (or s3://...) for artifacts")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other hosts")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="web server processes (default: 2)")
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="more names clients reach this server by (a DNS alias, a proxy), comma-separated; localhost, this "
        "host's name, FQDN and address, and private addresses are allowed already",
    )
    parser.add_argument(
        "--jobs",
        action="store_true",
        help="also start MLflow's job workers, which serve its GenAI features (LLM scorers, prompt optimization, "
        "trace archival) and no slimlab run: 8 more processes, 1.9 GB more resident memory (measured)",
    )
    options = parser.parse_args(args)
    from slimlab.summary import shown_uri

    uri = options.backend_store_uri
    if uri.startswith("postgresql://"):  # SQLAlchemy 2.1 reads this as psycopg 3: name the driver
        uri = "postgresql+psycopg2://" + uri[len("postgresql://") :]
    problem = database_problem(uri)
    if problem:
        return _error(f"--backend-store-uri {shown_uri(uri)}: {problem}")
    destination = options.artifacts_destination
    if "://" not in destination:  # a local directory: say which one, wherever the server's workers start
        destination = os.path.abspath(destination)
    names = server_names(options.host, options.allowed_hosts)
    url = f"http://{names[0]}:{options.port}"
    print(f"MLflow tracking server at {url} on {shown_uri(uri)}, artifacts in {destination}  (Ctrl-C stops it)")
    print(f"  on each worker: export MLFLOW_TRACKING_URI={url}", flush=True)
    command = ["server", "--backend-store-uri", uri, "--artifacts-destination", destination, "--serve-artifacts"]
    # MLflow's default host check admits localhost and private addresses only, and its CORS check refuses the UI's
    # own POSTs from any other origin: workers and browsers that use this host's name would get 403.
    if "MLFLOW_SERVER_ALLOWED_HOSTS" not in os.environ:
        command += ["--allowed-hosts", ",".join(allowed_hosts(names, options.port))]
    if "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS" not in os.environ:
        command += ["--cors-allowed-origins", ",".join(f"http://{n}:{options.port}" for n in _bracketed(names))]
    return _serve([*command, *_listen(options)], jobs=options.jobs)


def database_problem(uri: str, timeout: int = 10) -> str | None:
    """Why the server could not use database ``uri`` (unreachable, no such role or database, no driver), or None.

    Checked before starting: ``mlflow server`` would print a traceback from each of its processes instead.
    """
    from slimlab.mlflow_tracking import uri_scheme

    if uri_scheme(uri) not in ("postgresql", "mysql", "mssql"):  # sqlite: MLflow creates the file itself
        return None
    try:
        import sqlalchemy

        connect_args = {"connect_timeout": timeout} if uri_scheme(uri) == "postgresql" else {}
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        try:
            with engine.connect():
                return None
        finally:
            engine.dispose()
    except ImportError as error:
        return f"its database driver is not installed ({error}); pip install 'slimlab[scale]' installs psycopg2"
    except Exception as error:
        reason = " ".join(str(getattr(error, "orig", None) or error).split())
        return f"cannot connect: {reason} (the README's Scaling out shows how to create the role and database)"


def server_names(host: str, extra: str = "") -> list[str]:
    """The names and addresses clients may reach a server listening on ``host`` by, the one to print first."""
    import socket

    names = [n.strip() for n in extra.split(",") if n.strip()]
    if host in ("127.0.0.1", "localhost", "::1"):
        return [*names, host] if names else [host]
    if host not in ("0.0.0.0", "::", ""):
        names.append(host)
    fqdn, hostname = socket.getfqdn(), socket.gethostname()
    # The printed URL's name: the FQDN when the resolver knows one (it may answer `localhost`), else the host name.
    names += [fqdn, hostname] if "." in fqdn and not fqdn.startswith("localhost") else [hostname, fqdn]
    try:  # the address this host reaches others from (a UDP connect sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            names.append(probe.getsockname()[0])
    except OSError:  # no route: no address worth naming beyond the names
        pass
    names += ["localhost", "127.0.0.1"]
    return list(dict.fromkeys(n for n in names if n))


def _bracketed(names: list[str]) -> list[str]:
    return [f"[{n}]" if ":" in n else n for n in names]


def allowed_hosts(names: list[str], port: int) -> list[str]:
    """MLflow's default Host patterns (localhost, private addresses) plus ``names``, each bare and with the port."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    ours = [form for n in _bracketed(names) for form in (n, f"{n}:{port}")]
    return list(dict.fromkeys([*get_default_allowed_hosts(), *ours]))


def _listen(options: argparse.Namespace) -> list[str]:
    return ["--host", options.host, "--port", str(options.port), "--workers", str(options.workers)]


def _serve(mlflow_args: list[str], jobs: bool = False) -> int:
    """Run ``mlflow <mlflow_args>`` until Ctrl-C or SIGTERM, then stop its whole process group."""
    import signal
    import subprocess

    # MLflow's job runner serves its GenAI features (LLM scorers, prompt optimization, trace archival), none of
    # which slimlab's runs use; measured on PostgreSQL, 2 cores: 13 processes, 2.6 GB and 31 s of CPU in the first
    # half minute with it, 5 processes, 0.8 GB and 10 s without. Off unless asked for (--jobs or the variable).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    if jobs:
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true"
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
    from slimlab.errors import ConfigError, PluginError, Refused, RunFailed, SweepSetupFailed
    from slimlab.hydra_app import launch
    from slimlab.hydra_errors import BadInput, describe_hydra_error, is_bad_input
    from slimlab.sweep import Sweep

    sweep = Sweep()  # this launch's: what a stopped sweep left open is closed through it
    try:
        return launch(args, disable=_pre_disabled(args), sweep=sweep)
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
            return _error(describe_hydra_error(error, sweep.plugins.infos if sweep.plugins else ()))
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
