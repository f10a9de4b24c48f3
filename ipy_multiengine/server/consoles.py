"""Engines as kernels of a Jupyter server: a console (and the debugger) on any engine.

jupyter_server adopts running kernels it did not start through its "external kernels"
feature (``MultiKernelManager.external_connection_dir``): a connection file that appears in
that directory becomes a kernel of the server with ``owns_kernel=False``, so shutting that
kernel down from JupyterLab (closing the console) leaves the engine running. We write the
engine's connection file there and hand the new kernel id to the frontend. That directory is
this server's own (``lab-kernels/<pid>-<id>``, 0700): no other server adopts its files, and it
is removed when the server stops (or by the next server, once its process is gone).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import psutil

from .. import clusterfile


def connection_dir(kernel_manager: Any) -> Path:
    """The server's external-kernels directory; this server's own (0700, in the runtime dir)
    unless the server is configured with one (``ServerApp.allow_external_kernels``)."""
    if kernel_manager.external_connection_dir is None:
        parent = clusterfile.runtime_dir("lab-kernels")
        for old in parent.iterdir():  # of servers that are gone (a crash: no release)
            pid = old.name.partition("-")[0]
            if old.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        own = parent / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        own.mkdir(mode=0o700)
        kernel_manager.external_connection_dir = str(own)
    path = Path(kernel_manager.external_connection_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def release(kernel_manager: Any) -> None:
    """(the server stops) Remove this server's own connection directory, if it made one."""
    d = kernel_manager.external_connection_dir
    if d is not None and Path(d).parent == clusterfile.runtime_dir("lab-kernels"):
        shutil.rmtree(d, ignore_errors=True)
        kernel_manager.external_connection_dir = None


def adopt(kernel_manager: Any, key: str, eid: int, connection: dict, kernel_name: str) -> str:
    """The id of a server kernel connected to this engine (an earlier one still listed for the
    same connection, or a new one)."""
    info = {**connection, "kernel_name": kernel_name or connection.get("kernel_name") or "python3"}
    d = connection_dir(kernel_manager)
    listed = set(kernel_manager.list_kernel_ids())
    for kid, path in list(kernel_manager.kernel_id_to_connection_file.items()):
        if kid in listed and Path(path).name.startswith(f"ipme-{key}-{eid}-"):
            try:
                if json.loads(Path(path).read_text()) == info:
                    return kid
            except (OSError, ValueError):
                pass
    # never remove files from this directory while the server runs: jupyter_client drops the
    # kernel of a vanished file and fails on one that was shut down already
    path = d / f"ipme-{key}-{eid}-{uuid.uuid4().hex[:8]}.json"
    clusterfile.write_private(path, json.dumps(info))
    os.chmod(path, 0o600)
    kernel_manager.list_kernel_ids()
    for kid, p in kernel_manager.kernel_id_to_connection_file.items():
        if Path(p) == path:
            return kid
    raise RuntimeError(f"the server did not adopt the connection file {path}")
