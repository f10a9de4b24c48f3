"""``mec.executor()``: a real ``concurrent.futures.Executor`` on real engines, exercised with
the standard library's own helpers (``wait``, ``as_completed``, ``Executor.map``)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import threading
import time

import cloudpickle
import pytest
from faultlib import wait_for

from ipy_multiengine.errors import EngineError, TargetsError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def mec(cluster):
    """The session's client, reset once for this module (these tests need no clean namespace
    per test: the per-test reset of conftest's ``mec`` would cost more than the tests)."""
    client = cluster.client
    client.block, client.targets = True, "all"
    client.execute("%reset -f", block=True)
    return client


# this module's helpers travel by value: the engines cannot import the tests
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def pid() -> int:
    import os

    return os.getpid()


def block_until(path: str, limit: float = 30.0) -> int:
    """Runs on an engine: poll for ``path`` (a deadline, no fixed sleep), then return the pid."""
    import os
    import time

    end = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)
    return os.getpid()


def touch(path: str) -> int:
    import os

    open(path, "w").close()
    return os.getpid()


@pytest.fixture
def pids(mec):
    return dict(zip(mec.get_ids(), mec.apply(pid), strict=True))


def test_submit_and_map_run_on_the_engines(mec, pids):
    with mec.executor() as ex:
        assert isinstance(ex, cf.Executor)
        fut = ex.submit(pow, 2, exp=10)
        assert isinstance(fut, cf.Future)
        assert fut.result(timeout=10) == 1024
        ran = {f.result() for f in [ex.submit(pid) for _ in range(8)]}
        assert ran <= set(pids.values()) and os.getpid() not in ran
        assert list(ex.map(lambda x, y: x * y, range(10), range(10))) == [i * i for i in range(10)]
        assert list(ex.map(abs, range(-7, 0), chunksize=3)) == list(range(7, 0, -1))
        assert list(ex.map(abs, [])) == []


def test_wait_and_as_completed(mec):
    with mec.executor() as ex:
        fs = [ex.submit(lambda i: i * 2, i) for i in range(12)]
        done, not_done = cf.wait(fs, timeout=20)
        assert not not_done and len(done) == 12
        fs2 = [ex.submit(lambda i: i + 1, i) for i in range(12)]
        assert sorted(f.result() for f in cf.as_completed(fs2, timeout=20)) == list(range(1, 13))
        first = cf.wait([ex.submit(lambda: 1)], return_when=cf.FIRST_COMPLETED, timeout=20)
        assert len(first.done) == 1


def test_cancel_of_a_queued_task_never_reaches_an_engine(mec, tmp_path):
    release, marker = str(tmp_path / "go"), str(tmp_path / "ran")
    ex = mec.executor(targets=[0, 1])
    busy = [ex.submit(block_until, release) for _ in range(2)]  # both engines busy
    queued = ex.submit(touch, marker)
    later = ex.submit(pid)
    assert not queued.running()
    assert queued.cancel() and queued.cancelled()
    open(release, "w").close()
    assert later.result(timeout=20) in mec.apply(pid, targets=[0, 1])
    cf.wait(busy, timeout=20)
    ex.shutdown()
    # it never ran: no engine made the file, and engines 0-1 run nothing of it either
    assert not os.path.exists(marker)
    with pytest.raises(cf.CancelledError):
        queued.result()
    assert mec.execute("x = 1", targets=[0, 1]) is not None  # still usable


def test_balanced_false_round_robins_or_pins(mec, pids):
    with mec.executor(balanced=False, targets=[1, 2, 3]) as ex:
        got = [f.result(timeout=20) for f in [ex.submit(pid) for _ in range(6)]]
    assert got == [pids[1], pids[2], pids[3]] * 2
    with mec.executor(balanced=False, targets=2) as ex:
        assert {f.result(timeout=20) for f in [ex.submit(pid) for _ in range(4)]} == {pids[2]}


def test_map_timeout_cancels_the_rest(mec, tmp_path):
    release = str(tmp_path / "go")
    ex = mec.executor(targets=[0])
    it = ex.map(block_until, [release] * 3, timeout=0.3)
    with pytest.raises(cf.TimeoutError):
        list(it)
    open(release, "w").close()
    ex.shutdown(wait=True)
    # the queued ones were cancelled, the running one finished (its count drops in a
    # done-callback, which shutdown(wait=True) waits for)
    assert "0 pending" in repr(ex)


