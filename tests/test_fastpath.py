"""The data path beside ipykernel's shell dispatch (issue 15.2): a signed socket per engine.

Real engines throughout (the session cluster; one private engine for the fallback). What is
checked: data operations use the fast socket, each engine keeps its order between executes and
data operations, output printed inside applied functions is still captured and labelled,
errors still carry tracebacks, an interrupt still stops an operation, the socket refuses
unsigned and forged messages, and an engine without it falls back to the comm.
"""

from __future__ import annotations

import os
import pickle
import stat
import time
import uuid

import pytest
import zmq
from faultlib import (
    check_interrupt_right_after_send,
    hang_code,
    make_hanger,
    marker,
    small_cluster,
    wait_for,
)
from jupyter_client.session import Session

from ipy_multiengine import CompositeError, EngineError, MultiEngineClient

pytestmark = pytest.mark.timeout(60)


def _fast(mec: MultiEngineClient, eid: int) -> dict | None:
    return mec.controller.state(eid).engine_info.get("fast")


def test_local_engines_serve_data_on_a_private_unix_socket(mec):
    for eid in mec.get_ids():
        fast = _fast(mec, eid)
        assert fast is not None and fast["transport"] == "ipc", fast
        mode = os.stat(fast["path"]).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(fast["path"])).st_mode) & 0o777 == 0o700
    # white-box: the connection really sends its data operations there, not on the comm
    assert all(mec.controller._conn(e).fast for e in mec.get_ids())  # loop-owned, read-only here


def test_order_between_executes_and_data_operations(mec):
    """An execute still running when a pull is sent: the pull sees its effects; a push sent
    just before an execute: the execute sees it. Several rounds, non-blocking, both ways."""
    for i in range(5):
        mec.execute(f"import time; time.sleep(0.05); x = {i}", block=False)
        assert mec.pull("x") == [i] * 4
        mec.push({"y": i}, block=False)
        pr = mec.execute("z = y * 10", block=False)
        got = mec.apply(lambda: z, block=False)  # noqa: F821 (an engine name)
        assert got.get_result(timeout=10) == [i * 10] * 4
        assert pr.get_result(timeout=10)[0]["status"] == "ok"
        assert mec.execute("print(z)")[0]["stdout"] == f"{i * 10}\n"


def test_output_of_applied_functions_is_captured_and_labelled(mec, capsys):
    def shout(tag):
        import sys
        import time

        print("out", tag)
        time.sleep(0.3)  # longer than ipykernel's flush interval: flushed by its timer
        print("err", tag, file=sys.stderr)
        return tag

    assert mec.apply(shout, 7) == [7] * 4
    assert mec.apply(lambda: print("quick") or 1) == [1] * 4
    out = capsys.readouterr()
    lines = sorted((out.out + out.err).splitlines())
    for eid in range(4):
        assert f"[stdout:{eid}] out 7" in lines
        assert f"[stderr:{eid}] err 7" in lines
        assert f"[stdout:{eid}] quick" in lines
    # a function that prints nothing leaves nothing behind
    assert mec.apply(lambda: 2) == [2] * 4
    assert capsys.readouterr().out == ""


def test_errors_on_the_fast_path_carry_the_remote_traceback(mec):
    def fails(n):
        return {}["missing"] if n else 0

    with pytest.raises(CompositeError) as info:
        mec.apply(fails, 1)
    err = info.value
    assert len(err.elist) == 4
    text = "".join(err.elist[0].traceback)
    assert "fails" in text and "KeyError" in text
    assert mec.apply(fails, 0) == [0] * 4  # still usable


def test_an_error_that_cannot_be_described_still_gets_its_reply(mec):
    """An exception whose ``__str__`` raises: describing it on the engine failed and the
    request got no reply at all (the caller waited forever)."""

    class Unprintable(Exception):
        def __str__(self):
            raise ValueError("no str for you")

    def fails():
        raise Unprintable()

    pr = mec.apply(fails, block=False)
    with pytest.raises(CompositeError) as info:
        pr.get_result(timeout=20)
    assert {e.ename for e in info.value.elist} == {"Unprintable"}
    assert mec.apply(lambda: 1) == [1] * 4


