"""Splitting sequences across engines and joining the parts back (scatter/gather/map).

Every value is split and joined as one *kind* (``_kinds``): its parts are of that kind, and
only parts of one kind are joined. A value of no known kind is refused, never split as
whatever its iteration yields (a polars DataFrame iterates over its columns, an xarray Dataset
over its variable names, bytes over ints). No library is imported here: a kind whose library
is not loaded in this process cannot match anything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, MappingView, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Kind:
    """How one kind of value is split (``cut(seq, start, stop)``), joined and flattened."""

    name: str
    match: Callable[[Any], bool]
    cut: Callable[[Any, int, int], Any]
    join: Callable[[list[Any]], Any]
    first: Callable[[Any], Any]


def _types(module: str, *names: str) -> tuple[type, ...]:
    mod = sys.modules.get(module)
    found = (getattr(mod, n, None) for n in names)
    return tuple(t for t in found if isinstance(t, type))  # (also a library still importing)


def _of(module: str, name: str) -> Callable[[Any], bool]:
    return lambda seq: bool(t := _types(module, name)) and isinstance(seq, t)


def _is_ndarray(seq: Any) -> bool:
    return bool(t := _types("numpy", "ndarray")) and isinstance(seq, t)


def _join_arrays(parts: list[Any]) -> Any:
    import numpy

    masked = [p for p in parts if isinstance(p, numpy.ma.MaskedArray)]
    if masked:  # numpy.concatenate drops the masks, numpy.ma.concatenate the fill value
        out = numpy.ma.concatenate(parts)  # type: ignore[no-untyped-call]
        fill = masked[0].fill_value
        if all(_same_fill(p.fill_value, fill) for p in masked[1:]):
            out.fill_value = fill
        return out
    out = numpy.concatenate(parts)
    if all(type(p) is numpy.recarray for p in parts):
        out = out.view(numpy.recarray)  # concatenate gives a plain ndarray of records
    return out


def _same_fill(a: Any, b: Any) -> bool:
    """Whether two masked arrays' fill values are the same: by their bytes (a NaN is its own
    equal), or for an object array, whose fill value is any Python object, by ``==``."""
    import numpy

    x, y = numpy.asarray(a), numpy.asarray(b)
    if x.dtype != y.dtype:
        return False
    if not x.dtype.hasobject:
        return x.tobytes() == y.tobytes()
    try:
        return bool(numpy.all(x == y))
    except Exception:  # an object whose == raises, or gives no truth value
        return False


def _join_pandas(parts: list[Any]) -> Any:
    import pandas

    return pandas.concat(parts)


def _join_pandas_arrays(parts: list[Any]) -> Any:
    import pandas

    # by rows, as Series would be: a Categorical keeps its categories, Int64 its missing values
    series = [pandas.Series(p, copy=False) for p in parts]
    return pandas.concat(series, ignore_index=True).array


def _join_index(parts: list[Any]) -> Any:
    return parts[0].append(parts[1:])  # a MultiIndex stays one


def _join_polars(parts: list[Any]) -> Any:
    import polars

    return polars.concat(parts, how="vertical")  # refuses parts of another schema


def _join_chunked(parts: list[Any]) -> Any:
    import pyarrow

    return pyarrow.chunked_array([c for p in parts for c in p.chunks], type=parts[0].type)


def _join_batches(parts: list[Any]) -> Any:
    import pyarrow

    return pyarrow.concat_batches(parts)


def _pyarrow(name: str) -> Callable[[list[Any]], Any]:
    def join(parts: list[Any]) -> Any:
        import pyarrow

        return getattr(pyarrow, name)(parts)

    return join


def _extend(parts: list[Any]) -> list[Any]:
    out: list[Any] = []
    for p in parts:
        out.extend(p)
    return out


def _is_items(seq: Any) -> bool:
    """A sequence split into lists of its items: a list, tuple, range, any other ``Sequence``
    (deque, array.array...), an iterator or generator, or a dict's keys/values/items view."""
    if isinstance(seq, (str, bytes, bytearray, memoryview)) or _is_ndarray(seq):
        return False
    return isinstance(seq, (Sequence, Iterator, MappingView))


def _cut_items(seq: Any, a: int, b: int) -> list[Any]:
    return list(seq[a:b])


def _iloc(seq: Any, a: int, b: int) -> Any:
    return seq.iloc[a:b]


def _slice(seq: Any, a: int, b: int) -> Any:
    return seq.slice(a, b - a)  # polars: zero-copy, and pickled as the slice alone