def test_shutdown_waits_for_the_done_callbacks(mec, tmp_path):
    # concurrent.futures wakes a future's waiters before it runs its done-callbacks (here on
    # the executor's completion thread): shutdown(wait=True) returned while they still ran.
    # The standard library's pools join their threads; so does this one now.
    seen: list = []

    def callback(fut):
        time.sleep(0.5)  # a callback with some work to do: the window the old code left
        seen.append(fut.result())

    release = tmp_path / "go"
    ex = mec.executor(targets=[0, 1])
    # gated: a task done before add_done_callback has its callback run in this thread, and
    # the test would pass with the old code too
    for _ in range(2):
        ex.submit(block_until, str(release)).add_done_callback(callback)
    release.touch()
    ex.shutdown(wait=True)
    assert len(seen) == 2, "shutdown(wait=True) returned before the done-callbacks ran"


def test_shutdown_cancel_futures_and_submit_after(mec, tmp_path):
    release = str(tmp_path / "go")
    ex = mec.executor(targets=[3])
    running = ex.submit(block_until, release)
    queued = [ex.submit(pid) for _ in range(3)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pid)
    open(release, "w").close()
    assert running.result(timeout=20) > 0


def test_remote_exception_type_and_engines_usable(mec):
    with mec.executor() as ex:
        fut = ex.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError) as info:
            fut.result(timeout=20)
        assert "ZeroDivisionError" in str(info.value.__cause__)  # the RemoteError, traceback
        assert ex.submit(lambda: 5).result(timeout=20) == 5


def test_done_callbacks_run_off_the_io_thread_and_may_call_the_client(mec, tmp_path):
    seen = []
    called = threading.Event()

    def callback(fut):
        seen.append((threading.current_thread().name, mec.apply(lambda: 7, targets=0)))
        called.set()

    gate = str(tmp_path / "go")
    with mec.executor() as ex:
        # gated: a task done before add_done_callback has its callback run in this thread
        fut = ex.submit(block_until, gate)
        fut.add_done_callback(callback)
        open(gate, "w").close()
        assert called.wait(20)
    name, value = seen[0]
    assert name != "ipy_multiengine-io" and value == [7]
    assert name != threading.current_thread().name  # it ran on the executor's thread


def test_bad_input_is_refused_before_sending(mec):
    with pytest.raises(TargetsError):
        mec.executor(targets=[99])
    with pytest.raises(TypeError, match="balanced"):
        mec.executor(balanced="yes")
    with mec.executor() as ex:
        with pytest.raises(TypeError, match="callable"):
            ex.submit(42)
        with pytest.raises(TypeError, match="argument 0"):
            ex.submit(print, threading.Lock())
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(abs, [1], chunksize=0)
        assert ex.submit(abs, -3).result(timeout=20) == 3


def test_dead_engine_fails_pinned_tasks_not_others(tmp_path):
    from faultlib import small_cluster

    with small_cluster(2) as (_cluster, mec):
        p1 = mec.apply(pid, targets=1)[0]
        ex = mec.executor(balanced=False, targets=[0, 1])
        release = str(tmp_path / "go")
        a, b = ex.submit(block_until, release), ex.submit(block_until, release)
        queued_on_1 = [ex.submit(pid), ex.submit(pid)][1]
        os.kill(p1, 9)
        with pytest.raises(EngineError):
            b.result(timeout=20)
        with pytest.raises(EngineError):
            queued_on_1.result(timeout=20)
        open(release, "w").close()
        assert a.result(timeout=20) > 0
        assert ex.submit(pid).result(timeout=20) == mec.apply(pid, targets=0)[0]
        # the client closes with a task running and others queued: every future resolves
        blocker = ex.submit(block_until, str(tmp_path / "never"))
        queued = [ex.submit(pid) for _ in range(3)]
        mec.close()
        _, not_done = cf.wait([blocker, *queued], timeout=20)
        assert not not_done
        assert all(isinstance(f.exception(), EngineError) for f in queued)
        ex.shutdown()  # returns: nothing left pending


def test_balanced_tasks_skip_an_engine_that_died_idle():
    # an idle engine that died must not be handed the next queued tasks: other engines are free
    from faultlib import small_cluster, wait_for

    with small_cluster(2) as (_cluster, mec):
        p0, p1 = mec.apply(pid, targets=[0, 1])
        ex = mec.executor(targets=[0, 1])
        assert ex.submit(pid).result(timeout=20) in (p0, p1)
        os.kill(p1, 9)
        wait_for(lambda: mec.controller.dead(1), 20, "engine 1 seen dead")
        assert [f.result(timeout=20) for f in [ex.submit(pid) for _ in range(4)]] == [p0] * 4
        ex.shutdown()