def test_a_fast_operation_whose_answer_fails_still_gets_an_error_reply(mec):
    """Anything raising after the operation ran (here the output flush, broken once by the
    operation itself) left the request unanswered: the fast reader only logged it."""

    def break_the_flush_once():
        import ipy_multiengine.engine as helper

        original = helper._flush_pending_output

        def broken():
            helper._flush_pending_output = original
            raise RuntimeError("flush broke")

        helper._flush_pending_output = broken

    pr = mec.apply(break_the_flush_once, targets=0, block=False)
    with pytest.raises(CompositeError) as info:
        pr.get_result(timeout=20)
    assert info.value.elist[0].ename == "RuntimeError"
    assert "flush broke" in info.value.elist[0].evalue
    assert mec.apply(lambda: 1, targets=0) == [1]


def test_interrupt_from_another_client_stops_a_fast_operation(cluster, mec, tmp_path):
    """A non-owner client interrupts over the control channel (the kernel signals itself): the
    operation on the fast socket fails with KeyboardInterrupt, the next one (sent after the
    interrupt: what was sent before it is interrupted too) succeeds."""
    c = MultiEngineClient(cluster.cluster_file)
    try:
        pid = c.apply(os.getpid, targets=0)[0]
        pr = c.apply(make_hanger(tmp_path, "intr", 20), targets=0, block=False)
        wait_for(marker(tmp_path, "intr", pid).exists, 10, "the hanging apply to start")
        t0 = time.monotonic()
        c.interrupt(0)
        after = c.pull("__name__", targets=0, block=False)
        with pytest.raises(CompositeError) as info:
            pr.get_result(timeout=10)
        assert time.monotonic() - t0 < 5
        assert info.value.elist[0].ename == "KeyboardInterrupt"
        assert after.get_result(timeout=10) == ["__main__"]
    finally:
        c.close()


def _check_abort(mec: MultiEngineClient, tmp_path) -> None:
    """abort() on one engine, whichever path its queued requests take: an apply queued behind
    a running execute (on the fast path held in the controller for order, on the comm queued in
    the engine) is never run, nor is an apply queued behind a running apply (on the fast path
    queued on the engine's fast socket); the running apply is never aborted (EngineError)."""

    def set_flag():
        global abort_flag
        abort_flag = True

    pid = mec.apply(os.getpid, targets=0)[0]
    mec.execute("abort_flag = False", targets=0)
    running = mec.execute(hang_code(tmp_path, "sleep"), targets=0, block=False)
    # in the cell (its marker): "started" is the kernel's busy, sent before it takes SIGINT
    wait_for(marker(tmp_path, "sleep", pid).exists, 10, "engine 0 running the sleep")
    wait_for(lambda: running.started[0] is not None, 10, "engine 0 seen busy")
    behind_exec = mec.apply(set_flag, targets=0, block=False)
    behind_exec.abort()
    if mec.controller.state(0).engine_info.get("fast"):
        # it was held here, never sent: it fails now, while the sleep still runs
        assert behind_exec.wait(5) and running.metadata[0]["status"] == "pending"
    mec.interrupt(targets=[0])
    with pytest.raises(CompositeError, match="KeyboardInterrupt"):
        running.get_result(timeout=10)
    with pytest.raises(CompositeError, match="Aborted"):
        behind_exec.get_result(timeout=10)
    assert behind_exec.metadata[0]["status"] == "aborted"
    hang = make_hanger(tmp_path, "abort")
    busy = mec.apply(hang, targets=0, block=False)
    behind_apply = mec.apply(set_flag, targets=0, block=False)
    wait_for(marker(tmp_path, "abort", pid).exists, 10, "the hanging apply to start")
    with pytest.raises(EngineError, match=r"(running|not aborted) on engines \[0\].*mec.interrupt"):
        busy.abort()  # running: refused, and left running
    behind_apply.abort()
    assert not busy.ready()
    mec.interrupt(targets=[0])
    with pytest.raises(CompositeError, match="KeyboardInterrupt"):
        busy.get_result(timeout=10)
    with pytest.raises(CompositeError, match="Aborted"):
        behind_apply.get_result(timeout=10)
    assert behind_apply.metadata[0]["status"] == "aborted"
    assert mec.pull("abort_flag", targets=0) == [False]  # neither aborted apply ran
    assert mec.apply(lambda: 7, targets=0) == [7]  # the engine is usable


def test_abort_skips_data_operations_queued_on_either_path(mec, tmp_path):
    _check_abort(mec, tmp_path)


