"""One class per system under test, all with the same small interface.

Every operation blocks until the work is done on every target. An operation a system does not
have raises :class:`Unsupported`; a system that cannot start is skipped with its reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

from benchmarks import tasks

KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:"]


class Unsupported(Exception):
    """The backend has no such operation (the row is skipped with this message)."""


def _del_code(name: str) -> str:
    """Code deleting ``name`` on an engine: a statement, so that IPython's output cache
    (``Out``, ``_``) keeps no reference to the value, as ``globals().pop(name)`` would."""
    return f"if {name!r} in globals(): del globals()[{name!r}]"


def _split(seq: Any, n: int) -> list:
    """Contiguous, nearly equal parts (for peers without a scatter of their own)."""
    if isinstance(seq, np.ndarray):
        return np.array_split(seq, n)
    k, r = divmod(len(seq), n)
    out, i = [], 0
    for j in range(n):
        m = k + (1 if j < r else 0)
        out.append(seq[i : i + m])
        i += m
    return out


def _join(parts: list) -> Any:
    if parts and isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [x for p in parts for x in p]


_SHELL = None


def interactive_shell():
    """The process's one IPython InteractiveShell (for the %px rows)."""
    global _SHELL
    if _SHELL is None:
        from IPython.core.interactiveshell import InteractiveShell

        _SHELL = InteractiveShell.instance()
    return _SHELL


