"""Forwarding ``input()``/``getpass()`` (and debugger prompts) from engines to the user.

Engines run their code with ``allow_stdin=True``; an engine that calls ``input(prompt)`` sends an
``input_request`` on its stdin channel. The controller's loop thread cannot ask the user itself
(it must keep routing messages, and in a notebook only the kernel's main thread may ask the
frontend), so it *posts* an ``InputRequest`` to a process-wide mailbox. Whichever user thread
is waiting for results (``PendingResult.wait`` uses ``wait`` below) takes items from the
mailbox one at a time, asks the user with the engine id in front of the prompt
(``[3] name? ``) through the ordinary ``input``/``getpass`` of that process (so it works the
same in a terminal, in a notebook through the kernel's own stdin channel, and under pexpect),
and sends the answer back as an ``input_reply``.

Consequences worth knowing:

- One prompt at a time, even when several engines ask at once; they are answered in order.
- An engine waiting for input waits until someone waits for a result (``get_result``,
  ``barrier``, a blocking call); ``mec.interrupt()`` releases it.
- End of input locally (Ctrl-D, a closed stdin) makes ``input()`` raise ``EOFError`` on the
  engine; Ctrl-C at the prompt interrupts that engine and is re-raised here, and the other
  queued prompts of the same call are dropped (their engines are interrupted too).

The mailbox also carries plain callables (``post(fn)``) so that other parts, e.g. live output
of ``%pxdebug``, can run in the user's thread in order with the prompts. Whoever draws on the
terminal (the client's progress bars) passes in a ``prompt_guard`` (``set_prompt_guard``): the
context each prompt is asked in, e.g. one that clears a bar first.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import getpass
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "InputRequest",
    "drop",
    "post",
    "serve_pending",
    "set_prompt_guard",
    "unwatch",
    "wait",
    "watch",
]

_lock = threading.Lock()
_items: deque = deque()
_wake: cf.Future = cf.Future()
_serving = threading.Lock()
_dropped: weakref.WeakSet[cf.Future] = weakref.WeakSet()  # requests of calls the user interrupted
#: out -> the context a prompt on ``out`` is asked in (``set_prompt_guard``)
_prompt_guard: Callable[[Any], contextlib.AbstractContextManager] = contextlib.nullcontext
#: what shows engines' output while a call runs (``render.LiveOutput``, ``watch``)
_watchers: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(shower: Any) -> None:
    """Tell ``shower`` before each prompt of a request whose output it shows (the request's
    listener is ``shower.listener``): ``shower.before_prompt(eid)``, in the asking thread. It
    shows what it holds back of that engine's output (a line without its newline, a coalesced
    update, collected text), so that the question an engine printed before its ``input()`` is
    on the screen when the user is asked. The text it returns is shown before the prompt as
    the engine's (``[N] ...``). Another call's prompt, on the same engine id, is none of its
    business. Held weakly; ``unwatch`` ends it."""
    with _lock:
        _watchers.add(shower)


def unwatch(shower: Any) -> None:
    with _lock:
        _watchers.discard(shower)


def set_prompt_guard(guard: Callable[[Any], contextlib.AbstractContextManager]) -> None:
    """Ask every prompt on stream ``out`` inside ``guard(out)`` (e.g. a progress bar cleared)."""
    global _prompt_guard
    _prompt_guard = guard


@dataclass
class InputRequest:
    """An engine waiting for a line of input."""

    eid: int
    prompt: str
    password: bool
    reply: Callable[[str], None]
    interrupt: Callable[[], None]
    future: cf.Future | None = None  # the future of the request that asked, when known
    before: str = ""  # its output not shown yet (the controller takes it on its loop thread)
    listener: Any = None  # what shows the asking request's output live, if anything (``watch``)
    posted: float = field(default_factory=time.monotonic)

    @property
    def stale(self) -> bool:
        """True when the request that asked has finished meanwhile (engine died, interrupted),"""
        fut = self.future
        return fut is not None and fut.done()

    def pending_output(self) -> str:
        """Output of the asking request not shown yet (shown before the prompt, for context)."""
        return self.before


def drop(futures: Iterable[cf.Future]) -> None:
    """The user interrupted the call behind ``futures`` (Ctrl-C): its prompts are not asked any
    more, neither the queued ones nor those still to come (an engine may ask after the call's
    interrupt reached it). Each dropped prompt interrupts its engine instead, which ends that
    ``input()`` there; the call's futures are remembered weakly, until they are dropped."""
    futs = set(futures)
    for f in futs:
        _dropped.add(f)
    with _lock:
        gone = [it for it in _items if isinstance(it, InputRequest) and _call_of(it) in futs]
        keep = [it for it in _items if not any(it is g for g in gone)]
        _items.clear()
        _items.extend(keep)
    for item in gone:
        _release(item)