def _own(seq: Any, a: int, b: int) -> Any:
    """Rows ``a:b`` of a pyarrow Table, RecordBatch or (chunked) Array, copied into buffers of
    their own: a pyarrow slice pickles its parent's whole buffers, so each engine would get
    (and keep) all the data for its few rows. Copied by concatenation, which every type has
    (``take`` has no kernel for run-end encoded or string_view arrays)."""
    import pyarrow

    part = seq.slice(a, b - a)
    if isinstance(part, pyarrow.Array):
        return pyarrow.concat_arrays([part])
    if isinstance(part, pyarrow.ChunkedArray):
        chunks = [pyarrow.concat_arrays(part.chunks)] if part.num_chunks else []
        return pyarrow.chunked_array(chunks, type=part.type)
    if not part.num_columns:
        return part  # no buffers to share (and no columns to count its rows by)
    columns = [_own(c, 0, len(c)) for c in part.columns]
    return type(part).from_arrays(columns, schema=part.schema)


def _index(seq: Any, a: int, b: int) -> Any:
    return seq[a:b]


def _first_row(part: Any) -> Any:
    return part.iloc[0]


def _item0(part: Any) -> Any:
    return part[0]


def _bytes0(part: Any) -> Any:
    return part[0:1]  # bytes of length one, not an int: gathered back, they are the bytes


def _row(part: Any) -> Any:
    return part.slice(0, 1).to_pylist()[0]  # a pyarrow table's row: {column: value}


def _named_row(part: Any) -> Any:
    return part.row(0, named=True)  # a polars DataFrame's row: {column: value}


# fmt: off
_kinds: tuple[_Kind, ...] = (  # the first that matches; pandas first (a subclass may be more)
    _Kind("pandas DataFrame", _of("pandas", "DataFrame"), _iloc, _join_pandas, _first_row),
    _Kind("pandas Series", _of("pandas", "Series"), _iloc, _join_pandas, _first_row),
    _Kind(
        "pandas array",
        _of("pandas.api.extensions", "ExtensionArray"),  # Categorical, Int64, datetimes...
        _index,
        _join_pandas_arrays,
        _item0,
    ),
    _Kind("pandas Index", _of("pandas", "Index"), _index, _join_index, _item0),
    _Kind("polars DataFrame", _of("polars", "DataFrame"), _slice, _join_polars, _named_row),
    _Kind("polars Series", _of("polars", "Series"), _slice, _join_polars, _item0),
    _Kind("pyarrow Table", _of("pyarrow", "Table"), _own, _pyarrow("concat_tables"), _row),
    _Kind("pyarrow RecordBatch", _of("pyarrow", "RecordBatch"), _own, _join_batches, _row),
    _Kind("pyarrow ChunkedArray", _of("pyarrow", "ChunkedArray"), _own, _join_chunked, _item0),
    _Kind("pyarrow Array", _of("pyarrow", "Array"), _own, _pyarrow("concat_arrays"), _item0),
    _Kind("NumPy array", _is_ndarray, _index, _join_arrays, _item0),
    _Kind("str", lambda s: isinstance(s, str), _index, "".join, _item0),
    _Kind("bytes", lambda s: isinstance(s, bytes), _index, b"".join, _bytes0),
    _Kind("bytearray", lambda s: isinstance(s, bytearray), _index, bytearray().join, _bytes0),
    _Kind("list", _is_items, _cut_items, _extend, _item0),
)
# fmt: on

_KNOWN = (
    "lists, tuples, ranges, other sequences and iterators, str, bytes, bytearray, NumPy "
    "arrays, pandas and polars DataFrames and Series (by rows), pandas Index and arrays "
    "(Categorical...), "
    "pyarrow Tables, RecordBatches and Arrays"
)


def _kind(seq: Any) -> _Kind | None:
    return next((k for k in _kinds if k.match(seq)), None)


def _refusal(seq: Any, verb: str) -> str:
    """Why ``seq`` is not split or joined: "an object of type T: what to do"."""
    if isinstance(seq, (dict, set, frozenset)) or not hasattr(seq, "__iter__"):
        hint = "need a sequence"
    elif isinstance(seq, memoryview):
        hint = "pass bytes(view) or numpy.asarray(view)"
    else:
        hint = f"convert it first, e.g. list(x) or numpy.asarray(x) ({verb} handles {_KNOWN})"
    return f"an object of type {type(seq).__name__}: {hint}"


def first(part: Any) -> Any:
    """The one item of a one-item part (``scatter(flatten=True)``): a pandas frame's first
    row (a Series), a polars or pyarrow table's first row (a dict), bytes of length one."""
    kind = _kind(part)
    return part[0] if kind is None else kind.first(part)


