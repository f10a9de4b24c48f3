"""The per-message floor and scaling (issue 15 items 2-3), beside the peer benchmarks.

    python -m benchmarks.fastpath quick [-n 4] [--calls 200]     # apply no-op / pull small / 1 MB
    python -m benchmarks.fastpath compare [-n 4] [--calls 50]    # fast socket vs comm, interleaved
    python -m benchmarks.fastpath scale [--max 64] [--calls 30]   # 1, 2, 4, ... engines
    python -m benchmarks.fastpath floor [--calls 300]             # the design's own floor

``quick`` prints medians of: apply no-op on all engines, pull of a small value from all,
push and pull of 1 MB to one engine, execute('pass') on all, and the client's CPU per call.
``floor`` measures what the design costs before any of our protocol: a bare zmq socket served
on a real engine's kernel loop (as the fast socket is), asked for 1 MB (and 100 bytes) from
the caller's thread directly and through the client's I/O thread (the only thread that touches
an engine's sockets: a hop there and a Future back); "caller" asks our engine's real fast
socket from the caller's thread with our engine-side protocol (the best a client bypassing its
I/O thread could do); beside our pull and raw zmq, all interleaved in rounds.
``scale`` starts a cluster of each size and prints start time, execute/apply medians and the
client CPU per call (per engine, too). The machine's load is printed with every table: these
are figures of one moment of a shared box, not timed tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

os.environ.setdefault("JUPYTER_RUNTIME_DIR", tempfile.mkdtemp(prefix="ime-bench-"))

import numpy as np

from ipy_multiengine import Cluster


def _noop() -> int:
    return 0


def _cpu(procs: list) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def timed(fn, calls: int, engines: list | None = None) -> tuple[float, float, float]:
    """(median wall ms, mean client CPU ms, mean CPU ms of all engines) per call of ``fn``."""
    for _ in range(max(calls // 10, 3)):
        fn()
    walls = []
    e0 = _cpu(engines or [])
    c0 = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / calls
    ecpu = (_cpu(engines or []) - e0) / calls
    return statistics.median(walls) * 1e3, cpu * 1e3, ecpu * 1e3


def engine_procs(mec) -> list:
    import psutil

    return [psutil.Process(mec.controller.state(e).pid) for e in mec.get_ids()]


def ops(mec, one_mb: bool = True) -> dict:
    mec.push({"s": 42})
    big = np.ones(2**20 // 8)
    found = {
        "apply no-op on all": lambda: mec.apply(_noop),
        "pull small from all": lambda: mec.pull("s"),
        "execute('pass') on all": lambda: mec.execute("pass"),
    }
    if one_mb:
        mec.push({"big": big}, targets=0)
        found["push 1 MB to one"] = lambda: mec.push({"big": big}, targets=0)
        found["pull 1 MB from one"] = lambda: mec.pull("big", targets=0)
    return found


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cpus"


def quick(n: int, calls: int, **kw) -> None:
    with Cluster(n=n, **kw) as mec:
        print(f"# {n} engines, {calls} calls each; {load()}")
        procs = engine_procs(mec)
        for name, fn in ops(mec).items():
            wall, cpu, ecpu = timed(fn, calls, procs)
            print(
                f"{name:26} {wall:8.3f} ms   client CPU {cpu:7.3f} ms/call   "
                f"engines' CPU {ecpu:7.3f} ms/call",
                flush=True,
            )


class RawZmq:
    """A ``benchmarks.zmq_worker`` peer: push (send + ack) and pull (ask + receive) of 1 MB."""

    def __init__(self) -> None:
        import subprocess
        import sys

        import zmq

        self.sock = zmq.Context.instance().socket(zmq.PAIR)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.zmq_worker", str(port), str(os.getpid())]
        )
        self.big = np.ones(2**20 // 8)
        self.push()

    def push(self) -> None:
        self.sock.send_multipart([b"push", self.big], copy=False)
        self.sock.recv()

    def pull(self) -> None:
        self.sock.send(b"pull")
        self.sock.recv(copy=False)

    def close(self) -> None:
        self.sock.send(b"stop")
        try:
            self.worker.wait(10)
        finally:
            self.sock.close()


def raw_zmq(calls: int) -> dict:
    """Push and pull of 1 MB with a raw zmq peer (``RawZmq``): median wall ms of each."""
    peer = RawZmq()
    try:
        return {
            "push 1 MB to one": timed(peer.push, calls)[0],
            "pull 1 MB from one": timed(peer.pull, calls)[0],
        }
    finally:
        peer.close()


def compare(n: int, calls: int, rounds: int = 5) -> None:
    """The fast socket against the comm, interleaved in rounds so that load drifts alike:
    medians over rounds of per-round medians (wall), and mean CPU per call."""
    fast = Cluster(n=n)
    comm = Cluster(n=n, env=dict(os.environ, IPY_MULTIENGINE_FAST="0"))
    clients = {"fast": fast.start(), "comm": comm.start()}
    try:
        print(f"# {n} engines, {rounds} rounds of {calls} calls; {load()}")
        table: dict = {}
        found = {name: ops(mec) for name, mec in clients.items()}
        procs = {name: engine_procs(mec) for name, mec in clients.items()}
        for _ in range(rounds):
            for path in clients:
                for op, fn in found[path].items():
                    table.setdefault((op, path), []).append(timed(fn, calls, procs[path]))
        print(f"{'op':26} {'path':5} {'wall ms':>8} {'client CPU':>10} {'engines CPU':>11}")
        for (op, path), rows in table.items():
            wall = statistics.median(r[0] for r in rows)
            cpu = statistics.median(r[1] for r in rows)
            ecpu = statistics.median(r[2] for r in rows)
            print(f"{op:26} {path:5} {wall:8.3f} {cpu:10.3f} {ecpu:11.3f}", flush=True)
        for op, wall in raw_zmq(calls).items():
            print(f"{op:26} {'zmq':5} {wall:8.3f}   (raw zmq PAIR over loopback TCP)")
        print(f"# {load()}")
    finally:
        fast.stop()
        comm.stop()


def scale(maximum: int, calls: int) -> None:
    print(f"# {load()}")
    print(
        f"{'engines':>7} {'start s':>8} {'execute ms':>11} {'apply ms':>9} "
        f"{'exec ms/eng':>11} {'apply ms/eng':>12} {'CPU ms/call':>11} {'CPU us/msg':>10}"
    )
    n = 1
    while n <= maximum:
        t0 = time.perf_counter()
        cluster = Cluster(n=n)
        mec = cluster.start()
        start = time.perf_counter() - t0
        try:
            found = ops(mec, one_mb=False)
            ex, _, _ = timed(found["execute('pass') on all"], calls)
            ap, cpu, _ = timed(found["apply no-op on all"], calls)
        finally:
            cluster.stop()
        print(
            f"{n:7d} {start:8.2f} {ex:11.2f} {ap:9.2f} {ex / n:11.3f} {ap / n:12.3f} "
            f"{cpu:11.3f} {cpu / n * 1e3:10.1f}",
            flush=True,
        )
        n *= 2
    print(f"# {load()}")


_FLOOR_SERVER = """
import numpy as _np, zmq as _zmq
from ipykernel.kernelapp import IPKernelApp as _App
_fs = _zmq.Context.instance().socket(_zmq.PAIR)
_fs.linger = 0
_fs.bind({address!r})
_held = {{b"big": _np.ones(2**20 // 8), b"small": b"x" * 100}}
def _floor_readable():
    while _fs.get(_zmq.EVENTS) & _zmq.POLLIN:
        _fs.send(_held[_fs.recv(_zmq.NOBLOCK)], copy=False)
_App.instance().kernel.io_loop.asyncio_loop.add_reader(_fs.getsockopt(_zmq.FD), _floor_readable)
"""


def _caller_on_our_socket(mec, loop) -> tuple:
    """A pull asked from the caller's thread on the engine's real fast socket with our whole
    engine-side protocol (signature, the op, pickling, the signed reply), without the
    client's: the best a client path that bypassed its I/O thread could do. Returns
    ``(pull(name), close())``. The engine's connection is read on the loop (it is loop state);
    the socket is a second connection of this thread's own."""
    from concurrent.futures import Future

    import zmq

    from ipy_multiengine import serialize, wire

    got: Future = Future()

    def read() -> None:  # (loop)
        conn = mec.controller._engines[mec.get_ids()[0]]
        got.set_result(
            (conn.url("fast"), conn.session, conn.sign, conn.comm_id, conn.eid, conn.fast_digest)
        )

    loop.call_soon_threadsafe(read)
    url, session, sign, comm_id, eid, digest = got.result(10)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(url)

    def pull(name: str) -> None:
        msg_id = os.urandom(16).hex()
        header = wire.fast_request_header(msg_id, comm_id, eid, [] if digest else None)
        content = session.pack({"op": "pull", "names": [name], "single": True})
        sock.send_multipart(wire.fast_frames(sign, header, {}, content))
        while True:  # a reply to an earlier, timed-out call would come first
            msg = wire.deserialize(session, sock.recv_multipart(copy=False)[1:], sign)
            if msg["parent_header"].get("msg_id") == msg_id:
                break
        serialize.loads(msg["buffers"])

    return pull, lambda: sock.close(0)


def floor(calls: int, rounds: int = 5) -> None:
    """The design's floor against ours and raw zmq (module docstring), medians of rounds."""
    from concurrent.futures import Future

    import zmq

    from ipy_multiengine import _loop

    address = "ipc://" + os.path.join(os.environ["JUPYTER_RUNTIME_DIR"], f"floor-{os.getpid()}")
    with Cluster(n=1) as mec, contextlib.closing(RawZmq()) as peer:
        mec.push({"big": np.ones(2**20 // 8), "small": b"x" * 100})
        mec.execute(_FLOOR_SERVER.format(address=address))
        sock = zmq.Context.instance().socket(zmq.PAIR)
        sock.linger = 0
        sock.connect(address)
        loop = _loop.get_loop()
        waiting: list[Future] = []

        def readable() -> None:  # (loop) as Controller._drain_fast: read until nothing is left
            while sock.get(zmq.EVENTS) & zmq.POLLIN:
                waiting.pop(0).set_result(sock.recv(zmq.NOBLOCK, copy=False))

        def relayed(name: bytes) -> None:
            fut: Future = Future()

            def send() -> None:
                waiting.append(fut)
                sock.send(name)
                if sock.get(zmq.EVENTS) & zmq.POLLIN:
                    readable()

            loop.call_soon_threadsafe(send)
            fut.result()

        def direct(name: bytes) -> None:
            sock.send(name)
            sock.recv(copy=False)

        caller, close_caller = _caller_on_our_socket(mec, loop)
        found = {
            ("1 MB", "direct"): lambda: direct(b"big"),
            ("1 MB", "relayed"): lambda: relayed(b"big"),
            ("1 MB", "caller"): lambda: caller("big"),
            ("1 MB", "ours"): lambda: mec.pull("big", targets=0),
            ("1 MB", "raw zmq"): peer.pull,
            ("100 B", "direct"): lambda: direct(b"small"),
            ("100 B", "relayed"): lambda: relayed(b"small"),
            ("100 B", "caller"): lambda: caller("small"),
            ("100 B", "ours"): lambda: mec.pull("small", targets=0),
        }
        print(f"# 1 engine, {rounds} rounds of {calls} calls; {load()}")
        procs = engine_procs(mec)
        table: dict = {}
        ready = Future()  # the reader is added on the loop, which alone reads the socket then
        loop.call_soon_threadsafe(
            lambda: (loop.add_reader(sock.getsockopt(zmq.FD), readable), ready.set_result(None))
        )
        ready.result()
        for _ in range(rounds):
            for key, fn in found.items():
                if key[1] == "direct":  # the loop must not read it meanwhile
                    paused = Future()
                    loop.call_soon_threadsafe(
                        lambda f=paused: (
                            loop.remove_reader(sock.getsockopt(zmq.FD)),
                            f.set_result(None),
                        )
                    )
                    paused.result()
                    table.setdefault(key, []).append(timed(fn, calls, procs))
                    resumed = Future()
                    loop.call_soon_threadsafe(
                        lambda f=resumed: (
                            loop.add_reader(sock.getsockopt(zmq.FD), readable),
                            f.set_result(None),
                        )
                    )
                    resumed.result()
                else:
                    table.setdefault(key, []).append(timed(fn, calls, procs))
        done = Future()
        loop.call_soon_threadsafe(
            lambda: (loop.remove_reader(sock.getsockopt(zmq.FD)), done.set_result(None))
        )
        done.result()
        sock.close()
        close_caller()
    print(
        f"{'pull':6} {'path':8} {'median ms':>9} {'/ direct':>8} {'client CPU':>10} "
        f"{'engine CPU':>10}  (ms per call)"
    )
    for (size, path), rows in table.items():
        med = statistics.median(r[0] for r in rows)
        base = statistics.median(r[0] for r in table[(size, "direct")])
        cpu = statistics.median(r[1] for r in rows)
        ecpu = statistics.median(r[2] for r in rows)
        print(
            f"{size:6} {path:8} {med:9.3f} {med / base:8.2f} {cpu:10.3f} {ecpu:10.3f}", flush=True
        )
    raw = statistics.median(r[0] for r in table[("1 MB", "raw zmq")])
    print(
        f"# raw zmq: benchmarks.zmq_worker, a blocking peer; 1 MB: caller / raw zmq "
        f"{statistics.median(r[0] for r in table[('1 MB', 'caller')]) / raw:.2f}, "
        f"ours / raw zmq {statistics.median(r[0] for r in table[('1 MB', 'ours')]) / raw:.2f}"
    )
    print(f"# {load()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["quick", "compare", "scale", "floor"])
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--max", type=int, default=64)
    args = parser.parse_args()
    if args.what == "quick":
        quick(args.n, args.calls)
    elif args.what == "compare":
        compare(args.n, args.calls)
    elif args.what == "floor":
        floor(args.calls)
    else:
        scale(args.max, args.calls)


if __name__ == "__main__":
    main()
