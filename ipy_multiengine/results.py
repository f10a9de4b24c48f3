"""``PendingResult`` (a handle on a call in flight) and ``ResultList`` (what ``execute``
returns)."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from . import stdin, wire
from ._loop import check_timeout
from .errors import (
    CompositeError,
    EngineError,
    EngineFailure,
    RemoteError,
    TimeoutError,
)

_UNSET = object()


class ResultList(list[dict[str, Any]]):
    """One dict per engine, in target order, with the tutorial's repr::

        <Results List>
        [0] In [4]: print(c)
        [0] Out[4]: 15

    Beyond the tutorial's lines: stderr as ``[0] Err[4]: ...`` and every rich output named by
    its MIME types, ``[0] Display[4]: <image/png, text/plain> <Figure ...>`` (a result whose
    bundle holds more than ``text/plain`` also gets such a line, ``Display[4]: result <...>``).
    """

    def __repr__(self) -> str:
        lines = ["<Results List>"]
        for r in self:
            eid, n = r.get("id"), r.get("number")
            lines.append(f"[{eid}] In [{n}]: {r['input']['raw']}")
            text = (r.get("stdout") or "").rstrip("\n")
            result = r.get("result")
            if result is not None:
                plain = str(result.get("text/plain", ""))
                text = f"{text}\n{plain}" if text else plain
            for out in r.get("outputs") or []:  # pager text (obj?, %pdoc): what a terminal shows
                if (out.get("metadata") or {}).get("pager"):
                    page = str((out.get("data") or {}).get("text/plain", "")).rstrip("\n")
                    text = f"{text}\n{page}" if text else page
            if text:
                lines.append(f"[{eid}] Out[{n}]: {text}")
            err = (r.get("stderr") or "").rstrip("\n")
            if err:
                lines.append(f"[{eid}] Err[{n}]: {err}")
            for out in r.get("outputs") or []:
                named = _rich(out)
                if named:
                    lines.append(f"[{eid}] Display[{n}]: {named}")
            lines.extend(_late_lines(eid, n, r.get("late")))
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _late_lines(eid: Any, n: Any, late: dict[str, Any] | None) -> list[str]:
    """The Results List lines of what an engine printed after its command had finished
    (``record["late"]``, e.g. a thread the code started): ``Late[n]``, ``LateErr[n]``,
    ``LateDisplay[n]``, and how many late messages were not kept."""
    if not late:
        return []
    lines = []
    text = (late.get("stdout") or "").rstrip("\n")
    if text:
        lines.append(f"[{eid}] Late[{n}]: {text}")
    err = (late.get("stderr") or "").rstrip("\n")
    if err:
        lines.append(f"[{eid}] LateErr[{n}]: {err}")
    for out in late.get("outputs") or []:
        named = _rich(out)
        if named:
            lines.append(f"[{eid}] LateDisplay[{n}]: {named}")
    if late.get("dropped"):
        count, chars = late["dropped"], late.get("dropped_chars")
        size = f" ({chars} characters)" if chars else ""
        lines.append(
            f"[{eid}] Late[{n}]: ... {count} more late message{'s' if count != 1 else ''}{size} "
            f"not kept (past the {wire.LATE_LIMIT} characters a command keeps)"
        )
    return lines


def _rich(out: dict[str, Any]) -> str:
    """Name a display/result output by its MIME types (``''`` for a plain-text result)."""
    kind = out.get("output_type")
    data = out.get("data") or {}
    if kind not in ("display_data", "update_display_data", "execute_result"):
        return ""
    if (out.get("metadata") or {}).get("pager"):
        return ""  # pager text: already on the Out line
    if kind == "execute_result" and set(data) <= {"text/plain"}:
        return ""  # already on the Out line
    head = (
        "result "
        if kind == "execute_result"
        else ("update " if kind == "update_display_data" else "")
    )
    plain = "" if kind == "execute_result" else str(data.get("text/plain", ""))
    return f"{head}<{', '.join(sorted(data)) or 'empty'}>" + (f" {plain}" if plain else "")


def nbytes(frames: Any) -> int:
    """Bytes in a list of message frames (what a scatter sends, a gather receives)."""
    total = 0
    for frame in frames or ():
        try:
            total += memoryview(getattr(frame, "buffer", frame)).nbytes
        except TypeError:
            total += len(frame)
    return total


class Tally:
    """How much of a call's work is done, for its progress bar: ``unit``s (items of a map,
    bytes of a scatter or gather) done of ``total`` (``None``: not known ahead), and the
    engines still working on it.

    The hook the maps report into, from any thread (done-callbacks run on the I/O thread):
    ``start(eid)`` when a chunk is sent to engine ``eid``, ``done(eid, n)`` when that chunk
    ends with ``n`` units done (``0`` when it failed and is sent again elsewhere). The waiting
    thread reads ``snapshot()``. Nothing here raises, so a callback cannot fail on it.
    """

    def __init__(self, total: int | None, unit: str = "item") -> None:
        self.total = total
        self.unit = unit
        self._lock = threading.Lock()
        self._done = 0
        self._busy: collections.Counter[int] = collections.Counter()
        self._part: dict[int, int] = {}  # units an engine reported of its running block

    def start(self, eid: int) -> None:
        with self._lock:
            self._busy[eid] += 1

    def part(self, eid: int, n: int) -> None:
        """Engine ``eid`` reports ``n`` units of its (one) running block done so far."""
        with self._lock:
            if eid in self._busy:  # a late report, after its block ended, counts nothing
                self._part[eid] = max(n, self._part.get(eid, 0))

    def done(self, eid: int, n: int = 0) -> None:
        with self._lock:
            self._done += n
            self._part.pop(eid, None)
            if self._busy[eid] > 1:
                self._busy[eid] -= 1
            else:
                self._busy.pop(eid, None)

    def snapshot(self) -> tuple[int, int | None, list[int]]:
        """``(done, total, engines still busy)``."""
        with self._lock:
            return self._done + sum(self._part.values()), self.total, sorted(self._busy)

    def __repr__(self) -> str:
        done, total, busy = self.snapshot()
        return f"<Tally {done}/{total} {self.unit}s, busy {busy}>"


class PendingResult:
    """The result of a non-blocking call, to be collected later.

    ``get_result(default=None, block=True, timeout=None)`` waits (or, with ``block=False``,
    returns ``default`` when not ready); ``r`` is ``get_result()``; ``ready()`` polls.
    Errors from engines are raised as one ``CompositeError``.
    """

    #: The bar ``wait_interactive`` draws, made for a ``PendingResult``: a callable with the
    #: interface of ``render.ProgressBar`` (``bar(done, total, busy)``, ``bar.close(...)``).
    #: Installed by the client (``client.py``): results are data and waiting, and do not depend
    #: on rendering. ``None``: ``wait_interactive`` waits without a bar.
    interactive_bar: Callable[[PendingResult], Any] | None = None

    def __init__(
        self,
        futures: list[cf.Future[Any]],
        eids: list[int],
        method: str,
        finish: Callable[[list[Any]], Any],
        on_interrupt: Callable[[list[int]], None] | None = None,
        progress: Callable[[PendingResult], Any] | None = None,
        tally: Tally | None = None,
        on_abort: Callable[[list[cf.Future[Any]]], dict[int, list[cf.Future[Any]]]] | None = None,
    ) -> None:
        self.futures = futures
        self.tally = tally  # what its progress bar counts (default: engines done)
        self.eids = eids
        self.method = method
        self._finish = finish
        self._on_interrupt = on_interrupt
        self._on_abort = on_abort
        self._progress = progress
        self._value: Any = _UNSET
        self._error: BaseException | None = None
        self._interrupted_by = 0  # id() of the KeyboardInterrupt whose engines were interrupted

    def __repr__(self) -> str:
        state = "ready" if self.ready() else "pending"
        return f"<PendingResult {self.method} on engines {self.eids}: {state}>"

    def ready(self) -> bool:
        """True once every engine has answered."""
        return all(f.done() for f in self.futures)

    def wait_for_send(self, timeout: float | None = None) -> bool:
        """Wait until the objects this call sends (push, scatter, apply/map arguments) are no
        longer read: zmq has the message and has released every zero-copy buffer. True when so,
        False if ``timeout`` passed first. Only needed with the client's ``return_before_send``
        (otherwise non-blocking calls send copies and blocking ones return after the send)."""
        return wait_sent(self.futures, timeout) == []

    @property
    def sent(self) -> bool:
        """True once nothing this call sends is read from your objects any more."""
        return wait_sent(self.futures, 0) == []

    def unfinished(self) -> list[int]:
        """The engines whose part of this call has not finished yet, in target order."""
        return [e for e, f in zip(self.eids, self.futures, strict=True) if not f.done()]

    def progress(self) -> tuple[int, int | None, list[int]]:
        """``(done, total, engines still busy)`` in the unit of ``progress_unit``: items of a
        map, bytes of a scatter or gather, else engines."""
        if self.tally is not None:
            return self.tally.snapshot()
        waiting = [e for e, f in zip(self.eids, self.futures, strict=False) if not f.done()]
        return len(self.futures) - len(waiting), len(self.futures), waiting

    @property
    def progress_unit(self) -> str:
        return self.tally.unit if self.tally is not None else "engine"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until ready or ``timeout`` seconds pass; Ctrl-C interrupts the engines and
        re-raises."""
        timeout = check_timeout(timeout)
        # one wait, one deadline: the progress bar is drawn by the same wait (issue 11.3)
        progress = self._progress
        return self._wait(timeout, (lambda: progress(self)) if progress is not None else None)

    def wait_interactive(self, timeout: float | None = None) -> bool:
        """``wait`` with its progress shown at once (as ipyparallel's ``wait_interactive``):
        items (or bytes) done, the rate and the engines still busy; an HTML bar updated in place
        in a notebook, a tqdm bar on stderr in a terminal, cleared at the end. True when ready,
        False if ``timeout`` passed first; Ctrl-C interrupts the engines and re-raises."""
        timeout = check_timeout(timeout)
        make = PendingResult.interactive_bar
        return self._wait(timeout, (lambda: make(self)) if make is not None else None)

    def _wait(self, timeout: float | None, make_bar: Callable[[], Any] | None) -> bool:
        """The wait of ``wait``/``wait_interactive``, with the bar ``make_bar`` makes (none when
        ready at once); a Ctrl-C from its first step on interrupts the engines (``interrupted``)."""
        bar: Any = None

        def draw(_done: int, _total: int) -> None:
            bar(*self.progress())

        try:
            if make_bar is not None and not self.ready():
                bar = make_bar()
            return stdin.wait(
                self.futures, timeout, progress=draw if bar is not None else None
            )  # answers engines' input() meanwhile
        except KeyboardInterrupt as exc:
            self.interrupted(exc)
            raise
        finally:
            if bar is not None:
                bar.close(*self.progress())

    def interrupted(self, exc: KeyboardInterrupt) -> None:
        """Ctrl-C (``exc``) during this call: interrupt the engines still running it, once for
        that Ctrl-C (the wait, then the blocking call it was in, both come here)."""
        if self._interrupted_by == id(exc):
            return
        self._interrupted_by = id(exc)
        running = self.unfinished()
        if self._on_interrupt is not None and running:
            self._on_interrupt(running)

    def get_result(
        self, default: Any = None, block: bool = True, timeout: float | None = None
    ) -> Any:
        """The combined result; raises ``CompositeError`` if any engine failed."""
        timeout = check_timeout(timeout)
        if self._value is _UNSET and self._error is None:
            if not self.ready():
                if not block:
                    return default
                if not self.wait(timeout):
                    left = self.unfinished()
                    raise TimeoutError(
                        f"{self.method} not finished after {timeout:g} s on engines {left}; "
                        "the result can still be collected later"
                    )
            self._collect()
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def r(self) -> Any:
        return self.get_result()

    def __await__(self) -> Any:
        """``await pr`` in a coroutine: the result, without blocking the caller's event loop
        (``aio.py``); cancelling the awaiting task leaves the call running and collectable."""
        from .aio import wait_async

        return wait_async(self).__await__()

    # what each engine printed or displayed while running this call (execute, apply, map, ...),
    # one entry per engine in ``eids`` order; empty for an engine not done yet
    @property
    def stdout(self) -> list[str]:
        """Per engine, the text the call printed to stdout."""
        return [_output(f, "stdout", "") for f in self.futures]

    @property
    def stderr(self) -> list[str]:
        """Per engine, the text the call printed to stderr (warnings included)."""
        return [_output(f, "stderr", "") for f in self.futures]

    @property
    def outputs(self) -> list[list[dict[str, Any]]]:
        """Per engine, the rich outputs (``display_data``, ...) as Jupyter message contents."""
        return [_output(f, "outputs", []) for f in self.futures]

    @property
    def late(self) -> list[dict[str, Any]]:
        """Per engine, what an execute's engine printed or displayed after it had finished (a
        thread the code started): ``{"stdout", "stderr", "outputs", "dropped",
        "dropped_chars"}``, filled in as it arrives (``record["late"]``); empty for other calls
        and engines not done yet."""
        return [_output(f, "late", {}) for f in self.futures]

    # ------------------------------------------------------------------ metadata (issue 16.9)
    # times as this client saw them: submitted (the call), started (the engine said busy for
    # it), completed (its answer arrived); datetimes, None when not known (yet)
    @property
    def submitted(self) -> list[datetime | None]:
        """Per engine, when the call was submitted."""
        return [_when(f, "submitted") for f in self.futures]

    @property
    def started(self) -> list[datetime | None]:
        """Per engine, when the engine began it (None: not yet, or it never said: a comm
        operation that ran while an async cell was running). A data operation on the fast
        socket has no busy status: its reply says how long ago it began (on this client's clock,
        whatever the engine host's clock says), so it is known once the operation is done."""
        return [_when(f, "started") for f in self.futures]

    @property
    def completed(self) -> list[datetime | None]:
        """Per engine, when its answer (result or error) arrived."""
        return [_when(f, "completed") for f in self.futures]

    @property
    def elapsed(self) -> float:
        """Seconds from the first submission until now, or until the last answer once ready."""
        first = min((t for f in self.futures if (t := _mono(f, "submitted"))), default=None)
        if first is None:
            return 0.0
        ends: list[float | None] = [_mono(f, "completed") for f in self.futures]
        done = [t for t in ends if t is not None]
        end = max(done) if self.ready() and len(done) == len(ends) else time.monotonic()
        return max(float(end - first), 0.0)

    @property
    def wall_time(self) -> float | None:
        """Seconds from the first submission to the last answer; None until ready."""
        return self.elapsed if self.ready() else None

    @property
    def serial_time(self) -> float | None:
        """The sum over engines of the seconds each spent on it (from when it started, or was
        submitted if the engine never said, to its answer): the time one engine would have
        needed. None until ready."""
        if not self.ready():
            return None
        total = 0.0
        for f in self.futures:
            end = _mono(f, "completed")
            begin = _mono(f, "started") or _mono(f, "submitted")
            if end is not None and begin is not None:
                total += max(end - begin, 0.0)
        return total

    @property
    def metadata(self) -> list[dict[str, Any]]:
        """Per engine: ``engine_id``, ``status`` ('pending', 'ok', 'error', 'aborted'),
        ``submitted``/``started``/``completed``, ``stdout``/``stderr``/``outputs``, ``error``."""
        out = []
        for eid, f in zip(self.eids, self.futures, strict=True):
            exc = f.exception() if f.done() and not f.cancelled() else None
            status = "pending" if not f.done() else ("ok" if exc is None else "error")
            if isinstance(exc, RemoteError) and exc.ename == "Aborted":
                status = "aborted"
            out.append(
                {
                    "engine_id": eid,
                    "status": status,
                    "submitted": _when(f, "submitted"),
                    "started": _when(f, "started"),
                    "completed": _when(f, "completed"),
                    "stdout": _output(f, "stdout", ""),
                    "stderr": _output(f, "stderr", ""),
                    "outputs": _output(f, "outputs", []),
                    "error": exc,
                }
            )
        return out

    def display_outputs(self, groupby: str = "engine") -> None:
        """Show what the engines printed and displayed for this call, labelled
        ``[stdout:N]``, ``[stderr:N]``, ``[output:N]``: ``groupby='engine'`` engine after
        engine, ``'type'`` every engine's stdout, then stderr, then rich outputs."""
        if groupby not in ("engine", "type"):
            raise ValueError(f"groupby must be 'engine' or 'type', not {groupby!r}")
        rows = self.metadata
        kinds = ("stdout", "stderr", "outputs")
        order = (
            [(r, k) for r in rows for k in kinds]
            if groupby == "engine"
            else [(r, k) for k in kinds for r in rows]
        )
        for row, kind in order:
            _show(row["engine_id"], kind, row[kind])

    def abort(self) -> None:
        """Skip this call on the engines that have not started it yet (their part then fails
        with ``RemoteError('Aborted')``). It never stops running code: if an engine runs it
        already, ``EngineError`` says so and names ``mec.interrupt``; nothing is aborted then
        unless the engine only began it after this check (it is then left running, and named)."""
        if self._on_abort is None:
            raise EngineError(
                f"a {self.method} cannot be aborted; stop it with Ctrl-C or mec.interrupt()"
            )
        pending = [(e, f) for e, f in zip(self.eids, self.futures, strict=True) if not f.done()]
        running = [e for e, f in pending if getattr(f, "started", None) is not None]
        if running:
            raise EngineError(
                f"abort() skips only requests still queued; this {self.method} is already "
                f"running on engines {running}: stop it with mec.interrupt({running})",
                running[0],
                self.method,
            )
        if not pending:
            return
        refused = self._on_abort([f for _, f in pending])
        if refused:
            eids = sorted(refused)
            raise EngineError(
                f"this {self.method} was not aborted on engines {eids}: it had started there "
                f"(stop it with mec.interrupt({eids})), or the engine cannot skip requests (not "
                "a Python engine with ipy_multiengine, or dead); elsewhere it was aborted",
                eids[0],
                self.method,
            )

    def _collect(self) -> None:
        results: list[Any] = []
        errors: list[EngineFailure] = []
        for eid, fut in zip(self.eids, self.futures, strict=True):
            exc = fut.exception()
            if exc is None:
                results.append(fut.result())
                continue
            if not isinstance(exc, (RemoteError, EngineError)):
                # an error of our own I/O code: named for the engine, and kept (its traceback)
                text = f"engine {eid}: {type(exc).__name__}: {exc}"
                wrapped = EngineError(text, eid, self.method)
                wrapped.__cause__ = exc
                exc = wrapped
            if exc.engine_id is None:
                exc = exc.for_engine(eid)
            errors.append(exc)
            results.append(getattr(exc, "result", None) if self.method == "execute" else None)
        if errors:
            self._error = CompositeError(self.method, errors, [_partial(r) for r in results])
            return
        try:
            self._value = self._finish(results)
        except BaseException as exc:  # e.g. a value that cannot be unpickled here
            self._error = exc
            return
        _release_frames(results)