def _ask(path: str, frames: list, wait_ms: int) -> list | None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    try:
        s.connect(f"ipc://{path}")
        s.send_multipart(frames)
        return s.recv_multipart() if s.poll(wait_ms) else None
    finally:
        s.close()


def test_unsigned_and_forged_messages_are_refused(mec, tmp_path):
    """Someone who can reach the socket but lacks the key gets nothing run: the payload would
    create a file when unpickled. A correctly signed ping is answered (the test's control)."""
    path = _fast(mec, 0)["path"]
    proof = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(proof), "w"))

    payload = pickle.dumps((Evil(), (), {}), protocol=5)
    good_key = mec.controller.state(0).connection["key"]
    for key in (b"", b"not-the-key"):
        forger = Session(key=key, username="forger")
        msg = forger.msg("ime_request", {"op": "apply", "rid": uuid.uuid4().hex})
        frames = forger.serialize(msg)
        if not key:
            frames[1] = b""  # no signature at all
        assert _ask(path, [*frames, payload], 500) is None
    assert not proof.exists(), "an unsigned or forged message was unpickled"
    owner = Session(key=good_key.encode(), username="test")
    msg = owner.msg("ime_request", {"op": "ping"})
    msg["content"]["rid"] = msg["msg_id"]
    # the engine a request is for and its client's comm there are signed too (white-box read)
    msg["header"].update(eid=0, comm_id=mec.controller._conn(0).comm_id)
    reply = _ask(path, owner.serialize(msg), 10000)
    assert reply is not None and b'"status": "ok"' in reply[-1].replace(b'":"', b'": "')
    assert mec.apply(lambda: 5, targets=0) == [5]


_FAKE_GUI = """
import selectors, zmq
from ipykernel.eventloops import register_integration, get_shell_stream
@register_integration("imefakegui")
def loop_fake(kernel):
    # like Tk's mainloop under ipykernel: blocks, and returns when the shell stream has events
    import builtins
    builtins._ime_gui_entries = getattr(builtins, "_ime_gui_entries", 0) + 1
    stream = get_shell_stream(kernel)
    sel = selectors.DefaultSelector()
    sel.register(stream.getsockopt(zmq.FD), selectors.EVENT_READ)
    while not stream.flush(limit=1):
        sel.select()
"""


def test_fast_operations_reach_an_engine_running_a_gui_event_loop():
    """``%gui qt``/``%matplotlib tk`` on an engine: ipykernel's GUI loop blocks the main loop
    until the shell socket has a message; a fast operation waited forever (and the executes
    held behind it for the engine's order with it)."""
    with small_cluster(1) as (_cluster, mec):
        assert mec.controller._conn(0).fast  # white-box, read-only
        assert mec.execute(_FAKE_GUI)[0]["status"] == "ok"
        assert mec.execute("%gui imefakegui")[0]["status"] == "ok"

        def entered() -> bool:
            def count():
                return getattr(__import__("builtins"), "_ime_gui_entries", 0)

            return mec.apply(count, block=False).get_result(timeout=10) != [0]

        wait_for(entered, 10, "the engine to enter its GUI loop")
        # data operations only: this stand-in loop (like ipykernel 7's own under load) can
        # also miss a shell wake-up, on the comm path too; that is not the fast socket's
        for i in range(5):
            assert mec.apply(lambda v: v + 1, i, block=False).get_result(timeout=10) == [i + 1]
            mec.push({"g": i}, block=False)
            assert mec.pull("g", block=False).get_result(timeout=10) == [i]


def test_engine_without_the_fast_socket_uses_the_comm(tmp_path):
    env = dict(os.environ, IPY_MULTIENGINE_FAST="0")
    with small_cluster(1, env=env) as (_cluster, mec):
        assert _fast(mec, 0) is None
        assert not mec.controller._conn(0).fast  # white-box, read-only: the comm path is in use
        mec.execute("import time; time.sleep(0.05); a = 3", block=False)
        assert mec.pull("a") == [3]
        mec.push({"b": 4}, block=False)
        assert mec.execute("print(a + b)")[0]["stdout"] == "7\n"
        assert mec.apply(lambda: a * b) == [12]  # noqa: F821 (engine names)
        with pytest.raises(CompositeError):
            mec.apply(lambda: 1 / 0)

        class Unprintable(Exception):
            def __str__(self):
                raise ValueError("no str for you")

        def fails():
            raise Unprintable()

        with pytest.raises(CompositeError):  # the comm path replies too
            mec.apply(fails, block=False).get_result(timeout=20)
        assert mec.map(lambda v: v + 1, range(5)) == [1, 2, 3, 4, 5]
        _check_abort(mec, tmp_path)  # the same on the comm: its requests queue on the shell
        _check_request_buffers_freed(mec)
        # interrupt() right after a send reaches data operations on the comm too
        check_interrupt_right_after_send(mec, [0], rounds=3)


