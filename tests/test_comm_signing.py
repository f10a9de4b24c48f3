"""The comm path's buffers are signed too, changed requests on either path are refused in
a signed answer, and engines report their data protocol (issue 15).

Jupyter's HMAC signature covers a message's header, parent, metadata and content but not its
buffers, and the first buffer of a data operation is a pickle. On TCP without CurveZMQ the comm
messages therefore also sign a sha256 digest of their buffers, both ways. Checked with real
engines and a real on-path attacker: a TCP relay between the client and the engine's shell or
IOPub port that rewrites the bytes of a pickle on the wire, as anyone on the path could.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from faultlib import small_cluster, wait_for
from wire_relay import Relay, evil_like, relayed_client

from ipy_multiengine import CompositeError, EngineError, MultiEngineClient, serialize
from ipy_multiengine.client import _dumps_namespace
from ipy_multiengine.controller import Controller
from ipy_multiengine.errors import RefusedError

pytestmark = pytest.mark.timeout(120)

COMM_ONLY = dict(os.environ, IPY_MULTIENGINE_FAST="0")


@pytest.fixture
def tcp_comm_engine() -> Iterator[tuple]:
    """One real engine on loopback TCP without CurveZMQ whose data goes on the comm."""
    with small_cluster(1, transport="tcp", env=COMM_ONLY) as (cluster, mec):
        info = dict(mec.controller.state(0).connection)
        assert info["transport"] == "tcp" and not info.get("curve_publickey")
        yield cluster, mec, info


@pytest.fixture
def relayed(tcp_comm_engine) -> Iterator[tuple]:
    """A second client of that engine whose shell and IOPub connections go through relays."""
    _cluster, mec, info = tcp_comm_engine
    shell = Relay(info["shell_port"], upstream=True)
    iopub = Relay(info["iopub_port"], upstream=False)
    proxied = dict(info, shell_port=shell.listen_port, iopub_port=iopub.listen_port)
    c = MultiEngineClient.from_controller(Controller({0: proxied}, timeout=30).connect())
    try:
        assert not c.controller._conn(0).fast  # white-box, read-only: the comm carries data
        yield mec, c, shell, iopub
    finally:
        c.close()
        shell.close()
        iopub.close()


def test_a_changed_request_pickle_on_the_comm_is_refused_unread(relayed, tmp_path):
    """The push's pickle is rewritten on its way to the engine into one that creates a file:
    the engine refuses it (naming itself and why), nothing is unpickled, the engine goes on."""
    mec, c, shell, _iopub = relayed
    proof = tmp_path / "ran-on-engine"
    c.push({"note": "Q" * 400})  # untampered, through the relays
    assert c.pull("note") == ["Q" * 400]
    big = bytes(range(256)) * 4096  # 1 MB, out of band: its frame is signed by the digest too
    c.push({"big": big})
    assert c.pull("big") == [big]

    values = {"note": "Z" * 400}
    original = bytes(_dumps_namespace(values)[0])
    shell.arm(original, evil_like(original, str(proof)))
    with pytest.raises((EngineError, CompositeError)) as info:
        c.push(values, timeout=20)
    assert shell.hits == 1, "the relay did not find the pickle to change"
    text = str(info.value)
    assert "engine 0 refused this 'push' request" in text, text
    assert "do not match the digest" in text, text
    assert not proof.exists(), "a changed pickle was unpickled on the engine"
    shell.disarm()
    assert c.pull("note") == ["Q" * 400]  # the refused push changed nothing
    c.push({"after": 1})
    assert c.apply(lambda: after + 1) == [2]  # noqa: F821 (engine name)
    assert mec.pull("after") == [1]  # and the engine's other client is unaffected


def test_a_changed_reply_pickle_on_the_comm_is_refused_unread(relayed, tmp_path):
    """The pull's reply pickle is rewritten on its way back into one that creates a file: the
    client refuses it (naming the engine and why) without unpickling; the engine goes on."""
    mec, c, _shell, iopub = relayed
    proof = tmp_path / "ran-on-client"
    mec.push({"y": "R" * 400})
    original = bytes(serialize.dumps("R" * 400)[0])  # the engine's pickle of it
    iopub.arm(original, evil_like(original, str(proof)))
    with pytest.raises((EngineError, CompositeError)) as info:
        c.pull("y", timeout=20)
    assert iopub.hits == 1, "the relay did not find the pickle to change"
    text = str(info.value)
    assert "engine 0: the reply to 'pull' was refused" in text, text
    assert "do not match the digest" in text, text
    assert not proof.exists(), "a changed reply pickle was unpickled on the client"
    iopub.disarm()
    assert c.pull("y") == ["R" * 400]
    assert c.apply(lambda: 6 * 7) == [42]


def test_an_engine_of_a_newer_data_protocol_is_refused_data_but_executes():
    """An engine whose helper reports a newer data protocol than this client's gets no data
    operation (its error names the engine and both versions); execute still works, and the
    engine stays usable for a client of its own version."""
    from ipy_multiengine import wire

    with small_cluster(1) as (_cluster, mec):
        info = dict(mec.controller.state(0).connection)
        mec.execute("import ipy_multiengine.wire as _w; _w.PROTOCOL = 99")
        newer = MultiEngineClient.from_controller(Controller({0: info}, timeout=30).connect())
        try:
            with pytest.raises((EngineError, CompositeError)) as err:
                newer.apply(lambda: 1)
            text = str(err.value)
            assert "engine 0" in text and "99" in text and f"({wire.PROTOCOL})" in text
            assert newer.execute("print(3)")[0]["stdout"] == "3\n"
        finally:
            newer.close()
        mec.execute(f"_w.PROTOCOL = {wire.PROTOCOL}")
        assert mec.apply(lambda: 2) == [2]


def _one(err: BaseException) -> BaseException:
    """The one engine's error in ``err`` (a ``CompositeError`` of one, or itself)."""
    return err.elist[0] if isinstance(err, CompositeError) else err


