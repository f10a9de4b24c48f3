"""The Jupyter server extension's REST API against real clusters, through jupyter_server's own
pytest plugin (a real ServerApp on the test's loop, ``jp_fetch`` with the server's token).

The session's ``cluster`` fixture (profile 'tests', owned by this process) is listed and
interrupted; restart and stop need an owner that takes requests, so one test starts a
1-engine cluster through the API (``ipmulti start --daemon``) and restarts and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
import uuid

import pytest
import tornado.httpclient
from faultlib import INTERRUPT_DEADLINE

pytest_plugins = ["pytest_jupyter.jupyter_server"]

pytestmark = pytest.mark.timeout(90)

RUNTIME = os.environ["JUPYTER_RUNTIME_DIR"]  # conftest's private runtime dir


@pytest.fixture
def jp_runtime_dir():
    """The server's runtime dir is the session's, where its clusters' files are."""
    return RUNTIME


@pytest.fixture
def jp_server_config():
    return {
        "ServerApp": {"jpserver_extensions": {"ipy_multiengine.server": True}},
        "MultiEngineExtension": {"scan_interval": 0.2},
    }


async def api(jp_fetch, *path, method="GET", body=None, **kw):
    r = await jp_fetch(
        "ipy_multiengine",
        "api",
        *path,
        method=method,
        body=None if body is None and method == "GET" else json.dumps(body or {}),
        **kw,
    )
    return json.loads(r.body)


