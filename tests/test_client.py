"""MultiEngineClient against real engines: the tutorial's 'Running Python commands' and
'Parallel exceptions' sections, targets/block handling and argument checks."""

from __future__ import annotations

import pickle
import time

import pytest
from faultlib import check_interrupt_right_after_send, held_code, small_cluster

from ipy_multiengine import client
from ipy_multiengine.errors import CompositeError, EngineError, RemoteError, TimeoutError
from ipy_multiengine.results import PendingResult, ResultList

pytestmark = pytest.mark.timeout(60)


def test_get_ids(mec):
    assert mec.get_ids() == [0, 1, 2, 3]


def test_tutorial_abc_example(mec):
    first = mec.execute("a=5")
    assert isinstance(first, ResultList)
    n = first[0]["number"]
    assert [r["id"] for r in first] == [0, 1, 2, 3]
    mec.execute("b=10")
    r = mec.execute("c=a+b", targets=[0, 2])
    assert [x["id"] for x in r] == [0, 2]
    mec.execute("c=a-b", targets=[1, 3])
    out = mec.execute("print(c)")
    assert [x["stdout"] for x in out] == ["15\n", "-5\n", "15\n", "-5\n"]
    n1 = first[1]["number"]  # engines' counts differ when earlier tests targeted some of them
    assert out[0]["number"] == n + 3 and out[1]["number"] == n1 + 3
    text = repr(out)
    assert text.splitlines()[0] == "<Results List>"
    assert f"[0] In [{n + 3}]: print(c)" in text
    assert f"[0] Out[{n + 3}]: 15" in text
    assert f"[1] Out[{n1 + 3}]: -5" in text


def test_result_dict_keys_and_number_increments(mec):
    before = mec.execute("pass")
    result_dict = mec.execute("d=10; print(d)")
    for b, r in zip(before, result_dict, strict=True):
        assert r["input"] == {"raw": "d=10; print(d)", "translated": "d=10; print(d)"}
        assert r["number"] == b["number"] + 1
        assert r["stdout"] == "10\n"
        assert set(r) >= {"id", "number", "input", "stdout", "stderr", "outputs", "result"}


def test_execute_result_and_rich_outputs(mec):
    r = mec.execute(
        "from IPython.display import display, HTML; display(HTML('<b>x</b>')); 6*7", targets=0
    )
    assert r[0]["result"]["text/plain"] == "42"
    kinds = [o["output_type"] for o in r[0]["outputs"]]
    assert kinds == ["display_data", "execute_result"]
    assert "text/html" in r[0]["outputs"][0]["data"]
    assert "Out[" in repr(r) and "42" in repr(r)


def test_stderr_is_collected(mec):
    r = mec.execute("import sys; print('oops', file=sys.stderr)", targets=1)
    assert r[0]["stderr"] == "oops\n" and r[0]["stdout"] == ""


def test_non_blocking_returns_at_once_while_engines_sleep(mec, tmp_path):
    go = tmp_path / "go"
    code = held_code(go)  # the engines run until the test says go (30 s at most)
    t0 = time.perf_counter()
    try:
        pr = mec.execute(code, block=False)
        took = time.perf_counter() - t0
        # returned while the engines still run, not when they are done (30 s): the time it
        # takes is the box's speed (a 0.5 s bound here failed on a loaded box)
        assert took < 10, f"the non-blocking call took {took:.2f} s"
        assert isinstance(pr, PendingResult)
        assert not pr.ready()
        assert pr.get_result(block=False) is None
        assert pr.get_result(default="nope", block=False) == "nope"
    finally:
        go.touch()
    res = pr.r
    assert pr.ready()
    assert [x["input"]["raw"] for x in res] == [code] * 4
    assert pr.get_result() is res  # cached


