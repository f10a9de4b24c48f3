"""``await pr``: waiting for a ``PendingResult`` from any asyncio loop without blocking it.

The caller's loop (``asyncio.run`` in a script, ipykernel's own loop in a notebook cell with
top-level await) never waits on a lock: each of the request's ``concurrent.futures`` futures
wakes an asyncio future of that loop through ``call_soon_threadsafe``. The controller's futures
are never chained to the caller's (``asyncio.wrap_future`` would cancel them when the awaiting
task is cancelled): cancelling the awaiting task leaves the request running on the engines and
the ``PendingResult`` collectable later (``pr.get_result()``); ``mec.interrupt()`` stops it.

Each controller future gets one done-callback (a ``_Relay``) however often it is awaited; an
await registers its waiter there and takes it out when it ends, so awaits that time out (a
polling ``asyncio.wait_for(pr, 0.1)``) leave nothing behind: no growing list of callbacks,
no reference to their loop (``concurrent.futures`` offers no way to remove a callback).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .results import PendingResult

_lock = threading.Lock()


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():  # the awaiting task may have been cancelled meanwhile
        waiter.set_result(None)


class _Relay:
    """The one done-callback of a controller future: wakes the waiters awaiting it now."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: dict[asyncio.Future, asyncio.AbstractEventLoop] = {}

    def __call__(self, _fut: cf.Future) -> None:  # runs on the I/O thread: must not raise
        with _lock:
            waiters, self.waiters = self.waiters, {}
        for waiter, loop in waiters.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                loop.call_soon_threadsafe(_wake, waiter)


def _relays(pr: PendingResult) -> list[_Relay]:
    """``pr``'s relays, one per future, registered once."""
    with _lock:
        relays = pr.__dict__.get("_aio_relays")
        if relays is None:
            relays = pr.__dict__["_aio_relays"] = [_Relay() for _ in pr.futures]
            fresh = True
        else:
            fresh = False
    if fresh:
        for fut, relay in zip(pr.futures, relays, strict=True):
            fut.add_done_callback(relay)  # runs at once if already done
    return relays


async def wait_async(pr: PendingResult) -> Any:
    """Wait for ``pr`` on the running loop, then its result (``CompositeError`` if an engine
    failed), exactly what ``pr.get_result()`` returns."""
    loop = asyncio.get_running_loop()
    relays = _relays(pr)
    mine: list[tuple[_Relay, asyncio.Future]] = []
    with _lock:
        for fut, relay in zip(pr.futures, relays, strict=True):
            if not fut.done():
                waiter = loop.create_future()
                relay.waiters[waiter] = loop
                mine.append((relay, waiter))
    try:
        if mine:
            await asyncio.gather(*(w for _, w in mine))
    finally:
        with _lock:
            for relay, waiter in mine:
                relay.waiters.pop(waiter, None)
    return pr.get_result(block=False)