async def until(jp_fetch, pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        snap = await api(jp_fetch, "clusters")
        found = pred(snap)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s; last snapshot: {snap}")
        await asyncio.sleep(0.1)


def cluster_of(snap, key):
    return next((c for c in snap["clusters"] if c["id"] == key), None)


async def test_lists_the_session_cluster_and_its_engines(jp_fetch, mec, cluster):
    mec.execute("import time", block=True)
    key = "cluster-tests"

    def idle_engines(snap):
        c = cluster_of(snap, key)
        return c if c and [e["state"] for e in c["engines"]] == ["idle"] * 4 else None

    c = await until(jp_fetch, idle_engines, 10, "the 4 engines of cluster-tests listed idle")
    assert c["shared"] and c["profile"] == "tests" and c["state"] == "running"
    assert [e["id"] for e in c["engines"]] == mec.get_ids()
    e0 = c["engines"][0]
    assert e0["local"] and e0["rss"] > 1_000_000 and e0["pid"] == mec.engine_meta()[0]["pid"]
    assert "interrupt" in c["can"] and "restart" not in c["can"]  # its owner takes no requests


async def test_busy_engine_shows_code_and_interrupt_stops_it(jp_fetch, mec):
    key = "cluster-tests"
    await until(jp_fetch, lambda s: cluster_of(s, key), 10, "cluster-tests listed")
    pr = mec.execute("import time; time.sleep(60)", targets=[1], block=False)

    def busy(snap):
        e = cluster_of(snap, key)["engines"][1]
        return e if e["state"] == "busy" and "time.sleep(60)" in e["running"] else None

    e = await until(jp_fetch, busy, 10, "engine 1 busy with time.sleep(60)")
    assert e["busy_since"] <= time.time()
    t0 = time.monotonic()
    r = await api(jp_fetch, "clusters", key, "interrupt", method="POST", body={"ids": [1]})
    assert r == {"interrupted": [1]}
    with pytest.raises(Exception) as info:
        await asyncio.to_thread(pr.get_result, timeout=INTERRUPT_DEADLINE)
    took = time.monotonic() - t0
    assert "KeyboardInterrupt" in str(info.value), info.value
    assert took < INTERRUPT_DEADLINE, f"the interrupt took {took:.2f} s (the sleep: 60 s)"
    await until(
        jp_fetch,
        lambda s: cluster_of(s, key)["engines"][1]["state"] == "idle",
        5,
        "engine 1 idle after the interrupt",
    )


async def test_refuses_requests_without_the_token(jp_fetch, jp_base_url, http_server_client):
    for method, path, body in [
        ("GET", "clusters", None),
        ("POST", "clusters/cluster-tests/interrupt", "{}"),
        ("POST", "clusters", '{"n": 1, "profile": "nope"}'),
    ]:
        with pytest.raises(tornado.httpclient.HTTPClientError) as info:
            await http_server_client.fetch(
                f"{jp_base_url}ipy_multiengine/api/{path}", method=method, body=body
            )
        assert info.value.code in (401, 403), (method, path, info.value.code)
    assert not os.path.exists(os.path.join(RUNTIME, "ipy_multiengine", "cluster-nope.json"))


async def test_bad_requests_name_what_is_wrong(jp_fetch, cluster):
    # ``cluster``: the session's 'tests' cluster must be running (its cases name it), also
    # when this test runs first in its process (pytest-xdist --dist loadfile)
    cases = [
        ({"n": 0, "profile": "x"}, "'n' must be an integer"),
        ({"n": 1, "profile": "../x"}, "'profile'"),
        ({"n": 1, "profile": "x", "kernel": "nosuchkernel"}, "no kernelspec 'nosuchkernel'"),
        ({"n": 1, "profile": "x", "launcher": "nope"}, "no launcher 'nope'"),
        ({"n": 1, "profile": "tests"}, "has a cluster already"),
        ({"m": 1}, "unknown field"),
    ]
    for body, words in cases:
        with pytest.raises(tornado.httpclient.HTTPClientError) as info:
            await api(jp_fetch, "clusters", method="POST", body=body)
        assert words in info.value.response.body.decode(), (body, info.value.response.body)
    # the watcher's first scan may not be published yet (a loaded machine): wait for it
    await until(jp_fetch, lambda s: cluster_of(s, "cluster-tests"), 10, "cluster-tests listed")
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await api(
            jp_fetch, "clusters", "cluster-tests", "interrupt", method="POST", body={"ids": [9]}
        )
    assert b"has no engine [9]" in info.value.response.body
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await api(jp_fetch, "clusters", "cluster-tests", "restart", method="POST", body={})
    assert info.value.code == 409 and b"does not take requests" in info.value.response.body


async def test_start_restart_keeps_the_id_and_stop(jp_fetch):
    # a valid profile name may begin with '-': it reaches `ipmulti start` (and its daemon's
    # child) as --profile=NAME, not as an option of its own
    profile = f"-lab{os.getpid()}"
    key = f"cluster-{profile}"
    r = await api(jp_fetch, "clusters", method="POST", body={"n": 1, "profile": profile})
    assert r["id"] == key
    try:
        c = await until(
            jp_fetch,
            lambda s: (c := cluster_of(s, key)) and c["engines"][0]["state"] == "idle" and c,
            15,
            "the new cluster's engine idle",
        )
        assert c["can"] == ["interrupt", "console", "restart", "stop"]
        old_pid = c["engines"][0]["pid"]
        r = await api(jp_fetch, "clusters", key, "restart", method="POST", body={"ids": [0]})
        assert r["restarted"] == [0]
        e = await until(
            jp_fetch,
            lambda s: (
                (e := cluster_of(s, key)["engines"][0])["state"] == "idle"
                and e["pid"] != old_pid
                and e
            ),
            15,
            "engine 0 restarted (new pid) and idle",
        )
        assert e["id"] == 0
    finally:
        r = await api(jp_fetch, "clusters", key, "stop", method="POST", body={})
    assert r == {"stopped": key}
    await until(jp_fetch, lambda s: cluster_of(s, key) is None, 15, "the stopped cluster gone")


class Channels:
    """A kernel's websocket (/api/kernels/{id}/channels), spoken as JupyterLab does (JSON)."""

    def __init__(self, ws):
        self.ws = ws
        self.session = uuid.uuid4().hex

    def send(self, channel, msg_type, content):
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": self.session,
            "username": "test",
            "version": "5.3",
            "date": "",
        }
        self.ws.write_message(
            json.dumps(
                {
                    "header": header,
                    "parent_header": {},
                    "metadata": {},
                    "content": content,
                    "channel": channel,
                    "buffers": [],
                }
            )
        )
        return msg_id

    async def until(self, pred, timeout, what):
        """The first message ``pred`` accepts (messages before it are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout} s")
            raw = await asyncio.wait_for(self.ws.read_message(), left)
            assert raw is not None, f"the websocket closed while waiting for {what}"
            msg = json.loads(raw)
            if pred(msg):
                return msg

    async def request(self, channel, msg_type, content, timeout=10):
        msg_id = self.send(channel, msg_type, content)
        reply = await self.until(
            lambda m: m["parent_header"].get("msg_id") == msg_id and m["channel"] == channel,
            timeout,
            f"reply to {msg_type}",
        )
        return reply["content"]

    async def debug(self, command, arguments=None, timeout=10):
        seq = next(_seq)
        content = {"type": "request", "seq": seq, "command": command, "arguments": arguments or {}}
        reply = await self.request("control", "debug_request", content, timeout)
        assert reply.get("success"), (command, reply)
        return reply


_seq = itertools.count(1)


async def test_console_on_an_engine_sees_its_namespace_and_the_debugger_stops(
    jp_fetch, jp_ws_fetch, jp_serverapp, mec
):
    """A console kernel on engine 1 (what "Open console" opens) evaluates what `mec.push` put
    there; a breakpoint set over the debug protocol in that kernel stops code that the client
    runs on engine 1; shutting the console's kernel down leaves the engine running."""
    key = "cluster-tests"
    await until(jp_fetch, lambda s: cluster_of(s, key), 10, "cluster-tests listed")
    mec.push({"x": 1234}, targets=1)
    kid = (await api(jp_fetch, "clusters", key, "engines", "1", "console", method="POST"))[
        "kernel_id"
    ]
    again = await api(jp_fetch, "clusters", key, "engines", "1", "console", method="POST")
    assert again["kernel_id"] == kid  # the same engine, the same server kernel
    listed = json.loads((await jp_fetch("api", "kernels")).body)
    assert kid in [k["id"] for k in listed]
    ch = Channels(await jp_ws_fetch("api", "kernels", kid, "channels"))
    try:
        msg_id = ch.send("shell", "execute_request", {"code": "x", "silent": False})
        result = await ch.until(
            lambda m: (
                m["msg_type"] == "execute_result" and m["parent_header"].get("msg_id") == msg_id
            ),
            10,
            "the value of x",
        )
        assert result["content"]["data"]["text/plain"] == "1234"
        # the debugger, as JupyterLab's drives it
        info = await ch.request("shell", "kernel_info_request", {})
        assert "debugger" in info.get("supported_features", [])
        await ch.debug(
            "initialize", {"clientID": "test", "adapterID": "python", "pathFormat": "path"}
        )
        await ch.debug("attach", {"justMyCode": False})
        code = "def f(a):\n    b = a + 1\n    return b\n\nf(41)\n"
        path = (await ch.debug("dumpCell", {"code": code}))["body"]["sourcePath"]
        await ch.debug("setBreakpoints", {"source": {"path": path}, "breakpoints": [{"line": 2}]})
        await ch.debug("configurationDone")
        pr = mec.execute(code, targets=[1], block=False)  # the client runs f on engine 1
        stopped = await ch.until(
            lambda m: m["msg_type"] == "debug_event" and m["content"].get("event") == "stopped",
            20,
            "the debugger's 'stopped' event",
        )
        assert stopped["content"]["body"]["reason"] == "breakpoint"
        assert not pr.ready()
        thread = stopped["content"]["body"]["threadId"]
        await ch.debug("continue", {"threadId": thread})
        res = await asyncio.to_thread(pr.get_result, timeout=15)
        assert res[0]["id"] == 1
        await ch.debug("disconnect", {"restart": False, "terminateDebuggee": False})
    finally:
        ch.ws.close()
    await jp_fetch("api", "kernels", kid, method="DELETE")
    assert mec.pull("x", targets=1) == [1234]  # the engine outlives its console
    assert mec.execute("y = 1", targets=1)[0]["id"] == 1