def _engine_rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e6


def _check_request_buffers_freed(mec) -> None:
    """``apply(len, 64 MB)`` on engine 0, nothing sent after it: the argument is freed. The
    engine set the request (with its buffers) as ipykernel's parent, which kept them until
    the next request. Measured from outside (psutil), so no request resets the parent."""
    pid = mec.apply(os.getpid, targets=0)[0]
    base = _engine_rss_mb(pid)
    assert mec.apply(len, bytearray(64 * 2**20), targets=0) == [64 * 2**20]  # out of band
    wait_for(
        lambda: _engine_rss_mb(pid) < base + 32,
        10,
        f"engine 0 to free the 64 MB argument of its last request (RSS was {base:.0f} MB)",
    )


def test_the_last_requests_buffers_are_freed_on_the_engine(mec):
    _check_request_buffers_freed(mec)


def test_clear_output_arrives_in_order_with_the_output_before_it(mec):
    """A ``clear_output`` as an operation's only output, after earlier output on the same
    engine (an execute's print, then a fast-path apply), and after a print in the same
    function: the listener sees every event, each clear after the text before it, and every
    one before its request completes (review item: reported as possibly overtaking; checked)."""
    from ipy_multiengine import serialize

    def clear_only() -> int:
        from IPython.display import clear_output

        clear_output()
        return 1

    def print_then_clear() -> int:
        from IPython.display import clear_output

        print("before")
        clear_output()
        return 2

    ctl = mec.controller
    events: list[tuple[str, str]] = []

    def listener(tag: str):
        return lambda _eid, mtype, _content: events.append((tag, mtype))

    for _ in range(10):
        events.clear()
        ex = ctl.submit_execute([0], "print('x')", listener=listener("ex"))
        ops = [
            ctl.submit_comm([0], "apply", {}, [serialize.dumps((f, (), {}))], listener=listener(t))[
                0
            ]
            for t, f in (("clear", clear_only), ("both", print_then_clear))
        ]
        ex[0].result(timeout=20)
        assert [serialize.loads(op.result(timeout=20).frames) for op in ops] == [1, 2]
        kinds = [(t, m) for t, m in events if m in ("stream", "clear_output")]
        assert kinds.index(("clear", "clear_output")) > kinds.index(("ex", "stream")), events
        both = [m for t, m in kinds if t == "both"]
        assert both[-1] == "clear_output" and "stream" in both, events


def _drop_next_fast_reply(mec, monkeypatch) -> None:
    """Engine 0's next fast reply is dropped (the class's method answers the ones after), and
    a lost reply is noticed within a second."""
    from ipy_multiengine import controller

    monkeypatch.setattr(controller, "FAST_LOST_AFTER", 0.3)
    monkeypatch.setattr(controller, "FAST_LOST_GRACE", 0.5)
    mec.execute(
        "import ipy_multiengine.engine as _e\n"
        "_srv = _e._server[0]\n"
        "def _drop_once(*args, _srv=_srv):\n"
        "    del _srv._send  # this reply is dropped; the class's method answers the next\n"
        "_srv._send = _drop_once\n"
        "del _e, _srv, _drop_once\n",
        targets=0,
    )


def test_a_lost_fast_reply_fails_its_operation_and_releases_what_waited(mec, monkeypatch):
    """A reply that never comes back (dropped for real on the engine, by a one-shot hook in
    its fast server's send): the operation fails naming the engine once a ping behind it has
    been answered, and the execute held behind it for order runs; the engine stays usable."""

    _drop_next_fast_reply(mec, monkeypatch)
    lost = mec.apply(int, 5, targets=0, block=False)
    t0 = time.monotonic()
    # held behind the apply (order): it runs once the apply is known lost
    assert mec.execute("after_lost = 1", targets=0, timeout=10)[0]["status"] == "ok"
    assert time.monotonic() - t0 < 5
    with pytest.raises((CompositeError, EngineError), match=r"engine 0 .*reply was lost"):
        lost.get_result(timeout=5)
    assert mec.apply(lambda: after_lost + 1, targets=0) == [2]  # noqa: F821 (engine name)