def _mono(fut: cf.Future[Any], name: str) -> float | None:
    """The monotonic time ``name`` of ``fut`` (a controller ``RequestFuture``), for durations."""
    return getattr(fut, "mono", {}).get(name)


def _when(fut: cf.Future[Any], name: str) -> datetime | None:
    stamp = getattr(fut, name, None)
    return None if stamp is None else datetime.fromtimestamp(stamp)


def _show(eid: int, kind: str, value: Any) -> None:
    """One engine's stdout, stderr or rich outputs, labelled (``display_outputs``)."""
    import sys

    if kind in ("stdout", "stderr"):
        if value:
            stream = sys.stdout if kind == "stdout" else sys.stderr
            print(f"[{kind}:{eid}] {value}", end="" if value.endswith("\n") else "\n", file=stream)
        return
    for out in value:
        if out.get("output_type") in ("display_data", "execute_result", "update_display_data"):
            from IPython.display import display

            print(f"[output:{eid}]")
            display(  # type: ignore[no-untyped-call]
                out.get("data") or {}, metadata=out.get("metadata") or {}, raw=True
            )


def _release_frames(replies: list[Any]) -> None:
    """Drop the raw reply frames once the value is built: values rebuilt zero-copy keep their
    own buffers alive, and e.g. ``gather``'s concatenated parts are freed at once."""
    from .controller import CommReply

    for reply in replies:
        if isinstance(reply, CommReply):
            reply.frames = []


