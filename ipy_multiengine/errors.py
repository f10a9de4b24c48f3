"""The exception tree of ipy_multiengine: every error the package raises derives from
``MultiEngineError``.

::

    Exception
     ├── MultiEngineError               base of everything raised here
     │    ├── CompositeError            one or more engines failed in one call (elist, results)
     │    ├── RemoteError               one engine raised (type, value, traceback; engine_id, item)
     │    │    └── RemoteTraceback      the same, its message showing the remote traceback
     │    ├── UnpicklableError          stands in for an exception that did not survive pickling
     │    ├── EngineError               an engine died or could not be reached (engine_id)
     │    │    ├── RefusedError         a data message did not check: refused unread
     │    │    ├── RestartError         the restart of more than one engine failed (errors)
     │    │    └── LauncherError        a launcher could not start/reach/restart/stop engines
     │    │         └── EngineStartTimeout  (also a TimeoutError) engines never reported (missing)
     │    ├── NoClusterError            no running cluster to connect to
     │    ├── ConfigError (ValueError)  a bad configuration value (option names the trait)
     │    ├── TargetsError (ValueError) a targets specification that names no engine
     │    └── TimeoutError (builtin TimeoutError)  a blocking call ran past its ``timeout``

Context (the failing engine, item, option) is a constructor argument, never an attribute set
afterwards, and every error pickles with its type, message, context and notes (``__reduce__``),
so it can cross processes. What an error holds (the exceptions of a ``RestartError``, the
results of a ``CompositeError``, an ``EngineError``'s output record) crosses member by member:
one that cannot be pickled, or not be rebuilt where it is loaded (its type missing there, a
constructor taking other arguments), arrives as a stand-in naming its type and message (an
``UnpicklableError`` for an exception, an ``Unpicklable`` for a value), never failing the whole
error. Where a reducer pickles exceptions with their links (tblib's, which distributed
installs), the exceptions a member (or an engine's error, ``dumps_error``) links to as cause and
context cross one by one too, each a stand-in if it must. ``CompositeError`` renders the
remote tracebacks in IPython through ``_render_traceback_``.
"""

from __future__ import annotations

import builtins
import copyreg
import io
import itertools
import pickle
import re
import reprlib
import threading
import traceback as _traceback
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CompositeError",
    "ConfigError",
    "EngineError",
    "EngineStartTimeout",
    "LauncherError",
    "MultiEngineError",
    "NoClusterError",
    "RefusedError",
    "RemoteError",
    "RemoteTraceback",
    "RestartError",
    "TargetsError",
    "TimeoutError",
    "Unpicklable",
    "UnpicklableError",
]

_builtin_timeout = builtins.TimeoutError


class MultiEngineError(Exception):
    """Base class of the errors raised by ipy_multiengine.

    A subclass with context takes it as constructor arguments and gives ``__reduce__`` those
    arguments (through ``_reduced``), so that ``pickle.loads(pickle.dumps(e))`` keeps type,
    message, context and notes.
    """

    def _reduced(self, *args: Any) -> tuple[Any, tuple[Any, ...]]:
        """What ``__reduce__`` returns: rebuilt by its constructor from ``args`` (members that
        hold foreign objects wrapped by ``_carry``), its ``add_note`` notes kept. Inside the
        pickle of one of its own members (a member whose ``__context__`` is this error, which
        tblib's pickling support pickles), a reference to it instead (``_back_reference``)."""
        back = _cycle(self)
        if back is not None:
            return back
        notes = getattr(self, "__notes__", None)
        return (_rebuilt, (type(self), args, list(notes) if notes else None))

    def __copy__(self) -> Any:
        """A shallow copy, holding the same members (``__reduce__`` pickles each on its own)
        and the same explicit cause (a ``RestartError``'s is the group of its engines' errors,
        made by its constructor, which a copy does not call)."""
        new = type(self).__new__(type(self), *self.args)
        new.__dict__.update(self.__dict__)
        new.__cause__ = self.__cause__
        new.__suppress_context__ = self.__suppress_context__
        return new


class Unpicklable:
    """Stands in, after a pickle round trip, for a value an error held that could not make it
    (it does not pickle, or could not be rebuilt where it was loaded): ``type_name`` (with its
    module) and ``text``, its repr (shortened)."""

    def __init__(self, type_name: str, text: str) -> None:
        self.type_name = type_name
        self.text = text

    def __repr__(self) -> str:
        return f"<unpicklable {self.type_name}: {self.text}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unpicklable) and (other.type_name, other.text) == (
            self.type_name,
            self.text,
        )

    def __hash__(self) -> int:
        return hash((self.type_name, self.text))