def test_timeout_then_collect_later(mec):
    pr = mec.execute("import time; time.sleep(1)", block=False)
    with pytest.raises(TimeoutError) as info:
        pr.get_result(timeout=0.1)
    assert isinstance(info.value, builtins_timeout())
    assert len(pr.get_result(timeout=30)) == 4
    with pytest.raises(TimeoutError):
        mec.execute("import time; time.sleep(1)", timeout=0.1)
    mec.get_result(timeout=30)  # the timed-out call's result is still there


def builtins_timeout():
    import builtins

    return builtins.TimeoutError


def test_barrier(mec):
    mec.block = False
    prs = [mec.execute("import time; time.sleep(0.2)") for _ in range(4)]
    mec.barrier(prs)
    assert all(pr.ready() for pr in prs)
    numbers = [pr.r[0]["number"] for pr in prs]
    assert numbers == sorted(numbers) and len(set(numbers)) == 4  # per-engine order kept
    with pytest.raises(TypeError, match="PendingResult"):
        mec.barrier([1])


def test_block_and_targets_attributes(mec):
    mec.targets = [0, 2]
    mec.block = False
    pr = mec.execute("a=5")
    assert isinstance(pr, PendingResult)
    assert [x["id"] for x in pr.r] == [0, 2]
    mec.targets = "all"
    mec.block = True
    r = mec.execute("b=10; print(b)")
    assert [x["stdout"] for x in r] == ["10\n"] * 4
    assert [x["id"] for x in mec.execute("pass", targets=3)] == [3]


@pytest.mark.parametrize(
    "targets, exc, words",
    [
        (7, ValueError, ["unknown engine id 7", "valid ids: [0, 1, 2, 3]"]),
        ([0, 9, 11], ValueError, ["9, 11"]),
        ([], ValueError, ["empty"]),
        ("some", ValueError, ["'some'"]),
        (1.5, TypeError, ["1.5"]),
        ([0, "1"], TypeError, ["'1'"]),
        (True, TypeError, ["True"]),
        ([1, 1], ValueError, ["twice"]),
    ],
)
def test_bad_targets_are_rejected_before_sending(mec, targets, exc, words):
    before = mec.execute("pass", targets=0)[0]["number"]
    with pytest.raises(exc) as info:
        mec.execute("x = 1", targets=targets)
    for w in words:
        assert w in str(info.value)
    with pytest.raises(exc):
        mec.targets = targets
    assert mec.targets == "all"
    assert mec.execute("pass", targets=0)[0]["number"] == before + 1  # nothing was sent


def test_bad_block_and_code(mec):
    with pytest.raises(TypeError, match="block"):
        mec.execute("pass", block="yes")
    with pytest.raises(TypeError, match="block"):
        mec.block = 1
    with pytest.raises(TypeError, match="str"):
        mec.execute(42)


def test_composite_error_blocking(mec):
    with pytest.raises(CompositeError) as info:
        mec.execute("1/0")
    e = info.value
    lines = str(e).splitlines()
    assert lines[0] == "one or more exceptions from call to method: execute"
    assert lines[1:] == [f"[{i}:execute]: ZeroDivisionError: division by zero" for i in range(4)]
    assert len(e.elist) == 4 and all(isinstance(x, RemoteError) for x in e.elist)
    with pytest.raises(ZeroDivisionError):
        e.raise_exception()
    with pytest.raises(IndexError, match="index 9"):
        e.raise_exception(9)
    rendered = e._render_traceback_()
    assert any("ZeroDivisionError" in line for line in rendered)
    # once in the summary, once heading engine 2's traceback
    assert sum("[2:execute]" in line for line in rendered) == 2