def _output(fut: cf.Future[Any], name: str, empty: Any) -> Any:
    """``name`` (stdout/stderr/outputs) of a finished engine's reply, record or error record."""
    if not fut.done() or fut.cancelled():
        return empty
    exc = fut.exception()
    value = getattr(exc, "result", None) if exc is not None else fut.result()
    if isinstance(value, dict):
        return value.get(name) or empty
    return getattr(value, name, empty) or empty


def _partial(result: Any) -> Any:
    """A successful engine's value next to failed ones: comm replies are unpickled if possible."""
    from .controller import CommReply
    from .serialize import loads

    if isinstance(result, CommReply):
        if not result.frames:
            return None
        try:
            return loads(result.frames)
        except Exception:
            return result
    return result


def wait_sent(futures: list[cf.Future[Any]], timeout: float | None) -> list[cf.Future[Any]]:
    """Wait until every request's outgoing buffers are out of zmq's hands (or the request
    failed: nothing more will be sent for it); the futures still sending when ``timeout``
    passes. Ctrl-C interrupts the wait (waits run in short slices)."""
    import time

    import zmq

    from ._loop import WAIT_SLICE

    deadline = None if timeout is None else time.monotonic() + timeout
    # RequestFutures (controller) carry ``sent``: a future of the zmq tracker
    pending: list[Any] = [f for f in futures if getattr(f, "sent", None) is not None]
    while pending:
        still = []
        for fut in pending:
            sent = fut.sent
            if sent.done():
                tracker = sent.result()
                if tracker is None or tracker.done:
                    continue
            if fut.done() and fut.exception() is not None:
                continue  # the request failed (engine dead, client closed): nothing reads on
            still.append(fut)
        pending = still
        if not pending:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        step = WAIT_SLICE if left is None else min(WAIT_SLICE, left)
        fut = pending[0]
        sent = fut.sent
        if not sent.done():
            cf.wait([sent, fut], step, return_when=cf.FIRST_COMPLETED)
            continue
        with contextlib.suppress(zmq.NotDone):
            sent.result().wait(step)
    return pending
