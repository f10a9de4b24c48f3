"""A timeout is a promise (issue 11.3): every blocking call raises within ``timeout`` + 0.3 s.

The slow work is a ``time.sleep`` on the engines (that is what makes the call wait); each test
measures the call against a deadline, then interrupts the engines and waits until they are
free again, so the next test finds them idle. Slow ``on_start`` code (issue 12.5) is here too:
restart and ``wait_ready`` honour their timeouts while it runs, and it is not an engine death.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from faultlib import engine_pid, remember, settle, small_cluster, wait_for

from ipy_multiengine.errors import TimeoutError

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 0.6
SLACK = 0.3
BUSY = "import time; time.sleep(4)"


@pytest.fixture
def busy(mec):
    """Every engine sleeping for 4 s, so that whatever comes next waits; settled afterwards."""
    pr = mec.execute(BUSY, block=False)
    yield pr
    settle(mec)


def _raises_in_time(call, *args, timeout=TIMEOUT, **kw):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        out = call(*args, timeout=timeout, **kw)
        if hasattr(out, "__next__"):
            list(out)
    took = time.monotonic() - t0
    assert took < timeout + SLACK, (
        f"{getattr(call, '__name__', call)} raised after {took:.2f} s (timeout {timeout} s)"
    )
    assert took >= timeout - 0.05, f"raised after {took:.2f} s, before its timeout"
    return info.value


def test_h03_execute_timeout(mec):
    _raises_in_time(mec.execute, BUSY)
    settle(mec)


def test_h03_push_timeout(mec, busy):
    _raises_in_time(mec.push, {"a": 1})


def test_h03_pull_timeout(mec, busy):
    _raises_in_time(mec.pull, "a")


def test_h03_scatter_timeout(mec, busy):
    _raises_in_time(mec.scatter, "x", list(range(8)))


def test_h03_gather_timeout(mec, busy):
    _raises_in_time(mec.gather, "x")


def test_h03_map_timeout(mec):
    # the repro: the progress wait ran first, then the full timeout again (5 s for timeout=3)
    _raises_in_time(mec.map, time.sleep, [4, 4, 4, 4], timeout=2.5)
    settle(mec)


def test_h03_balanced_map_timeout(mec):
    _raises_in_time(mec.map, time.sleep, [4] * 8, balanced=True, timeout=2.5)
    settle(mec)


def test_h03_imap_timeout(mec):
    err = _raises_in_time(mec.imap, time.sleep, [4] * 8)
    assert "imap" in str(err)
    settle(mec)


def test_h03_barrier_timeout(mec, busy):
    err = _raises_in_time(mec.barrier, [busy])
    assert "barrier" in str(err)


def test_h03_get_result_timeout(mec, busy):
    _raises_in_time(busy.get_result)
    _raises_in_time(mec.get_result)


def test_h03_apply_timeout(mec, busy):
    _raises_in_time(mec.apply, abs, -1)


def test_h03_o05_restart_and_wait_ready_timeouts_with_slow_on_start(tmp_path):
    """Issue 11.3 for restart/wait_ready, and 12.5: slow on_start code makes restart raise at its
    timeout with an error naming the engine and the code; the engine is not dead (its kernel
    runs the code), becomes ready when the code is done, and auto_restart still restarts it."""
    flag = tmp_path / "slow"
    with small_cluster(1, auto_restart=True, startup_timeout=30) as (cluster, mec):
        t0 = time.monotonic()
        mec.restart(0)  # how long a plain restart takes on this machine now
        plain = time.monotonic() - t0
        limit = plain + 2.5  # enough to restart, not enough for the code
        code = (
            f"import os, time; time.sleep({limit + 3:.1f} if os.path.exists({str(flag)!r}) else "
            "0)\n"
            "ready = True"
        )
        mec.on_start(code)
        flag.write_text("1")
        err = _raises_in_time(mec.restart, 0, timeout=limit)
        text = str(err)
        assert "engine 0" in text and "on_start" in text and "time.sleep(" in text, text
        assert mec.engines[0]["state"] != "dead" and not mec.get_ids().dead
        err = _raises_in_time(mec.wait_ready, 0, timeout=0.5)
        assert "on_start code" in str(err) and "time.sleep(" in str(err)
        mec.wait_ready(timeout=20)
        assert mec.pull("ready") == [True]
        wait_for(lambda: mec.engines[0]["state"] == "idle", 5, "engine 0 to be idle")

        # restart without a timeout of its own: the cluster's startup_timeout; it waits for the code
        flag.unlink()
        mec.restart(0)
        assert mec.pull("ready") == [True]

        # auto_restart still works after a slow restart: kill -9, the engine comes back by itself
        flag.write_text("1")
        old = engine_pid(cluster, 0)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: engine_pid(cluster, 0) != old, 20, "engine 0 to be restarted")
        remember(cluster)
        mec.wait_ready(timeout=30)
        assert mec.pull("ready") == [True]


def test_nan_timeout_is_refused_not_an_endless_wait(mec):
    """NaN compares false with every deadline: a wait given it never timed out."""
    busy = mec.execute("import time; time.sleep(1)", targets=0, block=False)
    pr = mec.apply(lambda: 1, targets=0, block=False)
    with pytest.raises(ValueError, match="nan"):
        pr.get_result(timeout=float("nan"))
    with pytest.raises(ValueError, match="nan"):
        next(mec.imap(abs, [-1], targets=0, timeout=float("nan")))
    assert pr.get_result(timeout=30) == [1]
    busy.get_result(timeout=30)


def test_any_real_timeout_times_out_with_its_message_or_never(mec, busy):
    """A Fraction (a ``numbers.Real``, accepted) broke the TimeoutError's message once the
    code was sent (``{timeout:g}``: a TypeError); ``10**400`` seconds, too large for a float,
    failed with Python's bare OverflowError. Both are seconds, as a float would be."""
    from fractions import Fraction

    for call, args in ((mec.execute, ("pass",)), (busy.get_result, ()), (mec.barrier, ([busy],))):
        err = _raises_in_time(call, *args, timeout=Fraction(3, 5))
        assert "0.6 s" in str(err)
    with pytest.raises(ValueError, match="-1000"):
        mec.execute("pass", timeout=-(10**400))
    settle(mec)
    mec.execute("x = 1", timeout=10**400)
    assert mec.pull("x", timeout=10**400) == [1] * 4
    assert mec.apply(lambda: 2, targets=0, block=False).get_result(timeout=10**400) == [2]


