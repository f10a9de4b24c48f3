"""ResultList, PendingResult and what the client keeps of results (issue 11 items 4 and 11)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from IPython.utils.capture import capture_output

from ipy_multiengine.results import ResultList

pytestmark = pytest.mark.timeout(120)


def run(ip, cell):
    with capture_output() as cap:
        res = ip.run_cell(cell)
    return cap, res


# -- item 4: %result shows the last command executed on each engine; the repr shows everything
def test_h04_result_shows_last_execute_not_older_magic(ip, mec):
    run(ip, "%px x = 'magic'")
    mec.execute("y = 'api'")
    mec.pull("y")
    mec.push({"z": 1})
    _cap, res = run(ip, "%result")
    assert res.success
    assert [r["input"]["raw"] for r in res.result] == ["y = 'api'"] * 4
    assert mec.get_result() is res.result


def test_h04_result_shows_each_engine_of_the_last_execute(ip, mec):
    run(ip, "%px a = 1")
    mec.execute("b = 2", targets=[1, 3])
    mec.map(lambda v: v, range(4))
    mec.pull("a")
    _cap, res = run(ip, "%result")
    assert [(r["id"], r["input"]["raw"]) for r in res.result] == [(1, "b = 2"), (3, "b = 2")]
    assert "[1] In [" in repr(res.result) and "]: b = 2" in repr(res.result)


def test_h04_results_list_repr_shows_stderr_and_names_rich_outputs(mec):
    r = mec.execute(
        "import sys; print('to stdout'); print('to stderr', file=sys.stderr); "
        "from IPython.display import display, HTML; display({'a': 1}, raw=False); "
        "display(HTML('<b>x</b>')); 42",
        targets=[0, 1],
    )
    n = r[0]["number"]
    lines = repr(r).splitlines()
    assert lines[0] == "<Results List>"
    block = lines[1 : 1 + len(lines) // 2]
    assert block[1] == f"[0] Out[{n}]: to stdout\n42".split("\n")[0]
    assert f"[0] Err[{n}]: to stderr" in block
    assert f"[0] Display[{n}]: <text/plain> {{'a': 1}}" in block
    assert f"[0] Display[{n}]: <text/html, text/plain> <IPython.core.display.HTML object>" in block
    assert any(line.startswith("[1] Err[") for line in lines)


def test_h04_tutorial_stdout_lines_stay_exact(mec):
    """The tutorial's lines, exactly: no Err/Display lines when there is only stdout."""
    r = mec.execute("c = 15; print(c)", targets=[0, 1])
    n0, n1 = r[0]["number"], r[1]["number"]
    assert repr(r) == (
        f"<Results List>\n[0] In [{n0}]: c = 15; print(c)\n[0] Out[{n0}]: 15\n"
        f"[1] In [{n1}]: c = 15; print(c)\n[1] Out[{n1}]: 15"
    )
    quiet = mec.execute("d = 1", targets=0)
    assert repr(quiet) == f"<Results List>\n[0] In [{quiet[0]['number']}]: d = 1"


def test_results_list_repr_of_plain_records():
    rl = ResultList(
        [
            {
                "id": 2,
                "number": 5,
                "input": {"raw": "f()"},
                "stdout": "",
                "stderr": "warn\n",
                "result": {"text/plain": "3", "text/html": "<i>3</i>"},
                "outputs": [
                    {
                        "output_type": "execute_result",
                        "data": {"text/plain": "3", "text/html": "<i>3</i>"},
                    }
                ],
            }
        ]
    )
    assert repr(rl).splitlines() == [
        "<Results List>",
        "[2] In [5]: f()",
        "[2] Out[5]: 3",
        "[2] Err[5]: warn",
        "[2] Display[5]: result <text/html, text/plain>",
    ]


# -- item 11: no client-side reference to result data once the user dropped it
def test_h11_last_result_frames_freed_when_dropped():
    """In a fresh process: gather/pull/apply/map of ~300 MB, then del: RSS back within 10%."""
    code = r"""
import gc, time, psutil
from ipy_multiengine import Cluster
rss = lambda: psutil.Process().memory_info().rss / 1e6
with Cluster(n=2, profile="h11") as mec:
    mec.execute("import numpy as np; x = np.ones(150_000_000 // 8)")   # 150 MB per engine
    mec.pull("x", targets=0); gc.collect()                               # warm up allocations
    before = rss()
    report = []
    for what, call in [
        ("gather", lambda: mec.gather("x")),
        ("pull", lambda: mec.pull("x")),
        ("apply", lambda: mec.apply(lambda: x)),
        ("map", lambda: mec.map(lambda i: x, [0, 1])),
        ("pull nonblocking", lambda: mec.pull("x", block=False).r),
    ]:
        value = call()
        held = rss()
        del value; gc.collect()
        deadline = time.monotonic() + 3  # the I/O thread may drop its last frame a moment later
        while rss() - before > 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        report.append((what, round(held - before), round(rss() - before)))
    print(repr((before, report)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    before, report = eval(out.stdout.strip().splitlines()[-1])
    for what, held, left in report:
        assert held > 250, (what, held)  # the value really was ~300 MB
        assert left < 0.1 * 300, f"{what}: {left} MB still held after del (before: {before:.0f} MB)"


def test_polling_a_running_call_with_short_waits_adds_nothing_to_its_futures(mec):
    """``pr.wait(timeout=small)`` in a polling loop (a UI that checks on a long call) must not
    leave something behind on the call's futures each time: they hold the result until the
    user drops it, and every leftover runs when the call ends. (Counted through the futures'
    ``_done_callbacks``: concurrent.futures has no public count.)"""
    pr = mec.apply(time.sleep, 2, targets=0, block=False)
    try:
        before = len(pr.futures[0]._done_callbacks)
        for _ in range(300):
            assert not pr.wait(timeout=0.001)
        assert len(pr.futures[0]._done_callbacks) <= before + 1
    finally:
        pr.get_result(timeout=30)
