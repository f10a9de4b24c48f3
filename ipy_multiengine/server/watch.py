"""Watch every cluster of this user from a Jupyter server: engine states from IOPub, usage.

A :class:`Watcher` runs on the package's one background loop thread (``_loop``), never on the
server's own loop: every 1 s it rescans the cluster files (``clusterfile``'s reader, in a
worker thread, with psutil for liveness, RSS and CPU of engines on this host) and keeps one
IOPub subscriber per engine (jupyter_client's ``AsyncKernelClient``). Engines on other hosts
(no psutil there) are watched by the kernel heartbeat channel, with the controller's bound
(``HEARTBEAT_PERIOD``). It sends nothing on an engine's shell but one ``kernel_info_request``
when it starts watching (to learn whether an engine is idle: answered at once, or queued behind
a running cell); its reply comes to the watcher alone, its busy/idle on IOPub names the probe as
parent (other clients' routers drop it, and watchers ignore probes). What other threads see is
:meth:`Watcher.snapshot`: a JSON-ready structure replaced as a whole on the loop (loop state
stays on the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from concurrent.futures import Future
from typing import Any, cast

import psutil
import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient

from .. import _loop, clusterfile
from ..controller import HEARTBEAT_PERIOD
from ..errors import NoClusterError
from ..wire import CONTROL_MSG_TYPES

log = logging.getLogger(__name__)

#: seconds between two scans of the cluster files
SCAN_INTERVAL = 1.0
#: seconds an engine gets to answer the first kernel_info before it counts as busy
FIRST_INFO_WAIT = 1.0
#: a watch that failed is started again on a later scan, at most this many times in all
MAX_WATCH_ATTEMPTS = 5


def cluster_key(path: Any) -> str:
    """The id of a cluster in the REST API: its file's stem (``cluster-default``)."""
    return str(path).rsplit("/", 1)[-1].removesuffix(".json")


