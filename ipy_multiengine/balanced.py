"""Load-balanced map: send the next chunk of items to whichever engine finishes first.

Each engine keeps at most ``depth`` chunks in flight, so it always has its next chunk queued
while it works. Dispatch happens in the done-callbacks of the controller's futures, that is
on the I/O thread: the user's thread only waits. A chunk whose engine died is sent to another
engine (``retries`` times); an exception in the mapped function stops the map and names the
item.

Every chunk is serialised in the caller's thread before anything is sent, so an item that
cannot be pickled is a ``TypeError`` naming it, raised by the call itself; and any exception in
a done-callback fails the map with that error instead of being swallowed by
``concurrent.futures`` (issue 11.5).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from . import serialize, stdin
from .errors import CompositeError, EngineError, RemoteError, TimeoutError

log = logging.getLogger("ipy_multiengine")


def dumps_chunk(f: Callable, offset: int, chunk: list[tuple], snapshot: bool = True) -> list[Any]:
    """Serialise ``(f, chunk)``, or raise a ``TypeError`` naming the item that cannot be sent.

    ``snapshot``: copy large items now, for chunks sent later from the I/O thread, when the
    caller may have changed them (issue 11 item 2); a chunk sent at once is tracked instead."""
    try:
        frames = serialize.dumps((f, chunk))
        return serialize.snapshot(frames) if snapshot else frames
    except Exception as exc:
        serialize.check_picklable(getattr(f, "__name__", "function"), f)
        for k, item in enumerate(chunk):
            value = item[0] if len(item) == 1 else item
            try:
                serialize.dumps(value)
            except Exception as err:
                raise TypeError(
                    f"cannot send item {offset + k} of the map: object of type "
                    f"{type(value).__name__} cannot be pickled ({err})"
                ) from err
        raise TypeError(
            f"cannot send items {offset}..{offset + len(chunk) - 1} of the map: {exc}"
        ) from exc


class BalancedMap:
    """One load-balanced map in flight; ``future`` resolves to the list of results."""

    def __init__(
        self,
        controller: Any,
        eids: list[int],
        f: Callable,
        items: list[tuple],
        chunksize: int = 1,
        ordered: bool = True,
        retries: int = 1,
        depth: int = 2,
        listener: Callable[[int, str, dict], None] | None = None,
        interrupt: Callable[[list[int]], None] | None = None,
    ) -> None:
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, not {chunksize!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        serialize.check_picklable(getattr(f, "__name__", "function"), f)
        self.controller = controller
        self.eids = list(eids)
        self.f = f
        self.ordered = ordered
        self.retries = retries
        self.depth = depth
        self.listener = listener  # sees each chunk's prints and displays (the caller shows them)
        #: how a Ctrl-C interrupts the engines: the cluster owner's interrupt (the client's
        #: Owner interface, which honours the kernelspec's interrupt mode), as ``mec.interrupt``
        self.interrupt = interrupt if interrupt is not None else controller.interrupt
        self.chunks = [(i, items[i : i + chunksize]) for i in range(0, len(items), chunksize)]
        # all of it now, in the caller's thread: nothing is sent if any item cannot be
        self._frames: list[list[Any] | None] = [
            dumps_chunk(f, off, chunk) for off, chunk in self.chunks
        ]
        self.future: cf.Future = cf.Future()
        self.id = uuid.uuid4().hex  # on the engines, a Ctrl-C skips this map's queued chunks
        self._events: collections.deque = collections.deque()
        self._wake: cf.Future = cf.Future()
        self._todo = collections.deque(range(len(self.chunks)))
        self._results: list[Any] = [None] * len(self.chunks)
        self._order: list[int] = []
        self._tries = collections.Counter()
        self._inflight = {eid: 0 for eid in self.eids}
        self._alive = set(self.eids)
        self._lock = threading.RLock()  # a future may complete inside _fill
        self._stopped = False

    def _event(self, event: Any) -> None:
        """Queue an event for ``iterate`` and wake its wait (any thread)."""
        with self._lock:
            self._events.append(event)
            wake, self._wake = self._wake, cf.Future()
        wake.set_result(None)

    def start(self) -> BalancedMap:
        if not self.chunks:
            self.future.set_result([])
        with self._lock:
            try:
                for eid in self.eids:
                    self._fill(eid)
            except Exception as exc:
                self._fail(exc)
        return self

    def cancel(self) -> None:
        """Send nothing more (chunks in flight finish on their engines); the map fails."""
        with self._lock:
            if not self._stopped:
                self._fail(
                    EngineError(
                        "the load-balanced map was interrupted before it finished",
                        self.eids[0] if self.eids else None,
                        "map",
                    )
                )

    # -- called with the lock held
    def _fill(self, eid: int) -> None:
        while (
            not self._stopped
            and eid in self._alive
            and self._inflight[eid] < self.depth
            and self._todo
        ):
            ci = self._todo.popleft()
            offset, _chunk = self.chunks[ci]
            fut = self.controller.submit_comm(
                [eid],
                "map",
                {"offset": offset, "map": self.id},
                [self._frames[ci]],
                listener=self.listener,
            )[0]
            self._inflight[eid] += 1
            fut.add_done_callback(lambda fu, eid=eid, ci=ci: self._done(eid, ci, fu))

    def _fail(self, err: BaseException) -> None:
        self._stopped = True
        self._todo.clear()
        self._frames = []
        if not self.future.done():
            self.future.set_exception(err)
        self._event(err)

    # -- done-callbacks (I/O thread, or the caller's thread if already done)
    def _done(self, eid: int, ci: int, fu: cf.Future) -> None:
        """A chunk's future is done. Any exception here fails the map with it: raised in a
        done-callback it would be logged and dropped by ``concurrent.futures``, and the map
        would wait forever."""
        try:
            self._on_done(eid, ci, fu)
        except BaseException as exc:
            log.error(
                "load-balanced map: handling chunk %s from engine %s failed", ci, eid, exc_info=exc
            )
            with self._lock:
                if not self._stopped:
                    self._fail(exc)

    def _on_done(self, eid: int, ci: int, fu: cf.Future) -> None:
        with self._lock:
            self._inflight[eid] -= 1
            if self._stopped:
                return
            exc = fu.exception()
            if exc is None:
                try:
                    values = serialize.loads(fu.result().frames)
                except Exception as err:  # a result that cannot be rebuilt here
                    self._fail(RemoteError(type(err).__name__, str(err), [], eid, "map"))
                    return
                self._results[ci] = values
                self._frames[ci] = None  # sent and answered: free the serialised chunk
                self._order.append(ci)
                self._event((ci, values))
                if len(self._order) == len(self.chunks):
                    order = range(len(self.chunks)) if self.ordered else self._order
                    self.future.set_result([v for c in order for v in self._results[c]])
                    return
                self._fill(eid)
            elif isinstance(exc, EngineError):
                self._alive.discard(eid)
                if self._tries[ci] < self.retries and self._alive:
                    self._tries[ci] += 1
                    self._todo.appendleft(ci)
                    for other in sorted(self._alive):
                        self._fill(other)
                else:
                    self._fail(exc)
            else:
                self._fail(exc)

    def _next_event(self, deadline: float | None) -> Any:
        """The next event, waiting (the package's one wait: Ctrl-C, engines' input) until the
        deadline; raises ``TimeoutError`` past it."""
        while True:
            with self._lock:
                if self._events:
                    return self._events.popleft()
                wake = self._wake
            if not stdin.wait([wake], deadline=deadline):
                done = len(self._order)
                raise TimeoutError(
                    f"imap not finished by its timeout: {done} of {len(self.chunks)} "
                    "chunks done; sending the others was stopped"
                )

    # -- iteration (caller's thread)
    def iterate(self, timeout: float | None = None, deadline: float | None = None) -> Iterator[Any]:
        """Yield results as chunks complete (input order when ``ordered``); Ctrl-C stops the map,
        and so does ``timeout`` (seconds for the whole iteration, from this call: the generator's
        body runs only at the first ``next()``) or ``deadline`` (a ``time.monotonic()`` value)
        with a ``TimeoutError``."""
        if timeout is not None:
            end = time.monotonic() + timeout
            deadline = end if deadline is None else min(deadline, end)
        return self._iterate(deadline)

    def _iterate(self, deadline: float | None) -> Iterator[Any]:
        buffered: dict[int, list] = {}
        following = 0
        received = 0
        try:
            while received < len(self.chunks):
                event = self._next_event(deadline)
                if isinstance(event, BaseException):
                    raise _composite(event)
                ci, values = event
                received += 1
                if not self.ordered:
                    yield from values
                    continue
                buffered[ci] = values
                while following in buffered:
                    yield from buffered.pop(following)
                    following += 1
        except TimeoutError:
            self.cancel()
            raise
        except KeyboardInterrupt:
            self.cancel()
            self.interrupt([e for e in self.eids if self._inflight.get(e)])
            raise


def _composite(err: BaseException) -> BaseException:
    if isinstance(err, (RemoteError, EngineError)):
        return CompositeError("map", [err])
    return err
