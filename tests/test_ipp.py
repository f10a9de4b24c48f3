"""What ipyparallel users reach for (issue 16, items 5-9): against the session's real engines."""

from __future__ import annotations

import warnings

import pytest
from faultlib import held_code, wait_for

from ipy_multiengine import client
from ipy_multiengine.controller import Controller

pytestmark = pytest.mark.timeout(60)


def test_no_private_constructor_keywords_cross_modules(mec):
    """Cluster and attach build their clients with the public from_controller (issue 13)."""
    with pytest.raises(TypeError, match="_controller"):
        client.MultiEngineClient(_controller=mec.controller)
    with pytest.raises(TypeError, match="controller must be a Controller, not str"):
        client.MultiEngineClient.from_controller("nope")
    assert isinstance(mec.controller, Controller)


def test_engine_id_in_every_namespace_kept_across_reset_and_restart(mec):
    # the fixture ran %reset -f: the name came back after that cell
    assert mec.pull("engine_id") == [0, 1, 2, 3]
    assert mec.execute("%who")[0]["stdout"].strip() in ("", "Interactive namespace is empty.")
    mec.execute("del engine_id", targets=2)
    assert mec.pull("engine_id", targets=2) == [2]
    mec.restart(targets=3)
    assert mec.apply(lambda: engine_id, targets=3) == [3]  # noqa: F821 (an engine name)
    assert mec.pull("engine_id") == [0, 1, 2, 3]


