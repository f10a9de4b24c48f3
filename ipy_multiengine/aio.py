"""``await pr``: waiting for a ``PendingResult`` from any asyncio loop without blocking it.

The caller's loop (``asyncio.run`` in a script, ipykernel's own loop in a notebook cell with
top-level await) never waits on a lock: each of the request's ``concurrent.futures`` futures
wakes an asyncio future of that loop through ``call_soon_threadsafe``. The controller's futures
are never chained to the caller's (``asyncio.wrap_future`` would cancel them when the awaiting
task is cancelled): cancelling the awaiting task leaves the request running on the engines and
the ``PendingResult`` collectable later (``pr.get_result()``); ``mec.interrupt()`` stops it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .results import PendingResult


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():  # the awaiting task may have been cancelled meanwhile
        waiter.set_result(None)


def _loop_future(fut: cf.Future, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """An asyncio future of ``loop`` done when ``fut`` is; nothing flows back to ``fut``."""
    waiter = loop.create_future()

    def done(_fut: cf.Future) -> None:  # runs on the I/O thread: must not raise
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
            loop.call_soon_threadsafe(_wake, waiter)

    fut.add_done_callback(done)
    return waiter


async def wait_async(pr: PendingResult) -> Any:
    """Wait for ``pr`` on the running loop, then its result (``CompositeError`` if an engine
    failed), exactly what ``pr.get_result()`` returns."""
    loop = asyncio.get_running_loop()
    waiters = [_loop_future(f, loop) for f in pr.futures if not f.done()]
    if waiters:
        await asyncio.gather(*waiters)
    return pr.get_result(block=False)
