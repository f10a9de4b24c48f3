"""What makes engines ready for the caller's functions: ``require``, ``Reference``, sync_imports.

- ``@require("numpy", helper, scale=2)``: the function imports those modules and gets those
  names in the engine namespace before each call on an engine.
- ``Reference("name")``: an ``apply``/``map`` argument (or pushed value) that the engine
  replaces by its own value of ``name`` when it receives it.
- ``SyncImports`` (``mec.sync_imports()``): the import statements of a ``with`` block run
  here and then on the engines.
"""

from __future__ import annotations

import ast
import functools
import importlib
import linecache
import sys
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import MultiEngineClient

__all__ = ["Reference", "require"]


def _check_dotted(what: str, name: Any) -> str:
    if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
        raise ValueError(f"{what} must be a name like 'x' or 'x.attr', not {name!r}")
    return name


class Reference:
    """An argument resolved on the engine: ``mec.apply(f, Reference("data"))`` calls ``f`` with
    each engine's own ``data`` (``"data.shape"``: an attribute of it). Resolved when an engine
    receives it; here (pickled and rebuilt outside an engine) it stays a ``Reference``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = _check_dotted("Reference name", name)

    def __reduce__(self) -> Any:
        return _resolve, (self.name,)

    def __copy__(self) -> Reference:
        return self

    def __deepcopy__(self, memo: dict) -> Reference:
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and other.name == self.name

    def __hash__(self) -> int:
        return hash((Reference, self.name))

    def __repr__(self) -> str:
        return f"Reference({self.name!r})"


def _resolve(name: str) -> Any:
    """Unpickling a ``Reference``: on an engine, the value of ``name`` in its namespace."""
    from . import engine

    if not engine.on_engine():
        return Reference(name)
    from IPython import get_ipython

    ns = get_ipython().user_ns
    head, *attrs = name.split(".")
    where = f"engine {ns.get(engine.ENGINE_ID_NAME, '?')}"
    if head not in ns:
        raise NameError(f"Reference({name!r}): name {head!r} is not defined on {where}")
    value = ns[head]
    for attr in attrs:
        try:
            value = getattr(value, attr)
        except AttributeError:
            raise AttributeError(
                f"Reference({name!r}): {type(value).__name__} object has no attribute "
                f"{attr!r} on {where}"
            ) from None
    return value


def require(*needs: Any, **names: Any) -> Callable[[Callable], Required]:
    """Decorator: before each call on an engine, import modules and set names there.

    ``needs`` are module names (``"numpy"``, ``"scipy.linalg"``), modules, or functions and
    classes (set in the engine namespace under their ``__name__``); ``names`` set values by
    name. Everything is checked here, at decoration, before anything is sent. On an engine
    that cannot import a module the call fails with ``ModuleNotFoundError`` naming the module,
    the function and the engine. Called here (not on an engine), the function just runs.
    """
    modules: list[str] = []
    values: dict[str, Any] = {}
    for need in needs:
        if isinstance(need, str):
            modules.append(_check_dotted("a required module", need))
        elif isinstance(need, types.ModuleType):
            modules.append(need.__name__)
        elif callable(need) and isinstance(getattr(need, "__name__", None), str):
            if not need.__name__.isidentifier():
                raise ValueError(f"require: {need!r} has no usable name; pass it as name=value")
            values[need.__name__] = need
        else:
            raise TypeError(
                f"require takes module names, modules, functions or classes, not {need!r} "
                "(give other values by name: require(name=value))"
            )
    for key in names:
        if not key.isidentifier():
            raise ValueError(f"require: {key!r} is not a valid Python identifier")
    values.update(names)

    def decorate(f: Callable) -> Required:
        if not callable(f):
            raise TypeError(f"require decorates a function, not {type(f).__name__}")
        return Required(f, modules, values)

    return decorate


class Required:
    """A function made by ``@require``: call it like the function; it is sent with what it needs."""

    def __init__(self, f: Callable, modules: list[str], names: dict[str, Any]) -> None:
        self.func, self.modules, self.names = f, list(modules), dict(names)
        functools.update_wrapper(self, f)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from . import engine

        if not engine.on_engine():
            return self.func(*args, **kwargs)
        from IPython import get_ipython

        ns = get_ipython().user_ns
        for name in self.modules:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ModuleNotFoundError(
                    f"{getattr(self.func, '__name__', 'the function')} requires module {name!r}, "
                    f"which engine {ns.get(engine.ENGINE_ID_NAME, '?')} cannot import: {exc}",
                    name=name,
                ) from None
            top = name.split(".")[0]
            ns.setdefault(top, sys.modules[top])
        if self.names:
            engine.set_in_namespace(self.names)
        return engine.call_in_namespace(self.func, *args, **kwargs)

    def __repr__(self) -> str:
        needs = [*self.modules, *self.names]
        return f"<{getattr(self.func, '__name__', 'function')} requiring {', '.join(needs)}>"


class SyncImports:
    """``with mec.sync_imports():`` — the ``import`` statements of the block run here (as the
    block runs) and then, once it ends without error, on the target engines.

    The statements are read from the block's source (an IPython cell, a file), so
    ``import numpy as np`` and ``from os import path as p`` arrive as written; only statements
    directly in the block are sent (an import under ``if`` runs here only).
    """

    def __init__(
        self, client: MultiEngineClient, eids: list[int], quiet: bool, timeout: float | None
    ) -> None:
        self.client, self.eids, self.quiet, self.timeout = client, eids, quiet, timeout
        self.statements: list[str] = []

    def __enter__(self) -> SyncImports:
        frame = sys._getframe(1)
        self.statements = _imports_of_with_block(frame)
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is not None or not self.statements:
            return  # failed here: nothing is sent
        if not self.quiet:
            from .targets import engine_range

            print(f"{'; '.join(self.statements)} on engines {engine_range(self.eids)}")
        self.client.execute(
            "\n".join(self.statements),
            targets=self.eids,
            block=True,
            timeout=self.timeout,
            silent=True,
        )


def _imports_of_with_block(frame: types.FrameType) -> list[str]:
    """The import statements directly inside the ``with`` statement at ``frame``'s line."""
    filename, line = frame.f_code.co_filename, frame.f_lineno
    source = "".join(linecache.getlines(filename, frame.f_globals))
    try:
        with warnings.catch_warnings():  # the file's warnings were given when it was compiled
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    blocks = [
        node
        for node in (ast.walk(tree) if tree is not None else ())
        if isinstance(node, (ast.With, ast.AsyncWith))
        # the header's lines (a one-line ``with ...: import x`` has its body on the same line)
        and node.lineno <= line <= max(node.lineno, node.body[0].lineno - 1 if node.body else 0)
    ]
    if not blocks:
        raise RuntimeError(
            f"sync_imports() cannot read the source of its with block ({filename}, line {line}); "
            "use it in an IPython cell or a file, or run the imports with "
            "mec.execute('import ...')"
        )
    block = max(blocks, key=lambda n: n.lineno)  # the innermost with on that line
    return [
        ast.unparse(stmt) for stmt in block.body if isinstance(stmt, (ast.Import, ast.ImportFrom))
    ]