def test_an_unreachable_fast_socket_is_given_up_quickly(cluster, mec, tmp_path, monkeypatch):
    """Engines that advertise a fast socket nobody listens on: a new client connects in far
    less than FAST_PROBE and carries their data on the comm. (FAST_PROBE raised from 3 s to
    30 s here: connecting took up to 1.9 s on a loaded box, against a bound of 2 s; a client
    waiting for the limit is still told apart.)"""
    from ipy_multiengine import controller

    monkeypatch.setattr(controller, "FAST_PROBE", 30.0)
    nowhere = str(tmp_path / "nobody-listens")
    mec.execute(
        "import ipy_multiengine.engine as _e\n"
        "_saved_fast = _e._server[0].address\n"
        f"_e._server[0].address = {{'transport': 'ipc', 'path': {nowhere!r}}}\n"
        "del _e\n"
    )
    try:
        t0 = time.monotonic()
        c = MultiEngineClient(cluster.cluster_file)
        took = time.monotonic() - t0
        try:
            assert took < controller.FAST_PROBE / 3, f"connecting took {took:.2f} s"
            assert not any(c.controller._conn(e).fast for e in c.get_ids())  # white-box, read
            c.push({"via_comm": 7}, targets=0)
            assert c.pull("via_comm", targets=0) == [7]
        finally:
            c.close()
    finally:
        mec.execute(
            "import ipy_multiengine.engine as _e\n"
            "_e._server[0].address = _saved_fast\n"
            "del _e, _saved_fast\n"
        )


def test_fast_operations_say_when_they_started(mec):
    """No busy status on the fast socket: the engine's reply says when the operation began
    (PendingResult.started / metadata), between submission and completion."""
    pr = mec.apply(time.sleep, 0.2, block=False)
    pr.get_result(timeout=10)
    for meta in pr.metadata:
        assert meta["started"] is not None, meta
        assert meta["submitted"] <= meta["started"] <= meta["completed"]
        assert (meta["completed"] - meta["started"]).total_seconds() >= 0.19