class EngineWatch:
    """(loop thread) One engine's IOPub subscriber and what it learnt."""

    def __init__(self, eid: int, entry: dict, spec: dict, remote: bool = False) -> None:
        self.eid = eid
        #: on another host (no psutil): liveness from heartbeats; why it is dead, or None
        self.remote = remote
        self.dead: str | None = None
        self.connection = dict(entry["connection"])
        self.pid = entry.get("pid")
        self.host = entry.get("host", spec.get("host")) or ""
        self.kernel_name = entry.get("kernel_name") or ""
        self.state = "unknown"
        self.running = ""
        self.busy_since: float | None = None
        self.parent = ""
        self.codes: dict[str, str] = {}  # parent msg_id -> code (execute_input), recent ones
        self.debugger = False
        self.client: AsyncKernelClient | None = None
        self.task: asyncio.Task | None = None
        self.first: asyncio.Task | None = None
        self.beater: asyncio.Task | None = None
        #: why this watch stopped working (its row shows 'unknown' and this), or None
        self.failed: str | None = None
        #: watches of this engine started so far, this one included (failed ones are retried)
        self.attempts = 1
        #: (monotonic) when the watch failed
        self.failed_at = 0.0

    def start(self, changed: Any) -> None:
        client = self.client = AsyncKernelClient()
        client.load_connection_info(self.connection)  # type: ignore[arg-type]  # a plain dict
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=True)
        self.task = asyncio.ensure_future(self._read(changed))
        self.task.add_done_callback(lambda t: self._ended(t, "IOPub", changed))
        if self.remote and self.connection.get("hb_port"):
            self.beater = asyncio.ensure_future(self._beat(changed))
            self.beater.add_done_callback(lambda t: self._ended(t, "heartbeat", changed))

    def fail(self, why: str) -> None:
        """(loop thread) Stop this watch for good, recording ``why`` for the snapshot."""
        if self.failed is None:
            self.failed = why
            self.failed_at = time.monotonic()
            log.warning("engine %s: %s", self.eid, why)
        self.stop()

    def _ended(self, task: asyncio.Task, what: str, changed: Any) -> None:
        """(loop thread) A reader or heartbeat task ended: unless cancelled, the watch failed."""
        if task.cancelled():
            return
        exc = task.exception()
        self.fail(f"{what} watch failed: {type(exc).__name__}: {exc}" if exc else f"{what} ended")
        changed()

    def stop(self) -> None:
        for task in (self.task, self.beater):
            if task is not None:
                task.cancel()
        if self.client is not None:
            try:
                self.client.stop_channels()
            except zmq.ZMQError:  # a start that failed half-way: stop_channels would reconnect
                for name in ("_shell_channel", "_iopub_channel", "_control_channel"):
                    channel = getattr(self.client, name, None)  # only the ones created
                    if channel is not None:
                        channel.stop()
            self.client = None

    async def _first_state(self, changed: Any) -> None:
        assert self.client is not None
        msg_id = self.client.kernel_info()
        try:
            while True:
                reply = await self.client.get_shell_msg(timeout=FIRST_INFO_WAIT)
                if reply["parent_header"].get("msg_id") == msg_id:
                    c = reply["content"]
                    self.debugger = "debugger" in c.get("supported_features", []) or bool(
                        c.get("debugger")
                    )
                    if self.state == "unknown":
                        self.state = "idle"
                    break
        except Exception:  # queued behind a running cell: it runs something we did not see
            if self.state == "unknown":
                self.state = "busy"
                self.running = "(started before the server watched)"
                self.busy_since = time.time()
        changed()

    async def _beat(self, changed: Any, period: float = HEARTBEAT_PERIOD) -> None:
        """Ping the engine's heartbeat every third of ``period``; no echo for ``period`` s
        marks it dead, an echo again alive (the controller's rule for engines it cannot poll)."""
        assert self.client is not None
        # an AsyncKernelClient's context is a zmq.asyncio one: so is this socket
        sock = cast(zmq.asyncio.Socket, self.client.connect_hb())
        sock.setsockopt(zmq.REQ_RELAXED, 1)  # a lost echo must not wedge the REQ socket
        sock.setsockopt(zmq.REQ_CORRELATE, 1)
        last = time.monotonic()
        try:
            while True:
                with contextlib.suppress(zmq.ZMQError):
                    await sock.send(b"ping", zmq.NOBLOCK)
                try:
                    await asyncio.wait_for(sock.recv(), period / 3)
                    last = time.monotonic()
                    if self.dead is not None:
                        self.dead = None
                        changed()
                    await asyncio.sleep(period / 3)
                except asyncio.TimeoutError:
                    silent = time.monotonic() - last
                    if self.dead is None and silent > period:
                        self.dead = f"stopped answering heartbeats (none for {silent:.1f} s)"
                        changed()
        finally:
            sock.close(linger=0)

    async def _read(self, changed: Any) -> None:
        assert self.client is not None
        self.first = asyncio.ensure_future(self._first_state(changed))
        while True:
            try:
                msg = await self.client.get_iopub_msg()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad message: log it, keep watching
                log.warning("engine %s: unreadable IOPub message: %s", self.eid, exc)
                continue
            try:
                news = self._on_iopub(msg)
            except Exception as exc:  # a signed message of the wrong shape: skip it
                log.warning(
                    "engine %s: malformed IOPub message %r skipped: %s: %s",
                    self.eid,
                    str(msg.get("msg_type"))[:40],
                    type(exc).__name__,
                    exc,
                )
                continue
            if news:
                changed()

    def _on_iopub(self, msg: dict) -> bool:
        mtype = msg["header"].get("msg_type")
        parent = msg.get("parent_header") or {}
        content = msg.get("content") or {}
        if mtype == "execute_input":
            code = content.get("code") or ""
            self.codes[parent.get("msg_id", "")] = code
            if len(self.codes) > 64:
                self.codes.pop(next(iter(self.codes)))
            if self.state == "busy" and parent.get("msg_id") == self.parent:
                self.running = code
                return True
            return False
        if mtype != "status" or parent.get("msg_type") in CONTROL_MSG_TYPES:
            return False  # the engine's state follows its shell only (as the controller's)
        if parent.get("msg_type") == "kernel_info_request":
            return False  # a probe (ours or another server's): says nothing of what it runs
        state = content.get("execution_state")
        if state == "busy":
            self.state, self.parent = "busy", parent.get("msg_id", "")
            self.busy_since = time.time()
            kind = parent.get("msg_type") or ""
            self.running = self.codes.get(self.parent, "" if kind == "execute_request" else kind)
            return True
        if state == "idle" and self.parent in ("", parent.get("msg_id")):
            self.state, self.running, self.busy_since = "idle", "", None
            return True
        return False

    def row(self, usage: dict) -> dict:
        return {
            "id": self.eid,
            "state": self.state,
            "running": self.running,
            "busy_since": self.busy_since,
            "pid": self.pid,
            "host": self.host,
            "kernel_name": self.kernel_name,
            "debugger": self.debugger,
            "watch_error": self.failed,
            **usage,
        }


