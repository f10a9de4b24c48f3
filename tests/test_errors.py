"""The error tree (issue 13 item 8): every error the package raises derives from
``MultiEngineError``; context is a constructor argument and survives pickling."""

from __future__ import annotations

import builtins
import importlib
import inspect
import pickle
import pkgutil

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