def test_composite_error_nonblocking_and_partial_results(mec):
    mec.block = False
    pr = mec.execute("1/0")
    assert isinstance(pr, PendingResult)
    with pytest.raises(CompositeError, match=r"\[3:execute\]: ZeroDivisionError"):
        pr.r  # noqa: B018 the tutorial's .r property waits and raises
    mec.block = True
    mec.push({"k": 0}, targets=[0, 1])
    mec.push({"k": 1}, targets=[2, 3])
    with pytest.raises(CompositeError) as info:
        mec.execute("print('ok'); 1/k")
    e = info.value
    assert [x.engine_id for x in e.elist] == [0, 1]
    assert e.results[2]["stdout"] == "ok\n" and e.results[3]["stdout"] == "ok\n"
    assert e.results[0]["stdout"] == "ok\n"  # output before the error is kept


def test_print_tracebacks(mec, capsys):
    with pytest.raises(CompositeError) as info:
        mec.execute("def boom():\n    raise KeyError('zz')\nboom()", targets=[1, 3])
    info.value.print_tracebacks()
    out = capsys.readouterr().out
    assert "[1:execute]:" in out and "[3:execute]:" in out and "boom" in out
    info.value.print_tracebacks(1)
    out = capsys.readouterr().out
    assert "[3:execute]:" in out and "[1:execute]:" not in out


def test_errors_pickle(mec):
    with pytest.raises(CompositeError) as info:
        mec.execute("1/0", targets=[0, 1])
    e2 = pickle.loads(pickle.dumps(info.value))
    assert str(e2) == str(info.value)
    assert e2.elist[0].traceback == info.value.elist[0].traceback
    err = EngineError("engine 3 died", 3)
    assert pickle.loads(pickle.dumps(err)).engine_id == 3


def test_unknown_exception_type_reraises_remote_error(mec):
    mec.execute("class Weird(Exception): pass", targets=0)
    with pytest.raises(CompositeError) as info:
        mec.execute("raise Weird('w')", targets=0)
    with pytest.raises(RemoteError, match="Weird: w"):
        info.value.raise_exception()


def test_syntax_error_is_reported_and_engine_usable(mec):
    with pytest.raises(CompositeError, match="SyntaxError"):
        mec.execute("def (:", targets=0)
    assert mec.execute("print(1)", targets=0)[0]["stdout"] == "1\n"


def test_errors_importable_from_client_module():
    assert client.CompositeError is CompositeError
    assert client.MultiEngineClient.__name__ == "MultiEngineClient"


def test_many_requests_in_flight_are_routed(mec):
    prs = [mec.execute(f"print({i})", block=False) for i in range(40)]
    for i, pr in enumerate(prs):
        assert [x["stdout"] for x in pr.get_result(timeout=30)] == [f"{i}\n"] * 4


def test_concurrent_threads_share_a_client(mec):
    import concurrent.futures as cf

    def work(i):
        return mec.execute(f"print({i})", targets=i % 4)[0]["stdout"]

    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(work, range(24))) == [f"{i}\n" for i in range(24)]


# -- issue 11 item 12: clients that are not closed leak; engine comms are never closed
def _engine_comms(mec) -> list[int]:
    mec.execute("_n_comms = len(get_ipython().kernel.comm_manager.comms)")
    return mec.pull("_n_comms")


def _process_counts() -> tuple[int, int]:
    import os

    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


def _settled(expected, measure, within: float = 5.0):
    """Poll ``measure()`` until it equals ``expected`` or ``within`` seconds pass; the last
    value."""
    deadline = time.monotonic() + within
    value = measure()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = measure()
    return value


@pytest.mark.timeout(120)
def test_h12_unclosed_client_leaks_50_cycles_stay_flat(mec, cluster):
    import gc

    path = cluster.cluster_file
    for _ in range(2):  # warm up: first-use allocations, the loop thread
        client.MultiEngineClient(path).close()
    gc.collect()
    comms = _engine_comms(mec)
    counts = _process_counts()
    for i in range(50):
        c = client.MultiEngineClient(path)
        assert c.execute("pass", targets=0)[0]["status"] == "ok"
        if i % 2:
            c.close()  # explicit close ...
        else:
            del c  # ... or just dropped: the finalizer closes it
            gc.collect()
    assert _settled(comms, lambda: _engine_comms(mec)) == comms
    assert _settled(counts, _process_counts) == counts