def split(seq: Any, nparts: int) -> list[Any]:
    """Split ``seq`` into ``nparts`` contiguous parts of its own kind.

    NumPy arrays are split along axis 0 into views; frames, series, indexes, pandas arrays
    and tables by rows; strings, bytes and bytearrays into their own type; other sequences,
    iterators and dict views into lists of their items. Anything else (a dict, a set, a 0-d
    array, a library's container of no known kind) is a ``TypeError`` naming its type.
    """
    kind = _kind(seq)
    if kind is None:
        raise TypeError(f"cannot scatter {_refusal(seq, 'scatter')}")
    if kind.name == "NumPy array" and seq.ndim == 0:
        raise TypeError(f"cannot scatter a 0-d array ({seq.dtype}): it has no items to split")
    if kind.name == "list" and not isinstance(seq, (list, tuple, range)):
        seq = list(seq)
    return [kind.cut(seq, a, b) for a, b in bounds(len(seq), nparts)]


def join(parts: Sequence[Any], what: str = "parts", ids: Sequence[Any] | None = None) -> Any:
    """Concatenate parts of one kind in order: arrays into one array (masked if any part is),
    frames, series and tables by rows, strings into a string, bytes into bytes, other
    sequences into a list. Parts of different kinds, of no known kind, or 0-d arrays are
    refused naming the ``ids`` of each (default: the parts' indices) as ``what`` holding them
    ("engines"): as a sequence a DataFrame gives its column labels, a string its characters."""
    if not parts:
        return []
    names = list(range(len(parts))) if ids is None else list(ids)
    kinds = [_kind(p) for p in parts]
    unknown = [n for n, k in zip(names, kinds, strict=True) if k is None]
    if unknown:
        part = parts[names.index(unknown[0])]
        raise TypeError(f"{what} {unknown} hold {_refusal(part, 'gather')}")
    held: dict[str, list[Any]] = {}
    for n, p, k in zip(names, parts, kinds, strict=True):
        assert k is not None
        held.setdefault(k.name, []).append(n)
        if k.name == "NumPy array" and p.ndim == 0:
            raise TypeError(f"{what} [{n}] hold a 0-d array: it has no items to join")
    if len(held) > 1:
        desc = ", ".join(
            f"{what} {ns} {'hold ' if i == 0 else ''}{_a(kind)}"
            for i, (kind, ns) in enumerate(held.items())
        )
        raise TypeError(f"{desc}: only parts of one kind are joined")
    kind = kinds[0]
    assert kind is not None
    if kind.name == "pandas DataFrame" and any(
        not p.columns.equals(parts[0].columns) for p in parts
    ):
        # pandas.concat would align them, filling NaN where a frame has no such column
        cols = "; ".join(f"{n}: {list(p.columns)}" for n, p in zip(names, parts, strict=True))
        raise TypeError(f"{what} hold DataFrames with different columns ({cols})")
    levels = _LEVELS_OF.get(kind.name)
    if levels is not None and any(levels(p) != levels(parts[0]) for p in parts):
        # MultiIndex.append and pandas.concat keep the first part's levels: a deeper part's
        # last levels were dropped, a flat one beside a MultiIndex made tuples and scalars
        nums = ", ".join(f"{n}: {levels(p)}" for n, p in zip(names, parts, strict=True))
        raise TypeError(
            f"{what} hold {_a(kind.name)} each, of different numbers of index levels ({nums})"
        )
    typed = _TYPE_OF.get(kind.name)
    if typed is not None and any(typed(p) != typed(parts[0]) for p in parts):
        # a join would fail naming a part by its index ("Schema at index 1"), or for pandas
        # arrays change their type (Categoricals of other categories: strings)
        texts = [_type_text(typed(p)) for p in parts]
        if len(set(texts)) == 1:  # two categoricals are both "category": say which
            texts = [repr(typed(p)) for p in parts]
        types = "; ".join(f"{n}: {t}" for n, t in zip(names, texts, strict=True))
        raise TypeError(f"{what} hold {_a(kind.name)} each, of different types ({types})")
    if kind.name == "NumPy array" and any(len(p) for p in parts):
        import numpy

        # an engine with no items often holds ``numpy.array([])`` (float64, 1-D): it adds no
        # values, so its dtype and shape must not decide the result (beside int64 parts
        # numpy's promotion made it all float64, beside 2-D parts concatenate failed); a
        # masked one stays (it makes the result masked)
        keep = [i for i, p in enumerate(parts) if len(p) or isinstance(p, numpy.ma.MaskedArray)]
        names, parts = [names[i] for i in keep], [parts[i] for i in keep]
    if kind.name in _PANDAS_ROWS and any(len(p) for p in parts):
        # the same for pandas: an empty float Series made int64 parts float64 (rounded)
        keep = [i for i, p in enumerate(parts) if len(p)]
        names, parts = [names[i] for i in keep], [parts[i] for i in keep]
    if kind.name == "NumPy array" and len({p.dtype for p in parts}) > 1:
        import numpy

        # int64 beside uint64 concatenates to float64: values above 2**53 come back rounded
        if all(p.dtype.kind in "biu" for p in parts) and (
            numpy.result_type(*parts).kind not in "biu"
        ):
            dtypes = ", ".join(f"{n}: {p.dtype}" for n, p in zip(names, parts, strict=True))
            raise TypeError(
                f"{what} hold integer arrays with no common integer type ({dtypes}): joined "
                "they would be floats, large values rounded; cast them to one dtype first"
            )
    try:
        joined = kind.join(list(parts))
    except Exception as exc:  # numpy's ValueError, polars' SchemaError, pyarrow's ArrowInvalid
        if kind.name != "NumPy array":
            raise TypeError(f"{what} {names}: the parts cannot be joined ({exc})") from exc
        shapes = ", ".join(f"{n}: {p.shape} {p.dtype}" for n, p in zip(names, parts, strict=True))
        raise TypeError(
            f"{what} hold arrays that cannot be joined along their first axis ({shapes})"
        ) from exc
    if kind.name in _PANDAS_ROWS:
        _check_integers(parts, joined, names, what)
    if kind.name in ("pandas DataFrame", "pandas Series"):  # their row labels, joined too
        _check_integers([p.index for p in parts], joined.index, names, what, " in the row index")
    return joined