class Payload:
    """A result the test can watch being freed (a weakref)."""

    def __init__(self, n: int) -> None:
        self.data = bytes(n)


def payload(n: int) -> Payload:
    return Payload(n)


def test_a_dropped_result_is_freed_while_other_tasks_run(mec, tmp_path):
    import gc
    import weakref

    release = str(tmp_path / "go")
    with mec.executor(targets=[0, 1]) as ex:
        running = ex.submit(block_until, release)  # keeps the executor's thread busy
        fut = ex.submit(payload, 1000)
        ref = weakref.ref(fut.result(timeout=20))
        del fut
        # result() returns as soon as the value is set; the completion thread drops its own
        # references a moment later (after the done-callbacks): a bounded poll, not at once
        wait_for(lambda: gc.collect() is not None and ref() is None, 10, "the result freed")
        open(release, "w").close()
        assert running.result(timeout=20) > 0


def test_a_dropped_result_is_freed_without_a_garbage_collection(mec):
    """A task's request (kept to interrupt it) held the task through its done-callback: a cycle,
    so a dropped result stayed until the next garbage collection (50 MB measured)."""
    import gc
    import weakref

    with mec.executor(targets=[0]) as ex:
        ex.submit(abs, 1).result(timeout=20)
        gc.disable()
        try:
            fut = ex.submit(payload, 1000)
            ref = weakref.ref(fut.result(timeout=20))
            del fut
            wait_for(lambda: ref() is None, 10, "the result freed with no collection")
        finally:
            gc.enable()


def test_futures_are_resolved_with_no_executor_lock_held(mec, tmp_path):
    # joblib's shape: its callback takes its own lock L, while its main thread holds L and
    # calls the executor. A future cancelled (or failed) with the executor's lock held would
    # deadlock the two; the callback's bounded acquire makes the deadlock show as a failure.
    release = str(tmp_path / "go")
    user_lock = threading.Lock()
    in_callback, got = threading.Event(), []
    ex = mec.executor(targets=[0])
    running = ex.submit(block_until, release)
    queued = ex.submit(pid)

    def callback(fut):
        in_callback.set()
        got.append(user_lock.acquire(timeout=5))
        if got[-1]:
            user_lock.release()

    queued.add_done_callback(callback)
    with user_lock:
        canceller = threading.Thread(
            target=ex.shutdown, kwargs={"wait": False, "cancel_futures": True}
        )
        canceller.start()
        assert in_callback.wait(20)
        ex.shutdown(wait=False)  # takes the executor's lock while this thread holds L
    canceller.join(20)
    assert queued.cancelled() and got == [True]
    open(release, "w").close()
    assert running.result(timeout=20) > 0


def test_shutdown_waiting_from_a_done_callback_does_not_hang(mec, tmp_path):
    # a done-callback runs on the executor's one completion thread; shutdown(wait=True) there
    # waited for tasks only that thread can complete: every later task hung for good. Like
    # the standard library's pools it now refuses (RuntimeError, logged by the Future), and
    # the executor is shut down and completes the rest.
    # ``first`` waits for a file too: done before add_done_callback, its callback would run
    # in this thread (a plain wait, no refusal to test: failed once in CI)
    gate, release = str(tmp_path / "first"), str(tmp_path / "go")
    ex = mec.executor(targets=[0, 1], balanced=False)
    first = ex.submit(block_until, gate)
    slow = ex.submit(block_until, release)
    errors: list = []
    threads: list = []
    called = threading.Event()

    def callback(fut):
        threads.append(threading.current_thread())
        try:
            ex.shutdown(wait=True)
        except RuntimeError as exc:
            errors.append(exc)
        finally:
            called.set()

    first.add_done_callback(callback)
    open(gate, "w").close()
    assert first.result(timeout=20) > 0
    assert called.wait(20), "the done-callback never ran"
    assert threads[0] is not threading.current_thread()
    open(release, "w").close()
    assert slow.result(timeout=20) > 0, "the completion thread waited for itself"
    assert errors and "completion thread" in str(errors[0])
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pid)