def test_h12_close_closes_the_engine_comm_and_finalizer_runs(mec, cluster):
    import gc
    import weakref

    before = _engine_comms(mec)
    c = client.MultiEngineClient(cluster.cluster_file)
    assert _engine_comms(mec) == [n + 1 for n in before]
    ref = weakref.ref(c)
    del c
    gc.collect()
    assert ref() is None  # nothing (the controller's callbacks) keeps a dropped client alive
    assert _settled(before, lambda: _engine_comms(mec)) == before


def test_h12_unload_ext_closes_the_client_px_created(mec, cluster):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "ipy_multiengine")
    magics = ip.magics_manager.registry["ParallelMagics"]
    own = client.MultiEngineClient(cluster.cluster_file).activate()
    # white-box (no public setter): what %px does when no client is active (magics.client())
    magics._own_client = own
    try:
        ip.run_line_magic("unload_ext", "ipy_multiengine")
        assert own.closed
        assert client.get_active() is None
    finally:
        ip.run_line_magic("load_ext", "ipy_multiengine")
        mec.activate()


def test_h12_finalizer_on_the_io_thread_still_closes(cluster):
    """A client whose last reference drops on the I/O thread (a done-callback) is closed too."""
    from ipy_multiengine import _loop  # white-box: the drop must happen on the I/O thread itself

    c = client.MultiEngineClient(cluster.cluster_file)
    controller = c.controller

    async def drop_there():
        client.close_controller(controller)  # what the finalizer runs, on the loop thread

    _loop.run(drop_there())
    deadline = time.monotonic() + 10
    while not controller.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert controller.closed
    c.close()


# ---------------------------------------------------------------------- interrupt()
def test_interrupt_right_after_a_non_blocking_send(mec):
    check_interrupt_right_after_send(mec, [0, 1])


def test_interrupt_of_an_idle_engine_harms_nothing(mec):
    mec.execute("kept = 5", targets=[2])
    for _ in range(3):
        mec.interrupt([2, 3])
    assert mec.pull("kept", targets=[2]) == [5]
    assert [r["status"] for r in mec.execute("x = 1", targets=[2, 3])] == ["ok", "ok"]
    assert mec.apply(lambda: 3, targets=[2, 3]) == [3, 3]


def _sleep_call(mec, kind: str):
    """A blocking call that sleeps 30 s on engines 0 and 1."""
    if kind == "execute":
        return lambda: mec.execute("import time; time.sleep(30)", targets=[0, 1])

    def sleep_long():  # pickled by value
        __import__("time").sleep(30)

    return lambda: mec.apply(sleep_long, targets=[0, 1])


@pytest.mark.parametrize("kind", ["execute", "apply"])
@pytest.mark.parametrize("when", ["signal while sending", "raised before the wait"])
def test_ctrl_c_between_send_and_wait_interrupts_like_one_in_the_wait(mec, monkeypatch, kind, when):
    """A Ctrl-C that lands after a blocking call has sent its requests and before its wait has
    begun: the engines are interrupted and ``mec.last`` keeps the call, as for one in the wait.
    (Before: the KeyboardInterrupt left the call, the engines slept on, nothing kept it.)"""
    import signal

    call = _sleep_call(mec, kind)
    if when == "signal while sending":
        real_pending = mec._pending

        def pending(*args, **kwargs):  # the requests are submitted: a real SIGINT comes now
            pr = real_pending(*args, **kwargs)
            signal.raise_signal(signal.SIGINT)
            return pr

        monkeypatch.setattr(mec, "_pending", pending)
    else:
        real_get = PendingResult.get_result

        def get_result(self, *args, **kwargs):  # the first step of the wait
            monkeypatch.setattr(PendingResult, "get_result", real_get)
            raise KeyboardInterrupt

        monkeypatch.setattr(PendingResult, "get_result", get_result)
    before = mec.last
    with pytest.raises(KeyboardInterrupt):
        call()
    monkeypatch.undo()
    pr = mec.last
    try:
        assert pr is not None and pr is not before and pr.eids == [0, 1]
        t0 = time.monotonic()
        with pytest.raises(CompositeError) as info:
            pr.get_result(timeout=10)
        assert time.monotonic() - t0 < 10
        assert [e.ename for e in info.value.elist] == ["KeyboardInterrupt"] * 2
    finally:
        mec.interrupt([0, 1])  # the old code left them sleeping
    assert mec.apply(lambda: 1, targets=[0, 1]) == [1, 1]


