"""Whether the process that recorded a run is still alive: tags a run records, and the check a later command makes.

A SIGKILL (or a lost machine) leaves a tracked run RUNNING; the next run or sweep on the same host closes the
runs whose process is gone (``slimlab.tracking.close_dead_runs``). Only processes of this host can be seen.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

HOST_TAG, PID_TAG, START_TAG = "slimlab.host", "slimlab.pid", "slimlab.process_start"


def process_tags() -> dict[str, str]:
    """Where this process runs, so a later command on the same host can tell when it is gone."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), START_TAG: process_start(os.getpid()) or ""}


def process_start(pid: int) -> str | None:
    """``boot/pid-namespace/start-ticks`` of process ``pid``, "" when unknown; None when there is no such process.

    The start time (``/proc/<pid>/stat`` field 22) tells a reused pid from the process that held it; the boot id
    tells a process of an earlier boot; the pid namespace tells another container on the same kernel.
    """
    proc = Path("/proc")
    if (proc / "self" / "stat").exists():
        try:
            stat = (proc / str(pid) / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return None
        except OSError:
            return ""
        fields = stat.rsplit(")", 1)[1].split()  # the fields after "pid (comm)", from field 3 (the state) on
        if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent: gone all the same
            return None
        ticks = fields[19]  # field 22: the start time, in clock ticks after boot
        return f"{_read(proc / 'sys/kernel/random/boot_id')}/{_readlink(proc / 'self/ns/pid')}/{ticks}"
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:  # it exists, owned by someone else
            pass
        return ""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"//{process.create_time()}"
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return ""


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process that recorded ``tags`` (``process_tags``) is known to be gone.

    Only processes of this host can be seen: a run of another host (or of another pid namespace on this
    kernel, such as another container) is never called gone. A host is its hostname.
    """
    if tags.get(HOST_TAG) != socket.gethostname():
        return False
    try:
        pid = int(tags[PID_TAG])
    except (KeyError, ValueError):
        return False
    recorded = tags.get(START_TAG, "")
    boot, namespace, _ = ([*recorded.split("/", 2), "", ""])[:3]
    my_boot, my_namespace, _ = ([*(process_start(os.getpid()) or "").split("/", 2), "", ""])[:3]
    if boot and my_boot and boot != my_boot:
        return True  # recorded before this machine last booted
    if namespace and my_namespace and namespace != my_namespace:
        return False  # another pid namespace: its pids mean nothing here
    current = process_start(pid)
    return current is None or bool(recorded and current and current != recorded)
