"""Message contents on the wire: what the controller sends, and the fast decoding of replies.

The controller owns sockets and routing; this module owns what goes *in* the messages (the
Jupyter ``execute_request``, the ``ipy_multiengine`` comm's open and operation messages) and
how a received multipart message becomes a dict. It does no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from hmac import compare_digest
from typing import Any

import zmq
from jupyter_client.jsonutil import json_default
from jupyter_client.session import DELIM, Session, json_packer, json_unpacker

#: The comm target the engine helper registers (``engine.register``).
COMM_TARGET = "ipy_multiengine"

#: Run silently on each Python engine when it connects: installs the helper behind the comm.
INSTALL_CODE = (
    "import ipy_multiengine.engine as _ime_helper; _ime_helper.register(); del _ime_helper"
)

#: The connection-info keys of a kernel's five ports (for ``transport='ipc'``: socket files).
PORT_KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")

#: The data protocol the engine helper and the controller speak (comm and fast socket): one
#: integer, raised only for a change a peer of the previous one cannot work with. Additions an
#: older peer merely lacks get a flag in the engine's connect info instead (``map_elements``,
#: ``fast.signed``, ``comm_digest``). The engine reports it in its comm's open reply (engines
#: before it report none: 0); a controller refuses data operations with an engine of a newer
#: one. The comm's open message and its reply are the part every version keeps.
PROTOCOL = 1

#: What follows the kernel's ``ip`` in the path of the engine helper's fast unix socket.
FAST_SOCKET_SUFFIX = "ime"


def fast_socket_path(ip: str) -> str:
    """The path of the fast socket of an ipc engine whose connection info has ``ip``."""
    return f"{ip}-{FAST_SOCKET_SUFFIX}"


def socket_paths(conn: dict) -> list[str]:
    """Every unix socket file an engine with connection info ``conn`` listens on: the
    kernel's five and the engine helper's fast socket ([] unless ``transport='ipc'``).
    The one list of them: whoever cleans up after an engine removes these."""
    if not isinstance(conn, dict) or conn.get("transport") != "ipc" or not conn.get("ip"):
        return []
    ip = str(conn["ip"])
    return [f"{ip}-{conn[k]}" for k in PORT_KEYS if conn.get(k)] + [fast_socket_path(ip)]


#: Message types served on the control channel: their busy/idle says nothing of the shell.
CONTROL_MSG_TYPES = frozenset(
    {
        "interrupt_request",
        "shutdown_request",
        "debug_request",
        "usage_request",
        # the engine helper's own (``engine.py``): sent by one client, seen by every client
        "ime_interrupt_request",
        "ime_abort_request",
    }
)


def check_keys(engines: dict, source: str) -> None:
    """Raise ValueError naming the first engine of ``engines`` (id -> connection info, from
    ``source``: a file, or the caller) whose connection info has no key, before anything is
    sent to any: a Jupyter ``Session`` with an empty key signs nothing and checks nothing, so
    its engine would run whatever anyone who reaches its ports sends (a pickle: any code)."""
    for eid, info in sorted(engines.items(), key=lambda kv: str(kv[0])):
        if not isinstance(info, Mapping):
            raise ValueError(
                f"engine {eid} ({source}): its connection info is a {type(info).__name__}, "
                "not a mapping of the kernel's connection fields; nothing was sent to it"
            )
        key = info.get("key")
        if not isinstance(key, (str, bytes)) or not key:
            # the value itself is not shown: whatever it is, it is meant to be secret
            shown = repr(key) if key in (None, "", b"") else f"a {type(key).__name__}"
            raise ValueError(
                f'engine {eid} ({source}) has no key ("key": {shown}): a Jupyter session '
                "without a key signs nothing, so that engine runs whatever anyone who can reach "
                "its ports sends, and this client would believe whatever they answer; nothing "
                "was sent to it. Give its kernel a key (ipy_multiengine's launchers always make "
                "one; `jupyter kernel` and notebook servers do too)"
            )


def refusal_reason(exc: BaseException) -> str:
    """Why a received message was refused, in words of ours only: the sender's bytes (a
    signature, a forged header) never reach a log or a user's screen, where anyone who can
    send a message could otherwise write text of their choice."""
    text = str(exc) if isinstance(exc, (ValueError, TypeError)) else ""
    if text.startswith(_SIGNED_ELSEWHERE):  # raised once the signature checked: its values
        return text[:200]  # are the signed header's, which only a key holder can write
    for reason in _REASONS:
        if text.startswith(reason):
            return reason
    return f"unreadable ({type(exc).__name__})"


_SIGNED_ELSEWHERE = "signed for engine"


_REASONS = (
    "Invalid Signature",
    "Duplicate Signature",
    "Unsigned Message",
    "malformed message",
    "the buffers do not match",
    "no digest of the buffers",
)


def execute_content(code: str, silent: bool = False, allow_stdin: bool = False) -> dict:
    """The content of an ``execute_request`` for ``code``.

    ``stop_on_error`` is off: a failing request must not abort the requests queued behind it
    (other callers' requests may be among them). Silent code is not stored in the history.
    """
    return {
        "code": code,
        "silent": silent,
        "store_history": not silent,
        "user_expressions": {},
        "allow_stdin": allow_stdin,
        "stop_on_error": False,
    }


def init_content(code: str) -> dict:
    """An ``execute_request`` for on_start code: output kept, not stored in the history."""
    return dict(execute_content(code), store_history=False)


def comm_open_content(comm_id: str, eid: int | None = None, digest: bool = False) -> dict:
    """The ``comm_open`` content that opens the helper's comm (the reply names the engine);
    ``eid`` becomes the engine's ``engine_id`` name; ``digest``: the messages on this comm sign
    a digest of their buffers (``bd`` in their data, see :func:`buffers_exposed`)."""
    data: dict = {"engine_id": eid}
    if digest:
        data["digest"] = True
    return {"comm_id": comm_id, "target_name": COMM_TARGET, "data": data}


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    import ipaddress

    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def buffers_exposed(transport: str, curve: bool) -> bool:
    """Whether a message's buffers can be changed on the way unnoticed, so that they must be
    signed by a digest: on TCP without CurveZMQ. The HMAC signature of a Jupyter message
    covers its header, parent, metadata and content but not its buffers, and the first buffer
    of a data operation is a pickle. A unix socket in the 0700 runtime directory, or Curve's
    authenticated encryption (a changed frame does not decrypt), protects them already."""
    return transport != "ipc" and not curve


def comm_op_content(comm_id: str, op: str, data: dict) -> dict:
    """The ``comm_msg`` content of one data operation (``push``, ``pull``, ``apply``,
    ``map``...)."""
    return {"comm_id": comm_id, "data": dict(data, op=op)}


#: The header of every reply on a fast socket: a reply is named by its parent (the request).
FAST_REPLY_HEADER = {"msg_type": "ime_reply"}


def buffers_digest(buffers: list) -> str:
    """A digest of a message's buffers (their number, lengths and bytes) for its signed header:
    the HMAC signature covers only the header, parent, metadata and content frames."""
    h = hashlib.sha256()  # with the CPU's SHA extensions: ~3x faster than blake2b
    h.update(len(buffers).to_bytes(8, "little"))
    for b in buffers:
        h.update(memoryview(b).nbytes.to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def fast_request_header(msg_id: str, comm_id: str, eid: int, buffers: list | None = None) -> dict:
    """The header of one data operation on an engine's fast socket: its id (the ``rid`` the
    reply names), the comm an operation with output replies on, the engine it is for (an
    engine refuses a request signed for another one of its cluster: they share the key) and,
    when ``buffers`` is given, their digest (``bd``, checked before anything is unpickled).
    No date, session or version: nothing reads them, and ``Session.msg`` building them was a
    fifth of a fast call's cost on each side."""
    header = {"msg_id": msg_id, "msg_type": "ime_request", "comm_id": comm_id, "eid": eid}
    if buffers is not None:
        header["bd"] = buffers_digest(buffers)
    return header