class UnpicklableError(MultiEngineError):
    """Stands in, after a pickle round trip, for an exception an error held that could not make
    it (it held something that does not pickle, or could not be rebuilt where it was loaded: its
    type missing there, a constructor taking other arguments than its ``args``).

    ``type_name`` is the original type (with its module unless a builtin); ``ename`` and
    ``evalue`` are its own when it had them (an ``EngineError`` subclass says "EngineError"),
    else its type name and message; ``traceback`` its formatted traceback lines; ``engine_id``
    and ``method`` are its own when it had them (so that it fits in a ``CompositeError``'s
    ``elist``, whose message stays the same)."""

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: list[str] | None = None,
        engine_id: int | None = None,
        method: str = "",
        type_name: str | None = None,
    ) -> None:
        super().__init__(ename, evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = list(traceback or [])
        self.engine_id = engine_id
        self.method = method
        self.type_name = type_name or ename

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self._reduced(
            self.ename, self.evalue, self.traceback, self.engine_id, self.method, self.type_name
        )

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue}" if self.evalue else self.ename

    def render_traceback(self) -> list[str]:
        """The original's traceback lines, or a one-line summary when it had none."""
        return self.traceback or [str(self)]

    def _render_traceback_(self) -> list[str]:
        return self.render_traceback()


_PLAIN = frozenset({str, bytes, int, float, bool, type(None)})
_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 200


def _type_name(obj: Any) -> str:
    cls = type(obj)
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return qualname if module in (None, "builtins") else f"{module}.{qualname}"


class _Carried:
    """One member of a pickled error, pickled on its own (``data``; None when it does not
    pickle), with what its stand-in needs should it not load back: an exception's type name,
    message, traceback lines, engine and method, or a value's type name and repr.

    For a pickle of protocol 5 the member's large buffers (NumPy arrays...) are kept apart, as
    ``PickleBuffer``s of the original memory (``buffers``), which the outer pickle writes once
    (or passes out of band): not copied into the member's pickle first, which doubled the
    memory and time of pickling an error holding large results."""

    def __init__(
        self,
        value: Any,
        protocol: int = 4,
        *,
        like: Any = None,
        fallback: Any = None,
        chain: bool = True,
    ) -> None:
        """``like``: what ``value`` stands for, whose stand-in it gets (``value`` itself by
        default); ``fallback``: pickled instead when ``value`` does not pickle; ``chain``: the
        stand-in's traceback lines show the exceptions it was raised from (its links) too."""
        self.data: bytes | None = None
        self.buffers: list[pickle.PickleBuffer] | None = None
        candidates = (value,) if fallback is None else (value, fallback)
        for candidate, dumps in itertools.product(candidates, (_dumps, _cloudpickle_dumps)):
            kept: list[pickle.PickleBuffer] = []  # cloudpickle: lambdas, local classes
            try:
                if protocol >= 5:
                    self.data = dumps(candidate, protocol=5, buffer_callback=_keeper(kept))
                    self.buffers = kept or None
                else:
                    self.data = dumps(candidate, protocol=4)
                break
            except Exception:
                continue
        value = value if like is None else like
        self.type_name = _type_name(value)
        self.exception = isinstance(value, BaseException)
        # an exception's own context, read without trusting it: a ``__getattr__`` may raise
        self.engine_id = _attr(value, "engine_id", None) if self.exception else None
        self.method = _attr(value, "method", "") if self.exception else ""
        try:
            self.text = str(value) if self.exception else _short_repr.repr(value)
        except Exception as exc:  # a broken __str__/__repr__ must not stop the pickling
            self.text = f"(its {'str' if self.exception else 'repr'} failed: {exc!r})"
        # what a CompositeError's message shows of it (``[id:method]: ename: evalue``)
        ename = _attr(value, "ename", None) if self.exception else None
        evalue = _attr(value, "evalue", None) if self.exception else None
        self.ename = ename if isinstance(ename, str) else self.type_name
        self.evalue = evalue if isinstance(evalue, str) else self.text
        self.traceback: list[str] = []
        if self.exception:
            try:
                text = "".join(_formatted(value, chain)).rstrip("\n")
                self.traceback = text.splitlines()
            except Exception:
                self.traceback = []

    def load(self) -> Any:
        """The member itself, or its stand-in when it did not pickle or does not load here."""
        if self.data is not None:
            try:
                return pickle.loads(self.data, buffers=self.buffers or ())
            except Exception:
                pass
        if self.exception:
            method = self.method if isinstance(self.method, str) else ""
            eid = self.engine_id if isinstance(self.engine_id, int) else None
            return UnpicklableError(
                self.ename, self.evalue, self.traceback, eid, method, self.type_name
            )
        return Unpicklable(self.type_name, self.text)


def _formatted(exc: BaseException, chain: bool) -> list[str]:
    """``exc``'s traceback as ``traceback.format_exception`` writes it; without ``chain``,
    never looking at the exceptions it links to (that walks all of a long chain)."""
    if chain:
        return _traceback.format_exception(exc)
    tb = exc.__traceback__
    head = ["Traceback (most recent call last):\n", *_traceback.format_tb(tb)] if tb else []
    name = type(exc).__qualname__
    if type(exc).__module__ not in ("__main__", "builtins"):
        name = f"{type(exc).__module__}.{name}"
    try:
        text = str(exc)
    except Exception:
        text = "<exception str() failed>"
    notes = getattr(exc, "__notes__", None)
    notes = notes if isinstance(notes, list) else []
    more = [f"{note}\n" for note in notes if isinstance(note, str)]
    return [*head, f"{name}: {text}\n" if text else f"{name}\n", *more]


