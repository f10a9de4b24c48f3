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
import pickle
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from faultlib import small_cluster

from ipy_multiengine import CompositeError, EngineError, MultiEngineClient, serialize
from ipy_multiengine.client import _dumps_namespace
from ipy_multiengine.controller import Controller

pytestmark = pytest.mark.timeout(120)

COMM_ONLY = dict(os.environ, IPY_MULTIENGINE_FAST="0")


class _Evil:
    """Unpickling it creates the file ``path``: the proof that a changed pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_like(original: bytes, proof: str) -> bytes:
    """A pickle that runs code, padded to ``original``'s length: the ZMTP frame keeps its size
    (``pickle.loads`` ignores the bytes after the pickle's STOP)."""
    evil = pickle.dumps(_Evil(proof), protocol=5)
    assert len(evil) < len(original)
    return evil + b"\0" * (len(original) - len(evil))


class _Relay:
    """A TCP relay to ``127.0.0.1:port`` that, once armed, replaces ``old`` by ``new`` (same
    length) in what flows from the client to the engine (``upstream``) or back. ZMTP frames
    on TCP without CurveZMQ are neither signed nor encrypted: this is all an attacker needs."""

    def __init__(
        self, port: int, upstream: bool, host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.port = port
        self.upstream = upstream
        self.old = self.new = b""
        self.hits = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, listen_port))
        self.listen_port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def arm(self, old: bytes, new: bytes) -> None:
        assert len(old) == len(new)
        with self._lock:
            self.old, self.new, self.hits = old, new, 0

    def disarm(self) -> None:
        with self._lock:
            self.old = self.new = b""

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            engine = socket.create_connection(("127.0.0.1", self.port))
            t = threading.Thread(target=self._pump, args=(client, engine), daemon=True)
            self._threads.append(t)
            t.start()

    def _pump(self, client: socket.socket, engine: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        tampered = engine if self.upstream else client  # where the changed bytes go
        peer = {client: engine, engine: client}
        sel.register(client, selectors.EVENT_READ)
        sel.register(engine, selectors.EVENT_READ)
        held = b""  # the tail towards ``tampered`` that may begin a pattern split across reads
        try:
            while not self._stop.is_set():
                events = sel.select(0.02)
                if not events and held:
                    tampered.sendall(held)  # quiet: nothing can complete a pattern now
                    held = b""
                for key, _ in events:
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(1 << 20)
                    if not data:
                        return
                    dst = peer[src]
                    if dst is not tampered:
                        dst.sendall(data)
                        continue
                    with self._lock:
                        old, new = self.old, self.new
                        data = held + data
                        if old and old in data:
                            self.hits += data.count(old)
                            data = data.replace(old, new)
                    keep = max(len(old) - 1, 0) if old else 0
                    held = data[len(data) - keep :] if keep else b""
                    dst.sendall(data[: len(data) - keep] if keep else data)
        except OSError:
            return
        finally:
            client.close()
            engine.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(5)


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
    shell = _Relay(info["shell_port"], upstream=True)
    iopub = _Relay(info["iopub_port"], upstream=False)
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
    shell.arm(original, _evil_like(original, str(proof)))
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
    iopub.arm(original, _evil_like(original, str(proof)))
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


@pytest.fixture
def relayed_fast() -> Iterator[tuple]:
    """One real engine on loopback TCP without CurveZMQ (data on its fast socket), and a second
    client of it whose every connection, the fast socket's included, goes through a relay:
    the relays listen on 127.0.0.2 at the engine's own port numbers (the fast socket's port
    comes from the engine's signed comm reply, which no relay may change)."""
    from ipy_multiengine.wire import PORT_KEYS

    with small_cluster(1, transport="tcp") as (_cluster, mec):
        info = dict(mec.controller.state(0).connection)
        assert info["transport"] == "tcp" and not info.get("curve_publickey")
        fast_port = int(mec.controller.state(0).engine_info["fast"]["port"])
        plain = [_Relay(info[k], False, "127.0.0.2", info[k]) for k in PORT_KEYS if info.get(k)]
        fast = _Relay(fast_port, True, "127.0.0.2", fast_port)
        c = None
        try:
            c = MultiEngineClient.from_controller(
                Controller({0: dict(info, ip="127.0.0.2")}, timeout=30).connect()
            )
            assert c.controller._conn(0).fast  # white-box, read-only: the fast socket carries data
            yield mec, c, fast
        finally:
            if c is not None:
                c.close()
            for r in [*plain, fast]:
                r.close()


def test_a_changed_request_pickle_on_the_fast_socket_is_refused_in_a_signed_answer(
    relayed_fast, tmp_path
):
    """The push's pickle is rewritten on its way to the engine's fast socket: the signature
    still checks (it covers no buffer), the digest does not. The engine answers at once with a
    refusal naming itself and why (its rid is signed), as on the comm; nothing is unpickled."""
    from ipy_multiengine import controller

    mec, c, fast = relayed_fast
    proof = tmp_path / "ran-on-engine"
    c.push({"note": "Q" * 400})
    assert c.pull("note") == ["Q" * 400]
    values = {"note": "Z" * 400}
    original = bytes(_dumps_namespace(values)[0])
    fast.arm(original, _evil_like(original, str(proof)))
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
    fast.disarm()
    assert c.pull("apricot_1") == [1]
    assert c.apply(lambda: 6 * 7) == [42]