def _scan(procs: dict[tuple, psutil.Process]) -> dict[str, dict]:
    """(worker thread) Every cluster file: its ``describe`` entry, spec, and per-engine
    liveness and usage for engines on this host."""
    here = socket.gethostname()
    found: dict[str, dict] = {}
    for path in clusterfile.cluster_files():
        entry = clusterfile.describe(path)
        try:
            spec = clusterfile.read_spec(path)
        except (NoClusterError, ValueError):
            spec = None
        usage: dict[int, dict] = {}
        for e in (spec or {}).get("engines", []):
            ident = clusterfile.engine_identity(e, spec or {})
            u: dict[str, Any] = {"local": False, "dead": None, "rss": None, "cpu": None}
            if ident is not None and ident.get("host") == here:
                u["local"] = True
                proc, why = clusterfile.same_process(ident)
                if proc is None:
                    u["dead"] = why or "its process is gone"
                else:
                    key = (ident["pid"], ident.get("create_time"))
                    proc = procs.setdefault(key, proc)
                    try:
                        family = [proc, *proc.children(recursive=True)]
                        u["rss"] = sum(p.memory_info().rss for p in family)
                        u["cpu"] = round(proc.cpu_percent(interval=None), 1)
                    except psutil.Error:
                        pass
            usage[e["id"]] = u
        owner_state = clusterfile.owner_state(spec)[0] if spec else "gone"
        found[cluster_key(path)] = {
            "describe": entry,
            "spec": spec,
            "usage": usage,
            "owner_state": owner_state,
        }
    return found


