"""The error tree (issue 13 item 8): every error the package raises derives from
``MultiEngineError``; context is a constructor argument and survives pickling."""

from __future__ import annotations

import builtins
import contextlib
import copyreg
import importlib
import inspect
import os
import pickle
import pkgutil
from collections.abc import Iterator

import pytest

import ipy_multiengine
from ipy_multiengine import errors
from ipy_multiengine.errors import (
    CompositeError,
    ConfigError,
    EngineError,
    EngineStartTimeout,
    LauncherError,
    MultiEngineError,
    NoClusterError,
    RemoteError,
    TargetsError,
    TimeoutError,
)

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def _pickling_by_own_reduce() -> Iterator[None]:
    """Each error pickles by its own ``__reduce__`` inside, whatever ran before in this process:
    tblib's pickling support (distributed installs it, e.g. in test_docs' dask examples)
    registers a reducer for every exception class defined by then, which pickles members,
    causes and contexts its own way. The C pickler holds copyreg's table itself: it is emptied
    of them in place, and restored whole (what a test installed goes, tblib's reducer for
    tracebacks too: the files run after this one in its process pickle as they would alone)."""
    table = copyreg.dispatch_table
    saved = dict(table)
    for k in [k for k in table if isinstance(k, type) and issubclass(k, BaseException)]:
        del table[k]
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


@pytest.fixture(autouse=True)
def _own_pickling() -> Iterator[None]:
    with _pickling_by_own_reduce():
        yield


def test_pickling_isolation_leaves_copyreg_as_it_found_it():
    """tblib's ``install`` registers a reducer for tracebacks besides the exceptions' ones: the
    isolation removed only exception classes, so after a test that installed it every later
    file in the process (xdist runs several in one) could pickle tracebacks."""
    from tblib import pickling_support

    before = dict(copyreg.dispatch_table)
    with _pickling_by_own_reduce():
        pickling_support.install(_raised(ValueError("x")))
    assert copyreg.dispatch_table == before


def _roundtrip(e: BaseException) -> BaseException:
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e)
    assert str(back) == str(e)
    assert back.args == e.args
    return back


def _package_exception_classes() -> list[type]:
    """Every exception class defined in the package (all modules, launchers included)."""
    found = []
    for info in pkgutil.walk_packages(ipy_multiengine.__path__, "ipy_multiengine."):
        if info.name.endswith("__main__"):  # `python -m ipy_multiengine` runs the CLI on import
            continue
        module = importlib.import_module(info.name)
        for _name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found.append(obj)
    return found


def test_every_package_error_derives_from_the_root():
    classes = _package_exception_classes()
    names = {c.__name__ for c in classes}
    assert {
        "LauncherError",
        "EngineStartTimeout",
        "TargetsError",
        "ConfigError",
        "UsageError",
    } <= names
    # private helpers (_NotStarted in the ssh launcher, _ItemError on the engine) never leave
    # their module: they are filtered out or turned into a RemoteError before anyone sees them
    public = [c for c in classes if not c.__name__.startswith("_")]
    outside = [
        f"{c.__module__}.{c.__name__}" for c in public if not issubclass(c, MultiEngineError)
    ]
    assert outside == []


def test_launcher_errors_are_in_the_tree():
    from ipy_multiengine.launchers import base

    assert base.LauncherError is LauncherError and base.EngineStartTimeout is EngineStartTimeout
    assert issubclass(LauncherError, EngineError) and issubclass(LauncherError, MultiEngineError)
    assert issubclass(EngineStartTimeout, TimeoutError) and issubclass(
        EngineStartTimeout, builtins.TimeoutError
    )


def test_timeout_error_is_also_the_builtin():
    e = _roundtrip(TimeoutError("call ran past its timeout"))
    assert isinstance(e, builtins.TimeoutError) and isinstance(e, MultiEngineError)


def test_no_cluster_error_and_the_root_pickle():
    _roundtrip(NoClusterError("no running cluster of profile 'x'"))
    _roundtrip(MultiEngineError("anything the package raises"))


def test_remote_error_context_survives_pickling():
    e = RemoteError(
        "ZeroDivisionError",
        "division by zero (on item 5)",
        ["tb line 1", "tb line 2"],
        engine_id=1,
        method="map",
        pickled=pickle.dumps(ZeroDivisionError("division by zero")),
        result={"id": 1, "stdout": "out"},
        item=5,
    )
    back = _roundtrip(e)
    assert (
        back.ename,
        back.evalue,
        back.traceback,
        back.engine_id,
        back.method,
        back.item,
        back.result,
    ) == (
        "ZeroDivisionError",
        "division by zero (on item 5)",
        ["tb line 1", "tb line 2"],
        1,
        "map",
        5,
        {"id": 1, "stdout": "out"},
    )
    assert isinstance(back.original(), ZeroDivisionError)


def test_remote_error_for_engine_is_a_copy_with_context():
    e = RemoteError("ValueError", "bad", item=2)
    other = e.for_engine(3)
    assert other is not e and e.engine_id is None
    assert (other.engine_id, other.item, str(other)) == (3, 2, str(e))
    assert _roundtrip(other).engine_id == 3


