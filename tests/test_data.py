"""Moving objects: the tutorial's push/pull, functions, dictionary interface, scatter/gather,
parallel map and list comprehensions, plus zero-copy arrays and the error cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ipy_multiengine.errors import CompositeError
from ipy_multiengine.results import PendingResult

pytestmark = pytest.mark.timeout(120)


def test_tutorial_push_pull(mec):
    assert mec.push(dict(a=1.03234, b=3453)) == [None, None, None, None]
    assert mec.pull("a") == [1.03234] * 4
    assert mec.pull("b", targets=0) == [3453]
    assert mec.pull(("a", "b")) == [[1.03234, 3453]] * 4
    assert mec.zip_pull(("a", "b")) == [(1.03234,) * 4, (3453,) * 4]
    assert mec.push(dict(c="speed")) == [None] * 4
    assert [r["stdout"] for r in mec.execute("print(c)")] == ["speed\n"] * 4


def test_nonblocking_push_pull(mec):
    mec.block = False
    pr = mec.push(dict(a=1.03234))
    assert isinstance(pr, PendingResult)
    assert pr.r == [None] * 4
    pr = mec.pull("a")
    assert isinstance(pr, PendingResult)
    assert pr.r == [1.03234] * 4


def test_push_and_pull_functions(mec):
    def f(x):
        return 2.0 * x**4

    assert mec.push_function(dict(f=f)) == [None] * 4
    mec.execute("y = f(4.0)")
    assert [r["stdout"] for r in mec.execute("print(y)")] == ["512.0\n"] * 4
    g = mec.pull_function("f", targets=1)[0]
    assert g(2.0) == 32.0
    with pytest.raises(TypeError, match="'v' is a int"):
        mec.push_function(dict(v=3))


def test_dictionary_interface(mec):
    mec["a"] = ["foo", "bar"]
    assert mec["a"] == [["foo", "bar"]] * 4


def test_tutorial_scatter_gather(mec):
    assert mec.scatter("a", range(16)) == [None] * 4
    out = mec.execute("print(a)")
    assert [r["stdout"] for r in out] == [
        "[0, 1, 2, 3]\n",
        "[4, 5, 6, 7]\n",
        "[8, 9, 10, 11]\n",
        "[12, 13, 14, 15]\n",
    ]
    assert mec.gather("a") == list(range(16))


def test_parallel_list_comprehension(mec):
    mec.scatter("x", range(64))
    mec.execute("y = [i**10 for i in x]")
    assert mec.gather("y") == [i**10 for i in range(64)]


def test_parallel_map_and_decorator(mec):
    serial_result = list(map(lambda x: x**10, range(32)))
    assert mec.map(lambda x: x**10, range(32)) == serial_result

    @mec.parallel()
    def f(x):
        return 10.0 * x**4

    assert f(range(32)) == [10.0 * x**4 for x in range(32)]
    assert f.map(range(5)) == [10.0 * x**4 for x in range(5)]
    assert mec.mapper(targets=[1, 2]).map(abs, [-1, -2, 3]) == [1, 2, 3]


def test_map_several_sequences_generators_and_empty(mec):
    assert mec.map(lambda a, b: a + b, [1, 2, 3], (10, 20, 30, 40)) == [11, 22, 33]
    gen = (i for i in range(10))
    assert mec.map(lambda x: -x, gen) == [-i for i in range(10)]
    assert list(gen) == []  # consumed once
    assert mec.map(lambda x: x, []) == []
    assert mec.map(str, range(3)) == ["0", "1", "2"]  # fewer items than engines
    pr = mec.map(lambda x: x + 1, range(8), block=False)
    assert pr.get_result(timeout=30) == list(range(1, 9))


def test_map_error_names_engine_and_item(mec):
    with pytest.raises(CompositeError) as info:
        mec.map(lambda x: 1 / (x - 5), range(12))
    e = info.value
    assert len(e.elist) == 1
    assert e.elist[0].engine_id == 1 and e.elist[0].item == 5
    assert "[1:map]: ZeroDivisionError: division by zero (on item 5)" in str(e)
    with pytest.raises(ZeroDivisionError):
        e.raise_exception()


def test_apply(mec):
    assert mec.apply(lambda a, b=1: a * b, 3, b=2) == [6] * 4
    assert (
        mec.apply(lambda: __import__("os").getpid(), targets=[0, 1])[0]
        != mec.apply(lambda: __import__("os").getpid(), targets=[0, 1])[1]
    )
    pr = mec.apply(pow, 2, 10, block=False)
    assert pr.r == [1024] * 4
    with pytest.raises(TypeError, match="callable"):
        mec.apply(3)


def test_round_trips_of_functions_classes_containers(mec):
    k = 7

    def closure(x):
        return x + k

    class Point:
        def __init__(self, x):
            self.x = x

        def __eq__(self, other):
            return isinstance(other, Point) and other.x == self.x

    nested = {"a": [1, (2, 3), {4, 5}], "b": {"c": b"\x00" * 10, "d": None}, "e": frozenset([1])}
    mec.push(dict(closure=closure, Point=Point, nested=nested, lam=lambda s: s * 2), targets=0)
    assert mec.execute("r = (closure(1), Point(3).x, lam('ab'))", targets=0)
    assert mec.pull("r", targets=0) == [(8, 3, "abab")]
    assert mec.pull("nested", targets=0) == [nested]
    assert mec.apply(lambda p: p.x, Point(9), targets=0) == [9]


@pytest.mark.parametrize("dtype", ["float64", "int32", "complex128", "uint8"])
def test_array_round_trip(mec, dtype):
    a = (np.arange(300_000) % 251).astype(dtype).reshape(600, 500)
    mec.push({"a": a}, targets=[0, 1])
    back = mec.pull("a", targets=[0, 1])
    for b in back:
        assert b.dtype == a.dtype and b.shape == a.shape
        assert np.array_equal(a, b)
        assert b.flags.writeable
        b[0, 0] = 1  # writeable in place
    assert mec.apply(lambda: a.flags.writeable, targets=0) == [True]


def test_non_contiguous_array_and_big_bytes(mec):
    a = np.arange(1000.0).reshape(100, 10)[:, ::3]
    big = bytes(range(256)) * 40_000
    mv = memoryview(bytearray(b"xyz" * 10_000))
    mec.push(dict(a=a, big=big, mv=bytearray(mv)), targets=2)
    pa, pbig, pmv = mec.pull(("a", "big", "mv"), targets=2)[0]
    assert np.array_equal(pa, a) and pbig == big and bytes(pmv) == bytes(mv)


def test_large_array_frames_are_out_of_band():
    from ipy_multiengine import serialize

    a = np.ones(1_000_000)
    frames = serialize.dumps({"a": a})
    assert len(frames) == 2 and len(frames[0]) < 1000
    assert np.shares_memory(np.frombuffer(frames[1], dtype=a.dtype), a)  # no copy made
    back = serialize.loads(frames)
    assert np.shares_memory(back["a"], a)


def test_plain_values_and_what_only_cloudpickle_can_send_both_round_trip(mec):
    """Plain values (builtin scalars, arrays of NumPy's dtypes without objects) are pickled by
    the standard pickler; what holds a class or function defined here (a subclass of a plain
    type, an object array, a dtype's metadata or a structured dtype's titles) must still go by
    value (cloudpickle), or the other side could not load it."""
    from ipy_multiengine import serialize

    class Tagged(int):
        tag = "mine"

    class Unit:
        pass

    a = np.arange(10_000.0)
    frames = serialize.dumps(a)
    assert len(frames) == 2 and np.shares_memory(np.frombuffer(frames[1]), a)  # still zero copy
    assert np.shares_memory(serialize.loads(frames), a)
    meta = np.arange(8.0, dtype=np.dtype("f8", metadata={"unit": Unit()}))
    titled = np.zeros(2, dtype=np.dtype({"names": ["x"], "formats": ["f8"], "titles": [Unit()]}))
    for value in (meta, titled):
        back = serialize.loads(serialize.dumps(value))
        assert back.dtype.names == value.dtype.names and back.tobytes() == value.tobytes()
    assert type(serialize.loads(serialize.dumps(meta)).dtype.metadata["unit"]).__name__ == "Unit"
    mec.push({"meta": meta}, targets=0)
    assert type(mec.pull("meta", targets=0)[0].dtype.metadata["unit"]).__name__ == "Unit"
    # returned alone, each reply is the whole pickled value: the plain check decides its pickler
    assert mec.apply(lambda: Tagged(3), targets=0)[0].tag == "mine"
    assert mec.apply(lambda: np.array([lambda v: v + 1], dtype=object), targets=0)[0][0](1) == 2
    assert mec.apply(lambda x: x, Tagged(5), targets=1)[0].tag == "mine"
    assert mec.apply(lambda: 2.5, targets=2) == [2.5]
    assert mec.apply(lambda: "é", targets=2) == ["é"]


def test_scatter_numpy_views_and_types(mec):
    a = np.arange(20).reshape(10, 2)
    mec.scatter("p", a)
    parts = mec.pull("p")
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    g = mec.gather("p")
    assert isinstance(g, np.ndarray) and np.array_equal(g, a)
    mec.scatter("s", "abcdefg")
    assert mec.pull("s") == ["ab", "cd", "ef", "g"]
    assert mec.gather("s") == "abcdefg"
    mec.scatter("t", (1, 2))
    assert mec.pull("t") == [[1], [2], [], []]
    assert mec.gather("t") == [1, 2]
    with pytest.raises(TypeError, match="dict"):
        mec.scatter("d", {"a": 1})
    with pytest.raises(ValueError, match="distribution"):
        mec.scatter("d", [1], dist="r")


def test_scatter_and_gather_pandas_by_rows(mec):
    # a DataFrame iterates over its column labels: split or joined as a sequence, scatter sent
    # each engine some labels and gather returned the labels of each engine's frame
    import pandas as pd

    df = pd.DataFrame({"a": range(10), "b": [x * 0.5 for x in range(10)], "c": list("abcdefghij")})
    mec.scatter("df", df)
    parts = mec.pull("df")
    assert all(isinstance(p, pd.DataFrame) for p in parts)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert [list(p.index) for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    pd.testing.assert_frame_equal(mec.gather("df"), df)
    s = pd.Series([1.5, 2.5, 3.5], index=["x", "y", "z"], name="v")
    mec.scatter("s", s, targets=[1, 2])
    pd.testing.assert_series_equal(mec.gather("s", targets=[1, 2]), s)
    # frames built on the engines are joined by rows too, in engine order
    mec.scatter("me", mec.get_ids(), flatten=True)
    mec.execute("import pandas as pd; made = pd.DataFrame({'eid': [me] * 2})")
    pd.testing.assert_frame_equal(
        mec.gather("made").reset_index(drop=True),
        pd.DataFrame({"eid": [0, 0, 1, 1, 2, 2, 3, 3]}),
    )
    # flatten: a one-row part is that row, not the column named 0
    mec.scatter("row", df.iloc[:4], flatten=True)
    rows = mec.pull("row")
    assert all(isinstance(r, pd.Series) for r in rows)
    assert [r["a"] for r in rows] == [0, 1, 2, 3]


def test_scatter_and_gather_a_dataframe_subclass_by_rows(mec):
    """A DataFrame subclass (geopandas' GeoDataFrame, a user's own) is a pandas frame too: the
    module check (``pandas.*``) missed it, so scatter split it as a sequence (each engine got
    some of its column labels) and gather joined its parts into a list of labels."""
    import pandas as pd

    class Frame(pd.DataFrame):
        @property
        def _constructor(self):
            return Frame

    class Column(pd.Series):
        @property
        def _constructor(self):
            return Column

    df = Frame({"a": range(6), "b": list("uvwxyz")})
    mec.scatter("df", df)
    parts = mec.pull("df")
    assert [type(p).__name__ for p in parts] == ["Frame"] * 4, parts
    assert [len(p) for p in parts] == [2, 2, 1, 1]
    back = mec.gather("df")
    assert type(back).__name__ == "Frame"
    pd.testing.assert_frame_equal(pd.DataFrame(back), pd.DataFrame(df))
    s = Column([1, 2, 3, 4, 5], name="v")
    mec.scatter("s", s)
    assert [list(p) for p in mec.pull("s")] == [[1, 2], [3], [4], [5]]
    pd.testing.assert_series_equal(pd.Series(mec.gather("s")), pd.Series(s))


def test_gather_of_frames_mixed_with_other_parts_says_so(mec):
    """A pandas frame among parts of other kinds was joined as a sequence: its column labels
    came back as if they were its rows (a silently wrong result)."""
    import pandas as pd

    mec.execute(
        "import pandas as pd; part = pd.DataFrame({'a': [1, 2], 'b': [3, 4]})", targets=[0, 1]
    )
    mec.execute("part = [5, 6]", targets=[2, 3])
    with pytest.raises(TypeError, match="DataFrame") as info:
        mec.gather("part")
    assert "engines [2, 3]" in str(info.value), info.value
    pd.testing.assert_frame_equal(
        mec.gather("part", targets=[0, 1]),
        pd.DataFrame({"a": [1, 2, 1, 2], "b": [3, 4, 3, 4]}, index=[0, 1, 0, 1]),
    )
    assert mec.gather("part", targets=[2, 3]) == [5, 6, 5, 6]


def test_scatter_and_gather_polars_by_rows(mec):
    """A polars DataFrame iterates over its columns: scatter sent engines 0 and 1 one column
    Series each and engines 2 and 3 nothing, and gather returned a list of columns; a polars
    Series came back as a list. Both are split by rows now and joined with ``polars.concat``."""
    pl = pytest.importorskip("polars")
    from polars.testing import assert_frame_equal, assert_series_equal

    df = pl.DataFrame({"a": [1, 2, 3, 4, 5], "b": list("vwxyz"), "c": [1.5, None, 2.5, 3.5, None]})
    mec.scatter("df", df)
    parts = mec.pull("df")
    assert [type(p).__name__ for p in parts] == ["DataFrame"] * 4
    assert [p.height for p in parts] == [2, 1, 1, 1]
    assert_frame_equal(mec.gather("df"), df)
    mec.scatter("df", df, targets=[3, 1])  # target order, not id order
    assert [p["a"].to_list() for p in mec.pull("df", targets=[3, 1])] == [[1, 2, 3], [4, 5]]
    assert_frame_equal(mec.gather("df", targets=[3, 1]), df)
    mec.scatter("df", df.head(2))  # fewer rows than engines: empty frames of the same schema
    assert [p.height for p in mec.pull("df")] == [1, 1, 0, 0]
    assert_frame_equal(mec.gather("df"), df.head(2))
    s = pl.Series("s", [1, 2, None, 4, 5], dtype=pl.Int32)
    mec.scatter("s", s)
    assert [type(p).__name__ for p in mec.pull("s")] == ["Series"] * 4
    assert_series_equal(mec.gather("s"), s)
    mec.scatter("row", df.head(4), flatten=True)  # a one-row part is that row, by column name
    assert mec.pull("row", targets=1) == [{"a": 2, "b": "w", "c": None}]


def _by_rows_round_trip(mec, name: str, value):
    """Scatter ``value`` (5 rows) to the 4 engines: each holds rows of ``value``'s own type
    (2, 1, 1, 1 of them); gathered back, of that type again (returned for the caller's checks)."""
    mec.scatter(name, value)
    parts = mec.pull(name)
    assert [type(p) for p in parts] == [type(value)] * 4, parts
    assert [len(p) for p in parts] == [2, 1, 1, 1]
    back = mec.gather(name)
    assert type(back) is type(value), back
    return back


def test_scatter_and_gather_pyarrow_tables_and_arrays_by_rows(mec):
    """A pyarrow Array iterated into a list of pyarrow scalars (a Table was refused, having no
    ``__iter__``): Tables, RecordBatches, Arrays and ChunkedArrays are sliced by rows now and
    concatenated back into their own type."""
    pa = pytest.importorskip("pyarrow")
    values = [
        pa.table({"a": [1, 2, 3, 4, 5], "b": ["x", None, "z", "w", "q"]}),
        pa.record_batch({"a": [1, 2, 3, 4, 5]}),
        pa.array([1, None, 3, 4, 5]),
        pa.chunked_array([[1, 2], [3, 4, 5]]),
    ]
    for value in values:
        back = _by_rows_round_trip(mec, "t", value)
        assert back.equals(value), back
    mec.scatter("row", values[0].slice(0, 4), flatten=True)
    assert mec.pull("row", targets=1) == [{"a": 2, "b": None}]


def test_scatter_and_gather_bytes_and_bytearrays_keep_their_type(mec):
    """bytes and bytearrays were split into lists of ints and gathered as one list of ints."""
    mec.scatter("b", b"abcdefg")
    assert mec.pull("b") == [b"ab", b"cd", b"ef", b"g"]
    assert mec.gather("b") == b"abcdefg"
    mec.scatter("b", bytearray(b"abc"))
    assert mec.pull("b") == [bytearray(b"a"), bytearray(b"b"), bytearray(b"c"), bytearray()]
    back = mec.gather("b")
    assert type(back) is bytearray and back == b"abc"
    mec.scatter("b", b"wxyz", flatten=True)  # one byte: bytes of length one, not an int
    assert mec.pull("b") == [b"w", b"x", b"y", b"z"]
    assert mec.gather("b") == b"wxyz"
    with pytest.raises(TypeError, match=r"memoryview: pass bytes\(view\)"):
        mec.scatter("b", memoryview(b"abcd"))


def test_scatter_and_gather_masked_and_record_arrays_keep_their_type(mec):
    """A masked array was split as a sequence (lists of scalars and ``masked``, gathered as a
    list: the values under the mask lost) and a record array into lists of records; gather of
    masked parts dropped their masks (``numpy.concatenate``)."""
    m = np.ma.array([1.0, 2, 3, 4, 5], mask=[0, 1, 0, 0, 1], fill_value=-9)
    mec.scatter("m", m)
    assert [type(p).__name__ for p in mec.pull("m")] == ["MaskedArray"] * 4
    back = mec.gather("m")
    assert isinstance(back, np.ma.MaskedArray)
    assert np.array_equal(back.data, m.data) and np.array_equal(back.mask, m.mask)
    assert back.fill_value == -9
    m2 = np.ma.array(np.arange(10).reshape(5, 2), mask=np.arange(10).reshape(5, 2) % 3 == 0)
    mec.scatter("m", m2)
    back = mec.gather("m")
    assert back.shape == (5, 2) and np.array_equal(back.mask, m2.mask)
    r = np.rec.fromarrays([np.arange(5), np.arange(5.0)], names="a,b")
    mec.scatter("r", r)
    back = mec.gather("r")
    assert type(back) is np.recarray and back.dtype == r.dtype and np.array_equal(back, r)
    assert list(back.b) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_scatter_refuses_containers_of_no_known_kind_before_sending(mec):
    """An xarray Dataset iterates over its variable names, a DataArray over its first axis:
    each was scattered as a list of those. A container of no known kind is refused now,
    naming its type, and nothing is sent."""
    xr = pytest.importorskip("xarray")
    values = [
        np.float64(2.5),
        xr.Dataset({"u": ("t", np.arange(5))}),
        xr.DataArray(np.arange(6).reshape(3, 2), dims=("t", "y")),
    ]
    for value in values:
        with pytest.raises(
            TypeError, match=f"cannot scatter an object of type {type(value).__name__}"
        ):
            mec.scatter("unsent", value)
    assert mec.apply(lambda: "unsent" in globals()) == [False] * 4


def test_gather_refuses_parts_of_different_kinds_naming_engines(mec):
    """Parts of different kinds were joined as sequences: a string's characters, an array's
    scalars among a list's items, a one-row Series (``scatter(flatten=True)`` of a frame) as
    a column of NaNs beside the DataFrame; frames of different columns were aligned into NaN
    columns. Each is refused now, naming the engines, and arrays that cannot be joined name
    each engine's shape."""
    import pandas as pd

    mec.execute("import numpy as np, pandas as pd")
    cases = [
        (
            ["y = np.arange(2)", "y = [3, 4]"],
            r"engines \[0\] hold a NumPy array, engines \[1\] a list",
        ),
        (["y = 'ab'", "y = ['c']"], r"engines \[0\] hold a str, engines \[1\] a list"),
        (
            ["y = b'a'", "y = bytearray(b'b')"],
            r"engines \[0\] hold a bytes, engines \[1\] a bytearray",
        ),
        (
            ["y = pd.DataFrame({'a': [1]})", "y = pd.DataFrame({'b': [1]})"],
            r"engines hold DataFrames with different columns \(0: \['a'\]; 1: \['b'\]\)",
        ),
        (["y = np.array(1)", "y = np.array(2)"], r"engines \[0\] hold a 0-d array"),
        (
            ["y = np.zeros((2, 2))", "y = np.zeros((2, 3))"],
            r"cannot be joined along their first axis \(0: \(2, 2\) float64, 1: \(2, 3\) float64\)",
        ),
        (
            ["y = pd.Index([1])", "y = [2]"],
            r"engines \[0\] hold a pandas Index, engines \[1\] a list",
        ),
        (
            [
                "import xarray; y = xarray.DataArray([1])",
                "import xarray; y = xarray.DataArray([2])",
            ],
            r"engines \[0, 1\] hold an object of type DataArray",
        ),
    ]
    for codes, message in cases:
        for eid, code in enumerate(codes):
            mec.execute(code, targets=eid)
        with pytest.raises(TypeError, match=message):
            mec.gather("y", targets=[0, 1])
    df = pd.DataFrame({"a": range(5)})
    with pytest.warns(UserWarning, match="cannot tell such parts apart"):
        mec.scatter("df", df, flatten=True)  # engine 0: a 2-row frame, the others a row
    with pytest.raises(
        TypeError,
        match=r"engines \[0\] hold a pandas DataFrame, engines \[1, 2, 3\] a pandas Series",
    ):
        mec.gather("df")
    with pytest.warns(UserWarning, match="cannot tell such parts apart"):
        mec.scatter("w", ["ab", "cd", "ef", "gh", "ij"], flatten=True)  # ['ab', 'cd'], 'ef'...
    with pytest.raises(TypeError, match=r"engines \[0\] hold a list, engines \[1, 2, 3\] a str"):
        mec.gather("w")


def test_gather_refuses_integer_parts_that_would_join_as_floats(mec):
    """int64 beside uint64 concatenates to float64 (numpy's promotion): 2**62 + 1 came back
    rounded. Refused naming each engine's dtype; integer parts that share an integer type
    (int32 beside int64) still join exactly."""
    mec.execute("import numpy as np")
    mec.execute("y = np.array([2**62 + 1], dtype=np.int64)", targets=0)
    mec.execute("y = np.array([2**63 + 1], dtype=np.uint64)", targets=1)
    with pytest.raises(TypeError, match=r"no common integer type \(0: int64, 1: uint64\)"):
        mec.gather("y", targets=[0, 1])
    mec.execute("y = np.array([2**31 - 1], dtype=np.int32)", targets=1)
    out = mec.gather("y", targets=[0, 1])
    assert out.dtype == np.int64 and out.tolist() == [2**62 + 1, 2**31 - 1]


def test_gather_refuses_pandas_integers_that_would_join_as_floats(mec):
    """pandas.concat and Index.append make float64 of int64 beside uint64 (and Float64 of the
    nullable Int64 beside UInt64), as numpy does: 2**62 + 1 came back rounded from Series, a
    DataFrame's column and an Index. Refused naming the column and each engine's dtype;
    integers beside floats or booleans still join as pandas joins them."""
    mec.execute("import numpy as np, pandas as pd")
    cases = [
        ("pd.Series([2**62 + 1])", "pd.Series([1], dtype='uint64')", ""),
        (
            "pd.DataFrame({'a': [1], 'b': [2**62 + 1]})",
            "pd.DataFrame({'a': [1], 'b': np.array([1], dtype=np.uint64)})",
            " in column 'b'",
        ),
        ("pd.Index([2**62 + 1])", "pd.Index(np.array([1], dtype=np.uint64))", ""),
        ("pd.array([2**62 + 1], dtype='Int64')", "pd.array([1], dtype='UInt64')", None),
    ]
    for first, second, label in cases:
        mec.execute(f"y = {first}", targets=2)
        mec.execute(f"y = {second}", targets=0)
        if label is None:  # pandas arrays of different dtypes were refused already
            match = r"hold a pandas array each, of different types \(2: Int64; 0: UInt64\)"
        else:
            match = rf"no common integer type{label} \(2: int64, 0: uint64\)"
        with pytest.raises(TypeError, match=match):
            mec.gather("y", targets=[2, 0])
    mec.execute("y = pd.Series([1, 2])", targets=2)
    mec.execute("y = pd.Series([2.5])", targets=0)
    assert mec.gather("y", targets=[2, 0]).tolist() == [1.0, 2.0, 2.5]
    mec.execute("y = pd.Series([True])", targets=0)
    assert mec.gather("y", targets=[2, 0]).tolist() == [1, 2, True]


def test_gather_refuses_row_labels_that_would_join_as_floats(mec):
    """The row index of Series and DataFrames is joined too: int64 labels beside uint64 ones
    came back as a float64 index, the label 2**62 + 1 rounded, without a word. Refused naming
    the row index and each engine's dtype; a MultiIndex of such levels keeps its values."""
    mec.execute("import numpy as np, pandas as pd")
    mec.execute("ix = pd.Index(np.array([3], dtype=np.uint64))", targets=1)
    mec.execute("ix = pd.Index([2**62 + 1])", targets=0)
    for make in ("pd.Series([1], index=ix)", "pd.DataFrame({'v': [1]}, index=ix)"):
        mec.execute(f"y = {make}", targets=[0, 1])
        match = r"no common integer type in the row index \(0: int64, 1: uint64\)"
        with pytest.raises(TypeError, match=match):
            mec.gather("y", targets=[0, 1])
    mec.execute("y = pd.Series([1], index=pd.MultiIndex.from_arrays([ix, ['a']]))", targets=[0, 1])
    assert mec.gather("y", targets=[0, 1]).index[0] == (2**62 + 1, "a")


def test_scatter_and_gather_pandas_index_by_rows(mec):
    """A pandas Index was refused as of no known kind (iterated, it gives its labels): an
    Index and a MultiIndex are split by rows into their own type and appended back."""
    import pandas as pd

    values = [
        pd.Index([10, 20, 30, 40, 50], name="t"),
        pd.date_range("2026-01-01", periods=5, tz="UTC"),
        pd.MultiIndex.from_arrays([[1, 1, 2, 2, 3], list("abcde")], names=["i", "s"]),
    ]
    for value in values:
        back = _by_rows_round_trip(mec, "ix", value)
        assert back.equals(value) and back.dtype == value.dtype, back
        assert list(back.names) == list(value.names)


def test_gather_refuses_indexes_of_different_levels(mec):
    """``MultiIndex.append`` (and ``pandas.concat`` for the rows' index) keeps the levels of the
    first part: a 3-level MultiIndex gathered after a 2-level one lost its third level, and
    beside a flat Index it became an Index of tuples and scalars. Refused, naming each
    engine's number of levels, for an Index and for the row index of a Series or DataFrame."""
    mec.execute("import pandas as pd")
    two = "pd.MultiIndex.from_tuples([(1, 'a')])"
    three = "pd.MultiIndex.from_tuples([(2, 'b', 3)])"
    cases = [
        (two, three),
        (two, "pd.Index([5])"),
        (f"pd.Series([1], index={two})", f"pd.Series([2], index={three})"),
        (f"pd.DataFrame({{'v': [1]}}, index={two})", f"pd.DataFrame({{'v': [2]}}, index={three})"),
    ]
    for first, second in cases:
        mec.execute(f"y = {first}", targets=0)
        mec.execute(f"y = {second}", targets=1)
        with pytest.raises(TypeError, match=r"different numbers of index levels \(0: 2, 1: [13]\)"):
            mec.gather("y", targets=[0, 1])
    mec.execute(f"y = {three}", targets=[0, 1])
    assert mec.gather("y", targets=[0, 1]).nlevels == 3


def test_gather_ignores_the_dtype_of_an_empty_pandas_part(mec):
    """An engine with no rows often holds an empty float Series or DataFrame (``pd.Series([],
    dtype=float)``, a filter that kept nothing): beside int64 parts pandas made the whole gather
    float64, 2**62 + 1 rounded. An empty part adds no rows, so its dtypes do not decide the
    result (as for NumPy arrays)."""
    mec.execute("import pandas as pd")
    mec.execute("y = pd.Series([2**62 + 1])", targets=[0, 1])
    mec.execute("y = pd.Series([], dtype=float)", targets=2)
    out = mec.gather("y", targets=[0, 1, 2])
    assert out.dtype == "int64" and out.tolist() == [2**62 + 1] * 2
    mec.execute("y = pd.DataFrame({'a': [2**62 + 1]})", targets=[0, 1])
    mec.execute("y = pd.DataFrame({'a': pd.Series([], dtype=float)})", targets=2)
    frame = mec.gather("y", targets=[0, 1, 2])
    assert str(frame["a"].dtype) == "int64" and frame["a"].tolist() == [2**62 + 1] * 2
    mec.execute("y = pd.Series([], dtype=float)", targets=[0, 1, 2])  # all empty: as pandas
    assert len(mec.gather("y", targets=[0, 1, 2])) == 0


def test_gather_ignores_the_dtype_of_an_engine_with_no_items(mec):
    """An engine that got no items often holds ``np.array([])`` (float64): beside integer
    parts numpy's promotion made the whole gather float64, 2**62 + 1 rounded, and beside 2-D
    parts the concatenation failed (a 1-D part). An empty part adds no values: its dtype and
    shape do not decide the result."""
    mec.execute("import numpy as np")
    mec.execute("y = np.array([2**62 + 1], dtype=np.int64)", targets=[0, 1, 2])
    mec.execute("y = np.array([])", targets=3)
    out = mec.gather("y")
    assert out.dtype == np.int64 and out.tolist() == [2**62 + 1] * 3
    mec.execute("y = np.array([], dtype=np.uint64)", targets=3)  # no value to round
    assert mec.gather("y").dtype == np.int64
    mec.execute("y = np.ones((2, 3))", targets=[0, 1, 2])
    mec.execute("y = np.array([])", targets=3)
    assert mec.gather("y").shape == (6, 3)
    mec.execute("y = np.array([])", targets="all")  # all empty: joined as they are
    assert mec.gather("y").shape == (0,)


_seq = st.one_of(
    st.lists(st.integers(), max_size=40),
    st.lists(st.integers(), max_size=40).map(tuple),
    st.integers(0, 40).map(range),
    hnp.arrays(np.int64, st.integers(0, 40)),
    hnp.arrays(
        np.float64, st.tuples(st.integers(0, 12), st.integers(1, 3)), elements=st.floats(-1e6, 1e6)
    ),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.binary(max_size=40).map(bytearray),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seq=_seq, targets=st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True))
def test_gather_of_scatter_is_identity(mec, seq, targets):
    mec.scatter("hx", seq, targets=targets)
    got = mec.gather("hx", targets=targets)
    if isinstance(seq, np.ndarray):
        assert isinstance(got, np.ndarray) and got.shape == seq.shape and np.array_equal(got, seq)
    elif isinstance(seq, (str, bytes, bytearray)):
        assert type(got) is type(seq) and got == seq
    else:
        assert got == list(seq)
    sizes = [len(p) for p in mec.pull("hx", targets=targets)]
    assert max(sizes) - min(sizes) <= 1


def test_unpicklable_push_is_all_or_nothing(mec):
    import threading

    mec.push(dict(ok=1))
    with pytest.raises(TypeError) as info:
        mec.push(dict(ok=2, bad=threading.Lock()))
    assert "'bad'" in str(info.value) and "lock" in str(info.value)
    assert mec.pull("ok") == [1] * 4  # nothing was sent
    with pytest.raises(TypeError, match="'bad'"):
        mec.scatter("bad", [threading.Lock()] * 4)
    with pytest.raises(ValueError, match="identifier"):
        mec.push({"not a name": 1})


def test_pull_undefined_name(mec):
    with pytest.raises(CompositeError) as info:
        mec.pull("nope_never_defined")
    assert [type(e.original()) for e in info.value.elist] == [NameError] * 4
    assert "[0:pull]: NameError: name 'nope_never_defined' is not defined" in str(info.value)
    assert mec.pull("__name__", targets=0) == ["__main__"]  # still usable


def test_unpicklable_result_gives_clear_error(mec):
    with pytest.raises(CompositeError, match="pickle"):
        mec.apply(lambda: __import__("threading").Lock(), targets=0)
    assert mec.apply(lambda: 1, targets=0) == [1]


def test_data_ops_keep_order_with_execute(mec):
    mec.block = False
    prs = [mec.execute("v = 1"), mec.push(dict(v=2)), mec.execute("v = v * 10"), mec.pull("v")]
    assert prs[-1].r == [20] * 4


def test_progress_bar_after_threshold(mec, monkeypatch, capsys):
    # Interactivity is faked (pytest has no terminal); the bar itself is real tqdm output.
    from ipy_multiengine import render

    monkeypatch.setattr(render, "interactive", lambda: True)
    monkeypatch.setattr(mec, "progress_after", 0.2)
    assert mec.map(lambda x: __import__("time").sleep(0.3 * x) or x, range(4)) == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "map" in err and "engine" in err
    monkeypatch.setattr(mec, "progress_after", None)
    mec.map(lambda x: __import__("time").sleep(0.3) or x, range(4))
    assert "map" not in capsys.readouterr().err


def test_progress_off_when_not_interactive(mec, capsys):
    assert mec.progress_after == 2.0
    from ipy_multiengine import render

    assert render.interactive() is False  # pytest captures stderr: not a terminal


def test_push_to_four_engines_does_not_copy_per_engine(tmp_path):
    """Peak RSS of a fresh client process grows by far less than 4 x 100 MB when pushing 100 MB to
    4."""
    import subprocess
    import sys

    code = (
        "import resource, numpy as np\n"
        "from ipy_multiengine import Cluster\n"
        "with Cluster(n=4, profile='rss') as mec:\n"
        "    a = np.ones(100_000_000 // 8)\n"
        "    mec.execute('pass')\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    mec.push({'a': a})\n"
        "    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    assert mec.apply(lambda: float(a.sum())) == [12_500_000.0] * 4\n"
        "print((after - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    grew_mb = int(out.stdout.strip())
    assert grew_mb < 100, f"client peak RSS grew by {grew_mb} MB while pushing 100 MB to 4 engines"


def test_functions_see_the_engine_namespace(mec):
    """A function typed at the prompt runs against the engine's names, like code sent by execute."""
    mec.execute("import math; scale = 3")
    offset = 100  # a client global the engines do not have: sent along, as push would

    def f(x):
        return math.floor(x * scale) + offset  # noqa: F821 names of the engines' namespace

    assert mec.map(f, [0.5, 1.0]) == [101, 103]
    assert mec.apply(lambda: scale * 2, targets=1) == [6]  # noqa: F821 an engine's name
    mec.push({"scale": 10}, targets=0)
    assert mec.apply(f, 1.0, targets=[0, 1]) == [110, 103]


# -- issue 11 item 1: functions sent by value see the caller's current globals
def _as_typed_at_the_prompt(mec, code: str) -> dict:
    """Run ``code`` the way a user types it: functions defined there belong to ``__main__``, so
    cloudpickle sends them by value with the globals they reference."""
    ns = {"__name__": "__main__", "mec": mec}
    exec(code, ns)
    return ns


def test_h01_stale_caller_globals_every_call_sees_current_values(mec):
    ns = _as_typed_at_the_prompt(
        mec,
        (
            "offset = 1\n"
            "f = lambda x: x + offset\n"
            "first = mec.map(f, [0, 0])\n"
            "offset = 50\n"
            "second = mec.map(f, [0, 0])\n"
            "third = mec.apply(f, 0, targets=0)\n"
            "def helper():\n    return 'v1'\n"
            "g = lambda: helper()\n"
            "r1 = mec.apply(g)\n"
            "def helper():\n    return 'v2'\n"
            "r2 = mec.apply(g)\n"
        ),
    )
    assert ns["first"] == [1, 1]
    assert ns["second"] == [50, 50] == list(map(ns["f"], [0, 0]))
    assert ns["third"] == [50]
    assert ns["r1"] == ["v1"] * 4
    assert ns["r2"] == ["v2"] * 4


def test_h01_stale_caller_globals_engine_only_names_resolve(mec):
    mec.execute("import math; scale = 3")
    ns = _as_typed_at_the_prompt(
        mec,
        (
            "def helper():\n    return math.floor(scale * 2.5)\n"  # math, scale: engine-only names
            "g = lambda: helper() + 1\n"
            "r = mec.apply(g)\n"
            "mec.push_function({'h': helper})\n"
        ),
    )
    assert ns["r"] == [8] * 4
    mec.execute("from_h = h()")
    assert mec.pull("from_h") == [7] * 4
    mec.push({"scale": 10}, targets=0)  # an engine name changed later is seen at once
    assert mec.apply(ns["g"], targets=[0, 1]) == [26, 8]


def test_h01_stale_caller_globals_precedence_and_nothing_left_behind(mec):
    mec.push({"offset": 7})
    ns = _as_typed_at_the_prompt(
        mec,
        (
            "offset = 50\n"
            "only_here = 'client'\n"
            "f = lambda: (offset, only_here)\n"
            "r = mec.apply(f)\n"
            "def bump():\n    global counter\n    counter = offset + 1\n    return counter\n"
            "b = mec.apply(bump, targets=0)\n"
        ),
    )
    assert ns["r"] == [(50, "client")] * 4  # the caller's value wins over the engine's
    mec.execute("left = ('only_here' in globals(), offset, globals().get('counter'))")
    # the caller's globals were not copied into the engine namespace (offset is still the
    # engine's own 7); a global the function assigned is written there (the documented rule)
    assert mec.pull("left") == [
        (False, 7, 51),
        (False, 7, None),
        (False, 7, None),
        (False, 7, None),
    ]
    assert ns["b"] == [51]


# -- issue 11 item 2: what engines receive, and what a pull returns, is the value at the call
def _engine_min(mec, name: str, targets="all") -> list[tuple[float, float]]:
    mec.execute(f"_m = float({name}.min()), float({name}.max())", targets=targets)
    return mec.pull("_m", targets=targets)


def test_h02_zero_copy_mutation_nonblocking_push_and_scatter(mec):
    a = np.arange(1_000_000, dtype=float)
    pr = mec.push({"a": a}, block=False)
    a[:] = -1.0  # at once, as a user would: the engines must still get 0..n-1
    pr.r  # noqa: B018 .r waits for the push to finish
    assert _engine_min(mec, "a") == [(0.0, 999_999.0)] * 4
    s = np.ones(4 * 500_000)
    pr = mec.scatter("s", s, block=False)
    s[:] = -1.0
    pr.r  # noqa: B018 .r waits for the push to finish
    assert _engine_min(mec, "s") == [(1.0, 1.0)] * 4


def test_h02_zero_copy_mutation_nonblocking_apply_and_map_arguments(mec):
    x = np.ones(1_000_000)
    pr = mec.apply(lambda v: (float(v.min()), float(v.max())), x, block=False)
    x[:] = -1.0
    assert pr.r == [(1.0, 1.0)] * 4
    parts = [np.full(300_000, float(i)) for i in range(8)]
    pr = mec.map(lambda v: float(v.sum()), parts, block=False)
    for p in parts:
        p[:] = -1.0
    assert pr.r == [300_000.0 * i for i in range(8)]
    parts = [np.full(300_000, float(i)) for i in range(8)]
    pr = mec.map(lambda v: float(v.sum()), parts, block=False, balanced=True)
    for p in parts:  # later chunks leave from the I/O thread after the call returned
        p[:] = -1.0
    assert pr.r == [300_000.0 * i for i in range(8)]


def test_h02_zero_copy_mutation_pull_reply_not_torn_by_next_request(mec):
    """The engine sends a pull's reply zero copy from its IOPub thread; the next queued
    request must not change the array while that reply is still being read."""
    mec.execute("import numpy as np; b = np.zeros(12_500_000)", targets=0)  # 100 MB
    for _ in range(2):
        mec.execute("b[:] = 0", targets=0)
        pr = mec.pull("b", targets=0, block=False)
        # a returned global: the same hazard
        pa = mec.apply(lambda: b, targets=0, block=False)  # noqa: F821 an engine's name
        mec.execute("b[:] = 1", targets=0, block=False)
        got, returned = pr.r[0], pa.r[0]
        assert got.max() == 0.0 and got.min() == 0.0
        assert returned.max() == 0.0
        del got, returned, pr, pa


def test_h02_expert_opt_out_returns_before_send(mec):
    a = np.arange(4_000_000, dtype=float)
    mec.return_before_send = True
    try:
        pr = mec.push({"a": a}, block=False, targets=0)
        assert pr.wait_for_send(timeout=30)  # the documented way to know a can change again
        assert pr.sent
        a[:] = -1.0
        pr.r  # noqa: B018 .r waits for the push to finish
    finally:
        mec.return_before_send = False
    assert _engine_min(mec, "a", targets=0) == [(0.0, 3_999_999.0)]


def test_h02_zero_copy_mutation_after_a_blocking_push_timed_out(mec):
    """A blocking push that times out (the engine is busy) has still sent the caller's array
    before raising: changing it afterwards does not change what the engine applies later."""
    import warnings

    from ipy_multiengine.errors import TimeoutError as MeTimeout

    a = np.arange(12_500_000, dtype=float)  # 100 MB
    busy = mec.execute("import time; time.sleep(2)", targets=0, block=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "still receiving" warning: the data had left
        with pytest.raises(MeTimeout):
            mec.push({"a": a}, targets=0, timeout=0.5)
    a[:] = -1.0
    assert mec.last.method == "push"  # kept, to collect later
    mec.last.get_result(timeout=30)
    busy.get_result(timeout=30)
    assert _engine_min(mec, "a", targets=0) == [(0.0, 12_499_999.0)]


def test_pushed_function_assigning_a_global_writes_the_engine_namespace(mec):
    """docs/engines.md: a name a function sent by value assigns with ``global`` is written to
    the engine's namespace; for a pushed function too, which engine code calls later
    (``push_function`` then ``%px setup()``, the classic pattern)."""
    ns = _as_typed_at_the_prompt(
        mec,
        (
            "def setup(n):\n    global data, calls\n    data = list(range(n))\n"
            "    try:\n        calls += 1\n    except NameError:\n        calls = 1\n    return "
            "len(data)\n"
            "def bump():\n    global level\n    level = level + 1\n"
            "def via_helper():\n    bump()\n    return level\n"
            "mec.push_function({'setup': setup, 'via_helper': via_helper})\n"
        ),
    )
    mec.execute("n = setup(3); seen_in_cell = data")  # visible at once, in the same cell
    assert mec.pull(["n", "seen_in_cell"], targets=0) == [[3, [0, 1, 2]]]
    mec.execute("setup(5)")
    assert mec.pull(["data", "calls"], targets=0) == [[[0, 1, 2, 3, 4], 2]]
    mec.execute("level = 10")
    assert (
        mec.execute("print(via_helper(), via_helper(), level)", targets=0)[0]["stdout"]
        == "11 12 12\n"
    )
    mec.execute("level = 100")  # the engine's value is what the function reads next
    mec.execute("r = via_helper()", targets=0)
    assert mec.pull("r", targets=0) == [101]
    back = mec.pull_function("setup", targets=0)[0]
    from ipy_multiengine import serialize

    assert b"seen_in_cell" not in serialize.dumps(back)[0]  # not the engine namespace
    assert back(2) == 2
    del ns


def test_partials_and_bound_methods_sent_by_value_see_the_engine_namespace(mec):
    """The precedence rule holds for a function behind ``functools.partial`` or a bound method
    of a class typed at the prompt, not only for a bare function."""
    mec.execute("import math as engine_math; engine_scale = 3")
    ns = _as_typed_at_the_prompt(
        mec,
        (
            "import functools\n"
            "offset = 100\n"
            "def f(x, k=1):\n    return engine_math.floor(x * engine_scale * k) + offset\n"
            "class Model:\n    def __init__(self, k):\n        self.k = k\n"
            "    def predict(self, x):\n        return engine_math.floor(x * engine_scale * "
            "self.k)\n"
            "r_partial = mec.map(functools.partial(f, k=2), [1.0, 2.0])\n"
            "r_method = mec.map(Model(10).predict, [1.0, 2.0])\n"
            "r_apply = mec.apply(Model(1).predict, 2.0, targets=0)\n"
        ),
    )
    assert ns["r_partial"] == [106, 112]
    assert ns["r_method"] == [30, 60]
    assert ns["r_apply"] == [6]


def test_scatter_of_pyarrow_data_sends_each_engine_its_rows_only(mec):
    """A pyarrow slice pickles its parent's whole buffers: each engine received, and kept in
    memory, the whole table for its few rows (4 engines: 4 times the data sent)."""
    pa = pytest.importorskip("pyarrow")
    n = 200_000
    column = pa.array(np.arange(n))
    for value in (column, pa.table({"a": column}), pa.chunked_array([column])):
        mec.scatter("t", value)
        held = mec.apply(lambda: t.get_total_buffer_size())  # noqa: F821 (an engine name)
        assert max(held) < 0.3 * value.get_total_buffer_size(), (type(value).__name__, held)
        assert mec.gather("t").equals(value)


def test_scatter_of_pyarrow_types_take_has_no_kernel_for(mec):
    """Run-end encoded and string_view columns failed to scatter with pyarrow's
    ``ArrowNotImplementedError: Function 'array_take' has no kernel``: each part was copied
    with ``take``. They scatter by rows now, each engine holding its rows only."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.compute as pc

    n = 40_000
    ree = pc.run_end_encode(pa.array(np.arange(n) // 4))
    view = pa.array([f"s{i}" for i in range(n)], type=pa.string_view())
    more = pc.run_end_encode(pa.array(np.arange(n, 2 * n) // 4))
    for value in (ree, view, pa.table({"r": ree, "v": view}), pa.chunked_array([ree, more])):
        mec.scatter("t", value)
        parts = mec.pull("t")
        assert [type(p) for p in parts] == [type(value)] * 4, parts
        assert [len(p) for p in parts] == [len(value) // 4] * 4
        held = mec.apply(lambda: t.get_total_buffer_size())  # noqa: F821 (an engine name)
        assert max(held) < 0.3 * value.get_total_buffer_size(), (type(value).__name__, held)
        assert mec.gather("t").equals(value)


def test_gather_of_masked_object_arrays_with_a_python_fill_value(mec):
    """A masked array of objects holds its fill value as a Python object: gather failed with
    "arrays that cannot be joined along their first axis" (an ``int`` has no ``tobytes``)."""
    m = np.ma.array(np.array(["a", 2, None, "d"], dtype=object), mask=[0, 1, 0, 0])
    m.fill_value = 5
    mec.scatter("m", m)
    back = mec.gather("m")
    assert isinstance(back, np.ma.MaskedArray) and back.dtype == object
    assert list(back.data) == list(m.data) and list(back.mask) == list(m.mask)
    assert back.fill_value == 5
    mec.execute("m.fill_value = 'x'", targets=[2])  # fill values that differ: the default
    assert mec.gather("m").fill_value == "?"


def test_scatter_and_gather_pandas_extension_arrays_keep_their_type(mec):
    """pandas' own arrays (Categorical, nullable integers, datetimes with a time zone) were
    scattered as lists of their items before, and then refused as of no known kind. They are
    split by rows into arrays of their type and joined back with their dtype."""
    import pandas as pd

    values = [
        pd.Categorical(["a", "b", "a", "c", "b"], categories=["c", "b", "a"], ordered=True),
        pd.array([1, None, 3, 4, 5], dtype="Int64"),
        pd.array(pd.date_range("2026-01-01", periods=5, tz="Europe/Paris")),
    ]
    for value in values:
        back = _by_rows_round_trip(mec, "e", value)
        assert back.dtype == value.dtype and back.equals(value), back


def test_gather_of_parts_of_different_column_types_names_each_engine(mec):
    """pyarrow refused Tables of different schemas naming "Schema at index 1" (a position in
    the list, not engine 1); Categoricals of different categories came back as strings. Each
    engine's types are named now (here engines 3 and 1, in that order)."""
    pa = pytest.importorskip("pyarrow")
    pl = pytest.importorskip("polars")
    import pandas as pd

    cases = [
        (pa.table({"a": [1, 2]}), "t = pa.table({'a': [1.5]})", "pyarrow Table", "a: double"),
        (pa.array([1, 2]), "t = pa.array(['x'])", "pyarrow Array", "string"),
        (pl.DataFrame({"a": [1, 2]}), "t = pl.DataFrame({'b': [1]})", "polars DataFrame", "b"),
        (pd.Categorical(["a", "b"]), "t = pd.Categorical(['z'])", "pandas array", "'z'"),
    ]
    mec.execute("import pandas as pd, polars as pl, pyarrow as pa")
    for value, other, kind, text in cases:
        mec.scatter("t", value, targets=[3, 1])
        mec.execute(other, targets=[1])
        with pytest.raises(TypeError, match=f"hold an? {kind} each, of different types") as e:
            mec.gather("t", targets=[3, 1])
        assert str(e.value).index("3: ") < str(e.value).index("1: ") and text in str(e.value)
        assert "index 1" not in str(e.value)
