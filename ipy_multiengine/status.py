"""The engine table (``mec.engines``) and the live status table (``mec.status()``, ``%pxstatus``).

Everything here is read from what the controller already tracks (kernel_info replies, IOPub
``status`` messages, requests in flight) plus ``psutil`` for engines on this host; nothing is
sent to the engines, so a status table is cheap and works while every engine is busy.

``mec.status()`` returns a ``StatusTable``: its ``repr`` is a text table (terminal), its
``_repr_html_`` an HTML table (notebook). ``mec.status(live=True)`` in a notebook displays the
table once and keeps updating that same output in place (``display_id``/``update_display``,
from a daemon thread) while later cells run ``%%px`` or ``map``, until ``.stop()``, the end of a
``with`` block, or the client is closed. No extra server is involved.
"""

from __future__ import annotations

import html
import re
import socket
import threading
import time
import weakref
from typing import Any

__all__ = ["LiveStatus", "StatusTable", "engine_rows", "status_rows"]

_procs: dict[int, Any] = {}  # pid -> psutil.Process, kept for CPU % between two looks
_cpu_last: dict[int, tuple[float, float]] = {}  # pid -> (wall time, cpu seconds) at the last look


def _language_version(conn: Any) -> str:
    info = conn.kernel_info or {}
    lang = info.get("language_info") or {}
    if lang.get("version"):
        return str(lang["version"])
    if conn.engine_info.get("python"):
        return str(conn.engine_info["python"])
    m = re.search(r"\d+\.\d+(\.\d+)?", info.get("banner") or "")
    return m.group(0) if m else ""


def engine_rows(client: Any) -> list[dict]:
    """One dict per engine: id, group, kernelspec, language, version, host, pid, state, dead,
    data_ops (its data operations work) and data_refused (why they are refused, or None)."""
    ctl = client.controller
    meta = client.engine_meta() or {}
    rows = []
    for eid, conn in sorted(ctl.states().items()):  # immutable EngineState snapshots
        m = meta.get(eid) or {}
        rows.append(
            {
                "id": eid,
                "group": m.get("group") or "",
                "kernelspec": m.get("kernel_name") or "",
                "language": conn.language,
                "version": _language_version(conn),
                "host": conn.engine_info.get("host") or m.get("host") or "",
                "pid": conn.engine_info.get("pid") or m.get("pid"),
                "state": str(conn.state),
                "dead": conn.dead,
                "data_ops": conn.data_ok,
                "data_refused": conn.data_refused,  # why data operations are refused, or None
                "ready": conn.ready,
                "encrypted": conn.encrypted,
                "watched_by": conn.watched_by,
            }
        )
    return rows


def _usage(pid: int | None, host: str) -> tuple[int | None, float | None]:
    """(RSS bytes, CPU %) of a local engine process and its children; (None, None) elsewhere."""
    if not pid or host not in ("", socket.gethostname()):
        return None, None
    try:
        import psutil

        proc = _procs.get(pid)
        if proc is None or not proc.is_running():
            proc = _procs[pid] = psutil.Process(pid)
        family = [proc, *proc.children(recursive=True)]  # e.g. bash_kernel's bash
        rss = cpu = 0.0
        for p in family:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu += t.user + t.system
            except psutil.Error:
                pass
        now = time.monotonic()
        last = _cpu_last.get(pid)
        _cpu_last[pid] = (now, cpu)
        if last is not None and now - last[0] > 0.05:
            percent = 100.0 * max(cpu - last[1], 0.0) / (now - last[0])
        else:  # first look: the average since the process started
            percent = 100.0 * cpu / max(time.time() - proc.create_time(), 1e-3)
        return int(rss), percent
    except Exception:
        return None, None


def status_rows(client: Any) -> list[dict]:
    """``engine_rows`` plus running (what a busy engine runs), busy_for (s), rss, cpu, queued."""
    ctl = client.controller
    ctl.catch_up()  # what the caller submitted before shows as queued or running
    rows = engine_rows(client)
    now = time.monotonic()
    for row in rows:
        conn = ctl.state(row["id"])
        busy = row["state"] == "busy"
        row["running"] = conn.running if busy else ""
        row["busy_for"] = (now - conn.busy_since) if busy and conn.busy_since else None
        row["queued"] = conn.queued
        if row["dead"] or row["ready"] is False:  # restarting/starting: the old pid says nothing
            row["pid"] = row["rss"] = row["cpu"] = None  # shown as "-"
        else:
            row["rss"], row["cpu"] = _usage(row["pid"], row["host"])
    return rows


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_secs(s: float | None) -> str:
    if s is None:
        return ""
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def _short(code: str, width: int = 40) -> str:
    line = " ".join(code.split())
    return line if len(line) <= width else line[: width - 1] + "…"


