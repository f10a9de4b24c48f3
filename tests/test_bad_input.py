"""Bad input: one test per row of the table in docs/troubleshooting-errors.md. Each gives one
clear error naming the offending thing and leaves the client and the other engines usable."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from faultlib import gone, wait_for

from ipy_multiengine import Cluster, MultiEngineClient
from ipy_multiengine.cluster import cluster_file_path
from ipy_multiengine.errors import CompositeError, EngineError, NoClusterError

pytestmark = pytest.mark.timeout(60)


def usable(mec, targets="all"):
    out = mec.execute("print('still fine')", targets=targets, timeout=10)
    assert all(r["stdout"] == "still fine\n" for r in out)


@pytest.fixture
def own_client(cluster):
    """A second, non-owning client of the session cluster (closing it leaves the engines up)."""
    c = MultiEngineClient(cluster.cluster_file)
    yield c
    c.close()


# ------------------------------------------------------------------ arguments
def test_wrong_targets(mec):
    with pytest.raises(ValueError, match=r"unknown engine id 9; valid ids: \[0, 1, 2, 3\]"):
        mec.execute("x = 1", targets=9)
    with pytest.raises(TypeError, match="engine ids must be ints, not '1'"):
        mec.pull("x", targets=[0, "1"])
    with pytest.raises(ValueError, match="unknown engine id 7"):
        mec.restart(7)
    with pytest.raises(ValueError, match="unknown engine id 5"):
        mec.interrupt(5)
    usable(mec)


def test_closed_client(own_client, mec):
    own_client.close()
    for call in (
        lambda: own_client.execute("1"),
        lambda: own_client.push({"a": 1}),
        lambda: own_client.pull("a"),
        lambda: own_client.restart(0),
    ):
        with pytest.raises(EngineError, match="this MultiEngineClient is closed"):
            call()
    own_client.close()  # twice is fine
    usable(mec)  # the engines (and the owner's client) are unaffected


def test_syntax_error(mec):
    with pytest.raises(CompositeError) as info:
        mec.execute("def (:", targets=[1, 2])
    assert str(info.value).splitlines()[1].startswith("[1:execute]: SyntaxError")
    usable(mec)


def test_unpicklable_values(mec, tmp_path):
    with pytest.raises(
        TypeError, match=r"cannot send 'lock': object of type lock cannot be pickled"
    ):
        mec.push({"ok": 1, "lock": threading.Lock()})
    with pytest.raises(TypeError, match="cannot send 'f'"):
        mec.scatter("f", [threading.Lock()] * 4)
    mec.execute("gen = (i for i in range(3))")
    with pytest.raises(
        CompositeError,
        match=r"\[0:pull\]: TypeError: cannot send 'gen' back to the client: "
        r"a generator cannot be pickled",
    ):
        mec.pull("gen")
    with pytest.raises(CompositeError, match="cannot send the return value of <lambda>"):
        mec.apply(lambda: (i for i in range(3)), targets=0)
    (tmp_path / "engine_only_mod.py").write_text("class OnlyHere:\n    pass\n")
    mec.execute(
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import engine_only_mod; "
        "obj = engine_only_mod.OnlyHere(); sys.path.pop(0)",
        targets=0,
    )
    with pytest.raises(TypeError, match=r"cannot be rebuilt in this process .*engine_only_mod"):
        mec.pull("obj", targets=0)
    usable(mec)
    with pytest.raises(
        CompositeError, match="NameError"
    ):  # push is all or nothing: 'ok' was not sent
        mec.pull("ok")


# ------------------------------------------------------------------ cluster files and profiles
def test_unknown_profile():
    with pytest.raises(
        NoClusterError,
        match=r"no running cluster for profile 'nope' .*cluster-nope\.json.*ipmulti start",
    ):
        MultiEngineClient(profile="nope")


def test_missing_cluster_file(tmp_path):
    with pytest.raises(NoClusterError, match=f"cluster file {tmp_path}/gone.json does not exist"):
        MultiEngineClient(tmp_path / "gone.json")


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ("[]", "the top level must be a JSON object"),
        ('{"engines": []}', "'engines' must be a non-empty list"),
        (
            '{"engines": [{"id": 0, "connection": {"ip": "127.0.0.1"}}]}',
            "engine 0 connection lacks shell_port",
        ),
    ],
)
def test_malformed_cluster_file(tmp_path, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"malformed cluster file {path}: .*{words}"):
        MultiEngineClient(path)


def test_stale_cluster_file(cluster, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    spec = json.loads(Path(cluster.cluster_file).read_text())
    spec["owner_pid"] = dead.pid
    path = tmp_path / "stale.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(
        NoClusterError, match=f"cluster file {path} is stale: its owner process {dead.pid} is gone"
    ):
        MultiEngineClient(path)


def test_cluster_file_pointing_nowhere(tmp_path):
    spec = {
        "engines": [
            {
                "id": 0,
                "connection": {
                    "ip": "127.0.0.1",
                    "shell_port": 9,
                    "iopub_port": 9,
                    "control_port": 9,
                    "key": "k",
                    "transport": "tcp",
                },
            }
        ]
    }
    path = tmp_path / "nowhere.json"
    path.write_text(json.dumps(spec))
    t0 = time.monotonic()
    with pytest.raises(
        EngineError, match=r"engine 0 at tcp://127.0.0.1:9 did not answer kernel_info within 1 s"
    ):
        MultiEngineClient(path, timeout=1)
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------ what engines send back
def test_garbage_and_wrongly_signed_messages_from_an_engine(mec, caplog):
    caplog.set_level(logging.WARNING, logger="ipy_multiengine")
    mec.execute(
        "from jupyter_client.session import Session\n"
        "k = get_ipython().kernel\n"
        "k.iopub_socket.send_multipart([b'garbage', b'\\x00\\xff'])\n"
        "forged = Session(key=b'wrong-key')\n"
        "forged.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'FORGED'}, "
        "parent=k.get_parent())\n"
        "print('real')",
        targets=1,
    )
    wait_for(
        lambda: sum("dropped a bad message" in r.getMessage() for r in caplog.records) >= 2,
        5,
        "both bad messages to be logged",
    )
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "engine 1: dropped a bad message on iopub" in text and "Invalid Signature" in text
    assert mec.last.r[0]["stdout"] == "real\n"  # the forged output was not delivered
    usable(mec)


def test_oversize_reply_is_refused(cluster, mec):
    c = MultiEngineClient(cluster.cluster_file, max_message_size=1_000_000)
    try:
        mec.execute("big = b'x' * 5_000_000; small = 1", targets=[0, 1])
        with pytest.raises(CompositeError) as info:
            c.pull("big", targets=[0, 1])
        assert re.search(
            r"\[0:pull\]: EngineError: engine 0 sent a (?:comm_msg|ime_reply) of 5000\d\d\d bytes, "
            r"more than max_message_size=1000000; it was dropped",
            str(info.value),
        )
        assert c.pull("small", targets=[0, 1]) == [1, 1]
        usable(c)
    finally:
        c.close()


# ------------------------------------------------------------------ engines that cannot start
def _kernelspec(tmp_path: Path, name: str, code: str) -> None:
    d = tmp_path / "kernels" / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", code, "{connection_file}"],
                "display_name": name,
                "language": "python",
            }
        )
    )


def test_kernelspec_that_does_not_exist():
    with pytest.raises(
        ValueError, match=r"no kernelspec named 'no-such-kernel'; available: \[.*'python3'"
    ):
        Cluster(n=1, kernel_name="no-such-kernel", profile="badspec", write_file=False).start()


def test_engine_that_never_becomes_ready(tmp_path, monkeypatch):
    _kernelspec(
        tmp_path,
        "stuck",
        "import sys, time; print('stuck: waiting for a licence server', "
        "file=sys.stderr, flush=True); time.sleep(600)",
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    c = Cluster(n=1, kernel_name="stuck", profile="stuck", startup_timeout=3, shutdown_wait=1)
    t0 = time.monotonic()
    with pytest.raises(EngineError) as info:
        c.start()
    msg = str(info.value)
    assert "did not answer kernel_info within 3 s" in msg
    assert (
        "engine 0's own output (kernel 'stuck'" in msg
        and "stuck: waiting for a licence server" in msg
    )
    assert time.monotonic() - t0 < 10
    assert not c.managers and not cluster_file_path("stuck").exists()


def test_engine_that_dies_at_startup(tmp_path, monkeypatch):
    _kernelspec(
        tmp_path,
        "crash",
        "import sys; sys.stderr.write('ImportError: no module named numpy_fake\\n'); sys.exit(3)",
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    c = Cluster(n=2, kernel_name="crash", profile="crash", startup_timeout=30)
    t0 = time.monotonic()
    with pytest.raises(EngineError) as info:
        c.start()
    msg = str(info.value)
    assert "exited with code 3" in msg and "ImportError: no module named numpy_fake" in msg
    assert time.monotonic() - t0 < 5  # noticed at once, not after the startup timeout


def test_bad_options(mec):
    with pytest.raises(ValueError, match="heartbeat must be a positive number"):
        from ipy_multiengine.controller import Controller

        Controller({}, heartbeat=0)
    with pytest.raises(ValueError, match="transport_encryption must be"):
        Cluster(n=1, transport_encryption="maybe", write_file=False).start()
    with pytest.raises(TypeError, match="code must be a str"):
        mec.on_start(42)
    mec.wait_ready(timeout=1)  # all ready: returns at once
    usable(mec)


def test_ctrl_c_while_engines_start(tmp_path, monkeypatch):
    """Ctrl-C while waiting for engines that do not come up: KeyboardInterrupt within 2 s, and
    the half-started engine is stopped."""
    from faultlib import CtrlC

    _kernelspec(
        tmp_path,
        "stuck2",
        "import sys, time; print('stuck', file=sys.stderr, flush=True); time.sleep(600)",
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    c = Cluster(n=1, kernel_name="stuck2", profile="stuck2", startup_timeout=60, shutdown_wait=1)

    pids = []

    def started() -> bool:
        try:
            if "stuck" in c.log_file(0).read_text():
                pids.append(c.managers[0].provisioner.pid)
                return True
        except (OSError, KeyError, AttributeError):
            pass
        return False

    ctrl_c = CtrlC(started)
    raised_at = None
    try:
        c.start()
    except KeyboardInterrupt:
        raised_at = time.monotonic()
    finally:
        ctrl_c.cancel()
    assert raised_at is not None and raised_at - ctrl_c.sent_at < 2.0 + 3 * c.shutdown_wait
    assert not c.managers and not cluster_file_path("stuck2").exists()
    wait_for(lambda: all(gone(p) for p in pids), 10, f"the stuck engine {pids} to exit")


def test_unpicklable_apply_argument_or_scatter_item_is_named(mec):
    """The error names the argument, keyword argument or item that cannot be sent, with its
    type, not the internal tuple or dict the call travels in; nothing is sent."""
    lock = threading.Lock()
    before = [mec.controller.pending(e) for e in mec.get_ids()]
    with pytest.raises(TypeError, match=r"'argument 1': object of type lock"):
        mec.apply(lambda a, b: 1, 1, lock)
    with pytest.raises(TypeError, match=r"'keyword argument b': object of type lock"):
        mec.apply(lambda a, b=None: 1, 1, b=lock)
    with pytest.raises(TypeError, match=r"cannot send 's': item 5 of the sequence, of type lock"):
        mec.scatter("s", [0, 1, 2, 3, 4, lock, 6, 7])
    assert [mec.controller.pending(e) for e in mec.get_ids()] == before
    usable(mec)


def test_pull_names_are_checked_before_anything_is_sent(mec):
    """``pull('1x')`` came back as a NameError from every engine, and ``zip_pull`` sent any
    object as a name; a name that could never have been pushed (not an identifier, not a str)
    is named at once, as push names it, and the engines stay usable."""
    for call in (mec.pull, mec.zip_pull):
        with pytest.raises(ValueError, match=r"cannot pull '1x': names must be valid Python"):
            call(["1x"])
        with pytest.raises(TypeError, match=r"names to pull must be str, not 3"):
            call([3])
        with pytest.raises(TypeError, match=r"pull takes a name or a list of names, not int"):
            call(5)
    with pytest.raises(ValueError, match=r"cannot pull 'a b'"):
        mec.pull("a b")
    with pytest.raises(ValueError, match=r"cannot pull '1x'"):
        mec.gather("1x")
    with pytest.raises(TypeError, match=r"gather takes one name \(a str\), not list"):
        mec.gather(["x"])
    mec.push({"ok_name": 1})
    assert mec.pull("ok_name") == [1] * len(mec.get_ids())
    assert mec.zip_pull(["ok_name"]) == [(1,) * len(mec.get_ids())]


def test_a_bad_timeout_is_refused_before_anything_is_sent(mec):
    """``timeout=-1`` ran the call and then raised a TimeoutError "after -1 s"; ``timeout="3"``
    ran it and failed in the wait with Python's "'>' not supported". Both are refused before
    anything is sent, naming the value: the engines did not run the call."""
    mec.execute("ran_with_bad_timeout = 0")

    def bump():
        global ran_with_bad_timeout
        ran_with_bad_timeout += 1  # the engine's

    for bad in (-1, "3", float("nan"), True):
        with pytest.raises(ValueError, match=r"timeout must be a number of seconds >= 0 or None"):
            mec.apply(bump, timeout=bad)
        for call, args in (
            (mec.execute, ("ran_with_bad_timeout += 1",)),
            (mec.push, ({"ran_with_bad_timeout": 99},)),
            (mec.map, (abs, [1])),
            (mec.pull, ("ran_with_bad_timeout",)),
            (mec.scatter, ("s", [1, 2])),
            (mec.gather, ("s",)),
        ):
            with pytest.raises(ValueError, match=r"timeout must be"):
                call(*args, timeout=bad)
    assert mec.pull("ran_with_bad_timeout") == [0] * len(mec.get_ids())


def test_map_parallel_and_gather_name_what_is_not_a_sequence(mec):
    """A map over an int, a @parallel function called on a scalar, and a gather of a name that
    holds an int failed with Python's bare "'int' object is not iterable"; a gather of dicts
    returned their keys, as if they were the parts of a sequence. Each is named now."""
    with pytest.raises(TypeError, match=r"map maps over sequences: argument 2 is an int \(5\)"):
        mec.map(lambda a, b: a + b, [1], 5)

    @mec.parallel()
    def triple(x):
        return 3 * x

    with pytest.raises(TypeError, match=r"@parallel function 'triple' maps over sequences"):
        triple(3)
    assert triple([1, 2]) == [3, 6]
    mec.execute("held = 5")
    with pytest.raises(TypeError, match=r"cannot gather 'held': engine 0 holds an int"):
        mec.gather("held")
    mec.execute("held = {'a': 1}")
    with pytest.raises(TypeError, match=r"cannot gather 'held': engine 0 holds a dict"):
        mec.gather("held")
    mec.scatter("held", list(range(6)))
    assert mec.gather("held") == list(range(6))


def test_waits_refuse_a_bad_timeout_and_the_result_stays_collectable(mec):
    """``pr.get_result(timeout=-1)`` raised a TimeoutError "after -1 s", ``timeout="3"`` Python's
    "'>' not supported"; ``mec.restart(0, timeout=-1)`` restarted the engine and then timed out
    at once. Each is refused naming the value; the result is still there, nothing restarted."""
    pr = mec.apply(lambda: 7, block=False)
    for bad in (-1, "3"):
        for wait in (pr.get_result, pr.wait, pr.wait_interactive):
            with pytest.raises(ValueError, match=r"timeout must be a number of seconds >= 0"):
                wait(timeout=bad)
        with pytest.raises(ValueError, match=r"timeout must be"):
            mec.wait_ready(timeout=bad)
    pids = [e["pid"] for e in mec.engines]
    with pytest.raises(ValueError, match=r"timeout must be"):
        mec.restart(0, timeout=-1)
    assert [e["pid"] for e in mec.engines] == pids
    assert pr.get_result(timeout=30) == [7] * len(mec.get_ids())
    import numpy as np

    # any real number of seconds, as a computation gives it
    assert pr.get_result(timeout=np.int64(30)) == pr.get_result(timeout=np.float32(0.5))