def test_engine_error_context_survives_pickling():
    back = _roundtrip(EngineError("engine 2 died: killed by signal SIGKILL", 2, "apply"))
    assert (back.engine_id, back.method, back.evalue) == (
        2,
        "apply",
        "engine 2 died: killed by signal SIGKILL",
    )
    assert _roundtrip(EngineError("gone").for_engine(4)).engine_id == 4


def test_launcher_error_context_survives_pickling():
    back = _roundtrip(LauncherError("engine 3 failed to start: boom", 3))
    assert (back.engine_id, back.method) == (3, "start")
    assert type(LauncherError("x").for_engine(1)) is LauncherError


def test_engine_start_timeout_context_survives_pickling():
    back = _roundtrip(EngineStartTimeout("engines never started: [1, 3]", [1, 3]))
    assert back.missing == [1, 3] and back.engine_id is None
    one = _roundtrip(EngineStartTimeout("engine 2 never started", [2]))
    assert one.missing == [2] and one.engine_id == 2


def test_config_error_names_the_option_and_pickles():
    back = _roundtrip(ConfigError("Cluster.n: must be positive", "Cluster.n"))
    assert back.option == "Cluster.n" and isinstance(back, ValueError)


def test_targets_error_is_a_value_error_in_the_tree():
    from ipy_multiengine.targets import parse_targets

    with pytest.raises(TargetsError) as info:
        parse_targets("", [0, 1])
    assert isinstance(info.value, ValueError) and isinstance(info.value, MultiEngineError)
    _roundtrip(info.value)


def test_cli_usage_error_is_in_the_tree():
    from ipy_multiengine.cli import UsageError, parse_engines

    with pytest.raises(UsageError) as info:
        parse_engines("python3")
    assert isinstance(info.value, MultiEngineError) and isinstance(info.value, ValueError)
    _roundtrip(info.value)


def test_composite_error_keeps_its_elist_through_pickling():
    elist = [
        RemoteError("KeyError", "'a'", ["tb"], 0, "execute", item=None),
        EngineError("engine 1 died", 1, "execute"),
    ]
    e = CompositeError("execute", elist, [None, None])
    back = _roundtrip(e)
    assert [type(x) for x in back.elist] == [RemoteError, EngineError]
    assert [x.engine_id for x in back.elist] == [0, 1] and back.method == "execute"


def test_map_item_is_a_constructor_argument_and_survives_pickling(mec):
    # real engines: the failing item index comes from the engine and is given at construction
    with pytest.raises(errors.CompositeError) as info:
        mec.map(lambda x: 1 / (x - 5), range(12))
    back = pickle.loads(pickle.dumps(info.value))
    assert back.elist[0].item == 5 and back.elist[0].engine_id == 1
    assert "(on item 5)" in str(back)


def test_launcher_option_errors_are_config_errors_naming_the_option():
    from ipy_multiengine.launchers import make_launcher
    from ipy_multiengine.launchers.base import encryption_policy
    from ipy_multiengine.launchers.local import LocalLauncher
    from ipy_multiengine.launchers.ssh import SSHLauncher

    cases = [
        (lambda: make_launcher("no-such-launcher", 2), "launcher"),
        (lambda: encryption_policy("maybe", "127.0.0.1"), "transport_encryption"),
        (lambda: LocalLauncher(2, transport="udp"), "transport"),
        (lambda: LocalLauncher(0), "n"),
        (lambda: SSHLauncher(2), "hosts"),
        (lambda: SSHLauncher(3, hosts={"a": 1}), "n"),
    ]
    for make, option in cases:
        with pytest.raises(ConfigError) as info:
            make()
        assert info.value.option == option and isinstance(info.value, ValueError)
        assert pickle.loads(pickle.dumps(info.value)).option == option


def test_bad_targets_raise_targets_error(mec):
    with pytest.raises(TargetsError, match="unknown engine id 9"):
        mec.execute("x = 1", targets=9)
    with pytest.raises(ValueError):  # still a ValueError, as documented
        mec.execute("x = 1", targets=[])
    assert mec.execute("x = 1", targets=0)[0]["id"] == 0


def test_composite_error_collapse_is_a_constructor_argument_and_pickles():
    elist = [RemoteError("KeyError", "'a'", ["tb"], eid, "execute") for eid in range(3)]
    e = CompositeError("execute", elist)
    shown = e.collapsed()
    assert shown is not e and e.collapse is False and shown.collapse is True
    back = _roundtrip(shown)
    assert back.collapse is True
    assert "[0-2:execute]: " in back._render_traceback_()


