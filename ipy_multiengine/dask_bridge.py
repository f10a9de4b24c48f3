"""``mec.become_dask()`` / ``mec.stop_dask()``: the engines as a dask.distributed cluster.

The scheduler runs in this (the client's) process, in a thread of its own with its own event
loop (a ``distributed.LocalCluster`` with no workers of its own, no dashboard); each target
engine runs one ``distributed.Worker`` in a thread of the engine process, with its own event
loop, so a busy cell does not stall the worker's heartbeats and dask tasks run in the engine
process next to its namespace. ``stop_dask`` closes the workers and the scheduler; the engines
keep their namespaces (the bridge adds no names) and stay usable.

Security: every dask connection is TLS with a certificate made for this cluster
(``distributed.Security.temporary()``, kept in memory, handed to the engines over the signed
engine channels): the scheduler and the workers accept only peers holding it. They listen on
127.0.0.1 by default; ``host=`` opens them to other machines (remote engines) and still
requires the certificate.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from .errors import CompositeError, EngineError

__all__ = ["become_dask", "stop_dask"]

#: per client, its running dask cluster
_bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
log = logging.getLogger("ipy_multiengine")
_lock = threading.Lock()


class _Bridge:
    def __init__(self, cluster: Any, client: Any, eids: list[int]) -> None:
        self.cluster, self.client, self.eids = cluster, client, eids


def become_dask(
    mec: Any,
    targets: Any = None,
    host: str = "127.0.0.1",
    nthreads: int = 1,
    timeout: float = 60.0,
    **worker_kwargs: Any,
) -> Any:
    """Start a scheduler here and one worker in each target engine; a ``distributed.Client``."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be an address to listen on, not {host!r}")
    if not isinstance(nthreads, int) or isinstance(nthreads, bool) or nthreads < 1:
        raise ValueError(f"nthreads must be a positive int, not {nthreads!r}")
    for key in ("scheduler_ip", "security", "host", "name"):
        if key in worker_kwargs:
            raise TypeError(f"become_dask sets the workers' {key!r} itself")
    from .targets import resolve

    eids = resolve(mec.targets if targets is None else targets, mec.controller.ids, mec.groups)
    down = {e: why for e in eids if (why := mec.controller.unavailable(e))}
    if down:
        raise EngineError(
            "; ".join(f"engine {e} {why}" for e, why in down.items()), next(iter(down))
        )
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    deadline = time.monotonic() + timeout

    def left() -> float:  # one deadline for the whole start (a timeout is a promise)
        return max(deadline - time.monotonic(), 0.01)

    with _lock:
        if mec in _bridges:
            raise RuntimeError("this client already runs a dask cluster: mec.stop_dask() first")
        _bridges[mec] = None  # reserved while starting
    try:
        import distributed
        from distributed.security import Security

        security = Security.temporary()
        cluster = distributed.LocalCluster(
            n_workers=0,
            processes=False,
            host=host,
            scheduler_port=0,
            dashboard_address=None,
            security=security,
            silence_logs=logging.WARN,  # dask's own default for LocalCluster
        )
        try:
            address = cluster.scheduler_address
            listen = host if host in ("127.0.0.1", "localhost", "::1") else None
            started = [
                mec.apply(
                    _start_worker,
                    address,
                    security,
                    nthreads,
                    listen,
                    f"engine-{eid}",
                    left(),
                    worker_kwargs,
                    targets=eid,
                    block=False,
                )
                for eid in eids
            ]
            mec.barrier(started, timeout=left())
            for pr in started:
                pr.get_result(block=False)  # a CompositeError naming the engine
            client = distributed.Client(cluster, security=security, timeout=left())
            client.wait_for_workers(len(eids), timeout=left())
        except BaseException:
            try:  # whatever started: stopped, and the original error raised
                # not waited for: an engine still busy runs the stop after its start (one
                # engine's requests keep their order); the caller's timeout is already spent
                if live := _live(mec, eids):
                    mec.apply(_stop_worker, 10.0, targets=live, block=False)
            except BaseException as exc:
                log.warning("become_dask: stopping the workers after a failure: %s", exc)
            cluster.close()
            raise
    except BaseException:
        with _lock:
            _bridges.pop(mec, None)
        raise
    with _lock:
        _bridges[mec] = _Bridge(cluster, client, list(eids))
    return client


