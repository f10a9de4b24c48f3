"""Load-balanced map: send the next chunk of items to whichever engine finishes first.

Each engine keeps at most ``depth`` chunks in flight, so it always has its next chunk queued
while it works. Dispatch happens in the done-callbacks of the controller's futures, that is
on the I/O thread: the user's thread only waits. A chunk whose engine died is sent to another
engine (``retries`` times); an exception in the mapped function stops the map and names the
item.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import queue
import threading
from typing import Any, Callable, Iterator

from . import serialize
from .errors import CompositeError, EngineError, RemoteError


class BalancedMap:
    """One load-balanced map in flight; ``future`` resolves to the list of results."""

    def __init__(self, controller: Any, eids: list[int], f: Callable, items: list[tuple],
                 chunksize: int = 1, ordered: bool = True, retries: int = 1, depth: int = 2) -> None:
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
        self.chunks = [(i, items[i:i + chunksize]) for i in range(0, len(items), chunksize)]
        self.future: cf.Future = cf.Future()
        self.events: queue.Queue = queue.Queue()
        self._todo = collections.deque(range(len(self.chunks)))
        self._results: list[Any] = [None] * len(self.chunks)
        self._order: list[int] = []
        self._tries = collections.Counter()
        self._inflight = {eid: 0 for eid in self.eids}
        self._alive = set(self.eids)
        self._lock = threading.RLock()  # a future may complete inside _fill
        self._stopped = False

    def start(self) -> "BalancedMap":
        if not self.chunks:
            self.future.set_result([])
        with self._lock:
            for eid in self.eids:
                self._fill(eid)
        return self

    def cancel(self) -> None:
        """Send nothing more (chunks in flight finish on their engines); the map fails."""
        with self._lock:
            if not self._stopped:
                self._fail(EngineError("the load-balanced map was interrupted before it finished",
                                       self.eids[0] if self.eids else None, "map"))

    # -- called with the lock held
    def _fill(self, eid: int) -> None:
        while not self._stopped and eid in self._alive and self._inflight[eid] < self.depth and self._todo:
            ci = self._todo.popleft()
            offset, chunk = self.chunks[ci]
            frames = serialize.dumps((self.f, chunk))
            fut = self.controller.submit_comm([eid], "map", {"offset": offset}, [frames])[0]
            self._inflight[eid] += 1
            fut.add_done_callback(lambda fu, eid=eid, ci=ci: self._done(eid, ci, fu))

    def _fail(self, err: BaseException) -> None:
        self._stopped = True
        self._todo.clear()
        if not self.future.done():
            self.future.set_exception(err)
        self.events.put(err)

    # -- done-callbacks (I/O thread, or the caller's thread if already done)
    def _done(self, eid: int, ci: int, fu: cf.Future) -> None:
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
                self._order.append(ci)
                self.events.put((ci, values))
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

    # -- iteration (caller's thread)
    def iterate(self, wait_slice: float = 0.1) -> Iterator[Any]:
        """Yield results as chunks complete (input order when ``ordered``); Ctrl-C stops the map."""
        buffered: dict[int, list] = {}
        following = 0
        received = 0
        try:
            while received < len(self.chunks):
                try:
                    event = self.events.get(timeout=wait_slice)
                except queue.Empty:
                    continue
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
        except KeyboardInterrupt:
            self.cancel()
            self.controller.interrupt([e for e in self.eids if self._inflight.get(e)])
            raise


def _composite(err: BaseException) -> BaseException:
    if isinstance(err, (RemoteError, EngineError)):
        return CompositeError("map", [err])
    return err
