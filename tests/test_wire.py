"""wire.py's codec against jupyter_client's: the same JSON bytes, the same decoded values and
the same signatures as ``Session.pack``/``unpack``/``sign`` (it replaces them on the hot path
only for speed), and the engine's frame sender never leaves half a message behind."""

from __future__ import annotations

import datetime
import math
import uuid

import numpy as np
import pytest
import zmq
from jupyter_client.session import Session, json_packer, json_unpacker

from ipy_multiengine import wire

VALUES = [
    {},
    {"rid": "a" * 32, "status": "ok", "seconds": 1.5e-05, "n": None, "l": [1, 2.5, True]},
    {"text": "é ü 漢字 \U0001f600", "esc": '\n\t"\\'},
    {"lone": "\udcff"},  # a surrogate (undecodable bytes, as Python keeps them)
    {1: "int key", 2.5: "float key", False: "bool key", None: "none key"},
    {"when": datetime.datetime(2026, 12, 2, 17, 0, tzinfo=datetime.UTC)},
    {"np": np.int64(3), "f": np.float32(0.5)},
    [1, [2, [3, {"deep": ["x"]}]]],
    "plain string",
    12,
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_pack_gives_json_packers_bytes(value):
    assert wire.pack(value) == json_packer(value)


def _outcome(pack, value):
    try:
        return pack(value)
    except Exception as exc:  # the same failure counts as the same outcome
        return type(exc)


@pytest.mark.filterwarnings("ignore:Message serialization failed")
@pytest.mark.parametrize("odd", [{"x": math.nan}, {"x": math.inf}, {"x": object()}])
def test_pack_cleans_or_fails_where_json_packer_does(odd):
    """NaN and infinities: jupyter_client cleans them (with a warning); an object: both fail."""
    assert _outcome(wire.pack, odd) == _outcome(json_packer, odd)


@pytest.mark.parametrize(
    "raw", [b"{}", b'{"a": [1, 2]}', '{"é": "ü"}'.encode(), b'{"bad": "\xff"}', b"[]"]
)
def test_unpack_gives_json_unpackers_values(raw):
    assert wire._unpack(raw) == json_unpacker(raw)


@pytest.mark.parametrize("scheme", ["hmac-sha256", "hmac-sha512", "hmac-sha1", "hmac-md5"])
def test_sign_gives_session_signs_signature(scheme):
    session = Session(key=uuid.uuid4().hex.encode(), signature_scheme=scheme)
    parts = [json_packer({"msg_id": "x"}), b"{}", b"{}", json_packer({"é": 1})]
    assert wire.signer(session)(parts) == session.sign(parts)


def test_sign_with_no_key_signs_nothing_as_session_does():
    session = Session(key=b"")
    assert wire.signer(session)([b"{}"] * 4) == session.sign([b"{}"] * 4) == b""


def test_deserialize_checks_signatures_and_replays_as_session_does():
    session = Session(key=uuid.uuid4().hex.encode())
    frames = wire.fast_frames(
        wire.signer(session), {"msg_id": "m1", "msg_type": "t"}, {}, wire.pack({"a": 1})
    )
    msg = wire.deserialize(session, frames[1:])  # after the delimiter
    assert msg["header"]["msg_id"] == "m1" and msg["content"] == {"a": 1}
    with pytest.raises(ValueError, match="Duplicate Signature"):
        wire.deserialize(session, frames[1:])  # the same message again: a replay
    other = Session(key=uuid.uuid4().hex.encode())
    forged = wire.fast_frames(wire.signer(other), {"msg_id": "m2", "msg_type": "t"}, {}, b"{}")
    with pytest.raises(ValueError, match="Invalid Signature"):
        wire.deserialize(session, forged[1:])


def test_a_frame_that_fails_mid_message_leaves_no_half_message_behind():
    """pyzmq's ``send_multipart`` checks every frame first; the engine's backend sender cannot
    (it is the hot path), so a frame failing after others went out must end that message:
    otherwise the next reply (the error reply that follows) is glued onto its first half."""
    from ipy_multiengine.engine import _send_frames

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.linger = dealer.linger = 0
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        ident, _ = router.recv_multipart()
        with pytest.raises(TypeError):
            _send_frames(router, [ident, b"reply-1", "not a buffer", b"tail"])
        _send_frames(router, [ident, b"reply-2"])
        assert dealer.poll(5000)
        first = dealer.recv_multipart()
        assert dealer.poll(5000)
        assert first == [b"reply-1", b""] and dealer.recv_multipart() == [b"reply-2"]
    finally:
        router.close()
        dealer.close()
        ctx.term()


def test_check_keys_reads_any_mapping_and_names_what_is_wrong():
    from types import MappingProxyType

    wire.check_keys({0: MappingProxyType({"key": "k" * 64})}, "the caller")
    for key, shown in ((None, "None"), ("", "''"), (b"", "b''"), (12345, "a int")):
        with pytest.raises(ValueError) as err:
            wire.check_keys({3: {"key": key}}, "file f.json")
        assert f'engine 3 (file f.json) has no key ("key": {shown})' in str(err.value)
    with pytest.raises(ValueError, match=r"engine 1 \(x\): its connection info is a list"):
        wire.check_keys({1: []}, "x")


def test_refusal_reasons_never_repeat_the_senders_bytes():
    for exc, reason in (
        (ValueError("Invalid Signature: b'RUN pip install evil'"), "Invalid Signature"),
        (ValueError("Duplicate Signature: b'x'"), "Duplicate Signature"),
        (TypeError("malformed message, must have at least 5 elements, not 2"), "malformed"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "evil"), "unreadable (UnicodeDecodeError)"),
        (KeyError("evil"), "unreadable (KeyError)"),
    ):
        got = wire.refusal_reason(exc)
        assert got.startswith(reason) and "evil" not in got, got
