"""Helpers for the heterogeneous-engine, status, stdin and compare tests (issue 8).

``private_kernelspecs()`` writes two kernelspecs into a temporary ``JUPYTER_PATH`` entry, so the
tests need no hand setup: ``other`` (this interpreter's ipykernel with ``IME_FLAVOUR=other`` in
its environment) and ``bash`` (``bash_kernel`` from the ``test`` extra, run by this interpreter).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import psutil


def write_kernelspecs(root: Path) -> None:
    specs = {
        "other": {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (other env)",
            "language": "python",
            "env": {"IME_FLAVOUR": "other"},
        },
        "bash": {
            "argv": [sys.executable, "-m", "bash_kernel", "-f", "{connection_file}"],
            "display_name": "Bash",
            "language": "bash",
            "env": {"PS1": "$"},
        },
    }
    for name, spec in specs.items():
        d = root / "kernels" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "kernel.json").write_text(json.dumps(spec))


@contextlib.contextmanager
def private_kernelspecs():
    """Put the ``other`` and ``bash`` kernelspecs first on ``JUPYTER_PATH`` while in use."""
    root = Path(tempfile.mkdtemp(prefix="ipme-kernelspecs-"))
    write_kernelspecs(root)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
        shutil.rmtree(root, ignore_errors=True)


def assert_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Every process in ``pids`` has exited (waits for them, kills and fails otherwise)."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    assert not alive, f"engine processes outlived their cluster: {[p.pid for p in alive]}"


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (e.g. bash_kernel's bash)."""
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def screen_lines(text: str) -> list[str]:
    """What a terminal shows for ``text``: each line as its last carriage-return overwrite left
    it."""
    shown = []
    for raw in text.split("\n"):
        line = ""
        for piece in raw.split("\r"):
            line = piece + line[len(piece) :]
        shown.append(line.rstrip())
    return shown