def test_interrupt_signals_a_handler_of_the_users_once(mec, tmp_path):
    """Code that installs its own SIGINT handler (a "save and stop on Ctrl-C" loop) gets one
    signal per interrupt, as from ipykernel's own interrupt. (Before: the engine signalled it
    again and again, 0.02 s to 1 s apart for up to 10 s, as if Ctrl-C were pressed 8 times.)"""
    ready = tmp_path / "handler-installed"
    code = f"""
import signal, time
hits = []
signal.signal(signal.SIGINT, lambda signum, frame: hits.append(time.monotonic()))
open({str(ready)!r}, "w").close()
deadline = time.monotonic() + 20
while not hits and time.monotonic() < deadline:
    time.sleep(0.01)
quiet_until = time.monotonic() + 2.5  # longer than the engine's repeats before the 1 s steps
while time.monotonic() < quiet_until:
    time.sleep(0.01)
signal.signal(signal.SIGINT, signal.default_int_handler)
"""
    pr = mec.execute(code, targets=[2], block=False)
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists()
    mec.interrupt([2])
    assert [r["status"] for r in pr.get_result(timeout=30)] == ["ok"]
    assert mec.execute("n_hits = len(hits)", targets=[2]) and mec.pull("n_hits", targets=[2]) == [1]


def test_interrupt_stops_an_async_cell(mec, tmp_path):
    """A cell with a top-level ``await``: ipykernel's SIGINT handler for it schedules the cancel
    on the loop without waking it, so the interrupt waited for whatever woke the loop next (the
    30 s sleep's end, or the next request). The engine wakes its loop after the signal."""
    ready = tmp_path / "awaiting"
    code = f"import asyncio\nopen({str(ready)!r}, 'w').close()\nawait asyncio.sleep(30)"
    pr = mec.execute(code, targets=[2], block=False)
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists()
    t0 = time.monotonic()
    mec.interrupt([2])
    try:
        with pytest.raises(CompositeError) as info:
            pr.get_result(timeout=10)
        assert time.monotonic() - t0 < 10
        assert [e.ename for e in info.value.elist] == ["CancelledError"]  # as ipykernel says it
    finally:
        mec.interrupt([2])  # the old code left it sleeping (ended by the next request)
    assert mec.apply(lambda: 2, targets=[2]) == [2]


_SLOW_INTERRUPT_HANDLER = """
import threading
_k = get_ipython().kernel
_ime_orig_interrupt = _k.control_handlers["ime_interrupt_request"]
interrupt_go, interrupt_handled = threading.Event(), threading.Event()
def _ime_slow_interrupt(stream, idents, msg):  # the control thread answers late
    interrupt_go.wait(20)
    try:
        _ime_orig_interrupt(stream, idents, msg)
    finally:
        interrupt_handled.set()
_k.control_handlers["ime_interrupt_request"] = _ime_slow_interrupt
"""