async def test_an_engine_on_another_host_that_stops_answering_turns_red_and_offers_restart(
    jp_fetch,
):
    """An engine on another host has no process psutil can see here: the watcher judges it by
    its kernel heartbeat, within the controller's bound (HEARTBEAT_PERIOD). Made remote without
    a second machine: the cluster file of a 1-engine ``ipmulti start`` cluster is rewritten
    with the engine's ``host`` field set to a name that is not this host's (so the watcher's
    psutil check skips it, as for an SSH engine); the engine is then SIGSTOPped, which stops
    its heartbeat thread as a dead or unreachable host does. (Before the heartbeat the engine
    stayed "idle" for ever.) SIGCONT: it answers again and is alive again."""
    import psutil

    from ipy_multiengine import clusterfile
    from ipy_multiengine.controller import HEARTBEAT_PERIOD

    profile = f"remote{os.getpid()}"
    key = f"cluster-{profile}"
    await api(jp_fetch, "clusters", method="POST", body={"n": 1, "profile": profile})
    proc = None
    try:
        c = await until(
            jp_fetch,
            lambda s: (c := cluster_of(s, key)) and c["engines"][0]["state"] == "idle" and c,
            15,
            "the new cluster's engine idle",
        )
        path = clusterfile.cluster_file_path(profile)
        spec = clusterfile.read_spec(path)
        ident = clusterfile.engine_identity(spec["engines"][0], spec)
        proc, why = clusterfile.same_process(ident)
        assert proc is not None, why
        spec["engines"][0]["host"] = "elsewhere.invalid"
        clusterfile.write_cluster(path, spec)
        await until(
            jp_fetch,
            lambda s: (
                (e := cluster_of(s, key)["engines"][0])["host"] == "elsewhere.invalid"
                and not e["local"]
            ),
            10,
            "the engine listed as on another host",
        )
        proc.suspend()
        t0 = time.monotonic()
        c = await until(
            jp_fetch,
            lambda s: (c := cluster_of(s, key))["engines"][0]["state"] == "dead" and c,
            HEARTBEAT_PERIOD + 5,
            "the silent remote engine listed dead",
        )
        took = time.monotonic() - t0
        assert took < HEARTBEAT_PERIOD + 2, f"dead after {took:.1f} s"
        assert "heartbeats" in c["engines"][0]["dead"], c["engines"][0]
        assert "restart" in c["can"], c["can"]  # the panel offers restart (owner is here)
        proc.resume()
        await until(
            jp_fetch,
            lambda s: cluster_of(s, key)["engines"][0]["state"] != "dead",
            HEARTBEAT_PERIOD + 5,
            "the engine alive again once it answers",
        )
    finally:
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                proc.resume()
        r = await api(jp_fetch, "clusters", key, "stop", method="POST", body={})
    assert r == {"stopped": key}
    await until(jp_fetch, lambda s: cluster_of(s, key) is None, 15, "the stopped cluster gone")