def test_raise_exception_prints_where_the_engine_raised(mec):
    """``CompositeError.raise_exception()`` printed outside IPython (a script) showed the remote
    type and message only, no frame of the engine's: the original is chained to a
    ``RemoteTraceback`` now, and one that cannot be rebuilt is raised as that."""
    import traceback

    mec.execute(
        "def inner_boom():\n    return 1 / 0\n\ndef outer_boom():\n    return inner_boom()\n\n"
        "class Unrebuilt(Exception): pass\n\ndef weird_boom():\n    raise Unrebuilt('w')",
        targets=0,
    )
    for code, kind, frames in (
        ("outer_boom()", ZeroDivisionError, ("outer_boom", "inner_boom")),
        ("weird_boom()", errors.RemoteTraceback, ("weird_boom",)),
    ):
        with pytest.raises(CompositeError) as info:
            mec.execute(code, targets=0)
        with pytest.raises(kind) as raised:
            info.value.raise_exception()
        text = "".join(traceback.format_exception(raised.value))
        assert all(name in text for name in frames), text
        assert "\x1b[" not in text, "ANSI colours in a plain traceback"
        remote = raised.value if kind is errors.RemoteTraceback else raised.value.__cause__
        assert isinstance(remote, RemoteError) and remote.engine_id == 0


# ------------------------------------------------------ members that do not survive pickling
class TwoArgs(Exception):
    """Pickles, but does not load back: its constructor takes other arguments than its args."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


class HoldsLock(Exception):
    """Does not pickle at all: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        import threading

        self.lock = threading.Lock()


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def _stand_in_checks(back: BaseException, original: BaseException) -> None:
    assert isinstance(back, errors.UnpicklableError), repr(back)
    assert back.ename == back.type_name == f"test_errors.{type(original).__qualname__}"
    assert back.evalue == str(original)
    assert str(back) == f"{back.ename}: {original}"
    # the original's own traceback, its raise line included
    assert back.traceback[-1] == f"test_errors.{type(original).__qualname__}: {original}"
    assert any("raise exc" in line for line in back.traceback), back.traceback


def test_restart_error_with_members_that_do_not_pickle_survives_pickling():
    """A RestartError holding an exception that did not load back (or did not pickle) failed
    to unpickle (or pickle) as a whole; now that member arrives as a stand-in naming its type,
    message and traceback, and the others as themselves."""
    members = {
        0: _raised(TwoArgs(1, 2)),
        1: _raised(HoldsLock("held")),
        2: EngineError("engine 2 failed to restart: no port", 2, "restart"),
        3: _raised(ValueError("plain")),
    }
    e = errors.RestartError("the restart of engines [0, 1, 2, 3] failed: ...", members)
    back = _roundtrip(e)
    assert list(back.errors) == [0, 1, 2, 3] and back.engine_id == 0
    _stand_in_checks(back.errors[0], members[0])
    _stand_in_checks(back.errors[1], members[1])
    assert type(back.errors[2]) is EngineError and back.errors[2].engine_id == 2
    assert type(back.errors[3]) is ValueError and str(back.errors[3]) == "plain"
    # what it says names the original types, not the stand-in's
    assert str(back.for_engine(0)) == "test_errors.TwoArgs: 1 and 2"
    shown = "\n".join(back.render_traceback())
    assert "test_errors.HoldsLock: held" in shown and "raise exc" in shown
    assert "UnpicklableError" not in shown
    again = _roundtrip(back)  # a stand-in pickles itself
    assert again.errors[0].traceback == back.errors[0].traceback
    # a printed traceback shows every engine's error, also once unpickled (its cause, a group)
    import traceback

    assert list(back.__cause__.exceptions) == list(back.errors.values())
    printed = "".join(traceback.format_exception(back))
    assert "test_errors.TwoArgs: 1 and 2" in printed and "ValueError: plain" in printed