def _call_of(item: InputRequest) -> Any:
    return item.future


def _release(item: InputRequest) -> None:
    """A dropped prompt: interrupt the engine waiting in ``input()`` (unless it is done)."""
    fut = _call_of(item)
    if fut is not None and not fut.done():
        # e.g. the engine died meanwhile: nothing left to release
        with contextlib.suppress(Exception):
            item.interrupt()


def post(item: Any) -> None:
    """Queue an ``InputRequest`` or a callable for the next waiting user thread (any thread)."""
    global _wake
    with _lock:
        _items.append(item)
        wake, _wake = _wake, cf.Future()
    wake.set_result(None)


def _next() -> Any:
    with _lock:
        return _items.popleft() if _items else None


def _wake_future() -> cf.Future:
    with _lock:
        if _items and not _serving.locked():
            return _done_future()  # posted after our last look: serve it now
        return _wake


def _done_future() -> cf.Future:
    f: cf.Future = cf.Future()
    f.set_result(None)
    return f


def serve_pending() -> None:
    """Answer every queued item now, in this thread (a no-op if another thread is serving)."""
    if not _serving.acquire(blocking=False):
        return
    try:
        while True:
            item = _next()
            if item is None:
                return
            _serve(item)
    finally:
        _serving.release()


def _serve(item: Any) -> None:
    if not isinstance(item, InputRequest):
        item()
        return
    if item.stale:
        return
    if _call_of(item) in _dropped:  # a prompt of a call the user interrupted: not asked
        _release(item)
        return
    try:
        with _prompt_guard(sys.stdout):  # e.g. a progress bar cleared while the user is asked
            value = _ask(item)
    except EOFError:
        value = "\x04"  # ipykernel raises EOFError in the engine for this value
    except KeyboardInterrupt:
        item.interrupt()
        raise
    except Exception as exc:  # e.g. StdinNotImplementedError in a frontend without stdin
        print(
            f"[{item.eid}] cannot ask for input here ({type(exc).__name__}: {exc}); "
            "the engine gets end-of-file",
            file=sys.stderr,
        )
        value = "\x04"
    item.reply(value)


#: Prompts shown so far (a notebook keeps each one as an output of the cell it was asked in).
asked = 0


def _ask(item: InputRequest) -> str:
    """Show the asking call's output not shown yet, then ask the user with the engine id."""
    global asked
    asked += 1
    with _lock:
        showers = [
            s
            for s in _watchers
            if item.listener is not None and getattr(s, "listener", None) == item.listener
        ]
    before = item.pending_output() + "".join(s.before_prompt(item.eid) for s in showers)
    if before:
        prefix = f"[{item.eid}] "
        sys.stdout.write("".join(prefix + line for line in before.splitlines(True)))
        if not before.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
    prompt = f"[{item.eid}] {item.prompt}"
    return getpass.getpass(prompt) if item.password else input(prompt)


def wait(
    futures: Iterable[cf.Future],
    timeout: float | None = None,
    first: bool = False,
    progress: Callable[[int, int], None] | None = None,
    deadline: float | None = None,
    tick: Callable[[], None] | None = None,
) -> bool:
    """Wait until every future (with ``first``: any) is done or ``timeout`` passes, answering
    engines' input requests (and running posted callables) meanwhile; True when done (see
    ``_loop.wait``). ``tick`` runs after that in each slice (a renderer's throttled flush)."""
    from ._loop import wait as loop_wait

    def serve() -> None:
        serve_pending()
        if tick is not None:
            tick()

    futures = list(futures)
    try:
        return loop_wait(
            futures,
            timeout,
            first=first,
            tick=serve,
            wake=_wake_future,
            progress=progress,
            deadline=deadline,
        )
    except KeyboardInterrupt:
        drop(futures)  # one Ctrl-C: the other engines' prompts of this call are not asked
        raise
