"""The one background thread that runs the asyncio loop owning every engine's sockets.

The user's thread never runs this loop, so blocking calls behave the same in a terminal,
a script and a notebook kernel (which has a loop of its own running).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

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
        return fut.result(timeout)
    except BaseException:
        fut.cancel()
        raise


def call_soon(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the loop thread as soon as possible (thread-safe)."""
    get_loop().call_soon_threadsafe(fn, *args)