class Backend:
    """Base: start/stop a set of ``n`` engines and run operations on all or one of them."""

    name = "?"
    n = 0

    def start(self, n: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    # Operations; each raises Unsupported unless overridden.
    def execute_pass(self) -> None:
        raise Unsupported("no execute")

    def apply_noop(self) -> None:
        raise Unsupported("no apply")

    def px_pass(self) -> None:
        raise Unsupported("no %px")

    def push(self, name: str, value: Any, one: bool) -> None:
        raise Unsupported("no push")

    def pull(self, name: str, one: bool) -> Any:
        raise Unsupported("no pull")

    def delete(self, name: str) -> None:
        pass

    def scatter(self, name: str, seq: Any) -> None:
        raise Unsupported("no scatter")

    def gather(self, name: str) -> Any:
        raise Unsupported("no gather")

    def map(self, f: Callable, seq: list) -> list:
        raise Unsupported("no map")

    def lb_map(self, f: Callable, seq: list) -> list:
        raise Unsupported("no load-balanced map")


# --------------------------------------------------------------------------------------------
class Ours(Backend):
    """ipy_multiengine: ``Cluster(n)`` and its ``MultiEngineClient``."""

    name = "ours"

    def __init__(self) -> None:
        self.cm = None
        self.mec = None
        self._magics = None

    def start(self, n: int) -> None:
        from ipy_multiengine import Cluster

        self.n = n
        # a profile of our own: never collide with a cluster someone else runs on this machine
        self.cm = Cluster(n=n, profile=f"bench-{os.getpid()}")
        self.mec = self.cm.__enter__()
        self.mec.block = True
        self.mec.progress_after = None  # no tqdm bars in the middle of timings
        self.mec.execute("pass")

    def stop(self) -> None:
        cm, self.cm, self.mec = self.cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def execute_pass(self) -> None:
        self.mec.execute("pass")

    def apply_noop(self) -> None:
        self.mec.apply(tasks.noop)

    def px_pass(self) -> None:
        if self._magics is None:
            shell = interactive_shell()
            try:
                shell.run_line_magic("load_ext", "ipy_multiengine")
            except Exception as e:
                raise Unsupported(
                    f"%load_ext ipy_multiengine failed: {type(e).__name__}: {e}"
                ) from None
            if "px" not in shell.magics_manager.magics["line"]:
                raise Unsupported("no %px magic registered")
            self._magics = shell
        self.mec.activate()
        with contextlib.redirect_stdout(io.StringIO()):
            self._magics.run_line_magic("px", "pass")

    def push(self, name: str, value: Any, one: bool) -> None:
        self.mec.push({name: value}, targets=0 if one else "all")

    def pull(self, name: str, one: bool) -> Any:
        r = self.mec.pull(name, targets=0 if one else "all")
        return r[0] if one else r

    def delete(self, name: str) -> None:
        self.mec.execute(_del_code(name))

    def scatter(self, name: str, seq: Any) -> None:
        self.mec.scatter(name, seq)

    def gather(self, name: str) -> Any:
        return self.mec.gather(name)

    def map(self, f: Callable, seq: list) -> list:
        return self.mec.map(f, seq)

    def lb_map(self, f: Callable, seq: list) -> list:
        try:
            return self.mec.map(f, seq, balanced=True)
        except TypeError as e:
            if "balanced" not in str(e):
                raise
            raise Unsupported("map(balanced=True) not implemented yet") from None

    def engine_connection_files(self) -> list[str]:
        """Connection files of this cluster's kernels, if the core exposes them."""
        managers = getattr(self.cm, "managers", None) or {}
        return [km.connection_file for _, km in sorted(managers.items())]


# --------------------------------------------------------------------------------------------
class RawKernels(Backend):
    """Plain ipykernel kernels driven by jupyter_client's blocking clients: the floor."""

    name = "raw-jc"

    def __init__(self) -> None:
        self.kms: list = []
        self.kcs: list = []

    def start(self, n: int) -> None:
        from jupyter_client import KernelManager

        self.n = n
        self.kms = [KernelManager() for _ in range(n)]
        for km in self.kms:  # all started before any is waited for
            km.start_kernel(extra_arguments=KERNEL_ARGS)
        self.kcs = []
        for km in self.kms:
            kc = km.client()
            kc.start_channels()
            self.kcs.append(kc)
        for kc in self.kcs:
            kc.wait_for_ready(timeout=120)
        self.execute_pass()

    def stop(self) -> None:
        for kc in self.kcs:
            with contextlib.suppress(Exception):
                kc.stop_channels()
        # jupyter_client's own graceful shutdown (interrupt, shutdown_request, wait, kill), all at
        # once
        from concurrent.futures import ThreadPoolExecutor

        if self.kms:
            with ThreadPoolExecutor(len(self.kms)) as ex:
                list(ex.map(_shutdown_quietly, self.kms))
        self.kms, self.kcs = [], []

    def execute_pass(self, code: str = "pass") -> None:
        ids = [kc.execute(code) for kc in self.kcs]
        for kc, mid in zip(self.kcs, ids, strict=True):
            _wait_reply_and_idle(kc, mid)


def _shutdown_quietly(km) -> None:
    try:
        km.shutdown_kernel(now=False)
    except Exception:
        with contextlib.suppress(Exception):
            km.shutdown_kernel(now=True)


def _wait_reply_and_idle(kc, msg_id: str, timeout: float = 60) -> None:
    """Wait for the execute_reply and the status: idle of ``msg_id`` (what 'done' means)."""
    got_reply = got_idle = False
    while not got_reply:
        m = kc.get_shell_msg(timeout=timeout)
        got_reply = m["parent_header"].get("msg_id") == msg_id
    while not got_idle:
        m = kc.get_iopub_msg(timeout=timeout)
        got_idle = (
            m["parent_header"].get("msg_id") == msg_id
            and m["msg_type"] == "status"
            and m["content"]["execution_state"] == "idle"
        )


class RawSameKernels(Backend):
    """Raw jupyter_client blocking clients attached to *our* cluster's kernels (if exposed)."""

    name = "raw-same"

    def __init__(self, ours: Ours) -> None:
        self.ours = ours
        self.kcs: list = []

    def start(self, n: int) -> None:
        from jupyter_client import BlockingKernelClient

        self.n = n
        files = self.ours.engine_connection_files() if self.ours.cm else []
        if not files:
            raise Unsupported("ours exposes no kernel connection files")
        for f in files:
            kc = BlockingKernelClient(connection_file=f)
            kc.load_connection_file()
            kc.start_channels()
            self.kcs.append(kc)
        self.execute_pass()

    def stop(self) -> None:
        for kc in self.kcs:
            with contextlib.suppress(Exception):
                kc.stop_channels()
        self.kcs = []

    def execute_pass(self) -> None:
        ids = [kc.execute("pass") for kc in self.kcs]
        for kc, mid in zip(self.kcs, ids, strict=True):
            _wait_reply_and_idle(kc, mid)


# --------------------------------------------------------------------------------------------
class Ipp(Backend):
    """ipyparallel: ``Cluster(n).start_and_connect_sync()``, a DirectView and a LoadBalancedView."""

    name = "ipp"

    def __init__(self) -> None:
        self.cluster = None
        self.rc = None
        self._px = False

    def start(self, n: int) -> None:
        import ipyparallel as ipp

        self.n = n
        self.cluster = ipp.Cluster(n=n, log_level=logging.ERROR)
        try:
            self.rc = self.cluster.start_and_connect_sync()
            self.rc.wait_for_engines(n, timeout=300)
            self.dv = self.rc[:]
            self.dv.block = True
            self.one = self.rc[self.rc.ids[0]]
            self.one.block = True
            self.lv = self.rc.load_balanced_view()
            self.dv.execute("pass")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        rc, cluster, self.rc, self.cluster = self.rc, self.cluster, None, None
        self._px = False
        if rc is not None:
            with contextlib.suppress(Exception):
                rc.close()
        if cluster is not None:
            cluster.stop_cluster_sync()

    def execute_pass(self) -> None:
        self.dv.execute("pass")

    def apply_noop(self) -> None:
        self.dv.apply_sync(tasks.noop)

    def px_pass(self) -> None:
        shell = interactive_shell()
        if not self._px:
            self.dv.activate("ipp")  # registers %pxipp, leaving %px to ipy_multiengine
            self._px = True
        with contextlib.redirect_stdout(io.StringIO()):
            shell.run_line_magic("pxipp", "pass")

    def push(self, name: str, value: Any, one: bool) -> None:
        (self.one if one else self.dv).push({name: value})

    def pull(self, name: str, one: bool) -> Any:
        if one:
            return self.one.pull(name)
        return self.dv.pull(name)

    def delete(self, name: str) -> None:
        self.dv.execute(_del_code(name))

    def scatter(self, name: str, seq: Any) -> None:
        self.dv.scatter(name, seq)

    def gather(self, name: str) -> Any:
        return self.dv.gather(name)

    def map(self, f: Callable, seq: list) -> list:
        return self.dv.map_sync(f, seq)

    def lb_map(self, f: Callable, seq: list) -> list:
        return self.lv.map_sync(f, seq, chunksize=1)


# --------------------------------------------------------------------------------------------
class Dask(Backend):
    """dask.distributed: a LocalCluster of ``n`` single-threaded worker processes."""

    name = "dask"

    def __init__(self) -> None:
        self.cluster = None
        self.client = None
        self.data: dict[str, Any] = {}

    def start(self, n: int) -> None:
        from distributed import Client, LocalCluster

        self.n = n
        try:
            self.cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
            )
            self.client = Client(self.cluster)
            self.client.wait_for_workers(n)
            self.workers = sorted(self.client.scheduler_info()["workers"])
            self.client.run(tasks.noop)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        self.data.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if cluster is not None:
            cluster.close()

    def apply_noop(self) -> None:
        self.client.run(tasks.noop)  # run on every worker, like apply on all engines

    def push(self, name: str, value: Any, one: bool) -> None:
        if one:
            fut = self.client.scatter(value, workers=[self.workers[0]], hash=False, direct=True)
        else:
            fut = self.client.scatter(value, broadcast=True, hash=False, direct=True)
        self.data[name] = fut

    def pull(self, name: str, one: bool) -> Any:
        if not one:
            raise Unsupported("a dask key is fetched once, not from every worker")
        return self.client.gather(self.data[name], direct=True)

    def delete(self, name: str) -> None:
        fut = self.data.pop(name, None)
        if fut is not None:
            if isinstance(fut, list):
                for f in fut:
                    f.release()
            else:
                fut.release()

    def scatter(self, name: str, seq: Any) -> None:
        parts = _split(seq, self.n)
        self.data[name] = self.client.scatter(parts, hash=False, direct=True)

    def gather(self, name: str) -> Any:
        return _join(self.client.gather(self.data[name], direct=True))

    def map(self, f: Callable, seq: list) -> list:
        futs = self.client.map(tasks.map_chunk, [f] * self.n, _split(seq, self.n), pure=False)
        return _join(self.client.gather(futs))

    def lb_map(self, f: Callable, seq: list) -> list:
        return self.client.gather(self.client.map(f, seq, pure=False))


