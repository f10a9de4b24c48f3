"""Helpers for the fault-injection tests: small private clusters, polling with deadlines,
engine-side code that signals when it has started, and a Ctrl-C from a timer thread."""

from __future__ import annotations

import _thread
import contextlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ipy_multiengine import Cluster
from ipy_multiengine.errors import CompositeError
from ipy_multiengine.errors import TimeoutError as EngineTimeout

_profiles = itertools.count()


def user_environ(**extra: str) -> dict[str, str]:
    """This process's environment as a user's shell hands it to a kernel or a Jupyter server:
    without pytest's variables (``PYTEST_CURRENT_TEST`` names the test running *here*; under it
    ipykernel leaves fd 1 and 2 uncaptured, so a kernel started with it does not treat the
    output of C code and subprocesses as a user's does), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(extra)
    return env


#: seconds a fixture waits for the engines to run its ``%reset -f`` (they may be busy with
#: what an earlier test left running: then the fixture fails saying so, not the test timeout)
RESET_WAIT = 45.0


def reset_engines(client: Any, timeout: float = RESET_WAIT) -> None:
    """Empty the engines' namespaces (``%reset -f``) within ``timeout`` s, or fail naming what
    was waited for and what each engine was running and had queued (``client.status()``)."""
    import pytest

    from ipy_multiengine.errors import TimeoutError as EngineTimeout

    try:
        client.execute("%reset -f", block=True, timeout=timeout)
    except EngineTimeout:
        pytest.fail(
            f"the engines did not run '%reset -f' within {timeout:g} s: an earlier test left "
            f"them busy (or a reply was lost). Engines now:\n{client.status()!r}",
            pytrace=False,
        )


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


#: id of a live small_cluster -> every engine pid it has had (checked gone at its exit)
_engine_pids: dict[int, set[int]] = {}


def remember(cluster: Cluster) -> None:
    """Note the current engine pids of ``small_cluster`` ``cluster`` (tests call it after
    restarts)."""
    for km in list(cluster.managers.values()):
        pid = getattr(km.provisioner, "pid", None)
        if pid:
            _engine_pids[id(cluster)].add(pid)


@contextlib.contextmanager
def small_cluster(n: int = 2, **kw: Any) -> Iterator[tuple[Cluster, Any]]:
    """A private cluster for one test; on exit it is stopped and every engine pid it ever had
    (restarts included) must be gone."""
    kw.setdefault("shutdown_wait", 1.0)
    cluster = Cluster(n=n, profile=f"faults{os.getpid()}-{next(_profiles)}", **kw)
    mec = cluster.start()
    pids = _engine_pids[id(cluster)] = set()
    remember(cluster)
    try:
        yield cluster, mec
    finally:
        remember(cluster)
        del _engine_pids[id(cluster)]
        t0 = time.monotonic()
        cluster.stop()
        took = time.monotonic() - t0
        wait_for(lambda: all(gone(p) for p in pids), 10, f"engine pids {sorted(pids)} to exit")
        assert took < 3 * cluster.shutdown_wait + 10, f"stop() took {took:.1f} s"


def engine_pid(cluster: Cluster, eid: int) -> int:
    return cluster.managers[eid].provisioner.pid


def marker(tmp_path: Path, name: str, pid: int) -> Path:
    """The file engine ``pid`` touches when the hanging code ``name`` has started on it."""
    return tmp_path / f"{name}-{pid}.started"


def _touch_expr(tmp_path: Path, name: str) -> str:
    return (
        f"__import__('pathlib').Path({str(tmp_path)!r} + '/{name}-%d.started' % "
        "__import__('os').getpid()).touch()"
    )


def held_code(go: Path, seconds: float = 30) -> str:
    """Engine code that runs until the file ``go`` exists (at most ``seconds``): a call whose
    engines must still be busy when the test looks, however slow the box."""
    return (
        f"import os, time\n_held_until = time.monotonic() + {seconds}\n"
        f"while not os.path.exists({str(go)!r}) and time.monotonic() < _held_until:\n"
        "    time.sleep(0.01)\n"
    )


def hang_code(tmp_path: Path, name: str, seconds: float = 30, before: str = "") -> str:
    """Engine code that prints, touches its marker and then sleeps."""
    return (
        f"{before}import time; print('before', flush=True); {_touch_expr(tmp_path, name)}; "
        f"time.sleep({seconds})"
    )


def slow_pickle_code(tmp_path: Path, name: str, var: str = "slow") -> str:
    """Engine code defining ``var``, whose pickling (a pull) touches the marker and sleeps."""
    return (
        f"class Slow:\n def __reduce__(self):\n  {_touch_expr(tmp_path, name)}\n"
        f"  __import__('time').sleep(30)\n{var} = Slow()"
    )


def make_hanger(tmp_path: Path, name: str, seconds: float = 30) -> Callable[..., Any]:
    """A closure (pickled by value) that touches the marker then sleeps: for apply/map."""
    expr = _touch_expr(tmp_path, name)

    def hang(*args: Any) -> Any:
        eval(expr)
        __import__("time").sleep(seconds)
        return args

    return hang


class SleepOnLoad:
    """Unpickling this on an engine touches the marker and sleeps (a push that hangs in flight)."""

    def __init__(self, tmp_path: Path, name: str, seconds: float = 30) -> None:
        self.expr = f"({_touch_expr(tmp_path, name)}, __import__('time').sleep({seconds}))"

    def __reduce__(self) -> Any:
        return (eval, (self.expr,))


class CtrlC:
    """Simulate Ctrl-C in the main thread (``_thread.interrupt_main``) once ``ready()`` is true."""

    def __init__(self, ready: Callable[[], Any], timeout: float = 20) -> None:
        self.sent_at: float | None = None
        self._ready, self._timeout = ready, timeout
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self._timeout
        while not self._cancel.is_set() and time.monotonic() < deadline:
            if self._ready():
                self.sent_at = time.monotonic()
                _thread.interrupt_main(signal.SIGINT)
                return
            self._cancel.wait(0.01)

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join(5)


def settle(mec: Any) -> None:
    """Interrupt whatever still runs and wait (bounded) until every engine answers again."""
    from ipy_multiengine.errors import CompositeError, TimeoutError

    mec.interrupt()
    for _ in range(3):  # an interrupt may land between two queued requests: repeat
        try:
            mec.execute("pass", timeout=10)
            return
        except (CompositeError, TimeoutError):
            mec.interrupt()
    mec.execute("pass", timeout=10)


# ---------------------------------------------------------------------- interrupt()
#: Seconds an interrupted call may take to end: far below the 30-60 s the sleeps it interrupts
#: last, so one left to run to its end fails, and far above the time it takes (0.1-1.2 s, plus
#: the 1 s INTERRUPT_ACK where the engine cannot answer), which a loaded box stretches (2 s
#: bounds failed with 2.29 s): it measures that the interrupt stopped the call, not speed.
INTERRUPT_DEADLINE = 10.0


def _ended_interrupted(pr: Any, what: str) -> None:
    """``pr`` fails within the deadline, every engine with a KeyboardInterrupt."""
    t0 = time.monotonic()
    with pytest.raises(CompositeError) as info:
        pr.get_result(timeout=INTERRUPT_DEADLINE)
    assert time.monotonic() - t0 < INTERRUPT_DEADLINE
    assert [e.ename for e in info.value.elist] == ["KeyboardInterrupt"] * len(pr.eids), what


def _settle(mec: Any, eids: list[int]) -> None:
    """After a failed round (old code): interrupt until the engines are free, so that the
    tests that follow do not wait for a 30 s sleep."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        mec.interrupt(eids)
        try:
            mec.execute("pass", targets=eids, timeout=1)
            return
        except (EngineTimeout, CompositeError):
            continue


