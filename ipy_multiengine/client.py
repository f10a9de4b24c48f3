"""``MultiEngineClient``: the synchronous facade users (and the magics) talk to.

It checks arguments before anything is sent, turns each call into one request per target
engine on the controller, and either waits (``block=True``) or returns a ``PendingResult``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from traitlets import Any as AnyTrait
from traitlets import Bool, Float, Integer, TraitError, validate
from traitlets.config import Config, Configurable

from . import _loop, partition, serialize, stdin, wire
from ._loop import check_timeout
from .controller import HEARTBEAT_PERIOD, CommReply, Controller, Listener
from .errors import (  # noqa: F401  (re-exported: `from ipy_multiengine.client import CompositeError`)
    CompositeError,
    ConfigError,
    EngineError,
    MultiEngineError,
    NoClusterError,
    RemoteError,
    TimeoutError,
)
from .render import ProgressBar, bars_cleared, interrupt_after
from .results import PendingResult, ResultList, Tally, nbytes, wait_sent
from .targets import resolve as resolve_targets

# a prompt from an engine clears this client's progress bars first (stdin knows no rendering)
stdin.set_prompt_guard(bars_cleared)

if TYPE_CHECKING:
    from .balanced import BalancedMap
    from .executor import EngineExecutor
    from .remote import SyncImports
    from .render import LiveOutput

__all__ = [
    "CompositeError",
    "EngineError",
    "MultiEngineClient",
    "PendingResult",
    "RemoteError",
    "ResultList",
    "Targets",
    "TimeoutError",
    "deactivate",
    "get_active",
]

Targets = "str | int | Sequence[int] | None"

_active: MultiEngineClient | None = None
log = logging.getLogger("ipy_multiengine")

#: Seconds a blocking call that failed or timed out still waits for its sends to leave.
SEND_GRACE = 0.25


class _Configured:
    """The default of an argument that is not given: the configured trait applies."""

    def __repr__(self) -> str:
        return "<configured>"


#: ``Cluster(n=CONFIGURED)``, ``MultiEngineClient(timeout=CONFIGURED)``: the argument is not given,
#: its value comes from the config (ipython_config.py), else the trait's default
CONFIGURED: Any = _Configured()


def shell_config() -> Config | None:
    """The config of the running IPython shell (its profile's ``ipython_config.py`` and
    ``%config`` lines merged in), or None outside IPython: what ``Cluster`` and
    ``MultiEngineClient`` are configured from when no ``config=`` is given."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    ip = get_ipython()
    return None if ip is None else ip.config


def config_error(cls: type[Configurable], exc: BaseException) -> ConfigError:
    """A ``TraitError`` (or a validator's error) as a ``ConfigError`` naming ``Class.option``."""
    text = str(exc)
    name = next(
        (
            t
            for t in cls.class_trait_names(config=True)
            if f"'{t}' trait" in text or text.startswith(f"{t} ")
        ),
        None,
    )
    option = f"{cls.__name__}.{name}" if name else cls.__name__
    return ConfigError(f"{option}: {text}", option)


def get_active() -> MultiEngineClient | None:
    """The client of the last ``activate()`` (the one the magics use), if still open."""
    return _active if _active is not None and not _active.closed else None


def deactivate(suffix: str = "") -> None:
    """Forget the active client (the magics then connect a client of their own); it stays open.
    With a ``suffix``: remove that named magic set (``%px_even``...) from the running IPython."""
    global _active
    if not suffix:
        _active = None
        return
    ip = _ipython()
    if ip is not None:
        for hook in activation_hooks:
            hook(ip, suffix, None, None)


#: called as ``hook(shell, suffix, client or None, targets)`` by ``activate(suffix=...)`` and
#: ``deactivate(suffix)``: the magics module registers itself here (the client never imports it)
activation_hooks: list[Callable[[Any, str, Any, Any], None]] = []


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


