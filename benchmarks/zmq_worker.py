"""A raw zmq peer: the floor for a zero-copy transfer of one buffer (``python -m
benchmarks.zmq_worker PORT``)."""

from __future__ import annotations

import os
import sys
import threading
import time

import zmq


def _orphan_watch(parent: int) -> None:
    """End this process once the benchmark that started it has ended without "stop" (a
    thread, so that the measured loop stays one blocking recv, as a raw peer's is)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main(port: int, parent: int | None = None) -> None:
    """Hold the last pushed buffer; send it back on ``pull``; ack every push; end on any
    other command, or when the process that started it has ended."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    held = None
    # the starter's pid, given: read here, it would be init's already if the starter died first
    parent = os.getppid() if parent is None else parent
    threading.Thread(target=_orphan_watch, args=(parent,), daemon=True).start()
    while True:
        frames = s.recv_multipart(copy=False)
        cmd = frames[0].bytes
        if cmd == b"push":
            held = frames[1]
            s.send(b"ok")
        elif cmd == b"pull":
            s.send(held if held is not None else b"", copy=False)
        elif cmd == b"clear":
            held = None
            s.send(b"ok")
        else:
            s.send(b"bye")
            break
    s.close()
    ctx.term()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