def stop_dask(mec: Any, timeout: float = 30.0) -> None:
    """Close the workers in the engines, the scheduler and the ``distributed.Client``."""
    with _lock:
        bridge = _bridges.get(mec)
        if bridge is None:
            raise RuntimeError("no dask cluster runs on this client's engines (mec.become_dask())")
        del _bridges[mec]
    try:
        bridge.client.close()
        _stop_workers(mec, bridge.eids, timeout)
    finally:
        bridge.cluster.close()


def stop_on_close(mec: Any, timeout: float = 10.0) -> None:
    """``mec.close()``: stop the client's dask cluster if one runs (its scheduler would
    otherwise listen, with its threads, until this process ends); never raises."""
    with _lock:
        running = _bridges.get(mec) is not None
    if not running:
        return
    try:
        stop_dask(mec, timeout=timeout)
    except Exception as exc:
        log.warning("closing the client: stopping its dask cluster failed: %s", exc)


def _live(mec: Any, eids: list[int]) -> list[int]:
    return [e for e in eids if not mec.controller.dead(e)]


def _stop_workers(mec: Any, eids: list[int], timeout: float) -> None:
    live = _live(mec, eids)
    if not live:
        return
    try:
        mec.apply(_stop_worker, timeout, targets=live, block=True, timeout=timeout + 5)
    except CompositeError as exc:
        # an engine that died meanwhile has no worker left to stop
        real = [e for e in exc.elist if not isinstance(e, EngineError)]
        if real:
            raise


# ---------------------------------------------------------------------- inside an engine
#: the worker of this engine: its thread, loop and ``distributed.Worker``
_engine_worker: dict[str, Any] = {}


def _start_worker(
    address: str,
    security: Any,
    nthreads: int,
    host: str | None,
    name: str,
    timeout: float,
    kwargs: dict,
) -> dict:
    """Runs in an engine: start a worker for ``address`` in a thread; its address and pid.
    Its scratch space (spilled data) is a private directory (0700), removed by ``_stop_worker``.
    """
    import asyncio
    import contextlib
    import os
    import tempfile

    from distributed import Worker

    if _engine_worker:
        raise RuntimeError("a dask worker already runs in this engine")
    # the worker's INFO lines (started, connected, closing) would be every later cell's stderr
    logging.getLogger("distributed").setLevel(logging.WARNING)
    ready, running = threading.Event(), threading.Event()
    box = _engine_worker  # filled by the worker's thread: seen by _stop_worker even if late
    kwargs = dict(kwargs)
    if "local_directory" not in kwargs:
        box["scratch"] = kwargs["local_directory"] = tempfile.mkdtemp(prefix="ipme-dask-")

    async def main() -> None:
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        running.set()
        try:
            worker = Worker(
                address,
                nthreads=nthreads,
                security=security,
                host=host,
                dashboard=False,
                name=name,
                **kwargs,
            )
            box["worker"] = worker
            await worker
        except BaseException as exc:
            box["error"] = exc
            if "worker" in box:  # cancelled while connecting (start timed out): closed
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(box["worker"].close(), 10)
            ready.set()
            return
        ready.set()
        await worker.finished()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.name = "ipy_multiengine-dask-worker"
    box["thread"] = thread
    thread.start()
    started = ready.wait(timeout)
    if "error" in box:
        error = box["error"]
        _remove_scratch(box)
        box.clear()
        raise error
    if not started:
        # a worker still connecting would start later, for nobody: cancel it and wait for its
        # thread, so that the engine is left as it was
        if running.wait(15):
            box["loop"].call_soon_threadsafe(box["task"].cancel)
        thread.join(15)
        _remove_scratch(box)
        box.clear()
        raise TimeoutError(f"the dask worker did not start within {timeout:g} s")
    return {"pid": os.getpid(), "address": box["worker"].address}


def _stop_worker(timeout: float) -> bool:
    """Runs in an engine: close its worker and wait for the thread; False if none ran."""
    import asyncio

    if not _engine_worker:
        return False
    state = dict(_engine_worker)
    _engine_worker.clear()
    try:
        if "worker" in state:
            fut = asyncio.run_coroutine_threadsafe(state["worker"].close(), state["loop"])
            fut.result(timeout)
        state["thread"].join(timeout)
        if state["thread"].is_alive():
            raise TimeoutError(f"the dask worker thread did not end within {timeout:g} s")
    finally:
        _remove_scratch(state)
    return True


def _remove_scratch(state: dict) -> None:
    import shutil

    if state.get("scratch"):
        shutil.rmtree(state["scratch"], ignore_errors=True)
