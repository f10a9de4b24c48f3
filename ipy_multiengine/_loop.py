"""The one background thread that runs the asyncio loop owning every engine's sockets.

The user's thread never runs this loop, so blocking calls behave the same in a terminal,
a script and a notebook kernel (which has a loop of its own running).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import math
import numbers
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

#: Longest single wait of the user's thread. A Ctrl-C that arrives while a blocked lock
#: acquire is not woken by a real signal (``_thread.interrupt_main``, a signal delivered to
#: another thread) is still noticed within this many seconds.
WAIT_SLICE = 0.1
#: A wait for all futures that may last longer than this many seconds waits on one combined
#: future (one wake-up, not one per future).
COMBINE_AFTER = 1.0

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """The running background loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or not _thread or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="ipy_multiengine-io", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def in_loop_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def submit(coro: Awaitable[T]) -> Future:
    """Schedule ``coro`` on the background loop; returns a concurrent Future."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())  # type: ignore[arg-type]


def run(coro: Awaitable[T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and wait for it from the calling thread.

    On timeout or Ctrl-C the coroutine is cancelled before the exception propagates.
    """
    if in_loop_thread():
        raise RuntimeError("ipy_multiengine: blocking call made from the I/O thread")
    fut = submit(coro)
    try:
        if not wait([fut], timeout):
            raise cf.TimeoutError()
        return fut.result()
    except BaseException:
        fut.cancel()
        raise


def check_timeout(value: Any, name: str = "timeout") -> float | None:
    """``value`` as seconds (a float; None stays None), checked to be a number >= 0 before
    anything is sent or waited for (a negative one "timed out after -1 s", a str failed inside
    the wait, a Fraction in the message of its TimeoutError). One too large for a float
    (``10**400``) is infinite: never."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number of seconds >= 0 or None, not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf if value > 0 else -math.inf  # type: ignore[operator]
    if not seconds >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 or None, not {value!r}")
    return seconds


def _check(timeout: float | None, deadline: float | None) -> None:
    """A NaN timeout (or deadline) compares false with everything: the wait would never end."""
    for value in (timeout, deadline):
        if value is not None and value != value:
            raise ValueError("timeout must be a number of seconds or None, not nan")


def wait(
    futures: Iterable[Future],
    timeout: float | None = None,
    first: bool = False,
    tick: Callable[[], None] | None = None,
    wake: Callable[[], Future] | None = None,
    progress: Callable[[int, int], None] | None = None,
    deadline: float | None = None,
) -> bool:
    """Wait until every future (with ``first``: any) is done or ``timeout`` passes; True when done.

    The one blocking wait of the package: the client, ``PendingResult``, ``barrier``,
    ``wait_ready`` and the balanced map all come here, so that a timeout is one deadline
    (``deadline``, a ``time.monotonic()`` value, may be given instead of ``timeout``).
    Waits in slices of ``WAIT_SLICE`` seconds so that a pending KeyboardInterrupt is raised
    promptly in the calling (main) thread, whatever woke it or not. ``tick`` runs before each
    slice and a future from ``wake`` ends a slice early (stdin forwarding uses both);
    ``progress(done, total)`` is called after each slice (progress bars).
    """
    futures = list(futures)
    _check(timeout, deadline)
    if timeout is not None:
        end = time.monotonic() + max(timeout, 0)
        deadline = end if deadline is None else min(deadline, end)
    # waiting for all without a progress bar: one wake-up when the last future is done, not
    # one per future (each a GIL hand-off between the loop thread and this one)
    every: Future | None = None
    while True:
        if tick is not None:
            tick()
        todo = [f for f in futures if not f.done()]
        if progress is not None:
            progress(len(futures) - len(todo), len(futures))
        if not todo or (first and len(todo) < len(futures)):
            return True
        step, left = WAIT_SLICE, float("inf")
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            step = min(step, left)
        extra = [wake()] if wake is not None else []
        # (not for a short wait: each combining leaves a callback on every future, and a loop
        # polling a running call with short timeouts would pile them up)
        if (
            not first
            and progress is None
            and len(todo) > 1  # one future: nothing to combine (a call on one engine)
            and (every is not None or left > COMBINE_AFTER)
        ):
            if every is None:
                every = _all_done(todo)
            todo = [every]
        cf.wait(todo + extra, timeout=step, return_when=cf.FIRST_COMPLETED)


def _all_done(futures: list[Future]) -> Future:
    """A future that is done once every one of ``futures`` is (its result: None)."""
    every: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_f: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            every.set_result(None)

    for f in futures:
        f.add_done_callback(one_done)
    return every


def wait_until(
    ready: Callable[[], bool],
    timeout: float | None = None,
    deadline: float | None = None,
    tick: Callable[[], None] | None = None,
) -> bool:
    """Poll ``ready()`` every ``WAIT_SLICE`` (or less) until it is true or the deadline passes;
    True when ready. For conditions that are not futures (an engine becoming ready)."""
    _check(timeout, deadline)
    if timeout is not None:
        end = time.monotonic() + max(timeout, 0)
        deadline = end if deadline is None else min(deadline, end)
    step = 0.02
    while True:
        if tick is not None:
            tick()
        if ready():
            return True
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
        else:
            left = step
        time.sleep(min(step, left))  # a poll interval, not synchronisation
        step = min(step * 2, WAIT_SLICE)


def call_soon(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the loop thread as soon as possible (thread-safe)."""
    get_loop().call_soon_threadsafe(fn, *args)


#: tasks started by :func:`background`: the loop keeps only weak references to its tasks, so a
#: task nobody holds may be collected before it finishes
_background: set[asyncio.Task[Any]] = set()


def background(coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
    """Run ``coro`` as a task of the running loop (call on the loop thread) that is kept alive
    until it ends; an exception it lets out is logged with ``what``, never lost."""
    task = asyncio.ensure_future(coro)
    _background.add(task)

    def ended(t: asyncio.Task[Any]) -> None:
        _background.discard(t)
        if not t.cancelled() and t.exception() is not None:
            logging.getLogger("ipy_multiengine").error("%s failed", what, exc_info=t.exception())

    task.add_done_callback(ended)
    return task