def test_the_engine_helper_loads_no_client_code():
    """An engine imports ``ipy_multiengine.engine`` (the install code): the package's public
    names are loaded on first use, so the client, cluster and controller stay out of the
    engine's memory (issue 15: engine idle RSS <= plain ipykernel + 5 MB)."""
    import subprocess
    import sys

    code = (
        "import sys, ipy_multiengine.engine, ipy_multiengine as m\n"
        "heavy = {'client', 'cluster', 'controller', 'clusterfile', 'render', 'results'}\n"
        "print(sorted(n for n in heavy if 'ipy_multiengine.' + n in sys.modules))\n"
        "assert m.Cluster.__name__ == 'Cluster' and m.client.MultiEngineClient\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_started_stays_between_submitted_and_completed_with_a_skewed_engine_clock(mec):
    """A remote engine's clock may be off by minutes: ``started`` (the engine's clock on the
    fast socket) must still lie between this client's ``submitted`` and ``completed``, so
    ``completed - started`` is never negative nor longer than the call. The skew is made by
    shifting the engine helper's clock (the host's clock cannot be changed in a test)."""
    mec.execute(
        "import types as _t, time as _tm, ipy_multiengine.engine as _e\n"
        "_e.time = _t.SimpleNamespace(time=lambda: _tm.time() + 3600, "
        "monotonic=_tm.monotonic, sleep=_tm.sleep, perf_counter=_tm.perf_counter)",
        targets=0,
    )
    try:
        pr = mec.apply(time.sleep, 0.05, targets=0, block=False)
        pr.get_result(timeout=10)
        meta = pr.metadata[0]
        assert meta["submitted"] <= meta["started"] <= meta["completed"], meta
    finally:
        mec.execute("_e.time = _tm", targets=0)


_RECORD_REFUSALS = """
import builtins, logging
class _Refusals(logging.Handler):
    def emit(self, record):
        builtins._ime_refused.append(record.getMessage())
builtins._ime_refused = []
logging.getLogger("ipy_multiengine").addHandler(_Refusals(logging.WARNING))
"""


def _refusals(mec, eid: int) -> list[str]:
    return mec.apply(lambda: list(__import__("builtins")._ime_refused), targets=eid)[0]


def _capture_fast_sends(mec, monkeypatch, swallow: bool = False) -> list[list]:
    """The signed frames the controller sends on fast sockets, as an eavesdropper on the wire
    sees them (header frames from ``controller._fast_frames``, then the buffers); with
    ``swallow`` the next one is kept from its engine, as someone in the middle would: it goes
    to a real socket connected to no one."""
    from ipy_multiengine import controller

    sent: list[list] = []
    heads: list[list] = []
    real_frames = controller._fast_frames
    real_send = mec.controller._send

    def fast_frames(*args, **kwargs):
        heads.append(real_frames(*args, **kwargs))
        return heads[-1]

    def send(conn, channel, msg, buffers=None):
        if channel != "fast":
            return real_send(conn, channel, msg, buffers)
        keep = swallow and not sent
        sock = conn.sockets["fast"]
        sink = None
        if keep:
            sink = conn.sockets["fast"] = sock.context.socket(zmq.DEALER)
            sink.linger = 0
            sink.connect("inproc://ime-test-nowhere")  # no one binds it: the message waits
        try:
            result = real_send(conn, channel, msg, buffers)
        finally:
            conn.sockets["fast"] = sock
            if sink is not None:
                sink.close()
        sent.append([bytes(f) for f in heads[-1]] + [bytes(memoryview(b)) for b in buffers or []])
        return result

    monkeypatch.setattr(controller, "_fast_frames", fast_frames)
    monkeypatch.setattr(mec.controller, "_send", send)
    return sent


def _send_raw(url: str, frames: list, wait_ms: int) -> list | None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    try:
        s.connect(url)
        s.send_multipart(frames)
        return s.recv_multipart() if s.poll(wait_ms) else None
    finally:
        s.close()


def _unchecked_on_fast(mec, eid: int) -> int:
    """How many messages engine ``eid``'s fast socket has refused unread (white-box, read)."""

    def count():
        from ipy_multiengine import engine

        return sum(seen[0] for seen in engine._server[0].unchecked.values())

    return mec.apply(count, targets=eid)[0]


def _send_unanswered(mec, eid: int, url: str, frames: list) -> list | None:
    """Send ``frames`` to engine ``eid``'s fast socket on a connection of their own, wait (to
    a deadline) until the engine has refused them unread, then return any answer (None).
    Their connection is not ours: a request of ours may be read before them, and closed
    sooner (linger 0) a message not yet on its way is dropped, as on a loaded box."""
    before = _unchecked_on_fast(mec, eid)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    try:
        s.connect(url)
        s.send_multipart(frames)
        wait_for(lambda: _unchecked_on_fast(mec, eid) > before, 30, "the engine to refuse it")
        return s.recv_multipart() if s.poll(500) else None  # an answer was sent before that
    finally:
        s.close()


@pytest.mark.timeout(90)
@pytest.mark.filterwarnings("ignore:push. engines:RuntimeWarning")
def test_a_signed_request_resent_to_another_engine_or_with_other_buffers_is_refused(
    monkeypatch, tmp_path
):
    """Engines share the cluster key, and the signature covered neither the target engine nor
    the buffers (the pickles): whoever sees one engine's TCP fast socket traffic could resend
    a request to another engine, or with a pickle of their own, and have it run. Real engines
    over TCP without CurveZMQ; the frames are the controller's own, captured on their way."""
    from ipy_multiengine import controller

    proof = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(proof), "w"))

    with small_cluster(2, transport="tcp") as (_cluster, mec):
        conns = [mec.controller._conn(e) for e in (0, 1)]  # white-box, read-only
        assert all(c.fast for c in conns) and _fast(mec, 1)["transport"] == "tcp"
        mec.execute(_RECORD_REFUSALS)
        urls = [c.url("fast") for c in conns]
        with monkeypatch.context() as m:
            sent = _capture_fast_sends(mec, m)
            mec.push({"x": bytearray(b"A" * 100_000)}, targets=0)
        assert mec.apply(lambda: len(x), targets=0) == [100_000]  # noqa: F821 (engine names)
        push = sent[0]
        # (a) engine 0's request, resent to engine 1
        assert _send_unanswered(mec, 1, urls[1], push) is None
        assert mec.apply(lambda: "x" in globals(), targets=1) == [False]
        assert any("engine 0" in r for r in _refusals(mec, 1)), _refusals(mec, 1)
        # (b) a request kept from engine 0 and sent on with its pickle replaced
        with monkeypatch.context() as m:
            sent = _capture_fast_sends(mec, m, swallow=True)
            mec.push({"y": bytearray(b"B" * 100_000)}, targets=0, block=False)
            wait_for(lambda: sent, 10, "the push to be captured")
        forged = [*sent[0][:6], pickle.dumps(Evil(), protocol=5), *sent[0][7:]]
        # its signature checks (its rid can be trusted): answered by a refusal, nothing unpickled
        refusal = _send_raw(urls[0], forged, 10000)
        assert refusal is not None and b'"refused"' in refusal[-1] and b"digest" in refusal[-1]
        assert not proof.exists(), "a request with other buffers than it was signed with ran"
        assert any("buffers" in r for r in _refusals(mec, 0)), _refusals(mec, 0)
        # (c) a reply whose pickle was replaced on its way back: the client drops it
        real_on_frames = mec.controller._on_frames

        def tamper(conn, channel, frames):
            if channel == "fast" and len(frames) > 6:  # 6 signed frames, then the buffers
                frames = [*frames[:6], pickle.dumps(Evil(), protocol=5), *frames[7:]]
            return real_on_frames(conn, channel, frames)

        with monkeypatch.context() as m:
            m.setattr(mec.controller, "_on_frames", tamper)
            # no ping behind the pull before 30 s: a refusal slower than the 1 s default (a
            # loaded box) is still told apart from a reply found lost
            m.setattr(controller, "FAST_LOST_AFTER", lost_after := 30.0)
            t0 = time.monotonic()
            with pytest.raises((CompositeError, EngineError)) as err:
                mec.pull("x", targets=0, block=False).get_result(timeout=10)
            took = time.monotonic() - t0
        assert not proof.exists(), "a reply with other buffers than it was signed with ran"
        # its signed parent names the request: it fails at once, saying why (not found lost)
        assert "engine 0: the reply to 'pull' was refused" in str(err.value), str(err.value)
        assert "do not match the digest" in str(err.value), str(err.value)
        assert took < lost_after, f"the refusal took {took:.2f} s"
        # both engines stay usable
        assert mec.apply(lambda: 7) == [7, 7]
        mec.push({"z": 1})
        assert mec.pull("z") == [1, 1]
        # an engine announcing a fast socket as older versions did (no ``signed``: it checks
        # neither) gets its data on the comm from a new client, not unprotected over TCP
        mec.execute(
            "import ipy_multiengine.engine as _e; _e._server[0].address.pop('signed', 0)",
            targets=1,
        )
        c = MultiEngineClient(_cluster.cluster_file)
        try:
            assert [c.controller._conn(e).fast for e in (0, 1)] == [True, False]  # white-box
            c.push({"w": bytearray(100_000)})
            assert c.pull("w") == [bytearray(100_000)] * 2
        finally:
            c.close()