def _attr(obj: Any, name: str, default: Any) -> Any:
    """``getattr(obj, name, default)``, also when its ``__getattr__`` raises something else
    than AttributeError (a proxy to an object that is gone)."""
    try:
        return getattr(obj, name, default)
    except Exception:
        return default


def _dumps(value: Any, protocol: int, buffer_callback: Any = None) -> bytes:
    """``pickle.dumps``, each exception's links (cause, context) apart (``_LinkSafe``)."""
    out = io.BytesIO()
    _LinkSafePickler(out, protocol, buffer_callback=buffer_callback).dump(value)
    return out.getvalue()


def _cloudpickle_dumps(value: Any, protocol: int, buffer_callback: Any = None) -> bytes:
    """``cloudpickle.dumps``, each exception's links apart (``_LinkSafe``)."""
    import cloudpickle

    global _LinkSafeCloudPickler
    if _LinkSafeCloudPickler is None:
        _LinkSafeCloudPickler = type(
            "_LinkSafeCloudPickler", (_LinkSafe, cloudpickle.Pickler), {"__module__": __name__}
        )
    out = io.BytesIO()
    _LinkSafeCloudPickler(out, protocol, buffer_callback=buffer_callback).dump(value)
    return out.getvalue()


def dumps_error(exc: BaseException, protocol: int = 5) -> bytes:
    """The pickle of ``exc`` (an engine's error for its client): where a reducer pickles the
    links of exceptions (tblib's pickling support, which distributed installs), each link
    crosses on its own, and one that does not pickle (or not load back) arrives as an
    ``UnpicklableError`` naming its type, not failing the whole error. Raises what pickling
    ``exc`` itself raises when that fails."""
    try:
        data = _dumps(exc, protocol)
        pickle.loads(data)
        return data
    except Exception:
        data = _cloudpickle_dumps(exc, protocol)
        pickle.loads(data)
        return data


