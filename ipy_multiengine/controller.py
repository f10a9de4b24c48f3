"""The controller: owns every engine's ZMQ channels on the background loop and routes replies.

Each request sent to an engine gets a ``concurrent.futures.Future``. Replies and IOPub
messages are routed by ``parent_header.msg_id`` (comm replies by their ``rid``) to the
request that caused them, so any number of requests can be in flight on any number of
engines. An ``execute`` completes when both its ``execute_reply`` and its ``status: idle``
have arrived, so no output is lost; a comm operation completes on its explicit reply.

The controller knows nothing of magics or result formatting: it hands back plain dicts
(execute) and raw frames (comm operations).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import DELIM, Session

from . import _loop, wire
from .errors import EngineError, RefusedError, RemoteError
from .wire import CONTROL_MSG_TYPES, INSTALL_CODE

log = logging.getLogger("ipy_multiengine")

#: Seconds to wait for ``status: idle`` after a reply before declaring the output lost.
IDLE_GRACE = 5.0
#: Milliseconds a closing client waits for its comm_close messages to leave.
CLOSE_LINGER_MS = 500
#: Seconds the first ping on an engine's fast socket may take before its socket is closed and
#: the comm carries its data for good (the port unreachable from here: a firewall, an SSH tunnel
#: of the kernel's ports only). Connecting waits only FAST_PROBE_RTTS kernel_info round trips
#: for it (at least FAST_PROBE_MIN s): a later answer switches the engine to the fast path then.
FAST_PROBE = 3.0
FAST_PROBE_MIN = 0.3
FAST_PROBE_RTTS = 10
#: A data operation unanswered on the fast socket for FAST_LOST_AFTER s gets a ping behind it;
#: once the engine has answered a later one, it has FAST_LOST_GRACE s more (its reply may come
#: behind its output on IOPub) before it fails as lost, and what waited behind it goes on.
FAST_LOST_AFTER = 1.0
FAST_LOST_GRACE = 2.0
#: Seconds ``interrupt_sent`` waits for engines to acknowledge; one that has not by then is
#: also interrupted the plain way (its owner's signal or ``interrupt_request``).
INTERRUPT_ACK = 1.0
#: Seconds ``_after_iopub`` waits for IOPub to catch up (an engine's output before its
#: ``input()`` shown before the prompt) before it goes on without.
IOPUB_BARRIER_WAIT = 2.0
#: Operations that are the controller's own bookkeeping, never owed an interrupt.
_NOT_INTERRUPTED = ("open", "ping")
#: Messages a channel may still deliver, read at once, when its engine dies or is restarted.
DRAIN_LIMIT = 1000
#: Finished executes per engine whose late output (``wire.LateOutput``) is still routed to them
#: by its parent msg_id (the oldest are forgotten: their output is then late output of an
#: earlier command, kept on no record, never given to another command).
LATE_ROUTES = 256
#: Data operations that run no code of the user's (no thread of theirs starts there): output
#: the kernel labels with one is labelled as it was before it (``EngineConn.late_aliases``).
_LABELLESS = frozenset({"push", "pull", "ping"})
#: IOPub messages that are output of a request (kept on it, or late on its record).
_OUTPUT_TYPES = frozenset(
    ("stream", "display_data", "execute_result", "update_display_data", "error", "clear_output")
)
#: Seconds between liveness polls of engines.
POLL_INTERVAL = 0.5
#: Default heartbeat period (s) for engines without a local process to poll: an engine that
#: has not echoed a beat for this long is declared dead. Beats go out every third of it.
HEARTBEAT_PERIOD = 3.0
#: The loop notes the time every STALL_TICK s; a gap longer than STALL_LIMIT means it was not
#: running (a user thread held the GIL, the process was stopped). Missed beats and overdue
#: replies are judged on the time the loop has been awake since, never across a stall.
STALL_TICK = 0.1
STALL_LIMIT = 0.5

Listener = Callable[[int, str, dict], None]

# The fast socket's per-message work, done without pyzmq's sugar: its IntFlag constants cost an
# enum construction for each ``|`` and ``&`` (7% of the client's instructions per data call,
# callgrind), its ``send_multipart`` adds a Python call per frame, its ``recv_multipart`` an
# option read per frame. The backend's methods with plain ints do the same zmq calls.
_SEND_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_zsend: Callable[..., Any] = zmq.backend.Socket.send
_zrecv: Callable[..., Any] = zmq.backend.Socket.recv
_zget: Callable[[Any, int], Any] = zmq.backend.Socket.get  # (EVENTS: an int)


class EngineStatus(enum.StrEnum):
    """What an engine is doing, as its shell channel says (a ``str``: compares to "idle")."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RESTARTING = "restarting"
    DEAD = "dead"


_STATUSES = {s.value: s for s in EngineStatus}


@dataclass(frozen=True)
class EngineState:
    """An immutable snapshot of one engine, published by the loop thread at every change.

    Any thread may read it; only the controller's loop changes engines (rule: loop state
    stays on the loop). ``generation`` grows by one each time the engine is (re)connected.
    """

    id: int
    state: EngineStatus
    language: str = ""
    busy_since: float | None = None
    running: str = ""
    in_flight: int = 0
    queued: int = 0
    pid: int | None = None
    host: str = ""
    dead: str | None = None
    ready: bool = False
    data_ok: bool = False
    #: why this engine's data operations are refused although its helper answered (a newer
    #: protocol; buffers it cannot sign on an exposed transport), or None
    data_refused: str | None = None
    encrypted: bool = False
    watched_by: str | None = None
    init_running: str = ""
    init_errors: tuple = ()
    kernel_info: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    engine_info: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    connection: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    generation: int = 0

    @property
    def unavailable(self) -> str | None:
        """Why this engine cannot take requests now (dead, restarting, starting), or None."""
        if self.dead:
            return f"is dead ({self.dead})"
        if not self.ready:
            if self.init_running:
                return f"is not ready yet (running its on_start code {_short(self.init_running)!r})"
            return (
                f"is not ready yet ({'restarting' if self.state == 'restarting' else 'connecting'})"
            )
        return None


_new_object = object.__new__
_set_dict = object.__setattr__


def _engine_state(values: dict[str, Any]) -> EngineState:
    """``EngineState(**values)`` for the loop, which builds two per data operation: its frozen
    dataclass ``__init__`` sets each of 22 fields through ``object.__setattr__`` (3.5 us per
    snapshot, 0.5 us this way). Every field must be given (checked in tests)."""
    snap = _new_object(EngineState)
    _set_dict(snap, "__dict__", values)  # (values: a dict of its own, kept as the snapshot's)
    return snap


@dataclass
class Request:
    """One message sent to one engine, and what came back for it."""

    msg_id: str
    eid: int
    kind: str  # 'execute' | 'comm' | 'shell' | 'control'
    future: Future
    channel: str = "shell"  # the channel it was sent on: only shell requests are ordered
    code: str = ""
    op: str = ""
    listener: Listener | None = None
    #: called on this thread with (engine, units done so far) when the engine reports how far
    #: a long operation got (a map block: ``{"status": "progress"}`` before its reply)
    on_progress: Callable[[int, int], None] | None = None
    reply: dict | None = None
    idle: bool = False
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    lost: bool = False
    sent: float = field(default_factory=time.monotonic)
    listener_error: BaseException | None = None
    stdin_shown: tuple = (0, 0)  # how much of its stdout, stderr an input prompt has shown already
    sent_chained: bool = False  # its ``future.sent`` resolves when zmq's send completes
    held: bool = False  # waiting for the other path's earlier requests (see Controller._gate)
    overdue: bool = False  # a later fast request was answered: it fails if no reply comes soon
    heard: float = 0.0  # (monotonic) when its last output arrived
    #: the engine's execution count for it (its ``execute_input``): the ``In [n]`` of an
    #: execute whose engine dies before replying
    number: int | None = None
    silent: bool = False  # an execute whose output nobody keeps (no late output is its)


class RequestFuture(Future):
    """The future of one request to one engine. For a request whose frames are tracked
    (issue 11.2), ``sent`` is a second future that resolves, on the loop, with a zmq
    ``MessageTracker`` (or None) once zmq holds the frames; otherwise ``sent`` is None.

    It is *running* from its creation: ``cancel()`` returns False, as for any call that may have
    begun. A request handed to the engines cannot be taken back by a local flag: a cancelled
    future (``cancel()`` True, "will not run") was finished here while its engine still ran it
    later, and neither ``mec.interrupt()`` nor ``abort()`` named it any more. ``pr.abort()``
    skips a request not begun, ``mec.interrupt()`` stops one that has."""

    def __init__(self, track: bool = False) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()
        self.sent: Future | None = Future() if track else None
        #: wall-clock times (``time.time()``, for display): submitted by the caller; started
        #: when the engine said busy for it (None if it never did: comm ops during an async
        #: cell); completed when its result (or error) arrived. Written once each, on the loop.
        #: Durations use the ``mono`` times of the same instants (``time.monotonic()``): the
        #: wall clock may jump.
        self.submitted: float = time.time()
        self.started: float | None = None
        self.completed: float | None = None
        self.mono: dict[str, float] = {"submitted": time.monotonic()}

    def stamp(self, name: str) -> None:
        """(loop) Record now as time ``name`` ('started', 'completed'), wall and monotonic."""
        setattr(self, name, time.time())
        self.mono[name] = time.monotonic()


@dataclass
class CommReply:
    """The reply to a comm operation: its JSON part and its binary frames."""

    content: dict
    frames: list[Any]
    #: what the operation's function printed or displayed on the engine (kept for the user)
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict] = field(default_factory=list)


_generations = itertools.count(1)

#: Groups of refusals an engine connection keeps at most (a forged flood cannot grow them).
MAX_REFUSAL_GROUPS = 64


@dataclass
class Refusals:
    """``count`` fast messages refused or dropped unread at one moment, ``why``, and the ids
    of this engine's fast requests unanswered then: only those can be theirs. It ends with
    them (answered, lost or failed), so that a count no request consumed (a dropped progress
    report, a forged message) does not label a later loss."""

    count: int
    why: str
    candidates: set[str]


def _count_refusals(
    conn: EngineConn, groups: list[Refusals], count: int, why: str, answered: Any = None
) -> None:
    """(loop) Record ``count`` refusals among the fast requests of ``conn`` unanswered now
    (not ``answered``, the request whose reply told of them)."""
    live = {
        m
        for m, r in conn.requests.items()
        if r.channel == "fast" and not r.held and r is not answered
    }
    groups[:] = [g for g in groups if g.candidates & conn.requests.keys()]
    if live and count > 0:
        groups.append(Refusals(min(count, len(live)), why, live))
        del groups[:-MAX_REFUSAL_GROUPS]


def _take_refusal(conn: EngineConn, groups: list[Refusals], req: Request) -> str | None:
    """(loop) Why lost request ``req`` was refused, when a recorded refusal can be its own
    (it was unanswered when the refusal was counted); that refusal is used up. None: its loss
    is not explained by a refusal."""
    why = None
    for group in groups:
        group.candidates &= conn.requests.keys()
        if why is None and group.count > 0 and req.msg_id in group.candidates:
            group.count -= 1
            why = group.why
        group.candidates.discard(req.msg_id)
        group.count = min(group.count, len(group.candidates))
    groups[:] = [g for g in groups if g.count > 0]
    return why