#: the pandas kinds joined by rows whose integer columns pandas may turn into floats
_PANDAS_ROWS = frozenset({"pandas DataFrame", "pandas Series", "pandas Index"})


def _dtypes(value: Any) -> list[Any]:
    """The dtype of each column of a DataFrame, each level of a MultiIndex, else ``[dtype]``."""
    dtypes = getattr(value, "dtypes", None)
    if dtypes is not None and hasattr(dtypes, "iloc"):
        return list(dtypes)
    return [value.dtype]


def _check_integers(
    parts: Sequence[Any], joined: Any, names: list[Any], what: str, where: str = ""
) -> None:
    """Refuse a pandas join that made floats of integer columns: int64 beside uint64 (numpy's
    or pandas' nullable ones) joins as float64, so values above 2**53 came back rounded.
    ``where`` says which labels were checked (the row index of a Series or DataFrame)."""

    def integer(dtype: Any) -> bool:
        return getattr(dtype, "kind", "") in ("b", "i", "u")

    after = _dtypes(joined)
    each = [_dtypes(p) for p in parts]
    if any(len(d) != len(after) for d in each):  # (parts of other levels are refused before)
        return
    for col, dtype in enumerate(after):
        before = [d[col] for d in each]
        if getattr(dtype, "kind", "") == "f" and all(integer(d) for d in before):
            label = f" in column {joined.columns[col]!r}" if hasattr(joined, "columns") else where
            dtypes = ", ".join(f"{n}: {d}" for n, d in zip(names, before, strict=True))
            raise TypeError(
                f"{what} hold integers of no common integer type{label} ({dtypes}): joined "
                f"they would be {dtype}, large values rounded; cast them to one dtype first"
            )


#: the number of levels of these kinds' row labels, which must be the same in every part
_LEVELS_OF: dict[str, Callable[[Any], int]] = {
    "pandas Index": lambda p: p.nlevels,
    "pandas Series": lambda p: p.index.nlevels,
    "pandas DataFrame": lambda p: p.index.nlevels,
}


#: what must be the same in every part of these kinds: their column types or dtype
_TYPE_OF: dict[str, Callable[[Any], Any]] = {
    "pandas array": lambda p: p.dtype,
    "polars DataFrame": lambda p: p.schema,
    "polars Series": lambda p: p.dtype,
    "pyarrow Table": lambda p: p.schema,  # (== leaves out the metadata, as concat_tables does)
    "pyarrow RecordBatch": lambda p: p.schema,
    "pyarrow ChunkedArray": lambda p: p.type,
    "pyarrow Array": lambda p: p.type,
}


def _type_text(t: Any) -> str:
    """A dtype or schema on one line (a pyarrow schema without its metadata)."""
    try:
        text = str(t.to_string(show_field_metadata=False, show_schema_metadata=False))
    except (AttributeError, TypeError):
        text = str(t)
    return text.replace("\n", ", ")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def known(value: Any) -> bool:
    """Whether ``value`` is of a kind ``split`` and ``join`` handle (any 0-d array included)."""
    return _kind(value) is not None