def test_a_px_cell_running_while_a_watcher_starts_shows_nothing_foreign(ip, mec, tmp_path):
    """The watcher's one probe on an engine's shell (a ``kernel_info_request``, to learn if it
    is idle) queues behind a running ``%%px`` cell and is answered after it: its reply goes to
    the watcher's socket alone, and its busy/idle on IOPub names the probe as parent, which the
    client's router drops. So the cell shows exactly its engines' own output, and so does the
    next cell, run after the probe was answered; and the engines' ``In [n]`` numbering counts
    the user's cells only."""
    from faultlib import wait_for
    from IPython.utils.capture import capture_output

    from ipy_multiengine.server import Watcher

    go = tmp_path / "go"
    code = (
        "%%px\nimport os, pathlib, time\nprint('start', flush=True)\n"
        f"pathlib.Path({str(tmp_path)!r}, str(os.getpid())).touch()\n"
        f"while not pathlib.Path({str(go)!r}).exists():\n    time.sleep(0.02)\nprint('end')"
    )
    watcher = Watcher(interval=0.2)
    errors: list[BaseException] = []

    def engines(state):
        c = cluster_of(watcher.snapshot(), "cluster-tests")
        return c and all(e["state"] == state for e in c["engines"]) and c

    def start_watching_while_it_runs():
        try:
            wait_for(lambda: len(list(tmp_path.glob("[0-9]*"))) == 4, 30, "the cell on 4 engines")
            watcher.start()
            # busy: the probes were sent and wait behind the cell
            wait_for(lambda: engines("busy"), 10, "the watcher to see 4 busy engines")
        except BaseException as exc:
            errors.append(exc)
        finally:
            go.touch()

    import threading

    before = [r["number"] for r in mec.execute("pass")]
    helper = threading.Thread(target=start_watching_while_it_runs)
    helper.start()
    try:
        with capture_output() as first:
            ip.run_cell(code)
        helper.join(30)
        assert not errors, errors
        wait_for(lambda: engines("idle"), 10, "the watcher to see 4 idle engines")
        with capture_output() as second:
            ip.run_cell("%%px\nprint('again')")
        after = [r["number"] for r in mec.execute("pass")]
    finally:
        go.touch()
        watcher.stop().result(10)
    expected = sorted(f"[stdout:{i}] {word}" for i in range(4) for word in ("start", "end"))
    assert sorted(first.stdout.splitlines()) == expected, first.stdout
    assert sorted(second.stdout.splitlines()) == [f"[stdout:{i}] again" for i in range(4)]
    assert first.stderr == second.stderr == "" and not first.outputs and not second.outputs
    # nothing else ran on the engines: their In [n] numbering is the user's own
    assert after == [n + 3 for n in before], (before, after)


