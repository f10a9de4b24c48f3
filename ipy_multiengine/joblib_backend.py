"""The joblib backend ``"ipy_multiengine"``: ``joblib.Parallel`` (and so scikit-learn's
``n_jobs``) on the engines.

Importing this module, or calling ``mec.register_joblib_backend()``, registers it; then::

    with joblib.parallel_config(backend="ipy_multiengine"):
        GridSearchCV(..., n_jobs=-1).fit(X, y)

Each joblib batch is one task of an ``EngineExecutor`` (``executor.py``): load balanced over
the engines, each engine one batch at a time, joblib's own auto-batching on top. Which client:
``client=`` given to ``parallel_config``, else the one ``register_joblib_backend`` was called
on, else the active client (``mec.activate()``). Nested ``Parallel`` calls inside a task run
sequentially in their engine (an engine is one worker; they would oversubscribe its host).

joblib shares one backend between the ``Parallel`` calls of a ``parallel_config`` block, and a
``return_as="generator"`` call may still be running when the next call starts. So each call
has an executor of its own: a later call never cancels an earlier one's batches (as with
loky's shared pool), and a call's abort (an error, ``Parallel(timeout=)``, Ctrl-C, its
generator dropped) stops only its own: its queued batches are dropped and its running ones
interrupted on their engines (as loky kills its workers), whatever else the engines run goes
on. Only a call's own abort (or its ``Parallel`` called again) shuts its executor down: the
end of another call (``terminate``, which joblib calls naming no call) only forgets the
executors of calls that have ended, so it cannot pull one from under a running call.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import weakref
from typing import Any

import joblib
from joblib.parallel import AutoBatchingMixin, ParallelBackendBase, SequentialBackend

from .executor import EngineExecutor

__all__ = ["NAME", "EngineBackend", "register"]

#: the name the backend is registered under
NAME = "ipy_multiengine"


class EngineBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``ParallelBackendBase`` over a ``MultiEngineClient``'s engines."""

    supports_retrieve_callback = True
    default_n_jobs = -1

    def __init__(
        self,
        client: Any = None,
        targets: Any = None,
        balanced: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.client = client
        self.targets = targets
        self.balanced = balanced
        #: each Parallel call's executor (weak: a call that is gone needs none)
        self._executors: weakref.WeakKeyDictionary[Any, EngineExecutor] = (
            weakref.WeakKeyDictionary()
        )
        self._used: int | None = None  # engines per call, from the last configure
        #: each call's own engine count (from its configure): a call that needs a new executor
        #: (its own forgotten by another call's end, or shut down by its abort) keeps its n_jobs
        self._sizes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        #: guards ``_executors`` (callback threads submit while the caller's thread ends calls)
        self._lock = threading.Lock()

    def _client(self) -> Any:
        if self.client is not None:
            return self.client
        from .client import get_active

        active = get_active()
        if active is None:
            raise RuntimeError(
                "the ipy_multiengine joblib backend has no client: call "
                "mec.register_joblib_backend(), mec.activate(), or pass "
                "parallel_config(backend='ipy_multiengine', client=mec)"
            )
        return active

    def _engines(self) -> list[int]:
        """The target engines, in order."""
        from .targets import resolve as resolve_targets

        client = self._client()
        targets = client.targets if self.targets is None else self.targets
        return list(resolve_targets(targets, client.controller.ids, client.groups))

    def _executor_for(self, parallel: Any) -> EngineExecutor | None:
        """The executor of the ``Parallel`` call ``parallel`` (made when it has none, or has a
        shut down one), or None while it aborts: an aborting call gets no new executor (a batch
        dispatched as its abort shut its executor down would run on)."""
        with self._lock:
            executor = self._executors.get(parallel) if parallel is not None else None
            if executor is not None and not executor.is_shutdown:
                return executor
            if _aborting(parallel):
                return None
            eids = self._engines()
            used = self._sizes.get(parallel, self._used) if parallel is not None else self._used
            executor = EngineExecutor(
                self._client(), balanced=self.balanced, targets=eids[: used or len(eids)]
            )
            if parallel is not None:
                self._executors[parallel] = executor
            return executor

    def _engines_for(self, n_jobs: int | None) -> int:
        """How many engines run batches: every target engine (``n_jobs=-1`` or None), all but
        ``-n_jobs - 1`` of them for other negative values, at most ``n_jobs`` otherwise."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        engines = len(self._engines())
        if n_jobs is None:
            return engines
        if n_jobs < 0:
            return max(engines + 1 + n_jobs, 1)
        return min(n_jobs, engines)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """What joblib is told: the engines that run batches (``_engines_for``), but never 1
        unless ``n_jobs=1`` was asked for: joblib runs an effective ``n_jobs`` of 1 itself, in
        this process, and a single target engine must still be where the tasks run."""
        used = self._engines_for(n_jobs)
        return used if n_jobs == 1 else max(used, 2)

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        self.parallel = parallel
        # n_jobs below the engines' number: only that many engines run batches at once
        self._used = used = self._engines_for(n_jobs)
        with self._lock:
            if parallel is not None:
                self._sizes[parallel] = used
            old = self._executors.pop(parallel, None) if parallel is not None else None
        if old is not None:  # this same Parallel called again: its earlier call is over
            old.shutdown(wait=False, cancel_futures=True)
        self._executor_for(parallel)
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Any, callback: Any = None) -> Any:
        """One joblib batch as one executor task; ``callback`` runs on the executor's
        completion thread (never on the client's I/O thread). The batch goes to the executor
        of the call it belongs to (joblib's callback names it)."""
        owner = getattr(callback, "parallel", None) or getattr(self, "parallel", None)
        future = self._submit(owner, func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _submit(self, owner: Any, func: Any) -> cf.Future:
        """``func`` on ``owner``'s executor; a cancelled future (never run) once it aborts; a
        failed one when it cannot be sent (an argument that cannot be pickled, a closed
        client): joblib sends its later batches from a done-callback, where a raised error is
        only logged by ``concurrent.futures`` and the call would wait for the batch forever."""
        try:
            while (executor := self._executor_for(owner)) is not None:
                try:
                    return executor.submit(func)
                except RuntimeError:
                    if not executor.is_shutdown:
                        raise
                    # shut down between the lookup and the submit: by its own call's abort
                    # (then no executor is made again), else the next one is made fresh
        except Exception as exc:
            failed: cf.Future = cf.Future()
            failed.set_exception(exc)
            return failed
        dropped: cf.Future = cf.Future()
        dropped.cancel()
        return dropped

    def retrieve_result_callback(self, out: Any) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Stop the aborting call: its batches not sent yet are cancelled, its running ones
        interrupted on their engines (only those: other calls' batches, and whatever else the
        engines run or have queued, go on). It dispatches no more batches (``_submit``)."""
        # joblib has no argument naming the aborting call: Parallel._abort sets its
        # ``_aborting`` flag just before calling this. It is looked for among every configured
        # call, not only those with an executor: one that aborts before it sent a batch may
        # have none, and the last configured call (the fallback for a joblib that sets no
        # flag) may be another one, still running
        with self._lock:
            aborting = [p for p in {*self._sizes, *self._executors} if _aborting(p)]
            stopped = [
                self._executors.pop(p, None)
                for p in aborting or [getattr(self, "parallel", None)]
                if p is not None
            ]
        for executor in stopped:  # outside the lock: cancelling runs joblib's callbacks
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True, interrupt=True)

    def terminate(self) -> None:
        """A call is over (joblib does not say which): forget the executors of the calls that
        have ended (not running, nothing pending). Nothing is shut down here: an executor with
        nothing pending holds no thread, and one found by a call between its lookup and its
        submit stays usable, whichever call ends meanwhile."""
        with self._lock:
            for parallel, executor in list(self._executors.items()):
                if not getattr(parallel, "_running", False) and not executor.pending:
                    self._executors.pop(parallel, None)

    def get_nested_backend(self) -> tuple[Any, int | None]:
        level = (self.nesting_level or 0) + 1
        return SequentialBackend(nesting_level=level), None


def _aborting(parallel: Any) -> bool:
    """Whether the ``Parallel`` call ``parallel`` is aborting (joblib's flag, set before it
    calls ``abort_everything`` and reset when the ``Parallel`` is called again)."""
    return bool(getattr(parallel, "_aborting", False))


def register(client: Any = None, name: str = NAME, make_default: bool = False) -> None:
    """Register the backend as ``name``, bound to ``client`` if given, while that client is
    open (after ``close()`` the backend uses the active client)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, not {name!r}")

    # a weak reference: the registration (global, for the process's lifetime) neither keeps
    # the client alive nor outlives it -- once it is closed or gone, the backend uses the
    # active client, as an unbound registration does
    bound = weakref.ref(client) if client is not None else None

    def factory(**kwargs: Any) -> EngineBackend:
        target = bound() if bound is not None else None
        if target is not None and not getattr(target, "closed", False):
            kwargs.setdefault("client", target)
        return EngineBackend(**kwargs)

    joblib.register_parallel_backend(name, factory, make_default=make_default)


register()