class _LinkSafe:
    """A pickler mixin: an exception that the pickler's reducer (tblib's) pickles with its
    ``__cause__`` and ``__context__`` is pickled with the exceptions it links to, each on its
    own (``_Carried``) and linked again by index when loaded (``_relinked``), so that one that
    does not pickle becomes its stand-in, an ``UnpicklableError`` naming its type and message,
    and the rest arrives. A chain of any length pickles (one after the other, not nested: tblib
    pickled each link inside the one before until the recursion limit). Any other object is
    pickled as the base pickler does."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException):
            if id(obj) in _linking():  # inside its own pickle (it holds itself): a stand-in
                return (UnpicklableError, _stand_in_args(obj))
            reduced = _linked_reduction(obj, self)  # a group too: its traceback and links
            if reduced is not None:
                return reduced
            if isinstance(obj, BaseExceptionGroup) and type(obj) in _GROUPS:
                return _group_reduction(obj, getattr(self, "proto", 4))
        base = getattr(super(), "reducer_override", None)
        return NotImplemented if base is None else base(obj)


#: the groups Python makes (a subclass may take other arguments): pickled member by member
_GROUPS = (BaseExceptionGroup, ExceptionGroup)


def _group_reduction(group: BaseExceptionGroup, protocol: int) -> tuple[Any, ...]:
    """``group`` (an exception group of Python's own) with each of its exceptions pickled on its
    own: one that does not pickle (an asyncio ``TaskGroup``'s task error holding a lock) failed
    the whole group, which then arrived as nothing the client can ``except*``."""
    notes = getattr(group, "__notes__", None)
    members = [_Carried(e, protocol) for e in group.exceptions]
    return (_regrouped, (group.message, members, list(notes) if isinstance(notes, list) else None))


class _CarriedList:
    """Pickles as the list of ``members`` loaded, each on its own (its stand-in if it must):
    the exceptions of a group that tblib pickles with its traceback and links."""

    def __init__(self, members: list[_Carried]) -> None:
        self.members = members

    def __reduce__(self) -> tuple[Any, ...]:
        return (_loaded, (self.members,))


def _loaded(members: list[_Carried]) -> list[Any]:
    """(unpickling) ``_CarriedList``'s members."""
    return [m.load() for m in members]


def _regrouped(message: str, members: list[_Carried], notes: list[str] | None) -> Any:
    """(unpickling) The group of ``_group_reduction`` (an ``ExceptionGroup`` when each of its
    exceptions, or their stand-ins, is an ``Exception``)."""
    group = BaseExceptionGroup(message, [m.load() for m in members])
    if notes:
        group.__notes__ = list(notes)
    return group


class _LinkSafePickler(_LinkSafe, pickle.Pickler):
    """``pickle.Pickler`` with ``_LinkSafe``."""


_LinkSafeCloudPickler: Any = None

#: tblib's loaders: their arguments are (func, args, cause, tb, context, suppress, notes, ...)
_TBLIB_LOADERS = frozenset({"unpickle_exception", "unpickle_exception_with_attrs"})


def _tblib_reduction(exc: BaseException, pickler: Any) -> tuple[Any, ...] | None:
    """The pickler's reducer's reduction of ``exc`` when it is tblib's (links included)."""
    table = getattr(pickler, "dispatch_table", None) or copyreg.dispatch_table
    reduce = table.get(type(exc))
    if reduce is None:
        return None
    reduced: Any = reduce(exc)
    func = reduced[0] if isinstance(reduced, tuple) and len(reduced) >= 2 else None
    if (
        getattr(func, "__module__", None) == "tblib.pickling_support"
        and getattr(func, "__name__", None) in _TBLIB_LOADERS
        and isinstance(reduced[1], tuple)
        and len(reduced[1]) >= 6
    ):
        return tuple(reduced)
    return None


def _linking() -> set[int]:
    """The ids of the exceptions whose own pickles ``_linked_reduction`` is making."""
    ids: set[int] | None = getattr(_nesting, "linking", None)
    if ids is None:
        ids = _nesting.linking = set()
    return ids


def _stand_in_args(exc: BaseException) -> tuple[Any, ...]:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return (_type_name(exc), text, [], None, "", _type_name(exc))


class _Reduced:
    """Pickles as ``reduction``: an exception's, its links taken out."""

    def __init__(self, reduction: tuple[Any, ...]) -> None:
        self.reduction = reduction

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduction


def _linked_reduction(root: BaseException, pickler: Any) -> tuple[Any, ...] | None:
    """``root`` and the exceptions its links reach (while tblib pickles them with links) as
    ``(_relinked, (members, links))``; None when the pickler does not pickle its links."""
    first = _tblib_reduction(root, pickler)
    if first is None:
        return None
    protocol = getattr(pickler, "proto", 4)
    nodes: list[BaseException] = [root]
    index = {id(root): 0}
    members: list[_Carried] = []
    links: list[tuple[int | None, int | None, bool] | None] = []
    reduced: tuple[Any, ...] | None = first
    busy = _linking()
    try:
        while len(members) < len(nodes):
            _reduce_node(nodes, index, members, links, reduced, pickler, protocol, busy)
            reduced = None
    finally:
        busy.difference_update(index)  # the ids of its nodes
    return (_relinked, (members, links))


def _reduce_node(
    nodes: list[BaseException],
    index: dict[int, int],
    members: list[_Carried],
    links: list[tuple[int | None, int | None, bool] | None],
    reduced: tuple[Any, ...] | None,
    pickler: Any,
    protocol: int,
    busy: set[int],
) -> None:
    """(``_linked_reduction``) The next node pickled on its own (``reduced``: tblib's reduction
    of it, when already made), the exceptions it links to added as nodes."""
    exc = nodes[len(members)]
    if reduced is None:
        try:
            reduced = _tblib_reduction(exc, pickler)
        except Exception:  # its __reduce__ raised: its stand-in
            busy.add(id(exc))
    if reduced is None:  # pickled without its links, as the pickler would
        members.append(_Carried(exc, protocol, chain=False))
        links.append(None)
        return
    busy.add(id(exc))
    func, args, *rest = reduced
    if type(exc) in _GROUPS and isinstance(args[1], tuple) and len(args[1]) == 2:
        # a group of Python's own: its exceptions each on their own (``_group_reduction``),
        # its traceback and links as any node's
        message, grouped = args[1]
        carried = _CarriedList([_Carried(e, protocol) for e in grouped])
        args = (args[0], (message, carried), *args[2:])
    at: list[int | None] = []
    for link in (args[2], args[4]):
        if not isinstance(link, BaseException):
            at.append(None)
            continue
        if id(link) not in index:
            index[id(link)] = len(nodes)
            nodes.append(link)
        at.append(index[id(link)])
    cut = (func, (*args[:2], None, args[3], None, *args[5:]), *rest)
    bare = (func, (*args[:2], None, None, None, *args[5:]), *rest)  # its traceback too
    members.append(
        _Carried(_Reduced(cut), protocol, like=exc, fallback=_Reduced(bare), chain=False)
    )
    links.append((at[0], at[1], bool(args[5])))


def _relinked(
    members: list[_Carried], links: list[tuple[int | None, int | None, bool] | None]
) -> BaseException:
    """(unpickling) The exceptions of ``_linked_reduction`` (or their stand-ins), linked again;
    the first of them."""
    loaded = [m.load() for m in members]
    for exc, link in zip(loaded, links, strict=True):
        if link is None or not isinstance(exc, BaseException):
            continue
        cause, context, suppress = link
        if cause is not None and isinstance(loaded[cause], BaseException):
            exc.__cause__ = loaded[cause]
        if context is not None and isinstance(loaded[context], BaseException):
            exc.__context__ = loaded[context]
        exc.__suppress_context__ = suppress
    root: BaseException = loaded[0]
    return root


def _keeper(kept: list[pickle.PickleBuffer]) -> Any:
    """A ``buffer_callback`` keeping the contiguous buffers apart (in ``kept``); any other is
    written into the pickle itself (a pickle cannot take it out of band)."""

    def keep(buf: pickle.PickleBuffer) -> bool:
        try:
            buf.raw()
        except BufferError:
            return True
        kept.append(buf)
        return False

    return keep


class _Member:
    """A member of ``owner`` (an error being pickled), pickled on its own when the pickle that
    ``owner.__reduce__`` started gets to it (``_Carried``), with ``owner`` marked as being
    pickled meanwhile: a reference back to it from inside the member's own pickle (its
    ``__context__``, under tblib's pickling support) becomes a ``_back_reference``, not another
    copy of ``owner`` in each nested pickle until the recursion limit."""

    def __init__(self, value: Any, owner: BaseException) -> None:
        self.value = value
        self.owner = owner

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any, ...]]:
        stack = _pickling()
        stack.append(self.owner)
        try:
            return (_as_is, (_Carried(self.value, protocol),))
        finally:
            stack.pop()

    def load(self) -> Any:
        return self.value  # never pickled (a ``copy.deepcopy`` goes through ``__reduce_ex__``)