@pytest.fixture
def relayed_fast() -> Iterator[tuple]:
    """One real engine on loopback TCP without CurveZMQ (data on its fast socket), and a second
    client of it whose every connection goes through a relay (``wire_relay.relayed_client``)."""
    with small_cluster(1, transport="tcp") as (_cluster, mec), relayed_client(mec, [0]) as rc:
        yield mec, rc[0], rc[1][0]


def test_a_changed_request_pickle_on_the_fast_socket_is_refused_in_a_signed_answer(
    relayed_fast, tmp_path, monkeypatch
):
    """The push's pickle is rewritten on its way to the engine's fast socket: the signature
    still checks (it covers no buffer), the digest does not. The engine answers at once with a
    refusal naming itself and why (its rid is signed), as on the comm; nothing is unpickled."""
    from ipy_multiengine import controller

    mec, c, fast = relayed_fast
    # no ping behind the push before 30 s: a refusal slower than the 1 s default (a loaded
    # box, through the relay) is still told apart from a reply found lost
    monkeypatch.setattr(controller, "FAST_LOST_AFTER", 30.0)
    proof = tmp_path / "ran-on-engine"
    c.push({"note": "Q" * 400})
    assert c.pull("note") == ["Q" * 400]
    values = {"note": "Z" * 400}
    original = bytes(_dumps_namespace(values)[0])
    fast.arm(original, evil_like(original, str(proof)))
    t0 = time.monotonic()
    with pytest.raises((EngineError, CompositeError)) as info:
        c.push(values, timeout=20)
    took = time.monotonic() - t0
    assert fast.hits == 1, "the relay did not find the pickle to change"
    text = str(info.value)
    assert "engine 0 refused this 'push' request" in text, text
    assert "do not match the digest" in text and "nothing of it was unpickled" in text, text
    # answered, not found lost by the ping behind it
    assert took < controller.FAST_LOST_AFTER, f"the refusal took {took:.2f} s"
    assert isinstance(_one(info.value), RefusedError), repr(info.value)
    assert not proof.exists(), "a changed pickle was unpickled on the engine"
    fast.disarm()
    assert c.pull("note") == ["Q" * 400]  # the refused push changed nothing
    assert c.apply(lambda: 6 * 7) == [42]
    assert mec.pull("note") == ["Q" * 400]