def test_shutdown_waits_for_the_callbacks_of_an_ending_completion_thread(tmp_path):
    """A completion thread that found nothing left in flight ends, and runs the done-callbacks
    of the tasks it failed on the way (a pinned task queued on an engine that died) after it
    has let a new completion thread start: ``shutdown(wait=True)`` joined only the newest, so
    it returned while the old one still ran a callback."""
    from faultlib import small_cluster

    with small_cluster(2) as (_cluster, mec):
        p1 = mec.apply(pid, targets=1)[0]
        ex = mec.executor(balanced=False, targets=[0, 1])
        entered, release, returned = threading.Event(), threading.Event(), threading.Event()
        order: list[str] = []

        def slow_callback(fut):
            entered.set()
            release.wait(30)
            order.append("callback")

        assert ex.submit(pid).result(timeout=20) > 0  # engine 0
        running = ex.submit(block_until, str(tmp_path / "never"))  # engine 1
        assert ex.submit(pid).result(timeout=20) > 0  # engine 0, idle again
        orphan = ex.submit(pid)  # engine 1, queued behind the running one
        orphan.add_done_callback(slow_callback)
        os.kill(p1, 9)
        assert entered.wait(20), "the orphaned task's callback did not run"
        assert isinstance(orphan.exception(), EngineError)
        assert isinstance(running.exception(timeout=20), EngineError)
        late = ex.submit(pid)  # engine 0: a new completion thread
        assert late.result(timeout=20) > 0

        def shut():
            ex.shutdown(wait=True)
            order.append("shutdown")
            returned.set()

        waiter = threading.Thread(target=shut, daemon=True)
        waiter.start()
        try:
            assert not returned.wait(2), "shutdown(wait=True) returned while a callback ran"
        finally:
            release.set()
            waiter.join(20)
        assert order == ["callback", "shutdown"]


def inner_div(i: int) -> float:
    return 1 / i


def outer_div(i: int) -> float:
    return inner_div(i)


class Unrebuildable(Exception):
    """Cannot be rebuilt here from its pickle (two arguments, one in ``args``)."""

    def __init__(self, a, b):
        super().__init__(a)


def raise_unrebuildable() -> None:
    raise Unrebuildable("odd", 2)


def test_a_printed_task_error_shows_where_the_engine_raised(mec):
    """Outside IPython the exception of a failed task printed as ``RemoteError: ZeroDivisionError:
    division by zero`` and ``ZeroDivisionError: division by zero``: not a line of the engine's
    traceback (which function, which line), as a process pool's ``_RemoteTraceback`` shows."""
    import traceback

    from ipy_multiengine.errors import RemoteError

    with mec.executor(targets=0) as ex:
        rebuilt = ex.submit(outer_div, 0).exception(timeout=20)
        kept = ex.submit(raise_unrebuildable).exception(timeout=20)
    assert type(rebuilt) is ZeroDivisionError and isinstance(rebuilt.__cause__, RemoteError)
    assert type(kept).__name__ != "Unrebuildable" and isinstance(kept, RemoteError)
    for exc, frames in ((rebuilt, ("outer_div", "inner_div")), (kept, ("raise_unrebuildable",))):
        text = "".join(traceback.format_exception(exc))
        assert all(name in text for name in frames), text
        assert "\x1b[" not in text, "ANSI colours in a plain traceback"
    assert kept.engine_id == 0 and kept.ename == "Unrebuildable"  # still the RemoteError's data