class EngineConn:
    """One engine's sockets, session and in-flight requests (used only on the loop thread;
    other threads read its ``EngineState`` snapshots)."""

    def __init__(self, eid: int, info: dict, liveness: Callable[[], str | None] | None) -> None:
        self.eid = eid
        self.info = info
        self.liveness = liveness
        key = info.get("key", "")
        self.session = Session(
            key=key.encode() if isinstance(key, str) else key,
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
            username="ipy_multiengine",
        )
        #: ``Session.sign`` in one C call (``hmac.digest`` of the parts joined: the same HMAC)
        self.sign = wire.signer(self.session)  # of its fast messages (``wire.fast_frames``)
        self.comm_id = uuid.uuid4().hex
        self.identity = os.urandom(16).hex().encode()  # of our DEALER sockets (``_socket``)
        self.requests: dict[str, Request] = {}
        self.state = "starting"
        self.dead: str | None = None
        self.data_ok = False
        self.language = ""
        self.kernel_info: dict = {}
        self.engine_info: dict = {}
        #: asyncio sockets, but the fast one is a plain zmq socket (``Controller._open_fast``)
        self.sockets: dict[str, Any] = {}
        self.tasks: list[asyncio.Task] = []
        self.iopub_seen = asyncio.Event()
        self.busy_since: float | None = None
        self.running: str = ""
        self.ready = False  # connected, helper installed and on_start code run
        self.heartbeat = False  # watched by heartbeats (no local process to poll)
        self.last_beat = time.monotonic()
        self.beats = 0
        self.dead_by_heartbeat = False
        #: an owner's restart began on this connection (``begin_restart``): the one a failed
        #: restart leaves dead, not one that restart made (which says why itself)
        self.restart_began = False
        self.init_errors: list[BaseException] = []
        self.init_task: asyncio.Task | None = None  # the on_start code, while it runs
        self.init_running: str = ""  # the on_start code running now
        self.generation = next(_generations)
        self.shell_idle = asyncio.Event()  # set at a shell idle, cleared at busy
        #: data operations go on the engine's fast socket (issue 15.2), not the comm
        self.fast = False
        #: the fast socket's messages sign a digest of their buffers (TCP without CurveZMQ)
        self.fast_digest = False
        #: the comm's messages sign a digest of their buffers (``bd`` in their data), both ways
        self.comm_digest = False
        #: why data operations on this engine are refused (``Controller._check_engine_info``)
        self.data_refused: str | None = None
        #: the id of the last request of the user's sent to this engine (``interrupt_sent``)
        self.last_request = ""
        #: requests held back to keep this engine's order across the shell and the fast socket
        self.held: collections.deque[tuple[dict, Request, list]] = collections.deque()
        self.releasing = False
        self.draining = False  # ``Controller._drain`` runs (it dispatches: never re-entered)
        self.rtt = 0.0  # seconds of a kernel_info round trip while connecting
        self.probe: Request | None = None  # a ping sent behind an unanswered fast operation
        #: messages of ours the engine's fast socket left unanswered for failing their signature
        #: (changed on the way), as its replies report them (``Controller._lost`` says why
        #: their requests are lost)
        self.fast_unchecked: list[Refusals] = []
        #: messages from its fast socket this client dropped for failing their signature (the
        #: requests whose replies they were are lost)
        self.fast_dropped: list[Refusals] = []
        self.published_key: tuple | None = None  # what its last snapshot showed
        #: control requests whose status on IOPub calls back (``Controller._after_iopub``)
        self.iopub_barriers: dict[str, Callable[[], None]] = {}
        #: finished executes' late output holders (weakly: a record the user dropped is freed),
        #: by msg_id: output parented to one of them goes there
        self.late_routes: collections.OrderedDict[str, tuple[int | None, Any]] = (
            collections.OrderedDict()
        )
        #: the request the kernel labels a thread's output with (its latest shell or fast
        #: request), as it labelled it before a push or pull; and, for each push or pull sent,
        #: that label (``_LABELLESS``: the output is of the request before it)
        self.late_label = ""
        self.late_aliases: collections.OrderedDict[str, str] = collections.OrderedDict()
        #: (the static part of ``published_key``, the snapshot fields it determines)
        self.published_static: tuple[tuple, dict[str, Any]] | None = None

    def url(self, channel: str) -> str:
        transport = self.info.get("transport", "tcp")
        ip = self.info.get("ip", "127.0.0.1")
        if channel == "fast":
            fast = self.engine_info["fast"]
            if fast.get("transport") == "ipc":
                return f"ipc://{fast['path']}"
            return f"tcp://{ip}:{int(fast['port'])}"
        port = self.info[f"{channel}_port"]
        return f"{transport}://{ip}:{port}" if transport == "tcp" else f"{transport}://{ip}-{port}"


def _fast_frames(conn: EngineConn, header: dict, content: bytes) -> list[bytes]:
    """A request for ``conn``'s fast socket (``wire.fast_frames`` with its signer); the
    eavesdropper of tests/test_fastpath.py captures what this returns."""
    return wire.fast_frames(conn.sign, header, {}, content)


def _fast_decode(conn: EngineConn, frames: list[Any]) -> dict:
    """``wire.deserialize`` of a message from a fast socket (a DEALER's: no identities, the
    delimiter first), signed as ``conn.sign`` signs."""
    if frames and frames[0].bytes == DELIM:
        frames = frames[1:]
    else:
        frames = list(conn.session.feed_identities(frames, copy=False)[1])
    return wire.deserialize(conn.session, frames, conn.sign)