def _as_is(carried: _Carried) -> _Carried:
    return carried


def _carry(value: Any, owner: BaseException) -> Any:
    """``value``, a member of ``owner``, as an argument of ``owner.__reduce__``: plain values as
    they are, anything else pickled on its own, so that one that does not make it becomes a
    stand-in (``Unpicklable``/``UnpicklableError``) instead of failing the whole error."""
    return value if type(value) in _PLAIN else _Member(value, owner)


def _carry_record(value: Any, owner: BaseException) -> Any:
    """``_carry`` for a result record (a dict): value by value, so that one that does not make
    it leaves the others (``stdout``, ``outputs``) intact."""
    if type(value) is dict:
        return {k: _carry(v, owner) for k, v in value.items()}
    return _carry(value, owner)


def _load(arg: Any) -> Any:
    return arg.load() if isinstance(arg, (_Carried, _Member)) else arg


def _unwrap(arg: Any) -> Any:
    if type(arg) is list:
        return [_load(a) for a in arg]
    if type(arg) is dict:
        return {k: _load(v) for k, v in arg.items()}
    return _load(arg)


# The errors whose members are being pickled (each on its own, nested in the error's pickle),
# and, loading, the slots of the errors whose members are being loaded: a member's pickle that
# refers back to one of them refers to it by how many levels up it is (``_back_reference``).
_nesting = threading.local()


def _pickling() -> list[BaseException]:
    stack: list[BaseException] | None = getattr(_nesting, "pickling", None)
    if stack is None:
        stack = _nesting.pickling = []
    return stack


def _loading() -> list[BaseException | None]:
    stack: list[BaseException | None] | None = getattr(_nesting, "loading", None)
    if stack is None:
        stack = _nesting.loading = []
    return stack


def _cycle(err: BaseException) -> tuple[Any, tuple[Any, ...]] | None:
    """``err``'s reduction as a reference back to it when the pickle of one of its members is
    under way (a cycle: the member refers to ``err``), else None."""
    stack = _pickling()
    for up, owner in enumerate(reversed(stack)):
        if owner is err:
            try:
                text = str(err)
            except Exception:
                text = ""
            return (_back_reference, (up, type(err).__name__, text, _type_name(err)))
    return None


def _back_reference(up: int, ename: str, evalue: str, type_name: str) -> BaseException:
    """(unpickling, inside the load of a member) The error ``up`` levels up, whose members are
    being loaded: a stand-in now, replaced by the error itself once it is built (``_rebuilt``);
    it stays a stand-in naming it when loaded outside it (a member's pickle loaded alone)."""
    stack = _loading()
    if up >= len(stack):
        return UnpicklableError(ename, evalue, type_name=type_name)
    i = len(stack) - 1 - up
    slot = stack[i]
    if slot is None:
        slot = stack[i] = UnpicklableError(ename, evalue, type_name=type_name)
    return slot


def _put_back(err: BaseException, stand_in: BaseException) -> None:
    """Replace ``stand_in`` by ``err`` wherever the members of ``err`` (and their causes,
    contexts, groups and members, in lists and dicts) hold it."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, BaseException):
            for name in ("__cause__", "__context__"):
                link = getattr(obj, name)
                if link is stand_in:
                    setattr(obj, name, err)
                elif link is not None:
                    todo.append(link)
            if isinstance(obj, BaseExceptionGroup):
                todo.extend(obj.exceptions)
            todo.extend(v for v in vars(obj).values() if isinstance(v, (BaseException, list, dict)))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                if v is stand_in:
                    obj[i] = err
                elif isinstance(v, (BaseException, list, dict)):
                    todo.append(v)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if v is stand_in:
                    obj[k] = err
                elif isinstance(v, (BaseException, list, dict)):
                    todo.append(v)


def _loaded_args(args: tuple[Any, ...]) -> tuple[list[Any], BaseException | None]:
    """``args`` with their carried members loaded, and the stand-in that references back to
    the error they belong to became meanwhile (None when none did)."""
    stack = _loading()
    stack.append(None)
    try:
        return [_unwrap(a) for a in args], stack[-1]
    finally:
        stack.pop()


def _rebuilt(cls: type, args: tuple[Any, ...], notes: list[str] | None = None) -> Any:
    """(unpickling) An error of type ``cls`` from its constructor ``args`` (carried members
    loaded, or their stand-ins), with its notes."""
    loaded, stand_in = _loaded_args(args)
    err = cls(*loaded)
    if notes:
        err.__notes__ = list(notes)
    if stand_in is not None:
        _put_back(err, stand_in)
    return err


class TimeoutError(MultiEngineError, _builtin_timeout):
    """A blocking call did not finish within its ``timeout``; the result can still be collected."""


class NoClusterError(MultiEngineError):
    """There is no running cluster to connect to."""


class ConfigError(MultiEngineError, ValueError):
    """A configuration value that is not allowed; ``option`` names it (``Cluster.n``)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self._reduced(self.args[0], self.option)


