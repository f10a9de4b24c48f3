"""A raw zmq peer: the floor for a zero-copy transfer of one buffer (``python -m
benchmarks.zmq_worker PORT``)."""

from __future__ import annotations

import sys

import zmq


def main(port: int) -> None:
    """Hold the last pushed buffer; send it back on ``pull``; ack every push."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    held = None
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
    main(int(sys.argv[1]))