class Watcher:
    """Every cluster of this user, watched from the package's loop thread."""

    def __init__(self, interval: float = SCAN_INTERVAL) -> None:
        self.interval = interval
        self._clusters: dict[str, dict[int, EngineWatch]] = {}  # loop thread only
        self._procs: dict[tuple, psutil.Process] = {}  # the scan thread only (one at a time)
        self._scanned: dict[str, dict] = {}
        self._snapshot: dict = {"clusters": [], "time": time.time()}
        self._task: Future | None = None
        self._dirty = False
        #: one scan at a time: an action's scan_now waits for the running one, then scans anew
        self._scanning = asyncio.Lock()

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        if self._task is None:
            self._task = _loop.submit(self._run())

    def stop(self) -> Future:
        """Stop watching (every subscriber closed once the future resolves)."""
        return _loop.submit(self._stop())

    def snapshot(self) -> dict:
        """The last published state of every cluster (JSON-ready; never changed after)."""
        return self._snapshot

    def scan_now(self) -> Future:
        """Rescan at once (after an action); the future resolves once the snapshot is new."""
        return _loop.submit(self._scan_once())

    def interrupt(self, key: str, eids: list[int]) -> Future:
        """Send ``interrupt_request`` on the control channel of engines ``eids``."""
        return _loop.submit(self._interrupt(key, eids))

    # ------------------------------------------------------------------ loop thread
    async def _run(self) -> None:
        while True:
            try:
                await self._scan_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ipy_multiengine: scanning cluster files failed")
            await asyncio.sleep(self.interval)

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for engines in self._clusters.values():
            for w in engines.values():
                w.stop()
        self._clusters.clear()

    async def _scan_once(self) -> None:
        async with self._scanning:
            await self._scan_and_apply()

    async def _scan_and_apply(self) -> None:
        scanned = await asyncio.to_thread(_scan, self._procs)
        for key in set(self._clusters) - set(scanned):
            for w in self._clusters.pop(key).values():
                w.stop()
        for key, found in scanned.items():
            spec = found["spec"]
            engines = self._clusters.setdefault(key, {})
            entries = {e["id"]: e for e in (spec or {}).get("engines", [])}
            watchable = found["describe"].get("state") in ("running", "degraded", "attached")
            for eid in set(engines) - set(entries):
                engines.pop(eid).stop()
            for eid, e in entries.items():
                old = engines.get(eid)
                attempts = 0
                if (
                    old is not None
                    and old.connection == e["connection"]
                    and old.pid == e.get("pid")
                    and old.host == (e.get("host", spec.get("host")) or "")
                ):
                    if old.failed is None or not self._retry_due(old):
                        continue  # the same process as before (or its failed watch, resting)
                    attempts = old.attempts  # the same process: a retry of its failed watch
                if old is not None:
                    old.stop()  # restarted: a new process or new ports
                    del engines[eid]
                u = found["usage"].get(eid, {})
                if watchable and not u.get("dead"):
                    w = engines[eid] = EngineWatch(eid, e, spec, remote=not u.get("local"))
                    w.attempts = attempts + 1
                    try:
                        w.start(self._changed)
                    except Exception as exc:
                        w.fail(f"watch could not start: {type(exc).__name__}: {exc}")
        self._scanned = scanned
        self._publish()

    def _retry_due(self, w: EngineWatch) -> bool:
        """Is it time to start a failed watch again? Back off (one scan interval, doubled per
        failure, at most 30 s); after ``MAX_WATCH_ATTEMPTS`` it stays failed (shown so)."""
        if w.attempts >= MAX_WATCH_ATTEMPTS:
            if "gave up" not in (w.failed or ""):
                w.failed = f"{w.failed} (gave up after {w.attempts} attempts)"
            return False
        delay = min(self.interval * 2 ** (w.attempts - 1), 30.0)
        return time.monotonic() - w.failed_at >= delay

    def _changed(self) -> None:
        """(loop thread) An engine's state changed: publish (coalesced within one loop turn)."""
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_soon(self._publish)

    def _publish(self) -> None:
        self._dirty = False
        clusters = []
        for key, found in sorted(self._scanned.items()):
            d = found["describe"]
            spec = found["spec"] or {}
            watches = self._clusters.get(key, {})
            rows = []
            for e in spec.get("engines", []):
                usage = dict(found["usage"].get(e["id"], {}))
                w = watches.get(e["id"])
                if w is None:
                    w = EngineWatch(e["id"], e, spec)  # not watched (dead, stale): its file entry
                row = w.row(usage)
                if usage.get("dead"):
                    row["state"] = "dead"
                elif w.failed:  # not watched any more: what it does is not known
                    row["state"] = "unknown"
                elif w.dead:  # by heartbeat: an engine psutil cannot see
                    row["state"], row["dead"] = "dead", w.dead
                elif d.get("state") == "stale":
                    row["state"] = "stale"
                rows.append(row)
            owner_state = found["owner_state"]
            clusters.append(
                {
                    "id": key,
                    "file": d.get("file"),
                    "profile": d.get("profile"),
                    "shared": d.get("shared"),
                    "state": d.get("state"),
                    "owner": d.get("owner"),
                    "launcher": d.get("launcher"),
                    "serves_requests": "requests" in spec.get("serves", []),
                    "remote": owner_state == "remote",
                    "can": _can(d, spec, owner_state),
                    "engines": rows,
                }
            )
        self._snapshot = {"clusters": clusters, "time": time.time()}

    async def _interrupt(self, key: str, eids: list[int]) -> list[int]:
        engines = self._clusters.get(key, {})
        sent = []
        for eid in eids:
            w = engines.get(eid)
            if w is not None and w.client is not None:
                w.client.control_channel.send(w.client.session.msg("interrupt_request", {}))
                sent.append(eid)
        return sent


def _can(d: dict, spec: dict, owner_state: str) -> list[str]:
    """What this server can do to a cluster: interrupt (control channel), restart and stop
    (owner requests, from a local owner that serves them)."""
    if d.get("state") in ("stale",) or not spec:
        return []
    can = ["interrupt", "console"]
    if "requests" in spec.get("serves", []) and owner_state == "alive":
        can.append("restart")
        if d.get("shared"):
            can.append("stop")
    return can
