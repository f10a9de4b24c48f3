"""An on-path attacker for tests: a TCP relay that rewrites bytes on the wire.

ZMTP frames on TCP without CurveZMQ are neither signed nor encrypted, and Jupyter's HMAC
signature covers a message's header, parent, metadata and content but not its buffers (the
pickles of data operations): a relay is all an attacker needs to change them.
"""

from __future__ import annotations

import contextlib
import pickle
import selectors
import socket
import threading
from collections.abc import Iterator

from ipy_multiengine import MultiEngineClient
from ipy_multiengine.controller import Controller
from ipy_multiengine.wire import PORT_KEYS


class _Evil:
    """Unpickling it creates the file ``path``: the proof that a changed pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_like(original: bytes, proof: str) -> bytes:
    """A pickle that runs code, padded to ``original``'s length: the ZMTP frame keeps its size
    (``pickle.loads`` ignores the bytes after the pickle's STOP)."""
    evil = pickle.dumps(_Evil(proof), protocol=5)
    assert len(evil) < len(original)
    return evil + b"\0" * (len(original) - len(evil))


class Relay:
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
        self.once = False
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, listen_port))
        self.listen_port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def arm(self, old: bytes, new: bytes, once: bool = False) -> None:
        """Replace ``old`` by ``new`` from now on (``once``: in the first read it is found)."""
        assert len(old) == len(new)
        with self._lock:
            self.old, self.new, self.hits, self.once = old, new, 0, once

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
                            self.hits += 1 if self.once else data.count(old)
                            data = data.replace(old, new, 1 if self.once else -1)
                            if self.once:
                                self.old = self.new = b""
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


@contextlib.contextmanager
def relayed_client(
    mec: MultiEngineClient, relayed: list[int], fast_upstream: bool = True
) -> Iterator[tuple]:
    """A second client of ``mec``'s TCP engines whose connections to the engines ``relayed``
    (their fast sockets' included) go through relays, the others direct: ``(client, {eid:
    the relay of its fast socket})``, which changes what goes to the engine (or, with
    ``fast_upstream=False``, what comes back). The relays listen on 127.0.0.2 at the engines'
    own port numbers (the engines listen on 127.0.0.1 only): the fast socket's port comes in
    the engine's signed comm reply, which no relay could change unnoticed."""
    infos, relays, fast = {}, [], {}
    try:
        for eid in mec.controller.ids:
            info = dict(mec.controller.state(eid).connection)
            assert info["transport"] == "tcp" and not info.get("curve_publickey"), info
            if eid in relayed:
                port = int(mec.controller.state(eid).engine_info["fast"]["port"])
                fast[eid] = Relay(port, fast_upstream, "127.0.0.2", port)
                relays.append(fast[eid])
                relays += [
                    Relay(info[k], False, "127.0.0.2", info[k]) for k in PORT_KEYS if info.get(k)
                ]
                info["ip"] = "127.0.0.2"
            infos[eid] = info
        c = MultiEngineClient.from_controller(Controller(infos, timeout=30).connect())
        try:
            # white-box, read-only: the fast sockets carry the data
            assert all(c.controller._conn(e).fast for e in infos)
            yield c, fast
        finally:
            c.close()
    finally:
        for r in relays:
            r.close()