def test_restart_error_whose_member_type_is_missing_where_it_is_loaded():
    """Across processes: a member of a type the loading process cannot import (this test
    module) arrives as a stand-in; before, the whole error failed to load there."""
    import subprocess
    import sys

    e = errors.RestartError("restart failed", {1: _raised(KeyError("k")), 4: _raised(Missing())})
    code = (
        "import pickle, sys; e = pickle.loads(sys.stdin.buffer.read()); "
        "print(type(e).__name__, e.engine_id, repr(e.errors[1]), e.errors[4])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(errors.__file__))  # not tests/
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(e),
        capture_output=True,
        env=env,
        timeout=30,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split("\n")[0] == (
        "RestartError 1 KeyError('k') test_errors.Missing: it is only in the tests"
    )


class Missing(Exception):
    def __init__(self):
        super().__init__("it is only in the tests")


def test_composite_error_with_members_and_results_that_do_not_pickle():
    """A CompositeError holding an unpicklable result (a lock), one of a type that does not load
    back, or an elist member that does not, failed to pickle or to load as a whole; now each
    becomes its stand-in and the rest is intact (a lambda crosses through cloudpickle)."""
    import threading

    class OwnEngineError(EngineError):  # a local class: pickle cannot, cloudpickle can
        pass

    elist = [
        RemoteError("ZeroDivisionError", "division by zero", ["tb"], 0, "apply"),
        OwnEngineError("engine 1 died", 1, "apply"),
    ]
    lock = threading.Lock()
    e = CompositeError("apply", elist, [None, None, lock, TwoArgs(3, 4), lambda: 7])
    back = _roundtrip(e)
    assert type(back.elist[0]) is RemoteError and back.elist[0].engine_id == 0
    assert back.elist[1].engine_id == 1 and str(back.elist[1]) == "engine 1 died"
    assert back.results[:2] == [None, None]
    assert back.results[2] == errors.Unpicklable("_thread.lock", repr(lock))
    assert repr(back.results[2]).startswith("<unpicklable _thread.lock: <unlocked")
    # an exception as a result: its stand-in is an exception too
    assert isinstance(back.results[3], errors.UnpicklableError)
    assert str(back.results[3]) == "test_errors.TwoArgs: 3 and 4"
    assert back.results[4]() == 7


def test_composite_error_whose_elist_member_does_not_load_back_keeps_its_message():
    class Strict(EngineError):
        def __init__(self, message, engine_id, extra, more):  # __reduce__ gives 3 arguments
            super().__init__(message, engine_id, "push")

    e = CompositeError("push", [Strict("engine 3 refused", 3, "x", "y")], [None])
    back = _roundtrip(e)
    [member] = back.elist
    assert isinstance(member, errors.UnpicklableError) and member.engine_id == 3
    assert member.method == "push" and member.evalue == "engine 3 refused"
    assert member.ename == "EngineError" and member.type_name.endswith("<locals>.Strict")
    assert "engine 3 refused" in "\n".join(back._render_traceback_())


def test_engine_and_remote_errors_with_a_result_that_does_not_pickle():
    import threading

    record = {"id": 0, "stdout": "last words\n", "stderr": "", "handle": threading.Lock()}
    back = _roundtrip(EngineError("engine 0 died", 0, "execute", record))
    assert back.result["stdout"] == "last words\n" and back.result["id"] == 0
    assert isinstance(back.result["handle"], errors.Unpicklable)
    back = _roundtrip(RemoteError("ValueError", "bad", ["tb"], 2, "apply", result=TwoArgs(5, 6)))
    assert back.engine_id == 2 and str(back.result) == "test_errors.TwoArgs: 5 and 6"
    back = _roundtrip(RemoteError("ValueError", "bad", ["tb"], 2, "apply", result=threading.Lock()))
    assert back.result.type_name == "_thread.lock"


def test_notes_survive_pickling():
    """``add_note`` notes (a launcher adds one when stopping what started failed too) were
    dropped by every error's ``__reduce__``."""
    for e in (
        LauncherError("could not start engines", None, "start"),
        EngineError("engine 0 died", 0),
        ConfigError("bad", "n"),
        errors.RestartError("restart failed", {0: ValueError("v")}),
        CompositeError("execute", [EngineError("x", 0)], [None]),
    ):
        e.add_note("stopping the engines that had started failed too: boom")
        assert _roundtrip(e).__notes__ == e.__notes__, type(e)


def test_copy_of_an_error_holds_the_same_members():
    import copy
    import threading

    lock = threading.Lock()
    e = CompositeError("apply", [EngineError("x", 0)], [lock])
    c = copy.copy(e)
    assert type(c) is CompositeError and c.results[0] is lock and str(c) == str(e)
    # a RestartError's cause, the group of its engines' errors, is its constructor's: a copy
    # kept none, and printed it showed no engine's error
    import traceback

    r = errors.RestartError("restart failed", {0: ValueError("v0"), 1: KeyError("k1")})
    c = copy.copy(r)
    assert c.__cause__ is r.__cause__ and c.errors == r.errors
    printed = "".join(traceback.format_exception(c))
    assert "ValueError: v0" in printed and "KeyError: 'k1'" in printed


def test_remote_traceback_of_keeps_every_member_and_pickles():
    """``RemoteTraceback.of`` rebuilt the error from its ``__reduce__`` arguments, which hold
    wrapped members since errors pickle each member on its own: it raised TypeError. It keeps
    every member and note of the original now, and pickles as itself."""
    err = RemoteError("ZeroDivisionError", "division by zero", ["tb line"], 3, "apply")
    err.item = 7
    err.add_note("a note")
    rt = errors.RemoteTraceback.of(err)
    assert type(rt) is errors.RemoteTraceback and rt.args == err.args
    assert (rt.ename, rt.engine_id, rt.method, rt.item) == ("ZeroDivisionError", 3, "apply", 7)
    assert rt.__notes__ == ["a note"] and "tb line" in str(rt)
    back = pickle.loads(pickle.dumps(rt))
    assert type(back) is errors.RemoteTraceback and str(back) == str(rt)
    assert back.__notes__ == ["a note"] and back.engine_id == 3


def test_remote_traceback_of_has_notes_of_its_own():
    """``RemoteTraceback.of`` shared the original's notes list: a note added to the one raised
    by the executor (or ``raise_exception``) showed on the ``RemoteError`` of the
    ``CompositeError`` too, and the other way round."""
    err = RemoteError("ValueError", "bad", ["tb line"], 0, "apply")
    err.add_note("first")
    rt = errors.RemoteTraceback.of(err)
    rt.add_note("added to the copy")
    err.add_note("added to the original")
    assert err.__notes__ == ["first", "added to the original"]
    assert rt.__notes__ == ["first", "added to the copy"]
    rt.traceback.append("more")
    assert err.traceback == ["tb line"]


def test_restart_error_pickles_with_tblib_pickling_support_installed():
    """distributed installs tblib's pickling support, which pickles an exception's cause as it
    is: a RestartError's cause, the group of its engines' errors, failed the whole pickling
    when one of them held a lock. The group pickles member by member too now."""
    from tblib import pickling_support

    members = {1: _raised(HoldsLock("held")), 2: _raised(ValueError("plain"))}
    e = errors.RestartError("the restart of engines [1, 2] failed", members)
    pickling_support.install(e, e.__cause__)  # the reducer for these types (as distributed)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is errors.RestartError and list(back.errors) == [1, 2]
    assert isinstance(back.errors[1], errors.UnpicklableError) and "held" in str(back.errors[1])
    assert [str(m) for m in back.__cause__.exceptions] == [str(m) for m in back.errors.values()]


def test_an_engine_error_raised_from_its_composite_pickles_once_under_tblib():
    """``e.raise_exception()`` in the ``except`` block of a CompositeError raises its member
    itself when it is an EngineError (an engine died): its ``__context__`` is then the
    CompositeError that holds it, a cycle. Under tblib's pickling support (distributed pickles
    a task's exception so), contexts are pickled too, and each member pickled on its own
    copied the whole CompositeError into the member's pickle, again and again until the
    recursion limit: 1 MB of results made a 109 MB pickle, 108 nested copies ending in a
    stand-in. The cycle is pickled as a reference now, and comes back as the cycle."""
    from tblib import pickling_support

    member = EngineError("engine 0 died while running 'x'", 0)
    composite = CompositeError("execute", [member], [None, b"r" * 1_000_000])
    with pytest.raises(EngineError) as info:
        try:
            raise composite
        except CompositeError as e:
            e.raise_exception()
    raised = info.value
    assert raised is member and raised.__context__ is composite
    pickling_support.install(raised, composite)  # as distributed does for a task's error
    data = pickle.dumps(raised)
    assert len(data) < 1_100_000  # the results once
    back = pickle.loads(data)
    assert type(back) is EngineError and str(back) == str(member)
    outer = back.__context__
    assert type(outer) is CompositeError and outer.results[1] == b"r" * 1_000_000
    [inner] = outer.elist
    assert type(inner) is EngineError and inner.__context__ is outer
    # the CompositeError itself, pickled the same way
    data = pickle.dumps(composite)
    assert len(data) < 1_100_000
    again = pickle.loads(data)
    assert type(again) is CompositeError and again.elist[0].__context__ is again


class Proxy:
    """A stand-in for a remote object (an RPC proxy): any attribute it lacks raises."""

    def __init__(self, name):
        self.__dict__["name"] = name

    def __getattr__(self, attr):
        raise RuntimeError(f"remote object {self.name} is gone")

    def __reduce__(self):
        return (Proxy, (self.name,))


class ProxyError(Exception):
    def __getattr__(self, attr):
        raise RuntimeError("no such attribute")


def test_members_whose_getattr_raises_pickle():
    """Carrying a member looked up ``ename``/``evalue``/``engine_id`` on it with ``getattr``: a
    result or an exception whose ``__getattr__`` raises (not AttributeError) failed the whole
    pickling with that error; it pickled before members were carried."""
    e = CompositeError("apply", [EngineError("x", 0, "apply")], [Proxy("p"), None])
    back = _roundtrip(e)
    assert type(back.results[0]) is Proxy and back.results[0].name == "p"
    held = errors.RestartError("restart failed", {0: ProxyError("gone"), 1: ValueError("v")})
    back = _roundtrip(held)
    assert type(back.errors[0]) is ProxyError and str(back.errors[0]) == "gone"


def test_large_results_are_not_copied_into_their_members_pickle():
    """Each member pickled on its own copied its arrays into its own pickle first, which the
    error's pickle then copied again: a CompositeError of 64 engines' 10 MB results took 1.26
    GB more to pickle with protocol 5, twice its size (625 MB before members were carried), and
    none of its arrays could go out of band. A member's buffers stay apart now: written once,
    or out of band when the pickler takes them so (distributed, the engines' own data path)."""
    np = pytest.importorskip("numpy")
    big = np.arange(1_000_000.0)
    record = {"stdout": "s", "array": big}
    e = CompositeError("apply", [EngineError("engine 0 died", 0, "apply", record)], [None, big])
    buffers: list = []
    data = pickle.dumps(e, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 2 and len(data) < 100_000, (len(buffers), len(data))
    back = pickle.loads(data, buffers=buffers)
    assert (back.results[1] == big).all() and back.results[1].flags.writeable
    assert (back.elist[0].result["array"] == big).all() and back.elist[0].result["stdout"] == "s"
    inband = pickle.dumps(e, protocol=5)  # the arrays in it, once
    assert len(inband) < 2 * big.nbytes + 100_000
    assert (pickle.loads(inband).results[1] == big).all()
    # protocol 4 (pickle's default here) and a non-contiguous array (never out of band)
    e = CompositeError("apply", [EngineError("x", 0, "apply")], [big[::2]])
    for back in (pickle.loads(pickle.dumps(e)), pickle.loads(pickle.dumps(e, protocol=5))):
        assert (back.results[0] == big[::2]).all()


@pytest.mark.timeout(120)
def test_the_error_of_an_engine_that_died_raised_from_its_composite_pickles_under_tblib():
    """The same cycle with a real engine's death: its EngineError (its result record, its
    In [n]) raised by ``raise_exception`` in the ``except`` block of its CompositeError."""
    from faultlib import small_cluster
    from tblib import pickling_support

    with small_cluster(1) as (_cluster, mec), pytest.raises(EngineError) as info:
        try:
            mec.execute("print('last words', flush=True); import os; os._exit(3)", timeout=60)
        except CompositeError as e:
            e.raise_exception()
    raised = info.value
    composite = raised.__context__
    assert type(composite) is CompositeError and composite.elist == [raised]
    pickling_support.install(raised, composite)
    data = pickle.dumps(raised)
    assert len(data) < 50_000, len(data)
    back = pickle.loads(data)
    assert type(back) is EngineError and str(back) == str(raised)
    assert back.result["number"] == raised.result["number"]
    [inner] = back.__context__.elist
    assert inner.__context__ is back.__context__ and str(inner) == str(raised)


def test_rendered_composite_header_keeps_one_line_per_engine():
    """A dead local engine's message ends with the last lines its process wrote: rendered (in
    IPython) a CompositeError's header repeated them for each engine, above the tracebacks that
    show them again (64 engines aborting: 1,280 header lines). The rendered header keeps each
    message's first line and says how many follow; ``str`` keeps them all."""
    own = "engine 0's log:\n  Fatal Python error: Aborted\n  line two\n"
    e = CompositeError(
        "execute",
        [
            EngineError(f"engine 0 died (exit code -6)\n{own}", 0),
            RemoteError("ValueError", "x", [], 1),
        ],
    )
    lines = "\n".join(e._render_traceback_()).splitlines()
    header = lines[: lines.index("")]
    assert header[1:] == [
        "[0:execute]: EngineError: engine 0 died (exit code -6) (+3 more lines below)",
        "[1:execute]: ValueError: x",
    ], header
    assert sum("Fatal Python error" in line for line in lines) == 1, lines
    assert "Fatal Python error: Aborted" in str(e)


def test_rendered_composite_header_shows_each_messages_first_written_line():
    """The rendered header kept what came before the first ``\\n``: a message that starts on a
    new line (numpy.testing's assert_allclose: "\\nNot equal to tolerance...") showed nothing
    but the count of lines below, and one ending its lines with ``\\r\\n`` kept a ``\\r`` that
    sent the terminal's cursor back, the count written over the message."""
    e = CompositeError(
        "execute",
        [
            RemoteError("AssertionError", "\nNot equal to tolerance rtol=1e-07\n\nMax: 1", [], 0),
            RemoteError("ValueError", "bad value\r\nsecond line\r\n", [], 1),
            RemoteError("KeyError", "", [], 2),
            RemoteError("OSError", "\n \n", [], 3),
        ],
    )
    lines = "\n".join(e._render_traceback_()).split("\n")
    assert lines[1:5] == [
        "[0:execute]: AssertionError: Not equal to tolerance rtol=1e-07 (+1 more line below)",
        "[1:execute]: ValueError: bad value (+1 more line below)",
        "[2:execute]: KeyError: ",
        "[3:execute]: OSError: ",
    ], lines


def test_restart_error_cause_is_the_group_python_would_make():
    """Since the cause group pickles member by member it was a ``BaseExceptionGroup`` subclass
    even of ordinary exceptions: ``except Exception`` no longer caught it re-raised, it was no
    ``ExceptionGroup``, and a printed traceback named it ``ipy_multiengine.errors._Members``.
    It is what ``BaseExceptionGroup(...)`` gives, an ``ExceptionGroup`` of exceptions, printed
    so, and it still pickles member by member."""
    import traceback

    e = errors.RestartError("m", {1: _raised(ValueError("a")), 2: _raised(OSError("b"))})
    assert isinstance(e.__cause__, ExceptionGroup)
    printed = "".join(traceback.format_exception(e))
    assert "| ExceptionGroup: the restart of each of engines [1, 2]" in printed, printed
    assert "_Members" not in printed
    mixed = errors.RestartError("m", {1: _raised(ValueError("a")), 2: KeyboardInterrupt()})
    assert not isinstance(mixed.__cause__, Exception)
    assert "| BaseExceptionGroup: " in "".join(traceback.format_exception(mixed))
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back.__cause__, ExceptionGroup)
    assert [str(m) for m in back.__cause__.exceptions] == ["a", "b"]


# ------------------------------------------------- links (cause, context) that do not pickle
def _raised_from_unpicklable(kind: type = ValueError) -> BaseException:
    """``kind('outer')`` raised while handling a KeyError that holds a lock."""
    import threading

    try:
        try:
            inner = KeyError("k")
            inner.lock = threading.Lock()
            raise inner
        except KeyError:
            raise kind("outer")  # noqa: B904 (its context is the point)
    except BaseException as outer:
        return outer


def test_an_error_whose_context_does_not_pickle_arrives_under_tblib():
    """Under tblib's pickling support (distributed installs it, on engines too) an exception's
    context is pickled with it: one whose context held a lock failed as a whole, and the
    engine sent no pickle (the client could not rebuild a type outside builtins). Each link
    crosses on its own now: the error arrives with a stand-in naming the link's type."""
    from tblib import pickling_support

    pickling_support.install()
    import zipfile

    err = _raised_from_unpicklable(zipfile.BadZipFile)
    with pytest.raises(TypeError, match="lock"):
        pickle.dumps(err)  # what the engine did
    back = pickle.loads(errors.dumps_error(err))
    assert type(back) is zipfile.BadZipFile and str(back) == "outer"
    link = back.__context__
    assert isinstance(link, errors.UnpicklableError), repr(link)
    assert (link.type_name, link.evalue) == ("KeyError", "'k'")
    assert any("raise inner" in line for line in link.traceback), link.traceback
    assert back.__traceback__ is not None and not back.__suppress_context__
    # a cause too, and `from` suppresses the context as before
    try:
        raise RuntimeError("top") from err
    except RuntimeError as top:
        back = pickle.loads(errors.dumps_error(top))
    assert type(back.__cause__) is zipfile.BadZipFile and back.__suppress_context__
    assert isinstance(back.__cause__.__context__, errors.UnpicklableError)


def test_members_whose_context_does_not_pickle_under_tblib():
    """The same for what the client pickles: a RestartError's (or a CompositeError's) member
    whose context does not pickle failed the member, which arrived as a stand-in of itself
    (its type lost); only the link is one now."""
    from tblib import pickling_support

    pickling_support.install()
    member = _raised_from_unpicklable()
    engine_error = EngineError("engine 1 died", 1, "execute")
    engine_error.__context__ = _raised_from_unpicklable(OSError)
    for e in (
        errors.RestartError("restart failed", {0: member, 1: engine_error}),
        CompositeError("execute", [engine_error], [member]),
    ):
        back = pickle.loads(pickle.dumps(e))
        kept = list(back.errors.values()) if isinstance(back, errors.RestartError) else []
        kept += [*back.elist, *back.results] if isinstance(back, CompositeError) else []
        assert {type(m) for m in kept} <= {ValueError, EngineError} and len(kept) == 2, kept
        for m in kept:
            chain = [m]
            while chain[-1].__context__ is not None:
                chain.append(chain[-1].__context__)
            if type(m) is EngineError:
                assert type(chain[1]) is OSError and str(chain[1]) == "outer", chain
            stand_in = chain[-1]
            assert isinstance(stand_in, errors.UnpicklableError), chain
            assert (stand_in.type_name, stand_in.evalue) == ("KeyError", "'k'")


def test_a_long_chain_of_contexts_pickles_under_tblib():
    """tblib pickles each context inside the one before: 1,000 chained exceptions (a
    recursive function re-raising in its ``except``) failed with RecursionError. They pickle
    one after the other now, and come back as the same chain."""
    from tblib import pickling_support

    pickling_support.install()
    prev = None
    for i in range(1000):
        try:
            try:
                if prev is not None:
                    raise prev
            finally:
                raise ValueError(i)
        except ValueError as e:
            prev = e
    with pytest.raises(RecursionError):
        pickle.dumps(prev)
    back = pickle.loads(errors.dumps_error(prev))
    values = []
    while back is not None:
        values.append(back.args[0])
        back = back.__context__
    assert values == list(range(999, -1, -1))


@pytest.mark.timeout(120)
def test_an_engine_error_whose_context_does_not_pickle_keeps_its_type_under_tblib():
    """An engine with tblib's pickling support (a dask worker in it installs it) whose code
    raised while handling an exception holding a lock: the engine could not pickle the error,
    so ``raise_exception`` and the executor raised a ``RemoteTraceback`` instead of the user's
    type. The user's type arrives now, its context a stand-in naming the KeyError."""
    import zipfile

    from faultlib import small_cluster

    code = (
        "from tblib import pickling_support; pickling_support.install()\n"
        "import threading, zipfile\n"
        "def fails(x):\n"
        "    try:\n"
        "        inner = KeyError('k'); inner.lock = threading.Lock(); raise inner\n"
        "    except KeyError:\n"
        "        raise zipfile.BadZipFile(f'outer {x}')\n"
    )
    with small_cluster(1) as (_cluster, mec):
        mec.execute(code)
        fails = mec.pull_function("fails")[0]
        with pytest.raises(CompositeError) as info:
            mec.apply(fails, 1)
        with pytest.raises(zipfile.BadZipFile, match="outer 1") as raised:
            info.value.raise_exception()
        with mec.executor() as pool, pytest.raises(zipfile.BadZipFile, match="outer 2") as again:
            pool.submit(fails, 2).result(timeout=60)
    for exc in (raised.value, again.value):
        link = exc.__context__
        assert isinstance(link, errors.UnpicklableError), repr(link)
        assert (link.type_name, link.evalue) == ("KeyError", "'k'")
        assert isinstance(exc.__cause__, errors.RemoteTraceback)


class ReduceRaises(Exception):
    def __reduce__(self):
        raise RuntimeError("no reduction")


def test_links_of_types_tblib_does_not_pickle_and_links_whose_reduce_raises():
    """tblib installed for one type only pickles the links of that type's errors, the linked
    exceptions as pickle does (without their own links): such a link arrived as a stand-in of
    itself. A link whose ``__reduce__`` raised failed the whole error."""
    import zipfile

    from tblib import pickling_support

    pickling_support.install(zipfile.BadZipFile)

    def raised_from(inner):
        try:
            try:
                raise inner
            except Exception:
                raise zipfile.BadZipFile("outer")  # noqa: B904
        except Exception as outer:
            return outer

    back = pickle.loads(errors.dumps_error(raised_from(ValueError("v"))))
    assert type(back) is zipfile.BadZipFile and type(back.__context__) is ValueError
    assert str(back.__context__) == "v"
    back = pickle.loads(errors.dumps_error(raised_from(ReduceRaises("r"))))
    assert type(back) is zipfile.BadZipFile, repr(back)
    assert isinstance(back.__context__, errors.UnpicklableError)
    assert back.__context__.type_name == "test_errors.ReduceRaises"


def test_an_exception_group_with_a_member_that_does_not_pickle():
    """An engine's ``ExceptionGroup`` (an asyncio ``TaskGroup``'s) with one exception that did
    not pickle failed as a whole: the client got a ``RemoteTraceback``, nothing ``except*``
    could match. Each member crosses on its own, also in nested groups and under tblib."""
    import threading

    from tblib import pickling_support

    held = ValueError("held")
    held.lock = threading.Lock()
    group = ExceptionGroup("eg", [held, KeyError("k"), ExceptionGroup("inner", [_raised(held)])])
    group.add_note("a note")
    for tblib in (False, True):
        if tblib:
            pickling_support.install()
        back = pickle.loads(errors.dumps_error(_raised(group)))
        assert type(back) is ExceptionGroup and back.message == "eg", repr(back)
        first, second, inner = back.exceptions
        assert isinstance(first, errors.UnpicklableError) and first.type_name == "ValueError"
        assert type(second) is KeyError and type(inner) is ExceptionGroup
        assert isinstance(inner.exceptions[0], errors.UnpicklableError)
        assert back.__notes__ == ["a note"]
        try:
            raise back
        except* KeyError as caught:
            assert [type(e) for e in caught.exceptions] == [KeyError]
        except* Exception:
            pass


def test_an_exception_group_keeps_its_traceback_cause_and_context_under_tblib():
    """Under tblib an engine's ``ExceptionGroup`` arrived without its own traceback, cause and
    context (pickled member by member, only its message and notes were kept; tblib keeps them,
    and did before): ``raise ExceptionGroup(...) from err`` lost ``err``. They arrive now, also
    for a group that is the context of another error, its members each on their own still."""
    import threading
    import traceback

    from tblib import pickling_support

    pickling_support.install()
    held = ValueError("held")
    held.lock = threading.Lock()

    def grouped() -> None:
        try:
            raise KeyError("handled")
        except KeyError:
            raise ExceptionGroup("eg", [_raised(held), _raised(OSError("o"))]) from _raised(
                RuntimeError("the cause")
            )

    try:
        grouped()
    except ExceptionGroup as caught:
        group = caught
    try:
        try:
            raise group
        except ExceptionGroup:
            raise ValueError("after the group") from None
    except ValueError as caught:
        later = caught
    back = pickle.loads(errors.dumps_error(group))
    assert type(back) is ExceptionGroup and back.message == "eg", repr(back)
    assert back.__traceback__ is not None
    assert "grouped" in "".join(traceback.format_tb(back.__traceback__))
    assert type(back.__cause__) is RuntimeError and str(back.__cause__) == "the cause"
    assert type(back.__context__) is KeyError and back.__suppress_context__
    first, second = back.exceptions
    assert isinstance(first, errors.UnpicklableError) and first.type_name == "ValueError"
    assert type(second) is OSError and second.__traceback__ is not None
    again = pickle.loads(errors.dumps_error(later))
    assert type(again) is ValueError and again.__suppress_context__
    inner = again.__context__
    assert type(inner) is ExceptionGroup and inner.__traceback__ is not None, repr(inner)
    assert type(inner.__cause__) is RuntimeError
    assert [type(e) for e in inner.exceptions] == [errors.UnpicklableError, OSError]