def check_buffers(header: dict, buffers: list, required: bool, where: str = "header") -> None:
    """Raise ValueError unless the buffer digest in the signed ``header`` (a fast message's
    header, a comm message's data: ``where``) matches ``buffers`` (a message without one passes
    only when not ``required``)."""
    digest = header.get("bd")
    if digest is None:
        if required:
            raise ValueError(f"no digest of the buffers in the signed {where}")
        return
    if not isinstance(digest, str) or not compare_digest(digest, buffers_digest(buffers)):
        raise ValueError(f"the buffers do not match the digest in the signed {where}")


#: jupyter_client's json packer's encoder, built once (``json.dumps`` with options, and even
#: ``JSONEncoder.encode``, build one per call): the C encoder itself where CPython has it
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:
    _c_encoder = _c_make_encoder(
        None,  # no circular check (a circular value fails with RecursionError, caught below)
        json_default,
        json.encoder.encode_basestring,  # ensure_ascii=False
        None,
        ": ",
        ", ",
        False,
        False,
        False,  # allow_nan=False
    )

    def _encode(value: Any) -> str:
        if isinstance(value, str):  # (what JSONEncoder.encode does before the C encoder)
            return json.encoder.encode_basestring(value)
        return "".join(_c_encoder(value, 0))

else:  # pragma: no cover (not CPython)
    _encode = json.JSONEncoder(  # type: ignore[assignment]
        default=json_default, ensure_ascii=False, allow_nan=False
    ).encode


