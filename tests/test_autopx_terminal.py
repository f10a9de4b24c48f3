"""``%autopx`` and Ctrl-C in a real terminal ``ipython`` process, driven with pexpect.

The ``ipython`` process connects to the session's 4-engine cluster through its cluster file.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.timeout(120)

PROMPT = re.compile(r"(?:^|\n)In \[(\d+)\]: ")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def term(cluster, mec):
    ipython = Path(sys.executable).with_name("ipython")
    if not ipython.exists():
        pytest.skip("no ipython script next to the interpreter")
    home = tempfile.mkdtemp(prefix="ipme-ipythondir-")
    env = dict(os.environ, IPYTHONDIR=home, TERM="dumb", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(
        str(ipython),
        [
            "--simple-prompt",
            "--colors=NoColor",
            "--no-banner",
            "--no-confirm-exit",
            "--HistoryManager.hist_file=:memory:",
        ],
        env=env,
        encoding="utf-8",
        timeout=30,
        dimensions=(50, 200),
    )
    child.expect(PROMPT)
    send(
        child,
        "from ipy_multiengine import client; mec = "
        f"client.MultiEngineClient({cluster.cluster_file!r})",
    )
    send(child, "mec.activate(); mec.block = True")
    send(child, "%load_ext ipy_multiengine")
    yield child
    try:
        if child.isalive():
            child.sendintr()
            child.sendline("exit")
            child.expect(pexpect.EOF, timeout=15)
    finally:
        child.close(force=True)


def send(child, line: str, expect=PROMPT) -> str:
    """Type ``line``, wait for the next prompt; returns what was printed in between."""
    child.sendline(line)
    child.expect(expect)
    return ANSI.sub("", child.before)


def test_autopx_for_loop_typed_line_by_line(term, mec):
    out = send(term, "%autopx")
    assert "Auto Parallel Enabled" in out and "Type %autopx to disable" in out
    send(term, "total = 0")
    # a block typed line by line: the terminal must see plain Python to know it is incomplete
    term.sendline("for i in range(4):")
    term.expect(r"\.\.\.: ")
    term.sendline("    total += i")
    term.expect(r"\.\.\.: ")
    term.sendline("    print('partial', total)")
    term.expect(r"\.\.\.: ")
    term.sendline("")
    term.expect(PROMPT)
    out = ANSI.sub("", term.before)
    for eid in range(4):
        assert f"[stdout:{eid}] partial 6" in out
    out = send(term, "print('total', total)")
    for eid in range(4):
        assert f"[stdout:{eid}] total 6" in out
    out = send(term, "%autopx")
    assert "Auto Parallel Disabled" in out
    out = send(term, "'total' in dir()")
    assert "False" in out  # nothing ran locally
    out = send(term, "px print(total * 2)")
    assert "<Results List>" in out and re.search(r"\[3\] Out\[\d+\]: 12", out)
    assert mec.pull("total") == [6] * 4


def test_autopx_nonblocking_shows_pending_results(term, mec):
    send(term, "mec.block = False")
    send(term, "%autopx")
    out = send(term, "x = 41")
    assert "<PendingResult execute on engines [0, 1, 2, 3]" in out
    send(term, "%autopx")
    send(term, "mec.block = True")
    out = send(term, "%result")
    assert "<Results List>" in out and "x = 41" in out
    assert mec.pull("x") == [41] * 4


def test_ctrl_c_interrupts_running_px_cell(term, mec):
    term.sendline("%%px")
    term.expect(r"\.\.\.: ")
    term.sendline("import time; print('started', flush=True); time.sleep(60); print('never')")
    term.expect(r"\.\.\.: ")
    term.sendline(
        ""
    )  # IPython's simple prompt ends a cell magic at an empty line after a blank one
    term.expect(r"\.\.\.: ")
    term.sendline("")
    term.expect(r"\[stdout:\d\] started")
    term.sendintr()
    term.expect(PROMPT)
    out = ANSI.sub("", term.before)
    assert "KeyboardInterrupt" in out
    assert "interrupted engines 0-3" in out
    assert "never" not in out
    out = send(term, "%px print('alive')")
    assert re.search(r"\[0\] Out\[\d+\]: alive", out)
    assert [r["stdout"] for r in mec.execute("print('ok')")] == ["ok\n"] * 4


PT_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def test_full_prompt_toolkit_terminal(cluster, mec):
    """The same in IPython's real prompt_toolkit terminal UI (not --simple-prompt)."""
    home = tempfile.mkdtemp(prefix="ipme-ipythondir-")
    env = dict(os.environ, IPYTHONDIR=home, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(
        str(Path(sys.executable).with_name("ipython")),
        [
            "--no-banner",
            "--colors=NoColor",
            "--no-autoindent",
            "--no-confirm-exit",
            "--HistoryManager.hist_file=:memory:",
        ],
        env=env,
        encoding="utf-8",
        timeout=30,
        dimensions=(50, 200),
    )
    try:

        def line(text: str, n: int) -> str:
            child.send(text + "\r")
            child.expect(rf"In \[{n}\]")
            return PT_ANSI.sub("", child.before)

        child.expect(r"In \[1\]")
        line(
            "from ipy_multiengine import client; mec = "
            f"client.MultiEngineClient({cluster.cluster_file!r})",
            2,
        )
        line("mec.activate(); mec.block = True", 3)
        line("%load_ext ipy_multiengine", 4)
        assert "Auto Parallel Enabled" in line("%autopx", 5)
        child.send("for i in range(2):\r")
        child.expect(r"\.\.\.:")
        child.send("    print('loop', i)\r")
        child.expect(r"\.\.\.:")
        child.send("\r")
        child.expect(r"In \[6\]")
        out = PT_ANSI.sub("", child.before)
        assert all(f"[stdout:{e}] loop 1" in out for e in range(4))
        assert "Auto Parallel Disabled" in line("%autopx", 7)
        child.send("%%px\r")
        child.expect(r"\.\.\.:")
        child.send("import time; print('started', flush=True); time.sleep(60)\r")
        child.expect(r"\.\.\.:")
        child.send("\r")
        child.expect(r"\.\.\.:")
        child.send("\r")  # a cell magic ends at an empty line after a blank one
        child.expect(r"\[stdout:\d\] started")
        child.sendintr()
        child.expect(r"In \[\d+\]")
        out = PT_ANSI.sub("", child.before)
        assert "KeyboardInterrupt" in out and "interrupted engines" in out
        child.send("%px print('alive')\r")
        child.expect(r"\n\[3\] Out\[\d+\]: alive")
    finally:
        child.sendintr()
        child.send("exit\r")
        try:
            child.expect(pexpect.EOF, timeout=15)
        finally:
            child.close(force=True)


def test_o10_exit_and_extension_magics_under_autopx_in_a_terminal(term, mec):
    numbers = [r["number"] for r in mec.execute("pass")]
    send(term, "%autopx")
    out = send(term, "exit")
    assert "not sent to the engines" in out
    out = send(term, "%pxstatus")
    assert "Line magic function" not in out and "idle" in out
    out = send(term, "%autopx")
    assert "Auto Parallel Disabled" in out
    assert term.isalive()
    # the engines saw nothing but our own execute
    assert [r["number"] for r in mec.execute("pass")] == [n + 1 for n in numbers]


def test_late_output_is_printed_while_the_prompt_waits(term, mec, tmp_path):
    """Output an engine prints after its command finished (a thread) while the terminal's
    prompt waits is printed then, labelled with its engine and as late, without waiting for
    the next input; and only once."""
    flag = tmp_path / "go"
    code = (
        "import os, threading, time\n"
        "def _late_job():\n"
        f"    while not os.path.exists({str(flag)!r}):\n"
        "        time.sleep(0.005)\n"
        "    print('done', flush=True)\n"
        "_late = threading.Thread(target=_late_job, daemon=True)\n"
        "_late.start()"
    )
    try:
        out = send(term, f"%px --targets 0 exec({code!r})")
        assert "<Results List>" in out, out
        flag.touch()
        term.expect(r"\[stdout:0 late, In \[\d+\]\] done")  # nothing typed meanwhile
        out = send(term, "1 + 1")
        assert "late" not in out, out
    finally:
        flag.touch()
        mec.execute("_late.join(10)", targets=0)