class MultiEngineClient(Configurable):
    """Drive a set of engines: ``execute``, ``push``/``pull``, ``scatter``/``gather``, ``map``...

    ``MultiEngineClient()`` connects to the running cluster of the ``default`` profile,
    ``MultiEngineClient(path)`` to the cluster file at ``path``, ``MultiEngineClient(profile=P)``
    to profile ``P``'s. ``block`` and ``targets`` are the defaults of every call.

    Engines on this host are watched by polling their process (a death is noticed within
    0.5 s); others by heartbeats every ``heartbeat/3`` s, declared dead after ``heartbeat``
    seconds of silence (``None`` turns heartbeats off). ``timeout`` bounds connecting;
    ``max_message_size`` (bytes, default unlimited) refuses larger replies with an ``EngineError``.

    These tunables are configurable traits (``c.MultiEngineClient.progress_after = 5`` in
    ``ipython_config.py``; inside IPython the shell's config applies unless ``config=`` is given).
    """

    block = AnyTrait(
        True,
        help="Default of every call's block= (and of the magics): wait for the "
        "engines (True) or return a PendingResult (False).",
    ).tag(config=True)
    targets = AnyTrait(
        "all",
        help="Default of every call's targets= (and of the magics): 'all', a group "
        "name, an engine id or a list of ids.",
    ).tag(config=True)
    progress_after = Float(
        2.0,
        allow_none=True,
        min=0.0,
        help="Seconds a blocking map/gather/barrier runs before a progress bar appears; "
        "None: never.",
    ).tag(config=True)
    return_before_send = Bool(
        False,
        help="Experts only: non-blocking push/scatter/apply/map send your "
        "objects' memory as it is (no copy) and return while zmq still "
        "reads it; call pr.wait_for_send() before changing them.",
    ).tag(config=True)
    timeout = Float(
        60.0,
        min=0.0,
        help="Seconds connecting to each engine may take (clients that "
        "connect through a cluster file).",
    ).tag(config=True)
    heartbeat = Float(
        HEARTBEAT_PERIOD,
        allow_none=True,
        help="Seconds of silence after which an engine without a local process to poll is "
        "declared dead (beats every third of it); None: no heartbeats. For clients "
        "that connect through a cluster file.",
    ).tag(config=True)
    max_message_size = Integer(
        None,
        allow_none=True,
        min=1,
        help="Bytes; larger replies are refused with an EngineError; None: unlimited.",
    ).tag(config=True)

    @validate("block")
    def _check_block(self, proposal: Any) -> bool:
        if not isinstance(proposal["value"], bool):
            raise TypeError(f"block must be True or False, not {proposal['value']!r}")
        return proposal["value"]

    @validate("targets")
    def _check_targets(self, proposal: Any) -> Any:
        value = proposal["value"]
        if "_controller" in self.__dict__:  # validate now, not at the next call
            self._resolve_targets(value)
        return list(value) if isinstance(value, (list, tuple, range)) else value

    def __init__(
        self,
        cluster_file: str | os.PathLike | None = None,
        profile: str | None = None,
        *,
        timeout: float = CONFIGURED,
        heartbeat: float | None = CONFIGURED,
        max_message_size: int | None = CONFIGURED,
        config: Config | None = None,
    ) -> None:
        self._configure(
            config, timeout=timeout, heartbeat=heartbeat, max_message_size=max_message_size
        )
        from .clusterfile import (
            FileOwner,
            engines_of,
            liveness_probes,
            read_cluster,
            resolve_cluster_file,
        )

        path = resolve_cluster_file(cluster_file, profile)
        spec = read_cluster(path)
        wire.check_keys(engines_of(spec), f"cluster file {path}")
        controller = Controller(
            engines_of(spec),
            liveness_probes(spec),
            timeout=self.timeout,
            heartbeat=self.heartbeat,
            max_message_size=self.max_message_size,
        )
        owner = FileOwner(path, controller, spec)
        # set first: an engine dead at connect is followed like one that dies later (its
        # owner's restart reconnects it)
        controller.on_dead = owner.follow_restart
        # a running cluster with a dead engine is attached all the same: that one is listed
        # dead, saying why (its owner can restart it: mec.restart), the others work
        controller.connect(keep_failed=True)
        self._bind(controller, owner)

    @classmethod
    def from_controller(
        cls, controller: Controller, owner: Any = None, config: Config | None = None
    ) -> MultiEngineClient:
        """A client over an already connected ``controller`` whose engines ``owner`` (an
        ``Owner`` of ``clusterfile.py``: a ``Cluster``, a ``FileOwner``) owns; ``None``: nobody
        owns them (kernels attached by connection file). What ``Cluster.start`` and
        ``MultiEngineClient.attach`` use; the client closes ``controller`` when it is closed.
        A bad configured ``targets`` closes ``controller`` and raises ``ConfigError``."""
        if not isinstance(controller, Controller):
            raise TypeError(f"controller must be a Controller, not {type(controller).__name__}")
        self = cls.__new__(cls)
        try:
            self._configure(config)
        except BaseException:
            controller.close()
            raise
        if owner is None:
            from .clusterfile import NoOwner

            owner = NoOwner(controller)
        self._bind(controller, owner)
        return self

    def _configure(self, config: Config | None, **kwargs: Any) -> None:
        """Traits from ``config`` (else the shell's) and the keyword arguments given."""
        given = {k: v for k, v in kwargs.items() if v is not CONFIGURED}
        try:
            super().__init__(config=shell_config() if config is None else config, **given)
        except (TraitError, TypeError, ValueError) as exc:
            raise config_error(type(self), exc) from None

    def _bind(self, controller: Controller, owner: Any) -> None:
        #: who owns the engines (an ``Owner``: a ``Cluster``, a cluster-file proxy, or nobody)
        self.owner = owner
        self.cluster_file = owner.cluster_file
        self._meta = owner.engine_meta()
        self._controller = controller
        try:  # configured targets are checked against the engines, now that there are engines
            self._resolve_targets(self.targets)
        except (TypeError, ValueError) as exc:
            controller.close()
            raise ConfigError(
                f"MultiEngineClient.targets: {exc}", "MultiEngineClient.targets"
            ) from None
        # mec.last: a weak reference, so that whatever the user drops is freed (issue 11 item
        # 11); a blocking call that did not deliver (timeout, Ctrl-C) is kept, to collect later
        self._last_ref: Callable[[], PendingResult | None] | None = None
        self._kept: PendingResult | None = None
        # %result: the last command executed (execute, %px), kept: output text, not data
        self._last_execute: PendingResult | None = None
        #: this client's load-balanced maps, while referenced (an interrupt stops them first),
        #: by id. Any thread may start one while another interrupts: read and changed only
        #: under its lock, with no weakref callbacks (a WeakSet, iterated while another thread
        #: added to it or dropped a map, raised, and the interrupt was not sent)
        self._maps: dict[int, weakref.ref[BalancedMap]] = {}
        self._maps_lock = threading.Lock()
        self.closed = False
        # a client that is dropped without close() still closes its channels and engine comms;
        # the finalizer holds the controller only (nothing that leads back to this client)
        self._finalizer = weakref.finalize(self, close_controller, controller)

    @property
    def controller(self) -> Controller:
        """The ``Controller`` that multiplexes this client's engine channels (read-only)."""
        return self._controller

    def engine_meta(self) -> dict[int, dict]:
        """Per engine id, what its owner knows of it (group, kernel_name, host, pid):
        the owner's current view, or, if it has none, what it said when this client connected."""
        return self.owner.engine_meta() or self._meta

    @classmethod
    def attach(
        cls,
        connection_files: Iterable[str | os.PathLike] | str | os.PathLike,
        timeout: float = 60.0,
    ) -> MultiEngineClient:
        """Use already-running kernels as engines 0, 1, ... in the order given.

        ``connection_files`` are Jupyter connection files (paths, or names that
        ``jupyter_client.find_connection_file`` finds, e.g. ``kernel-1234.json``): a
        colleague's notebook kernel, kernels started by hand. The client does not own them:
        ``close()`` only disconnects, the kernels keep running.
        """
        from .clusterfile import read_connection_files

        engines = read_connection_files(connection_files)
        return cls.from_controller(Controller(engines, None, timeout=timeout).connect())

    # ------------------------------------------------------------------ defaults and checks
    def get_ids(self) -> EngineIds:
        """The ids of the engines, in order; dead ones are included and flagged in the repr
        (``[0, 1, 2, 3] (dead: 2 was killed by signal SIGKILL)``) and in ``.dead``."""
        ids = EngineIds(self._controller.ids)
        ids.dead = {e: why for e in ids if (why := self._controller.dead(e))}
        return ids

    @property
    def engines(self) -> list[dict]:
        """One dict per engine: id, group, kernelspec, language, version, host, pid, state, dead,
        data_ops and data_refused (why its data operations are refused, or None)."""
        from .status import engine_rows

        return engine_rows(self)

    @property
    def groups(self) -> dict[str, list[int]]:
        """Group name (the kernelspec an engine was started from) -> engine ids."""
        out: dict[str, list[int]] = {}
        for eid in self._controller.ids:
            group = (self._meta.get(eid) or {}).get("group")
            if group:
                out.setdefault(group, []).append(eid)
        return out

    def _resolve_targets(self, targets: Any) -> list[int]:
        chosen = self.targets if targets is None else targets
        # the groups (every engine's metadata) only for a value that may name one, or fail
        # naming them: not at every call on 'all' or on ids
        plain = chosen == "all" if isinstance(chosen, str) else _plain_ids(chosen)
        return resolve_targets(chosen, self._controller.ids, None if plain else self.groups)

    def _prepare(
        self, targets: Any, block: bool | None, timeout: Any = None
    ) -> tuple[list[int], bool]:
        """(engines, block) of a call, every argument checked before anything is sent."""
        if self.closed:
            raise EngineError("this MultiEngineClient is closed")
        if block is not None and not isinstance(block, bool):
            raise TypeError(f"block must be True, False or None, not {block!r}")
        check_timeout(timeout)
        try:  # engines added to the cluster meanwhile (cheap: a stat, unless the file changed)
            self.owner.refresh(min(self.timeout, 10.0))
        except MultiEngineError as exc:  # a listed engine that does not answer: not this call's
            log.warning("could not connect to engines added to the cluster: %s", exc)
        eids = self._resolve_targets(targets)
        bad = [(e, self._controller.unavailable(e)) for e in eids]
        bad = [(e, why) for e, why in bad if why]
        if bad:
            what = "; ".join(f"engine {e} {why}" for e, why in bad)
            raise EngineError(
                f"{what}: restart it with "
                f"mec.restart({bad[0][0] if len(bad) == 1 else [e for e, _ in bad]}) "
                "or choose other targets",
                bad[0][0],
            )
        return eids, self.block if block is None else block

    def _pending(
        self,
        futures: list[cf.Future],
        eids: list[int],
        method: str,
        finish: Callable[[list[Any]], Any],
        progress: bool = False,
        tally: Tally | None = None,
    ) -> PendingResult:
        pr = PendingResult(
            futures,
            eids,
            method,
            finish,
            on_interrupt=self._interrupt_eids,
            progress=self._show_progress if progress else None,
            tally=tally,
            on_abort=self._controller.abort,
        )
        self._remember(pr)
        return pr

    def _remember(self, pr: PendingResult) -> None:
        """Make ``pr`` what ``mec.last`` names; an execute also becomes each of its engines'
        last command (what ``%result`` shows). Data results are not kept alive by this."""
        self._last_ref = weakref.ref(pr)
        self._kept = None
        if pr.method == "execute":
            self._last_execute = pr

    def _outgoing(self, frames: list[Any], block: bool, timeout: float | None) -> list[Any]:
        """The frames a data call sends. Zero copy must not mean shared mutation (issue 11
        item 2): a blocking call without timeout sends the caller's buffers as they are and
        does not return before zmq released them; a call that may return earlier (non-blocking,
        or a timeout: a busy engine takes its data only when it reads it) sends a copy of its
        large buffers (unless ``return_before_send``: then ``pr.wait_for_send()``)."""
        if (block and timeout is None) or self.return_before_send:
            return frames
        return serialize.snapshot(frames)

    def _deliver(
        self,
        send: Callable[[], PendingResult],
        block: bool,
        timeout: float | None,
        live: LiveOutput | None = None,
    ) -> Any:
        """Send the call (``send`` submits its requests and returns its ``PendingResult``), then
        wait for it (``block``) or hand it back. A Ctrl-C from the moment the requests are
        submitted is one during the call's wait: the engines still running it are interrupted
        and ``mec.last`` keeps it (one while ``send`` runs is raised once the ``PendingResult``
        exists). A blocking call returns (or raises) only once zmq has released the caller's
        zero-copy buffers."""
        pr: PendingResult | None = None
        try:
            with interrupt_after():
                pr = send()
            if not block:
                return pr  # its large buffers were copied (``_outgoing``)
            return pr.get_result(timeout=timeout)
        except BaseException as exc:
            if pr is None:
                raise
            if isinstance(exc, KeyboardInterrupt):
                pr.interrupted(exc)  # unless its wait did already
            # timed out or interrupted: mec.last.get_result() collects it later (an interrupted
            # balanced map is already done, failed by its cancel, when Ctrl-C reaches here)
            if (isinstance(exc, KeyboardInterrupt) or not pr.ready()) and self.last is pr:
                self._kept = pr
            raise
        finally:
            if live is not None:
                live.close()
            # a reply means its engine had every frame; Ctrl-C may come earlier (with a
            # timeout, the frames were copies: _outgoing)
            if (
                block
                and pr is not None
                and timeout is None
                and not self.return_before_send
                and not pr.wait_for_send(SEND_GRACE)
            ):
                unsent = wait_sent(pr.futures, 0)
                engines = [
                    e
                    for e, f in zip(pr.eids, pr.futures, strict=True)
                    if any(f is u for u in unsent)
                ]
                warnings.warn(
                    f"{pr.method}: engines {engines} are still receiving what this call sent; "
                    "do not change those objects before mec.last.wait_for_send()",
                    RuntimeWarning,
                    stacklevel=3,
                )

    @staticmethod
    def _live(eids: list[int], block: bool) -> LiveOutput | None:
        """For a blocking call: show its functions' prints and displays, labelled by engine."""
        from .render import LiveOutput

        return LiveOutput(eids) if block else None

    def _show_progress(self, pr: PendingResult) -> ProgressBar:
        """A progress bar for ``pr``'s wait: drawn by that wait's slices, shown only once the
        call has taken ``progress_after`` seconds in an interactive session."""
        return ProgressBar(pr.method, self.progress_after, unit=pr.progress_unit)

    # ------------------------------------------------------------------ running code
    def execute(
        self,
        code: str,
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
        listener: Listener | None = None,
        silent: bool = False,
    ) -> Any:
        """Run ``code`` on each target; blocking returns a ``ResultList``, else a ``PendingResult``.

        ``silent=True``: nothing is kept of what the code prints or displays, the engines store
        no history entry and count no execution (``In [n]`` stays), and it does not become the
        command ``%result`` shows; errors are still raised, with their tracebacks."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        if not isinstance(silent, bool):
            raise TypeError(f"silent must be True or False, not {silent!r}")
        if silent and listener is not None:
            raise ValueError("a silent execute shows no output: it takes no listener")
        eids, block = self._prepare(targets, block, timeout)

        def send() -> PendingResult:
            futures = self._controller.submit_execute(eids, code, listener=listener, silent=silent)
            if not silent:
                return self._pending(futures, eids, "execute", ResultList)
            pr = PendingResult(
                futures,
                eids,
                "execute",
                lambda rs: ResultList(_quiet(r) for r in rs),
                on_interrupt=self._interrupt_eids,
                on_abort=self._controller.abort,
            )
            self._last_ref, self._kept = weakref.ref(pr), None  # mec.last, not %result
            return pr

        return self._deliver(send, block, timeout)

    def sync_imports(
        self, targets: Any = None, quiet: bool = False, timeout: float | None = None
    ) -> SyncImports:
        """``with mec.sync_imports(): import numpy as np`` imports here and, when the block
        ends without error, on the target engines (the block's import statements as written);
        prints what it imports unless ``quiet``. A failure on an engine: ``CompositeError``."""
        from .remote import SyncImports

        if not isinstance(quiet, bool):
            raise TypeError(f"quiet must be True or False, not {quiet!r}")
        timeout = check_timeout(timeout)
        eids, _ = self._prepare(targets, None)  # before the block runs
        return SyncImports(self, eids, quiet, timeout)

    def run(
        self,
        filename: str | os.PathLike,
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
        silent: bool = False,
    ) -> Any:
        """Run the Python file ``filename`` (read here, in this process) on each target, in the
        engines' namespaces, like ``execute(open(filename).read())``."""
        if not isinstance(filename, (str, os.PathLike)):
            raise TypeError(f"filename must be a path, not {type(filename).__name__}")
        path = os.fspath(filename)
        try:
            with open(path, encoding="utf-8") as fh:
                code = fh.read()
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot run {path!r}: {exc.strerror}", path) from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"cannot run {path!r}: not UTF-8 text ({exc.reason})") from None
        return self.execute(code, targets=targets, block=block, timeout=timeout, silent=silent)

    def _comm(
        self,
        op: str,
        eids: list[int],
        frames: list[list[Any]],
        data: dict | None = None,
        listener: Listener | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[cf.Future]:
        return self._controller.submit_comm(
            eids, op, data or {}, frames, listener=listener, on_progress=on_progress
        )

    def apply(
        self,
        f: Callable,
        *args: Any,
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``f(*args, **kwargs)`` once on each target; a list of the return values."""
        if not callable(f):
            raise TypeError(f"apply needs a callable, not {type(f).__name__}")
        eids, block = self._prepare(targets, block, timeout)
        frames = self._outgoing(_dumps_call(f, args, kwargs), block, timeout)
        live = self._live(eids, block)

        def send() -> PendingResult:
            futures = self._comm(
                "apply", eids, [frames] * len(eids), listener=live.listener if live else None
            )
            return self._pending(futures, eids, "apply", _values)

        return self._deliver(send, block, timeout, live)

    # ------------------------------------------------------------------ moving data
    def push(
        self,
        namespace: dict,
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Set ``namespace``'s names on each target; returns ``[None] * n``. All or nothing."""
        if not isinstance(namespace, dict):
            raise TypeError(f"push takes a dict of names to values, not {type(namespace).__name__}")
        for key in namespace:
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"cannot push to {key!r}: names must be valid Python identifiers")
        eids, block = self._prepare(targets, block, timeout)
        frames = self._outgoing(_dumps_namespace(namespace), block, timeout)
        return self._deliver(
            lambda: self._pending(
                self._comm("push", eids, [frames] * len(eids)), eids, "push", _nones
            ),
            block,
            timeout,
        )

    def pull(
        self,
        names: str | Sequence[str],
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One value per target for a name; one list of values per target for several names."""
        single, keys = _pull_names(names)
        eids, block = self._prepare(targets, block, timeout)
        frames: list[list[Any]] = [[] for _ in eids]
        data = {"names": keys, "single": single}
        return self._deliver(
            lambda: self._pending(self._comm("pull", eids, frames, data), eids, "pull", _values),
            block,
            timeout,
        )

    def zip_pull(
        self,
        names: Sequence[str],
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Like ``pull(names)`` but transposed: one tuple per name, one item per engine."""
        _single, keys = _pull_names(names)
        eids, block = self._prepare(targets, block, timeout)
        data = {"names": keys, "single": False}
        finish = lambda rs: list(zip(*_values(rs), strict=True))  # noqa: E731
        return self._deliver(
            lambda: self._pending(
                self._comm("pull", eids, [[]] * len(eids), data), eids, "pull", finish
            ),
            block,
            timeout,
        )

    def push_function(
        self,
        namespace: dict,
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Push functions (serialised with cloudpickle, so lambdas and closures work)."""
        for k, v in namespace.items():
            if not callable(v):
                raise TypeError(f"push_function: {k!r} is a {type(v).__name__}, not a function")
        return self.push(namespace, targets=targets, block=block, timeout=timeout)

    def pull_function(
        self,
        names: str | Sequence[str],
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Pull functions back from the engines."""
        return self.pull(names, targets=targets, block=block, timeout=timeout)

    def __setitem__(self, name: str, value: Any) -> None:
        self.push({name: value}, block=True)

    def __getitem__(self, name: str) -> Any:
        return self.pull(name, block=True)

    def scatter(
        self,
        name: str,
        seq: Any,
        dist: str = "b",
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
        flatten: bool = False,
    ) -> Any:
        """Split ``seq`` into contiguous parts, one per target in order, and push each as ``name``.

        ``flatten=True``: a part of one item is pushed as that item, not as a one-item list
        (``mec.scatter('my_id', mec.get_ids(), flatten=True)``: each engine gets its id)."""
        if dist != "b":
            raise ValueError(
                f"unknown distribution {dist!r}; only 'b' (contiguous blocks) is supported"
            )
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"cannot scatter to {name!r}: not a valid Python identifier")
        if not isinstance(flatten, bool):
            raise TypeError(f"flatten must be True or False, not {flatten!r}")
        eids, block = self._prepare(targets, block, timeout)
        parts = partition.split(seq, len(eids))
        offsets = [sum(len(q) for q in parts[:i]) for i in range(len(parts))]
        if flatten:
            one = [e for e, p in zip(eids, parts, strict=True) if len(p) == 1]
            if one and len(one) < len(parts):
                others = {e: len(p) for e, p in zip(eids, parts, strict=True) if len(p) != 1}
                warnings.warn(
                    f"scatter({name!r}, flatten=True): engines {one} get their one item itself, "
                    f"the others parts of another length (engine: items {others}); "
                    f"gather({name!r}) cannot tell such parts apart (give one item per engine, "
                    "or flatten=False)",
                    UserWarning,
                    stacklevel=2,
                )
            parts = [partition.first(p) if len(p) == 1 else p for p in parts]
        frames = [
            self._outgoing(_dumps_part(name, off, p), block, timeout)
            for off, p in zip(offsets, parts, strict=True)
        ]
        sizes = [nbytes(fr) for fr in frames]  # numbers: a callback must not keep the data alive

        def send() -> PendingResult:
            futures = self._comm("push", eids, frames)
            tally = _tally(Tally(sum(sizes), "B"), eids, futures, sizes)
            return self._pending(futures, eids, "scatter", _nones, progress=True, tally=tally)

        return self._deliver(send, block, timeout)

    def gather(
        self,
        name: str,
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Pull ``name`` from each target and concatenate the parts in engine order."""
        if not isinstance(name, str):
            raise TypeError(f"gather takes one name (a str), not {type(name).__name__}")
        _pull_names(name)
        eids, block = self._prepare(targets, block, timeout)
        finish = lambda rs: _gathered(name, eids, _values(rs))  # noqa: E731

        def send() -> PendingResult:
            data = {"names": [name], "single": True}
            futures = self._comm("pull", eids, [[]] * len(eids), data)
            tally = _tally(Tally(None, "B"), eids, futures)  # bytes received; total unknown
            return self._pending(futures, eids, "gather", finish, progress=True, tally=tally)

        return self._deliver(send, block, timeout)

    # ------------------------------------------------------------------ parallel map
    def map(
        self,
        f: Callable,
        *seqs: Iterable,
        targets: Any = None,
        block: bool | None = None,
        timeout: float | None = None,
        balanced: bool = False,
        chunksize: int | None = None,
        ordered: bool = True,
        retries: int = 1,
    ) -> Any:
        """A parallel ``map(f, *seqs)``.

        By default items are split in contiguous blocks, one per target (the tutorial's map).
        ``balanced=True`` sends chunks of items to whichever engine is free first, re-sending a
        dead engine's chunks to others ``retries`` times (never a chunk refused as changed on
        the way: the map fails with a ``RefusedError``); ``ordered=False`` returns results in
        completion order. ``chunksize=None`` (the default) sizes chunks automatically from the
        measured time per item (small first, longer ones, short ones at the end); an int sends
        chunks of exactly that many items.
        """
        if not callable(f):
            raise TypeError(f"map needs a callable, not {type(f).__name__}")
        if not seqs:
            raise TypeError("map() needs at least one sequence")
        eids, block = self._prepare(targets, block, timeout)
        items, star = self._for_engines(eids, *_map_items(seqs))
        if balanced:
            live = self._live(eids, block)

            def send_balanced() -> PendingResult:
                bm = self._balanced(
                    f,
                    items,
                    eids,
                    chunksize,
                    ordered,
                    retries,
                    live.listener if live else None,
                    star,
                )
                pr = PendingResult(
                    [bm.future],
                    eids[:1],
                    "map",
                    lambda rs: rs[0],
                    on_interrupt=lambda _running: self._stop_balanced(bm),
                    progress=self._show_progress,
                    tally=bm.tally,  # items done, reported by the map as its chunks complete
                )
                self._remember(pr)
                return pr

            return self._deliver(send_balanced, block, timeout, live)
        if not items:
            done: cf.Future = cf.Future()
            done.set_result([])
            return self._deliver(
                lambda: self._pending([done], eids[:1], "map", lambda rs: []), block, timeout
            )
        nparts = min(len(eids), len(items))
        eids = eids[:nparts]
        frames, datas = [], []
        from .balanced import dumps_chunk

        for a, b in partition.bounds(len(items), nparts):
            frames.append(
                self._outgoing(
                    dumps_chunk(f, a, items[a:b], snapshot=False, star=star), block, timeout
                )
            )  # a TypeError names the item
            datas.append(a)
        live = self._live(eids, block)
        finish = lambda rs: partition.join(_values(rs))  # noqa: E731
        sizes = [b - a for a, b in partition.bounds(len(items), nparts)]

        def send() -> PendingResult:
            futures: list[cf.Future] = []
            tally = Tally(len(items))
            for eid, fr, off in zip(eids, frames, datas, strict=True):
                # each engine reports how far its block got (a few messages a second, no round
                # trip), so that the bar moves by items, not only as blocks complete
                data: dict[str, Any] = {"offset": off, "progress": True}
                if not star:
                    data["star"] = False
                futures += self._comm(
                    "map",
                    [eid],
                    [fr],
                    data,
                    listener=live.listener if live else None,
                    on_progress=tally.part,
                )
            tally = _tally(tally, eids, futures, sizes)
            return self._pending(futures, eids, "map", finish, progress=True, tally=tally)

        return self._deliver(send, block, timeout, live)

    def imap(
        self,
        f: Callable,
        *seqs: Iterable,
        targets: Any = None,
        chunksize: int | None = None,
        ordered: bool = True,
        retries: int = 1,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """A load-balanced map whose results are yielded as they arrive (``ordered=False``:
        in completion order); ``chunksize`` as for ``map(balanced=True)`` (None: automatic).
        It starts sending at once; Ctrl-C stops it, and so does
        ``timeout`` (seconds from this call for the whole iteration: ``TimeoutError``)."""
        if not callable(f):
            raise TypeError(f"imap needs a callable, not {type(f).__name__}")
        if not seqs:
            raise TypeError("imap() needs at least one sequence")
        eids, _ = self._prepare(targets, None, timeout)
        timeout = check_timeout(timeout)  # seconds as a float (10**400: never)
        deadline = None if timeout is None else time.monotonic() + timeout
        items, star = self._for_engines(eids, *_map_items(seqs))
        bm = self._balanced(f, items, eids, chunksize, ordered, retries, star=star)
        bar = ProgressBar("imap", self.progress_after, unit="item")
        # from this call, not from the first next(); the bar is drawn by the iteration's waits
        return bm.iterate(deadline=deadline, progress=bar)

    def _for_engines(self, eids: list[int], items: list, star: bool) -> tuple[list, bool]:
        """Map items as every engine of ``eids`` reads them: an engine of an older version
        (no ``map_elements`` when it connected) unpacks each item, so give it 1-tuples."""
        if star or all(self._controller.state(e).engine_info.get("map_elements") for e in eids):
            return items, star
        return [(x,) for x in items], True

    def _balanced(
        self,
        f: Callable,
        items: list,
        eids: list[int],
        chunksize: int | None,
        ordered: bool,
        retries: int,
        listener: Listener | None = None,
        star: bool = True,
    ) -> BalancedMap:
        from .balanced import BalancedMap

        usable = [e for e in eids if self._controller.state(e).data_ok] or eids
        bm = BalancedMap(
            self._controller,
            usable,
            f,
            items,
            chunksize=chunksize,
            ordered=ordered,
            retries=retries,
            listener=listener,
            interrupt=self._interrupt_eids,  # the owner's interrupt, like mec.interrupt()
            star=star,
        )
        with self._maps_lock:
            self._maps = {k: r for k, r in self._maps.items() if r() is not None}
            self._maps[id(bm)] = weakref.ref(bm)
        return bm.start()

    def _stop_balanced(self, bm: BalancedMap) -> None:
        bm.cancel()
        self._interrupt_eids([e for e in bm.eids if not self._controller.dead(e)])

    def mapper(self, dist: str = "b", targets: Any = None, block: bool | None = None) -> Mapper:
        """A mapper with fixed options: ``mec.mapper(targets=[0, 1]).map(f, seq)``."""
        if dist != "b":
            raise ValueError(
                f"unknown distribution {dist!r}; only 'b' (contiguous blocks) is supported"
            )
        if targets is not None:
            self._resolve_targets(targets)
        return Mapper(self, targets, block)

    def parallel(
        self, targets: Any = None, block: bool | None = None
    ) -> Callable[[Callable], ParallelFunction]:
        """Decorator: calling the function on sequences maps it over the engines."""
        if targets is not None:
            self._resolve_targets(targets)

        def decorate(f: Callable) -> ParallelFunction:
            return ParallelFunction(Mapper(self, targets, block), f)

        return decorate

    # ------------------------------------------------------------------ other interfaces
    def executor(self, balanced: bool = True, targets: Any = None) -> EngineExecutor:
        """A ``concurrent.futures.Executor`` whose tasks run on the target engines: to whichever
        is free (``balanced``) or round robin (see ``executor.py``)."""
        from .executor import EngineExecutor

        return EngineExecutor(self, balanced=balanced, targets=targets)

    def register_joblib_backend(
        self, name: str = "ipy_multiengine", make_default: bool = False
    ) -> None:
        """Register the joblib backend ``name`` running ``joblib.Parallel`` on this client's
        engines: ``with joblib.parallel_config(backend=name): ...`` (``joblib_backend.py``)."""
        from .joblib_backend import register

        register(self, name=name, make_default=make_default)

    def become_dask(
        self,
        targets: Any = None,
        host: str = "127.0.0.1",
        nthreads: int = 1,
        timeout: float = 60.0,
        **worker_kwargs: Any,
    ) -> Any:
        """Start a dask scheduler (in this process) and one worker in each target engine; the
        ``distributed.Client`` of that cluster. TLS-only, on 127.0.0.1 unless ``host=``
        (``dask_bridge.py``); ``stop_dask()`` stops it."""
        from . import dask_bridge

        return dask_bridge.become_dask(
            self, targets, host=host, nthreads=nthreads, timeout=timeout, **worker_kwargs
        )

    def stop_dask(self, timeout: float = 30.0) -> None:
        """Stop the dask cluster of ``become_dask()``; the engines and their namespaces stay."""
        from . import dask_bridge

        dask_bridge.stop_dask(self, timeout=timeout)

    # ------------------------------------------------------------------ inspecting engines
    def status(self, live: bool = False, interval: float = 1.0) -> Any:
        """A table of the engines: id, group, host, pid, idle/busy/dead, what runs and for how
        long, queued requests, RSS and CPU. Text in a terminal, HTML in a notebook; ``live=True``
        in a notebook keeps it updated in place until ``.stop()`` (see ``status.py``)."""
        from . import status

        return status.show(self, live=live, interval=interval)

    def pull_table(
        self, names: str | Sequence[str], targets: Any = None, timeout: float | None = None
    ) -> Any:
        """``names`` on each engine as a table indexed by engine id (pandas DataFrame if available,
        else a list of dicts). Default targets skip engines without data operations."""
        from . import compare

        return compare.pull_table(self, names, targets=targets, timeout=timeout)

    def diff(self, name: str, targets: Any = None, timeout: float | None = None) -> Any:
        """Which engines hold differing values of ``name`` (what ``%pxdiff`` shows)."""
        from . import compare

        return compare.diff(self, name, targets=targets, timeout=timeout)

    # ------------------------------------------------------------------ control
    def barrier(
        self, pending_results: Iterable[PendingResult], timeout: float | None = None
    ) -> None:
        """Wait until every ``PendingResult`` is ready (errors stay in them, for ``get_result``)."""
        timeout = check_timeout(timeout)
        prs = list(pending_results)
        for pr in prs:
            if not isinstance(pr, PendingResult):
                raise TypeError(f"barrier takes PendingResult objects, not {type(pr).__name__}")
        futures = [f for pr in prs for f in pr.futures]
        eids = [e for pr in prs for e in pr.eids]
        waiter = PendingResult(
            futures,
            eids,
            "barrier",
            lambda rs: None,
            on_interrupt=self._interrupt_eids,
            progress=self._show_progress,
        )
        if not waiter.wait(timeout):
            left = sorted({e for e, f in zip(eids, futures, strict=True) if not f.done()})
            raise TimeoutError(
                f"barrier not done after {timeout:g} s; still running on engines {left}"
            )

    def get_result(
        self, default: Any = None, block: bool = True, timeout: float | None = None
    ) -> Any:
        """The ``ResultList`` of the last command executed on the engines (what ``%result``
        shows): ``execute``/``%px`` only, later ``push``/``pull``/``map`` calls do not replace it.
        Waits for it (``block``, ``timeout``) like ``PendingResult.get_result``."""
        return self.last_executed().get_result(default=default, block=block, timeout=timeout)

    def last_executed(self) -> PendingResult:
        """The ``PendingResult`` of the last command executed (``execute``, ``%px``)."""
        if self._last_execute is None:
            raise ValueError("no command has been executed on the engines yet")
        return self._last_execute

    @property
    def last(self) -> PendingResult | None:
        """The ``PendingResult`` of the last call, while its result is referenced somewhere (by
        you, or by ``%result`` for an execute), or while a blocking call that timed out or was
        interrupted can still be collected. Data you dropped is never kept alive by it."""
        if self._kept is not None:
            return self._kept
        return self._last_ref() if self._last_ref is not None else None

    def interrupt(self, targets: Any = None) -> None:
        """Interrupt, on the target engines, everything this client sent them before this call:
        what runs now and what is queued or in flight but not begun (that ends with a
        KeyboardInterrupt when the engine reaches it, without running). Nothing sent after this
        call is interrupted, so ``mec.interrupt(); mec.execute(...)`` runs the second call.
        What another client runs there now is interrupted too; an idle engine is unharmed.

        Returns once the engines have taken the interrupt (at most ~1 s each). Engines without
        the ipy_multiengine helper (other kernels) are interrupted the plain way, through their
        kernel manager (a signal or an interrupt message, as the kernelspec says) when this
        process owns them, else with an ``interrupt_request``: a request not begun is not hit.
        """
        eids = self._resolve_targets(targets)
        self._interrupt_eids([e for e in eids if not self._controller.dead(e)])

    def send_signal(self, sig: int | str, targets: Any = None) -> None:
        """Send signal ``sig`` (a number, a ``signal.Signals`` or a name like ``'SIGUSR1'``) to
        the target engines' processes, through whoever owns them (the ``Cluster``, or the
        ``ipmulti start`` process of a shared cluster). To stop running code use ``interrupt``."""
        import signal as _signal

        try:
            if isinstance(sig, bool):
                raise ValueError
            signum = _signal.Signals[sig] if isinstance(sig, str) else _signal.Signals(sig)
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"not a signal: {sig!r} (e.g. signal.SIGUSR1 or 'SIGUSR1')") from None
        eids, _ = self._prepare(targets, None)
        self.owner.send_signal(eids, int(signum))

    def _interrupt_eids(self, eids: list[int]) -> None:
        """What ``interrupt`` does (Ctrl-C in a wait comes here too): the controller interrupts
        what this client sent (``Controller.interrupt_sent``); engines it cannot ask so get the
        owner's plain interrupt."""
        eids = [e for e in eids if not self._starting(e)]
        # a balanced map on these engines is stopped first: one of its chunks answered while
        # the interrupt is on its way would have the next chunk sent, and run, after it
        with self._maps_lock:
            refs = list(self._maps.values())
        for ref in refs:
            bm = ref()
            if bm is not None and set(bm.eids) & set(eids):
                bm.cancel()
        plain = self._controller.interrupt_sent(eids) if eids else []
        if plain:
            self.owner.interrupt(plain)

    def _starting(self, eid: int) -> bool:
        """Engine ``eid`` is being (re)started or connected: nothing of anybody's runs there yet
        (its requests failed as its restart began), and a signal would kill a kernel still
        starting (SIGINT before its handler is installed: the restart failed, the engine dead).
        Its ``on_start`` code, once it runs, can be interrupted."""
        st = self._controller.state(eid)
        return not st.dead and not st.ready and not st.init_running

    def restart(self, targets: Any = None, timeout: float | None = 60.0) -> None:
        """Restart engines, keeping their ids: each gets a fresh process and an empty namespace,
        then runs the code recorded with ``on_start``. Dead engines can be restarted.

        Engines owned by this process (a ``Cluster``) restart through their kernel managers;
        for a cluster started with ``ipmulti start`` the owner process is asked to do it.
        Requests in flight on these engines fail with ``EngineError``.
        """
        if self.closed:
            raise EngineError("this MultiEngineClient is closed")
        timeout = check_timeout(timeout)
        eids = self._resolve_targets(targets)
        self.owner.restart(eids, timeout=timeout)
        failed = [err for e in eids for err in self._controller.state(e).init_errors]
        if failed:
            raise CompositeError("on_start", failed)

    def wait_ready(self, targets: Any = None, timeout: float | None = 60.0) -> None:
        """Wait until the target engines are up and ready (e.g. while ``auto_restart`` or the
        owner of the cluster restarts them); ``TimeoutError`` names the engines still not ready."""
        if self.closed:
            raise EngineError("this MultiEngineClient is closed")
        timeout = check_timeout(timeout)
        eids = self._resolve_targets(targets)
        ready = lambda: not any(self._controller.unavailable(e) for e in eids)  # noqa: E731
        if not _loop.wait_until(ready, timeout, tick=stdin.serve_pending):
            waiting = {e: why for e in eids if (why := self._controller.unavailable(e))}
            raise TimeoutError(
                f"engines not ready after {timeout:g} s: "
                + "; ".join(f"engine {e} {why}" for e, why in waiting.items())
            )

    def refresh(self, timeout: float = 60.0) -> list[int]:
        """Connect to engines added to the cluster since this client connected (by
        ``Cluster.add_engines`` or ``ipmulti scale``); returns the ids newly connected."""
        if self.closed:
            raise EngineError("this MultiEngineClient is closed")
        new = self.owner.refresh(timeout)
        self._meta = self.owner.engine_meta() or self._meta
        return new

    def wait_for_engines(self, n: int, timeout: float | None = 60.0) -> list[int]:
        """Wait until at least ``n`` engines are connected and ready (engines being added to a
        running cluster); returns the ids. ``TimeoutError`` says how many there are."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"wait_for_engines needs a number of engines >= 0, not {n!r}")
        timeout = check_timeout(timeout)
        if self.closed:
            raise EngineError("this MultiEngineClient is closed")
        deadline = None if timeout is None else time.monotonic() + timeout

        def ready() -> list[int]:
            return [e for e in self._controller.ids if not self._controller.unavailable(e)]

        while True:
            left = None if deadline is None else deadline - time.monotonic()
            self.refresh(60.0 if left is None else max(left, 0.01))
            if len(ready()) >= n:
                return ready()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(
                    f"{len(ready())} engines ready after {timeout:g} s, waiting for {n} "
                    f"(ids {ready()})"
                )
            step = 0.25 if left is None else min(0.25, left)
            _loop.wait_until(lambda: len(ready()) >= n, step, tick=stdin.serve_pending)

    def on_start(self, code: str, timeout: float | None = None) -> ResultList:
        """Run setup ``code`` on every engine now, and record it so that it runs again, first
        thing, on every engine that is restarted or added later (``%%px --init``).

        Returns the ``ResultList`` of running it now. If it fails on any engine it is not
        recorded, and the ``CompositeError`` is raised.
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        live = [e for e in self._controller.ids if not self._controller.unavailable(e)]
        result = (
            self.execute(code, targets=live, block=True, timeout=timeout) if live else ResultList()
        )
        self._controller.init_code.append(code)
        return result

    @property
    def on_start_code(self) -> list[str]:
        """The setup code recorded by ``on_start``, in order (a copy)."""
        return list(self._controller.init_code)

    def clear_on_start(self) -> None:
        """Forget all recorded ``on_start`` code."""
        self._controller.init_code.clear()

    def activate(self, suffix: str = "", targets: Any = None) -> MultiEngineClient:
        """Make this client the one the ``%px``/``%autopx``/``%result`` magics use.

        With a ``suffix`` (``'_even'``), a named set of magics beside the default ones:
        ``%px_even``, ``%%px_even``, ``%autopx_even``, ``%result_even``, on ``targets`` (default:
        this client's), in the running IPython (the extension is loaded if it is not yet).
        ``client.deactivate('_even')`` removes them."""
        global _active
        if not isinstance(suffix, str) or not f"px{suffix}".isidentifier():
            raise ValueError(
                "suffix must make magic names like px{suffix}: letters, digits, _; "
                f"not {suffix!r}"
            )
        if targets is not None:
            if not suffix:
                raise ValueError(
                    "targets= names the engines of a named set (activate(suffix=..., "
                    "targets=...)); for the default magics set mec.targets or %pxconfig --targets"
                )
            self._resolve_targets(targets)  # names the bad id or group now
        if self.closed:
            raise EngineError("this MultiEngineClient is closed")
        if not suffix:
            _active = self
            return self
        ip = _ipython()
        if ip is None:
            raise RuntimeError("activate(suffix=...) makes magics: it needs a running IPython")
        if not activation_hooks:
            ip.extension_manager.load_extension("ipy_multiengine")
        for hook in activation_hooks:
            hook(ip, suffix, self, targets)
        return self

    def close(self) -> None:
        """Close the channels (engines keep running unless this client's ``Cluster`` owns them)."""
        global _active
        if self.closed:
            return
        if "ipy_multiengine.dask_bridge" in sys.modules:  # a dask cluster of become_dask()
            sys.modules["ipy_multiengine.dask_bridge"].stop_on_close(self)
        self.closed = True
        if _active is self:
            _active = None
        self._finalizer()  # closes the controller (once)
        if getattr(self.owner, "closed", None) is False:
            self.owner.closed = True  # a FileOwner stops following restarts
        if self.owner.owns_engines:
            self.owner.stop()

    def __enter__(self) -> MultiEngineClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<MultiEngineClient engines={self.get_ids()} targets={self.targets!r} "
            f"block={self.block}>"
        )


def close_controller(controller: Controller) -> None:
    """Close ``controller`` from any thread: what a client's finalizer runs (its channels and
    its comms on the engines).

    The last reference may drop on the I/O thread (in a callback), which cannot wait for
    its own loop: then the close runs from a short-lived thread."""
    if _loop.in_loop_thread():
        import threading

        threading.Thread(
            target=controller.close, name="ipy_multiengine-finalize", daemon=True
        ).start()
        return
    controller.close()


class EngineIds(list):
    """``get_ids()``: a plain list of ints whose repr also names the dead engines."""

    def __init__(self, ids: Iterable[int] = (), dead: dict[int, str] | None = None) -> None:
        super().__init__(ids)
        self.dead: dict[int, str] = dict(dead or {})

    def __repr__(self) -> str:
        base = super().__repr__()
        if not self.dead:
            return base
        return base + " (dead: " + "; ".join(f"{e} {why}" for e, why in self.dead.items()) + ")"


class Mapper:
    """``map`` with targets and block fixed in advance."""

    def __init__(self, client: MultiEngineClient, targets: Any, block: bool | None) -> None:
        self.client, self.targets, self.block = client, targets, block

    def map(self, f: Callable, *seqs: Iterable, timeout: float | None = None) -> Any:
        return self.client.map(f, *seqs, targets=self.targets, block=self.block, timeout=timeout)


class ParallelFunction:
    """A function that, called on sequences, runs as a parallel map (``@mec.parallel()``)."""

    def __init__(self, mapper: Mapper, f: Callable) -> None:
        self.mapper, self.func = mapper, f
        self.__name__ = getattr(f, "__name__", "parallel_function")
        self.__doc__ = getattr(f, "__doc__", None)

    def __call__(self, *seqs: Iterable) -> Any:
        _check_sequences(seqs, f"@parallel function {self.__name__!r}")
        return self.mapper.map(self.func, *seqs)

    def map(self, *seqs: Iterable, timeout: float | None = None) -> Any:
        return self.mapper.map(self.func, *seqs, timeout=timeout)


def _plain_ids(targets: Any) -> bool:
    """Whether ``targets`` is an int or a list/tuple/range of ints (no group names)."""
    if isinstance(targets, range):
        return True
    items = targets if isinstance(targets, (list, tuple)) else [targets]
    return all(type(t) is int for t in items)


def _check_sequences(seqs: tuple[Any, ...], what: str = "map") -> None:
    """Raise TypeError naming the first of ``seqs`` that cannot be iterated (before anything
    is sent; it was Python's bare "'int' object is not iterable")."""
    for i, seq in enumerate(seqs):
        if not hasattr(seq, "__iter__") and not hasattr(seq, "__getitem__"):
            raise TypeError(
                f"{what} maps over sequences: argument {i + 1} is {_a(type(seq).__name__)} "
                f"({_short_repr(seq)}), not a sequence"
            )


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an int", "a dict"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _short_repr(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _map_items(seqs: tuple[Iterable, ...]) -> tuple[list, bool]:
    """The items of ``map(f, *seqs)`` and whether they are argument tuples: one sequence is
    sent as its elements, several as tuples, cut at the shortest (like ``map()``)."""
    _check_sequences(seqs)
    if len(seqs) == 1:
        return list(seqs[0]), False
    return list(zip(*seqs, strict=False)), True


def _gathered(name: str, eids: list[int], parts: list[Any]) -> Any:
    """The engines' parts of ``name`` joined in engine order (``partition.join``). A part that
    is no sequence, or a dict or set (which scatter refuses), is named with its engine: joined,
    an int failed with Python's bare message and dicts gave a list of their keys."""
    for eid, part in zip(eids, parts, strict=True):
        if partition.known(part):
            continue  # (a pyarrow Table is no iterable)
        if isinstance(part, (dict, set, frozenset)) or not hasattr(part, "__iter__"):
            raise TypeError(
                f"cannot gather {name!r}: engine {eid} holds {_a(type(part).__name__)}, not a "
                "sequence (gather joins the parts of a sequence, as scatter splits one; "
                "pull gets any value)"
            )
    try:
        return partition.join(parts, "engines", eids)
    except TypeError as exc:  # e.g. frames mixed with other kinds, named by engine
        raise TypeError(f"cannot gather {name!r}: {exc} (pull gets each)") from exc


def _pull_names(names: Any) -> tuple[bool, list[str]]:
    """(one name?, the names) of a pull, checked before anything is sent: a name that is not a
    str, or could never have been pushed or assigned (not an identifier), is named here
    instead of coming back as a NameError from every engine."""
    single = isinstance(names, str)
    try:
        keys = [names] if single else list(names)
    except TypeError:
        raise TypeError(
            f"pull takes a name or a list of names, not {type(names).__name__}"
        ) from None
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"names to pull must be str, not {k!r}")
        if not k.isidentifier():
            raise ValueError(f"cannot pull {k!r}: names must be valid Python identifiers")
    return single, keys


def _values(replies: list[CommReply]) -> list[Any]:
    out = []
    for r in replies:
        try:
            out.append(serialize.loads(r.frames))
        except Exception as exc:
            raise TypeError(
                f"a value sent back by an engine cannot be rebuilt in this process "
                f"({type(exc).__name__}: {exc}); define its class in a module both sides "
                "can import, or convert it to builtin types on the engine"
            ) from exc
    return out


def _quiet(record: dict) -> dict:
    """A silent execute's record: what it printed or displayed is not kept."""
    return dict(record, stdout="", stderr="", outputs=[], result=None)


def _nones(replies: list[Any]) -> list[None]:
    return [None] * len(replies)


def _dumps_namespace(namespace: dict) -> list[Any]:
    """Serialise a namespace as one message, or name the first value that cannot be sent."""
    try:
        return serialize.dumps(namespace)
    except Exception:
        for key, value in namespace.items():
            serialize.check_picklable(key, value)
        raise


def _dumps_call(f: Callable, args: tuple, kwargs: dict) -> list[Any]:
    """Serialise an ``apply`` call, or name what cannot be sent: the function, an argument by
    position or a keyword argument (not the internal tuple they travel in)."""
    try:
        return serialize.dumps((f, args, kwargs))
    except Exception:
        serialize.check_picklable(getattr(f, "__name__", "function"), f)
        for i, arg in enumerate(args):
            serialize.check_picklable(f"argument {i}", arg)
        for key, value in kwargs.items():
            serialize.check_picklable(f"keyword argument {key}", value)
        return serialize.check_picklable(getattr(f, "__name__", "function"), (f, args, kwargs))


def _interactive_bar(pr: PendingResult) -> ProgressBar:
    """The bar of ``pr.wait_interactive()``: shown at once (no threshold, no terminal needed)."""
    return ProgressBar(pr.method, 0.0, True, pr.progress_unit)


PendingResult.interactive_bar = (
    _interactive_bar  # read from the class: results do not import render
)


def _tally(
    tally: Tally, eids: list[int], futures: list[cf.Future], sizes: list[int] | None = None
) -> Tally:
    """Report each engine's part into ``tally`` as its future completes: ``sizes[i]`` units,
    or the bytes of the reply when ``sizes`` is None; nothing for a part that failed. (A
    progress count that cannot be made is logged: it must not fail the call.)"""
    for i, (eid, fut) in enumerate(zip(eids, futures, strict=True)):
        tally.start(eid)
        size = None if sizes is None else sizes[i]

        def done(f: cf.Future, eid: int = eid, size: int | None = size) -> None:
            n = 0
            try:
                if not f.cancelled() and f.exception() is None:
                    n = nbytes(getattr(f.result(), "frames", None)) if size is None else size
            except Exception:
                log.debug("progress: cannot count engine %s's part", eid, exc_info=True)
            tally.done(eid, n)

        fut.add_done_callback(done)
    return tally


def _dumps_part(name: str, offset: int, part: Any) -> list[Any]:
    """Serialise the part of a ``scatter`` that starts at item ``offset``, or name the item of
    the scattered sequence that cannot be sent (not the internal dict it travels in)."""
    try:
        return serialize.dumps({name: part})
    except Exception:
        if isinstance(part, (list, tuple)):
            for k, item in enumerate(part):
                try:
                    serialize.dumps(item)
                except Exception as exc:
                    raise TypeError(
                        f"cannot send {name!r}: item {offset + k} of the sequence, of type "
                        f"{type(item).__name__}, cannot be pickled ({exc})"
                    ) from exc
        serialize.check_picklable(name, part)
        raise