def test_replies_a_missed_fast_wake_up_left_unread_are_still_read(cluster, monkeypatch):
    """The fast socket's FD is edge-triggered: messages left unread (its reader interrupted
    mid-burst, or not woken) wake nobody again, and their requests used to hang (or, with a
    request in flight, waited for the lost-reply ping's send to look). The controller's poller
    reads each fast socket too: with the reader gone altogether (the worst miss) and no ping
    (``FAST_LOST_AFTER`` out of reach), replies still arrive."""
    import asyncio

    from ipy_multiengine import _loop, controller

    monkeypatch.setattr(controller, "FAST_LOST_AFTER", 3600.0)

    c = MultiEngineClient(cluster.cluster_file)
    try:
        assert c.controller._conn(0).fast  # white-box, read on this thread (a bool)

        async def unwatch() -> None:
            sock = c.controller._conn(0).sockets["fast"]
            asyncio.get_running_loop().remove_reader(int(sock.getsockopt(zmq.FD)))

        _loop.run(unwatch(), timeout=10)
        assert c.apply(lambda: 41 + 1, targets=0, timeout=10) == [42]
        assert c.pull("__name__", targets=0, timeout=10) == ["__main__"]  # and later ones
    finally:
        c.close()


def test_a_lost_fast_reply_keeps_what_the_operation_printed(mec, monkeypatch, tmp_path):
    """An apply whose reply was lost failed with an EngineError without its output: what the
    function had printed (it arrived, on IOPub) was dropped with the request. Now the error's
    ``result`` keeps it, as for an engine's death."""
    from ipy_multiengine import _loop

    _drop_next_fast_reply(mec, monkeypatch)

    go = tmp_path / "go"

    def noisy(go=str(go)):
        import os
        import sys
        import time

        from ipykernel.iostream import OutStream

        # past the engine's count of writes (an operation that wrote replies on the comm,
        # behind its output, and that reply is not dropped): output the engine did not see
        OutStream.write(sys.stdout, "partial output\n")
        sys.stdout.flush()
        OutStream.write(sys.stderr, "a warning\n")
        sys.stderr.flush()
        while not os.path.exists(go):  # until its output has reached the controller
            time.sleep(0.005)
        return 5

    lost = mec.apply(noisy, targets=0, block=False)
    conn = mec.controller._conn(0)  # white-box: the request's output, read on the I/O thread

    async def heard() -> bool:
        seen = [("".join(r.stdout), "".join(r.stderr)) for r in conn.requests.values()]
        return ("partial output\n", "a warning\n") in seen

    wait_for(lambda: _loop.run(heard()), 20, "the apply's output to reach the controller")
    go.touch()
    with pytest.raises(CompositeError, match=r"engine 0 .*reply was lost") as info:
        lost.get_result(timeout=10)
    [err] = info.value.elist
    assert isinstance(err, EngineError) and err.engine_id == 0
    assert err.result == {
        "id": 0,
        "stdout": "partial output\n",
        "stderr": "a warning\n",
        "outputs": [],
    }, err.result
    assert mec.apply(lambda: 1, targets=0) == [1]


