"""Code that runs *inside* an engine (an ordinary ipykernel).

The controller installs it with a silent ``execute`` and then opens a comm with target
``ipy_multiengine``. Each comm message is one operation on the user namespace:
``push``, ``pull``, ``apply``, ``map`` or ``ping``. Every message gets exactly one reply
``{'rid': ..., 'status': 'ok'|'error', ...}`` with pickled payloads as binary buffers, also
when the operation raises (a comm handler exception would otherwise produce no reply).

The fast path (issue 15.2): the comm's open reply also names a ZMQ ROUTER socket that this
helper serves on the kernel's own main loop, beside ipykernel's shell dispatch. The same
operations arrive there as Jupyter messages signed with the kernel's key (a message whose
signature does not check is dropped unread: nothing unpickles it); the socket is a unix socket
next to the kernel's own (in the launcher's 0700 directory) for IPC engines, else TCP on the
kernel's address, with the kernel's CurveZMQ keys when it has them. An operation that printed
or displayed something replies on the comm instead, behind its output on IOPub, so no output
is lost or reordered. ``IPY_MULTIENGINE_FAST=0`` in the engine's environment keeps it off.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C module (no stub)
import codecs
import collections
import contextlib
import contextvars
import dis
import functools
import inspect
import itertools
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import zmq
import zmq.backend
from IPython import get_ipython

from . import errors, serialize, wire

TARGET = "ipy_multiengine"


def register() -> None:
    """Register the comm target on the running kernel (idempotent)."""
    ip = get_ipython()
    ip.kernel.comm_manager.register_target(TARGET, _on_open)
    if not _registered[0]:
        _install_abort(ip.kernel)
        _install_interrupt(ip.kernel)
        _install_crash_dump()
        _install_fd_capture()
        import atexit

        atexit.register(_let_control_finish)  # runs before ipykernel's close (registered earlier)
    _registered[0] = True
    if getattr(sys.breakpointhook, "__name__", "") != "_breakpointhook":
        _original_hook[0] = sys.breakpointhook
        sys.breakpointhook = _breakpointhook


_original_hook: list = [None]


def _install_crash_dump() -> None:
    """A fatal signal (a segfault in C code, an abort) writes the Python traceback of the
    crashing thread (``faulthandler``) to the process's own stderr, which launchers collect (a local
    engine's log, shown in the ``EngineError`` of a dead engine). Without it Python writes
    nothing; and ipykernel points fd 2 at a pipe read by a thread of the dying process, so a
    dump written there (also by ``faulthandler.enable()`` in a cell: ipykernel's default for it)
    was lost. An own copy of the original stderr: ipykernel closes its copy at shutdown, and a
    crash after that would write into whatever file reused the number. A faulthandler already
    enabled (``-X faulthandler``, PYTHONFAULTHANDLER, the user's own file) is left as it is.

    A process the engine forks (multiprocessing's workers) dumps to its own fd 2 instead,
    ipykernel's pipe, which the engine forwards to the cell: in the engine's log a worker's
    crash read as the engine's own last words when the engine died later of something else."""
    import faulthandler

    captured = getattr(sys.stderr, "_original_stdstream_copy", None)  # ipykernel's fd capture
    try:
        own = os.dup(captured if isinstance(captured, int) else 2)
    except OSError:  # no stderr at all
        return
    _crash_fd[0] = own
    engine = os.getpid()
    enable = faulthandler.enable
    to_own = [False]  # whether the engine's faulthandler writes to ``own`` (we enabled it so)

    def enable_here(file: Any = None, all_threads: bool = True, **kwargs: Any) -> None:
        if file is None:  # the real stderr: the engine's own copy of it, a child's fd 2
            file = own if os.getpid() == engine else 2
        enable(file=file, all_threads=all_threads, **kwargs)
        to_own[0] = file == own and os.getpid() == engine

    def in_child() -> None:
        if to_own[0] and faulthandler.is_enabled():
            enable(file=2, all_threads=True)  # (a child just forked has one thread)

    faulthandler.enable = enable_here  # a cell's faulthandler.enable(): the real stderr too
    if not faulthandler.is_enabled():  # the crashing thread only: the kernel's own are noise
        enable(file=own, all_threads=False)
        to_own[0] = True
    os.register_at_fork(after_in_child=in_child)


#: the engine's own copy of its original stderr, where a crash's traceback goes
_crash_fd: list = [None]


class _FdCapture:
    """ipykernel's capture of one of fd 1/2 (the output of C code and subprocesses), taken over
    so that what was written to the fd is in the stream *before* the stream is flushed or
    written to.

    ipykernel points the fd at a pipe that a thread of its own reads into the stream whenever
    it gets to it: output a cell wrote there just before it ended arrived after the request's
    reply and idle (late: kept apart, or lost when the request kept no record; a fast
    operation's not at all), and Python-level output written after it came first. Here the
    pipe is read non-blocking under a lock by a thread that waits for data, and also by
    :meth:`drain`, which the stream's ``write`` and ``flush`` call first, so the stream gets
    the fd's bytes in the order they were written. The engine's log keeps its copy, as before.
    """

    #: chunks (64 KiB) one pass moves: a writer that never stops does not hold a print forever
    PASS = 16
    #: seconds ipykernel's reader gets to stop when ours takes over
    STOP_WAIT = 2.0
    #: bytes read but not yet copied to the log beyond which the log misses them (a log that
    #: does not take writes: a pipe nobody reads, a terminal stopped by Ctrl-S)
    LOG_BACKLOG = 64 << 20

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.fid: int = stream._fid
        self.copy: int = stream._original_stdstream_copy
        self.lock = threading.RLock()
        # a character split between two reads is one character (ipykernel: two U+FFFD)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pid = os.getpid()
        # ipykernel's own write: ours would drain (re-entering this lock) and write what it
        # read then ahead of what this pass read before it, reversing a long output's chunks
        self.write = functools.partial(type(stream)._ipy_multiengine_base_write, stream)
        self.readable = select.poll()
        #: the thread in :meth:`drain` (None: none)
        self.draining: int | None = None
        # the log's copy is written by our reader alone, outside the lock: a log that blocks
        # holds up that copy, not the prints that drain the pipe; drain wakes it for theirs
        self.unlogged: list[bytes] = []
        self.unlogged_size = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.readable.register(self.fid, select.POLLIN)

    def take_over(self) -> bool:
        """Stop ipykernel's reader (as its ``close`` does: a NUL byte wakes it and it drops
        what it read, nothing at this point) and start ours; False when that did not work."""
        stream, old = self.stream, self.stream.watch_fd_thread
        if not isinstance(old, threading.Thread):
            # another ipykernel's reader: stopping it by ``_should_watch`` may not work, and
            # nothing would read the pipe then (C code's output filling it blocks the engine)
            _log.warning(
                "ipy_multiengine: fd %s output stays as ipykernel reads it (its reader is %r)",
                stream.name,
                old,
            )
            return False
        stream._should_watch = False
        os.write(stream._original_stdstream_fd, b"\0")
        old.join(self.STOP_WAIT)
        stream._should_watch = True
        if old.is_alive():  # it does not stop so: leave it, and ours unstarted
            _log.warning(
                "ipy_multiengine: ipykernel's fd %s reader did not stop within %g s; its output "
                "stays as ipykernel reads it (fd output at the end of a command may come late)",
                stream.name,
                self.STOP_WAIT,
            )
            return False
        with self.lock:  # whatever came with the NUL and after it
            with contextlib.suppress(BlockingIOError):
                os.set_blocking(self.fid, False)
            self._pump(drop_nul=True)
        thread = threading.Thread(target=self._watch, name=f"ipy_multiengine-{stream.name}")
        thread.daemon = True
        stream.watch_fd_thread = thread  # what ipykernel's close joins after its NUL byte
        stream._ipy_multiengine_fd = self
        thread.start()
        return True

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self.fid, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        try:
            more = True
            while more:
                self._log_copy()
                poller.poll()
                with self.lock:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    if not self.stream._should_watch:
                        break  # ipykernel's close: its NUL byte woke us
                    more = self._pump()  # False: every writer closed the pipe
            self._log_copy()
        except Exception:
            self.stream._exc = sys.exc_info()  # ipykernel's close prints it

    def _log_copy(self) -> None:
        """Write what was read so far to the log's copy (our reader only, the lock not held)."""
        with self.lock:
            chunks, self.unlogged, self.unlogged_size = self.unlogged, [], 0
        for data in chunks:
            # the log's copy is a copy: a full disk (or a log pipe nobody reads any more)
            # must not stop the output, nor come out of the user's next print
            with contextlib.suppress(OSError):
                os.write(self.copy, data)

    def _pump(self, drop_nul: bool = False) -> bool:
        """Forward what the pipe holds now, up to :attr:`PASS` chunks (the lock held); False
        at its end."""
        for _ in range(self.PASS):
            try:
                data = os.read(self.fid, 65536)
            except BlockingIOError:
                return True
            if not data:
                return False
            if drop_nul:
                data = data.replace(b"\0", b"")
            text = self.decoder.decode(data)
            if text:
                self.stream._ipy_multiengine_writes += 1
                self.write(text)
            if data and self.unlogged_size < self.LOG_BACKLOG:
                self.unlogged.append(data)
                self.unlogged_size += len(data)
        return True

    def drain(self) -> None:
        """Move everything written to the fd so far into the stream."""
        if os.getpid() != self.pid or not self.stream._should_watch:
            return  # a forked child (no reader of ours, the lock may be held forever); closed
        if self.draining == threading.get_ident():
            # a signal handler's print, run inside this drain (in ``poll``, whose object is not
            # re-entrant, or between a read and its write): what that drain reads comes after
            return
        with self.lock:  # held by our reader while it forwards what it read: wait for that
            self.draining = threading.get_ident()
            try:
                if self.readable.poll(0):
                    self._pump()
                    with contextlib.suppress(BlockingIOError):
                        os.write(self.wake_w, b"\0")  # our reader: the log's copy
            finally:
                self.draining = None


@functools.cache
def _draining(cls: Any) -> Any:
    """``cls`` (an ipykernel ``OutStream``) whose ``write`` and ``flush`` first move what was
    written to its fd into it (:meth:`_FdCapture.drain`), and that counts its writes."""

    base_write = cls.write

    class Draining(cls):
        #: the write it extends (what the fd reader forwards with)
        _ipy_multiengine_base_write = staticmethod(base_write)
        #: the capture of its fd (None: not captured)
        _ipy_multiengine_fd: _FdCapture | None = None
        #: how many writes it had: output leaves no other trace once ipykernel's timer flushed it
        _ipy_multiengine_writes = 0

        # ``write`` is a property: IPython's history tee sets ``stream.write`` to its wrapper of
        # what it found there for each cell, then back, as an instance attribute that would
        # hide a method of ours from then on; set, it wraps ours
        @property
        def write(self) -> Callable[[str], int | None]:
            return self.__dict__.get("_ipy_multiengine_write") or self._draining_write

        @write.setter
        def write(self, value: Callable[[str], int | None]) -> None:
            ours = getattr(value, "__self__", None) is self and getattr(
                value, "__func__", None
            ) in (base_write, Draining._draining_write)
            self.__dict__["_ipy_multiengine_write"] = None if ours else value

        @write.deleter
        def write(self) -> None:
            self.__dict__["_ipy_multiengine_write"] = None

        def _draining_write(self, string: str) -> int | None:
            if self._ipy_multiengine_fd is not None:
                self._ipy_multiengine_fd.drain()
            self._ipy_multiengine_writes += 1
            return base_write(self, string)

        def flush(self) -> None:
            if self._ipy_multiengine_fd is not None:
                self._ipy_multiengine_fd.drain()
            super().flush()

    Draining.__name__ = Draining.__qualname__ = cls.__name__
    Draining.__module__ = cls.__module__
    return Draining


_fd_captures: list[_FdCapture] = []


def _install_fd_capture() -> None:
    """Make ipykernel's sys.stdout and sys.stderr count their writes and take over their
    capture of fd 1 and 2 where it runs (see :class:`_FdCapture`)."""
    for stream in (sys.stdout, sys.stderr):
        if not all(hasattr(stream, name) for name in ("_buffers", "_flush_pending", "session")):
            continue  # not an ipykernel OutStream
        # a subclass, not instance attributes: IPython's history tee replaces the instance's
        # write for each cell and puts back the one it found
        stream.__class__ = _draining(type(stream))  # type: ignore[arg-type]
        stream.__dict__.pop("write", None)  # the tee's of this cell: the property serves now
        needs = ("_fid", "_original_stdstream_copy", "_original_stdstream_fd", "watch_fd_thread")
        if not getattr(stream, "_should_watch", False) or not all(
            hasattr(stream, name) for name in needs
        ):
            continue  # not capturing (capture_fd_output=False, another kernel), or unknown
        try:
            capture = _FdCapture(stream)
            if capture.take_over():
                _fd_captures.append(capture)
        except Exception as exc:
            _log.warning(
                "ipy_multiengine: fd %s output stays as ipykernel reads it (%s)",
                getattr(stream, "name", "?"),
                exc,
            )


def _drain_fds() -> None:
    """Everything written to fd 1 and 2 so far, into sys.stdout and sys.stderr."""
    for capture in _fd_captures:
        capture.drain()


def _writes() -> int:
    """How many writes sys.stdout and sys.stderr have had (where they count them)."""
    return getattr(sys.stdout, "_ipy_multiengine_writes", 0) + getattr(
        sys.stderr, "_ipy_multiengine_writes", 0
    )


#: Seconds an exiting engine gives ipykernel's control thread to finish a shutdown request.
CONTROL_FINISH = 1.0


def _let_control_finish() -> None:
    """(atexit, before ipykernel's ``IPKernelApp.close``) Let the control thread finish the
    shutdown request it is answering.

    Its handler stops the main loop, and then the thread still flushes stdout/stderr through
    the IOPub thread; ``close`` stops the IOPub thread and only then joins the control thread,
    so a flush that comes after that blocks on the stopped thread's pipe for good, and the
    engine's manager SIGTERMs it 1.5 s later (one stop in five of 4 engines, here). Joined
    first, while IOPub still runs, the thread finishes and ends (its loop was told to stop).
    """
    try:
        from ipykernel.kernelapp import IPKernelApp

        if not IPKernelApp.initialized():
            return
        app = IPKernelApp.instance()
        thread = getattr(app, "control_thread", None)
        if getattr(app.kernel, "_shutdown_message", None) is None:
            return  # not exiting for a shutdown request: the thread's loop runs on
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(CONTROL_FINISH)
    except Exception as exc:  # exiting: never raise from here
        _log.debug("ipy_multiengine: could not wait for the control thread (%s)", exc)


def _breakpointhook(*args: Any, **kwargs: Any) -> Any:
    """``breakpoint()`` on an engine: IPython's debugger over the stdin channel, so the prompt
    reaches whoever runs the cell (ipykernel leaves debugpy's hook, which does nothing unless a
    debug adapter client is attached; then that hook is used)."""
    __tracebackhide__ = True
    try:
        import debugpy

        if debugpy.is_client_connected():
            return _original_hook[0](*args, **kwargs)
    except Exception:
        pass
    from IPython.core.debugger import Pdb

    Pdb().set_trace(sys._getframe(1))


def _namespace() -> dict:
    return get_ipython().user_ns


_registered = [False]

#: ``ime_abort_request`` (control channel): shell messages to skip, and those already begun;
#: both under one lock (the control thread adds, the shell's dispatch checks)
#: (re-entrant: the SIGINT handler, ``_on_sigint``, takes it in the main thread, which may hold
#: it when the signal is handled)
_abort_lock = threading.RLock()
#: notified when an interrupt reached the user's code, or that code stopped (``_keep_signalling``)
_interrupt_seen = threading.Condition(_abort_lock)
_aborted: set[str] = set()
_begun: collections.OrderedDict[str, None] = collections.OrderedDict()
_BEGUN_KEPT = 4096


def _begin(msg_id: str) -> bool:
    """A request is about to run: False if it was aborted (then it must not run)."""
    with _abort_lock:
        if msg_id in _aborted:
            _aborted.discard(msg_id)
            return False
        _begun[msg_id] = None
        if len(_begun) > _BEGUN_KEPT:
            _begun.popitem(last=False)
        return True


def _install_abort(kernel: Any) -> None:
    """Let clients skip queued requests: a control handler records ids to skip, and the
    kernel's ``should_handle`` hook (ipykernel's place for "aborted requests") skips them."""
    original = kernel.should_handle

    def should_handle(stream: Any, msg: dict, idents: Any) -> Any:
        skip = not _begin(msg["header"]["msg_id"])
        if skip:
            _skip(kernel, stream, msg, idents)
            return False
        return original(stream, msg, idents)

    def abort_request(stream: Any, idents: Any, msg: dict) -> None:
        running = []
        with _abort_lock:
            for msg_id in msg["content"].get("msg_ids") or []:
                if msg_id in _begun:
                    running.append(msg_id)
                else:
                    _aborted.add(msg_id)
        kernel.session.send(
            stream, "ime_abort_reply", {"status": "ok", "running": running}, msg, idents
        )

    kernel.should_handle = should_handle
    kernel.control_handlers["ime_abort_request"] = abort_request


def _skip(kernel: Any, stream: Any, msg: dict, idents: Any, interrupted: bool = False) -> None:
    """Answer a skipped request as aborted (an execute) or with an ``Aborted`` error (a comm op);
    ``interrupted``: with a KeyboardInterrupt error (owed an interrupt before it began)."""
    mtype = msg["header"]["msg_type"]
    if mtype == "comm_msg":
        content = msg["content"]
        comm = kernel.comm_manager.get_comm(content.get("comm_id"))
        if comm is not None:
            rid = (content.get("data") or {}).get("rid")
            reply: dict[str, Any] = {
                "rid": rid,
                "status": "error",
                "ename": "Aborted",
                "evalue": "aborted before it started (mec abort)",
                "traceback": [],
                "item": None,
            }
            comm.send(_signed(comm, _interrupted_reply(rid) if interrupted else reply, []))
        return
    reply_type = mtype.replace("_request", "_reply")
    answer: dict[str, Any] = {"status": "aborted"}
    if interrupted:
        answer = {
            "status": "error",
            "ename": "KeyboardInterrupt",
            "evalue": INTERRUPTED_BEFORE,
            "traceback": [f"KeyboardInterrupt: {INTERRUPTED_BEFORE}"],
            "user_expressions": {},
            "payload": [],
        }
    kernel.session.send(stream, reply_type, answer, msg, idents)


#: ``ime_interrupt_request`` (control channel): requests owed an interrupt that had not begun
#: when it came (each ends with a KeyboardInterrupt as it begins, without running), and the
#: request running now (``_Running``). Both under ``_abort_lock``: the control thread reads them
#: and signals while holding it, so the request cannot end, and a later one begin, in between.
_owed: collections.OrderedDict[str, None] = collections.OrderedDict()
_OWED_KEPT = 4096
_MISSING = object()


class _Running:
    """The request the main thread runs: its id, who sent it (``s:<session>`` for a shell
    message, ``c:<comm id>`` for the fast socket), whether it runs the user's code right now
    (``region``: a signal raises a KeyboardInterrupt there, where IPython or ``_run_op`` report
    it as the request's error; elsewhere, in ipykernel's or IPython's own steps, it may be
    swallowed, by an event callback, or lose the reply), and whether an interrupt came outside
    that region (``owed``: raised as the user's code is entered next); ``hit``: a SIGINT was
    handled (a KeyboardInterrupt raised) while it ran, the last one at ``hit_at``; ``plain``:
    that one was not this helper's (``signalled``: a signal of ours is on its way), but the
    plain kind (a client's fallback, a kernel manager's ``interrupt_kernel``)."""

    __slots__ = ("hit", "hit_at", "msg_id", "origin", "owed", "plain", "region", "signalled")

    def __init__(self, msg_id: str, origin: str) -> None:
        self.msg_id, self.origin = msg_id, origin
        self.owed = self.region = self.hit = self.plain = self.signalled = False
        self.hit_at = 0.0


_current: list[_Running | None] = [None]


def _enter(msg_id: str, origin: str) -> tuple[bool, _Running | None]:
    """(main thread) Request ``msg_id`` from ``origin`` begins: (False, ...) when it is owed an
    interrupt (then it must not run); the request it runs within, for ``_leave``."""
    with _abort_lock:
        previous = _current[0]
        if _owed.pop(msg_id, _MISSING) is not _MISSING:
            return False, previous
        _current[0] = _Running(msg_id, origin)
        return True, previous


def _uninterrupted(fn: Callable[[], None]) -> None:
    """Run ``fn`` (bookkeeping under ``_abort_lock``) to its end: an interrupt that lands in it
    came as the user's code ended; it is dropped, the bookkeeping must still be done."""
    while True:
        try:
            fn()
            return
        except KeyboardInterrupt:
            continue


def _leave(previous: _Running | None) -> None:
    """(main thread) The request ``_enter`` began has ended; ``previous`` runs again (a comm
    message handled while an async cell waits)."""

    def leave() -> None:
        with _abort_lock:
            _current[0] = previous
            _interrupt_seen.notify_all()

    _uninterrupted(leave)


def _region_enter() -> bool:
    """(main thread) The user's code of the current request begins: False when an interrupt is
    owed to it (then raise a KeyboardInterrupt instead of running it); from here a signal
    interrupts it."""
    with _abort_lock:
        running = _current[0]
        if running is None:
            return True
        if running.owed:
            running.owed = False
            return False
        running.region = True
        return True


def _region_exit() -> None:
    """(main thread) The user's code of the current request stops (an execute: one statement).
    An interrupt that lands here came as it ended: it is owed to the next statement."""
    hit = [False]

    def leave() -> None:
        with _abort_lock:
            running = _current[0]
            if running is not None:
                running.region = False
                running.owed = running.owed or hit[0]
                _interrupt_seen.notify_all()

    while True:
        try:
            leave()
            return
        except KeyboardInterrupt:
            hit[0] = True


def _restore_sigint(saved: Any) -> None:
    """Put back the SIGINT handler ``saved``; a signal pending meanwhile (``signal.signal``
    runs handlers first, raising here without changing the handler) came as the request
    ended: it is dropped, the handler must be restored."""
    _uninterrupted(lambda: _signal.signal(signal.SIGINT, saved))


def _interrupt_self(kernel: Any) -> None:
    """SIGINT to this kernel (and its process group, when it leads one), as ipykernel's own
    ``interrupt_request`` does; then wake the main thread's event loop. A cell with a top-level
    ``await`` has ipykernel's handler, which schedules the cell's cancel on that loop without
    waking it (tornado's ``add_callback`` from the loop's own thread): the loop, waiting in
    ``select``, would run it only when something else woke it (the next request)."""
    send = getattr(kernel, "_send_interrupt_children", None)
    if send is not None:
        send()
    else:
        os.kill(os.getpid(), signal.SIGINT)
    loop = getattr(getattr(kernel, "io_loop", None), "asyncio_loop", None)
    if loop is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # closed meanwhile (the kernel exits)
            loop.call_soon_threadsafe(_nothing)


def _nothing() -> None:
    """What wakes the main loop (``_interrupt_self``)."""


def _on_sigint(signum: int, frame: Any) -> None:
    """SIGINT while a request runs (in place of ``default_int_handler``): note that the
    interrupt reached Python (``_keep_signalling`` stops), then raise KeyboardInterrupt."""
    __tracebackhide__ = True  # IPython's tracebacks leave this frame out
    with _abort_lock:
        running = _current[0]
        if running is not None:
            running.hit, running.hit_at = True, time.monotonic()
            running.plain, running.signalled = not running.signalled, False
        _interrupt_seen.notify_all()
    raise KeyboardInterrupt


def _sigint_to_ours() -> Any:
    """(main thread) ``_on_sigint`` instead of ipykernel's ``default_int_handler`` for the
    request now beginning; what to restore (None: another handler, left as it is)."""
    if _signal.getsignal(signal.SIGINT) is not _signal.default_int_handler:
        return None
    return _signal.signal(signal.SIGINT, _on_sigint)


def _sigint_back(saved: Any) -> None:
    if saved is not None and _signal.getsignal(signal.SIGINT) is _on_sigint:
        _restore_sigint(saved)


#: Seconds between repeated signals to a request whose interrupt has not reached Python yet (a
#: signal that comes just before a blocking call such as ``time.sleep`` enters the kernel is
#: only handled when that call returns), and how long it is repeated at most.
SIGNAL_AGAIN = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SIGNAL_FOR = 10.0


def _keep_signalling(kernel: Any, running: _Running) -> None:
    """(a thread of its own) Signal ``running`` again until a KeyboardInterrupt was raised in it,
    it left the user's code, ``SIGNAL_FOR`` s passed, or SIGINT has a handler not ours (the
    user's got the first signal). Waits on ``_interrupt_seen``: no polling; each signal is sent
    holding the lock, while ``running`` is in that code."""
    end = time.monotonic() + SIGNAL_FOR
    steps = itertools.chain(SIGNAL_AGAIN, itertools.repeat(SIGNAL_AGAIN[-1]))
    with _abort_lock:
        for step in steps:
            left = end - time.monotonic()
            stopped = _interrupt_seen.wait_for(
                lambda: running.hit or not running.region or _current[0] is not running,
                min(step, max(left, 0)),
            )
            if stopped or time.monotonic() >= end:
                return
            if _signal.getsignal(signal.SIGINT) is not _on_sigint:
                # the user's code (or ipykernel's async-cell canceller) has its own handler:
                # it got the first signal; more would look like more Ctrl-C presses
                return
            try:
                running.signalled = True
                _interrupt_self(kernel)
            except OSError as exc:
                _log.warning("ipy_multiengine: could not signal this engine again: %s", exc)
                return


#: Seconds after a KeyboardInterrupt was raised in a request by a plain signal (not this
#: helper's) within which an ``ime_interrupt_request`` for it does not signal it again: it is the
#: same interrupt, whose client had also sent a plain signal because this engine's control
#: thread answered after its 1 s wait (e.g. a C call held the GIL). A second one would hit the
#: code's own cleanup. After a signal of this helper's, the next ``ime_interrupt_request`` is a
#: second interrupt (the user's second Ctrl-C), and signals at once.
INTERRUPT_MERGED = 1.0

#: The code an execute runs instead of the user's when it is owed an interrupt (IPython
#: reports the KeyboardInterrupt as the cell's error).
_RAISE_INTERRUPT = compile("raise KeyboardInterrupt", "<interrupted>", "exec")


def _install_interrupt(kernel: Any) -> None:
    """Make interrupts reliable (ipykernel ignores SIGINT between requests, and a signal that
    lands in its or IPython's own steps of a request can be swallowed): ``ime_interrupt_request``
    on the control channel names the requests its client sent so far and not finished
    (``msg_ids``) and the last one it sent (``last``). The one running now is interrupted if it
    is one of them, or came before ``last`` (it began and ``last`` has not), or is another
    client's (as a plain interrupt would); a request of the same client sent after the call is
    never interrupted. Running, it is signalled while it runs the user's code, else interrupted
    as it enters that code next; the named ones not begun yet end with a KeyboardInterrupt when
    they begin, without running. With ``only`` set, exactly the named requests are interrupted:
    the one running now only if it is one of them (whoever sent it), nothing else (a client
    interrupting some of its requests, e.g. an executor's tasks, and not its or others' rest)."""
    for mtype in ("execute_request", "comm_msg"):
        original = kernel.shell_handlers.get(mtype)
        if original is not None:
            kernel.shell_handlers[mtype] = _interruptible(kernel, original)
    shell = getattr(kernel, "shell", None)
    if shell is not None and hasattr(shell, "run_code"):
        shell.run_code = _interruptible_code(shell.run_code)

    def interrupt_request(stream: Any, idents: Any, msg: dict) -> None:
        content = msg["content"]
        ids = [m for m in content.get("msg_ids") or [] if isinstance(m, str)]
        last = content.get("last") or ""
        only = bool(content.get("only"))
        mine = {f"s:{msg['header'].get('session', '')}", f"c:{content.get('comm_id', '')}"}
        reply: dict[str, Any] = {"status": "ok", "interrupted": None}
        with _abort_lock:
            running = _current[0]
            for msg_id in ids:
                if running is None or msg_id != running.msg_id:
                    _owed[msg_id] = None
            while len(_owed) > _OWED_KEPT:
                _owed.popitem(last=False)
            if running is not None and (
                running.msg_id in ids
                or (
                    not only
                    and (
                        running.origin not in mine
                        or running.msg_id == last
                        or (last and last not in _begun)  # it came before the last one sent
                    )
                )
            ):
                reply["interrupted"] = running.msg_id
                if (
                    running.hit
                    and running.plain
                    and time.monotonic() - running.hit_at < INTERRUPT_MERGED
                ):
                    pass  # just interrupted: by its client's plain signal, sent as we were late
                elif running.region:
                    try:
                        running.hit = False
                        running.signalled = True
                        _interrupt_self(kernel)
                        threading.Thread(
                            target=_keep_signalling,
                            args=(kernel, running),
                            name="ipy_multiengine-interrupt",
                            daemon=True,
                        ).start()
                    except OSError as exc:
                        reply = {"status": "error", "ename": type(exc).__name__, "evalue": str(exc)}
                else:
                    running.owed = True
        kernel.session.send(stream, "ime_interrupt_reply", reply, msg, idents)

    kernel.control_handlers["ime_interrupt_request"] = interrupt_request


def _interruptible(kernel: Any, original: Callable) -> Callable:
    """A shell handler that runs ``original`` as the current request (``_enter``), or answers a
    request owed an interrupt with a KeyboardInterrupt, without running it."""

    async def handler(stream: Any, idents: Any, msg: dict) -> None:
        header = msg["header"]
        began, previous = _enter(header["msg_id"], f"s:{header.get('session', '')}")
        saved = _sigint_to_ours() if began else None
        try:
            if not began:
                _skip(kernel, stream, msg, idents, interrupted=True)
                return
            result = original(stream, idents, msg)
            if inspect.isawaitable(result):
                await result
        finally:
            _leave(previous)
            _sigint_back(saved)

    return handler


def _interruptible_code(original: Callable) -> Callable:
    """IPython's ``run_code`` (one statement of a cell) as the interruptible region of an
    execute. A KeyboardInterrupt that escapes ``original`` landed outside its own handler
    (just before or after the user's code): it is reported as the cell's, like one inside."""

    async def run_code(code_obj: Any, result: Any = None, *, async_: bool = False) -> Any:
        try:
            if not _region_enter():
                return await original(_RAISE_INTERRUPT, result, async_=False)
            return await original(code_obj, result, async_=async_)
        except KeyboardInterrupt:
            _region_exit()
            return await original(_RAISE_INTERRUPT, result, async_=False)
        finally:
            _region_exit()

    return run_code


#: What a request owed an interrupt answers when it would begin (it did not run).
INTERRUPTED_BEFORE = "interrupted before it began (mec.interrupt() or Ctrl-C)"


def _interrupted_reply(rid: Any) -> dict:
    return {
        "rid": rid,
        "status": "error",
        "ename": "KeyboardInterrupt",
        "evalue": INTERRUPTED_BEFORE,
        "traceback": [],
        "item": None,
    }


def on_engine() -> bool:
    """True in an engine process (this helper is installed), False anywhere else."""
    return _registered[0]


def call_in_namespace(f: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``f`` as ``apply`` does: a function sent by value sees the caller's globals sent
    with it, then the engine's namespace; the globals it assigns land in that namespace."""
    g, commit = _in_namespace(f)
    try:
        return g(*args, **kwargs)
    finally:
        commit()


def set_in_namespace(values: dict) -> None:
    """Set names in the engine namespace as ``push`` does (functions rebound likewise)."""
    _namespace().update(
        {k: _pushed(v) if isinstance(v, types.FunctionType) else v for k, v in values.items()}
    )


#: The name that holds the engine's id in its namespace (docs/engines.md, "Which engine am I?").
ENGINE_ID_NAME = "engine_id"
_engine_id: list[int | None] = [None]


def _keep_engine_id(*_args: Any) -> None:
    """After every cell: ``engine_id`` is back if a cell (``%reset``, ``del``) removed it."""
    if _engine_id[0] is not None:
        ns = _namespace()
        if ENGINE_ID_NAME not in ns:
            ns[ENGINE_ID_NAME] = _engine_id[0]
            get_ipython().user_ns_hidden[ENGINE_ID_NAME] = _engine_id[0]


def _set_engine_id(eid: int) -> None:
    """Give the namespace its ``engine_id`` (hidden from ``%who``), kept after ``%reset``."""
    ip = get_ipython()
    first = _engine_id[0] is None
    _engine_id[0] = eid
    ip.user_ns[ENGINE_ID_NAME] = eid
    ip.user_ns_hidden[ENGINE_ID_NAME] = eid
    if first:
        ip.events.register("post_run_cell", _keep_engine_id)


def _forget_comm(comm_id: str) -> None:
    for kept in (_comms, _comm_eids, _comm_digest):
        kept.pop(comm_id, None)


def _on_open(comm: Any, msg: dict) -> None:
    comm.on_msg(lambda m: _on_msg(comm, m))
    comm.on_close(lambda _m: _forget_comm(comm.comm_id))
    _comms[comm.comm_id] = comm
    data = msg["content"]["data"]
    rid = data.get("rid")
    eid = data.get("engine_id")
    _comm_eids[comm.comm_id] = eid
    if isinstance(eid, int):
        _set_engine_id(eid)
    _comm_digest[comm.comm_id] = _wants_digest(bool(data.get("digest")))
    reply = {
        "rid": rid,
        "status": "ok",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        # read at each open (not imported by value): a test sets ``wire.PROTOCOL`` here to
        # play an engine of another version
        "protocol": wire.PROTOCOL,
        # a map over one sequence may send its elements, not 1-tuples (``star`` False): an
        # engine of an older version without this would unpack each element as arguments
        "map_elements": True,
        # ``ime_interrupt_request``: interrupts reach requests not begun yet
        # (``_install_interrupt``)
        "interrupt_owed": True,
        # ... and, with ``only``, interrupts exactly the requests it names
        "interrupt_named": True,
        # the messages on this comm, both ways, sign a digest of their buffers (``bd``)
        "comm_digest": _comm_digest[comm.comm_id],
    }
    fast = _fast_address()
    if fast:
        reply["fast"] = fast
    comm.send(_signed(comm, reply, []))


def _kernel_transport() -> tuple[bool, bool]:
    """Whether this kernel's message buffers can be changed on the way (``wire.buffers_exposed``:
    TCP without CurveZMQ), and whether it listens on loopback only. Not knowing (not an
    IPKernelApp) counts as exposed, beyond loopback."""
    try:
        from ipykernel.kernelapp import IPKernelApp

        if IPKernelApp.initialized():
            app = IPKernelApp.instance()
            curve = getattr(app, "curve_secretkey", None) is not None
            return wire.buffers_exposed(app.transport, curve), wire.is_loopback(app.ip)
    except Exception as exc:
        _log.debug("ipy_multiengine: transport unknown (%s)", exc)
    return True, False


def _wants_digest(asked: bool) -> bool:
    """Whether a new comm's messages must sign their buffers: when its client asks (it sees TCP
    without CurveZMQ), or when this kernel's transport exposes them. A client of an older version
    signs none: on a kernel listening on loopback only (where changing the traffic takes root)
    it is served without, elsewhere every operation it sends is refused unread."""
    if asked:
        return True
    exposed, loopback = _kernel_transport()
    if exposed and loopback:
        _log.warning(
            "ipy_multiengine: a client of an older version opened a comm without buffer "
            "digests; accepted on loopback TCP"
        )
        return False
    return exposed


def _signed(comm: Any, data: dict, buffers: list) -> dict:
    """``data`` for ``comm``, with the digest of the ``buffers`` sent with it when its messages
    sign theirs (``_comm_digest``); the client checks it before it unpickles anything."""
    if _comm_digest.get(comm.comm_id):
        return {**data, "bd": wire.buffers_digest(buffers)}
    return data


#: the open comms by id: an operation on the fast socket that printed replies on its client's comm
_comms: dict[str, Any] = {}
#: the engine id each open comm's client gave this engine (each client's may differ)
_comm_eids: dict[str, Any] = {}
#: per open comm: its messages sign a digest of their buffers (``_wants_digest``)
_comm_digest: dict[str, bool] = {}


def _op_push(data: dict, frames: list) -> list:
    values = serialize.loads(frames)
    for name, value in values.items():
        if isinstance(value, types.FunctionType):
            # a pushed function keeps the caller's values of push time and also sees the
            # engine's names (the same precedence as apply/map); its globals go to the engine
            values[name] = _pushed(value)
    _namespace().update(values)
    return []


def _op_pull(data: dict, frames: list) -> list:
    ns = _namespace()
    values = []
    for name in data["names"]:
        try:
            values.append(ns[name])
        except KeyError:
            raise NameError(f"name {name!r} is not defined") from None
    try:
        return serialize.dumps(values[0] if data.get("single") else values)
    except Exception as exc:
        for name, value in zip(data["names"], values, strict=True):
            _check_sendable(f"{name!r}", value)
        raise TypeError(f"cannot send the pulled values back: {exc}") from exc


def _check_sendable(what: str, value: Any) -> None:
    try:
        serialize.dumps(value)
    except Exception as exc:
        raise TypeError(
            f"cannot send {what} back to the client: a {type(value).__name__} "
            f"cannot be pickled ({exc})"
        ) from exc


class _CallerGlobals(dict):
    """The globals of a function sent by value: the caller's globals it references (as
    cloudpickle shipped them with this call), falling back to the engine's namespace.

    ``LOAD_GLOBAL`` on a dict subclass goes through ``__getitem__``, so a missing name is looked
    up in the engine namespace at the moment of use, then in builtins.
    """

    def __init__(self, shipped: dict, engine_ns: dict) -> None:
        super().__init__(shipped)
        self.engine_ns = engine_ns

    def __missing__(self, name: str) -> Any:
        return self.engine_ns[name]  # KeyError: Python then tries builtins

    def __reduce__(self) -> Any:
        # pulled back (a pushed function, globals()): the shipped values, never the engine namespace
        return dict, ({k: v for k, v in self.items() if not k.startswith("__")},)


def _is_module_function(f: types.FunctionType) -> bool:
    module = sys.modules.get(f.__module__)
    return module is not None and f.__globals__ is vars(module)


def _in_namespace(f: Any) -> tuple[Any, Callable[[], None]]:
    """Rebind a function sent by value (typed at the prompt, a lambda) for one call.

    The precedence rule (docs/engines.md, "Functions sent by value"): a name the function
    reads resolves first to the caller's value *sent with this call* (cloudpickle ships the
    client globals the code references, freshly on every call), then to the engine's
    namespace (``%px import numpy``, ``push``), then to builtins. The caller's globals are not
    copied into the engine namespace; a ``global`` the function assigns is written there.
    Helpers the function reaches through its globals or closure get the same treatment.

    Returns the rebound function and a ``commit`` to call after the call(s), which writes the
    globals the function assigned into the engine namespace.
    """
    if isinstance(f, functools.partial):  # mec.map(partial(f, scale=2), ...)
        inner, commit = _in_namespace(f.func)
        return (f if inner is f.func else functools.partial(inner, *f.args, **f.keywords)), commit
    if isinstance(f, types.MethodType):  # mec.apply(obj.method): a class typed at the prompt
        inner, commit = _in_namespace(f.__func__)
        return (f if inner is f.__func__ else types.MethodType(inner, f.__self__)), commit
    if not isinstance(f, types.FunctionType) or _is_module_function(f):
        return f, lambda: None  # imported from a real module on the engine: keep its globals
    ns = _namespace()
    overlays: dict[int, _CallerGlobals] = {}
    rebound: dict[int, types.FunctionType] = {}

    def rebind(fn: types.FunctionType) -> types.FunctionType:
        if id(fn) in rebound:
            return rebound[id(fn)]
        if _is_module_function(fn) or isinstance(fn.__globals__, _CallerGlobals):
            return fn
        first = id(fn.__globals__) not in overlays
        g = overlays.setdefault(id(fn.__globals__), _CallerGlobals(fn.__globals__, ns))
        new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
        new.__kwdefaults__ = fn.__kwdefaults__
        new.__qualname__ = fn.__qualname__
        new.__dict__.update(fn.__dict__)
        rebound[id(fn)] = new
        if first:
            for name, value in list(g.items()):
                if isinstance(value, types.FunctionType):
                    g[name] = rebind(value)
        for cell in fn.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, types.FunctionType):
                cell.cell_contents = rebind(value)
        return new

    g = rebind(f)
    sent = [(o, dict(o)) for o in overlays.values()]

    def write_back() -> None:
        for overlay, before in sent:
            for name, value in overlay.items():
                if not name.startswith("__") and (name not in before or before[name] is not value):
                    ns[name] = value

    write_back.functions = list(rebound.values())  # type: ignore[attr-defined]
    write_back.overlays = list(overlays.values())  # type: ignore[attr-defined]
    return g, write_back


def _assigned_globals(code: types.CodeType) -> set[str]:
    """The names ``code`` (and the code nested in it) assigns or deletes with ``global``."""
    names = {
        i.argval
        for i in dis.get_instructions(code)
        if i.opname in ("STORE_GLOBAL", "DELETE_GLOBAL")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _assigned_globals(const)
    return names


def _pushed(f: types.FunctionType) -> Any:
    """A function ``push`` puts into the engine namespace, rebound like ``apply``'s (the
    caller's values of push time, then the engine's names). It is called later by engine code,
    not by an operation that could write its ``global`` assignments back afterwards: if it (or
    a helper) assigns globals, it is wrapped so that each call writes them into the engine
    namespace, where later reads (its own too) find them."""
    g, commit = _in_namespace(f)
    overlays = getattr(commit, "overlays", [])
    names = frozenset(
        n for fn in getattr(commit, "functions", []) for n in _assigned_globals(fn.__code__)
    )
    if not names:
        return g

    @functools.wraps(g)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return g(*args, **kwargs)
        finally:
            _write_globals(overlays, names)

    return call


def _write_globals(overlays: list, names: frozenset) -> None:
    """Move the ``global`` assignments of a pushed function from its overlays into the engine
    namespace (a copy pulled back to the client has plain dicts: nothing to do)."""
    for overlay in overlays:
        if isinstance(overlay, _CallerGlobals):
            for name in names:
                if dict.__contains__(overlay, name):
                    overlay.engine_ns[name] = dict.pop(overlay, name)


def _op_apply(data: dict, frames: list) -> list:
    f, args, kwargs = serialize.loads(frames)
    f, commit = _in_namespace(f)
    try:
        result = f(*args, **kwargs)
    finally:
        commit()
    try:
        return serialize.dumps(result)
    except Exception:
        _check_sendable(f"the return value of {getattr(f, '__name__', 'the function')}", result)
        raise


class _ItemError(Exception):
    def __init__(self, index: int, exc: BaseException) -> None:
        self.index = index
        self.exc = exc


#: Load-balanced maps interrupted on this engine (Ctrl-C): their chunks still queued here are
#: skipped, not run (bounded: old ids are forgotten)
_interrupted_maps: collections.deque[str] = collections.deque(maxlen=64)


#: Seconds between a map block's progress reports (when its request asks: ``"progress"``).
PROGRESS_EVERY = 0.25
#: Where the running operation reports its progress (set by the path that runs it).
_report: Callable[[dict, int], None] | None = None


def _op_map(data: dict, frames: list) -> list:
    if data.get("map") is not None and data["map"] in _interrupted_maps:
        raise KeyboardInterrupt("skipped: the load-balanced map was interrupted")
    f, items = serialize.loads(frames)
    f, commit = _in_namespace(f)
    out: list = []
    star = data.get("star", True)
    report = _report if data.get("progress") else None
    # items are argument tuples, or single arguments (``star`` False: one sequence);
    # ``extend`` keeps what was appended before a call raised: its length is the index.
    # With progress asked for, the block runs in slices that double while they are quick, so a
    # report is due at most every PROGRESS_EVERY without a check per item.
    step = len(items) if report is None else 1
    due = time.monotonic() + PROGRESS_EVERY
    try:
        while len(out) < len(items):
            part = items[len(out) : len(out) + step]
            begun = time.monotonic()
            out.extend(itertools.starmap(f, part) if star else map(f, part))
            if report is not None:
                now = time.monotonic()
                if now - begun < PROGRESS_EVERY / 8:
                    step = min(step * 2, 1 << 16)
                if now >= due:
                    report(data, len(out))
                    due = now + PROGRESS_EVERY
    except Exception as exc:
        raise _ItemError(data.get("offset", 0) + len(out), exc) from exc
    finally:
        commit()
    return serialize.dumps(out)


def _op_ping(data: dict, frames: list) -> list:
    return []


OPS = {"push": _op_push, "pull": _op_pull, "apply": _op_apply, "map": _op_map, "ping": _op_ping}


def _error_reply(rid: Any, exc: BaseException, item: int | None) -> tuple[dict, list]:
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # hide the dispatcher's own frame
    try:
        lines = get_ipython().InteractiveTB.structured_traceback(type(exc), exc, tb)
    except Exception:
        import traceback

        lines = traceback.format_exception(type(exc), exc, tb)
    try:  # its links apart where tblib would pickle them (one that does not: a stand-in)
        pickled = [errors.dumps_error(exc)]
    except Exception:
        pickled = []
    reply = {
        "rid": rid,
        "status": "error",
        "ename": type(exc).__name__,
        "evalue": _safe_str(exc),
        "traceback": lines,
        "item": item,
    }
    return reply, pickled


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # a user exception whose __str__ raises
        return f"<{type(exc).__name__}: str() failed>"


def _safe_error_reply(rid: Any, exc: BaseException, item: int | None) -> tuple[dict, list]:
    """``_error_reply`` that cannot raise: describing a user's exception runs user code
    (``__str__``, ``__reduce__``, a traceback's reprs) and a second Ctrl-C may land there; a
    request must still get its one reply, or its caller waits forever."""
    try:
        return _error_reply(rid, exc, item)
    except BaseException as again:
        return {
            "rid": rid,
            "status": "error",
            "ename": type(exc).__name__,
            "evalue": f"(the engine could not describe this error: {type(again).__name__})",
            "traceback": [],
            "item": item,
        }, []


def _set_parent(kernel: Any, idents: list, msg: dict) -> None:
    """Make request ``msg`` the kernel's parent, without its buffers: the kernel keeps its
    parent until the next request, and with them the user's data. ipykernel saves a copy of
    the context (for threads) before the shell sets its own parent variable, which holds the
    whole message: the copy is taken again after it (where this ipykernel keeps one; else by a
    second call), or it would keep the previous request (on the comm path: with its buffers)."""
    light = {**msg, "buffers": []}
    kernel.set_parent(idents, light, channel="shell")
    if isinstance(getattr(kernel, "_shell_context", None), contextvars.Context):
        kernel._shell_context = contextvars.copy_context()
    else:
        kernel.set_parent(idents, light, channel="shell")


def _on_msg(comm: Any, msg: dict) -> None:
    global _report
    data = msg["content"]["data"]
    if msg.get("buffers"):  # ipykernel set the whole message as parent: keep only the rest
        kernel = get_ipython().kernel
        _set_parent(kernel, kernel._parent_ident["shell"], msg)
    buffers = msg.get("buffers") or []
    del msg
    if _comm_digest.get(comm.comm_id):
        try:  # before anything is unpickled
            wire.check_buffers(data, buffers, True, "message")
        except ValueError as exc:
            _refuse(comm, data, str(exc))
            return

    def report(request: dict, done: int) -> None:
        comm.send(
            _signed(comm, {"rid": request.get("rid"), "status": "progress", "done": done}, [])
        )

    _report = report
    try:
        reply, frames = _run_op(data, buffers)
    finally:
        _report = None
        del buffers
    _flush_pending_output()
    _send_reply(comm, reply, frames)


def _refuse(comm: Any, data: dict, why: str) -> None:
    """Answer a comm request whose buffers do not check (``why``), without unpickling them: an
    error naming this engine that its client raises as an ``EngineError`` (``refused``)."""
    _log.warning(
        "ipy_multiengine: refused a %r on the comm (%s); nothing was unpickled", data.get("op"), why
    )
    comm.send(_signed(comm, _refusal(data, _comm_eids.get(comm.comm_id), why), []))


def _refusal(data: dict, eid: Any, why: str) -> dict:
    """The reply to a signed request whose buffers do not check (``why``): nothing of it was
    unpickled, nothing ran. Its client raises it as an ``EngineError`` naming engine ``eid``."""
    return {
        "rid": data.get("rid"),
        "status": "error",
        "refused": True,
        "ename": "EngineError",
        "evalue": f"engine {eid} refused this {data.get('op')!r} request: {why} "
        "(changed on the way?); nothing of it was unpickled",
        "traceback": [],
        "item": None,
    }


def _forward_input(data: dict) -> Callable[[], None] | None:
    """Make ``input()``/``getpass()`` in an operation ask the client that sent it (when it
    reads this engine's stdin: ``data["stdin"]``), as ipykernel arranges for an execute only
    (else they read the kernel's own stdin: ``EOFError``); what undoes it, or None when nothing
    was done (no stdin, not an ipykernel, or an execute running meanwhile, an async cell, has
    them forwarded already). Plain calls, not a context manager: this runs for every op."""
    import builtins

    if not data.get("stdin"):
        return None
    ip = get_ipython()
    kernel = getattr(ip, "kernel", None)
    if kernel is None or not hasattr(kernel, "_forward_input"):
        return None
    if getattr(builtins.input, "__self__", None) is kernel:
        return None
    allowed = getattr(kernel, "_allow_stdin", False)
    kernel._forward_input(allow_stdin=True)

    def restore() -> None:
        kernel._restore_input()
        kernel._allow_stdin = allowed

    return restore


def _run_op(data: dict, buffers: list) -> tuple[dict, list]:
    """Run one operation; its reply and frames (an error reply when it raises: never none)."""
    rid = data.get("rid")
    try:
        op = OPS[data["op"]]
        began = time.perf_counter()
        restore = _forward_input(data)
        try:
            if not _region_enter():  # an interrupt came as it began (``_install_interrupt``)
                raise KeyboardInterrupt(INTERRUPTED_BEFORE)
            try:
                frames = op(data, buffers)
            finally:
                _region_exit()
        finally:
            if restore is not None:
                restore()
        # the op's own seconds: a load-balanced map sizes its chunks by them (balanced.py)
        reply: dict = {"rid": rid, "status": "ok", "seconds": time.perf_counter() - began}
    except _ItemError as err:
        reply, frames = _safe_error_reply(rid, err.exc, err.index)
    except BaseException as exc:
        # a Ctrl-C of a load-balanced map stops it here: its next chunk, already queued on
        # this engine, must not run for another chunk's time after the user pressed Ctrl-C
        if (
            isinstance(exc, KeyboardInterrupt)
            and data.get("op") == "map"
            and data.get("map") is not None
            and data["map"] not in _interrupted_maps
        ):
            _interrupted_maps.append(data["map"])
        reply, frames = _safe_error_reply(rid, exc, None)
    return reply, frames


#: Seconds an op waits for its reply's zero-copy buffers to leave before the engine goes on.
SEND_WAIT = 10.0


def _send_reply(comm: Any, reply: dict, frames: list) -> None:
    """Send a reply whose out-of-band buffers are views of user objects, and return only once
    zmq has released them.

    ipykernel's IOPub thread sends the message later, zero copy: without the wait, the next
    request (``b[:] = 1``) could change ``b`` while its pull reply is still being read, and the
    client would get a torn array (issue 11 item 2). Tracked frames cost no copy; the wait is
    the transfer itself (the client receives at the same time).
    """
    reply = _signed(comm, reply, frames)
    if len(frames) <= 1:
        comm.send(reply, buffers=frames)
        return
    import zmq

    tracked = [frames[0], *(zmq.Frame(b, track=True) for b in frames[1:])]
    tracker = zmq.MessageTracker(*(f.tracker for f in tracked[1:]))
    comm.send(reply, buffers=tracked)
    del tracked, frames  # only zmq may hold the frames now, or the tracker never completes
    try:
        tracker.wait(SEND_WAIT)
    except zmq.NotDone:  # a stalled subscriber: do not hang the engine for it
        import logging

        logging.getLogger("ipy_multiengine").warning(
            "a reply was still being sent after %.0f s; the engine goes on", SEND_WAIT
        )


def _flush_pending_output() -> bool:
    """Flush stdout/stderr so output precedes the reply, only when something was written;
    whether anything was.

    An ipykernel ``OutStream.flush`` from the shell thread waits for a round trip through the
    IOPub thread even when nothing is buffered: two of those were ~0.5 ms of every op.
    """
    wrote = False
    _drain_fds()
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "_flush_pending", True) is False and not getattr(
            stream, "_buffers", True
        ):
            continue  # an idle ipykernel OutStream: nothing to send
        wrote = True
        with contextlib.suppress(Exception):
            stream.flush()
    return wrote


# ---------------------------------------------------------------------------------- fast path
#: Set to "0" in an engine's environment to keep the fast socket closed (the comm carries data).
FAST_ENV = "IPY_MULTIENGINE_FAST"

_log = logging.getLogger("ipy_multiengine")
_server: list = []  # the one _FastServer of this kernel, once opened


def _fast_address() -> dict | None:
    """Open (once) the fast socket and return where it listens, or None when it cannot be
    opened (not an ipykernel app, no key to sign with, disabled, a bind error): the comm then
    carries every operation, as before."""
    if _server:
        return _server[0].address
    if os.environ.get(FAST_ENV, "1") == "0":
        return None
    try:
        server = _FastServer()
    except Exception as exc:
        _log.warning("ipy_multiengine: no fast data socket (%s); the comm carries data", exc)
        return None
    _server.append(server)
    return server.address


# pyzmq's backend methods with int flags: the sugar layer's per-frame checks and its IntFlag
# arithmetic were a sixth of a small fast operation's cost on the engine
_zmq_send: Any = zmq.backend.Socket.send
_zmq_recv: Any = zmq.backend.Socket.recv
_zmq_get: Any = zmq.backend.Socket.get
_EVENTS, _POLLIN, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)


def _send_frames(sock: Any, frames: list) -> None:
    """``sock.send_multipart(frames)`` (copied), through the backend's ``send``. A frame that
    fails after others went out ends the message with an empty frame (which its reader drops
    as malformed) before the error is raised: the next message must not be glued onto it."""
    send = _zmq_send
    sent = 0
    try:
        for f in frames[:-1]:
            send(sock, f, _SNDMORE)
            sent += 1
        send(sock, frames[-1], 0)
    except BaseException:
        if sent:
            send(sock, b"", 0)
        raise


#: How many connections' unanswered messages a fast socket remembers (``_FastServer.unchecked``).
UNCHECKED_PEERS = 64
#: Seconds between two warnings of a fast socket about the messages it refused unread.
UNCHECKED_WARN_EVERY = 60.0


class _FastServer:
    """The ROUTER socket served on the kernel's main loop (see the module docstring)."""

    def __init__(self) -> None:
        import zmq
        from ipykernel.kernelapp import IPKernelApp
        from jupyter_client.session import Session

        if not IPKernelApp.initialized():
            raise RuntimeError("not running in an IPKernelApp")
        app = IPKernelApp.instance()
        kernel = app.kernel
        if not kernel.session.key:
            raise RuntimeError("the kernel has no key to sign messages with")
        self.kernel = kernel
        self.session = Session(
            key=kernel.session.key,
            signature_scheme=kernel.session.signature_scheme,
            username="ipy_multiengine",
        )
        self.sign = wire.signer(self.session)
        self.zmq = zmq
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = False
        if app.curve_secretkey is not None:
            sock.curve_secretkey = app.curve_secretkey
            sock.curve_publickey = app.curve_publickey
            sock.curve_server = True
        if app.transport == "ipc":
            from .wire import fast_socket_path

            path = fast_socket_path(app.ip)
            old = os.umask(0o077)  # the socket file: this user only, also before the chmod
            try:
                sock.bind(f"ipc://{path}")
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self.address: dict[str, Any] = {"transport": "ipc", "path": path}
        else:
            port = sock.bind_to_random_port(f"tcp://{app.ip}")
            self.address = {"transport": "tcp", "port": port}
        # the signature covers no buffer: on TCP without CurveZMQ (where others may see or
        # alter the traffic) requests and replies also sign a digest of their buffers; a unix
        # socket in the 0700 runtime dir, or Curve's authenticated encryption, protects them
        self.digest = app.transport != "ipc" and app.curve_secretkey is None
        # requests name their engine in the signed header (``eid``), and ``digest`` says
        # whether they must sign their buffers: a client without this would send neither
        self.address["signed"] = {"eid": True, "digest": self.digest}
        self.sock = sock
        #: per connection (ROUTER identity): [messages not answered for failing their
        #: signature or engine check since its last reply, why the last one failed]
        self.unchecked: dict[bytes, list] = {}
        self.refused, self.warned = 0, -UNCHECKED_WARN_EVERY  # refused since the last warning
        import atexit

        atexit.register(sock.close, 0)  # a unix socket's file goes with it
        self.displayed = False
        kernel.shell.display_pub.register_hook(self._display_hook)
        self.loop = kernel.io_loop.asyncio_loop
        self.loop.add_reader(sock.getsockopt(zmq.FD), self._readable)
        self.loop.call_soon(self._readable)  # anything that came before the reader was added
        _wake_gui_loops(self)

    def _display_hook(self, msg: dict) -> dict:
        self.displayed = True
        return msg

    def _readable(self) -> None:
        """Drain the socket (its FD is edge-triggered: read until nothing is left)."""
        sock = self.sock
        get, recv = _zmq_get, _zmq_recv
        while get(sock, _EVENTS) & _POLLIN:
            try:
                frames = [recv(sock, _NOBLOCK, False)]
                while get(sock, _RCVMORE):
                    frames.append(recv(sock, 0, False))
            except self.zmq.Again:
                break
            try:
                self._handle(frames)
            except BaseException as exc:  # never let one message stop the reader
                _log.error("ipy_multiengine: a fast operation failed", exc_info=exc)

    def _handle(self, frames: list) -> None:
        idents, rest = self.session.feed_identities(frames, copy=False)
        try:
            msg = wire.deserialize(self.session, rest, self.sign)
            header = msg["header"]
            # signed for another engine of this cluster (they share the key), or with
            # buffers other than the ones it was signed with
            comm_id = header.get("comm_id")
            if comm_id not in _comm_eids or header.get("eid") != _comm_eids[comm_id]:
                raise ValueError(
                    f"signed for engine {header.get('eid')!r} (comm {comm_id!r}), not this "
                    f"engine (engine {_comm_eids.get(comm_id, _engine_id[0])!r})"
                )
        except Exception as exc:  # unsigned, forged or replayed: not unpickled, not answered
            self._unchecked(idents, exc)
            return
        data = msg["content"]
        # the request's id and comm are in its header (wire.fast_request_header)
        data.setdefault("rid", header["msg_id"])
        data.setdefault("comm_id", header.get("comm_id", ""))
        try:  # signed: a request whose buffers do not check is answered by a refusal
            wire.check_buffers(header, msg["buffers"], self.digest)
        except ValueError as exc:
            self._refuse(idents, data, str(exc))
            return
        if not _begin(header["msg_id"]):  # aborted (ime_abort_request) before it began
            self._send(
                [f.bytes if isinstance(f, self.zmq.Frame) else bytes(f) for f in idents],
                {
                    "rid": data.get("rid"),
                    "status": "error",
                    "ename": "Aborted",
                    "evalue": "aborted before it started (mec abort)",
                    "traceback": [],
                    "item": None,
                },
                [],
                data,
            )
            return
        # what the operation prints or displays is labelled with its request, and input()
        # asks the client that sent it (its stdin socket has the same identity), as ipykernel
        # does for a shell message, and like ipykernel the parent is left set afterwards
        idents = [f.bytes if isinstance(f, self.zmq.Frame) else bytes(f) for f in idents]
        try:
            _set_parent(self.kernel, idents, msg)
            self.displayed = False
            writes = _writes()
            began = time.time()
            started = time.monotonic()
            # as ipykernel's handlers (the C module's call: the enum wrapping of signal.signal
            # was a tenth of this handler's cost)
            saved = _signal.signal(signal.SIGINT, _on_sigint)
            run, previous = _enter(header["msg_id"], f"c:{data.get('comm_id', '')}")
            global _report
            if data.get("progress"):

                def report(request: dict, done: int) -> None:
                    self._send(
                        idents,
                        {"rid": request.get("rid"), "status": "progress", "done": done},
                        [],
                        request,
                    )

                _report = report
            try:
                if run:
                    reply, out = _run_op(data, msg["buffers"])
                else:  # owed an interrupt before it began (``_install_interrupt``)
                    reply, out = _interrupted_reply(data.get("rid")), []
                msg = frames = rest = None  # type: ignore[assignment]
            finally:
                _report = None
                _leave(previous)
                _restore_sigint(saved)
            reply["started"] = began  # PendingResult.started (the engine's clock)
            # and how long ago, for a client whose clock differs from this host's
            reply["ran"] = time.monotonic() - started
            if self.unchecked:
                self._tell_unchecked(idents, reply)
            # an output flushed by ipykernel's timer (every flush_interval, also one that an
            # earlier output started) leaves no trace but the streams' count of writes: an
            # operation that wrote, or ran that long (streams that do not count), replies
            # behind IOPub
            interval = getattr(sys.stdout, "flush_interval", 0.2)
            wrote = _flush_pending_output() or _writes() != writes or self.displayed
            slow = time.monotonic() - started >= 0.5 * interval
            comm = _comms.get(data.get("comm_id", ""))
            if (wrote or slow) and comm is not None:
                _send_reply(comm, reply, out)
                return
            self._send(idents, reply, out, data)
        except BaseException as exc:  # never leave a request unanswered: its caller would wait
            _log.error("ipy_multiengine: a fast operation failed unanswered", exc_info=exc)
            with contextlib.suppress(BaseException):
                self._send(
                    idents,
                    {
                        "rid": data.get("rid"),
                        "status": "error",
                        "ename": type(exc).__name__,
                        "evalue": f"the engine failed to answer this operation: {_safe_str(exc)}",
                        "traceback": [],
                        "item": None,
                    },
                    [],
                    data,
                )

    def _unchecked(self, idents: list, exc: Exception) -> None:
        """A message that failed its signature or named another engine: its ``rid`` cannot be
        trusted, so it is not answered (nor unpickled). Counted per connection (its ROUTER
        identity, which no one else's messages arrive with), and told to that connection's
        client with its next reply (``_tell_unchecked``): its request was lost because it was
        changed on the way, not for some unknown reason."""
        why = wire.refusal_reason(exc)
        self.refused += 1
        now = time.monotonic()
        if now - self.warned >= UNCHECKED_WARN_EVERY:
            # once a while and in words of ours: the kernel's stderr reaches the client as the
            # output of its last request, which anyone able to send a message would fill
            _log.warning(
                "ipy_multiengine: refused %d message(s) on the fast socket unread (last: %s)",
                self.refused,
                why,
            )
            self.refused, self.warned = 0, now
        peer = bytes(idents[0]) if idents else b""
        seen = self.unchecked.pop(peer, None) or [0, ""]
        seen[0] += 1
        seen[1] = why
        self.unchecked[peer] = seen  # the most recent peer last
        while len(self.unchecked) > UNCHECKED_PEERS:  # bounded: a peer may reconnect forever
            del self.unchecked[next(iter(self.unchecked))]

    def _tell_unchecked(self, idents: list, reply: dict) -> None:
        """Tell the client of this connection how many of its messages were not answered since
        its last reply for failing their checks, and why the last one failed."""
        seen = self.unchecked.pop(bytes(idents[0]) if idents else b"", None)
        if seen is not None:
            reply["unchecked"] = {"count": seen[0], "why": seen[1]}

    def _refuse(self, idents: list, data: dict, why: str) -> None:
        """Answer a signed request whose buffers fail the digest in its header (``why``) by a
        refusal (``_refusal``: its rid is signed, so the answer finds its caller); nothing of
        it is unpickled."""
        _log.warning(
            "ipy_multiengine: refused a %r on the fast socket (%s); nothing was unpickled",
            data.get("op"),
            why,
        )
        idents = [f.bytes if isinstance(f, self.zmq.Frame) else bytes(f) for f in idents]
        self._send(idents, _refusal(data, _comm_eids.get(data["comm_id"]), why), [], data)

    def _send(self, idents: list, reply: dict, out: list, request: dict) -> None:
        zmq = self.zmq
        header = wire.FAST_REPLY_HEADER
        if self.digest:
            header = {**header, "bd": wire.buffers_digest(out)}
        head = idents + wire.fast_frames(
            self.sign, header, {"msg_id": request.get("rid")}, wire.pack(reply)
        )
        if len(out) <= 1 or all(memoryview(b).nbytes < 65536 for b in out[1:]):
            _send_frames(self.sock, head + out)
            return
        # zero copy, and the next operation waits until zmq released the user's buffers
        tracker = self.sock.send_multipart(head + out, copy=False, track=True)
        assert tracker is not None  # track=True
        del out
        try:
            tracker.wait(SEND_WAIT)
        except zmq.NotDone:
            _log.warning("a reply was still being sent after %.0f s; the engine goes on", SEND_WAIT)


class _WakingStream:
    """The shell stream as ipykernel's GUI event loops (``%gui qt``, ``%matplotlib tk``...) see
    it: its FD is also readable when the fast socket is.

    Those loops block the kernel's main loop and leave it only when the shell socket has a
    message, so without this a fast operation waited for the next shell message; and every
    execute, held behind it for the engine's order, waited with it: the engine was wedged.
    The FD is an epoll of both sockets' FDs; ``flush`` also reports a fast message (the GUI
    loop then returns to the main loop) and schedules the fast reader, whose edge-triggered
    FD this check has consumed.
    """

    def __init__(self, stream: Any, server: _FastServer) -> None:
        import select

        import zmq

        self._stream = stream
        self._server = server
        self._poll = select.epoll()
        self._poll.register(stream.getsockopt(zmq.FD), select.EPOLLIN)
        self._poll.register(int(server.sock.getsockopt(zmq.FD)), select.EPOLLIN)

    def getsockopt(self, option: int) -> Any:
        if option == self._server.zmq.FD:
            return self._poll.fileno()
        return self._stream.getsockopt(option)

    def flush(self, *args: Any, **kwargs: Any) -> Any:
        handled = self._stream.flush(*args, **kwargs)
        server = self._server
        if server.sock.getsockopt(server.zmq.EVENTS) & server.zmq.POLLIN:
            server.loop.call_soon(server._readable)
            return handled or 1
        return handled

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _wake_gui_loops(server: _FastServer) -> None:
    """Make ipykernel's GUI event loops wake for the fast socket too (see ``_WakingStream``);
    where that cannot be done (no epoll: not Linux; another ipykernel), they are left as they
    are."""
    import select

    try:
        from ipykernel import eventloops
    except ImportError:
        return
    original = getattr(eventloops, "get_shell_stream", None)
    if original is None or not hasattr(select, "epoll"):
        return
    wrapped: dict[int, _WakingStream] = {}

    def get_shell_stream(kernel: Any) -> Any:
        stream = original(kernel)
        waking = wrapped.get(id(stream))
        if waking is None or waking._stream is not stream:
            waking = wrapped[id(stream)] = _WakingStream(stream, server)
        return waking

    eventloops.get_shell_stream = get_shell_stream
