"""``MultiEngineClient``: the synchronous facade users (and the magics) talk to.

It checks arguments before anything is sent, turns each call into one request per target
engine on the controller, and either waits (``block=True``) or returns a ``PendingResult``.
"""

from __future__ import annotations

import concurrent.futures as cf
import numbers
import os
import sys
from typing import Any, Callable, Iterable, Sequence

from . import partition, serialize
from .controller import CommReply, Controller, Listener
from .errors import (  # noqa: F401  (re-exported: `from ipy_multiengine.client import CompositeError`)
    CompositeError,
    EngineError,
    MultiEngineError,
    NoClusterError,
    RemoteError,
    TimeoutError,
)
from .results import PendingResult, ResultList

__all__ = ["MultiEngineClient", "PendingResult", "ResultList", "CompositeError", "RemoteError",
           "EngineError", "TimeoutError", "get_active", "Targets"]

Targets = "str | int | Sequence[int] | None"

_active: "MultiEngineClient | None" = None


def get_active() -> "MultiEngineClient | None":
    """The client of the last ``activate()`` (the one the magics use), if still open."""
    return _active if _active is not None and not _active.closed else None


def _interactive() -> bool:
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except Exception:
        ip = None
    if ip is not None and getattr(ip, "kernel", None) is not None:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class MultiEngineClient:
    """Drive a set of engines: ``execute``, ``push``/``pull``, ``scatter``/``gather``, ``map``...

    ``MultiEngineClient()`` connects to the running cluster of the ``default`` profile,
    ``MultiEngineClient(path)`` to the cluster file at ``path``, ``MultiEngineClient(profile=P)``
    to profile ``P``'s. ``block`` and ``targets`` are the defaults of every call.
    """

    #: Seconds a blocking map/gather/barrier runs before a progress bar appears (None: never).
    progress_after: float | None = 2.0

    def __init__(
        self,
        cluster_file: str | os.PathLike | None = None,
        profile: str | None = None,
        *,
        timeout: float = 60.0,
        _controller: Controller | None = None,
        _cluster: Any = None,
    ) -> None:
        self._cluster = _cluster
        if _controller is None:
            from .cluster import read_cluster, resolve_cluster_file, liveness_probes

            path = resolve_cluster_file(cluster_file, profile)
            spec = read_cluster(path)
            engines = {e["id"]: e["connection"] for e in spec["engines"]}
            _controller = Controller(engines, liveness_probes(spec), timeout=timeout)
            self.cluster_file = str(path)
        else:
            self.cluster_file = getattr(_cluster, "cluster_file", None)
        self._controller = _controller
        self._block = True
        self._targets: str | int | list[int] = "all"
        self._last: PendingResult | None = None
        self.closed = False

    @classmethod
    def attach(cls, connection_files: Iterable[str | os.PathLike] | str | os.PathLike,
               timeout: float = 60.0) -> "MultiEngineClient":
        """Use already-running kernels as engines 0, 1, ... in the order given.

        ``connection_files`` are Jupyter connection files (paths, or names that
        ``jupyter_client.find_connection_file`` finds, e.g. ``kernel-1234.json``): a
        colleague's notebook kernel, kernels started by hand. The client does not own them:
        ``close()`` only disconnects, the kernels keep running.
        """
        from .cluster import read_connection_files

        engines = read_connection_files(connection_files)
        return cls(_controller=Controller(engines, None, timeout=timeout))

    # ------------------------------------------------------------------ defaults and checks
    def get_ids(self) -> list[int]:
        """The ids of the engines, in order (dead ones included; see ``engines``)."""
        return self._controller.ids

    @property
    def engines(self) -> list[dict]:
        """One dict per engine: id, language, pid, host, state."""
        out = []
        for eid in self._controller.ids:
            conn = self._controller.engine(eid)
            out.append({"id": eid, "language": conn.language, "state": conn.state,
                        "pid": conn.engine_info.get("pid"), "host": conn.engine_info.get("host"),
                        "dead": conn.dead})
        return out

    @property
    def block(self) -> bool:
        return self._block

    @block.setter
    def block(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"block must be True or False, not {value!r}")
        self._block = value

    @property
    def targets(self) -> str | int | list[int]:
        return self._targets

    @targets.setter
    def targets(self, value: Any) -> None:
        self._resolve_targets(value)  # validate now, not at the next call
        self._targets = list(value) if isinstance(value, (list, tuple, range)) else value

    def _resolve_targets(self, targets: Any) -> list[int]:
        ids = self._controller.ids
        if targets is None:
            targets = self._targets
        if isinstance(targets, str):
            if targets == "all":
                return list(ids)
            raise ValueError(f"targets must be 'all', an engine id or a list of ids, not {targets!r}; "
                             f"valid ids: {ids}")
        if isinstance(targets, numbers.Integral) and not isinstance(targets, bool):
            chosen = [int(targets)]
        elif isinstance(targets, (list, tuple, range)):
            chosen = []
            for t in targets:
                if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                    raise TypeError(f"engine ids must be ints, not {t!r} ({type(t).__name__}); valid ids: {ids}")
                chosen.append(int(t))
            if not chosen:
                raise ValueError(f"targets is an empty list; valid ids: {ids}")
        else:
            raise TypeError(f"targets must be 'all', an int or a list of ints, not {targets!r} "
                            f"({type(targets).__name__}); valid ids: {ids}")
        unknown = [t for t in chosen if t not in ids]
        if unknown:
            raise ValueError(f"unknown engine id{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(str, unknown))}; valid ids: {ids}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"targets lists an engine twice: {chosen}")
        return chosen

    def _prepare(self, targets: Any, block: bool | None) -> tuple[list[int], bool]:
        if self.closed:
            raise EngineError("this MultiEngineClient is closed")
        if block is not None and not isinstance(block, bool):
            raise TypeError(f"block must be True, False or None, not {block!r}")
        eids = self._resolve_targets(targets)
        dead = [f"{e} ({self._controller.dead(e)})" for e in eids if self._controller.dead(e)]
        if dead:
            raise EngineError(f"cannot send to dead engine{'s' if len(dead) > 1 else ''} {', '.join(dead)}; "
                              "restart it or choose other targets")
        return eids, self._block if block is None else block

    def _pending(self, futures: list[cf.Future], eids: list[int], method: str,
                 finish: Callable[[list[Any]], Any], progress: bool = False) -> PendingResult:
        pr = PendingResult(futures, eids, method, finish, on_interrupt=self._controller.interrupt,
                           progress=self._show_progress if progress else None)
        self._last = pr
        return pr

    def _deliver(self, pr: PendingResult, block: bool, timeout: float | None) -> Any:
        return pr.get_result(timeout=timeout) if block else pr

    def _show_progress(self, pr: PendingResult, timeout: float | None) -> None:
        after = self.progress_after
        if after is None:
            return
        first = after if timeout is None else min(after, timeout)
        done, todo = cf.wait(pr.futures, timeout=first)
        if not todo or not _interactive() or (timeout is not None and timeout <= after):
            return
        from tqdm.auto import tqdm

        left = None if timeout is None else max(timeout - after, 0)
        with tqdm(total=len(pr.futures), desc=pr.method, unit="engine", leave=False) as bar:
            bar.update(len(done))
            try:
                for _ in cf.as_completed(todo, timeout=left):
                    bar.update(1)
            except cf.TimeoutError:
                pass

    # ------------------------------------------------------------------ running code
    def execute(self, code: str, targets: Any = None, block: bool | None = None,
                timeout: float | None = None, listener: Listener | None = None) -> Any:
        """Run ``code`` on each target; blocking returns a ``ResultList``, else a ``PendingResult``."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        eids, block = self._prepare(targets, block)
        futures = self._controller.submit_execute(eids, code, listener=listener)
        return self._deliver(self._pending(futures, eids, "execute", ResultList), block, timeout)

    def _comm(self, op: str, eids: list[int], frames: list[list[Any]], data: dict | None = None,
              listener: Listener | None = None) -> list[cf.Future]:
        return self._controller.submit_comm(eids, op, data or {}, frames, listener=listener)

    def apply(self, f: Callable, *args: Any, targets: Any = None, block: bool | None = None,
              timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` once on each target; a list of the return values."""
        if not callable(f):
            raise TypeError(f"apply needs a callable, not {type(f).__name__}")
        eids, block = self._prepare(targets, block)
        frames = serialize.check_picklable(getattr(f, "__name__", "function"), (f, args, kwargs))
        futures = self._comm("apply", eids, [frames] * len(eids))
        return self._deliver(self._pending(futures, eids, "apply", _values), block, timeout)

    # ------------------------------------------------------------------ moving data
    def push(self, namespace: dict, targets: Any = None, block: bool | None = None,
             timeout: float | None = None) -> Any:
        """Set ``namespace``'s names on each target; returns ``[None] * n``. All or nothing."""
        if not isinstance(namespace, dict):
            raise TypeError(f"push takes a dict of names to values, not {type(namespace).__name__}")
        for key in namespace:
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"cannot push to {key!r}: names must be valid Python identifiers")
        eids, block = self._prepare(targets, block)
        frames = _dumps_namespace(namespace)
        futures = self._comm("push", eids, [frames] * len(eids))
        return self._deliver(self._pending(futures, eids, "push", _nones), block, timeout)

    def pull(self, names: str | Sequence[str], targets: Any = None, block: bool | None = None,
             timeout: float | None = None) -> Any:
        """One value per target for a name; one list of values per target for several names."""
        single = isinstance(names, str)
        keys = [names] if single else list(names)
        for k in keys:
            if not isinstance(k, str):
                raise TypeError(f"names to pull must be str, not {k!r}")
        eids, block = self._prepare(targets, block)
        frames = [[]] * len(eids)
        futures = self._comm("pull", eids, frames, {"names": keys, "single": single})
        return self._deliver(self._pending(futures, eids, "pull", _values), block, timeout)

    def zip_pull(self, names: Sequence[str], targets: Any = None, block: bool | None = None,
                 timeout: float | None = None) -> Any:
        """Like ``pull(names)`` but transposed: one tuple per name, one item per engine."""
        if isinstance(names, str):
            names = [names]
        eids, block = self._prepare(targets, block)
        futures = self._comm("pull", eids, [[]] * len(eids), {"names": list(names), "single": False})
        finish = lambda rs: list(zip(*_values(rs)))  # noqa: E731
        return self._deliver(self._pending(futures, eids, "pull", finish), block, timeout)

    def push_function(self, namespace: dict, targets: Any = None, block: bool | None = None,
                      timeout: float | None = None) -> Any:
        """Push functions (serialised with cloudpickle, so lambdas and closures work)."""
        for k, v in namespace.items():
            if not callable(v):
                raise TypeError(f"push_function: {k!r} is a {type(v).__name__}, not a function")
        return self.push(namespace, targets=targets, block=block, timeout=timeout)

    def pull_function(self, names: str | Sequence[str], targets: Any = None, block: bool | None = None,
                      timeout: float | None = None) -> Any:
        """Pull functions back from the engines."""
        return self.pull(names, targets=targets, block=block, timeout=timeout)

    def __setitem__(self, name: str, value: Any) -> None:
        self.push({name: value}, block=True)

    def __getitem__(self, name: str) -> Any:
        return self.pull(name, block=True)

    def scatter(self, name: str, seq: Any, dist: str = "b", targets: Any = None,
                block: bool | None = None, timeout: float | None = None) -> Any:
        """Split ``seq`` into contiguous parts, one per target in order, and push each as ``name``."""
        if dist != "b":
            raise ValueError(f"unknown distribution {dist!r}; only 'b' (contiguous blocks) is supported")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"cannot scatter to {name!r}: not a valid Python identifier")
        eids, block = self._prepare(targets, block)
        parts = partition.split(seq, len(eids))
        frames = [serialize.check_picklable(name, {name: p}) for p in parts]
        futures = self._comm("push", eids, frames)
        return self._deliver(self._pending(futures, eids, "scatter", _nones), block, timeout)

    def gather(self, name: str, targets: Any = None, block: bool | None = None,
               timeout: float | None = None) -> Any:
        """Pull ``name`` from each target and concatenate the parts in engine order."""
        eids, block = self._prepare(targets, block)
        futures = self._comm("pull", eids, [[]] * len(eids), {"names": [name], "single": True})
        finish = lambda rs: partition.join(_values(rs))  # noqa: E731
        return self._deliver(self._pending(futures, eids, "gather", finish, progress=True), block, timeout)

    # ------------------------------------------------------------------ parallel map
    def map(self, f: Callable, *seqs: Iterable, targets: Any = None, block: bool | None = None,
            timeout: float | None = None) -> Any:
        """A parallel ``map(f, *seqs)``: items are split in contiguous blocks over the targets."""
        if not callable(f):
            raise TypeError(f"map needs a callable, not {type(f).__name__}")
        if not seqs:
            raise TypeError("map() needs at least one sequence")
        eids, block = self._prepare(targets, block)
        items = list(zip(*seqs))
        if not items:
            done: cf.Future = cf.Future()
            done.set_result([])
            return self._deliver(self._pending([done], eids[:1], "map", lambda rs: []), block, timeout)
        nparts = min(len(eids), len(items))
        eids = eids[:nparts]
        frames, datas = [], []
        for (a, b) in partition.bounds(len(items), nparts):
            frames.append(serialize.check_picklable(getattr(f, "__name__", "function"), (f, items[a:b])))
            datas.append(a)
        futures = []
        for eid, fr, off in zip(eids, frames, datas):
            futures += self._comm("map", [eid], [fr], {"offset": off})
        finish = lambda rs: partition.join(_values(rs))  # noqa: E731
        return self._deliver(self._pending(futures, eids, "map", finish, progress=True), block, timeout)

    def mapper(self, dist: str = "b", targets: Any = None, block: bool | None = None) -> "Mapper":
        """A mapper with fixed options: ``mec.mapper(targets=[0, 1]).map(f, seq)``."""
        if dist != "b":
            raise ValueError(f"unknown distribution {dist!r}; only 'b' (contiguous blocks) is supported")
        if targets is not None:
            self._resolve_targets(targets)
        return Mapper(self, targets, block)

    def parallel(self, targets: Any = None, block: bool | None = None) -> Callable[[Callable], "ParallelFunction"]:
        """Decorator: calling the function on sequences maps it over the engines."""
        if targets is not None:
            self._resolve_targets(targets)

        def decorate(f: Callable) -> ParallelFunction:
            return ParallelFunction(Mapper(self, targets, block), f)

        return decorate

    # ------------------------------------------------------------------ control
    def barrier(self, pending_results: Iterable[PendingResult], timeout: float | None = None) -> None:
        """Wait until every ``PendingResult`` is ready (errors stay in them, for ``get_result``)."""
        prs = list(pending_results)
        for pr in prs:
            if not isinstance(pr, PendingResult):
                raise TypeError(f"barrier takes PendingResult objects, not {type(pr).__name__}")
        futures = [f for pr in prs for f in pr.futures]
        eids = [e for pr in prs for e in pr.eids]
        waiter = PendingResult(futures, eids, "barrier", lambda rs: None,
                               on_interrupt=self._controller.interrupt, progress=self._show_progress)
        if not waiter.wait(timeout):
            raise TimeoutError(f"barrier not done after {timeout:g} s")

    def get_result(self, default: Any = None, block: bool = True, timeout: float | None = None) -> Any:
        """The result of the last call made through this client (what ``%result`` shows)."""
        if self._last is None:
            raise ValueError("no command has been run yet")
        return self._last.get_result(default=default, block=block, timeout=timeout)

    @property
    def last(self) -> PendingResult | None:
        """The ``PendingResult`` of the last call."""
        return self._last

    def interrupt(self, targets: Any = None) -> None:
        """Interrupt what the target engines are running (like Ctrl-C in a kernel)."""
        eids = self._resolve_targets(targets)
        if getattr(self._cluster, "launcher", None) is not None:  # ssh, scancel, MPI job
            self._cluster.interrupt(eids)
            return
        self._controller.interrupt([e for e in eids if not self._controller.dead(e)])

    def activate(self) -> "MultiEngineClient":
        """Make this client the one the ``%px``/``%autopx``/``%result`` magics use."""
        global _active
        _active = self
        return self

    def close(self) -> None:
        """Close the channels (engines keep running unless this client's ``Cluster`` owns them)."""
        global _active
        if self.closed:
            return
        self.closed = True
        if _active is self:
            _active = None
        self._controller.close()
        if self._cluster is not None:
            self._cluster.stop()

    def __enter__(self) -> "MultiEngineClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MultiEngineClient engines={self.get_ids()} targets={self._targets!r} block={self._block}>"


class Mapper:
    """``map`` with targets and block fixed in advance."""

    def __init__(self, client: MultiEngineClient, targets: Any, block: bool | None) -> None:
        self.client, self.targets, self.block = client, targets, block

    def map(self, f: Callable, *seqs: Iterable) -> Any:
        return self.client.map(f, *seqs, targets=self.targets, block=self.block)


class ParallelFunction:
    """A function that, called on sequences, runs as a parallel map (``@mec.parallel()``)."""

    def __init__(self, mapper: Mapper, f: Callable) -> None:
        self.mapper, self.func = mapper, f
        self.__name__ = getattr(f, "__name__", "parallel_function")
        self.__doc__ = getattr(f, "__doc__", None)

    def __call__(self, *seqs: Iterable) -> Any:
        return self.mapper.map(self.func, *seqs)

    def map(self, *seqs: Iterable) -> Any:
        return self.mapper.map(self.func, *seqs)


def _values(replies: list[CommReply]) -> list[Any]:
    return [serialize.loads(r.frames) for r in replies]


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