def test_a_request_whose_signature_fails_on_the_fast_socket_is_reported_as_refused(
    relayed_fast,
):
    """A request changed where the signature covers it (its content) is not answered (its rid
    cannot be trusted), but the engine tells this client with its next reply that it refused a
    message of its unread: the operation fails saying so and why, not as a mysterious lost
    reply; the engine stays usable."""
    mec, c, fast = relayed_fast
    mec.push({"apricot_1": 1, "apricot_2": 2})
    fast.arm(b"apricot_1", b"apricot_2")
    with pytest.raises((EngineError, CompositeError)) as info:
        c.pull("apricot_1", timeout=20)
    assert fast.hits == 1, "the relay did not find the name to change"
    text = str(info.value)
    assert "engine 0 did not answer 'pull'" in text, text
    assert "refused a message of this client unread" in text, text
    assert "Invalid Signature" in text and "changed on the way" in text, text
    assert isinstance(_one(info.value), RefusedError), repr(info.value)
    fast.disarm()
    assert c.pull("apricot_1") == [1]
    assert c.apply(lambda: 6 * 7) == [42]


def test_a_fast_reply_whose_signature_fails_is_reported_as_refused():
    """A reply changed on its way back where the signature covers it (its content): this
    client drops it unread, and the operation fails saying so (a ``RefusedError``: the reply
    was refused, the operation may have run), not as a mysterious lost reply."""
    with (
        small_cluster(1, transport="tcp") as (_cluster, mec),
        relayed_client(mec, [0], fast_upstream=False) as (c, fast),
    ):
        mec.push({"plum": "P" * 50})
        assert c.pull("plum") == ["P" * 50]
        fast[0].arm(b'"status": "ok"', b'"status": "OK"', once=True)
        with pytest.raises((EngineError, CompositeError)) as info:
            c.pull("plum", timeout=20)
        assert fast[0].hits == 1, "the relay did not find the reply to change"
        text = str(info.value)
        assert "engine 0: no reply to 'pull' was accepted" in text, text
        assert "dropped a message from its fast socket unread" in text, text
        assert "Invalid Signature" in text and "may have run" in text, text
        assert isinstance(_one(info.value), RefusedError), repr(info.value)
        assert c.pull("plum") == ["P" * 50]


def test_the_status_table_says_why_data_operations_are_refused():
    """``mec.status()`` of a client that refuses an engine's data operations (the engine
    speaks a newer data protocol) marks that engine's state and says why below the table, in
    text and HTML; ``mec.engines`` has it too. An engine that takes data shows neither."""
    import html

    from ipy_multiengine import wire

    with small_cluster(2) as (_cluster, mec):
        infos = {e: dict(mec.controller.state(e).connection) for e in (0, 1)}
        mec.execute("import ipy_multiengine.wire as _w; _w.PROTOCOL = 99", targets=0)
        newer = MultiEngineClient.from_controller(Controller(infos, timeout=30).connect())
        try:
            table = newer.status()
            rows = {r["id"]: r for r in table.rows}
            why = rows[0]["data_refused"]
            assert why and "99" in why and f"({wire.PROTOCOL})" in why, why
            assert rows[1]["data_refused"] is None
            assert [e["data_refused"] for e in newer.engines] == [why, None]
            text = repr(table).splitlines()
            assert text[1].split()[4:7] == ["idle", "(data", "refused)"], text
            assert "refused" not in text[2], text
            assert text[3:] == [f"engine 0: data refused: {why}"], text
            page = table._repr_html_()
            assert ">idle (data refused)</td>" in page and ">idle</td>" in page, page
            assert f"<li>engine 0: data refused: {html.escape(why)}</li>" in page, page
            assert "refused" not in repr(mec.status())  # its own client takes its data
        finally:
            newer.close()
            mec.execute(f"_w.PROTOCOL = {wire.PROTOCOL}", targets=0)