def test_another_watchers_probe_does_not_make_an_engine_busy():
    """Another server's watcher probes each engine with ``kernel_info_request``; its busy/idle
    on IOPub says nothing of what the engine runs, so it does not flicker in this panel."""
    from ipy_multiengine.server.watch import EngineWatch

    w = EngineWatch(0, {"connection": {}}, {})
    w.state = "idle"
    for state in ("busy", "idle"):
        msg = {
            "header": {"msg_type": "status"},
            "parent_header": {"msg_id": "other", "msg_type": "kernel_info_request"},
            "content": {"execution_state": state},
        }
        assert not w._on_iopub(msg)
        assert w.state == "idle" and w.running == ""


def test_start_options_are_launcher_options_checked_before_anything_starts():
    """A start request's ``options`` are the launcher's: a key that is not a name (``ipmulti
    -o`` would split ``a=b`` into option ``a`` = ``"b=1"``) or that is one of the cluster's own
    parameters (``launcher`` would silently replace the chosen launcher, ``write_file`` would
    start a shared cluster without a file) is refused naming the key, before any process
    starts (start_argv raises: no ``ipmulti start`` runs). Real kernelspecs."""
    from jupyter_client.kernelspec import KernelSpecManager
    from tornado import web

    from ipy_multiengine.server.handlers import start_argv

    ksm = KernelSpecManager()
    for key, value in [
        ("a=b", 1),
        ("launcher", "mpi"),
        ("write_file", False),
        ("profile", "other"),
        ("env", {"X": "1"}),
        ("", 1),
    ]:
        body = {"n": 1, "profile": "rv17x", "options": {key: value}}
        with pytest.raises(web.HTTPError) as info:
            start_argv(body, ksm)
        assert info.value.status_code == 400, key
        assert "'options'" in info.value.log_message and repr(key) in info.value.log_message, (
            key,
            info.value.log_message,
        )
    argv = start_argv({"n": 1, "profile": "rv17x", "options": {"partition": "short"}}, ksm)
    assert argv[-2:] == ["-o", 'partition="short"']


async def test_a_console_adopts_no_connection_file_of_an_earlier_server(
    jp_fetch, jp_serverapp, mec
):
    """Console connection files (an engine's ports and key) belong to the server that wrote
    them: one left by an earlier (or another) server is not adopted as a kernel of this one
    (before, every such file in the shared runtime dir became a phantom kernel listed in
    JupyterLab, and the files stayed there forever)."""
    from ipy_multiengine import clusterfile

    key = "cluster-tests"
    await until(jp_fetch, lambda s: cluster_of(s, key), 10, "cluster-tests listed")
    stale = clusterfile.runtime_dir("lab-kernels") / f"ipme-{key}-0-{uuid.uuid4().hex[:8]}.json"
    dead = {"ip": "127.0.0.1", "transport": "tcp", "key": "0" * 32, "kernel_name": "python3"}
    dead.update({p: 1 for p in ("shell_port", "iopub_port", "stdin_port", "control_port")})
    clusterfile.write_private(stale, json.dumps({**dead, "hb_port": 1}))
    try:
        kid = (await api(jp_fetch, "clusters", key, "engines", "0", "console", method="POST"))[
            "kernel_id"
        ]
        listed = [k["id"] for k in json.loads((await jp_fetch("api", "kernels")).body)]
        assert listed == [kid], listed  # the console's kernel, nothing adopted from the file
        # the servers of earlier tests (the console test's) removed their own directories
        own = jp_serverapp.kernel_manager.external_connection_dir
        dirs = [str(d) for d in stale.parent.iterdir() if d.is_dir()]
        assert dirs == [own], (dirs, own)
        await jp_fetch("api", "kernels", kid, method="DELETE")
    finally:
        stale.unlink(missing_ok=True)