def test_scatter_flatten_gives_one_item_parts_as_scalars(mec):
    mec.scatter("my_id", mec.get_ids(), flatten=True)
    assert mec.pull("my_id") == [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one item per engine: nothing to warn of
        mec.scatter("my_id", mec.get_ids(), flatten=True)
    # parts of two items stay lists; gather could not tell [[0, 1], [2, 3]] flattened from
    # these parts, so the call says so (ipyparallel's behaviour, not silently)
    with pytest.warns(UserWarning, match=r"engines \[2, 3\] get their one item itself"):
        mec.scatter("part", list(range(6)), flatten=True)
    assert mec.pull("part") == [[0, 1], [2, 3], 4, 5]
    mec.scatter("plain", [7, 8, 9, 10])
    assert mec.pull("plain") == [[7], [8], [9], [10]]
    with pytest.raises(TypeError, match="flatten must be True or False, not 'yes'"):
        mec.scatter("x", [1, 2, 3, 4], flatten="yes")
    assert mec.pull("my_id") == [0, 1, 2, 3]


def test_silent_execute_keeps_no_output_no_history_no_count(mec):
    before = mec.execute("x = 1")
    shown = mec.last_executed()
    quiet = mec.execute(
        "print('hidden'); import sys; sys.stderr.write('e'); y = x + 1; y", silent=True
    )
    assert [r["stdout"] + r["stderr"] for r in quiet] == [""] * 4
    assert [r["result"] for r in quiet] == [None] * 4 and [r["outputs"] for r in quiet] == [[]] * 4
    assert mec.pull("y") == [2] * 4  # it ran
    assert mec.last_executed() is shown  # %result still shows the last visible command
    after = mec.execute("z = 3")
    assert [r["number"] for r in after] == [r["number"] + 1 for r in before]  # not counted
    hist = mec.execute("_ih[-2:]")[0]["result"]["text/plain"]
    assert "hidden" not in hist
    with pytest.raises(client.CompositeError) as info:
        mec.execute("1/0", silent=True)
    assert "ZeroDivisionError" in str(info.value)
    with pytest.raises(TypeError, match="silent must be True or False, not 1"):
        mec.execute("pass", silent=1)
    assert mec.pull("z") == [3] * 4


def test_run_a_file_on_the_engines(mec, tmp_path):
    script = tmp_path / "setup_engines.py"
    script.write_text("ran = engine_id * 10\nprint('from the file')\n")
    out = mec.run(script)
    assert [r["stdout"] for r in out] == ["from the file\n"] * 4
    assert mec.pull("ran") == [0, 10, 20, 30]
    assert mec.run(str(script), targets=[1], silent=True)[0]["stdout"] == ""
    with pytest.raises(FileNotFoundError, match=r"cannot run .*missing\.py"):
        mec.run(tmp_path / "missing.py")
    (tmp_path / "bin.py").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        mec.run(tmp_path / "bin.py")
    with pytest.raises(TypeError, match="filename must be a path, not int"):
        mec.run(3)
    assert mec.pull("ran") == [0, 10, 20, 30]


def test_sync_imports_runs_the_blocks_imports_on_the_engines(mec, capsys):
    mec.execute("import sys; sys.modules.pop('json', None); sys.modules.pop('fractions', None)")
    with mec.sync_imports():
        import json as js
        from fractions import Fraction as Fr
    assert "import json as js; from fractions import Fraction as Fr on engines 0-3" in (
        capsys.readouterr().out
    )
    assert mec.apply(lambda: (js.dumps([1]), str(Fr(1, 2)))) == [("[1]", "1/2")] * 4
    assert mec.execute("type(js).__name__, Fr.__name__")[0]["result"]["text/plain"] == (
        "('module', 'Fraction')"
    )
    with pytest.raises(ModuleNotFoundError), mec.sync_imports(quiet=True):
        import no_such_module_here  # noqa: F401  (fails here: nothing is sent)
    with pytest.raises(TypeError, match="quiet must be True or False, not 'no'"):
        mec.sync_imports(quiet="no")
    with pytest.raises(ValueError, match="9"):
        mec.sync_imports(targets=[9])


def test_require_imports_and_sets_names_before_each_call(mec):
    from ipy_multiengine import require

    def helper(x):
        return x * 3

    @require("colorsys", "xml.dom.minidom", helper, scale=10)
    def f(x):
        return colorsys.__name__, xml.dom.minidom.__name__, helper(x) * scale  # noqa: F821

    assert mec.apply(f, 2, targets=[0, 1]) == [("colorsys", "xml.dom.minidom", 60)] * 2
    assert mec.map(f, [1, 2, 3, 4])[3] == ("colorsys", "xml.dom.minidom", 120)
    assert mec.pull("scale", targets=0) == [10]  # the names are now in the namespace
    assert f.__name__ == "f"

    @require("no_such_module_xyz")
    def g():
        return 1

    with pytest.raises(client.CompositeError) as info:
        mec.apply(g, targets=[2])
    text = str(info.value)
    assert "ModuleNotFoundError" in text and "g requires module 'no_such_module_xyz'" in text
    assert "engine 2" in text
    for bad, match in [
        ((42,), "require takes module names, modules, functions or classes, not 42"),
        (("not a module",), "a required module must be a name like"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            require(*bad)
    with pytest.raises(TypeError, match="require decorates a function, not int"):
        require("os")(3)
    assert mec.apply(lambda: 1) == [1] * 4


def test_reference_arguments_resolve_in_the_engine_namespace(mec):
    from ipy_multiengine import Reference

    mec.scatter("part", list(range(8)))
    assert mec.apply(sum, Reference("part")) == [1, 5, 9, 13]
    assert mec.apply(lambda n, *, m: n + m, Reference("engine_id"), m=Reference("engine_id")) == [
        0,
        2,
        4,
        6,
    ]
    assert mec.apply(lambda s: s, Reference("part.__len__")) != []
    assert mec.map(lambda a, b: a + b, [1, 2, 3, 4], [Reference("engine_id")] * 4) == [1, 3, 5, 7]
    import copy
    import pickle

    ref = Reference("part")
    assert pickle.loads(pickle.dumps(ref)) == ref and copy.deepcopy(ref) is ref  # not resolved here
    with pytest.raises(client.CompositeError) as info:
        mec.apply(len, Reference("missing"), targets=[1])
    assert "Reference('missing'): name 'missing' is not defined on engine 1" in str(info.value)
    with pytest.raises(ValueError, match="Reference name must be a name like"):
        Reference("1x")
    assert mec.apply(len, Reference("part")) == [2] * 4


def test_pending_result_metadata_per_engine(mec, capsys, tmp_path):
    go = tmp_path / "go"
    pr = mec.execute(
        "import time, sys; print('out', engine_id); sys.stderr.write('err\\n')\n"
        + held_code(go)
        + "time.sleep(0.2)",
        block=False,
    )
    try:
        assert pr.wall_time is None and pr.serial_time is None and pr.elapsed >= 0
        # held until this client has seen every engine busy: then each ran 0.2 s more between
        # the busy and the reply seen here, whatever the delivery delays (they came in
        # 0.06 s of each other on a loaded box, seen as less than 0.2 s)
        wait_for(lambda: all(s is not None for s in pr.started), 20, "the engines to be busy")
    finally:
        go.touch()
    pr.get_result(timeout=20)
    md = pr.metadata
    assert [m["engine_id"] for m in md] == [0, 1, 2, 3]
    for m in md:
        assert m["status"] == "ok" and m["error"] is None
        assert m["submitted"] <= m["started"] <= m["completed"]
        # started/completed are when this client received the engine's busy and its reply
        # and idle (the client's clock, like submitted): the engine slept 0.2 s after it was
        # let go, once its busy had been seen
        assert (m["completed"] - m["started"]).total_seconds() >= 0.19  # as seen here
        assert m["stdout"] == f"out {m['engine_id']}\n" and m["stderr"] == "err\n"
    assert pr.submitted == [m["submitted"] for m in md] and pr.completed[0] == md[0]["completed"]
    assert 0.2 <= pr.wall_time < 10 and pr.elapsed == pr.wall_time
    assert pr.serial_time >= 4 * 0.19 and pr.serial_time > pr.wall_time  # ran in parallel
    pr.display_outputs()
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [f"[stdout:{e}] out {e}" for e in range(4)]
    assert cap.err.splitlines() == [f"[stderr:{e}] err" for e in range(4)]
    mec.execute("from IPython.display import HTML, display; display(HTML('<b>x</b>'))", targets=[1])
    mec.last_executed().display_outputs(groupby="type")
    assert "[output:1]" in capsys.readouterr().out
    with pytest.raises(ValueError, match="groupby must be 'engine' or 'type', not 'order'"):
        pr.display_outputs(groupby="order")
    failed = mec.execute("1/0", targets=[2], block=False)
    with pytest.raises(client.CompositeError):
        failed.get_result(timeout=20)
    assert failed.metadata[0]["status"] == "error" and failed.metadata[0]["completed"]
    applied = mec.apply(lambda: 1, block=False)
    applied.get_result(timeout=20)
    assert all(m["completed"] for m in applied.metadata)


def test_serial_time_of_a_queued_apply_counts_from_when_its_engine_started_it(mec):
    """An apply answered on the fast socket has no busy status: the engine's 'started' stamp
    filled PendingResult.started but not the monotonic start durations use, so its
    serial_time counted from submission, including the time it waited behind another call
    (here: about twice the time the engine spent on it)."""
    import time

    ahead = mec.apply(time.sleep, 0.5, targets=[0], block=False)
    queued = mec.apply(time.sleep, 0.5, targets=[0], block=False)
    queued.get_result(timeout=30)
    ahead.get_result(timeout=30)
    assert queued.started[0] is not None and queued.started[0] > queued.submitted[0]
    assert 0.45 <= queued.serial_time <= queued.elapsed - 0.25, (
        queued.serial_time,
        queued.elapsed,
    )


def test_abort_skips_queued_requests_never_running_ones(mec, tmp_path):
    import os

    from faultlib import hang_code, marker, wait_for

    pid = mec.apply(os.getpid, targets=0)[0]
    running = mec.execute(hang_code(tmp_path, "sleep"), targets=[0], block=False)
    # in the cell (its marker): "started" is the kernel's busy, sent before it takes SIGINT
    wait_for(marker(tmp_path, "sleep", pid).exists, 10, "engine 0 running the sleep")
    wait_for(lambda: running.started[0] is not None, 10, "engine 0 seen busy")
    queued_exec = mec.execute("queued = 1", targets=[0], block=False)
    queued_apply = mec.apply(lambda: 2, targets=[0], block=False)
    both = mec.execute("mixed = 1", targets=[0, 1], block=False)  # done on 1, queued on 0
    wait_for(lambda: both.metadata[1]["completed"], 10, "engine 1 done")
    with pytest.raises(client.EngineError, match=r"already running on engines \[0\].*interrupt"):
        running.abort()
    for pr in (queued_exec, queued_apply, both):
        pr.abort()
    mec.interrupt(targets=[0])
    with pytest.raises(client.CompositeError, match="KeyboardInterrupt"):
        running.get_result(timeout=10)
    for pr in (queued_exec, queued_apply, both):
        with pytest.raises(client.CompositeError, match="Abort"):
            pr.get_result(timeout=10)
    assert [m["status"] for m in both.metadata] == ["aborted", "ok"]
    assert queued_apply.metadata[0]["status"] == "aborted"
    seen = mec.execute("'queued' in dir(), 'mixed' in dir()", targets=[0, 1])
    assert [r["result"]["text/plain"] for r in seen] == ["(False, False)", "(False, True)"]
    queued_apply.abort()  # done already: nothing to do
    balanced = mec.map(lambda x: x, [1], balanced=True, block=False)
    with pytest.raises(client.EngineError, match="a map cannot be aborted"):
        balanced.abort()
    assert mec.apply(lambda: 3, targets=[0]) == [3]  # the engine is usable


def test_a_running_shared_cluster_grows_with_ipmulti_scale(tmp_path):
    """`ipmulti start --daemon -n 1`, then `ipmulti scale 2`: the owner adds engine 1 through
    Cluster.add_engines, rewrites the cluster file, and a client attached by file before the
    scale sees the new engine (wait_for_engines), with its own on_start code run there."""
    import json
    import subprocess
    import sys

    from ipy_multiengine.clusterfile import cluster_file_path

    ipmulti = [sys.executable, "-m", "ipy_multiengine.cli"]
    run = lambda *a: subprocess.run(ipmulti + list(a), capture_output=True, text=True, timeout=90)  # noqa: E731
    started = run("start", "--daemon", "-n", "1", "--profile", "t16scale")
    assert started.returncode == 0, started.stderr
    try:
        mec = client.MultiEngineClient(profile="t16scale")
        mec.on_start("flag = engine_id * 100")
        assert mec.get_ids() == [0]
        bad = run("scale", "0", "--profile", "t16scale")
        assert bad.returncode == 2 and "scale only grows it" in bad.stderr
        grown = run("scale", "2", "--profile", "t16scale")
        assert grown.returncode == 0, grown.stderr
        assert "added engine 1: 2 engines" in grown.stdout
        spec = json.loads(cluster_file_path("t16scale").read_text())
        assert [e["id"] for e in spec["engines"]] == [0, 1]
        assert mec.wait_for_engines(2, timeout=30) == [0, 1]
        assert mec.pull("flag") == [0, 100]  # this client's on_start ran on the new engine
        assert mec.apply(lambda: engine_id) == [0, 1]  # noqa: F821
        assert len(mec.engines) == 2 and mec.groups == {"python3": [0, 1]}
        with client.MultiEngineClient(profile="t16scale") as later:
            assert later.get_ids() == [0, 1]
        # a signal through the owner process (an owner request), to the new engine only
        from faultlib import wait_for

        mec.execute(
            "import signal; got = []; signal.signal(signal.SIGUSR1, lambda *a: got.append(1))"
        )
        mec.send_signal("SIGUSR1", targets=[1])
        wait_for(lambda: mec.pull("got") == [[], [1]], 10, "the signal through the owner")
        with pytest.raises(ValueError, match="a number of engines >= 0, not -1"):
            mec.wait_for_engines(-1)
        with pytest.raises(client.TimeoutError, match=r"2 engines ready after 0\.2 s, waiting"):
            mec.wait_for_engines(3, timeout=0.2)
        mec.close()
    finally:
        stopped = run("stop", "--profile", "t16scale")
        assert stopped.returncode == 0, stopped.stderr


def test_add_engines_checks_its_argument_first(cluster, mec):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="add_engines needs a positive number of engines"):
            cluster.add_engines(bad)
    with pytest.raises(
        ValueError, match="timeout must be a number of seconds >= 0 or None, not -1"
    ):
        cluster.add_engines(1, timeout=-1)
    with pytest.raises(ValueError, match="not 'soon'"):
        mec.wait_for_engines(1, timeout="soon")
    with pytest.raises(ValueError, match="not nan"), mec.sync_imports(timeout=float("nan")):
        pass
    assert mec.get_ids() == [0, 1, 2, 3]


def _run(ip, code):
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        res = ip.run_cell(code)
    return cap, res


def test_named_magic_sets_side_by_side(ip, mec):
    """mec.activate(suffix='_even', targets=[0, 2]): %px_even, %%px_even, %autopx_even and
    %result_even next to the default %px set, in a real InteractiveShell."""
    mec.activate(suffix="_even", targets=[0, 2])
    try:
        cap, res = _run(ip, "%px_even where = 'even'")
        assert res.success, res.error_in_exec
        assert [r["id"] for r in res.result] == [0, 2]
        cap, res = _run(ip, "%%px_even\nprint('hello from', engine_id)\n")
        assert res.success
        assert "hello from 0" in cap.stdout and "hello from 2" in cap.stdout
        assert "hello from 1" not in cap.stdout and "hello from 3" not in cap.stdout
        cap, res = _run(ip, "%px who = engine_id")  # the default set: all engines
        assert [r["id"] for r in res.result] == [0, 1, 2, 3]
        cap, res = _run(ip, "%result_even")
        assert [r["id"] for r in res.result] == [0, 2]  # its own last command
        assert "hello from" in res.result[0]["stdout"]
        cap, res = _run(ip, "%result")
        assert [r["id"] for r in res.result] == [0, 1, 2, 3]
        cap, res = _run(ip, "%autopx_even")
        assert "Auto Parallel Enabled" in cap.stdout
        cap, res = _run(ip, "auto_even = engine_id + 1")
        assert "auto_even" not in ip.user_ns
        cap, res = _run(ip, "%autopx_even")
        assert "Auto Parallel Disabled" in cap.stdout
        _run(ip, "local_again = 1")
        assert ip.user_ns["local_again"] == 1
        seen = mec.execute("'auto_even' in dir(), 'where' in dir()")
        assert [r["result"]["text/plain"] for r in seen] == [
            "(True, True)",
            "(False, False)",
            "(True, True)",
            "(False, False)",
        ]
        with pytest.raises(ValueError, match=r"suffix must make magic names.*'-x'"):
            mec.activate(suffix="-x")
        with pytest.raises(ValueError, match="9"):
            mec.activate(suffix="_odd", targets=[1, 9])
        with pytest.raises(ValueError, match="targets= names the engines of a named set"):
            mec.activate(targets=[1])
        assert "px_odd" not in ip.magics_manager.magics["line"]
    finally:
        client.deactivate("_even")
    assert "px_even" not in ip.magics_manager.magics["line"]
    assert "px_even" not in ip.magics_manager.magics["cell"]
    assert client.get_active() is mec


def test_send_signal_reaches_the_target_engines_only(mec):
    import signal

    from faultlib import wait_for

    mec.execute(
        "import signal; got = []; signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))"
    )
    mec.send_signal("SIGUSR1", targets=[1])
    # one at a time: two SIGUSR1 pending at once are delivered as one
    wait_for(lambda: mec.pull("got") == [[], [10], [], []], 20, "the first signal to arrive")
    mec.send_signal(signal.SIGUSR1, targets=[1, 3])
    wait_for(lambda: mec.pull("got") == [[], [10, 10], [], [10]], 20, "the signals to arrive")
    for bad in ("SIGNOPE", 99999, True, 1.5):
        with pytest.raises(ValueError, match="not a signal"):
            mec.send_signal(bad)
    with pytest.raises(ValueError, match="9"):
        mec.send_signal("SIGUSR1", targets=[9])
    assert mec.pull("got") == [[], [10, 10], [], [10]]


def test_a_named_set_never_replaces_an_existing_magic(ip, mec):
    """activate(suffix='config') would make %pxconfig, %pxstatus... over the default set's
    own magics (and deactivate would then delete them): refused before anything is
    registered, naming the clash; the default magics keep working."""
    line = ip.magics_manager.magics["line"]
    before = {n: line[n] for n in ("pxconfig", "pxstatus", "pxresult", "pxdiff", "pxdebug")}
    for suffix in ("config", "status", "result", "diff", "debug"):
        with pytest.raises(ValueError, match=rf"%px{suffix} is already a magic"):
            mec.activate(suffix=suffix)
        client.deactivate(suffix)  # no such set: nothing to remove
        assert line[f"px{suffix}"] is before[f"px{suffix}"]
    assert not any(n.endswith("config") and n.startswith("result") for n in line)
    _cap, res = _run(ip, "%pxconfig --targets all")
    assert res.success, res.error_in_exec
    # a set of ours may be activated again (replaced), and again after deactivate
    mec.activate(suffix="_two", targets=[0])
    mec.activate(suffix="_two", targets=[1])
    try:
        _cap, res = _run(ip, "%px_two engine_id")
        assert [r["id"] for r in res.result] == [1]
    finally:
        client.deactivate("_two")
    mec.activate(suffix="_two", targets=[2])
    try:
        _cap, res = _run(ip, "%px_two engine_id")
        assert [r["id"] for r in res.result] == [2]
    finally:
        client.deactivate("_two")


def test_two_concurrent_scales_to_n_give_n_engines(tmp_path):
    """Two `ipmulti scale 3` at once on a 1-engine cluster: both read "1 engine"; each used to
    ask for 2 more, leaving 5. The owner now counts the total when it serves each request
    (held here by stopping the owner until both requests are waiting)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from faultlib import wait_for

    from ipy_multiengine.clusterfile import cluster_file_path, request_dir

    ipmulti = [sys.executable, "-m", "ipy_multiengine.cli"]
    run = lambda *a: subprocess.run(ipmulti + list(a), capture_output=True, text=True, timeout=90)  # noqa: E731
    started = run("start", "--daemon", "-n", "1", "--profile", "t16race")
    assert started.returncode == 0, started.stderr
    path = cluster_file_path("t16race")
    owner = json.loads(path.read_text())["owner"]["pid"]
    scales = []
    try:
        os.kill(owner, signal.SIGSTOP)
        try:
            scales = [
                subprocess.Popen(
                    [*ipmulti, "scale", "3", "--profile", "t16race"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            wait_for(
                lambda: len(list(request_dir(path).glob("*.json"))) == 2,
                30,
                "both scale requests waiting",
            )
        finally:
            os.kill(owner, signal.SIGCONT)
        outs = [p.communicate(timeout=120) for p in scales]
        assert [p.returncode for p in scales] == [0, 0], outs
        said = sorted(out for out, _ in outs)
        assert said == ["added engines 1, 2: 3 engines\n", "the cluster already has 3 engines\n"]
        assert [e["id"] for e in json.loads(path.read_text())["engines"]] == [0, 1, 2]
    finally:
        for p in scales:
            if p.poll() is None:
                p.kill()
                p.wait()
        stopped = run("stop", "--profile", "t16race")
        assert stopped.returncode == 0, stopped.stderr


def test_a_failed_add_leaves_no_dead_engine_behind():
    """An engine that add_engines started but could not connect is stopped by the launcher;
    it used to stay listed as dead, so every call on all engines failed with "restart it with
    mec.restart(1)", and that restart failed with "unknown engine ids [1]"."""
    from ipy_multiengine import Cluster

    with Cluster(n=1, profile="t16failadd") as mec:
        cluster = mec.owner
        with pytest.raises(client.EngineError, match="did not answer"):
            cluster.add_engines(1, timeout=0.001)
        assert mec.get_ids() == [0] and mec.get_ids().dead == {}
        assert sorted(cluster.launcher.managers) == [0]
        assert mec.apply(lambda: engine_id) == [0]  # noqa: F821 (an engine name)
        assert cluster.add_engines(1) == [1]
        assert mec.apply(lambda: engine_id) == [0, 1]  # noqa: F821


def test_a_call_on_all_engines_during_a_failed_add_never_sees_the_failed_engine():
    """A failed add_engines published its engine as dead on the loop, and only forgot it
    after the launcher had stopped it: meanwhile every call on all engines from another thread
    failed with "engine 1 is dead (failed to start ...)" for an engine it was never given."""
    import threading

    from ipy_multiengine import Cluster

    with Cluster(n=1, profile="rvfix-failadd") as mec:
        cluster = mec.owner
        errors: list = []

        def add() -> None:
            try:
                cluster.add_engines(1, timeout=0.001)
            except client.EngineError as exc:
                errors.append(exc)

        adder = threading.Thread(target=add)
        adder.start()
        seen = []
        while adder.is_alive():
            seen.append(mec.apply(lambda: engine_id, targets="all", block=True))  # noqa: F821
        adder.join(60)
        assert errors and "did not answer" in str(errors[0])
        assert {tuple(s) for s in seen} <= {(0,)}
        assert mec.get_ids() == [0] and mec.get_ids().dead == {}


def test_send_signal_refuses_an_engine_whose_process_has_exited():
    """An exited, reaped engine process leaves only its number, which the OS may give to an
    unrelated process group: the launcher refuses to signal it (it used to killpg the stale
    group id silently), before signalling any of the targets."""
    import signal

    from faultlib import wait_for

    from ipy_multiengine import Cluster

    with Cluster(n=2, profile="t16sigdead", auto_restart=False) as mec:
        cluster = mec.owner
        mec.execute(
            "import signal; got = []; signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))"
        )
        proc = cluster.launcher.managers[1].provisioner.process
        proc.kill()
        proc.wait(timeout=10)  # reaped: pid 'free'
        with pytest.raises(client.EngineError, match="engine 1: the process has exited"):
            cluster.send_signal([0, 1], signal.SIGUSR1)
        cluster.send_signal([0], signal.SIGUSR1)
        wait_for(lambda: mec.pull("got", targets=0) == [[10]], 20, "the one signal to engine 0")


def test_no_engines_are_added_once_a_stop_was_requested():
    """`ipmulti stop` and `ipmulti scale` served in one round: once the stop is taken, the add
    is refused (it used to start engines on a cluster about to stop, and say it added them)."""
    import json

    from ipy_multiengine import Cluster
    from ipy_multiengine.clusterfile import _canonical, request_dir

    with Cluster(n=1, profile="t16stopadd") as mec:
        cluster = mec.owner
        path = cluster.cluster_file
        where = {"cluster_file": _canonical(path), "cluster_id": cluster.cluster_id}
        d = request_dir(path)
        (d / "0-stop.json").write_text(json.dumps({**where, "op": "stop", "ids": []}))
        (d / "1-add.json").write_text(json.dumps({**where, "op": "add", "ids": [2], "to": 3}))
        cluster.serve_requests()
        assert cluster.stop_requested
        assert json.loads((d / "0-stop.done").read_text())["ok"] is True
        answer = json.loads((d / "1-add.done").read_text())
        assert "the cluster is stopping" in answer["error"], answer
        assert mec.get_ids() == [0] and sorted(cluster.launcher.managers) == [0]


def test_a_call_while_another_thread_connects_new_engines_waits_for_them():
    """An attached client: thread A's call connects the engine the owner added (running this
    client's slow on_start code there). A call from another thread meanwhile used to fail
    with 'engine 1 is not ready yet ...: restart it'; it now waits for that connection."""
    import threading

    from faultlib import wait_for

    from ipy_multiengine import Cluster

    with Cluster(n=1, profile="t16refresh") as own:
        att = client.MultiEngineClient(profile="t16refresh")
        try:
            att.on_start("import time; time.sleep(3)")
            assert own.owner.add_engines(1) == [1]  # the owner grows it, rewrites the file
            got: dict = {}

            def first() -> None:
                try:
                    got["a"] = att.apply(lambda: engine_id)  # noqa: F821
                except BaseException as exc:
                    got["a"] = exc

            a = threading.Thread(target=first)
            a.start()
            try:
                wait_for(lambda: 1 in att.get_ids(), 20, "thread A connecting engine 1")
                assert att.apply(lambda: engine_id) == [0, 1]  # noqa: F821
            finally:
                a.join(30)
            assert got["a"] in ([0, 1], [0]), got
        finally:
            att.close()


def test_sync_imports_on_one_line(mec, tmp_path):
    """`with mec.sync_imports(): import colorsys as cs` on one line (as typed at a prompt)
    used to fail with "cannot read the source of its with block"."""
    import runpy

    mec.execute("import sys; sys.modules.pop('colorsys', None)")
    script = tmp_path / "one_line.py"
    script.write_text("with mec.sync_imports(quiet=True): import colorsys as cs\n")
    assert runpy.run_path(str(script), {"mec": mec})["cs"].__name__ == "colorsys"
    assert mec.apply(lambda: cs.__name__) == ["colorsys"] * 4  # noqa: F821 (an engine name)


def test_sync_imports_reads_its_source_under_warnings_as_errors(mec, tmp_path):
    """sync_imports parses its file to find the with block: a warning of that file (an
    invalid escape, warned when the file was compiled) became an error under ``-W error``
    and sync_imports "cannot read the source of its with block"."""
    import warnings

    mec.execute("import sys; sys.modules.pop('colorsys', None)")
    script = tmp_path / "warns.py"
    script.write_text(
        'pattern = "\\d"\nwith mec.sync_imports(quiet=True):\n    import colorsys as cs\n'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = compile(script.read_text(), str(script), "exec")
    ns = {"mec": mec}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(code, ns)
    assert ns["cs"].__name__ == "colorsys"
    assert mec.apply(lambda: cs.__name__) == ["colorsys"] * 4  # noqa: F821 (an engine name)


def test_a_failed_add_is_not_restarted_automatically(caplog):
    """With auto_restart, an engine add_engines could not connect was also 'restarted' in
    the background while add_engines stopped it (logged as a failed automatic restart)."""
    import logging

    from ipy_multiengine import Cluster

    with Cluster(n=1, profile="t16failauto", auto_restart=True) as mec:
        cluster = mec.owner
        with caplog.at_level(logging.WARNING, logger="ipy_multiengine"):
            with pytest.raises(client.EngineError, match="did not answer"):
                cluster.add_engines(1, timeout=0.001)
            assert mec.apply(lambda: engine_id) == [0]  # noqa: F821 (an engine name)
        assert not [r for r in caplog.records if "restart" in r.getMessage()], caplog.text
        assert mec.get_ids() == [0] and sorted(cluster.launcher.managers) == [0]


def test_a_named_set_is_not_a_configurable_of_the_shell(ip, mec):
    """Every named set's ParallelMagics was added to the shell's configurables (IPython's
    Magics.__init__ does it) and stayed there after deactivate: `%config ParallelMagics`
    reached dropped sets, and the shell kept each one (and its bound client) alive."""
    from ipy_multiengine import client as client_mod
    from ipy_multiengine.magics import ParallelMagics

    def ours() -> list:
        return [c for c in ip.configurables if isinstance(c, ParallelMagics)]

    before = ours()
    mec.activate(suffix="_cfg", targets=[0])
    try:
        assert ours() == before, "a named set became a configurable of the shell"
    finally:
        client_mod.deactivate("_cfg")
    assert ours() == before
