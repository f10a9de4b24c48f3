"""Splitting sequences across engines and joining the parts back (scatter/gather/map)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def bounds(length: int, nparts: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` ranges, in order, whose sizes differ by at most one."""
    if nparts < 1:
        raise ValueError("need at least one part")
    base, extra = divmod(length, nparts)
    out = []
    start = 0
    for i in range(nparts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _is_array(seq: Any) -> bool:
    return type(seq).__module__ == "numpy" and hasattr(seq, "shape")


def is_frame(seq: Any) -> bool:
    """A pandas DataFrame or Series, or one of a subclass (geopandas' GeoDataFrame, a user's
    own): split and joined by rows (``.iloc``, ``pandas.concat``). Iterated as a sequence, a
    DataFrame gives its column labels. (No pandas imported: no frame can exist.)"""
    pandas = sys.modules.get("pandas")
    frame, series = getattr(pandas, "DataFrame", None), getattr(pandas, "Series", None)
    if not isinstance(frame, type) or not isinstance(series, type):
        return False  # (also a pandas still importing)
    return isinstance(seq, (frame, series))


def first(part: Any) -> Any:
    """The one item of a one-item part (``scatter(flatten=True)``): a frame's first row."""
    return part.iloc[0] if is_frame(part) else part[0]


def split(seq: Any, nparts: int) -> list[Any]:
    """Split ``seq`` into ``nparts`` contiguous parts.

    NumPy arrays are split along axis 0 into views, pandas DataFrames and Series by rows,
    lists/tuples/ranges into lists, strings into strings; any other iterable is materialised
    as a list first.
    """
    if is_frame(seq):
        return [seq.iloc[a:b] for a, b in bounds(len(seq), nparts)]
    if _is_array(seq):
        if seq.ndim == 0:
            raise TypeError("cannot scatter a 0-d array")
        return [seq[a:b] for a, b in bounds(len(seq), nparts)]
    if isinstance(seq, str):
        return [seq[a:b] for a, b in bounds(len(seq), nparts)]
    if not isinstance(seq, (list, tuple, range)):
        if isinstance(seq, (dict, set, frozenset)) or not hasattr(seq, "__iter__"):
            raise TypeError(
                f"cannot scatter an object of type {type(seq).__name__}: need a sequence"
            )
        seq = list(seq)
    return [list(seq[a:b]) for a, b in bounds(len(seq), nparts)]


def join(parts: Sequence[Any], what: str = "parts", ids: Sequence[Any] | None = None) -> Any:
    """Concatenate parts in order: arrays into one array, pandas frames (or series) into one by
    rows, strings into a string, else a list. Frames mixed with other kinds are refused (as a
    sequence a DataFrame gives its column labels), naming the ``ids`` of each kind (default:
    the parts' indices) as ``what`` holding them ("engines")."""
    frames = [is_frame(p) for p in parts]
    if parts and all(frames):
        import pandas

        return pandas.concat(parts)
    if any(frames):
        names = list(range(len(parts))) if ids is None else list(ids)
        held = {k: [n for n, f in zip(names, frames, strict=True) if f is k] for k in (True, False)}
        frame, other = (type(parts[frames.index(k)]).__name__ for k in (True, False))
        raise TypeError(
            f"{what} {held[True]} hold a pandas {frame} (joined by rows), {what} {held[False]} "
            f"a {other}: only parts of one kind are joined"
        )
    if parts and all(_is_array(p) for p in parts):
        import numpy

        return numpy.concatenate(parts)
    if parts and all(isinstance(p, str) for p in parts):
        return "".join(parts)
    out: list[Any] = []
    for p in parts:
        out.extend(p)
    return out