def test_scans_never_overlap(monkeypatch):
    """An action's ``scan_now`` while the periodic scan runs must wait for it, not scan beside
    it: two scans at once share the psutil cache from two threads (CPU readings over a
    near-zero interval) and the one that started first may publish last, bringing back a
    cluster that was just stopped. Real scans of the session's runtime dir; each is made slow
    (a loaded disk) so that overlaps would show."""
    import threading

    from ipy_multiengine.server import watch

    real, lock = watch._scan, threading.Lock()
    active, most = [0], [0]

    def slow_scan(procs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.05)  # a slow scan (the window), not a synchronisation
            return real(procs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(watch, "_scan", slow_scan)
    w = watch.Watcher(interval=0.01)
    w.start()
    try:
        for f in [w.scan_now() for _ in range(5)]:
            f.result(timeout=30)
    finally:
        w.stop().result(timeout=10)
    assert most[0] == 1, f"{most[0]} scans ran at once"


def _watch_rows(watcher, key):
    c = cluster_of(watcher.snapshot(), key)
    return {e["id"]: e for e in c["engines"]} if c else {}


def test_a_malformed_iopub_message_does_not_stop_watching_the_engine(mec, tmp_path):
    """A signed IOPub message of the wrong shape (here: an ``execute_input`` whose content is a
    list, signed with the cluster key and published for real by engine 0 itself on its
    kernel's IOPub socket, so it reaches the watcher's subscription) is skipped: the watch
    goes on, and the row follows the engine (idle, busy, idle). (Before, the exception ended
    the engine's reader task silently: its row stayed as the message found it, here 'busy',
    for ever.)"""
    from faultlib import wait_for

    from ipy_multiengine.server import Watcher

    watcher = Watcher(interval=0.2)
    watcher.start()
    go = tmp_path / "go"
    try:
        wait_for(
            lambda: _watch_rows(watcher, "cluster-tests").get(0, {}).get("state") == "idle",
            10,
            "engine 0 idle",
        )
        mec.execute(  # Session.send refuses such content: the frames are signed by hand
            "from jupyter_client.session import DELIM\nk = get_ipython().kernel; s = k.session\n"
            "parts = [s.pack(s.msg_header('execute_input')), s.pack({}), s.pack({}),"
            " s.pack(['not', 'a', 'dict'])]\n"
            "k.iopub_socket.send_multipart([b'bad', DELIM, s.sign(parts), *parts])",
            targets=0,
        )
        idle = lambda: _watch_rows(watcher, "cluster-tests")[0]["state"] == "idle"  # noqa: E731
        wait_for(idle, 10, "engine 0 idle after the cell that sent the malformed message")
        pr = mec.execute(
            f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists():\n"
            "    time.sleep(0.02)",
            targets=0,
            block=False,
        )
        wait_for(
            lambda: _watch_rows(watcher, "cluster-tests")[0]["state"] == "busy",
            10,
            "engine 0 seen busy after the malformed message",
        )
        go.touch()
        pr.get_result(timeout=10)
        wait_for(idle, 10, "engine 0 idle again")
        row = _watch_rows(watcher, "cluster-tests")[0]
        assert row.get("watch_error") is None, row
    finally:
        go.touch()
        watcher.stop().result(10)


def _attached_copy(profile, change):
    """A cluster file of attached kernels (no owner) naming engines 0 and 1 of the session
    cluster, each entry passed through ``change(entry)``; returns its path."""
    from ipy_multiengine import clusterfile

    spec = clusterfile.read_spec(clusterfile.cluster_file_path("tests"))
    engines = []
    for e in spec["engines"][:2]:
        e = json.loads(json.dumps(e))
        for k in ("pid", "create_time", "owner"):
            e.pop(k, None)
        change(e)
        engines.append(e)
    path = clusterfile.cluster_file_path(profile)
    clusterfile.write_cluster(path, {"profile": profile, "engines": engines})
    return path


def _failed_then_given_up(watcher, key: str, i: int, reason: str) -> list:
    """Wait until engine ``i`` of cluster ``key`` is shown 'unknown' with ``reason`` in its
    ``watch_error``, then until its retries are given up after MAX_WATCH_ATTEMPTS; the rows."""
    from faultlib import wait_for

    from ipy_multiengine.server import watch

    rows = wait_for(
        lambda: (r := _watch_rows(watcher, key)) and r[i].get("watch_error") and r,
        10,
        f"the failed watch of engine {i} shown",
    )
    assert rows[i]["state"] == "unknown", rows[i]
    assert reason in rows[i]["watch_error"], rows[i]
    rows = wait_for(
        lambda: (r := _watch_rows(watcher, key)) and "gave up" in (r[i]["watch_error"] or "") and r,
        30,
        "the retries given up",
    )
    assert f"gave up after {watch.MAX_WATCH_ATTEMPTS} attempts" in rows[i]["watch_error"], rows[i]
    assert rows[i]["state"] == "unknown", rows[i]
    return rows


def test_a_heartbeat_watch_that_fails_is_shown_and_retried_with_a_bound(cluster):
    """An engine on another host whose heartbeat watch fails with a socket error (its file's
    ``hb_port`` is a 121-digit number: the session cluster's IPC address becomes longer than a
    socket path may be, and libzmq's connect raises a real ZMQError in the heartbeat task)
    is shown 'unknown' with the error, is retried on later scans, and is given up after
    ``MAX_WATCH_ATTEMPTS`` (said in the reason). (Before, the heartbeat task died silently
    and the row stayed 'idle': a dead host would never have turned red.)"""

    from ipy_multiengine.server import Watcher

    profile = f"hb{os.getpid()}"

    def remote_bad_hb(e):
        e["host"] = "elsewhere.invalid"
        e["connection"]["hb_port"] = 10**120

    path = _attached_copy(profile, remote_bad_hb)
    watcher = Watcher(interval=0.1)
    watcher.start()
    try:
        _failed_then_given_up(watcher, f"cluster-{profile}", 1, "heartbeat watch failed: ZMQError")
    finally:
        watcher.stop().result(10)
        path.unlink(missing_ok=True)


def test_a_watch_that_cannot_start_is_shown_and_retried_with_a_bound(cluster, monkeypatch):
    """An engine whose watch cannot even start (its file's ``iopub_port`` makes the IPC address
    too long for a socket path: ``start_channels`` raises a real ZMQError) is shown 'unknown'
    with the reason and started again on later scans, at most ``MAX_WATCH_ATTEMPTS`` times.
    (Before, only a log line said so; the row was a bare 'unknown', and the watch was never
    tried again while the file stayed the same.) The real ``EngineWatch.start`` runs; it is
    only counted."""
    from ipy_multiengine.server import Watcher, watch

    profile = f"nostart{os.getpid()}"
    starts: list[int] = []  # the bad engine's (the session cluster is watched too)
    real_start = watch.EngineWatch.start

    def counted(self, changed):
        if self.connection["iopub_port"] == 10**120:
            starts.append(self.eid)
        return real_start(self, changed)

    monkeypatch.setattr(watch.EngineWatch, "start", counted)

    def bad_iopub(e):
        if e["id"] == 0:
            e["connection"]["iopub_port"] = 10**120

    path = _attached_copy(profile, bad_iopub)
    watcher = Watcher(interval=0.1)
    watcher.start()
    try:
        key = f"cluster-{profile}"
        rows = _failed_then_given_up(watcher, key, 0, "could not start: ZMQError")
        n = watch.MAX_WATCH_ATTEMPTS
        assert starts == [0] * n, starts
        assert rows[1]["state"] == "idle" and rows[1]["watch_error"] is None, rows[1]
    finally:
        watcher.stop().result(10)
        path.unlink(missing_ok=True)