# --------------------------------------------------------------------------------------------
class Joblib(Backend):
    """joblib ``Parallel(n_jobs=n, backend="loky")``: loky's reusable worker processes stay up
    between calls (``get_reusable_executor``), as the other systems' workers do."""

    name = "joblib"

    def __init__(self) -> None:
        self.n = 0

    def start(self, n: int) -> None:
        try:
            import joblib  # noqa: F401
        except ImportError as e:
            raise Unsupported(f"joblib not installed ({e})") from None
        self.n = n
        if self._parallel()(self._delayed(tasks.getpid)() for _ in range(4 * n)) is None:
            raise RuntimeError("joblib returned nothing")

    def _parallel(self, **kw: Any) -> Any:
        from joblib import Parallel

        return Parallel(n_jobs=self.n, backend="loky", **kw)

    @staticmethod
    def _delayed(f: Callable) -> Callable:
        from joblib import delayed

        return delayed(f)

    def stop(self) -> None:
        if self.n:
            from joblib.externals.loky import get_reusable_executor

            get_reusable_executor().shutdown(wait=True)
            self.n = 0

    def map(self, f: Callable, seq: list) -> list:
        # one task per worker, like the DirectView-style map of the others
        parts = _split(seq, self.n)
        return _join(self._parallel()(self._delayed(tasks.map_chunk)(f, p) for p in parts))

    def lb_map(self, f: Callable, seq: list) -> list:
        # joblib's defaults: one task per item, batch_size="auto" (its adaptive batching)
        return self._parallel()(self._delayed(f)(x) for x in seq)