def test_imap_takes_any_real_timeout(mec):
    """``imap`` computed its deadline from the timeout as given, after the check: ``10**400``
    seconds (infinite once checked, as every other call takes it) failed with Python's bare
    OverflowError ("int too large to convert to float") instead of mapping."""
    from fractions import Fraction

    assert list(mec.imap(lambda x: x * 2, range(5), timeout=10**400)) == [0, 2, 4, 6, 8]
    assert list(mec.imap(lambda x: x, range(3), timeout=Fraction(60))) == [0, 1, 2]
    with pytest.raises(ValueError, match="-1000"):
        mec.imap(lambda x: x, range(3), timeout=-(10**400))


def test_imap_timeout_counts_from_the_call_not_from_the_first_next(mec):
    """``imap(timeout=...)``: seconds from this call for the whole iteration (its docstring);
    the generator's body, where the deadline was computed, runs only at the first next()."""
    import threading

    t0 = time.monotonic()
    it = mec.imap(time.sleep, [4] * 8, timeout=TIMEOUT)
    threading.Event().wait(TIMEOUT * 0.8)  # the caller does something else before iterating
    with pytest.raises(TimeoutError):
        list(it)
    took = time.monotonic() - t0
    assert took < TIMEOUT + SLACK, f"imap raised {took:.2f} s after the call (timeout {TIMEOUT} s)"
    settle(mec)
