"""Magics for looking at and into engines: ``%pxstatus``, ``%pxdebug N``, ``%pxdiff NAME``.

``register(ip)`` adds them to an IPython shell (``load_ipython_extension`` calls it). They act on
the active client (``mec.activate()``), like ``%px``.

- ``%pxstatus [--live] [--interval S]``: the engine table (text in a terminal, HTML in a
  notebook; ``--live`` keeps a notebook table updated in place, see ``status.py``).
- ``%pxdebug N``: post-mortem debugger on engine N's last exception; the debugger's prompts
  come to you prefixed ``[N] ipdb>`` and its output is shown as it arrives (``stdin.py``).
- ``%pxdiff NAME [--targets T]``: which engines hold differing values of ``NAME``.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

from . import stdin
from .client import get_active

__all__ = ["register", "unregister"]

MAGICS = ("pxstatus", "pxdebug", "pxdiff")


def _client() -> Any:
    mec = get_active()
    if mec is None:
        raise RuntimeError("no active MultiEngineClient: run mec.activate() (or start a Cluster) first")
    return mec


def _parse_targets(text: str) -> Any:
    """'3' -> 3, '0,2' or '[0, 2]' -> [0, 2], 'all' or a group name -> itself (never eval)."""
    text = text.strip()
    inner = text.strip("[]() ")
    parts = [p.strip() for p in inner.split(",") if p.strip()]
    if parts and all(p.lstrip("-").isdigit() for p in parts):
        return int(parts[0]) if len(parts) == 1 and not text.startswith(("[", "(")) and "," not in text else [int(p) for p in parts]
    if len(parts) > 1:
        return [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    return text


def pxstatus(line: str) -> Any:
    """%pxstatus [--live] [--interval S]: the engine table."""
    args = shlex.split(line)
    live, interval = False, 1.0
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--live":
            live = True
        elif a == "--interval" and i + 1 < len(args):
            interval = float(args[i + 1])
            i += 1
        elif a.startswith("--interval="):
            interval = float(a.split("=", 1)[1])
        else:
            raise ValueError(f"%pxstatus: unknown argument {a!r}; usage: %pxstatus [--live] [--interval S]")
        i += 1
    return _client().status(live=live, interval=interval)


def _live_printer(eid: int) -> Any:
    """A listener that shows an engine's output as it arrives, in the user's thread."""
    prefix = f"[{eid}] "

    def write(stream: Any, text: str) -> None:
        stream.write("".join(prefix + line for line in text.splitlines(True)))
        if not text.endswith("\n"):
            stream.write("\n")
        stream.flush()

    def listener(_eid: int, mtype: str, content: dict) -> None:
        if mtype == "stream":
            stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
            stdin.post(lambda: write(stream, content.get("text", "")))
        elif mtype == "error":
            stdin.post(lambda: write(sys.stderr, "\n".join(content.get("traceback", []))))
        elif mtype in ("display_data", "execute_result"):
            text = (content.get("data") or {}).get("text/plain")
            if text:
                stdin.post(lambda: write(sys.stdout, str(text)))

    return listener


def pxdebug(line: str) -> None:
    """%pxdebug N: post-mortem debugging of engine N's last exception, from here."""
    text = line.strip()
    if not text.lstrip("-").isdigit():
        raise ValueError(f"%pxdebug needs one engine id, e.g. %pxdebug 0 (got {line!r})")
    eid = int(text)
    mec = _client()
    if eid not in mec.get_ids():
        raise ValueError(f"unknown engine id {eid}; valid ids: {mec.get_ids()}")
    language = next(e["language"] for e in mec.engines if e["id"] == eid)
    if language != "python":
        raise ValueError(f"engine {eid} runs {language or 'an unknown language'}: "
                         "%pxdebug needs a Python engine")
    pr = mec.execute("%debug", targets=eid, block=False, listener=_live_printer(eid))
    try:
        pr.get_result()
    finally:
        stdin.serve_pending()  # output that arrived with the end of the session


def pxdiff(line: str) -> Any:
    """%pxdiff NAME [--targets T]: which engines hold differing values of NAME."""
    args = shlex.split(line)
    targets = None
    names = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--targets", "-t") and i + 1 < len(args):
            targets = _parse_targets(args[i + 1])
            i += 1
        elif a.startswith("--targets="):
            targets = _parse_targets(a.split("=", 1)[1])
        else:
            names.append(a)
        i += 1
    if len(names) != 1:
        raise ValueError("usage: %pxdiff NAME [--targets T]")
    return _client().diff(names[0], targets=targets)


def register(ip: Any) -> None:
    """Add %pxstatus, %pxdebug and %pxdiff to the shell ``ip``."""
    ip.register_magic_function(pxstatus, "line", "pxstatus")
    ip.register_magic_function(pxdebug, "line", "pxdebug")
    ip.register_magic_function(pxdiff, "line", "pxdiff")


def unregister(ip: Any) -> None:
    for name in MAGICS:
        ip.magics_manager.magics["line"].pop(name, None)
