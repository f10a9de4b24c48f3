"""Pickle protocol 5 (through cloudpickle) with out-of-band buffers.

``dumps`` returns the pickle stream and the large contiguous buffers separately, so that
NumPy arrays, bytes and memoryviews travel as their own message frames, never copied into
the message body. ``loads`` rebuilds the object on top of the received frames.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

#: Buffers smaller than this travel inside the pickle stream; a frame costs more than a copy.
OOB_THRESHOLD = 4096


def dumps(obj: Any) -> list[Any]:
    """Serialise ``obj``: ``[pickle_bytes, *out_of_band_buffers]``."""
    buffers: list[memoryview] = []

    def callback(pb: pickle.PickleBuffer) -> bool:
        try:
            view = pb.raw()
        except BufferError:  # not contiguous: pickle copies it in-band
            return True
        if view.nbytes < OOB_THRESHOLD:
            return True
        buffers.append(view)
        return False

    # plain values by the standard pickler (the same stream for them; a CloudPickler costs
    # more to set up than a small value costs to pickle): most replies are one of these
    dumper = pickle.dumps if _is_plain(obj) else cloudpickle.dumps
    data = dumper(obj, protocol=5, buffer_callback=callback)
    return [data, *buffers]


_PLAIN = frozenset({int, float, complex, bool, str, bytes, type(None)})


def _is_plain(obj: Any) -> bool:
    """A value that pickles by reference to nothing cloudpickle would ship by value: a builtin
    scalar, or a NumPy array of one of NumPy's own dtypes with no Python object in it (a
    dtype's ``metadata`` or a structured dtype's titles can hold any object)."""
    cls = type(obj)
    if cls in _PLAIN:
        return True
    if cls.__name__ != "ndarray" or cls.__module__ != "numpy":
        return False
    dt = obj.dtype
    return (
        not dt.hasobject
        and dt.names is None
        and dt.metadata is None
        and type(dt).__module__.startswith("numpy")
    )


def snapshot(frames: list[Any]) -> list[Any]:
    """Copy the out-of-band buffers of ``dumps`` output: for frames sent after the call
    returned (non-blocking calls, a balanced map's later chunks), which must carry the values
    of the time of the call, not whatever the caller's arrays hold by then."""
    return [frames[0], *(bytes(b) for b in frames[1:])] if len(frames) > 1 else frames


def loads(frames: list[Any]) -> Any:
    """Inverse of :func:`dumps`; arrays are rebuilt on the frames themselves (no copy)."""
    if not frames:
        raise ValueError("no frames to deserialise")
    return pickle.loads(frames[0], buffers=frames[1:])


def check_picklable(name: str, value: Any) -> list[Any]:
    """Serialise ``value`` or raise a ``TypeError`` naming ``name`` and its type."""
    try:
        return dumps(value)
    except Exception as exc:
        raise TypeError(
            f"cannot send {name!r}: object of type {type(value).__name__} cannot be pickled ({exc})"
        ) from exc