def check_interrupt_right_after_send(mec: Any, eids: list[int], rounds: int = 4) -> None:
    """What was sent before ``interrupt()`` (running, or sent and not begun yet) ends with a
    KeyboardInterrupt; what is sent right after it is not interrupted; the engines stay usable.
    Each round interrupts at once after the send: on the old code the signal often came before
    the engine had begun the request (ignored there) and the 30 s sleep ran on."""

    def sleep_long() -> None:  # a local function: pickled by value, the engines run it
        __import__("time").sleep(30)

    try:
        for i in range(rounds):
            pr = mec.execute("import time; time.sleep(30)", targets=eids, block=False)
            mec.interrupt(eids)
            later = mec.execute(f"after_execute = {i}", targets=eids, block=False)
            _ended_interrupted(pr, f"execute, round {i}")
            assert [r["status"] for r in later.get_result(timeout=INTERRUPT_DEADLINE)] == [
                "ok"
            ] * len(eids)

            pr = mec.apply(sleep_long, targets=eids, block=False)
            mec.interrupt(eids)
            later = mec.apply(lambda v: v, i, targets=eids, block=False)
            _ended_interrupted(pr, f"apply, round {i}")
            assert later.get_result(timeout=INTERRUPT_DEADLINE) == [i] * len(eids)

            # an execute and a data operation queued behind it, both sent before the call
            first = mec.execute("import time; time.sleep(30)", targets=eids, block=False)
            behind = mec.apply(sleep_long, targets=eids, block=False)
            mec.interrupt(eids)
            later = mec.pull("after_execute", targets=eids, block=False)
            _ended_interrupted(first, f"execute before an apply, round {i}")
            _ended_interrupted(behind, f"apply behind an execute, round {i}")
            assert later.get_result(timeout=INTERRUPT_DEADLINE) == [i] * len(eids)
    except BaseException:
        _settle(mec, eids)
        raise
    assert mec.apply(lambda: 7, targets=eids) == [7] * len(eids)  # usable after


# ---------------------------------------------------------------------- death before reading
@contextlib.contextmanager
def unread_last_words(cluster: Cluster, mec: Any, eid: int, tmp_path: Path) -> Iterator[dict]:
    """Engine ``eid`` dies with its last output in the controller's IOPub socket, unread.

    Yields ``{"code": ...}``: a cell printing ``first``, then (once the go file exists)
    ``last words``, then sleeping. The engine's liveness probe is swapped (white-box: it runs
    on the I/O thread, so while it runs nothing reads a socket): once the controller has routed
    ``first`` (nothing else comes until the go file), it touches the go file, waits until the
    IOPub socket holds a message (the last words), kills the engine, waits for its exit, and
    returns the real probe's reason. ``arrived`` then says whether the last words got there."""
    go = tmp_path / f"go-{eid}"
    code = (
        "import os, time\nprint('first', flush=True)\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        "print('last words', flush=True)\ntime.sleep(60)\n"
    )
    state: dict[str, Any] = {"code": code}
    conn = mec.controller._conn(eid)
    real = conn.liveness

    def probe() -> str | None:
        # (a magic may hand the engine the cell without its final newline)
        req = next((r for r in conn.requests.values() if str(go) in r.code), None)
        if "arrived" in state or req is None or "first" not in "".join(req.stdout):
            return real()
        import zmq

        go.touch()
        sock = zmq.Socket.shadow(conn.sockets["iopub"].underlying)
        state["arrived"] = bool(sock.poll(30_000, zmq.POLLIN))
        proc = cluster.managers[eid].provisioner.process
        proc.kill()
        proc.wait(10)
        return real()

    conn.liveness = probe
    try:
        yield state
    finally:
        conn.liveness = real