def test_a_refusal_counted_before_a_request_was_sent_does_not_label_its_loss(mec):
    """The counts of refused messages (the engine's report of messages it refused unread, the
    client's own drops) named the next lost fast request a RefusedError, whenever it was sent:
    a forged message on the path that no request of ours consumed labelled any later loss, for
    good. A request sent after the refusal was counted is lost as such (EngineError); one
    unanswered when it was counted is still a RefusedError."""
    from ipy_multiengine import _loop
    from ipy_multiengine.controller import Request, _count_refusals

    ctl = mec.controller

    async def lose(counter: str, sent_before: bool) -> BaseException | None:
        conn = ctl._conn(mec.get_ids()[0])
        saved = list(getattr(conn, counter))
        req = Request(msg_id="m", eid=conn.eid, kind="comm", future=Future(), channel="fast")
        req.op = "pull"
        try:
            if sent_before:
                conn.requests[req.msg_id] = req
            _count_refusals(conn, getattr(conn, counter), 1, "Invalid Signature")
            conn.requests[req.msg_id] = req
            ctl._lost(conn, req)
        finally:
            getattr(conn, counter)[:] = saved
            conn.requests.pop(req.msg_id, None)
        return req.future.exception(timeout=0)

    for counter in ("fast_unchecked", "fast_dropped"):
        later = _loop.run(lose(counter, False), timeout=10)
        assert type(later) is EngineError and "was lost" in str(later), (counter, later)
        earlier = _loop.run(lose(counter, True), timeout=10)
        assert isinstance(earlier, RefusedError), (counter, earlier)
    assert mec.apply(lambda: 1) == [1] * len(mec.get_ids())


def test_a_refusal_whose_request_was_answered_does_not_label_a_later_loss(monkeypatch):
    """The client's count of fast messages it dropped (failing their signature) outlived the
    request such a message belonged to: a map's progress report dropped on the way left a
    count that no lost request consumed (the map was answered), and the next drop re-armed it
    with its own time. Of two requests then lost, one whose reply was dropped (a RefusedError)
    and one whose reply the engine never sent (a genuine loss), both were RefusedErrors. Now a
    count covers only the requests outstanding when it was counted, and ends with them."""
    from ipy_multiengine import controller

    monkeypatch.setattr(controller, "FAST_LOST_AFTER", 0.3)
    monkeypatch.setattr(controller, "FAST_LOST_GRACE", 0.5)
    with (
        small_cluster(1, transport="tcp") as (_cluster, mec),
        relayed_client(mec, [0], fast_upstream=False) as (c, fast),
    ):
        assert c.apply(lambda: 1) == [1]
        # a progress report of the map is changed on its way back: dropped, its map answered
        fast[0].arm(b'"status": "progress"', b'"status": "PROGRESS"', once=True)
        slow = lambda x: __import__("time").sleep(0.05) or x  # noqa: E731
        assert c.map(slow, range(12)) == list(range(12))
        assert fast[0].hits == 1, "the relay did not find a progress report to change"
        # the engine sends the first reply from now on (b's: changed on the way, dropped) and
        # not the second (lost's: a genuine loss)
        mec.execute(
            "import ipy_multiengine.engine as _e\n"
            "_srv, _sent = _e._server[0], []\n"
            "def _drop_second(*args, _srv=_srv, _sent=_sent, _real=type(_e._server[0])._send):\n"
            "    _sent.append(1)\n"
            "    if len(_sent) == 2:\n"
            "        del _srv._send\n"
            "        return\n"
            "    _real(_srv, *args)\n"
            "_srv._send = _drop_second\n"
            "del _e, _srv, _sent, _drop_second\n"
        )
        fast[0].arm(b'"status": "ok"', b'"status": "OK"', once=True)
        # both sent while the engine is busy (a cell of the other client), so both are in
        # flight when the first reply is dropped; quick, so they reply on the fast socket
        busy = mec.execute("import time; time.sleep(0.5)", block=False)
        wait_for(lambda: mec.controller.state(0).running, 10, "the engine to run the cell")
        changed = c.apply(lambda: 2, block=False)
        lost = c.apply(lambda: 3, block=False)
        with pytest.raises((EngineError, CompositeError)) as first:
            changed.get_result(timeout=20)
        with pytest.raises((EngineError, CompositeError)) as second:
            lost.get_result(timeout=20)
        assert fast[0].hits == 1, "the relay did not find the reply to change"
        refused, genuine = _one(first.value), _one(second.value)
        assert isinstance(refused, RefusedError), repr(refused)
        assert "no reply to 'apply' was accepted" in str(refused), refused
        assert type(genuine) is EngineError, repr(genuine)
        assert "its reply was lost" in str(genuine), genuine
        busy.get_result(timeout=10)
        assert c.apply(lambda: 4) == [4]
