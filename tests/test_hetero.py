"""Heterogeneous engines (issue 8): kernelspec groups as targets, bash_kernel engines, the engine
table, the status table, pull_table and %pxdiff, on one real cluster of 5 kernels:
ids 0 = python3, 1 = other (same interpreter, IME_FLAVOUR=other), 2-4 = bash."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from beyond_helpers import assert_gone, family, private_kernelspecs
from IPython.core.error import UsageError

from ipy_multiengine import Cluster, MultiEngineClient
from ipy_multiengine.errors import CompositeError, EngineError

pytestmark = pytest.mark.timeout(150)  # fixture setup (5 kernels) counts too; the box may be loaded

ENGINES = {"python3": 1, "other": 1, "bash": 3}


@pytest.fixture(scope="module")
def hetero():
    with private_kernelspecs():
        cl = Cluster(engines=ENGINES, profile="beyond-hetero", startup_timeout=120)
        try:
            mec = cl.start()
            pids = [p for e in mec.engines for p in family(e["pid"])]
            yield cl
        finally:
            cl.stop()
    assert_gone(pids)


@pytest.fixture
def mec(hetero):
    client = hetero.client
    client.block = True
    client.targets = "all"
    return client


@pytest.fixture
def flag(tmp_path):
    """A file path an engine waits for: the test creates it to let the engine go on."""
    path = tmp_path / "go"
    yield path
    path.touch()  # never leave an engine waiting


def wait_code(path: Path, marker: str) -> str:
    return (
        f"import os, time\nprint({marker!r}, flush=True)\n"
        f"while not os.path.exists({str(path)!r}):\n    time.sleep(0.01)\n"
    )


def started_listener(marker: str):
    """A listener and the Event it sets when an engine prints ``marker``."""
    seen = threading.Event()

    def listener(eid, mtype, content):
        if mtype == "stream" and marker in content.get("text", ""):
            seen.set()

    return listener, seen


# ---------------------------------------------------------------------- groups and the engine table
def test_engine_table_lists_groups_kernelspecs_languages(mec):
    rows = mec.engines
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["group"] for r in rows] == ["python3", "other", "bash", "bash", "bash"]
    assert [r["kernelspec"] for r in rows] == ["python3", "other", "bash", "bash", "bash"]
    assert [r["language"] for r in rows] == ["python", "python", "bash", "bash", "bash"]
    assert rows[0]["version"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert all(r["version"] for r in rows[2:])  # bash's version, from its banner
    assert all(r["host"] == socket.gethostname() for r in rows)
    assert len({r["pid"] for r in rows}) == 5 and all(isinstance(r["pid"], int) for r in rows)
    assert all(r["state"] in ("idle", "busy") and r["dead"] is None for r in rows)
    assert [r["data_ops"] for r in rows] == [True, True, False, False, False]
    assert mec.groups == {"python3": [0], "other": [1], "bash": [2, 3, 4]}


def test_group_names_as_targets(mec):
    r = mec.execute("import os; print(os.environ.get('IME_FLAVOUR', 'plain'))", targets="python3")
    assert [x["id"] for x in r] == [0] and r[0]["stdout"] == "plain\n"
    r = mec.execute("import os; print(os.environ.get('IME_FLAVOUR', 'plain'))", targets="other")
    assert [x["id"] for x in r] == [1] and r[0]["stdout"] == "other\n"
    r = mec.execute("print(1)", targets=["other", "python3"])
    assert [x["id"] for x in r] == [1, 0]
    assert [x["id"] for x in mec.execute("true", targets="bash")] == [2, 3, 4]
    assert [x["id"] for x in mec.execute("true", targets=[3, 4])] == [3, 4]
    mec.targets = "other"
    try:
        assert [x["id"] for x in mec.execute("pass")] == [1]
    finally:
        mec.targets = "all"


def test_unknown_group_names_the_valid_ones(mec):
    with pytest.raises(ValueError, match=r"'python3', 'other', 'bash'.*not 'nope'"):
        mec.execute("pass", targets="nope")
    with pytest.raises(ValueError, match="nope"):
        mec.targets = "nope"
    with pytest.raises(ValueError, match="twice"):
        mec.execute("pass", targets=["python3", 0])


def test_bash_engines_run_shell_code(mec):
    r = mec.execute("uname -n; echo $RANDOM", targets="bash")
    assert [x["id"] for x in r] == [2, 3, 4]
    for x in r:
        host, rnd = x["stdout"].split()
        assert host == socket.gethostname()
        assert 0 <= int(rnd) < 32768
    text = repr(r)
    assert "[2] In [" in text and "uname -n; echo $RANDOM" in text and "[4] Out[" in text


def test_bash_engines_keep_state_and_report_errors(mec):
    mec.execute("GREETING=hello", targets=2)
    assert mec.execute("echo $GREETING", targets=2)[0]["stdout"] == "hello\n"
    assert mec.execute("echo ${GREETING:-unset}", targets=3)[0]["stdout"] == "unset\n"
    with pytest.raises(CompositeError) as info:
        mec.execute("no_such_command_xyz", targets="bash")
    assert len(info.value.elist) == 3


@pytest.mark.parametrize("op", ["push", "pull", "apply", "map", "scatter", "gather"])
def test_data_ops_on_bash_engines_fail_clearly(mec, op):
    calls = {
        "push": lambda: mec.push({"a": 1}, targets="bash"),
        "pull": lambda: mec.pull("a", targets="bash"),
        "apply": lambda: mec.apply(len, [1], targets="bash"),
        "map": lambda: mec.map(abs, range(6), targets="bash"),
        "scatter": lambda: mec.scatter("a", range(6), targets="bash"),
        "gather": lambda: mec.gather("a", targets="bash"),
    }
    with pytest.raises(CompositeError) as info:
        calls[op]()
    assert all(isinstance(e, EngineError) for e in info.value.elist)
    assert "need a Python engine with ipy_multiengine installed" in str(info.value)
    assert "bash" in str(info.value)


def test_data_ops_on_python_groups_work(mec):
    mec.push({"a": 7}, targets=["python3", "other"])
    assert mec.pull("a", targets=["python3", "other"]) == [7, 7]
    assert mec.map(lambda x: x * 2, range(4), targets="other") == [0, 2, 4, 6]


def test_cluster_file_carries_groups(hetero, mec):
    spec = json.loads(Path(hetero.cluster_file).read_text())
    assert [e["group"] for e in spec["engines"]] == ["python3", "other", "bash", "bash", "bash"]
    other = MultiEngineClient(hetero.cluster_file)
    try:
        assert other.groups == mec.groups
        assert [r["kernelspec"] for r in other.engines] == [r["kernelspec"] for r in mec.engines]
        assert other.execute("echo from-file", targets="bash")[0]["stdout"] == "from-file\n"
    finally:
        other.close()


def test_engines_argument_is_checked():
    for bad in ({}, {"python3": 0}, {"python3": "2"}, {"all": 1}, [("python3", 1)]):
        with pytest.raises(ValueError):
            Cluster(engines=bad)


def test_unknown_kernelspec_is_named():
    cl = Cluster(engines={"no-such-kernelspec-xyz": 1}, profile="beyond-bad", write_file=False)
    with pytest.raises(ValueError, match=r"no-such-kernelspec-xyz.*available"):
        cl.start()
    cl.stop()


# ---------------------------------------------------------------------- status table
def test_status_counts_a_request_submitted_just_before_it_while_the_loop_lags(mec, flag):
    """status() right after a submission shows it queued, also when the I/O loop has not
    handled the submission yet (a loaded machine: here the loop is held up on purpose)."""
    from ipy_multiengine import _loop

    listener, started = started_listener("WAITING-Q")
    pr = mec.execute(wait_code(flag, "WAITING-Q"), targets=0, block=False, listener=listener)
    assert started.wait(30), "engine 0 never started the waiting code"
    held_up = threading.Event()
    _loop.call_soon(held_up.wait, 0.5)  # the loop is busy for 0.5 s (as under load)
    queued = mec.execute("x_after = 1", targets=0, block=False)
    rows = {r["id"]: r for r in mec.status().rows}
    held_up.set()
    assert rows[0]["state"] == "busy" and rows[0]["queued"] == 1
    flag.touch()
    pr.get_result(timeout=30)
    queued.get_result(timeout=30)


def test_status_table_shows_busy_engines_what_they_run_and_queues(mec, flag):
    listener, started = started_listener("WAITING-P")
    code = wait_code(flag, "WAITING-P")
    pr = mec.execute(code, targets=0, block=False, listener=listener)
    queued = mec.execute("x_after = 1", targets=0, block=False)
    bash = mec.execute(
        f"echo WAITING-B; while [ ! -e {flag} ]; do sleep 0.01; done",
        targets=2,
        block=False,
        listener=started_listener("WAITING-B")[0],
    )
    assert started.wait(30), "engine 0 never started the waiting code"
    table = mec.status()
    rows = {r["id"]: r for r in table.rows}
    assert rows[0]["state"] == "busy"
    assert rows[0]["running"].startswith("import os, time")
    assert rows[0]["busy_for"] is not None and rows[0]["busy_for"] >= 0
    assert rows[0]["queued"] == 1
    assert rows[1]["state"] == "idle" and rows[1]["queued"] == 0 and rows[1]["running"] == ""
    assert all(r["rss"] and r["rss"] > 10_000_000 for r in rows.values())
    assert all(r["cpu"] is not None and r["cpu"] >= 0 for r in rows.values())
    text = repr(table)
    header = text.splitlines()[0].split()
    assert header == [
        "id",
        "group",
        "host",
        "pid",
        "state",
        "running",
        "for",
        "queued",
        "rss",
        "cpu",
    ]
    line0 = text.splitlines()[1]
    assert line0.split()[:5] == ["0", "python3", socket.gethostname(), str(rows[0]["pid"]), "busy"]
    assert "import os, time" in line0 and " MB" in line0
    html = table._repr_html_()
    assert html.startswith("<table") and ">busy</td>" in html and ">python3</td>" in html
    flag.touch()
    pr.get_result(timeout=30)
    queued.get_result(timeout=30)
    bash.get_result(timeout=30)
    rows = {r["id"]: r for r in mec.status().rows}
    assert rows[0]["queued"] == 0 and rows[0]["state"] == "idle" and rows[0]["running"] == ""


def test_status_of_a_busy_bash_engine(mec, flag):
    listener, started = started_listener("WAITING-B")
    pr = mec.execute(
        f"echo WAITING-B; while [ ! -e {flag} ]; do sleep 0.01; done",
        targets=3,
        block=False,
        listener=listener,
    )
    assert started.wait(30)
    row = next(r for r in mec.status().rows if r["id"] == 3)
    assert row["state"] == "busy" and row["running"].startswith("echo WAITING-B")
    assert row["rss"] > 0  # the kernel and its bash child
    flag.touch()
    pr.get_result(timeout=30)


# ---------------------------------------------------------------------- pull_table and %pxdiff
def test_pull_table_as_dataframe(mec):
    pd = pytest.importorskip("pandas")
    mec.execute("a = 1; b = 'x'", targets="python3")
    mec.execute("a = 2", targets="other")
    mec.execute("b = 'y'; del a", targets="other")
    df = mec.pull_table(["a", "b"])
    assert isinstance(df, pd.DataFrame)
    assert list(df.index) == [0, 1] and df.index.name == "engine"
    assert list(df.columns) == ["a", "b"]
    assert df.loc[0, "a"] == 1 and pd.isna(df.loc[1, "a"])
    assert list(df["b"]) == ["x", "y"]
    single = mec.pull_table("b", targets="other")
    assert list(single.index) == [1] and single.loc[1, "b"] == "y"


def test_pull_table_without_pandas(mec, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    mec.execute("a = [1, 2]; b = None", targets=["python3", "other"])
    mec.execute("del b", targets="other")
    rows = mec.pull_table(("a", "b"))
    assert rows == [{"engine": 0, "a": [1, 2], "b": None}, {"engine": 1, "a": [1, 2]}]


def test_pull_table_explicit_bash_targets_fail(mec):
    with pytest.raises(CompositeError, match="need a Python engine"):
        mec.pull_table("a", targets="bash")


def test_diff_groups_engines_by_value(mec):
    np = pytest.importorskip("numpy")
    mec.execute(
        "import numpy as np; arr = np.arange(4.0); same = float('nan'); s = 'v'", targets=[0, 1]
    )
    d = mec.diff("arr")
    assert d.identical and d.groups[0][1] == [0, 1]
    assert mec.diff("same").identical  # NaN equals NaN here
    mec.execute("arr[2] = -1", targets=1)
    d = mec.diff("arr")
    assert not d.identical and [eids for _, eids in d.groups] == [[0], [1]]
    assert np.array_equal(d.groups[1][0], [0.0, 1.0, -1.0, 3.0])
    mec.execute("del s", targets=0)
    d = mec.diff("s")
    assert d.missing == [0] and d.groups == [("v", [1])]
    text = repr(d)
    assert text.splitlines()[0] == "s: 1 different value, missing on 1 engine"
    assert "engines [0]: <not defined>" in text


def test_magics_pxdiff_and_pxstatus(mec):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "ipy_multiengine")
    mec.activate()
    mec.execute("v = 1", targets=0)
    mec.execute("v = 2", targets=1)
    d = ip.run_line_magic("pxdiff", "v")
    assert [eids for _, eids in d.groups] == [[0], [1]]
    assert "v: 2 different values" in repr(d)
    d = ip.run_line_magic("pxdiff", "v --targets 0")
    assert d.identical
    d = ip.run_line_magic("pxdiff", "v --targets python3,other")
    assert not d.identical
    table = ip.run_line_magic("pxstatus", "")
    assert [r["id"] for r in table.rows] == [0, 1, 2, 3, 4]
    # bad input is a UsageError (magic_arguments, issue 13 item 4), shown by IPython in one line
    with pytest.raises(UsageError, match="usage"):
        ip.run_line_magic("pxdiff", "")
    with pytest.raises(UsageError, match="Python engine"):
        ip.run_line_magic("pxdebug", "2")
    ip.run_line_magic("unload_ext", "ipy_multiengine")
    assert "pxdiff" not in ip.magics_manager.magics["line"]
    ip.run_line_magic("load_ext", "ipy_multiengine")  # leave the shared shell as %load_ext left it
    mec.activate()


def test_px_magics_on_bash_engines(mec, capsys):
    """``%px uname -n; echo $RANDOM`` and ``%%px --targets bash`` (needs the magics branch)."""
    pytest.importorskip("ipy_multiengine.magics")
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    import ipy_multiengine

    ipy_multiengine.load_ipython_extension(ip)  # what %load_ext runs (idempotent)
    assert {"pxstatus", "pxdebug", "pxdiff", "px"} <= set(ip.magics_manager.magics["line"])
    mec.activate()
    mec.targets = "bash"
    try:
        ip.run_line_magic("px", "uname -n; echo $RANDOM")
        r = _last_on_bash(mec, "uname -n; echo $RANDOM")
        assert all(x["stdout"].split()[0] == socket.gethostname() for x in r)
    finally:
        mec.targets = "all"
    ip.run_cell_magic("px", "--targets bash", "echo cell-$((6*7))")
    r = _last_on_bash(mec, "echo cell-$((6*7))")
    assert all(x["stdout"] == "cell-42\n" for x in r)
    assert "cell-42" in capsys.readouterr().out
    mec.targets = "bash"
    try:
        assert ip.run_cell("%autopx").success
        res = ip.run_cell("X=auto; echo $X-$((6*7))")
        assert ip.run_cell("%autopx").success
    finally:
        mec.targets = "all"
    assert res.success
    r = _last_on_bash(mec, "X=auto; echo $X-$((6*7))")
    assert all(x["stdout"] == "auto-42\n" for x in r)


def _last_on_bash(mec, code: str) -> list:
    """``mec.get_result()`` is the last command executed on *each* engine (issue 11 item 4):
    the bash engines' entries are ``code``, in engine order; the Python engines' are older."""
    r = mec.get_result()
    assert [x["id"] for x in r] == sorted(x["id"] for x in r)
    mine = [x for x in r if x["input"]["raw"].strip() == code]
    assert [x["id"] for x in mine] == [2, 3, 4], [(x["id"], x["input"]["raw"]) for x in r]
    return mine


def test_dead_and_restarted_bash_engine_in_the_tables():
    """A killed bash engine shows as dead in the status table; a restart keeps its kernelspec."""
    import psutil

    with private_kernelspecs():
        cl = Cluster(engines={"bash": 1, "python3": 1}, profile="beyond-restart", write_file=False)
        try:
            mec = cl.start()
            first = mec.engines[0]["pid"]
            pids = family(first)
            pause = threading.Event()
            psutil.Process(first).kill()
            deadline = time.monotonic() + 30
            while not mec.controller.dead(0):  # the liveness poller notices within its period
                assert time.monotonic() < deadline, "engine 0 never reported dead"
                pause.wait(0.05)
            row = mec.status().rows[0]
            assert row["state"] == "dead" and row["rss"] is None and "dead (" in repr(mec.status())
            assert mec.status().rows[1]["state"] == "idle"
            with pytest.raises(EngineError, match="dead"):
                mec.execute("echo hi", targets="bash")
            mec.restart(targets="bash")
            row = mec.engines[0]
            assert row["state"] != "dead" and row["language"] == "bash" and row["group"] == "bash"
            assert row["pid"] != first
            pids += family(row["pid"])
            assert mec.execute("echo back", targets="bash")[0]["stdout"] == "back\n"
        finally:
            cl.stop()
    assert_gone(pids)


def test_ipmulti_start_engines_option(tmp_path):
    """``ipmulti start --engines python3=1,bash=2 --daemon``: groups reach clients of the file."""
    import subprocess

    import psutil

    from ipy_multiengine.cli import parse_engines

    assert parse_engines("python3=1, bash=2") == {"python3": 1, "bash": 2}
    for bad in ("python3", "python3=x", "=2", "python3=2,"):
        with pytest.raises(ValueError, match="KERNELSPEC=N"):
            parse_engines(bad)
    ipmulti = [sys.executable, "-m", "ipy_multiengine.cli"]
    with private_kernelspecs():
        out = subprocess.run(
            [*ipmulti, "start", "--engines", "python3=1,bash=2", "--profile", "mixed", "--daemon"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert out.returncode == 0, out.stderr
        spec = json.loads(Path(out.stdout.strip()).read_text())
        pids = [spec["owner_pid"]] + [p for e in spec["engines"] for p in family(e["pid"])]
        try:
            mec = MultiEngineClient(profile="mixed")
            try:
                assert mec.groups == {"python3": [0], "bash": [1, 2]}
                assert [r["language"] for r in mec.engines] == ["python", "bash", "bash"]
                assert [r["stdout"] for r in mec.execute("echo $((2+3))", targets="bash")] == [
                    "5\n",
                    "5\n",
                ]
            finally:
                mec.close()
        finally:
            stopped = subprocess.run(
                [*ipmulti, "stop", "--profile", "mixed"], capture_output=True, text=True, timeout=60
            )
        assert stopped.returncode == 0, stopped.stderr
    assert_gone([p for p in pids if psutil.pid_exists(p)], timeout=20)
    bad = subprocess.run(
        [*ipmulti, "start", "--engines", "python3", "--profile", "mixed-bad"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "KERNELSPEC=N" in bad.stderr


def test_connection_without_stdin_port_still_works(hetero, mec, tmp_path):
    """A cluster file whose connection info lacks stdin_port: execute works, input() says why
    not."""
    spec = json.loads(Path(hetero.cluster_file).read_text())
    spec["engines"] = [e for e in spec["engines"] if e["id"] == 0]
    del spec["engines"][0]["connection"]["stdin_port"]
    path = tmp_path / "no-stdin.json"
    path.write_text(json.dumps(spec))
    other = MultiEngineClient(path)
    try:
        assert other.execute("print(6 * 7)")[0]["stdout"] == "42\n"
        with pytest.raises(CompositeError, match="StdinNotImplementedError"):
            other.execute("input('x? ')")
    finally:
        other.close()
