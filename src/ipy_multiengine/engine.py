"""Code that runs *inside* an engine (an ordinary ipykernel).

The controller installs it with a silent ``execute`` and then opens a comm with target
``ipy_multiengine``. Each comm message is one operation on the user namespace:
``push``, ``pull``, ``apply``, ``map`` or ``ping``. Every message gets exactly one reply
``{'rid': ..., 'status': 'ok'|'error', ...}`` with pickled payloads as binary buffers, also
when the operation raises (a comm handler exception would otherwise produce no reply).
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
from typing import Any

from IPython import get_ipython

from . import serialize

TARGET = "ipy_multiengine"


def register() -> None:
    """Register the comm target on the running kernel (idempotent)."""
    ip = get_ipython()
    ip.kernel.comm_manager.register_target(TARGET, _on_open)


def _namespace() -> dict:
    return get_ipython().user_ns


def _on_open(comm: Any, msg: dict) -> None:
    comm.on_msg(lambda m: _on_msg(comm, m))
    rid = msg["content"]["data"].get("rid")
    comm.send(
        {"rid": rid, "status": "ok", "pid": os.getpid(), "host": socket.gethostname(),
         "python": sys.version.split()[0]}
    )


def _op_push(data: dict, frames: list) -> list:
    _namespace().update(serialize.loads(frames))
    return []


def _op_pull(data: dict, frames: list) -> list:
    ns = _namespace()
    values = []
    for name in data["names"]:
        try:
            values.append(ns[name])
        except KeyError:
            raise NameError(f"name {name!r} is not defined") from None
    try:
        return serialize.dumps(values[0] if data.get("single") else values)
    except Exception as exc:
        for name, value in zip(data["names"], values):
            _check_sendable(f"{name!r}", value)
        raise TypeError(f"cannot send the pulled values back: {exc}") from exc


def _check_sendable(what: str, value: Any) -> None:
    try:
        serialize.dumps(value)
    except Exception as exc:
        raise TypeError(f"cannot send {what} back to the client: a {type(value).__name__} "
                        f"cannot be pickled ({exc})") from exc


def _op_apply(data: dict, frames: list) -> list:
    f, args, kwargs = serialize.loads(frames)
    result = f(*args, **kwargs)
    try:
        return serialize.dumps(result)
    except Exception:
        _check_sendable(f"the return value of {getattr(f, '__name__', 'the function')}", result)
        raise


class _ItemError(Exception):
    def __init__(self, index: int, exc: BaseException) -> None:
        self.index = index
        self.exc = exc


def _op_map(data: dict, frames: list) -> list:
    f, items = serialize.loads(frames)
    out = []
    for i, args in enumerate(items):
        try:
            out.append(f(*args))
        except Exception as exc:
            raise _ItemError(data.get("offset", 0) + i, exc) from exc
    return serialize.dumps(out)


def _op_ping(data: dict, frames: list) -> list:
    return []


OPS = {"push": _op_push, "pull": _op_pull, "apply": _op_apply, "map": _op_map, "ping": _op_ping}


def _error_reply(rid: Any, exc: BaseException, item: int | None) -> tuple[dict, list]:
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # hide the dispatcher's own frame
    try:
        lines = get_ipython().InteractiveTB.structured_traceback(type(exc), exc, tb)
    except Exception:
        import traceback

        lines = traceback.format_exception(type(exc), exc, tb)
    try:
        pickled = [pickle.dumps(exc, protocol=5)]
        pickle.loads(pickled[0])
    except Exception:
        pickled = []
    reply = {"rid": rid, "status": "error", "ename": type(exc).__name__, "evalue": str(exc),
             "traceback": lines, "item": item}
    return reply, pickled


def _on_msg(comm: Any, msg: dict) -> None:
    data = msg["content"]["data"]
    rid = data.get("rid")
    try:
        op = OPS[data["op"]]
        frames = op(data, msg.get("buffers") or [])
        reply: dict = {"rid": rid, "status": "ok"}
    except _ItemError as err:
        reply, frames = _error_reply(rid, err.exc, err.index)
    except BaseException as exc:  # noqa: BLE001 - every failure must produce a reply
        reply, frames = _error_reply(rid, exc, None)
    finally:
        _flush_pending_output()
    comm.send(reply, buffers=frames)


def _flush_pending_output() -> None:
    """Flush stdout/stderr so output precedes the reply, only when something was written.

    An ipykernel ``OutStream.flush`` from the shell thread waits for a round trip through the
    IOPub thread even when nothing is buffered: two of those were ~0.5 ms of every op.
    """
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "_flush_pending", True) is False and not getattr(stream, "_buffers", True):
            continue  # an idle ipykernel OutStream: nothing to send
        try:
            stream.flush()
        except Exception:
            pass