def test_a_cancelled_task_frees_its_arguments_at_once(mec, tmp_path):
    """A queued task's arguments are serialised (copied) at submit; cancelling it kept that copy
    until the engine's queue reached it (behind a long task: for as long as that ran)."""
    import gc
    import tracemalloc

    numpy = pytest.importorskip("numpy")
    release = str(tmp_path / "go")
    ex = mec.executor(targets=[0])
    running = ex.submit(block_until, release)
    size = 40_000_000
    tracemalloc.start()
    try:
        arg = numpy.ones(size // 8)
        queued = ex.submit(numpy.sum, arg)
        del arg
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        assert held > size, "the submitted copy is not traced"  # (the check below means it)
        assert queued.cancel()
        del queued
        gc.collect()
        left = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        open(release, "w").close()
    assert held - left > 0.9 * size, f"cancelled, the copy is still held: {left / 1e6:.0f} MB"
    assert running.result(timeout=20) > 0
    ex.shutdown()


def test_round_robin_skips_an_engine_that_died_idle():
    # an idle engine that died is known dead to the controller: a round-robin submit still
    # chose it, and the task failed "no engine left to run this task" with the other engine free
    from faultlib import small_cluster

    with small_cluster(2) as (_cluster, mec):
        p0, p1 = mec.apply(pid, targets=[0, 1])
        ex = mec.executor(balanced=False, targets=[0, 1])
        assert ex.submit(pid).result(timeout=20) == p0  # the next round-robin pick: engine 1
        os.kill(p1, 9)
        wait_for(lambda: mec.controller.dead(1), 20, "engine 1 seen dead")
        assert [f.result(timeout=20) for f in [ex.submit(pid) for _ in range(3)]] == [p0] * 3
        ex.shutdown()


def start_and_wait(started: str, go: str, limit: float = 60.0) -> str:
    """Runs on an engine: note that it began (``started``), then poll for ``go``."""
    import os
    import time

    open(started, "w").close()
    end = time.monotonic() + limit
    while not os.path.exists(go) and time.monotonic() < end:
        time.sleep(0.01)
    return go


def test_interrupt_stops_only_this_executors_running_tasks(cluster, mec, tmp_path):
    """``shutdown(cancel_futures=True)`` left the running tasks running on their engines (what
    waits behind them waited until they ended). ``interrupt=True`` interrupts exactly them: on
    engine 1 ours runs and another executor's task waits behind it; on engine 0 another
    client's task runs and ours waits behind it. Ours end at once (CancelledError; the one not
    begun never runs), the others are not touched."""
    from ipy_multiengine import MultiEngineClient

    go, never = str(tmp_path / "go"), str(tmp_path / "never")
    other = MultiEngineClient(cluster.cluster_file)
    theirs_0, theirs_1 = other.executor(targets=[0]), mec.executor(targets=[1])
    ours = mec.executor(targets=[0, 1], balanced=False)  # round robin: engine 0, 1, 0
    try:
        b0 = theirs_0.submit(start_and_wait, str(tmp_path / "b0"), go)
        wait_for((tmp_path / "b0").exists, 30, "the other task running on engine 0")
        a0 = ours.submit(start_and_wait, str(tmp_path / "a0"), never)  # behind b0
        a1 = ours.submit(start_and_wait, str(tmp_path / "a1"), never)
        a_queued = ours.submit(start_and_wait, str(tmp_path / "a2"), never)  # in the executor
        wait_for((tmp_path / "a1").exists, 30, "our task running on engine 1")
        b1 = theirs_1.submit(start_and_wait, str(tmp_path / "b1"), go)  # behind a1
        assert ours.interrupt(timeout=10) == []  # every engine acknowledged
        with pytest.raises(cf.CancelledError, match="interrupted on engine 1"):
            a1.result(timeout=10)  # (before the fix: still running, until `never` timed out)
        assert not a_queued.done()  # pinned to engine 0: left queued by interrupt() alone
        ours.shutdown(wait=False, cancel_futures=True, interrupt=True)
        assert a_queued.cancelled()
        wait_for((tmp_path / "b1").exists, 30, "the other task behind ours on engine 1")
        assert not b0.done() and not b1.done()  # theirs were not interrupted
        open(go, "w").close()
        assert b0.result(timeout=30) == go and b1.result(timeout=30) == go
        with pytest.raises(cf.CancelledError):
            a0.result(timeout=30)  # began after b0 ended: interrupted before it ran
        assert not (tmp_path / "a0").exists() and not (tmp_path / "a2").exists()
        assert mec.apply(pid, targets=[0, 1]) is not None  # the engines are usable
    finally:
        open(go, "w").close()
        open(never, "w").close()
        for ex in (ours, theirs_0, theirs_1):
            ex.shutdown(wait=True)
        other.close()


def test_interrupt_refuses_a_nan_timeout_before_interrupting(mec, tmp_path):
    """``interrupt(timeout=nan)`` raised ``ValueError`` only after it had asked the engines:
    the caller was told the call failed, and the task was interrupted all the same. It is
    refused first now, with nothing interrupted."""
    go = str(tmp_path / "go")
    ex = mec.executor(targets=[0])
    try:
        task = ex.submit(start_and_wait, str(tmp_path / "t"), go)
        wait_for((tmp_path / "t").exists, 30, "the task running on engine 0")
        with pytest.raises(ValueError, match="nan"):
            ex.interrupt(timeout=float("nan"))
        open(go, "w").close()
        assert task.result(timeout=30) == go  # (before: CancelledError)
    finally:
        open(go, "w").close()
        ex.shutdown(wait=True)