def test_a_late_interrupt_does_not_hit_the_cleanup_the_plain_one_began(mec, tmp_path):
    """An engine whose control thread answers after the client's 1 s ack wait (in real life: a
    C call holding the GIL, ``sum(range(10**8))``) is interrupted twice, by the client's plain
    fallback and then by the late ``ime_interrupt_request``: the second must not raise another
    KeyboardInterrupt in the code's own ``except KeyboardInterrupt:`` cleanup. (Before: it did,
    and the cleanup never finished; before intr9 a single plain signal let it finish.)"""
    ready = tmp_path / "running"
    code = f"""
import time
cleaned = False
open({str(ready)!r}, "w").close()
try:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.01)
except KeyboardInterrupt:  # the plain signal: now the late request comes, during the cleanup
    interrupt_go.set()
    interrupt_handled.wait(10)
    cleaned = True
    raise
"""
    mec.execute(_SLOW_INTERRUPT_HANDLER, targets=[3])
    try:
        pr = mec.execute(code, targets=[3], block=False)
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists()
        mec.interrupt([3])  # not acknowledged within 1 s: the plain way too
        with pytest.raises(CompositeError) as info:
            pr.get_result(timeout=20)
        assert [e.ename for e in info.value.elist] == ["KeyboardInterrupt"]
        assert mec.pull("cleaned", targets=[3]) == [True]
    finally:
        mec.execute("interrupt_go.set()", targets=[3])
        mec.execute(
            '_k.control_handlers["ime_interrupt_request"] = _ime_orig_interrupt', targets=[3]
        )
    assert mec.apply(lambda: 1, targets=[3]) == [1]


@pytest.mark.parametrize("kind", ["execute", "apply"])
@pytest.mark.parametrize("stop", ["interrupt", "abort"])
def test_a_queued_request_cannot_be_cancelled_behind_the_engines_back(mec, tmp_path, kind, stop):
    """``pr.futures[i].cancel()`` on a request queued behind a running one: a future cancelled
    here promises it will not run, but its engine still had it and ran it later, and neither
    ``mec.interrupt()`` nor ``pr.abort()`` named it any more (both skip requests done here). A
    request's future is running from the start: ``cancel()`` is refused, and the request stays
    interruptible and abortable."""
    started, ran = tmp_path / "started", tmp_path / "ran"
    first = mec.execute(
        f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(30)",
        targets=0,
        block=False,
    )
    if kind == "execute":
        second = mec.execute(
            f"import pathlib; pathlib.Path({str(ran)!r}).touch()", targets=0, block=False
        )
    else:
        where = str(ran)
        second = mec.apply(
            lambda: __import__("pathlib").Path(where).touch(), targets=0, block=False
        )
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline, "the first request never began"
            time.sleep(0.01)
        assert second.futures[0].cancel() is False  # it is the engine's now
        assert not second.ready()
        if stop == "abort":
            second.abort()
        mec.interrupt(0)
        with pytest.raises(CompositeError, match="KeyboardInterrupt"):
            first.get_result(timeout=10)
        expected = "KeyboardInterrupt" if stop == "interrupt" else "Aborted"
        with pytest.raises(CompositeError, match=expected):
            second.get_result(timeout=10)
        mec.execute("pass", targets=0, timeout=10)
        assert not ran.exists(), "the request whose future was cancelled ran after all"
    finally:
        mec.interrupt(0)


def test_a_second_interrupt_right_after_the_first_stops_code_that_caught_it(mec, tmp_path):
    """Two interrupts in quick succession (Ctrl-C pressed twice) of code whose ``except
    KeyboardInterrupt:`` goes on working: the second must interrupt it again. (Before: an
    interrupt within 1 s of the first was taken for the first one's late duplicate and did
    nothing, while ``mec.interrupt()`` returned as if it had; the code slept on.) The late
    duplicate of a plain fallback signal is still merged:
    ``test_a_late_interrupt_does_not_hit_the_cleanup_the_plain_one_began``."""
    began, caught = tmp_path / "began", tmp_path / "caught"
    code = f"""
import pathlib, time
try:
    pathlib.Path({str(began)!r}).touch()
    time.sleep(30)
except KeyboardInterrupt:
    pathlib.Path({str(caught)!r}).touch()
    time.sleep(30)
"""
    pr = mec.execute(code, targets=[1], block=False)
    try:
        for path in (began, caught):
            deadline = time.monotonic() + 20
            if path is caught:
                mec.interrupt([1])
            while not path.exists():
                assert time.monotonic() < deadline, f"{path.name} never appeared"
                time.sleep(0.005)
        mec.interrupt([1])  # the caught one is cleaning up (sleeping) now: within the 1 s
        t0 = time.monotonic()
        with pytest.raises(CompositeError) as info:
            pr.get_result(timeout=5)
        assert [e.ename for e in info.value.elist] == ["KeyboardInterrupt"]
        assert time.monotonic() - t0 < 5
    finally:
        mec.interrupt([1])
    assert mec.apply(lambda: 1, targets=[1]) == [1]