class PoolMap(Backend):
    """The running ``Pool``'s ``map`` with its default chunking (len / (4 * workers) items per
    chunk) for the balanced-map row: what a user of ``Pool.map`` gets without options."""

    name = "pool-map"

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def start(self, n: int) -> None:
        if self.pool.pool is None:
            raise Unsupported("needs the pool backend running")

    def stop(self) -> None:
        pass  # the pool backend owns the processes

    def lb_map(self, f: Callable, seq: list) -> list:
        return self.pool.pool.map(f, seq)


class Pool(Backend):
    """multiprocessing.Pool (spawn context: the parent has threads, fork would be unsafe)."""

    name = "pool"

    def __init__(self) -> None:
        self.pool = None

    def start(self, n: int) -> None:
        import multiprocessing

        self.n = n
        self.pool = multiprocessing.get_context("spawn").Pool(n)
        self.pool.map(tasks.noop_arg, range(n), chunksize=1)

    def stop(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
            pool.join()

    def map(self, f: Callable, seq: list) -> list:
        return self.pool.map(f, seq)

    def lb_map(self, f: Callable, seq: list) -> list:
        return self.pool.map(f, seq, chunksize=1)


# --------------------------------------------------------------------------------------------
class RawZmq(Backend):
    """One zmq PAIR socket per peer process: the floor of a zero-copy buffer transfer."""

    name = "zmq"

    def __init__(self) -> None:
        self.ctx = None
        self.socks: list = []
        self.procs: list[subprocess.Popen] = []
        self.meta: dict[str, tuple] = {}

    def start(self, n: int) -> None:
        import zmq

        self.n = n
        self.ctx = zmq.Context()
        for _ in range(n):
            s = self.ctx.socket(zmq.PAIR)
            s.setsockopt(zmq.LINGER, 0)
            port = s.bind_to_random_port("tcp://127.0.0.1")
            self.socks.append(s)
            # the same malloc tunable our Cluster gives its engines (fewer page faults on receive)
            env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.zmq_worker", str(port), str(os.getpid())],
                    env=env,
                )
            )
        for s in self.socks:
            s.send_multipart([b"clear"])
        for s in self.socks:
            s.recv()

    def stop(self) -> None:
        for s in self.socks:
            with contextlib.suppress(Exception):
                s.send(b"stop")
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in self.socks:
            s.close()
        if self.ctx is not None:
            self.ctx.term()
        self.ctx, self.socks, self.procs = None, [], []

    def push(self, name: str, value: Any, one: bool) -> None:
        socks = self.socks[:1] if one else self.socks
        self.meta[name] = (value.dtype, value.shape)
        for s in socks:
            s.send_multipart([b"push", value], copy=False)
        for s in socks:
            s.recv()

    def pull(self, name: str, one: bool) -> Any:
        socks = self.socks[:1] if one else self.socks
        dtype, shape = self.meta[name]
        for s in socks:
            s.send(b"pull")
        out = [np.frombuffer(s.recv(copy=False).buffer, dtype=dtype).reshape(shape) for s in socks]
        return out[0] if one else out

    def delete(self, name: str) -> None:
        for s in self.socks:
            s.send(b"clear")
        for s in self.socks:
            s.recv()


# --------------------------------------------------------------------------------------------
def children() -> list[psutil.Process]:
    """Every live descendant of this process."""
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def own_children() -> set[int]:
    """Pids of live descendants, minus multiprocessing's resource tracker (it lives until we
    exit)."""
    out = set()
    for p in children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                p.cmdline()
            ):
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """Wait until the processes ``pids`` have exited; return the ones still alive."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p) and _not_zombie(p)}
        if alive:
            time.sleep(0.05)
    return alive


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def env_for_children() -> None:
    """Let engines/workers import ``benchmarks`` (tasks go by reference) and the package under
    test."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = [root]
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(parts + ([old] if old else []))
    for p in reversed(parts):
        if p not in sys.path:
            sys.path.insert(0, p)