class TargetsError(MultiEngineError, ValueError):
    """A targets specification that names no engine or cannot be parsed."""


class RemoteError(MultiEngineError):
    """An exception raised on one engine.

    ``ename``/``evalue`` are the remote type name and message, ``traceback`` the remote
    traceback lines (possibly with ANSI colours), ``engine_id`` and ``method`` say where.
    """

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: list[str] | None = None,
        engine_id: int | None = None,
        method: str = "execute",
        pickled: bytes | None = None,
        result: Any = None,
        item: int | None = None,
    ) -> None:
        super().__init__(ename, evalue)
        #: the index of the failing item of a ``map``/``apply`` over items, when one failed
        self.item = item
        self.ename = ename
        self.evalue = evalue
        self.traceback = list(traceback or [])
        self.engine_id = engine_id
        self.method = method
        self.pickled = pickled
        self.result = result

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self._reduced(
            self.ename,
            self.evalue,
            self.traceback,
            self.engine_id,
            self.method,
            self.pickled,
            _carry_record(self.result, self),
            self.item,
        )

    def for_engine(self, engine_id: int) -> RemoteError:
        """This error with ``engine_id`` set (a copy: context is given at construction)."""
        return type(self)(
            self.ename,
            self.evalue,
            self.traceback,
            engine_id,
            self.method,
            self.pickled,
            self.result,
            self.item,
        )

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue}" if self.evalue else self.ename

    def original(self) -> BaseException | None:
        """Rebuild the original exception locally, or None if that is not possible."""
        if self.pickled is not None:
            try:
                exc = pickle.loads(self.pickled)
            except Exception:  # the type may not exist here
                exc = None
            if isinstance(exc, BaseException):
                return exc
        cls = getattr(builtins, self.ename, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            try:
                return cls(self.evalue)
            except Exception:
                return None
        return None

    def render_traceback(self) -> list[str]:
        """The remote traceback lines, or a one-line summary when there are none."""
        return self.traceback or [str(self)]

    def _render_traceback_(self) -> list[str]:
        label = f"[{self.engine_id}:{self.method}]: " if self.engine_id is not None else ""
        return [label + "Remote traceback:", *self.render_traceback()]

    def plain_traceback(self) -> str:
        """The remote traceback as plain text (its ANSI colours removed); '' when there is none."""
        text = "".join(line if line.endswith("\n") else line + "\n" for line in self.traceback)
        return _ANSI.sub("", text).rstrip("\n")


#: an ANSI escape sequence (the colours of IPython's tracebacks)
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


class RemoteTraceback(RemoteError):
    """A ``RemoteError`` whose message includes the remote traceback as plain text.

    What the standard interfaces (``mec.executor()``, and so joblib) and
    ``CompositeError.raise_exception`` chain a rebuilt exception to, or raise when it cannot be
    rebuilt: a traceback printed outside IPython then
    shows where on the engine it was raised, as a process pool's remote traceback does (a plain
    ``RemoteError`` prints one line; IPython renders its ``_render_traceback_``)."""

    @classmethod
    def of(cls, exc: RemoteError) -> RemoteTraceback:
        """``exc`` with the message that shows its traceback (itself if it has it already)."""
        if isinstance(exc, RemoteTraceback):
            return exc
        new = cls.__new__(cls, *exc.args)
        new.__dict__.update(exc.__dict__)  # every member, and its notes
        for name in ("__notes__", "traceback"):  # lists of its own: a note added to one of
            if isinstance(getattr(exc, name, None), list):  # the two showed on the other
                setattr(new, name, list(getattr(exc, name)))
        return new

    def __str__(self) -> str:
        head = super().__str__()
        text = self.plain_traceback()
        if not text:
            return head
        where = f"engine {self.engine_id}" if self.engine_id is not None else "the engine"
        return f"{head}\n\nRemote traceback ({where}):\n{text}"


class EngineError(MultiEngineError):
    """An engine died, was stopped or could not be reached.

    ``result``: what the engine had sent for the request before it died (its ``stdout``,
    ``stderr`` and ``outputs``: an execute's result record), when one was running."""

    def __init__(
        self,
        message: str,
        engine_id: int | None = None,
        method: str = "execute",
        result: Any = None,
    ) -> None:
        super().__init__(message)
        self.engine_id = engine_id
        self.method = method
        self.ename = "EngineError"
        self.evalue = message
        self.result = result

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self.result is None:  # the constructor of a subclass may take no result
            return self._reduced(self.args[0], self.engine_id, self.method)
        return self._reduced(
            self.args[0], self.engine_id, self.method, _carry_record(self.result, self)
        )

    def for_engine(self, engine_id: int) -> EngineError:
        """This error with ``engine_id`` set (a copy: context is given at construction)."""
        if self.result is None:
            return type(self)(self.args[0], engine_id, self.method)
        return type(self)(self.args[0], engine_id, self.method, self.result)

    def render_traceback(self) -> list[str]:
        return [f"EngineError: {self.args[0]}"]


class RefusedError(EngineError):
    """A data operation's message did not check (its buffers against their signed digest, or
    its signature) and was refused unread, most likely changed on the way: a refused request
    ran nowhere (the engine refused it), a refused reply's operation did run (this client
    refused the reply). Never retried: a load-balanced map fails naming the engine."""


class _Members(BaseExceptionGroup):
    """The group of a ``RestartError``'s engines' errors (its ``__cause__``), pickled member by
    member as the error's ``errors`` are: tblib's pickling support (distributed installs it)
    pickles an exception's cause as it is, and one unpicklable member failed the whole error.

    Otherwise the group Python would make: of exceptions only, an ``ExceptionGroup``
    (``except Exception`` catches it), and a printed traceback names it as Python's own (its
    pickle names ``_rebuilt_members``, never the class)."""

    def __new__(cls, message: str, exceptions: Sequence[BaseException]) -> _Members:
        if cls is _Members and all(isinstance(e, Exception) for e in exceptions):
            cls = _ExceptionMembers
        return super().__new__(cls, message, exceptions)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        back = _cycle(self)
        if back is not None:
            return back
        return (_rebuilt_members, (self.message, [_carry(e, self) for e in self.exceptions]))


class _ExceptionMembers(_Members, ExceptionGroup):
    """A ``_Members`` of exceptions only."""


for _cls, _shown in ((_Members, "BaseExceptionGroup"), (_ExceptionMembers, "ExceptionGroup")):
    _cls.__module__ = "builtins"  # as a traceback and repr() print it
    _cls.__name__ = _cls.__qualname__ = _shown
del _cls, _shown


def _rebuilt_members(message: str, members: list[Any]) -> _Members:
    loaded, stand_in = _loaded_args((members,))
    group = _Members(message, loaded[0])
    if stand_in is not None:
        _put_back(group, stand_in)
    return group


class RestartError(EngineError):
    """The restart of several engines failed on more than one of them.

    ``errors`` maps each engine id that did not come back to its own exception, traceback
    included (``engine_id`` is the first of them); the message names each, and ``__cause__``
    is a ``BaseExceptionGroup`` of them all, so that a printed traceback shows every one."""

    def __init__(self, message: str, errors: Mapping[int, BaseException]) -> None:
        super().__init__(message, next(iter(errors), None), "restart")
        self.errors: dict[int, BaseException] = dict(errors)
        if self.errors:  # also once unpickled (``raise ... from`` sets it only where raised)
            self.__cause__ = _Members(
                f"the restart of each of engines {list(self.errors)}", list(self.errors.values())
            )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self._reduced(self.args[0], {eid: _carry(e, self) for eid, e in self.errors.items()})

    def for_engine(self, engine_id: int) -> EngineError:
        """That engine's own error (an ``EngineError`` of its message when it is another type)."""
        own = self.errors.get(engine_id)
        if isinstance(own, EngineError):
            return own
        if isinstance(own, UnpicklableError):  # its message names the original type
            text = str(own)
        else:
            text = f"{type(own).__name__}: {own}" if own is not None else self.args[0]
        return EngineError(text, engine_id, "restart")

    def render_traceback(self) -> list[str]:
        lines = [f"RestartError: {self.args[0]}"]
        for eid, exc in self.errors.items():
            lines.append(f"[{eid}:restart]: ")
            if isinstance(exc, UnpicklableError):  # the original's lines, not the stand-in's
                lines.extend(exc.render_traceback())
                continue
            lines.extend("".join(_traceback.format_exception(exc)).rstrip("\n").splitlines())
        return lines

    def _render_traceback_(self) -> list[str]:
        return self.render_traceback()


class LauncherError(EngineError):
    """A launcher could not start, reach, restart or stop its engines.

    ``engine_id`` names the engine when one engine is at fault.
    """

    def __init__(self, message: str, engine_id: int | None = None, method: str = "start") -> None:
        super().__init__(message, engine_id, method)


class EngineStartTimeout(LauncherError, TimeoutError):
    """Some engines never reported within the startup timeout (``missing`` lists them)."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message, missing[0] if len(missing) == 1 else None)
        self.missing = list(missing)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self._reduced(self.args[0], self.missing)

    def for_engine(self, engine_id: int) -> EngineStartTimeout:
        """Itself: its engine is the one of ``missing`` (when only one is)."""
        return self


#: what ``CompositeError.elist`` holds: one per failing engine (a stand-in, after a pickle
#: round trip, for one that did not make it)
EngineFailure = RemoteError | EngineError | UnpicklableError


def _first_line(text: Any) -> str:
    """A message's first non-blank line, and how many non-blank ones follow: in a rendered
    header a line per engine stays one line (a dead engine's message ends with up to 20 lines
    its process wrote, shown again by its own traceback below). Any line break counts
    (``\\r\\n``: a ``\\r`` left in would send the terminal's cursor back over the line), and
    leading blank lines are skipped (numpy.testing's messages start with one)."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    first, more = lines[0], len(lines) - 1
    return f"{first} (+{more} more line{'s' if more != 1 else ''} below)" if more else first


class CompositeError(MultiEngineError):
    """One or more engines raised during one call.

    ``elist`` holds one ``RemoteError``/``EngineError`` per failing engine (in target order),
    ``results`` the per-engine results of the engines that succeeded (``None`` where one failed).
    """

    def __init__(
        self,
        method: str,
        elist: list[EngineFailure],
        results: list[Any] | None = None,
        collapse: bool = False,
    ) -> None:
        self.method = method
        self.elist = list(elist)
        self.results = list(results) if results is not None else []
        #: show engines with identical tracebacks once (``[0-3:execute]``)
        self.collapse = collapse
        super().__init__(self._message())

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self._reduced(
            self.method,
            [_carry(e, self) for e in self.elist],
            [_carry(r, self) for r in self.results],
            self.collapse,
        )

    def collapsed(self) -> CompositeError:
        """This error, showing identical tracebacks once (a copy: context is given at
        construction)."""
        return type(self)(self.method, self.elist, self.results, collapse=True)

    def _message(self, short: bool = False) -> str:
        """The header: a line per failing engine; ``short``: each message's first line only
        (when each engine's traceback, with all of it, follows)."""
        lines = [f"one or more exceptions from call to method: {self.method}"]
        for e in self.elist:
            evalue = _first_line(e.evalue) if short else e.evalue
            lines.append(f"[{e.engine_id}:{e.method}]: {e.ename}: {evalue}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._message()

    def __getitem__(self, i: int) -> EngineFailure:
        return self.elist[i]

    def __len__(self) -> int:
        return len(self.elist)

    def _tracebacks(self, excid: int | None = None) -> list[str]:
        chosen = self.elist if excid is None else [self._pick(excid)]
        groups: list[tuple[list[Any], EngineFailure]] = []
        seen: dict[tuple[Any, ...], int] = {}
        for e in chosen:
            key = (
                e.method,
                e.ename,
                e.evalue,
                tuple(_EXEC_COUNT.sub("In[]", t) for t in e.render_traceback()),
            )
            if self.collapse and key in seen:
                groups[seen[key]][0].append(e.engine_id)
                continue
            seen[key] = len(groups)
            groups.append(([e.engine_id], e))
        lines: list[str] = []
        for ids, e in groups:
            lines.append(f"[{_id_range(ids)}:{e.method}]: ")
            lines.append(_whose(ids, e))
            lines.extend(e.render_traceback())
            lines.append("")
        return lines

    def _pick(self, excid: int) -> EngineFailure:
        try:
            return self.elist[excid]
        except IndexError:
            raise IndexError(
                f"an exception with index {excid} does not exist (there are {len(self.elist)})"
            ) from None

    def print_tracebacks(self, excid: int | None = None) -> None:
        """Print the remote traceback of one failing engine (by index in ``elist``) or of all."""
        print("\n".join(self._tracebacks(excid)))

    def raise_exception(self, excid: int = 0) -> None:
        """Re-raise exception ``excid`` as its original type when it can be rebuilt locally,
        chained to a ``RemoteTraceback`` (a printed traceback, also in a script, shows where the
        engine raised); otherwise that ``RemoteTraceback`` itself (a ``RemoteError``)."""
        err = self._pick(excid)
        if isinstance(err, RemoteError):
            remote = RemoteTraceback.of(err)
            original = remote.original()
            if original is not None:
                raise original from remote
            raise remote
        raise err

    def _render_traceback_(self) -> list[str]:
        head = f"CompositeError: {self._message(short=True)}"
        return [head, "", *self._tracebacks()]


_EXEC_COUNT = re.compile(r"In ?\[\d+\]")


def _whose(ids: list[Any], e: EngineFailure) -> str:
    """Which engine's input a traceback below refers to (its ``In [n]`` is that engine's, not
    this session's), and the engines that raised the same error."""
    record = getattr(e, "result", None)
    number = record.get("number") if isinstance(record, dict) else None
    what = (
        f"engine {e.engine_id}'s In [{number}]" if number is not None else f"engine {e.engine_id}"
    )
    if len(ids) > 1:
        others = _id_range([i for i in ids if i != e.engine_id])
        plural = "s" if len(ids) > 2 else ""
        return f"(the traceback of {what}; the same error on engine{plural} {others})"
    return f"(the traceback of {what})"


def _id_range(ids: list[Any]) -> str:
    """``[0, 1, 2, 3]`` -> ``'0-3'``; ``[0, 2]`` -> ``'0,2'``; a single id as itself."""
    if len(ids) == 1 or not all(isinstance(i, int) for i in ids):
        return ",".join(str(i) for i in ids)
    ids = sorted(ids)
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            parts.append(str(ids[start]) if i - 1 == start else f"{ids[start]}-{ids[i - 1]}")
            start = i
    return ",".join(parts)