class Controller:
    """Multiplexes the channels of a set of engines from one background loop thread.

    ``engines`` maps engine id to connection info (the dict of a Jupyter connection file);
    ``liveness`` optionally maps engine id to a callable returning a reason string when the
    engine is dead (e.g. a process poll), ``None`` while it lives.
    """

    def __init__(
        self,
        engines: dict[int, dict],
        liveness: dict[int, Callable[[], str | None]] | None = None,
        timeout: float = 60.0,
        heartbeat: float | None = HEARTBEAT_PERIOD,
        max_message_size: int | None = None,
    ) -> None:
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError(
                f"heartbeat must be a positive number of seconds or None, not {heartbeat!r}"
            )
        self._liveness = dict(liveness or {})
        self._engines: dict[int, EngineConn] = {}
        #: engine id -> its latest snapshot, changed on the loop one key at a time (an atomic
        #: dict operation, never iterated there from another thread); ``states()`` copies it
        #: once per change that a reader asks for, not once per message (issue 15.3: a mapping
        #: of every engine built at each publish made the client's CPU per message grow with
        #: the engine count)
        self._published: dict[int, EngineState] = {}
        #: bumped after each change of ``_published``; ``states()``' copy is of this version
        self._published_version = 0
        self._states: tuple[int, Mapping[int, EngineState]] = (0, MappingProxyType({}))
        #: (loop) new engines being added to a running controller: unpublished until their
        #: connection has succeeded or failed, so no call on all engines sees one half added
        self._joining: set[int] = set()
        self._closed = False
        self._poller: asyncio.Task | None = None
        self._beater: asyncio.Task | None = None
        self._ctx: zmq.asyncio.Context | None = None
        #: seconds without an echoed heartbeat before an engine is declared dead (None: off)
        self.heartbeat = heartbeat
        #: replies whose binary frames exceed this many bytes are refused with an EngineError
        self.max_message_size = max_message_size
        #: code run (silently, in order) on every engine that connects after it was recorded
        self.init_code: list[str] = []
        #: called on the loop thread as ``on_dead(eid, reason)`` when an engine is found dead
        self.on_dead: Callable[[int, str], None] | None = None
        #: called on the loop thread as ``own_output(eid)`` when an engine's process is found
        #: ended: the end of what the process wrote itself (its log: a C library's message
        #: before an abort reaches nothing else), labelled, or ""; added to the errors of the
        #: requests its death fails. Must not block (a bounded read of a local file).
        self.own_output: Callable[[int], str] | None = None
        self._curve_keys = zmq.curve_keypair() if zmq.has("curve") else None
        self._stall_watch: asyncio.Task | None = None
        self._last_tick = time.monotonic()
        #: (loop thread) when the loop last came back from a stall, and what it saw of them
        self._awake_since = 0.0
        self.stalls = 0
        self.longest_stall = 0.0
        self._to_connect: tuple[dict[int, dict], float] | None = (dict(engines), timeout)
        #: (loop) who is told of late output (``watch_late``)
        self._late_watchers: weakref.WeakSet[Any] = weakref.WeakSet()

    def connect(self, keep_failed: bool = False) -> Controller:
        """Connect to the engines given to the constructor (blocks until each is ready, or
        raises naming the one that is not); an explicit step: constructing does no I/O.

        ``keep_failed``: an engine that cannot be reached (dead in a running cluster, whose
        owner may restart it) is kept as dead, saying why, while the others work; it raises
        only when no engine connects."""
        if self._to_connect is None:
            raise RuntimeError("this Controller is connected already")
        engines, timeout = self._to_connect
        self._to_connect = None
        _loop.run(self._start(engines, timeout, keep_failed))
        return self

    # ---------------------------------------------------------------- lifecycle (loop)
    async def _start(self, engines: dict[int, dict], timeout: float, keep_failed: bool) -> None:
        self._ctx = zmq.asyncio.Context()
        self._last_tick = self._awake_since = time.monotonic()
        self._stall_watch = self._spawn(self._watch_stalls())
        # watch processes while they start too: an engine that dies at startup fails at once
        self._poller = self._spawn(self._poll_liveness())
        try:
            await self._add_engines(
                engines,
                timeout,
                keep_others=keep_failed,
                failed_as="not reachable when this client connected",
            )
        except Exception as exc:
            if not keep_failed or not any(c.ready for c in self._engines.values()):
                await self._close()
                raise
            dead = sorted(c.eid for c in self._engines.values() if c.dead)
            log.warning("connected without engines %s: %s", dead, exc)
        except BaseException:
            await self._close()
            raise
        if self.heartbeat:
            self._beater = self._spawn(self._heartbeats())

    def add_engines(
        self,
        engines: dict[int, dict],
        liveness: dict[int, Callable[[], str | None]] | None = None,
        timeout: float = 60.0,
        forget_failed: bool = False,
    ) -> None:
        """Connect (or reconnect, replacing the old connection) engines by id; blocks until
        ready. ``forget_failed``: a new id whose connection fails is dropped, never listed (its
        owner stops it), instead of being kept as dead for a restart."""
        if self._closed:
            raise EngineError("this client is closed")
        _loop.run(self.add_engines_async(engines, liveness, timeout, forget_failed))

    async def add_engines_async(
        self,
        engines: dict[int, dict],
        liveness: dict[int, Callable[[], str | None]] | None = None,
        timeout: float = 60.0,
        forget_failed: bool = False,
    ) -> None:
        for eid in engines:
            if liveness and eid in liveness:
                self._liveness[eid] = liveness[eid]
            elif eid in self._liveness and liveness is not None:
                self._liveness.pop(eid)
        await self._add_engines(
            dict(engines), timeout, keep_others=True, forget_failed=forget_failed
        )
        if self.heartbeat and (self._beater is None or self._beater.done()):
            self._beater = self._spawn(self._heartbeats())

    def forget(self, eids: list[int], reason: str) -> None:
        """Drop engines ``eids`` altogether (their requests fail with ``reason``): engines an
        owner added and then stopped because they failed to start, which no restart can bring
        back and which must not stay listed as dead."""

        def drop() -> None:
            for eid in eids:
                conn = self._engines.pop(eid, None)
                if conn is not None:
                    self._teardown(conn, reason)
                self._liveness.pop(eid, None)
            self._unpublish(eids)

        _loop.run(_acall(drop))

    def set_unavailable(self, eids: list[int], reason: str) -> None:
        """Mark engines as unavailable (e.g. being restarted): calls to them fail at once."""

        def mark() -> None:
            for eid in eids:
                self._set_unavailable(eid, reason, reason)

        _loop.run(_acall(mark))

    async def begin_restart(self, eid: int, reason: str = "was restarted") -> None:
        """(coroutine, for owners) Engine ``eid`` is being restarted: not ready, shown as
        restarting (unless dead), its requests in flight fail with ``EngineError`` (``reason``)."""
        conn = self._engines.get(eid)
        if conn is not None:
            conn.restart_began = True
        self._set_unavailable(eid, "restarting", reason)

    def fail_restart(self, eid: int, reason: str) -> None:
        """(loop thread, for owners) The restart of engine ``eid`` failed (``reason``): it is
        dead, so that calls to it fail at once saying why (it stayed "restarting", and every
        call waited for a restart that would never end), and the owner hears of it like of
        any death once its restart has let go of the engine (auto_restart may try again); one
        dead before its restart now says the restart failed, and its owner hears of it too. An
        engine the restart did bring back (ready), whose new connection failed (dead already,
        saying why, its owner told), or that still runs its on_start code (it becomes ready by
        itself) is left alone."""
        conn = self._engines.get(eid)
        if conn is None or conn.ready:
            return
        if conn.dead and not conn.restart_began:
            return  # a connection this restart made, dead already: its owner heard why
        if not conn.dead and conn.init_task is not None and not conn.init_task.done():
            return
        if conn.sockets:
            self._teardown(conn, reason)
        # an engine dead before its restart (auto_restart's own case) still said how it died,
        # and its owner, told of that death only, never heard that the restart failed
        conn.dead = None
        self._mark_dead(conn, reason, notify_later=True)

    def _set_unavailable(self, eid: int, state: str, reason: str) -> None:
        conn = self._engines.get(eid)
        if conn is None:
            return
        self._drain(conn)  # what it sent before, to its requests (a restart kills it next)
        conn.ready = False
        if not conn.dead:
            conn.state = state
        self._fail_all(conn, reason)
        self._publish(conn)

    async def _add_engines(
        self,
        engines: dict[int, dict],
        timeout: float,
        keep_others: bool = False,
        forget_failed: bool = False,
        failed_as: str = "failed to start",
    ) -> None:
        wire.check_keys(engines, "the connection info given to this client")
        conns = [
            EngineConn(eid, info, self._liveness.get(eid)) for eid, info in sorted(engines.items())
        ]
        joining = {c.eid for c in conns if c.eid not in self._published} if keep_others else set()
        self._joining |= joining
        for conn in conns:
            old = self._engines.get(conn.eid)
            if old is not None:
                self._teardown(old, "engine was replaced")
            self._engines[conn.eid] = conn
            self._publish(conn)

        async def connect(c: EngineConn) -> None:
            await self._connect(c, timeout)
            self._connected(c)

        def still_starting(conn: EngineConn) -> bool:
            # alive, still running slow on_start code: it becomes ready by itself
            return conn.init_task is not None and not conn.init_task.done() and not conn.dead

        results: list[Any] = []
        try:
            results = await asyncio.gather(*(connect(c) for c in conns), return_exceptions=True)
        finally:
            # a new engine that failed and is to be forgotten is never published at all
            gone = {
                c.eid
                for c, r in zip(conns, results, strict=False)
                if forget_failed
                and c.eid in joining
                and isinstance(r, BaseException)
                and not c.ready
                and not still_starting(c)
            }
            self._joining -= joining
            for conn, res in itertools.zip_longest(conns, results):
                if conn.eid in gone:  # dropped first: the teardown publishes nothing
                    self._engines.pop(conn.eid, None)
                    self._liveness.pop(conn.eid, None)
                    self._teardown(conn, "startup failed")
                    continue
                self._publish(conn)
                if conn.eid in joining and conn.dead and not isinstance(res, BaseException):
                    # died while joining (its owner was not told: ``_notify_dead``), after its
                    # connection was made: told now (a failed one is told below)
                    asyncio.get_running_loop().call_soon(self._notify_dead, conn)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for conn, res in zip(conns, results, strict=True):
                if conn.eid in gone:
                    continue
                if keep_others:
                    if still_starting(conn):
                        continue
                    if conn.ready:
                        continue  # this one connected; only the others failed
                    # keep the id known (as dead) so the client can report and restart it
                    reason = res if isinstance(res, BaseException) else errors[0]
                    self._teardown(conn, "startup failed")
                    conn.dead = (
                        f"{failed_as}: {type(reason).__name__}: {reason}"
                        if not str(reason)
                        else f"{failed_as}: {reason}"
                    )
                    conn.state = "dead"
                    self._publish(conn)
                    # the owner hears of it like of any death (auto_restart retries), after the
                    # restart that failed has let go of the engine
                    asyncio.get_running_loop().call_soon(self._notify_dead, conn)
                else:
                    self._teardown(conn, "startup failed")
                    self._engines.pop(conn.eid, None)
                    self._unpublish([conn.eid])
            raise errors[0]

    def _socket(
        self, conn: EngineConn, channel: str, kind: int, plain: bool = False
    ) -> zmq.asyncio.Socket:
        """A socket to ``channel`` of ``conn``, kept in ``conn.sockets``; ``plain``: a sync
        zmq socket (of the same context) that the caller watches itself (the fast socket)."""
        assert self._ctx is not None
        sock = (
            zmq.Context.shadow(self._ctx.underlying).socket(kind)
            if plain
            else self._ctx.socket(kind)
        )
        sock.linger = 0
        server_key = conn.info.get("curve_publickey")
        if server_key:
            if self._curve_keys is None:
                raise EngineError(
                    f"engine {conn.eid} requires CurveZMQ encryption, which this pyzmq lacks",
                    conn.eid,
                )
            sock.curve_serverkey = (
                server_key.encode() if isinstance(server_key, str) else server_key
            )
            sock.curve_publickey, sock.curve_secretkey = self._curve_keys
        if kind == zmq.DEALER:
            # one random identity for all of this engine's DEALERs (the engine answers input
            # requests on the stdin socket of the shell's or fast socket's identity): not the
            # session id, which every IOPub subscriber reads in message headers and could take
            # over on the engine's ROUTERs by connecting first
            sock.setsockopt(zmq.IDENTITY, conn.identity)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.rcvhwm = 0  # never drop IOPub on our side
        sock.connect(conn.url(channel))
        conn.sockets[channel] = sock
        return sock

    async def _connect(self, conn: EngineConn, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for channel, kind in (
            ("iopub", zmq.SUB),
            ("shell", zmq.DEALER),
            ("control", zmq.DEALER),
            ("stdin", zmq.DEALER),
        ):
            if channel == "stdin" and "stdin_port" not in conn.info:
                # connection info without stdin: input() there raises StdinNotImplementedError
                continue
            sock = self._socket(conn, channel, kind)
            conn.tasks.append(self._spawn(self._reader(conn, channel, sock), conn))
        # The SUB socket misses messages until its subscription reaches the kernel: ask for
        # kernel_info until a reply has come *and* IOPub has delivered something.
        info_fut: Future | None = None
        while True:
            if conn.dead:
                raise EngineError(f"engine {conn.eid} died during startup: {conn.dead}", conn.eid)
            if info_fut is None or info_fut.done():
                if info_fut is not None and conn.iopub_seen.is_set():
                    break
                info_fut = self._send_shell(conn, "kernel_info_request", {}, kind="shell")
                info_sent = time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError(
                    f"engine {conn.eid} at {conn.url('shell')} did not answer kernel_info within "
                    f"{timeout:g} s",
                    conn.eid,
                )
            try:
                waiter = asyncio.wrap_future(info_fut)
                waiter.add_done_callback(_retrieve)  # no "exception never retrieved" noise
                await asyncio.wait_for(asyncio.shield(waiter), min(0.25, left))
                conn.rtt = time.monotonic() - info_sent  # a shell round trip, for _open_fast
            except asyncio.TimeoutError:
                pass
            if info_fut.done() and not conn.iopub_seen.is_set():
                try:
                    await asyncio.wait_for(conn.iopub_seen.wait(), min(0.25, max(left, 0.01)))
                except asyncio.TimeoutError:
                    info_fut = None
        conn.kernel_info = info_fut.result().reply or {}
        conn.language = conn.kernel_info.get("language_info", {}).get("name", "")
        conn.state = "idle"
        if self.heartbeat and conn.liveness is None and conn.info.get("hb_port"):
            sock = self._socket(conn, "hb", zmq.DEALER)
            sock.sndhwm = 10
            conn.heartbeat = True
            conn.last_beat = time.monotonic()
            conn.tasks.append(self._spawn(self._hb_reader(conn, sock), conn))
        if conn.language != "python":
            return
        install = self._send_shell(
            conn,
            "execute_request",
            wire.execute_content(INSTALL_CODE, silent=True),
            kind="execute",
            code=INSTALL_CODE,
            silent=True,
        )
        opened_id, opened = self._send_comm_open(conn)
        try:
            await _wait_for(
                install,
                deadline,
                f"engine {conn.eid} did not install the ipy_multiengine "
                f"helper within {timeout:g} s",
                conn.eid,
            )
        except RemoteError as err:
            log.warning(
                "engine %s: ipy_multiengine helper not importable (%s); execute only", conn.eid, err
            )
            opened.cancel()
            conn.requests.pop(opened_id, None)
            return
        reply = await _wait_for(
            opened,
            deadline,
            f"engine {conn.eid} did not open the ipy_multiengine comm within {timeout:g} s",
            conn.eid,
        )
        conn.engine_info = {
            k: v for k, v in reply.content.items() if k not in ("rid", "status", "bd")
        }
        conn.data_ok = True
        self._check_engine_info(conn)
        if isinstance(conn.engine_info.get("fast"), dict) and not conn.data_refused:
            await self._open_fast(conn, deadline)
        # the comm_open's own idle follows its reply: wait for it (briefly), so that a fresh
        # engine is shown idle, not busy, once it is ready
        if conn.state == "busy":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    conn.shell_idle.wait(), min(1.0, max(deadline - time.monotonic(), 0.01))
                )
        await self._run_init(conn, deadline, timeout)

    @staticmethod
    def _check_engine_info(conn: EngineConn) -> None:
        """(loop) Decide from the engine's connect info how its data operations go: refused
        (``data_refused``) when it speaks a newer protocol, or when its buffers would travel
        unsigned over TCP without CurveZMQ beyond loopback (an engine of an older version);
        else whether the comm's messages sign their buffers (``comm_digest``)."""
        info = conn.engine_info
        protocol = info.get("protocol", 0)
        if type(protocol) is not int or protocol > wire.PROTOCOL:
            conn.data_refused = (
                f"engine {conn.eid} speaks the ipy_multiengine data protocol {protocol!r}, newer "
                f"than this client's ({wire.PROTOCOL}): upgrade ipy_multiengine where this "
                "client runs; execute works, data operations are refused"
            )
            log.warning(conn.data_refused)
            return
        exposed = wire.buffers_exposed(
            conn.info.get("transport", "tcp"), bool(conn.info.get("curve_publickey"))
        )
        conn.comm_digest = bool(info.get("comm_digest"))
        if not exposed or conn.comm_digest:
            return
        ip = str(conn.info.get("ip", ""))
        if wire.is_loopback(ip):
            # changing loopback traffic takes root on the host, who can read the key anyway
            log.warning(
                "engine %s: an older ipy_multiengine (data protocol %s) that does not sign "
                "buffers; accepted on loopback TCP",
                conn.eid,
                protocol,
            )
            return
        conn.data_refused = (
            f"engine {conn.eid} runs an older ipy_multiengine (data protocol {protocol}) that "
            f"does not sign the buffers of data operations, and TCP to {ip} without CurveZMQ "
            "lets whoever is on the path change those pickles (running code there or here): "
            "data operations are refused, execute works (it is signed whole). Upgrade "
            "ipy_multiengine on the engine, or encrypt its connection "
            "(transport_encryption='auto' or 'required')"
        )
        log.warning(conn.data_refused)

    async def _open_fast(self, conn: EngineConn, deadline: float) -> None:
        """Connect to the engine's fast socket and ping it; when the ping does not come back
        (within FAST_PROBE s), close it: the comm carries this engine's data, as before."""
        if (
            conn.engine_info["fast"].get("transport") == "ipc"
            and conn.info.get("transport") != "ipc"
        ):
            return  # a unix socket on the engine's host is not ours to reach
        fast = conn.engine_info["fast"]
        tcp = fast.get("transport") != "ipc"
        signed = fast.get("signed")
        if not isinstance(signed, dict):
            if tcp:
                # an engine of an older version: its requests would name no engine and sign
                # no buffer, which anyone seeing the TCP traffic could redirect or change
                log.warning(
                    "engine %s: its fast socket (an older version) does not sign buffers; "
                    "the comm carries its data",
                    conn.eid,
                )
                return
            signed = {}
        conn.fast_digest = bool(signed.get("digest")) or (
            tcp and not conn.info.get("curve_publickey")
        )
        try:
            sock = self._socket(conn, "fast", zmq.DEALER, plain=True)
        except (zmq.ZMQError, KeyError, ValueError) as exc:
            log.info("engine %s: fast socket unusable (%s); the comm carries data", conn.eid, exc)
            return
        sock.sndhwm = 0  # sends never fail for a full queue: the requests in flight bound it
        asyncio.get_running_loop().add_reader(int(sock.getsockopt(zmq.FD)), self._drain_fast, conn)
        req = self._send_ping(conn)
        began = time.monotonic()
        wait = min(FAST_PROBE, max(FAST_PROBE_MIN, FAST_PROBE_RTTS * conn.rtt))
        try:
            await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(req.future)),
                max(min(wait, deadline - began), 0.01),
            )
            conn.fast = True
            return
        except asyncio.TimeoutError:
            pass
        except (EngineError, RemoteError) as exc:
            log.info("engine %s: its fast socket failed (%s); the comm carries data", conn.eid, exc)
            self._close_fast(conn)
            return
        log.info(
            "engine %s: no answer on its fast socket within %.2f s; the comm carries data "
            "until it answers (at most %g s)",
            conn.eid,
            wait,
            FAST_PROBE,
        )

        def answered(fut: Future) -> None:
            if self._engines.get(conn.eid) is conn and "fast" in conn.sockets and not conn.dead:
                if fut.exception() is None:
                    conn.fast = True  # order with the shell requests before: _crossing
                    log.info("engine %s: its fast socket answers now; data goes there", conn.eid)
                else:
                    self._close_fast(conn)

        def give_up() -> None:
            if not req.future.done():
                conn.requests.pop(req.msg_id, None)
                self._close_fast(conn)

        req.future.add_done_callback(self._guarded(answered, conn, None))
        asyncio.get_running_loop().call_later(FAST_PROBE - wait, self._guarded(give_up, conn, None))

    def _send_ping(self, conn: EngineConn) -> Request:
        """(loop) A ping on ``conn``'s fast socket: it keeps no order with the shell channel."""
        msg = self._fast_msg(conn, conn.session.pack({"op": "ping"}))
        req = self._new_request(conn, "comm", msg["msg_id"], channel="fast", op="ping")
        conn.requests[req.msg_id] = req
        _relabel(conn, req)
        self._send(conn, "fast", msg)
        return req

    @staticmethod
    def _close_fast(conn: EngineConn) -> None:
        """(loop) Stop watching and close ``conn``'s fast socket, if it has one."""
        fast = conn.sockets.pop("fast", None)
        if fast is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(int(fast.getsockopt(zmq.FD)))
            fast.close(linger=0)

    async def _run_init(self, conn: EngineConn, deadline: float, timeout: float) -> None:
        """Run the recorded on_start code on a fresh engine, before anything else reaches it.

        Slow code is not an engine failure (issue 12.5): past the deadline an ``EngineError``
        names the engine and the code, while the code goes on running; the engine stays
        connected, is shown as running it, and becomes ready when it finishes.
        """
        codes = list(self.init_code)
        if not codes:
            return
        conn.init_task = task = asyncio.ensure_future(self._init_all(conn, codes))
        conn.tasks.append(task)
        try:
            await asyncio.wait_for(asyncio.shield(task), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise EngineError(
                f"engine {conn.eid}: its on_start code {_short(conn.init_running)!r} has not "
                "finished "
                f"within {timeout:g} s; it goes on running and the engine becomes ready when it is "
                "done (mec.wait_ready() waits for it; mec.interrupt() stops it)",
                conn.eid,
            ) from None

    async def _init_all(self, conn: EngineConn, codes: list[str]) -> None:
        for code in codes:
            conn.init_running = code
            fut = self._send_shell(
                conn, "execute_request", wire.init_content(code), kind="execute", code=code
            )
            self._publish(conn)
            try:
                await asyncio.wrap_future(fut)
            except (RemoteError, EngineError) as err:
                log.warning("engine %s: on_start code failed: %s", conn.eid, err)
                conn.init_errors.append(err)
                if conn.dead:
                    return
        conn.init_running = ""
        self._publish(conn)
        if (
            conn.init_task is not None
            and self._engines.get(conn.eid) is conn
            and conn.sockets
            and not conn.ready
            and not conn.dead
        ):
            self._connected(conn)  # finished after its restart gave up waiting: ready now

    def _connected(self, conn: EngineConn) -> None:
        conn.ready = True
        conn.last_beat = time.monotonic()
        if conn.state in ("starting", "idle"):
            conn.state = "idle"
        self._publish(conn)

    def _publish(self, conn: EngineConn) -> None:
        """(loop) Publish ``conn``'s snapshot: a new immutable ``EngineState`` in a new mapping."""
        if self._engines.get(conn.eid) is not conn:
            return  # replaced meanwhile: its successor speaks for the id
        if conn.eid in self._joining:
            return  # published once its connection is done (``_add_engines``)
        busy = conn.state == "busy" and not conn.dead
        in_flight = len(conn.requests)
        running, busy_since = conn.running, conn.busy_since
        if conn.fast and conn.state == "idle" and not conn.dead and conn.ready:
            # the fast socket has no busy/idle status messages: the engine is busy with the
            # oldest data operation of ours that it has not answered yet
            first = next(
                (
                    r
                    for r in conn.requests.values()
                    if r.channel == "fast" and not r.held and r.op != "ping"
                ),
                None,
            )
            if first is not None:
                busy, running, busy_since = True, first.op, first.sent
        ours = busy and running and not running.startswith("(a request from another")
        state = (
            EngineStatus.DEAD
            if conn.dead
            else EngineStatus.BUSY
            if busy
            else _STATUSES.get(conn.state, EngineStatus.RESTARTING)
        )
        # most messages change nothing a snapshot shows: building one (and a new mapping of
        # every engine) per message was the controller's largest cost per call (yappi)
        key = (
            state,
            busy_since if busy else None,
            running if busy else "",
            in_flight,
            ours,
            conn.dead,
            conn.ready,
            conn.data_ok,
            conn.data_refused,
            conn.heartbeat,
            conn.init_running,
            len(conn.init_errors),
            id(conn.kernel_info),
            id(conn.engine_info),
            len(conn.engine_info),
            conn.language,
            conn.generation,
        )
        if conn.published_key == key and conn.eid in self._published:
            return
        if self._engines.get(conn.eid) is not conn:
            return  # replaced or forgotten: a late update must not bring it back
        conn.published_key = key
        static = conn.published_static
        if static is None or static[0] != key[5:]:
            # what changes only with the engine's connection, not with each request
            static = conn.published_static = (
                key[5:],
                {
                    "id": conn.eid,
                    "language": conn.language,
                    "pid": conn.engine_info.get("pid"),
                    "host": conn.engine_info.get("host") or "",
                    "dead": conn.dead,
                    "ready": conn.ready,
                    "data_ok": conn.data_ok and not conn.data_refused,
                    "data_refused": conn.data_refused,
                    "encrypted": bool(conn.info.get("curve_publickey")),
                    "watched_by": "heartbeat"
                    if conn.heartbeat
                    else ("process" if conn.liveness else None),
                    "init_running": conn.init_running,
                    "init_errors": tuple(conn.init_errors),
                    "kernel_info": MappingProxyType(conn.kernel_info),
                    "engine_info": MappingProxyType(conn.engine_info),
                    "connection": MappingProxyType(conn.info),
                    "generation": conn.generation,
                },
            )
        values = static[1].copy()
        values["state"] = state
        values["busy_since"] = busy_since if busy else None
        values["running"] = running if busy else ""
        values["in_flight"] = in_flight
        values["queued"] = max(in_flight - (1 if ours else 0), 0)
        snap = _engine_state(values)
        self._published[conn.eid] = snap
        self._published_version += 1

    def _unpublish(self, eids: list[int]) -> None:
        """(loop) Drop the snapshots of engines ``eids``: no longer listed."""
        for eid in eids:
            self._published.pop(eid, None)
        self._published_version += 1

    def _teardown(self, conn: EngineConn, reason: str) -> None:
        self._fail_all(conn, reason)
        for t in conn.tasks:
            t.cancel()
        self._close_fast(conn)
        for s in conn.sockets.values():
            s.close(linger=0)
        conn.sockets.clear()
        self._publish(conn)

    async def _close(self) -> None:
        for task in (self._poller, self._beater, self._stall_watch):
            if task:
                task.cancel()
        flushing = False
        for conn in self._engines.values():
            shell = conn.sockets.get("shell")
            if conn.data_ok and not conn.dead and shell is not None:
                # close our comm on the engine, or every client ever connected leaves one behind
                try:
                    self._send(
                        conn,
                        "shell",
                        conn.session.msg("comm_close", {"comm_id": conn.comm_id, "data": {}}),
                    )
                    conn.sockets.pop("shell").close(linger=CLOSE_LINGER_MS)  # let it leave
                    flushing = True
                except Exception as exc:
                    log.debug("engine %s: could not send comm_close: %s", conn.eid, exc)
            self._teardown(conn, "the client was closed")
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            if not flushing:
                ctx.destroy(linger=0)
                return
            # term() waits (at most CLOSE_LINGER_MS) for the comm_close messages to leave: in a
            # short-lived thread, not on the loop every client shares
            loop = asyncio.get_running_loop()
            done = loop.create_future()

            def term() -> None:
                try:
                    ctx.destroy(linger=0)
                finally:
                    loop.call_soon_threadsafe(_resolve, done)

            threading.Thread(target=term, name="ipy_multiengine-close", daemon=True).start()
            await asyncio.wait_for(done, CLOSE_LINGER_MS / 1000 + 2)

    # ---------------------------------------------------------------- no lost exceptions (loop)
    def _spawn(self, coro: Any, conn: EngineConn | None = None) -> asyncio.Task:
        """A long-lived task whose unexpected end fails the requests it serves (never silent)."""
        task = asyncio.ensure_future(coro)

        def ended(t: asyncio.Task) -> None:
            exc = None if t.cancelled() else t.exception()
            if exc is None:
                return
            log.error(
                "ipy_multiengine I/O task %s failed", getattr(coro, "__name__", coro), exc_info=exc
            )
            for c in [conn] if conn is not None else list(self._engines.values()):
                self._fail_requests(c, exc)

        task.add_done_callback(ended)
        return task

    def _fail_requests(self, conn: EngineConn, exc: BaseException) -> None:
        """Fail every request in flight on ``conn`` with ``exc`` (an error of our own I/O code)."""
        for req in list(conn.requests.values()):
            self._finish(conn, req, exc=exc)

    def _guarded(
        self, fn: Callable[..., Any], conn: EngineConn, req: Request | None
    ) -> Callable[..., None]:
        """``fn`` for a loop callback: an exception fails ``req`` (or all of ``conn``'s) with it."""

        def run(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                log.error("engine %s: a callback on the I/O thread failed", conn.eid, exc_info=exc)
                if req is not None:
                    self._finish(conn, req, exc=exc)
                else:
                    self._fail_requests(conn, exc)

        return run

    def _call_later(
        self, delay: float, fn: Callable[..., None], conn: EngineConn, req: Request
    ) -> None:
        """``fn(conn, req)`` after ``delay`` seconds *of a running loop*: re-armed after a stall,
        so that messages that arrived while the loop was stopped are read first; guarded.
        ``req`` is held weakly: a request that finished meanwhile is not kept alive with its
        result (whatever the user drops is freed), and ``fn`` has nothing to do for it."""
        armed = time.monotonic()
        ref = weakref.ref(req)
        del req

        def fire() -> None:
            self._check_stall()
            awake = time.monotonic() - max(armed, self._awake_since)
            if awake < delay:
                asyncio.get_running_loop().call_later(delay - awake, fire)
                return
            req = ref()
            if req is not None:
                self._guarded(fn, conn, req)(conn, req)

        asyncio.get_running_loop().call_later(delay, fire)

    def _check_stall(self) -> None:
        now = time.monotonic()
        gap = now - self._last_tick
        if gap > STALL_LIMIT:
            self.stalls += 1
            self.longest_stall = max(self.longest_stall, gap)
            self._awake_since = now
            log.info(
                "the I/O loop did not run for %.1f s (GIL held by another thread, or the "
                "process was stopped); liveness is judged from now on",
                gap,
            )
        self._last_tick = now

    async def _watch_stalls(self) -> None:
        while True:
            self._check_stall()
            await asyncio.sleep(STALL_TICK)

    async def _poll_liveness(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                self._watch_fast()
            except Exception as exc:  # never lost: logged, and the poller goes on
                log.error("watching the fast sockets failed", exc_info=exc)
            for conn in list(self._engines.values()):
                if conn.dead or conn.liveness is None or conn.state == "restarting":
                    continue
                try:
                    reason = conn.liveness()
                except Exception as exc:  # a broken probe must not stop the poller
                    reason = None
                    log.debug("liveness probe for engine %s failed: %s", conn.eid, exc)
                if reason:
                    try:
                        self._mark_dead(conn, reason, own_output=self._own_output(conn))
                    except Exception as exc:
                        log.error("engine %s: marking it dead failed", conn.eid, exc_info=exc)
                        self._fail_requests(conn, exc)

    async def _heartbeats(self) -> None:
        """Send a beat to every heartbeat-watched engine each third of the period; one task for
        all."""
        while self.heartbeat:
            period = self.heartbeat
            self._check_stall()
            now = time.monotonic()
            for conn in list(self._engines.values()):
                if not conn.heartbeat or "hb" not in conn.sockets:
                    continue
                # silence counts only while this loop was awake to hear (issue 11.7): a user
                # thread holding the GIL, or a SIGSTOP, delays our reading, not the engine
                silent = now - max(conn.last_beat, self._awake_since)
                if not conn.dead and conn.ready and silent > period:
                    conn.dead_by_heartbeat = True
                    try:
                        self._mark_dead(
                            conn, f"stopped answering heartbeats (none for {silent:.1f} s)"
                        )
                    except Exception as exc:
                        log.error("engine %s: marking it dead failed", conn.eid, exc_info=exc)
                        self._fail_requests(conn, exc)
                conn.beats += 1
                with contextlib.suppress(zmq.ZMQError):  # queue full: the engine is unreachable
                    conn.sockets["hb"].send(b"%d" % conn.beats, zmq.NOBLOCK)
            await asyncio.sleep(period / 3)

    async def _hb_reader(self, conn: EngineConn, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                await sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError:
                return
            conn.last_beat = time.monotonic()
            if conn.dead and conn.dead_by_heartbeat:
                log.warning("engine %s answers heartbeats again; marking it alive", conn.eid)
                conn.dead = None
                conn.dead_by_heartbeat = False
                conn.state = "idle"
                conn.ready = True
                self._publish(conn)

    def _own_output(self, conn: EngineConn) -> str:
        """(loop) What the owner's ``own_output`` says of ``conn``'s ended process, or ""."""
        if self.own_output is None:
            return ""
        try:
            return self.own_output(conn.eid) or ""
        except Exception as exc:  # the death is reported all the same, without it
            log.warning("engine %s: reading its own output failed: %s", conn.eid, exc)
            return ""

    def _mark_dead(
        self, conn: EngineConn, reason: str, notify_later: bool = False, own_output: str = ""
    ) -> None:
        """``conn`` is dead (``reason``, also what calls to it say from now on): what its
        sockets still hold is read, then its requests fail with ``EngineError``s saying why,
        followed by ``own_output`` (the end of what its process wrote itself) when given."""
        if conn.dead:
            return
        conn.dead = reason
        conn.state = "dead"
        conn.ready = False
        log.warning("engine %s %s", conn.eid, reason)
        self._drain(conn)  # its last words, still unread, go to their requests first
        self._fail_all(conn, reason, own_output)
        self._publish(conn)
        if notify_later:
            asyncio.get_running_loop().call_soon(self._notify_dead, conn)
        else:
            self._notify_dead(conn)

    def _notify_dead(self, conn: EngineConn) -> None:
        if (
            self.on_dead is not None
            and not self._closed
            and conn.dead
            and self._engines.get(conn.eid) is conn
            # not published yet: its owner hears of it once it is (``_add_engines``)
            and conn.eid not in self._joining
        ):
            try:
                self.on_dead(conn.eid, conn.dead)
            except Exception:
                log.exception("on_dead callback failed")

    def _drain(self, conn: EngineConn) -> None:
        """(loop) Route what ``conn``'s sockets hold unread (IOPub output, shell replies, fast
        replies) before its requests fail: an engine's last words before it died (or was
        restarted) had reached this process, but its death was noticed first. Non-blocking
        reads, at most DRAIN_LIMIT messages a channel: never holds the loop."""
        if conn.draining:
            return
        conn.draining = True
        try:
            for channel in ("iopub", "shell"):
                sock = conn.sockets.get(channel)
                if sock is None:
                    continue
                plain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
                for _ in range(DRAIN_LIMIT):
                    try:
                        frames = plain.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.ZMQError:  # empty (Again) or closed
                        break
                    self._on_frames(conn, channel, frames)
                    frames = None  # type: ignore[assignment]  # (issue 11 item 11)
                # reading EVENTS through the asyncio socket wakes its reader if we left some
                with contextlib.suppress(zmq.ZMQError):
                    sock.get(zmq.EVENTS)
            self._drain_fast(conn)
        except Exception as exc:  # never lost: logged; the requests fail with the death below
            log.error("engine %s: reading its last messages failed", conn.eid, exc_info=exc)
        finally:
            conn.draining = False

    def _fail_all(self, conn: EngineConn, reason: str, own_output: str = "") -> None:
        for _msg, req, _buffers in conn.held:  # failed below with the others, never sent now
            req.held = False
        conn.held.clear()
        for req in list(conn.requests.values()):
            self._finish(conn, req, exc=_death_error(conn, req, reason, own_output=own_output))

    # ---------------------------------------------------------------- receiving (loop)
    async def _reader(self, conn: EngineConn, channel: str, sock: zmq.asyncio.Socket) -> None:
        # drain with non-blocking reads on a plain shadow of the socket and await readiness
        # only when it is empty: one asyncio future per burst, not per message (issue 15.3)
        plain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        while True:
            try:
                frames = plain.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                try:
                    await sock.poll()  # POLLIN, no timeout (pyzmq's defaults)
                except asyncio.CancelledError:
                    raise
                except zmq.ZMQError:
                    return
                continue
            except zmq.ZMQError:
                return
            self._on_frames(conn, channel, frames)
            # do not keep the last message's frames alive until the next one arrives: once the
            # user drops a result, its memory must be freed (issue 11 item 11)
            frames = None  # type: ignore[assignment]

    def _drain_fast(self, conn: EngineConn) -> None:
        """(loop, the fast socket's reader callback) Read every message the fast socket holds.

        The fast socket is a plain zmq socket watched with ``add_reader`` on its (edge-triggered)
        FD: no asyncio future per wake-up, no pyzmq poller (those were most of the loop thread's
        CPU per fast call). Reading ``EVENTS`` until it shows no message re-arms the edge.
        """
        sock = conn.sockets.get("fast")
        if sock is None:
            return
        try:
            while _zget(sock, _EVENTS) & _POLLIN:
                try:
                    frame = _zrecv(sock, _NOBLOCK, False)
                except zmq.Again:
                    break
                frames = [frame]
                while frame.more:  # the parts of a message arrive together
                    frame = _zrecv(sock, _NOBLOCK, False)
                    frames.append(frame)
                frame = None
                self._on_frames(conn, "fast", frames)
                frames = None  # type: ignore[assignment]  # (issue 11 item 11, as in _reader)
        except zmq.ZMQError as exc:  # closed under us (teardown): nothing more to read
            log.debug("engine %s: fast socket read ended (%s)", conn.eid, exc)
        except Exception as exc:  # never lost (rule): fail this engine's requests with it
            log.error("engine %s: reading the fast socket failed", conn.eid, exc_info=exc)
            self._fail_requests(conn, exc)

    def _on_frames(self, conn: EngineConn, channel: str, frames: list) -> None:
        """(loop) One received multipart message: check it, route it, publish what changed."""
        try:
            if channel == "fast":
                msg = _fast_decode(conn, frames)
                if conn.fast_digest and not self._fast_buffers_check(conn, msg):
                    return
            else:
                _idents, msg_list = conn.session.feed_identities(frames, copy=False)
                msg = wire.deserialize(conn.session, msg_list, conn.sign)
        except Exception as exc:
            why = wire.refusal_reason(exc)  # the sender's bytes are not repeated
            log.warning("engine %s: dropped a bad message on %s (%s)", conn.eid, channel, why)
            if channel == "fast":  # its request is lost: _lost says why
                _count_refusals(conn, conn.fast_dropped, 1, why)
            return
        limit = self.max_message_size
        if limit is not None:
            size = sum(memoryview(b).nbytes for b in msg.get("buffers") or [])
            if size > limit:
                self._refuse_oversize(conn, channel, msg, size)
                return
        try:
            self._dispatch(conn, channel, msg)
            if channel != "fast":  # a fast reply only finishes its request, which publishes
                self._publish(conn)
        except Exception as exc:
            # the request this message belongs to fails with the real error (issue 11.5)
            log.error(
                "engine %s: error routing a %s message",
                conn.eid,
                msg.get("msg_type"),
                exc_info=exc,
            )
            req = self._request_of(conn, msg)
            if req is not None:
                self._finish(conn, req, exc=exc)

    @staticmethod
    def _request_of(conn: EngineConn, msg: dict) -> Request | None:
        rid, parent = wire.request_id(msg)
        return conn.requests.get(rid) or conn.requests.get(parent)

    def _refuse_oversize(self, conn: EngineConn, channel: str, msg: dict, size: int) -> None:
        req = self._request_of(conn, msg)
        text = (
            f"engine {conn.eid} sent a {msg.get('msg_type')} of {size} bytes, more than "
            f"max_message_size={self.max_message_size}; it was dropped"
        )
        log.warning(text)
        if req is not None:
            self._finish(conn, req, exc=EngineError(text, conn.eid, _method(req)))

    def _dispatch(self, conn: EngineConn, channel: str, msg: dict) -> None:
        mtype = msg["msg_type"]
        content = msg["content"]
        parent = msg["parent_header"].get("msg_id", "")
        if channel == "fast":
            req = conn.requests.get(parent)
            if req is not None and content.get("status") == "progress":
                self._progressed(conn, req, content)
            elif req is not None and req.channel == "fast":
                self._passed_over(conn, req)
                self._finish_comm(conn, req, content, msg.get("buffers") or [])
            return
        if channel == "stdin":
            if mtype == "input_request":
                self._on_input_request(conn, msg)
            return
        if channel != "iopub":
            req = conn.requests.get(parent)
            if req is not None:
                req.reply = content
                if req.kind == "execute":
                    self._page_outputs(conn, req, content)
                if channel == "shell" and req.channel == "shell":
                    self._drop_skipped(conn, req, ("execute", "shell"))
                    self._release(conn)  # its effects are there: held data operations may go
                self._maybe_complete(conn, req)
            return
        conn.iopub_seen.set()
        if mtype == "comm_msg":
            if content.get("comm_id") == conn.comm_id:
                data = content.get("data") or {}
                req = conn.requests.get(data.get("rid", ""))
                if (conn.comm_digest or "bd" in data) and not self._buffers_check(
                    conn, req, data, msg.get("buffers") or []
                ):
                    return
                if req is not None and data.get("status") == "progress":
                    self._progressed(conn, req, data)
                elif req is not None:
                    self._finish_comm(conn, req, data, msg.get("buffers") or [])
            return
        if mtype == "status":
            barrier = conn.iopub_barriers.pop(parent, None)
            if barrier is not None:  # IOPub has brought what came before it: nothing of the shell
                barrier()
                return
            state = content.get("execution_state")
            req = conn.requests.get(parent)
            # The engine's state follows its shell channel only: a control request (interrupt,
            # shutdown, debug) is busy/idle while the shell may still be busy (issue 11.8).
            on_shell = (
                req.channel == "shell"
                if req is not None
                else (msg["parent_header"].get("msg_type") not in CONTROL_MSG_TYPES)
            )
            if state in ("busy", "idle") and not conn.dead and on_shell:
                conn.state = state
                conn.busy_since = time.monotonic() if state == "busy" else None
                busy_with = req if state == "busy" else None
                conn.running = (
                    (busy_with.code or busy_with.op or busy_with.kind)
                    if busy_with
                    else ("(a request from another client)" if state == "busy" else "")
                )
                (conn.shell_idle.set if state == "idle" else conn.shell_idle.clear)()
            if (
                req is not None
                and state == "busy"
                and isinstance(req.future, RequestFuture)
                and req.future.started is None
            ):
                req.future.stamp("started")
            if req is not None and state == "idle":
                req.idle = True
                if req.channel == "shell":
                    # the engine went past every earlier shell message: comm requests among them
                    # that got no reply were lost. A control request says nothing about the
                    # shell queue, so it never fails queued requests (issue 11.8).
                    self._drop_skipped(conn, req, ("comm",))
                if req.reply is None and req.kind in ("execute", "comm") and req.channel == "shell":
                    self._call_later(IDLE_GRACE, self._reply_overdue, conn, req)
                self._maybe_complete(conn, req)
            return
        req = conn.requests.get(parent)
        if req is None:
            if mtype in _OUTPUT_TYPES:
                self._late(conn, msg)
            return
        req.heard = time.monotonic()
        if mtype == "stream":
            (req.stderr if content.get("name") == "stderr" else req.stdout).append(
                content.get("text", "")
            )
        elif mtype in (
            "display_data",
            "execute_result",
            "update_display_data",
            "error",
            "clear_output",
        ):
            req.outputs.append({"output_type": mtype, **content})
        elif mtype == "execute_input":
            count = content.get("execution_count")
            req.number = count if isinstance(count, int) else None
            return
        else:
            return
        if req.listener is not None:
            try:
                req.listener(conn.eid, mtype, content)
            except Exception as exc:
                # the request fails with this error when it completes (its output is still
                # collected); the listener is not called again
                log.error("engine %s: output listener failed", conn.eid, exc_info=exc)
                req.listener_error = exc
                req.listener = None

    def _late(self, conn: EngineConn, msg: dict) -> None:
        """(loop) Output of ours whose request has finished: the engine printed it later (a
        thread its code started; ipykernel labels such output with its latest request, or
        with the one a thread chose by ``set_parent``). It is kept on that execute's record
        (``record["late"]``) and handed to the late watchers (``watch_late``) to show. When
        its request kept no record (a silent execute, an apply, the engine's setup) or is
        too old to be routed (``LATE_ROUTES``), it is late output of an earlier command
        (``msg_id`` "", ``number`` None), kept on no record: never given to another command.
        Output labelled with a push or pull is labelled as before it (``_relabel``).
        Output of another client's request is that client's."""
        header = msg["parent_header"]
        if header.get("session") != conn.session.session and header.get("comm_id") != conn.comm_id:
            return
        mtype, content = msg["msg_type"], msg["content"]
        parent = header.get("msg_id", "")
        parent = conn.late_aliases.get(parent, parent)
        route = conn.late_routes.get(parent)
        if route is not None:
            msg_id, (number, ref) = parent, route
        else:
            msg_id, number, ref = "", None, None
        late = ref() if ref is not None else None
        # the watchers first: a record holding the output means it has been handed to be shown
        # (a cell run once %result shows it finds it queued, not still on its way)
        watchers = list(self._late_watchers)
        for watcher in watchers:
            try:
                watcher(conn.eid, msg_id, number, mtype, content)
            except Exception:  # no request to fail: said here, the others still told
                log.exception("engine %s: a late output watcher failed", conn.eid)
        if late is not None:
            late.add(mtype, content)
        if late is None and not watchers and mtype != "clear_output":
            log.warning(
                "engine %s printed output after its command%s had finished, and nothing "
                "keeps or shows it (%s): %.200r",
                conn.eid,
                f" (In [{number}])" if number is not None else "",
                "its result was dropped" if msg_id else "an earlier command, keeping no record",
                content.get("text") if mtype == "stream" else mtype,
            )

    def watch_late(self, watcher: Callable[[int, str, int | None, str, dict], None]) -> None:
        """Call ``watcher(eid, msg_id, number, msg_type, content)`` on the controller's thread
        for each output an engine sends after its command finished (``_late``): it must only
        queue it. ``msg_id``/``number``: the execute whose record keeps it ("", None: an
        earlier command that cannot be told, to be labelled so).
        Held weakly (a callable object, not a bound method), as long as it lives."""
        _loop.call_soon(self._late_watchers.add, watcher)

    def _fast_buffers_check(self, conn: EngineConn, msg: dict) -> bool:
        """(loop) Whether a signed fast reply's buffers match the digest in its header; if not,
        its request (named by the signed parent) fails at once naming the engine and why, as
        on the comm (``_buffers_check``), and nothing of it is unpickled."""
        try:
            wire.check_buffers(msg["header"], msg["buffers"], True)
            return True
        except ValueError as exc:
            req = conn.requests.get(msg["parent_header"].get("msg_id", ""))
            self._reply_refused(conn, req, exc)
            return False

    def _buffers_check(
        self, conn: EngineConn, req: Request | None, data: dict, buffers: list
    ) -> bool:
        """(loop) Whether a comm message's buffers match the digest in its signed data (required
        when ``conn.comm_digest``); if not, its request fails naming the engine and why, and
        nothing of it is unpickled."""
        try:
            wire.check_buffers(data, buffers, conn.comm_digest, "message")
            return True
        except ValueError as exc:
            self._reply_refused(conn, req, exc)
            return False

    def _reply_refused(self, conn: EngineConn, req: Request | None, exc: ValueError) -> None:
        """(loop) A signed reply whose buffers do not check (``exc``): its request fails at once
        with a ``RefusedError`` naming the engine and why; nothing of it is unpickled."""
        what = (req.op or req.kind) if req is not None else "an operation"
        text = (
            f"engine {conn.eid}: the reply to {what!r} was refused: {exc} (changed on the "
            "way?); nothing of it was unpickled"
        )
        log.warning(text)
        if req is not None:
            self._finish(conn, req, exc=RefusedError(text, conn.eid, _method(req)))

    @staticmethod
    def _page_outputs(conn: EngineConn, req: Request, content: dict) -> None:
        """Pager text (``obj?``, ``%pdoc``, ``%psource``) comes as an execute_reply ``page``
        payload: make it an output of the request (``metadata.pager``), like any display."""
        for payload in content.get("payload") or []:
            if payload.get("source") != "page" or not payload.get("data"):
                continue
            out = {"data": dict(payload["data"]), "metadata": {"pager": True}, "transient": {}}
            req.outputs.append({"output_type": "display_data", **out})
            if req.listener is not None:
                try:
                    req.listener(conn.eid, "display_data", out)
                except Exception:
                    log.exception("output listener failed")

    def _maybe_complete(self, conn: EngineConn, req: Request) -> None:
        if req.reply is None:
            return
        if req.kind == "execute" and not req.idle:
            self._call_later(IDLE_GRACE, self._idle_overdue, conn, req)
            return
        if req.kind == "comm":
            return  # comm operations complete on their explicit reply
        if req.kind != "execute":
            self._finish(conn, req, value=req)
            return
        content = req.reply
        result = wire.execute_record(
            conn.eid, req.code, content, req.stdout, req.stderr, req.outputs
        )
        if not req.silent:
            result["late"] = late = wire.LateOutput(req.msg_id, result["number"])
            ref = weakref.ref(late)
            conn.late_routes[req.msg_id] = (result["number"], ref)
            while len(conn.late_routes) > LATE_ROUTES:
                conn.late_routes.popitem(last=False)
        if req.lost:
            result["output_lost"] = True
        if content.get("status") == "ok":
            self._finish(conn, req, value=result)
        elif content.get("status") == "aborted":
            self._finish(
                conn,
                req,
                exc=RemoteError(
                    "Aborted",
                    "the engine aborted this request",
                    [],
                    conn.eid,
                    "execute",
                    result=result,
                ),
            )
        else:
            self._finish(
                conn,
                req,
                exc=RemoteError(
                    content.get("ename", "Error"),
                    content.get("evalue", ""),
                    content.get("traceback", []),
                    conn.eid,
                    "execute",
                    result=result,
                ),
            )

    def _on_input_request(self, conn: EngineConn, msg: dict) -> None:
        """An engine asks for input: hand it to the user's waiting thread (see ``stdin.py``)."""
        from . import stdin

        req = conn.requests.get(msg["parent_header"].get("msg_id", ""))
        header = msg["header"]

        def reply(value: str) -> None:
            def send() -> None:
                if "stdin" in conn.sockets and not conn.dead:
                    self._send(
                        conn,
                        "stdin",
                        conn.session.msg("input_reply", {"value": value}, parent=header),
                    )

            _loop.call_soon(self._guarded(send, conn, req))

        def post() -> None:
            before = ""
            if req is not None and req.listener is None:  # else someone shows its output live
                # each stream grows on its own: what each printed since the last prompt
                out, err = "".join(req.stdout), "".join(req.stderr)
                before = out[req.stdin_shown[0] :] + err[req.stdin_shown[1] :]
                req.stdin_shown = (len(out), len(err))
            stdin.post(
                stdin.InputRequest(
                    eid=conn.eid,
                    prompt=str(msg["content"].get("prompt", "")),
                    password=bool(msg["content"].get("password")),
                    reply=reply,
                    interrupt=lambda: self.interrupt([conn.eid]),
                    future=req.future if req is not None else None,
                    before=before,
                    listener=req.listener if req is not None else None,
                )
            )

        # the engine flushed its output to IOPub just before asking: let that arrive first
        self._after_iopub(conn, self._guarded(post, conn, req))

    def _after_iopub(self, conn: EngineConn, callback: Callable[[], None]) -> None:
        """(loop) ``callback()`` once IOPub has brought everything ``conn``'s engine published
        so far: IOPub is a connection of its own, so what came on another one (an
        ``input_request`` on stdin, sent after the engine flushed its output) may be ahead of
        it. A control request's status comes on IOPub behind all of that: ``usage_request``,
        which every client of ours and the server keep apart from the shell's state
        (``wire.CONTROL_MSG_TYPES``). At most IOPUB_BARRIER_WAIT s (a control thread that
        does not answer: then as before, without the wait)."""
        fired = False

        def fire() -> None:
            nonlocal fired
            if not fired:
                fired = True
                callback()

        if conn.dead or "control" not in conn.sockets:
            fire()
            return
        msg = conn.session.msg("usage_request", {})
        msg_id = msg["header"]["msg_id"]
        conn.iopub_barriers[msg_id] = fire

        def give_up() -> None:
            if conn.iopub_barriers.pop(msg_id, None) is not None:
                fire()

        try:
            self._send(conn, "control", msg)
        except Exception as exc:  # not sent: no status will come
            log.warning("engine %s: could not ask for its IOPub to catch up (%s)", conn.eid, exc)
            give_up()
            return
        asyncio.get_running_loop().call_later(IOPUB_BARRIER_WAIT, give_up)

    def _drop_skipped(self, conn: EngineConn, later: Request, kinds: tuple[str, ...]) -> None:
        """Fail earlier requests of ``kinds`` that the engine passed over without a reply.

        An engine handles its shell messages in order and answers each on the same socket,
        so once ``later`` is answered, an earlier one still unanswered was lost (e.g. an
        interrupt hit the kernel between messages). Waiting for it would hang forever.
        """
        for req in list(conn.requests.values()):
            if req is later:
                return
            if (
                req.channel == "shell"
                and req.kind in kinds
                and req.reply is None
                and not req.held
                and not req.future.done()
            ):
                self._lost(conn, req)

    def _passed_over(self, conn: EngineConn, later: Request) -> None:
        """The engine answered ``later`` on its fast socket, which it reads in order: an
        earlier fast request still unanswered gets FAST_LOST_GRACE s (its reply may be behind
        its output on IOPub), then fails as lost (``_reply_overdue``)."""
        for req in conn.requests.values():
            if req is later:
                return
            if req.channel == "fast" and not req.held and not req.overdue:
                req.overdue = True
                self._call_later(FAST_LOST_GRACE, self._reply_overdue, conn, req)

    def _watch_fast(self) -> None:
        """(loop, each poll) Ping behind a fast request unanswered for FAST_LOST_AFTER s: a
        reply to the ping means the engine went past it (``_passed_over``); while the
        operation runs the ping waits behind it. One ping at a time per engine.

        Also reads each fast socket (a NOBLOCK look at ``EVENTS`` when it holds nothing): its
        FD is edge-triggered, so messages left unread by a reader interrupted mid-burst would
        never wake it again, and their requests would hang; draining re-arms the edge."""
        now = time.monotonic()
        for conn in list(self._engines.values()):
            if "fast" in conn.sockets:
                self._drain_fast(conn)
            if not conn.fast or conn.dead or "fast" not in conn.sockets:
                continue
            if conn.probe is not None and not conn.probe.future.done():
                continue
            first = next(
                (
                    r
                    for r in conn.requests.values()
                    if r.channel == "fast" and not r.held and r.op != "ping" and not r.overdue
                ),
                None,
            )
            if first is not None and now - max(first.sent, self._awake_since) > FAST_LOST_AFTER:
                conn.probe = self._send_ping(conn)

    def _reply_overdue(self, conn: EngineConn, req: Request) -> None:
        if conn.requests.get(req.msg_id) is req and req.reply is None:
            quiet = time.monotonic() - max(req.heard, self._awake_since)
            if req.channel == "fast" and quiet < FAST_LOST_GRACE:
                # its output is still arriving on IOPub: its reply comes behind it
                self._call_later(FAST_LOST_GRACE - quiet, self._reply_overdue, conn, req)
                return
            self._lost(conn, req)

    @staticmethod
    def _note_unchecked(conn: EngineConn, seen: Any, answered: Request) -> None:
        """(loop) An engine's reply (to ``answered``) reports messages of ours its fast socket
        did not answer because their signature failed (``_FastServer._unchecked``): the
        requests among them fail as lost, saying so (``_lost``)."""
        if isinstance(seen, dict) and type(seen.get("count")) is int:
            why = str(seen.get("why", ""))[:300]
            _count_refusals(conn, conn.fast_unchecked, seen["count"], why, answered)
            log.warning(
                "engine %s: its fast socket refused %d message(s) of this client unread (%s)",
                conn.eid,
                seen["count"],
                why,
            )

    def _lost(self, conn: EngineConn, req: Request) -> None:
        what = req.code or req.op or req.kind
        text = (
            f"engine {conn.eid} answered later operations on its fast socket but not {what!r}: "
            "its reply was lost; the engine is usable and the requests after it go on"
            if req.channel == "fast"
            else f"engine {conn.eid} went on without replying to {what!r} (probably interrupted "
            "between messages); the request was lost, the engine is usable"
        )
        error: type[EngineError] = EngineError
        # only a refusal counted while this request was unanswered can be its own (one that no
        # request consumed, a forged message's, ends with the requests it could be about)
        fast = req.channel == "fast"
        why = _take_refusal(conn, conn.fast_unchecked, req) if fast else None
        dropped_why = _take_refusal(conn, conn.fast_dropped, req) if fast and why is None else None
        if why is not None:
            error = RefusedError
            # the engine refused messages of ours unanswered: this request was one of them
            text = (
                f"engine {conn.eid} did not answer {what!r}: its fast socket refused a message "
                f"of this client unread for failing its signature check ({why}), so this "
                "request was most likely changed on the way (its id could not be trusted to "
                "answer it); nothing of such a message is unpickled or run, the engine is usable"
            )
        elif dropped_why is not None:
            error = RefusedError
            # this client dropped a message from the engine's fast socket: this reply, likely
            text = (
                f"engine {conn.eid}: no reply to {what!r} was accepted: this client dropped a "
                f"message from its fast socket unread for failing its check ({dropped_why}), so "
                "the reply was most likely changed on the way; the operation may have run on "
                "the engine, which is usable"
            )
        log.warning(text)
        # what it printed before its reply went missing is kept (as for a death)
        self._finish(conn, req, exc=error(text, conn.eid, _method(req), _partial_record(conn, req)))

    def _idle_overdue(self, conn: EngineConn, req: Request) -> None:
        if conn.requests.get(req.msg_id) is req and not req.idle:
            log.warning(
                "engine %s: no idle status %.0f s after the reply to %s: output may be lost",
                conn.eid,
                IDLE_GRACE,
                req.msg_id,
            )
            req.idle = req.lost = True
            self._maybe_complete(conn, req)

    def _progressed(self, conn: EngineConn, req: Request, data: dict) -> None:
        """An engine's report of how far an operation got (no reply: the operation goes on)."""
        if req.on_progress is None:
            return
        try:
            req.on_progress(conn.eid, int(data.get("done", 0)))
        except Exception as exc:  # fails its request, never lost on the I/O thread
            self._finish(conn, req, exc=exc)

    @staticmethod
    def _stamp_started(fut: RequestFuture, data: dict) -> None:
        """(loop) No busy status on the fast socket: the reply says when the operation began,
        as seconds ago (``ran``: the engine's clock may differ from this one's; an engine of an
        older version sends only its clock's ``started``). Kept between submission and now."""
        ran, started = data.get("ran"), data.get("started")
        now, mono = time.time(), time.monotonic()
        if isinstance(ran, (int, float)) and ran >= 0:
            started = now - ran
        elif not isinstance(started, (int, float)):
            return
        started = min(max(float(started), fut.submitted), now)
        fut.started = started
        fut.mono["started"] = max(mono - (now - started), fut.mono["submitted"])  # serial_time

    def _finish_comm(self, conn: EngineConn, req: Request, data: dict, frames: list) -> None:
        if "unchecked" in data:
            self._note_unchecked(conn, data["unchecked"], req)
        fut = req.future
        if isinstance(fut, RequestFuture) and fut.started is None:
            self._stamp_started(fut, data)
        out: dict[str, Any] = {
            "stdout": "".join(req.stdout),
            "stderr": "".join(req.stderr),
            "outputs": req.outputs,
        }
        if data.get("status") == "ok":
            self._finish(
                conn,
                req,
                value=CommReply(
                    data,
                    list(frames),
                    stdout=out["stdout"],
                    stderr=out["stderr"],
                    outputs=out["outputs"],
                ),
            )
        elif data.get("refused"):  # the engine refused the request unread (``engine._refuse``)
            self._finish(
                conn,
                req,
                exc=RefusedError(str(data.get("evalue", "")), conn.eid, req.op or "comm"),
            )
        else:
            item = data.get("item")
            evalue = data.get("evalue", "")
            if item is not None:
                evalue = f"{evalue} (on item {item})"
            err = RemoteError(
                data.get("ename", "Error"),
                evalue,
                data.get("traceback", []),
                conn.eid,
                req.op or "comm",
                pickled=bytes(frames[0]) if frames else None,
                result={"id": conn.eid, **out},
                item=item,
            )
            self._finish(conn, req, exc=err)

    def _finish(
        self, conn: EngineConn, req: Request, value: Any = None, exc: BaseException | None = None
    ) -> None:
        if conn.requests.pop(req.msg_id, None) is not None:
            self._publish(conn)
            if conn.held:
                self._release(conn)
        if not req.sent_chained:
            _set_sent(req, None)  # (held, then failed): nothing of the caller's is in zmq
        if req.future.done():
            return
        if isinstance(req.future, RequestFuture):
            req.future.stamp("completed")
        if exc is None and req.listener_error is not None:
            exc = req.listener_error
        if exc is not None:
            req.future.set_exception(exc)
        else:
            req.future.set_result(value)

    # ---------------------------------------------------------------- sending (loop)
    @staticmethod
    def _fast_msg(conn: EngineConn, content: bytes) -> dict:
        """A request for ``conn``'s fast socket: its id, header and packed content (signed
        when sent, ``wire.fast_frames``)."""
        msg_id = os.urandom(16).hex()  # as unique as uuid4().hex, without its Python-level work
        return {
            "msg_id": msg_id,
            "header": wire.fast_request_header(msg_id, conn.comm_id, conn.eid),
            "packed": content,
        }

    def _send(
        self, conn: EngineConn, channel: str, msg: dict, buffers: list | None = None
    ) -> tuple[Any, Any]:
        """Sign and send ``msg`` on the loop's own asyncio socket; returns the socket's send
        future (done once zmq holds the message) and a ``MessageTracker`` of zero-copy buffers.

        ``Session.send`` would go through a sync shadow of the socket, which can swallow the
        edge-triggered readiness event our reader task waits on (replies then go unread).
        """
        if "packed" in msg:
            header = msg["header"]
            if conn.fast_digest:
                header = {**header, "bd": wire.buffers_digest(buffers or [])}
            frames: list[Any] = _fast_frames(conn, header, msg["packed"])
        else:
            if conn.comm_digest and msg["header"]["msg_type"] == "comm_msg":
                # the signature covers the content, not the buffers: sign their digest in it
                msg["content"]["data"]["bd"] = wire.buffers_digest(buffers or [])
            frames = conn.session.serialize(msg)
        tracker = None
        if buffers:
            large = any(memoryview(b).nbytes >= 65536 for b in buffers)
            if large:
                # zero copy: zmq reads the caller's memory until it releases these frames;
                # the tracker tells the caller when its objects may change again (issue 11.2)
                tracked = [
                    b if isinstance(b, zmq.Frame) else zmq.Frame(b, track=True) for b in buffers
                ]
                tracker = zmq.MessageTracker(*(f.tracker for f in tracked if f.tracker is not None))
                frames.extend(tracked)
                del tracked
            else:
                frames.extend(buffers)
        else:
            large = False
        sock = conn.sockets[channel]
        if channel != "fast":
            return sock.send_multipart(frames, copy=not large), tracker
        # the fast socket is plain (``_open_fast``) with no send limit: zmq has the message when
        # this returns (None: nothing to wait for); a send may consume the FD's edge of a reply
        # that arrived meanwhile, so look for one
        copy = not large
        try:
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                _zsend(sock, frame, _SEND_MORE if i < last else _NOBLOCK, copy)
        except zmq.Again:
            raise EngineError(
                f"engine {conn.eid}: its fast socket refused a message (queue full)", conn.eid
            ) from None
        if _zget(sock, _EVENTS) & _POLLIN:
            asyncio.get_running_loop().call_soon(self._drain_fast, conn)
        return None, tracker

    def _new_request(
        self, conn: EngineConn, kind: str, msg_id: str, future: Future | None = None, **kw: Any
    ) -> Request:
        fut: Future = Future() if future is None else future
        req = Request(msg_id=msg_id, eid=conn.eid, kind=kind, future=fut, **kw)
        if kind in ("execute", "comm") and req.op not in _NOT_INTERRUPTED:
            conn.last_request = msg_id
        if conn.dead and not fut.done():
            fut.set_exception(
                EngineError(f"engine {conn.eid} is dead: {conn.dead}", conn.eid, _method(req))
            )
        return req

    def _send_shell(
        self,
        conn: EngineConn,
        msg_type: str,
        content: dict,
        kind: str = "shell",
        channel: str = "shell",
        **kw: Any,
    ) -> Future:
        msg = conn.session.msg(msg_type, content)
        req = self._new_request(conn, kind, msg["msg_id"], channel=channel, **kw)
        if not req.future.done():
            conn.requests[req.msg_id] = req
            _relabel(conn, req)
            try:
                self._send(conn, channel, msg)
            except Exception as exc:  # not left waiting for a reply that cannot come
                self._finish(conn, req, exc=exc)
                raise
            self._publish(conn)
        return req.future

    def _send_comm_open(self, conn: EngineConn) -> tuple[str, Future]:
        exposed = wire.buffers_exposed(
            conn.info.get("transport", "tcp"), bool(conn.info.get("curve_publickey"))
        )
        msg = wire.with_rid(
            conn.session.msg("comm_open", wire.comm_open_content(conn.comm_id, conn.eid, exposed))
        )
        req = self._new_request(conn, "comm", msg["msg_id"], op="open")
        conn.requests[req.msg_id] = req
        _relabel(conn, req)
        self._send(conn, "shell", msg)
        self._publish(conn)
        return req.msg_id, req.future

    def _send_batch(self, batch: list[tuple[EngineConn, dict, Request, list]]) -> None:
        try:
            self._send_each(batch)
        except Exception as exc:  # nothing in the batch may be left waiting (issue 11.5)
            log.error("sending a batch of requests failed", exc_info=exc)
            for conn, _msg, req, _buffers in batch:
                self._finish(conn, req, exc=exc)
        finally:
            for _conn, _msg, req, _buffers in batch:
                if not req.sent_chained and not req.held:
                    _set_sent(req, None)  # nothing was handed to zmq for this one

    def _send_each(self, batch: list[tuple[EngineConn, dict, Request, list]]) -> None:
        for conn, msg, req, buffers in batch:
            if req.future.done():
                continue
            if conn.dead or "shell" not in conn.sockets:
                self._finish(
                    conn,
                    req,
                    exc=EngineError(
                        f"engine {conn.eid} is "
                        f"{'dead: ' + conn.dead if conn.dead else 'not connected'}",
                        conn.eid,
                        _method(req),
                    ),
                )
                continue
            conn.requests[req.msg_id] = req
            if conn.held or self._crossing(conn, req):
                req.held = True
                conn.held.append((msg, req, buffers))
                continue
            self._send_one(conn, msg, req, buffers)
        for conn in {id(c): c for c, _m, _r, _b in batch}.values():
            self._publish(conn)

    @staticmethod
    def _crossing(conn: EngineConn, req: Request) -> bool:
        """Whether ``req`` must wait to keep the engine's order (issue 15.2): the shell channel
        and the fast socket are two queues on the engine, each in order, not with each other.
        A request on one waits while an earlier request of this client on the other is
        unanswered (an execute's reply comes once its code ran: a pull sent then sees it)."""
        if req.channel not in ("shell", "fast"):
            return False
        other = "fast" if req.channel == "shell" else "shell"
        return any(
            r.channel == other and r.reply is None and not r.held and r is not req
            for r in conn.requests.values()
            if r.op != "ping"  # a ping touches nothing: no order to keep with it
        )

    def _release(self, conn: EngineConn) -> None:
        """(loop) Send the held requests that may go now, in order."""
        if conn.releasing:
            return
        conn.releasing = True
        try:
            while conn.held:
                msg, req, buffers = conn.held[0]
                if req.future.done() or conn.requests.get(req.msg_id) is not req:
                    conn.held.popleft()
                    continue
                if self._crossing(conn, req):
                    return
                conn.held.popleft()
                req.held = False
                if conn.dead or req.channel not in conn.sockets:
                    # held behind a request the engine died running: it fails as the requests
                    # queued on the engine do, with the reason (never a bare "not connected")
                    self._finish(
                        conn,
                        req,
                        exc=_death_error(conn, req, conn.dead, sent=False)
                        if conn.dead
                        else EngineError(
                            f"engine {conn.eid} is not connected", conn.eid, _method(req)
                        ),
                    )
                    continue
                self._send_one(conn, msg, req, buffers)
        finally:
            conn.releasing = False
            self._publish(conn)

    def _send_one(self, conn: EngineConn, msg: dict, req: Request, buffers: list) -> None:
        req.sent = time.monotonic()
        _relabel(conn, req)
        try:
            sending, tracker = self._send(conn, req.channel, msg, buffers)
        except Exception as exc:
            self._finish(conn, req, exc=exc)
            return
        if getattr(req.future, "sent", None) is not None:
            # the caller's buffers are read until zmq has the message (a queued send) and,
            # for zero-copy frames, until zmq releases them
            req.sent_chained = True
            if sending is None:  # zmq has it already (the fast socket)
                _set_sent(req, tracker)
                return
            sending.add_done_callback(lambda _s, req=req, tracker=tracker: _set_sent(req, tracker))

    # ---------------------------------------------------------------- public, any thread
    @property
    def ids(self) -> list[int]:
        return sorted(self.states())

    def state(self, eid: int) -> EngineState:
        """The latest immutable snapshot of engine ``eid`` (any thread)."""
        return self._published[eid]

    def states(self) -> Mapping[int, EngineState]:
        """Every engine's latest snapshot, by id (an immutable mapping; any thread)."""
        version = self._published_version
        seen, states = self._states
        if seen != version:
            # one C-level copy: atomic against the loop's single-key changes (the GIL)
            states = MappingProxyType(dict(self._published))
            self._states = (version, states)
        return states

    def catch_up(self, timeout: float = 5.0) -> None:
        """Wait (at most ``timeout`` s) until the loop has handled what this thread submitted
        before, so that the snapshots count those requests (queued, running); a no-op on the
        loop thread. Snapshots are published by the loop: read right after a submission, on
        a loaded machine, they would not show it yet."""
        if _loop.in_loop_thread():
            return
        with contextlib.suppress(TimeoutError):  # concurrent.futures' (an alias since 3.11)
            _loop.run(asyncio.sleep(0), timeout=timeout)

    def _conn(self, eid: int) -> EngineConn:
        """(loop thread only) the live connection object of engine ``eid``."""
        return self._engines[eid]

    def dead(self, eid: int) -> str | None:
        return self._published[eid].dead

    def unavailable(self, eid: int) -> str | None:
        """Why engine ``eid`` cannot take requests now (dead, restarting), or None."""
        return self._published[eid].unavailable

    def submit_execute(
        self,
        eids: list[int],
        code: str,
        listener: Listener | None = None,
        silent: bool = False,
        allow_stdin: bool = True,
    ) -> list[Future]:
        """Send ``code`` to each engine; one Future per engine resolving to a result dict.

        With ``allow_stdin``, ``input()``/``getpass()`` on an engine ask the user (``stdin.py``).
        """
        content = wire.execute_content(code, silent=silent, allow_stdin=allow_stdin)

        def build(conn: EngineConn, _frames: list, fut: Future) -> tuple[dict, Request]:
            msg = conn.session.msg(
                "execute_request",
                dict(content, allow_stdin=allow_stdin and "stdin_port" in conn.info),
            )
            return msg, self._new_request(
                conn,
                "execute",
                msg["msg_id"],
                future=fut,
                code=code,
                listener=listener,
                silent=silent,
            )

        return self._submit(build, list(eids), [[]] * len(eids))

    def submit_comm(
        self,
        eids: list[int],
        op: str,
        data: dict,
        frames: list[list[Any]],
        listener: Listener | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[Future]:
        """Send one comm operation per engine (``frames[i]`` to ``eids[i]``); Futures of
        ``CommReply``. ``on_progress(eid, done)``: the engines' progress reports (a map block
        sent with ``data["progress"]``), on the controller's thread."""

        # the content is the same for every engine (with a stdin or without): packed once
        packed: dict[bool, bytes] = {}

        def build(conn: EngineConn, _frames: list, fut: Future) -> tuple[dict, Request]:
            # input() in the operation asks the user only where this client reads the stdin
            has_stdin = "stdin_port" in conn.info
            content = dict(data, stdin=True) if has_stdin else data
            if conn.fast:
                if has_stdin not in packed:
                    packed[has_stdin] = conn.session.pack(dict(content, op=op))
                msg = self._fast_msg(conn, packed[has_stdin])
            else:
                msg = wire.with_rid(
                    conn.session.msg("comm_msg", wire.comm_op_content(conn.comm_id, op, content))
                )
            req = self._new_request(
                conn,
                "comm",
                msg["msg_id"],
                future=fut,
                op=op,
                listener=listener,
                on_progress=on_progress,
                channel="fast" if conn.fast else "shell",
            )
            if conn.data_refused and not fut.done():
                fut.set_exception(EngineError(conn.data_refused, conn.eid, op))
            elif not conn.data_ok and not fut.done():
                fut.set_exception(
                    EngineError(
                        f"engine {conn.eid} ({conn.language or 'unknown language'}) cannot run "
                        f"{op!r}: data "
                        "operations need a Python engine with ipy_multiengine installed",
                        conn.eid,
                        op,
                    )
                )
            return msg, req

        return self._submit(build, list(eids), list(frames), track=True)

    def _submit(
        self,
        build: Callable[[EngineConn, list, Future], tuple[dict, Request]],
        eids: list[int],
        frames: list[list[Any]],
        track: bool = False,
    ) -> list[Future]:
        """Futures now (caller's thread); the messages are built and sent on the loop, which
        alone touches the engines' connections. With ``track``, the future of a request with
        frames is a ``RequestFuture`` whose ``sent`` tells when zmq holds them (issue 11.2)."""
        if self._closed:
            raise EngineError("this client is closed")
        futures: list[Future] = [
            RequestFuture(track=track and bool(fr)) for _eid, fr in zip(eids, frames, strict=True)
        ]

        def send() -> None:
            batch = []
            try:
                for eid, fr, fut in zip(eids, frames, futures, strict=True):
                    conn = self._engines.get(eid)
                    if conn is None:
                        fut.set_exception(EngineError(f"no engine {eid}", eid))
                        continue
                    msg, req = build(conn, fr, fut)
                    batch.append((conn, msg, req, fr))
            except Exception as exc:  # nothing may be left waiting (issue 11.5)
                log.error("building requests failed", exc_info=exc)
                for fut in futures:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            self._send_batch(batch)

        _loop.call_soon(send)
        return futures

    def interrupt(self, eids: list[int]) -> None:
        """Ask each engine to interrupt what it runs (``interrupt_request`` on control)."""

        def send() -> None:
            for eid in eids:
                conn = self._engines.get(eid)
                if conn is not None and not conn.dead and "control" in conn.sockets:
                    try:
                        self._send_shell(
                            conn, "interrupt_request", {}, kind="control", channel="control"
                        )
                    except Exception as exc:  # this engine only: the others are still asked
                        log.warning("engine %s: the interrupt was not sent (%s)", eid, exc)

        _loop.call_soon(send)

    def interrupt_sent(self, eids: list[int], timeout: float = INTERRUPT_ACK) -> list[int]:
        """Interrupt, on each engine of ``eids``, every request this client sent it so far: the
        one running now (also one whose call ended here already, e.g. failed), and those not
        begun yet (each ends with a KeyboardInterrupt when the engine reaches it, without
        running); a request sent after this call is not interrupted. Whatever another client
        runs there now is interrupted too. Returns the engines that cannot be asked so (no
        engine helper that knows ``ime_interrupt_request``, or no answer within ``timeout`` s):
        interrupt those the plain way (a signal only reaches a request that has begun)."""
        return _loop.run(self._interrupt_sent(list(eids), timeout), timeout=timeout + 5)

    async def _interrupt_sent(self, eids: list[int], timeout: float) -> list[int]:
        plain: list[int] = []
        asked: list[tuple[int, Future]] = []
        for eid in eids:
            conn = self._engines.get(eid)
            if conn is None or conn.dead:
                continue
            if not conn.engine_info.get("interrupt_owed") or "control" not in conn.sockets:
                plain.append(eid)
                continue
            sent = [
                r.msg_id
                for r in conn.requests.values()
                if r.kind in ("execute", "comm")
                and r.op not in _NOT_INTERRUPTED
                and not r.future.done()
            ]
            try:
                fut = self._send_shell(
                    conn,
                    "ime_interrupt_request",
                    {"msg_ids": sent, "comm_id": conn.comm_id, "last": conn.last_request},
                    kind="control",
                    channel="control",
                )
            except Exception as exc:  # this engine only: the others are still asked
                log.warning("engine %s: the interrupt request was not sent (%s)", eid, exc)
                plain.append(eid)
                continue
            asked.append((eid, fut))
        deadline = time.monotonic() + timeout
        for eid, fut in asked:
            try:
                req = await asyncio.wait_for(
                    asyncio.wrap_future(fut), max(deadline - time.monotonic(), 0)
                )
            except (asyncio.TimeoutError, EngineError) as exc:
                log.warning("engine %s did not acknowledge the interrupt (%s)", eid, exc or "late")
                plain.append(eid)
                continue
            content = req.reply or {}
            if content.get("status") != "ok":
                log.warning(
                    "engine %s could not interrupt itself: %s: %s",
                    eid,
                    content.get("ename"),
                    content.get("evalue"),
                )
                plain.append(eid)
        return plain

    def abort(self, futures: list[Future], timeout: float = 10.0) -> dict[int, list[Future]]:
        """Ask the engines to skip the requests of ``futures`` that they have not started.

        Returns, per engine, the futures the engine had already started (or finished):
        those are left alone. The skipped ones fail with ``RemoteError('Aborted')`` when
        the engine reaches them. Futures already done, or not of this controller, are ignored.
        """
        return _loop.run(self._abort(list(futures), timeout), timeout=timeout + 1)

    def skip_requests(self, futures: list[Future], timeout: float = 10.0) -> Future:
        """``abort`` without waiting (any thread, the loop's own included): the requests of
        ``futures`` not begun yet are skipped by their engines, those running are left alone.
        A Future of what ``abort`` returns; a failure to ask is logged, never raised."""
        fut = _loop.submit(self._abort(list(futures), timeout))
        fut.add_done_callback(_log_skip_failure)
        return fut

    def interrupt_requests(self, futures: list[Future], timeout: float = INTERRUPT_ACK) -> Future:
        """Interrupt exactly the requests of ``futures`` and nothing else (not what else an
        engine runs or has queued, of this client's or another's): one an engine runs now is
        interrupted (it fails with its KeyboardInterrupt), one not begun yet fails with a
        KeyboardInterrupt when the engine reaches it, without running, and one still held here
        for order fails at once as ``abort`` fails it. An engine whose helper cannot interrupt
        by name (an older version) only skips the ones not begun (as ``abort``).

        Does not wait: a Future of, per engine, the futures left running (no answer within
        ``timeout`` s, or begun on an engine that could only skip). Futures already done, or
        not of this controller, are ignored."""
        return _loop.submit(self._abort(list(futures), timeout, interrupt=True))

    async def _abort(
        self, futures: list[Future], timeout: float, interrupt: bool = False
    ) -> dict[int, list[Future]]:
        wanted = {id(f) for f in futures if not f.done()}
        per_engine: dict[int, list[Request]] = {}
        for conn in list(self._engines.values()):
            mine = [
                r
                for r in conn.requests.values()
                if id(r.future) in wanted and r.kind in ("execute", "comm")
            ]
            for req in mine:
                if req.held:
                    self._abort_held(conn, req)  # never sent: the engine never sees it
                else:
                    per_engine.setdefault(conn.eid, []).append(req)
        refused: dict[int, list[Future]] = {}
        replies = []
        for eid, reqs in per_engine.items():
            conn = self._engines[eid]
            if conn.dead or not conn.data_ok or "control" not in conn.sockets:
                refused[eid] = [r.future for r in reqs]
                continue
            named = interrupt and bool(conn.engine_info.get("interrupt_named"))
            ids = [r.msg_id for r in reqs]
            try:
                fut = self._send_shell(
                    conn,
                    "ime_interrupt_request" if named else "ime_abort_request",
                    {"msg_ids": ids, "only": True} if named else {"msg_ids": ids},
                    kind="control",
                    channel="control",
                )
            except Exception as exc:  # this engine only: not aborted, the others are asked
                log.warning("engine %s: the abort request was not sent (%s)", eid, exc)
                refused[eid] = [r.future for r in reqs]
                continue
            replies.append((eid, reqs, named, fut))
        deadline = time.monotonic() + timeout
        for eid, reqs, named, fut in replies:
            try:
                reply = await _wait_for(fut, deadline, "no answer", eid)
            except EngineError:
                refused[eid] = [r.future for r in reqs]
                continue
            content = reply.reply or {}
            if named:
                if content.get("status") != "ok":
                    log.warning(
                        "engine %s could not interrupt requests: %s: %s",
                        eid,
                        content.get("ename"),
                        content.get("evalue"),
                    )
                    refused[eid] = [r.future for r in reqs]
                continue
            running = set(content.get("running") or [])
            left = [r.future for r in reqs if r.msg_id in running]
            if left:
                refused[eid] = left
        return refused

    def _abort_held(self, conn: EngineConn, req: Request) -> None:
        """(loop) Abort a request still held here for order (not sent): it fails as the engine
        would fail a skipped one, and the requests held behind it may go."""
        for i, (_msg, held, _buffers) in enumerate(conn.held):
            if held is req:
                del conn.held[i]
                break
        req.held = False
        text = "aborted before it was sent (mec abort)"
        if req.kind == "execute":
            result = wire.execute_record(conn.eid, req.code, {"status": "aborted"}, [], [], [])
        else:
            result = {"id": conn.eid, "stdout": "", "stderr": "", "outputs": []}
        exc = RemoteError("Aborted", text, [], conn.eid, _method(req), result=result)
        self._finish(conn, req, exc=exc)
        self._release(conn)

    def pending(self, eid: int) -> int:
        """Requests of this client in flight on engine ``eid``."""
        return self._published[eid].in_flight

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (new requests then raise ``EngineError``)."""
        return self._closed

    def close(self) -> None:
        """Close every channel; requests still in flight fail with ``EngineError``."""
        if self._closed:
            return
        self._closed = True
        try:
            _loop.run(self._close(), timeout=10)
        except Exception as exc:  # closing must never raise or hang
            log.debug("error while closing controller: %s", exc)


async def _wait_for(fut: Future, deadline: float, text: str, eid: int) -> Any:
    """Await a request's future until ``deadline``; past it an ``EngineError`` saying ``text``
    (never asyncio's bare, empty ``TimeoutError``)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), max(deadline - time.monotonic(), 0))
    except asyncio.TimeoutError:
        raise EngineError(text, eid) from None


def _death_error(
    conn: EngineConn, req: Request, reason: str, sent: bool = True, own_output: str = ""
) -> EngineError:
    """The error of a request that the death of its engine (``reason``) fails, with what the
    engine had sent for it by then (``result``: the last words of a crash) and, after the
    message, what its process wrote itself (``own_output``); one never ``sent`` (held back to
    keep the engine's order) does not claim it was running."""
    what = (
        f" while running {req.code or req.op or req.kind!r}"
        if sent and (req.code or req.op)
        else ""
    )
    text = f"engine {conn.eid} {reason}{what}" + (f"\n{own_output}" if own_output else "")
    return EngineError(text, conn.eid, _method(req), _partial_record(conn, req))


def _partial_record(conn: EngineConn, req: Request) -> dict | None:
    """What the engine had sent for a request that fails without its reply (its engine died,
    its reply was lost): an execute's result record (status 'error'), an operation's output."""
    if req.kind == "execute":
        reply = {"status": "error", "execution_count": req.number, **(req.reply or {})}
        return wire.execute_record(conn.eid, req.code, reply, req.stdout, req.stderr, req.outputs)
    if req.kind == "comm":
        return {
            "id": conn.eid,
            "stdout": "".join(req.stdout),
            "stderr": "".join(req.stderr),
            "outputs": req.outputs,
        }
    return None


def _set_sent(req: Request, tracker: Any) -> None:
    """Resolve a request's ``sent`` future (once): its buffers are in zmq's hands now."""
    sent = getattr(req.future, "sent", None)
    if sent is not None and not sent.done():
        sent.set_result(tracker)


def _log_skip_failure(fut: Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("skipping requests not begun failed: %r", fut.exception())


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _acall(fn: Callable[[], Any]) -> Any:
    return fn()


def _short(code: str, width: int = 80) -> str:
    code = " ".join(code.split())
    return code if len(code) <= width else code[: width - 3] + "..."


def _relabel(conn: EngineConn, req: Request) -> None:
    """(loop) ``req`` is sent: the kernel labels a thread's output with it from now on (a
    shell or fast request), unless it runs no code of the user's (``_LABELLESS``): output
    labelled with that one is of the request before it (``_late``)."""
    if req.channel not in ("shell", "fast"):
        return
    if req.kind == "comm" and req.op in _LABELLESS:
        conn.late_aliases[req.msg_id] = conn.late_label
        while len(conn.late_aliases) > LATE_ROUTES:
            conn.late_aliases.popitem(last=False)
    else:
        conn.late_label = req.msg_id


def _method(req: Request) -> str:
    return "execute" if req.kind == "execute" else (req.op or req.kind)


def _resolve(fut: asyncio.Future[Any]) -> None:
    """Set ``fut``'s result to None unless it is done already (a loop callback)."""
    if not fut.done():
        fut.set_result(None)