class _OtherKernelsStream:
    """An OutStream-like fd capture of another ipykernel: its reader thread (or a non-thread,
    ``thread=False``) does not stop when ``_should_watch`` goes False."""

    name = "stdout"

    def __init__(self, thread: bool) -> None:
        self._fid, self._original_stdstream_fd = os.pipe()
        self._original_stdstream_copy = os.open(os.devnull, os.O_WRONLY)
        self._should_watch = True
        self.got: list[str] = []
        self.stop = False
        import threading

        self.watch_fd_thread: object = threading.Thread(target=self._read, daemon=True)
        if thread:
            self.watch_fd_thread.start()  # type: ignore[attr-defined]
        else:
            self.watch_fd_thread = None

    def _read(self) -> None:
        while not self.stop:
            self.got.append(os.read(self._fid, 1000).decode())

    def write(self, text: str) -> int:
        self.got.append(text)
        return len(text)

    def close(self) -> None:
        self.stop = True
        os.write(self._original_stdstream_fd, b"end")
        if self.watch_fd_thread is not None:
            self.watch_fd_thread.join(5)  # type: ignore[attr-defined]
        for fd in (self._fid, self._original_stdstream_fd, self._original_stdstream_copy):
            os.close(fd)


@pytest.mark.parametrize("thread", [True, False])
def test_an_fd_reader_that_does_not_stop_is_left_running_with_a_warning(
    thread, monkeypatch, caplog
):
    """The engine takes over ipykernel 7.4's fd reader by the flag and NUL byte ipykernel's
    own ``close`` uses. A reader that does not stop so (another ipykernel) was left silently,
    and one that is not a thread made the takeover fail after it had cleared the flag, which
    left fd output with nobody to read it. Now either is left running, with a warning."""
    from ipy_multiengine import engine

    monkeypatch.setattr(engine._FdCapture, "STOP_WAIT", 0.2)
    stream = _OtherKernelsStream(thread)
    stream.__class__ = engine._draining(_OtherKernelsStream)
    try:
        with caplog.at_level("WARNING", logger="ipy_multiengine"):
            assert engine._FdCapture(stream).take_over() is False  # type: ignore[arg-type]
        assert "stays as ipykernel reads it" in caplog.text
        assert stream._should_watch is True and stream._ipy_multiengine_fd is None
    finally:
        stream.close()
