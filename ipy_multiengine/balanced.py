"""Load-balanced map: send the next chunk of items to whichever engine finishes first.

Each engine keeps at most ``depth`` chunks in flight, so it always has its next chunk queued
while it works. Dispatch happens in the done-callbacks of the controller's futures, that is
on the I/O thread: the user's thread only waits. A chunk whose engine died is sent to another
engine (``retries`` times); an exception in the mapped function stops the map and names the
item.

Chunk sizes are automatic by default (``chunksize=None``, ``AutoChunks``: start small,
measure each engine's time per item, grow toward a target duration, shrink toward the end);
an int ``chunksize`` fixes them.

Everything is serialised in the caller's thread before anything is sent (fixed chunks: each
chunk; auto: ``(f, items)`` once, a private copy that later chunks are cut from), so an item
that cannot be pickled is a ``TypeError`` naming it, raised by the call itself; and any
exception in a done-callback fails the map with that error instead of being swallowed by
``concurrent.futures`` (issue 11.5).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import logging
import reprlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from . import serialize, stdin
from .errors import CompositeError, EngineError, RefusedError, RemoteError, TimeoutError
from .results import Tally

log = logging.getLogger("ipy_multiengine")


def dumps_chunk(
    f: Callable, offset: int, chunk: list, snapshot: bool = True, star: bool = True
) -> list[Any]:
    """Serialise ``(f, chunk)``, or raise a ``TypeError`` naming the item that cannot be sent.

    ``chunk`` holds argument tuples (``star``) or single arguments (a map of one sequence: no
    tuple per item to pickle and unpack). ``snapshot``: copy large items now, for chunks sent
    later from the I/O thread, when the caller may have changed them (issue 11 item 2); a chunk
    sent at once is tracked instead."""
    try:
        frames = serialize.dumps((f, chunk))
        return serialize.snapshot(frames) if snapshot else frames
    except Exception as exc:
        serialize.check_picklable(getattr(f, "__name__", "function"), f)
        for k, item in enumerate(chunk):
            value = item[0] if star and len(item) == 1 else item
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


#: Auto chunking (``chunksize=None``), learnt from joblib's auto batching (start small,
#: measure, grow toward a target duration, bounded growth, smoothed estimates) and written
#: for engines that report each chunk's own seconds:
#: a chunk lasts about sqrt(2 * work left per engine * overhead per chunk) seconds, the size
#: that minimises overhead (work / size * overhead) plus tail (size / 2); it shrinks as the
#: map nears its end, so the engines' last chunks are short and finish together...
AUTO_SCALE = 2.0  # twice that: fewer chunks, about as balanced (simulated, 2-5 ms overhead)
AUTO_MAX_SECONDS = 0.5  # ...and at most this long, for progress and when durations vary
#: The overhead per chunk assumed before one is measured (engine and client time, this box).
AUTO_OVERHEAD = 0.003
#: A chunk is at most this many times its engine's previous one (a cheap first item must not
#: make the next chunk huge).
AUTO_GROWTH = 16
#: ...unless it is predicted to last at most this many assumed overheads (30 ms).
AUTO_SMALL = 10
#: The first chunks: at most 1/AUTO_FIRST of an engine's share, and often a single item.
AUTO_FIRST = 64
#: Weight of past chunks against the newest in the per-item and overhead estimates.
AUTO_DECAY = 0.5


class AutoChunks:
    """Chooses the size of each next chunk of an auto-chunked map from measured durations.

    Starts small (one item, or 1/``AUTO_FIRST`` of an engine's share for long maps). Each reply
    gives the engine's seconds for the chunk (its work) and, on this side, the chunk's service
    time (reply time minus the later of its sending and the engine's previous reply: an engine
    runs its chunks in order); their difference is the overhead per chunk. The next chunk for
    an engine is ``sqrt(2 * work left per engine * overhead)`` seconds of that engine's items,
    at most ``AUTO_MAX_SECONDS``, at most ``AUTO_GROWTH`` times its previous chunk, and no
    more than the engine's even share of the items not yet done -- unless that share is less
    work than one chunk's overhead, which is not worth a message: then up to that much (at most
    as many items as its estimate was measured on), or all that is left. An engine whose
    measured work is less than one overhead (noise) gets at least its even share. An engine
    gets one chunk at a time until its first is answered (then ``depth``), unless a probe is
    known to last longer than that overhead. Not thread-safe: the map's lock guards it.
    """

    def __init__(self, n: int, engines: int) -> None:
        self.first = max(1, n // (max(1, engines) * AUTO_FIRST))
        self._work: dict[int, float] = {}  # per engine: decayed sums of work seconds...
        self._items: dict[int, float] = {}  # ...and of items: seconds per item = their ratio
        self._overhead = AUTO_OVERHEAD
        self._measured = False
        self._last: dict[int, int] = {}

    def record(self, eid: int, items: int, work: float | None, service: float) -> None:
        """Engine ``eid`` ran a chunk of ``items`` items: ``work`` seconds by its own clock
        (None if it did not say), ``service`` seconds as seen from here."""
        if work is None:
            work = service
        else:
            over = max(0.0, service - work)
            self._overhead = (
                AUTO_DECAY * self._overhead + (1 - AUTO_DECAY) * over if self._measured else over
            )
            self._measured = True
        self._work[eid] = AUTO_DECAY * self._work.get(eid, 0.0) + max(work, 1e-7)
        self._items[eid] = AUTO_DECAY * self._items.get(eid, 0.0) + items

    def measured(self, eid: int) -> bool:
        """Whether a chunk of ``eid`` was answered."""
        return eid in self._items

    def depth(self, eid: int, depth: int) -> int:
        """How many chunks ``eid`` may have in flight: ``depth``, or one until its first chunk
        is answered -- a second probe costs a message and hides no round trip when items are
        tiny -- unless another engine's answer says a probe outlasts a chunk's overhead."""
        if eid in self._items:
            return depth
        mean = self.per_item()
        return depth if mean is not None and self.first * mean >= self._cost() else 1

    def _cost(self) -> float:
        """The overhead of one chunk to weigh against work: measured, but at most the assumed
        ``AUTO_OVERHEAD`` (on a loaded box the measured latency is mostly waiting for a CPU,
        which costs no engine time; its messages' CPU is what a chunk costs)."""
        return min(self._overhead, AUTO_OVERHEAD)

    def per_item(self, eid: int | None = None) -> float | None:
        """Estimated seconds per item on ``eid`` (or over all engines); None before any chunk."""
        if eid is not None and eid in self._items:
            return self._work[eid] / self._items[eid]
        if not self._items:
            return None
        return sum(self._work.values()) / sum(self._items.values())

    def size(self, eid: int, remaining: int, share: int, engines: int) -> int:
        """Items for ``eid``'s next chunk: ``remaining`` items are not yet sent, ``share`` is
        what ``eid`` may still take of an even split (0: it has enough queued)."""
        mean, mine = self.per_item(), self.per_item(eid)
        cap = share
        if mean is None or mine is None or eid not in self._items:
            # an engine still on its probe (a second chunk queued behind it) gets another
            # probe, not a chunk sized by the other engines' speed: 100x slower, it held 118
            # items, 1.2 s, of a map the others finished in 0.1 s
            m = self.first
        else:
            noise = eid in self._work and self._work[eid] < self._cost()
            if noise:
                # all this engine measured is less work than one chunk's overhead: its own
                # per-item time is noise (a first call's cost, a page fault: 3 tiny items in
                # 140 us gave it a quarter of its share and the map a tail chunk); the
                # engines' together says more
                mine = min(mine, mean)
            left = remaining * mean / max(1, engines)  # seconds of unsent work per engine
            target = min(
                AUTO_MAX_SECONDS, AUTO_SCALE * (2 * left * max(self._overhead, 1e-4)) ** 0.5
            )
            # bounded growth, except up to a chunk predicted to last no longer than
            # AUTO_SMALL overheads (tiny items: no reason to creep up on the even split)
            grown = max(
                AUTO_GROWTH * self._last.get(eid, self.first),
                int(AUTO_SMALL * AUTO_OVERHEAD / mine),
            )
            sized = int(target / mine)
            if noise:
                # ...and so is the target it gives (3 tiny items in 60 us, 0.3 ms measured
                # overhead: 183 of a 250-item share, and a tail chunk): such items are tiny,
                # their even share is the chunk
                sized = max(sized, share)
            m = min(sized, grown)
            # fewer items than one chunk's overhead in work are not worth a message of their
            # own: a chunk may exceed its even share up to that many, and a rest smaller than
            # that goes with it (tiny items, another engine slow to answer: no halving of the
            # rest) -- but never by more items than this engine's estimate was measured on (a
            # few cheap first items say little about the later ones)
            worth = min(int(self._cost() / mine), int(self._items.get(eid, 0)))
            cap = max(share, worth)
            if remaining - min(m, cap) < worth:
                m = cap = remaining
        m = max(1, min(m, cap, remaining))
        self._last[eid] = m
        return m


class BalancedMap:
    """One load-balanced map in flight; ``future`` resolves to the list of results.

    ``chunksize``: an int sends chunks of that many items, all serialised now; ``None`` (auto)
    sizes each chunk when it is sent (``AutoChunks``), from a private copy of ``(f, items)``
    taken now, so later changes to the caller's objects are not seen, as with fixed chunks.
    ``progress()`` counts items, not chunks. ``items`` are argument tuples, or with
    ``star=False`` single arguments (a map over one sequence).

    Progress: ``tally`` (a ``results.Tally`` of items) is told ``start(eid)`` when a chunk is
    sent to an engine and ``done(eid, n)`` when it ends with ``n`` items done (0 when it failed),
    whatever the chunk sizes; the progress bars of ``map(balanced=True)`` and ``imap`` read it.
    """

    def __init__(
        self,
        controller: Any,
        eids: list[int],
        f: Callable,
        items: list,
        chunksize: int | None = None,
        ordered: bool = True,
        retries: int = 1,
        depth: int = 2,
        listener: Callable[[int, str, dict], None] | None = None,
        tally: Tally | None = None,
        interrupt: Callable[[list[int]], None] | None = None,
        star: bool = True,
    ) -> None:
        if chunksize is not None and (
            not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1
        ):
            raise ValueError(
                f"chunksize must be a positive int or None (automatic), not {chunksize!r}"
            )
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
        self.total = len(items)
        self.star = star  # items are argument tuples (else single arguments: one sequence)
        self._items: list | None = items  # to name a failed item's argument
        #: chunk id -> (offset, number of items)
        self._chunks: list[tuple[int, int]] = []
        self._frames: dict[int, list[Any]] = {}  # a chunk's frames until it is answered
        self._auto: AutoChunks | None = None
        self._source: tuple[Callable, list] | None = None
        if chunksize is None:
            self._auto = AutoChunks(self.total, len(self.eids))
            if items:
                # all of it now, in the caller's thread: a private copy of (f, items), taken
                # now; an item that cannot be pickled is a TypeError naming it, before sending
                try:
                    frames = serialize.snapshot(serialize.dumps((f, items)))
                except Exception:
                    dumps_chunk(f, 0, items, snapshot=False, star=star)  # names the item
                    raise
                try:
                    self._source = serialize.loads(frames)
                except Exception:  # something only the engines can rebuild: cut from the
                    self._source = (f, list(items))  # caller's objects (a shallow copy)
        else:
            for i in range(0, len(items), chunksize):
                chunk = items[i : i + chunksize]
                # all of it now, in the caller's thread: nothing is sent if any item cannot be
                self._frames[len(self._chunks)] = dumps_chunk(f, i, chunk, star=star)
                self._chunks.append((i, len(chunk)))
        self._cursor = 0 if chunksize is None else self.total  # the next item not in a chunk
        self.tally = tally if tally is not None else Tally(len(items))
        self.future: cf.Future = cf.Future()
        self.future.set_running_or_notify_cancel()  # as a request's: stop it with cancel()
        self.id = uuid.uuid4().hex  # on the engines, a Ctrl-C skips this map's queued chunks
        self._events: collections.deque = collections.deque()
        self._wake: cf.Future = cf.Future()
        self._todo = collections.deque(range(len(self._chunks)))
        self._results: dict[int, list] = {}
        self._order: list[int] = []
        self._done_items = 0
        self._tries: collections.Counter[Any] = collections.Counter()
        self._inflight = {eid: 0 for eid in self.eids}
        self._held: dict[int, set[int]] = {eid: set() for eid in self.eids}  # chunks in flight
        self._requests: dict[int, cf.Future] = {}  # chunk id -> its request, while in flight
        self._sent_at: dict[int, float] = {}
        self._last_reply = dict.fromkeys(self.eids, 0.0)
        self._alive = set(self.eids)
        self._lock = threading.RLock()  # a future may complete inside _fill
        self._stopped = False
        #: the map's outcome, decided under the lock: ``future`` is resolved (its done-callbacks
        #: run) only once the lock is released (``_locked``)
        self._decided = False
        self._outcome: tuple[bool, Any] | None = None
        self._depth = 0  # nesting of ``_locked`` in the thread holding the lock

    def progress(self) -> tuple[int, int]:
        """``(items done, items in the map)``: what a progress bar shows (any thread)."""
        with self._lock:
            return self._done_items, self.total

    def chunk_sizes(self) -> list[int]:
        """The number of items of each chunk made so far, in the order they were made."""
        with self._lock:
            return [n for _, n in self._chunks]

    def _event(self, event: Any) -> None:
        """Queue an event for ``iterate`` and wake its wait (any thread)."""
        with self._lock:
            self._events.append(event)
            wake, self._wake = self._wake, cf.Future()
        wake.set_result(None)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock, for what may decide the map's outcome (``_decide``): ``future`` is resolved
        after the outermost such block has released it. Its done-callbacks run in whichever
        thread decided (the caller's, for ``cancel``) and may call the client: under the lock,
        the I/O thread, handling any other chunk of the map meanwhile, waited for them (a
        callback waiting for the engines hung, and so did every engine's traffic)."""
        outcome = None
        try:
            with self._lock:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                    if not self._depth:
                        outcome, self._outcome = self._outcome, None
        finally:
            if outcome is not None:
                ok, value = outcome
                if ok:
                    self.future.set_result(value)
                else:
                    self.future.set_exception(value)

    def _decide(self, ok: bool, value: Any) -> None:
        """(lock held, within ``_locked``) The map's result (``ok``) or error, once."""
        if not self._decided:
            self._decided = True
            self._outcome = (ok, value)

    def start(self) -> BalancedMap:
        """Send the first chunks; nothing if the map was stopped already (by an interrupt
        from another thread: the client lists a map before starting it)."""
        with self._locked():
            if not self.total:
                self._decide(True, [])
            try:
                for eid in self.eids:
                    self._fill(eid)
            except Exception as exc:
                self._fail(exc)
        return self

    def cancel(self) -> None:
        """Send nothing more; the chunks sent that no engine has begun are skipped there, those
        running finish (``mec.interrupt`` stops them); the map fails."""
        with self._locked():
            if not self._stopped and not self._decided:
                self._fail(
                    EngineError(
                        "the load-balanced map was interrupted before it finished",
                        self.eids[0] if self.eids else None,
                        "map",
                    )
                )

    # -- called with the lock held
    def _next_chunk(self, eid: int) -> int | None:
        """The id of the chunk to send to ``eid`` next (a re-send first), or None."""
        if self._todo:
            return self._todo.popleft()
        if self._auto is None or self._cursor >= self.total or self._source is None:
            return None
        remaining = self.total - self._cursor
        # an even split of what is not done among the live engines, less what eid holds
        held = sum(self._chunks[c][1] for c in self._held[eid])
        queued = sum(self._chunks[c][1] for e in self._alive for c in self._held[e])
        share = -(-(remaining + queued) // max(1, len(self._alive))) - held
        if self._held[eid] and share * 4 <= held:
            return None  # eid has (nearly) its share queued: the others take the rest
        n = self._auto.size(eid, remaining, max(1, share), len(self._alive))
        offset, self._cursor = self._cursor, self._cursor + n
        f, items = self._source
        ci = len(self._chunks)
        self._frames[ci] = serialize.dumps((f, items[offset : offset + n]))
        self._chunks.append((offset, n))
        if self._cursor >= self.total:
            self._source = None  # every item is in a chunk: free the copy
        return ci

    def _fill(self, eid: int) -> None:
        auto = self._auto
        while not self._stopped and eid in self._alive:
            if self._inflight[eid] >= (self.depth if auto is None else auto.depth(eid, self.depth)):
                return
            ci = self._next_chunk(eid)
            if ci is None:
                return
            offset, _n = self._chunks[ci]
            self._sent_at[ci] = time.monotonic()
            data: dict[str, Any] = {"offset": offset, "map": self.id}
            if not self.star:
                data["star"] = False
            fut = self.controller.submit_comm(
                [eid],
                "map",
                data,
                [self._frames[ci]],
                listener=self.listener,
            )[0]
            self._inflight[eid] += 1
            self.tally.start(eid)
            self._held[eid].add(ci)
            self._requests[ci] = fut
            fut.add_done_callback(lambda fu, eid=eid, ci=ci: self._done(eid, ci, fu))

    def _argument(self, index: int) -> str:
        """A short repr of item ``index``'s argument (its tuple of arguments if several)."""
        if self._items is None or not 0 <= index < len(self._items):
            return "?"
        args = self._items[index]
        return reprlib.repr(args[0] if self.star and len(args) == 1 else args)

    def _named(self, exc: BaseException, ci: int) -> BaseException:
        """``exc`` of chunk ``ci``, saying which item (index and argument) it concerns."""
        offset, n = self._chunks[ci]
        if isinstance(exc, RemoteError) and exc.item is not None:
            return RemoteError(
                exc.ename,
                f"{exc.evalue}; its argument: {self._argument(exc.item)}",
                exc.traceback,
                exc.engine_id,
                exc.method,
                exc.pickled,
                exc.result,
                exc.item,
            )
        if isinstance(exc, EngineError):
            what = (
                f"item {offset} (argument {self._argument(offset)})"
                if n == 1
                else f"items {offset}..{offset + n - 1}"
            )
            tries = self._tries[ci] + 1
            error = RefusedError if isinstance(exc, RefusedError) else EngineError
            return error(
                f"{exc.evalue}; {what} of the map not done "
                f"(sent {tries} time{'s' if tries > 1 else ''})",
                exc.engine_id,
                "map",
            )
        return exc

    def _fail(self, err: BaseException) -> None:
        self._stopped = True
        self._todo.clear()
        self._frames = {}
        self._source = None
        self._items = None
        self._decide(False, err)
        self._skip_queued()
        self._event(err)

    def _skip_queued(self) -> None:
        """The map has failed or was stopped: its chunks sent and not begun by their engines are
        skipped there (the map's result is decided; run later, they would keep their engines
        busy for nobody, with the side effects of the map's function). Does not wait: any
        thread, the I/O thread's done-callbacks included."""
        waiting = [f for f in self._requests.values() if not f.done()]
        self._requests = {}
        skip = getattr(self.controller, "skip_requests", None)
        if waiting and skip is not None:
            skip(waiting)

    # -- done-callbacks (I/O thread, or the caller's thread if already done)
    def _done(self, eid: int, ci: int, fu: cf.Future) -> None:
        """A chunk's future is done. Any exception here fails the map with it: raised in a
        done-callback it would be logged and dropped by ``concurrent.futures``, and the map
        would wait forever."""
        with self._locked():
            try:
                self._on_done(eid, ci, fu)
            except BaseException as exc:
                log.error(
                    "load-balanced map: handling chunk %s from engine %s failed",
                    ci,
                    eid,
                    exc_info=exc,
                )
                if not self._stopped:
                    self._fail(exc)

    def _on_done(self, eid: int, ci: int, fu: cf.Future) -> None:
        now = time.monotonic()
        with self._lock:
            self._inflight[eid] -= 1
            self._held[eid].discard(ci)
            self._requests.pop(ci, None)
            ok = not fu.cancelled() and fu.exception() is None
            self.tally.done(eid, self._chunks[ci][1] if ok and not self._stopped else 0)
            if self._stopped:
                return
            exc = fu.exception()
            if exc is None:
                offset, n = self._chunks[ci]
                # the engine runs its chunks in order: this one ran from the later of its
                # sending and the engine's previous reply until now
                began = max(self._sent_at.pop(ci, now), self._last_reply.get(eid, 0.0))
                self._last_reply[eid] = now
                if self._auto is not None:
                    self._auto.record(eid, n, fu.result().content.get("seconds"), now - began)
                try:
                    values = serialize.loads(fu.result().frames)
                except Exception as err:  # a result that cannot be rebuilt here
                    self._fail(RemoteError(type(err).__name__, str(err), [], eid, "map"))
                    return
                self._results[ci] = values
                self._frames.pop(ci, None)  # sent and answered: free the serialised chunk
                self._order.append(ci)
                self._done_items += n
                self._event((offset, values))
                if self._done_items >= self.total:
                    if self.ordered:
                        order = sorted(self._results, key=lambda c: self._chunks[c][0])
                    else:
                        order = self._order
                    self._decide(True, [v for c in order for v in self._results[c]])
                    self._results, self._items = {}, None
                    return
                self._fill(eid)
                if self._auto is not None:  # engines still on their first chunk: a second?
                    for other in self.eids:
                        if other != eid and other in self._alive and not self._auto.measured(other):
                            self._fill(other)
            elif isinstance(exc, RefusedError):
                # changed on the way, not a fault of the engine: re-sending it elsewhere would
                # hide the attack (and a refused reply's chunk did run); the map fails naming it
                self._fail(self._named(exc, ci))
            elif isinstance(exc, EngineError):
                self._alive.discard(eid)
                self._sent_at.pop(ci, None)
                if self._tries[ci] < self.retries and self._alive:
                    self._tries[ci] += 1
                    self._todo.appendleft(ci)
                    for other in sorted(self._alive):
                        self._fill(other)
                else:
                    self._fail(self._named(exc, ci))
            else:
                self._fail(self._named(exc, ci))

    def _next_event(self, deadline: float | None, progress: Any = None) -> Any:
        """The next event, waiting (the package's one wait: Ctrl-C, engines' input) until the
        deadline; raises ``TimeoutError`` past it. ``progress(done, total, busy)`` is drawn
        from ``tally`` in each slice of the wait."""
        draw = None if progress is None else (lambda _d, _t: progress(*self.tally.snapshot()))
        while True:
            with self._lock:
                if self._events:
                    return self._events.popleft()
                wake = self._wake
            if not stdin.wait([wake], deadline=deadline, progress=draw):
                done, total = self.progress()
                raise TimeoutError(
                    f"imap not finished by its timeout: {done} of {total} "
                    "items done; sending the others was stopped"
                )

    # -- iteration (caller's thread)
    def iterate(
        self, timeout: float | None = None, deadline: float | None = None, progress: Any = None
    ) -> Iterator[Any]:
        """Yield results as chunks complete (input order when ``ordered``); Ctrl-C stops the map,
        and so does ``timeout`` (seconds for the whole iteration, from this call: the generator's
        body runs only at the first ``next()``) or ``deadline`` (a ``time.monotonic()`` value)
        with a ``TimeoutError``. ``progress``: a ``render.ProgressBar`` drawn while waiting and
        closed at the end."""
        if timeout is not None:
            end = time.monotonic() + timeout
            deadline = end if deadline is None else min(deadline, end)
        return self._iterate(deadline, progress)

    def _iterate(self, deadline: float | None, progress: Any = None) -> Iterator[Any]:
        buffered: dict[int, list] = {}  # by offset
        following = 0  # the offset of the next item to yield (ordered)
        received = 0  # items
        try:
            while received < self.total:
                event = self._next_event(deadline, progress)
                if isinstance(event, BaseException):
                    raise _composite(event)
                offset, values = event
                received += len(values)
                if not self.ordered:
                    yield from values
                    continue
                buffered[offset] = values
                while following in buffered:
                    values = buffered.pop(following)
                    following += len(values)
                    yield from values
        except TimeoutError:
            self.cancel()
            raise
        except KeyboardInterrupt:
            self.cancel()
            self.interrupt([e for e in self.eids if self._inflight.get(e)])
            raise
        finally:
            if progress is not None:
                progress.close(*self.tally.snapshot())


def _composite(err: BaseException) -> BaseException:
    if isinstance(err, (RemoteError, EngineError)):
        return CompositeError("map", [err])
    return err