# ---------------------------------------------------------------------- fd-level output
def test_output_of_c_code_and_subprocesses_reaches_the_caller(mec):
    """Engines started from a test suite inherited its PYTEST_CURRENT_TEST, and ipykernel then
    left fd 1 and 2 uncaptured: what C code and subprocesses wrote went to the engines' logs,
    not to the caller (as it does with engines started anywhere else)."""
    code = (
        "import ctypes, os, subprocess, sys\n"
        "os.write(1, b'fd 1\\n')\n"
        "ctypes.CDLL(None).printf(b'printf %d\\n', 5); ctypes.CDLL(None).fflush(None)\n"
        "subprocess.run([sys.executable, '-c', 'import os; os.write(2, b\"child 2\\\\n\")'])\n"
        "subprocess.run(['echo', 'child 1'])\n"
    )
    for r in mec.execute(code):
        assert r["stdout"] == "fd 1\nprintf 5\nchild 1\n", r
        assert r["stderr"] == "child 2\n", r


def test_output_written_to_an_fd_last_is_the_commands_own_and_in_order(mec):
    """With fd 1 and 2 captured (as a user's engines do), ipykernel's thread copied what was
    written there to the stream when it got to it: output written at the end of a command came
    after its reply (missing from its result: kept apart as late, or lost with a warning for an
    apply, whose fast reply went ahead of it) and Python's print after an fd write could come
    first. Now the pipe is emptied into the stream before each write and flush."""

    def last_words(i):
        import os

        os.write(1, b"apply %d\n" % i)
        return i

    for i in range(25):
        for r in mec.execute(f"import os; os.write(1, b'end {i}\\n')"):
            assert r["stdout"] == f"end {i}\n", (i, r)
        for r in mec.execute("import os; print('a'); os.write(1, b'b\\n'); print('c')"):
            assert r["stdout"] == "a\nb\nc\n", (i, r)
        pr = mec.apply(last_words, i, block=False)
        assert pr.get_result(timeout=30) == [i] * 4
        assert [m["stdout"] for m in pr.metadata] == [f"apply {i}\n"] * 4, i
    # a character split across two writes is one character, not two replacement characters
    code = "import os, sys; e = 'é'.encode(); os.write(1, e[:1]); sys.stdout.flush(); "
    for r in mec.execute(code + "os.write(1, e[1:])"):
        assert r["stdout"] == "é", r


def test_a_long_fd_output_keeps_its_order(mec):
    """The fd reader forwarded what it read through the stream's draining write, which read the
    pipe again (re-entering its lock) and wrote the newer bytes first: a subprocess's output
    longer than one read (64 KiB) came out with its chunks in reverse order."""
    code = "import subprocess; subprocess.run(['seq', '1', '200000']); print('done')"
    want = "".join(f"{i}\n" for i in range(1, 200001)) + "done\n"
    for r in mec.execute(code):
        assert r["stdout"] == want, (len(r["stdout"]), r["stdout"][:40], r["stdout"][-40:])


