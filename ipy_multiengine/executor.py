"""``EngineExecutor``: the engines as a standard ``concurrent.futures.Executor``.

``mec.executor()`` returns one. Each ``submit`` is one task: its call is serialised at once (the
engine gets the arguments as they were at the time of the call), kept in a queue in this process,
and sent as one ``apply`` when an engine is free: ``balanced=True`` to whichever target engine
is free first, ``balanced=False`` to the engine chosen at submit time (round robin over the
targets, or always the same one for a single target). Each engine has at most one task of an
executor in flight, so every task still waiting is a *queued* ``Future`` that ``cancel()``
removes without the engines ever seeing it.

Tasks are sent per task, not through the load-balanced map's chunks (``balanced.py``): a map
knows all its items up front and fails as a whole, while an executor takes tasks one at a time
over its lifetime and each has its own ``Future``, result and cancellation.

Completions arrive on the controller's I/O thread, which only queues them: a completion thread
of the executor (one while any task is in flight) unpickles the results, resolves the
``Future``s (so their done-callbacks, e.g. joblib's, never run on the I/O thread and may call
the client) and sends the next tasks. Any error there fails the task it belongs to. No
``Future`` is resolved or cancelled while the executor's lock is held: a done-callback that
takes a lock of its own, or calls back into the executor, cannot deadlock against it.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import serialize, stdin
from .controller import INTERRUPT_ACK
from .errors import EngineError, RemoteError, RemoteTraceback, TimeoutError
from .targets import resolve as resolve_targets

log = logging.getLogger("ipy_multiengine")

__all__ = ["EngineExecutor"]


class _Task:
    __slots__ = ("eid", "frames", "future", "interrupted", "ran_on", "request")

    def __init__(self, frames: list[Any], eid: int | None) -> None:
        self.future: cf.Future = cf.Future()
        self.frames: list[Any] | None = frames
        self.eid = eid  # the engine it is pinned to (balanced=False), else None
        self.ran_on: int | None = None
        self.request: cf.Future | None = None  # the controller's request, once sent
        self.interrupted = False  # ``interrupt()`` asked its engine to interrupt it


def _dumps_call(f: Callable, args: tuple, kwargs: dict) -> list[Any]:
    """``(f, args, kwargs)`` serialised, with its large buffers copied (the task may be sent
    later, when the caller has changed them), or a ``TypeError`` naming what cannot be sent."""
    try:
        return serialize.snapshot(serialize.dumps((f, args, kwargs)))
    except Exception:
        serialize.check_picklable(getattr(f, "__name__", "function"), f)
        for i, arg in enumerate(args):
            serialize.check_picklable(f"argument {i}", arg)
        for key, value in kwargs.items():
            serialize.check_picklable(f"keyword argument {key}", value)
        raise


def _call_chunk(f: Callable, chunk: list[tuple]) -> list[Any]:
    """Runs on the engine: one task of ``map(..., chunksize=n)``."""
    return [f(*args) for args in chunk]


def _local_error(exc: BaseException) -> BaseException:
    """What a task's ``Future`` raises for an engine's exception: the original type when it can
    be rebuilt here (as a process pool does), chained to a ``RemoteTraceback`` (a
    ``RemoteError`` whose message is the remote traceback, so that a printed traceback shows
    where the engine raised); otherwise that ``RemoteTraceback`` itself."""
    if isinstance(exc, RemoteError):
        exc = RemoteTraceback.of(exc)
        original = exc.original()
        if original is not None:
            original.__cause__ = exc
            return original
    return exc


#: how an interrupted task's request ends: interrupted running, or skipped before it began
_STOPPED = ("KeyboardInterrupt", "Aborted")


def _log_failure(fut: cf.Future) -> None:
    """(I/O thread) An interrupt that nobody waits for failed: say so."""
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("executor: interrupting its tasks failed: %r", fut.exception())


def _settle(failed: list[tuple[cf.Future, BaseException]]) -> None:
    """Fail each future with its exception (with no lock held: done-callbacks run here)."""
    for fut, exc in failed:
        fut.set_exception(exc)


class EngineExecutor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run on engines (see the module docstring).

    ``client`` is a ``MultiEngineClient``; ``targets`` the engines to use (default: the client's
    targets); ``balanced`` picks the engine when it is free (True) or at submit time, round robin
    (False). ``shutdown(wait=True, cancel_futures=False)`` as in the standard library; the engines
    keep running (they belong to the cluster, not to the executor).
    """

    def __init__(self, client: Any, balanced: bool = True, targets: Any = None) -> None:
        if not isinstance(balanced, bool):
            raise TypeError(f"balanced must be True or False, not {balanced!r}")
        if getattr(client, "closed", False):
            raise EngineError("this MultiEngineClient is closed")
        controller = client.controller
        eids = resolve_targets(
            client.targets if targets is None else targets, controller.ids, client.groups
        )
        if not eids:
            raise ValueError(f"targets {targets!r} select no engine")
        self._client = client
        self._controller = controller
        self.balanced = balanced
        #: the engines this executor sends tasks to, in order
        self.eids: list[int] = list(eids)
        self._lock = threading.RLock()
        self._shared: collections.deque[_Task] = collections.deque()
        self._queues: dict[int, collections.deque[_Task]] = {
            e: collections.deque() for e in self.eids
        }
        self._inflight: dict[int, _Task | None] = dict.fromkeys(self.eids)
        self._dead: set[int] = set()
        self._round = itertools.cycle(self.eids)
        #: every task not done yet, by its future (to drop a cancelled one's call at once)
        self._pending: dict[cf.Future, _Task] = {}
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        #: every completion thread until it has ended, also one that is ending (``_worker``
        #: is None by then, a newer one may run) while it fails tasks and runs their callbacks
        self._completers: set[threading.Thread] = set()
        self._on_worker = threading.local()  # .active: this thread completes our tasks
        self._shutdown = False

    @property
    def pending(self) -> int:
        """How many of this executor's tasks are queued or running."""
        with self._lock:
            return len(self._pending)

    @property
    def is_shutdown(self) -> bool:
        """Whether ``shutdown()`` was called (``submit`` then raises ``RuntimeError``)."""
        return self._shutdown

    def __repr__(self) -> str:
        kind = "balanced" if self.balanced else "round-robin"
        return f"<EngineExecutor {kind} on engines {self.eids}: {len(self._pending)} pending>"

    # ------------------------------------------------------------------ the Executor interface
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:
        """Schedule ``fn(*args, **kwargs)`` on an engine; a ``concurrent.futures.Future``."""
        if not callable(fn):
            raise TypeError(f"submit needs a callable, not {type(fn).__name__}")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if getattr(self._client, "closed", False):
            raise EngineError("this MultiEngineClient is closed")
        frames = _dumps_call(fn, args, kwargs)  # in the caller's thread: errors name the value
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self.balanced:
                task = _Task(frames, None)
                self._shared.append(task)
            else:
                # also skip an engine that died idle (not yet in ``_dead``: ``_pump`` notes it)
                live = [
                    e for e in self.eids if e not in self._dead and not self._controller.dead(e)
                ]
                if not live:
                    raise EngineError(f"every engine of this executor died: {self.eids}")
                eid = next(self._round)
                while eid not in live:
                    eid = next(self._round)
                task = _Task(frames, eid)
                self._queues[eid].append(task)
            self._pending[task.future] = task
            task.future.add_done_callback(self._forget)
            failed = self._pump()
        _settle(failed)
        return task.future

    def map(
        self,
        fn: Callable,
        *iterables: Iterable,
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like ``map(fn, *iterables)``, run on the engines: every item is submitted now, results
        are yielded in order. ``chunksize`` items travel as one task; ``timeout`` (seconds from
        this call) bounds the whole iteration: ``TimeoutError`` (a ``concurrent.futures``
        one), the tasks not yet run are cancelled."""
        if not callable(fn):
            raise TypeError(f"map needs a callable, not {type(fn).__name__}")
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, not {chunksize!r}")
        if timeout is not None and not (timeout == timeout):
            raise ValueError("timeout must be a number of seconds or None, not nan")
        deadline = None if timeout is None else time.monotonic() + timeout
        items = zip(*iterables, strict=False)  # like map(): the shortest iterable
        if chunksize == 1:
            fs = [self.submit(fn, *args) for args in items]
        else:
            fs = [
                self.submit(_call_chunk, fn, chunk)
                for chunk in iter(lambda: list(itertools.islice(items, chunksize)), [])
            ]
        return self._results(fs, deadline, chunksize > 1)

    def _results(self, fs: list[cf.Future], deadline: float | None, chunked: bool) -> Iterator:
        fs.reverse()  # pop from the end: a result yielded is no longer referenced here
        try:
            while fs:
                fut = fs.pop()
                if not stdin.wait([fut], deadline=deadline):
                    fs.append(fut)
                    raise TimeoutError(
                        f"executor map not finished by its timeout: {len(fs)} tasks left; "
                        "the ones not started are cancelled"
                    )
                if chunked:
                    yield from fut.result()
                else:
                    yield fut.result()
                del fut
        finally:
            for fut in fs:
                fut.cancel()

    def interrupt(self, timeout: float | None = None) -> list[cf.Future]:
        """Interrupt this executor's running tasks on their engines, and only them: what else
        the engines run or have queued (another executor's tasks, the client's other calls,
        another client's) goes on. Each such task's ``Future`` raises ``CancelledError`` (its
        cause the engine's KeyboardInterrupt), unless it finished first; queued tasks are left
        queued (``shutdown(cancel_futures=True, interrupt=True)`` drops them too).

        Waits for the engines to acknowledge (``timeout`` s at most, default about a second):
        returns the futures of the tasks left running (their engine did not answer, or its
        helper, of an older version, cannot interrupt by name: a task not begun there is
        skipped all the same)."""
        if timeout is not None and not (timeout == timeout):  # refused before asking anything
            raise ValueError("timeout must be a number of seconds or None, not nan")
        running, asked = self._interrupt_running(timeout)
        # the controller answers by its own deadline: this bound is for a stalled I/O thread
        if not stdin.wait([asked], timeout=(INTERRUPT_ACK if timeout is None else timeout) + 5):
            asked.cancel()
            return [t.future for t, _r in running if not t.future.done()]
        mine = {id(r): t.future for t, r in running}
        return [mine[id(f)] for fs in asked.result().values() for f in fs if id(f) in mine]

    def _interrupt_running(
        self, timeout: float | None = None
    ) -> tuple[list[tuple[_Task, cf.Future]], cf.Future]:
        """Ask the engines to interrupt the tasks in flight now; (those tasks with their
        requests, the controller's Future of what it could not interrupt). Does not wait."""
        with self._lock:
            # each request read once, here: the completion thread drops it as its task ends
            sent = [(t, t.request) for t in self._inflight.values() if t is not None]
            running = [(t, r) for t, r in sent if r is not None]
            for task, _request in running:
                task.interrupted = True
        requests = [r for _t, r in running]
        if timeout is None:
            return running, self._controller.interrupt_requests(requests)
        return running, self._controller.interrupt_requests(requests, timeout)

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, interrupt: bool = False
    ) -> None:
        """No more tasks; ``cancel_futures`` cancels the queued ones; ``interrupt`` interrupts
        the running ones on their engines (``interrupt()``: only this executor's tasks, their
        ``Future`` raising ``CancelledError``); ``wait`` waits for the rest and their
        done-callbacks (Ctrl-C stops the wait, the tasks keep running). From a done-callback of
        this executor (its completion thread) ``wait=True`` raises ``RuntimeError`` once shut
        down, as the standard library's pools do: that thread would wait for itself."""
        with self._lock:
            self._shutdown = True
            dropped: list[cf.Future] = []
            if cancel_futures:
                for q in [self._shared, *self._queues.values()]:
                    dropped.extend(t.future for t in q)
                    q.clear()
            left = list(self._pending)
        for fut in dropped:  # outside the lock: their done-callbacks run here
            fut.cancel()
        if interrupt:
            _running, asked = self._interrupt_running()  # its answer is not waited for
            asked.add_done_callback(_log_failure)
        if wait and getattr(self._on_worker, "active", False):
            if any(not f.done() for f in left):
                raise RuntimeError(
                    "shutdown(wait=True) in a done-callback of this executor: its completion "
                    "thread cannot wait for its own tasks (the executor is shut down; use "
                    "wait=False)"
                )
            return
        if wait and left:
            stdin.wait(left)
        if wait:
            # as the standard library's pools join their threads: once this returns, every
            # done-callback of this executor's tasks has run (they run on its completion
            # thread after the result is set)
            with self._lock:
                workers = list(self._completers)
            for worker in workers:
                while worker.is_alive():
                    worker.join(0.1)  # in slices: Ctrl-C stays possible

    # ------------------------------------------------------------------ dispatch (lock held)
    # these only *collect* the futures that fail, as (future, exception) pairs: the caller
    # resolves them with ``_settle`` once it has released the lock
    def _next_for(self, eid: int) -> _Task | None:
        q = self._shared if self.balanced else self._queues[eid]
        while q:
            task = q.popleft()
            if task.future.set_running_or_notify_cancel():  # False: it was cancelled
                return task
        return None

    def _pump(self) -> list[tuple[cf.Future, BaseException]]:
        failed: list[tuple[cf.Future, BaseException]] = []
        for eid in self.eids:
            if eid in self._dead or self._inflight[eid] is not None:
                continue
            if self._controller.dead(eid):  # died while idle here: no task of ours is lost
                self._dead.add(eid)
                continue
            # a task that cannot be sent (closed client) fails at once: try the next one
            while (task := self._next_for(eid)) is not None and not self._send(eid, task, failed):
                pass
        self._fail_orphans(failed)
        return failed

    def _send(self, eid: int, task: _Task, failed: list) -> bool:
        """Send ``task`` to ``eid``; False if it could not be sent (then it is in ``failed``)."""
        frames, task.frames = task.frames, None
        task.ran_on = eid
        try:
            fut = self._controller.submit_comm([eid], "apply", {}, [frames])[0]
        except BaseException as exc:  # closed client, engine gone: this task fails, not others
            if self._controller.dead(eid):
                self._dead.add(eid)
            failed.append((task.future, exc))
            return False
        task.request = fut
        self._inflight[eid] = task
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._complete_loop, name="ipy_multiengine-executor", daemon=True
            )
            self._completers.add(self._worker)
            self._worker.start()
        # on the I/O thread: only queue the completion (never raises)
        fut.add_done_callback(lambda f, eid=eid, task=task: self._events.put((eid, task, f)))
        return True

    def _fail_orphans(self, failed: list) -> None:
        """Queued tasks no engine can run any more (their engine died) fail now."""
        if self.balanced:
            orphans = [self._shared] if len(self._dead) == len(self.eids) else []
        else:
            orphans = [self._queues[e] for e in self._dead]
        for q in orphans:
            while q:
                task = q.popleft()
                if task.future.set_running_or_notify_cancel():
                    failed.append(
                        (
                            task.future,
                            EngineError(
                                f"no engine left to run this task "
                                f"(engines {sorted(self._dead)} died)",
                                task.eid,
                                "apply",
                            ),
                        )
                    )

    def _forget(self, fut: cf.Future) -> None:
        with self._lock:
            task = self._pending.pop(fut, None)
            if task is not None and fut.cancelled():
                # its serialised call (a copy of the arguments) is freed now, not when the
                # queue reaches the cancelled task, perhaps behind a long one
                task.frames = None

    # ------------------------------------------------------------------ completions (own thread)
    def _complete_loop(self) -> None:
        self._on_worker.active = True
        while True:
            eid, task, fut = self._events.get()
            try:
                self._complete(eid, task, fut)
            except BaseException as exc:  # never lost: the task fails with it
                log.error("executor: completing a task of engine %s failed", eid, exc_info=exc)
                if not task.future.done():
                    task.future.set_exception(exc)
            # while waiting for the next completion, hold nothing of this one: its Future
            # (and so its result) is the caller's to drop (the request, whose done-callback
            # holds the task, would make a cycle keeping the reply until a collection)
            task.request = None
            del task, fut
            failed: list[tuple[cf.Future, BaseException]] = []
            with self._lock:
                self._inflight[eid] = None
                try:
                    failed = self._pump()
                except BaseException as exc:
                    log.error("executor: sending the next task failed", exc_info=exc)
                done = all(t is None for t in self._inflight.values()) and self._events.empty()
                if done:
                    self._worker = None
            _settle(failed)
            if done:
                with self._lock:
                    self._completers.discard(threading.current_thread())
                return

    def _complete(self, eid: int, task: _Task, fut: cf.Future) -> None:
        exc = fut.exception()
        if exc is None:
            try:
                value = serialize.loads(fut.result().frames)
            except Exception as err:
                raise TypeError(
                    f"a value sent back by engine {eid} cannot be rebuilt in this process "
                    f"({type(err).__name__}: {err})"
                ) from err
            task.future.set_result(value)
            return
        if isinstance(exc, EngineError) and self._controller.dead(eid):
            with self._lock:
                self._dead.add(eid)
        if isinstance(exc, (RemoteError, EngineError)) and exc.engine_id is None:
            exc = exc.for_engine(eid)
        if task.interrupted and isinstance(exc, RemoteError) and exc.ename in _STOPPED:
            # what ``interrupt()`` asked for: this task is cancelled, not failed
            stopped = cf.CancelledError(f"interrupted on engine {eid} (executor interrupt)")
            stopped.__cause__ = RemoteTraceback.of(exc)
            task.future.set_exception(stopped)
            return
        task.future.set_exception(_local_error(exc))