def pack(obj: Any) -> bytes:
    """``Session.pack`` (jupyter_client's ``json_packer``: the same bytes) with its encoder
    built once, a tenth of a small fast message's cost on each side."""
    try:
        return _encode(obj).encode("utf8", errors="surrogateescape")
    except (TypeError, ValueError, RecursionError):
        return json_packer(obj)  # its cleaning fallback (and its warning), or its error


def signer(session: Session) -> Callable[[list], bytes]:
    """A function signing a message's parts as ``session.sign`` does (b"" without a key), from
    a copy of one keyed HMAC (no re-keying per message) fed the parts joined (the same digest);
    in C calls only where ``hmac`` wraps OpenSSL's object (its ``_hmac``)."""
    if session.auth is None:
        return lambda _parts: b""
    keyed = hmac.new(session.key, digestmod=session.signature_scheme.split("-", 1)[1])
    base = getattr(keyed, "_hmac", keyed)
    join = b"".join

    def sign(parts: list) -> bytes:
        h = base.copy()
        h.update(join(parts))
        return h.hexdigest().encode()

    return sign


def fast_frames(
    sign: Callable[[list], bytes], header: dict, parent: dict, content: bytes
) -> list[bytes]:
    """A signed message for a fast socket (``content`` already packed: the same bytes go to
    every engine of a call): Jupyter's wire layout, signed by ``sign`` (a ``signer``)."""
    parts = [pack(header), pack(parent) if parent else b"{}", b"{}", content]
    return [DELIM, sign(parts), *parts]


def with_rid(msg: dict) -> dict:
    """Stamp a comm message with its own msg_id as ``rid``: the engine's reply carries it back,
    which is how a comm reply finds its request (comm replies have no useful parent)."""
    msg["content"]["data"]["rid"] = msg["msg_id"]
    return msg


def deserialize(
    session: Session, frames: list, sign: Callable[[list], bytes] | None = None
) -> dict:
    """``Session.deserialize(frames, copy=False)`` without parsing dates or adapting versions.

    Routing needs neither, and dateutil's parsing of the header and parent dates was ~15% of
    the loop thread's CPU per message (py-spy). Signatures are checked exactly as Session does.
    """
    if len(frames) < 5:
        raise TypeError(f"malformed message, must have at least 5 elements, not {len(frames)}")
    head = [f.bytes if isinstance(f, zmq.Frame) else bytes(f) for f in frames[:5]]
    auth = session.auth
    if auth is not None:
        signature = head[0]
        if not signature:
            raise ValueError("Unsigned Message")
        if signature in session.digest_history:
            raise ValueError(f"Duplicate Signature: {signature!r}")
        # replay history, as Session.deserialize keeps it (its limit and culling): no public API
        session._add_digest(signature)
        expected = sign(head[1:5]) if sign is not None else session.sign(head[1:5])
        if not compare_digest(signature, expected):
            raise ValueError(f"Invalid Signature: {signature!r}")
    unpack = _unpack if session.unpack is json_unpacker else session.unpack
    header = unpack(head[1])
    return {
        "header": header,
        "msg_id": header.get("msg_id", ""),
        "msg_type": header["msg_type"],
        "parent_header": unpack(head[2]),
        "metadata": unpack(head[3]),
        "content": unpack(head[4]),
        "buffers": [memoryview(f) for f in frames[5:]],
    }