COLUMNS = ("id", "group", "host", "pid", "state", "running", "for", "queued", "rss", "cpu")


#: What the state of an engine whose data operations are refused says; the table's notes say why.
DATA_REFUSED = "data refused"


class StatusTable:
    """A snapshot of the engines: text ``repr`` in a terminal, HTML in a notebook. Below the
    table, a note per engine whose data operations are refused says why (an engine of a newer
    data protocol, or one that cannot sign its buffers where they may be changed): only execute
    works there, and the state column alone could not say so."""

    def __init__(self, rows: list[dict], taken: float | None = None) -> None:
        self.rows = rows
        self.taken = time.time() if taken is None else taken

    def cells(self) -> list[dict[str, str]]:
        out = []
        for r in self.rows:
            state = r["state"] + (f" ({r['dead']})" if r["dead"] else "")
            if r.get("data_refused") and not r["dead"]:
                state += f" ({DATA_REFUSED})"
            out.append(
                {
                    "id": str(r["id"]),
                    "group": r["group"] or "-",
                    "host": r["host"] or "-",
                    "pid": str(r["pid"] or "-"),
                    "state": state,
                    "running": _short(r["running"]) if r["running"] else "",
                    "for": _fmt_secs(r["busy_for"]),
                    "queued": str(r["queued"]),
                    "rss": _fmt_bytes(r["rss"]),
                    "cpu": "-" if r["cpu"] is None else f"{r['cpu']:.0f}%",
                }
            )
        return out

    def notes(self) -> list[str]:
        """One line per live engine whose data operations are refused: its id and why."""
        return [
            f"engine {r['id']}: {DATA_REFUSED}: {r['data_refused']}"
            for r in self.rows
            if r.get("data_refused") and not r["dead"]
        ]

    def __repr__(self) -> str:
        cells = self.cells()
        widths = {c: max([len(c)] + [len(row[c]) for row in cells]) for c in COLUMNS}
        lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
        for row in cells:
            lines.append("  ".join(row[c].ljust(widths[c]) for c in COLUMNS).rstrip())
        return "\n".join(lines + self.notes())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        colours = {"busy": "#d97706", "idle": "#15803d", "dead": "#b91c1c", "starting": "#6b7280"}
        head = "".join(f"<th style='text-align:left'>{c}</th>" for c in COLUMNS)
        body = []
        for row in self.cells():
            tds = []
            for c in COLUMNS:
                style = ""
                if c == "state":
                    colour = colours.get(row[c].split()[0], "inherit")
                    style = f" style='color:{colour};font-weight:bold'"
                tds.append(f"<td{style}>{html.escape(row[c])}</td>")
            body.append(f"<tr>{''.join(tds)}</tr>")
        stamp = time.strftime("%H:%M:%S", time.localtime(self.taken))
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes())
        if notes:
            notes = f"<ul class='ipy-multiengine-notes'>{notes}</ul>"
        return (
            f"<table class='ipy-multiengine-status'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>{notes}<small>engines at {stamp}</small>"
        )


def status(client: Any) -> StatusTable:
    return StatusTable(status_rows(client))


class LiveStatus:
    """A status table displayed once and updated in place until ``stop()`` (notebook only)."""

    def __init__(self, client: Any, interval: float = 1.0) -> None:
        from IPython.display import display

        self._client = weakref.ref(client)
        self.interval = interval
        self.updates = 0
        self._stop = threading.Event()
        table = status(client)
        self._last = table._repr_html_()
        self.handle = display(table, display_id=True)
        self._thread = threading.Thread(
            target=self._run, name="ipy_multiengine-status", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            client = self._client()
            if client is None or client.closed:
                return
            try:
                table = status(client)
            except Exception:
                return
            text = table._repr_html_().rsplit("<small>", 1)[0]
            if text == self._last:
                continue  # unchanged but for the clock: spare the frontend
            self._last = text
            self.updates += 1
            try:
                self.handle.update(table)
            except Exception:
                return

    def stop(self) -> None:
        """Stop updating (the last table stays displayed)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> LiveStatus:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<LiveStatus every {self.interval:g} s, {self.updates} updates>"


def show(client: Any, live: bool = False, interval: float = 1.0) -> Any:
    """``mec.status()``: a ``StatusTable``; with ``live`` in a notebook, a ``LiveStatus``."""
    from .render import in_notebook

    if live and in_notebook():
        return LiveStatus(client, interval)
    return status(client)