def test_printing_in_a_signal_handler_during_fd_output(mec):
    """A signal handler that prints ran inside the engine's emptying of the fd pipe (the print
    before it was waiting in ``poll``) and emptied it again: ``RuntimeError: concurrent poll()
    invocation`` from the handler's print."""
    code = (
        "import os, signal\n"
        "calls = []\n"
        "signal.signal(signal.SIGALRM, lambda *a: calls.append(print('sig')))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)\n"
        "try:\n"
        "    for i in range(20000):\n"
        "        os.write(1, b'f'); print('p', end='')\n"
        "finally:\n"
        "    signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "    signal.signal(signal.SIGALRM, signal.SIG_DFL)\n"
        "print('done', len(calls) > 0)\n"
    )
    r = mec.execute(code, targets=0)[0]
    assert r["stdout"].endswith("done True\n"), r["stdout"][-200:]
    # nothing lost or doubled (a handler's print may come between the fd bytes)
    assert (r["stdout"].count("f"), r["stdout"].count("p")) == (20000, 20000)


def test_a_full_disk_under_the_engine_log_does_not_break_output():
    """The fd reader also copies what it reads to the engine's log. When that write failed (a
    full disk; a log pipe nobody reads any more) the error came out of the user's next
    ``print``, and the reader stopped; ipykernel's own reader only stopped. Now the log copy is
    given up for that chunk and the output still reaches the caller."""
    code = (
        "import os, subprocess, sys\n"
        "cap = sys.stdout._ipy_multiengine_fd\n"
        "saved, full = os.dup(cap.copy), os.open('/dev/full', os.O_WRONLY)\n"
        "os.dup2(full, cap.copy)\n"
        "try:\n"
        "    for i in range(3):\n"
        "        os.write(1, b'fd %d\\n' % i); print('py', i)\n"
        "    subprocess.run(['seq', '1', '30000'])\n"
        "finally:\n"
        "    os.dup2(saved, cap.copy)\n"
        "    os.close(saved), os.close(full)\n"
    )
    with small_cluster(1) as (_cluster, mec):
        r = mec.execute(code, targets=0)[0]
        lines = "".join(f"fd {i}\npy {i}\n" for i in range(3))
        assert r["stdout"] == lines + "".join(f"{i}\n" for i in range(1, 30001)), r["stdout"][:200]


def test_a_log_that_takes_no_writes_does_not_hold_up_prints():
    """The fd reader wrote the log's copy while holding the lock each print waits for: with a
    log that blocks (the engine's stdout a pipe nobody reads, a terminal stopped by Ctrl-S) the
    first print after any fd output hung the engine; ipykernel's own reader only stalled the
    fd output. The log's copy is written by the reader alone now, outside that lock."""
    code = (
        "import os, subprocess, sys\n"
        "copy = sys.stdout._ipy_multiengine_fd.copy\n"
        "saved, (r, w) = os.dup(copy), os.pipe()\n"
        "os.set_blocking(w, False)\n"
        "try:\n"
        "    while True: os.write(w, b'x' * 4096)\n"
        "except BlockingIOError:\n"
        "    os.set_blocking(w, True)\n"
        "os.dup2(w, copy)\n"
        "try:\n"
        "    subprocess.run(['echo', 'sub']); print('after')\n"
        "    os.write(1, b'fd\\n'); print('end')\n"
        "finally:\n"
        "    os.dup2(saved, copy)\n"
        "    os.set_blocking(r, False)\n"
        "    while True:\n"  # the reader's stuck copy goes through, into this pipe
        "        try: os.read(r, 1 << 16)\n"
        "        except BlockingIOError: break\n"
        "    os.close(saved), os.close(w), os.close(r)\n"
    )
    with small_cluster(1) as (_cluster, mec):
        r = mec.execute(code, targets=0, timeout=20)[0]
        assert r["stdout"] == "sub\nafter\nfd\nend\n"
        assert mec.execute("import os; os.write(1, b'later\\n')", targets=0)[0]["stdout"] == (
            "later\n"
        )