def _unpack(b: bytes) -> Any:
    """``json_unpacker`` (the same result), ``{}`` without parsing, else the C scanner straight
    away (``decode`` adds two regex matches for surrounding whitespace, which our own encoder
    never writes: with some, it decides)."""
    if b == b"{}":
        return {}
    text = b.decode("utf8", "replace")
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        end = -1
    return value if end == len(text) else _decode(text)


_decode = json.JSONDecoder().decode
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def request_id(msg: dict) -> tuple[str, str]:
    """The ids a received message may belong to: (comm ``rid`` or "", parent msg_id or "")."""
    content = msg.get("content") or {}
    rid = (content.get("data") or {}).get("rid", "") if msg.get("msg_type") == "comm_msg" else ""
    return rid, (msg.get("parent_header") or {}).get("msg_id", "")


def execute_record(
    eid: int, code: str, reply: dict, stdout: list[str], stderr: list[str], outputs: list[dict]
) -> dict:
    """The tutorial's result dict of one engine's execute, from its reply and collected output."""
    return {
        "id": eid,
        "number": reply.get("execution_count"),
        "input": {"raw": code, "translated": code},
        "stdout": "".join(stdout),
        "stderr": "".join(stderr),
        "outputs": outputs,
        "result": next(
            (o.get("data") for o in outputs if o["output_type"] == "execute_result"), None
        ),
        "status": reply.get("status", "ok"),
    }


#: Characters of late output (``LateOutput``) one execute's record keeps: a message that comes
#: while it holds less is kept whole (one large display is kept); what comes after is counted
#: in its ``dropped`` and ``dropped_chars``, not kept.
LATE_LIMIT = 262144


class LateOutput(dict):
    """``record["late"]``: what an engine printed or displayed for an execute after it had
    finished (a thread the code started, a timer), in the order it came: ``stdout`` and
    ``stderr`` text, rich ``outputs`` (as in the record), and ``dropped``/``dropped_chars``,
    the messages not kept past ``LATE_LIMIT`` characters and their size. Written on the
    controller's thread, which holds it weakly: it lives as long as the record does.
    ``msg_id`` and ``number`` (the engine's ``In [n]``) say which execute it belongs to."""

    __slots__ = ("__weakref__", "msg_id", "number", "size")

    def __init__(self, msg_id: str = "", number: int | None = None) -> None:
        super().__init__(stdout="", stderr="", outputs=[], dropped=0, dropped_chars=0)
        self.msg_id = msg_id
        self.number = number
        self.size = 0

    def __reduce__(self) -> Any:  # a plain dict elsewhere (pickled, copied)
        return (dict, (dict(self),))

    def add(self, mtype: str, content: dict) -> bool:
        """(loop) Keep one late message; False when the bound was reached before it (it is
        counted in ``dropped`` and ``dropped_chars``)."""
        if mtype == "stream":
            text = content.get("text", "")
            size = len(text)
        else:
            size = sum(len(str(v)) for v in (content.get("data") or {}).values()) + 1
        if self.size >= LATE_LIMIT:
            self["dropped"] += 1
            self["dropped_chars"] += size
            return False
        self.size += size
        if mtype == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            self[name] += text
        else:
            self["outputs"] = [*self["outputs"], {"output_type": mtype, **content}]
        return True
