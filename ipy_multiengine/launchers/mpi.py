"""``launcher='mpi'``: all engines are the ranks of one ``mpiexec -n N`` job.

Engine id = MPI rank. Every rank runs ``python -m ipy_multiengine.engine_main``, which
initialises MPI (mpi4py) before the kernel starts, so code sent with ``%px`` can use
``MPI.COMM_WORLD`` collectives between engines.

The job is one group: ``interrupt()`` interrupts every rank (interrupting only some ranks of
a collective would leave the others blocked in it), and ``stop()`` ends the whole job
(each rank is asked to shut down; after the timeout SIGTERM, then SIGKILL, to mpiexec,
everything under it and the job's ranks on this host, each checked by psutil first).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from .base import (
    Launcher,
    LauncherError,
    engine_environment,
    engine_file,
    find_executable,
    interrupt_via_control,
    make_work_dir,
    shutdown_via_control,
    wait_for_engines,
    write_engine_files,
)


def _is_local(hostname: str | None) -> bool:
    return hostname in (None, socket.gethostname())


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _send(proc: psutil.Process, sig: int) -> None:
    """Signal ``proc`` if it still is the process psutil saw (create time re-checked)."""
    with contextlib.suppress(psutil.Error):  # gone meanwhile, its pid reused, or not ours
        proc.send_signal(sig)


async def _wait_exit(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Has our child ``proc`` exited within ``timeout``?"""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return False


class MPILauncher(Launcher):
    """Start ``n`` engines as one MPI job.

    Options: ``mpiexec`` (path or name; default: the ``mpiexec`` next to this Python, else
    on PATH), ``mpiexec_args`` (extra arguments, e.g. ``['-hosts', 'a,b']`` or Open MPI's
    ``['--oversubscribe']``), ``python`` (the engines' interpreter), ``ip`` (the address
    the kernels bind: ``'127.0.0.1'`` for one machine, ``'*'`` when ranks run on other
    hosts), ``env`` (extra environment), ``work_dir`` (for the connection files; shared by
    all hosts), ``kernel_args`` (extra IPKernelApp arguments).
    """

    name = "mpi"

    def __init__(
        self,
        n: int | None = None,
        *,
        mpiexec: str | None = None,
        mpiexec_args: Iterable[str] = (),
        python: str | None = None,
        ip: str = "127.0.0.1",
        work_dir: str | None = None,
        kernel_args: Iterable[str] = (),
        startup_timeout: float | None = 60.0,
        **kw: Any,
    ) -> None:
        super().__init__(
            4 if n is None else n, startup_timeout=startup_timeout, **kw
        )  # 4 engines by default, like local
        self.python = python or sys.executable
        self.mpiexec = mpiexec or "mpiexec"
        self.mpiexec_args = list(mpiexec_args)
        self.ip = ip
        self.work_dir_base = work_dir
        self.work_dir: str | None = None
        self.kernel_args = list(kernel_args)
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None  # mpiexec's
        #: mpiexec as psutil saw it when it started (or as the cluster file's identity proved
        #: it): psutil re-checks its create time before signalling, so no reused pid is hit
        self._root: psutil.Process | None = None
        self.output_path: str | None = None
        self.started: float | None = None  # wall clock, for shared memory killed ranks leave

    def command(self) -> list[str]:
        mpiexec = find_executable(self.mpiexec, near=self.python)
        if mpiexec is None:
            raise LauncherError(
                f"mpi launcher: {self.mpiexec!r} not found (install MPI, e.g. "
                "`pip install mpich mpi4py`, or pass mpiexec='/path/to/mpiexec')"
            )
        return [
            mpiexec,
            "-n",
            str(self.n),
            *self.mpiexec_args,
            self.python,
            "-m",
            "ipy_multiengine.engine_main",
            "--connection-file",
            engine_file(self.started_dir(), "{engine_id}"),
            "--mpi",
            "yes",
            *(["--", *self.kernel_args] if self.kernel_args else []),
        ]

    async def _start(self) -> list[dict]:
        self.work_dir = make_work_dir(self.work_dir_base, prefix="ipmulti-mpi-")
        paths = write_engine_files(self.work_dir, self.n, self.ip, self.transport_encryption)
        env = engine_environment(self.env)
        if os.geteuid() == 0:  # Open MPI refuses root without these; MPICH ignores them
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        self.output_path = os.path.join(self.work_dir, "mpiexec.log")
        self.started = time.time()
        cmd = self.command()
        from ..engine_main import open_private

        with open_private(self.output_path) as out:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        try:
            self._root = psutil.Process(self.pid)
        except psutil.Error:  # mpiexec is gone already: wait_for_engines reports why
            self._root = None
        return await wait_for_engines(
            paths, self.startup_timeout, alive=self._problem, what=f"mpi launcher ({cmd[0]})"
        )

    def _output_tail(self, limit: int = 2000) -> str:
        if self.output_path is None:
            return ""
        try:
            with open(self.output_path, errors="replace") as f:
                return f.read()[-limit:]
        except OSError:
            return ""

    def _problem(self) -> str | None:
        if self.proc is not None and self.proc.returncode is not None:
            return f"mpiexec exited with {self.proc.returncode}:\n{self._output_tail()}"
        return None

    def liveness(self, eid: int) -> Callable[[], str | None]:
        def probe() -> str | None:
            if self.proc is not None and self.proc.returncode is not None:
                return f"ended with its MPI job (mpiexec exited with {self.proc.returncode})"
            return None

        return probe

    async def interrupt(self, ids: Iterable[int] | None = None) -> None:
        """Interrupt every rank (the job is one group, whatever ``ids`` says)."""
        tasks = []
        for info in self.engines:
            pid = info.get("pid")
            if pid and _is_local(info.get("hostname")) and self.work_dir:
                from ..engine_main import engine_process

                # only if the pid still runs this job's engine (never by pid alone)
                proc = engine_process(pid, engine_file(self.work_dir, "{engine_id}"))
                if proc is not None:
                    _send(proc, signal.SIGINT)
                    continue
            tasks.append(interrupt_via_control(info))
        if tasks:
            await asyncio.gather(*tasks)

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask every rank to shut down (they exit normally, MPI_Finalize cleans up) and wait for
        mpiexec; after ``timeout``, SIGTERM to the job's processes, then SIGKILL to those left."""
        if self._root is None and not self.engines:
            self.pid = None
            self._remove_files()
            return
        if self.engines and self.proc is not None and self.proc.returncode is None:
            await asyncio.gather(*(shutdown_via_control(e, timeout) for e in self.engines))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout)
        procs = self._job_processes()
        for proc in procs:  # mpiexec forwards SIGTERM to its ranks; the others get it directly
            _send(proc, signal.SIGTERM)
        alive = await self._wait(procs, timeout)
        if alive:
            for proc in alive:
                _send(proc, signal.SIGKILL)
            await self._wait(alive, 2.0)
            _remove_orphan_shm(self.started)
        self.pid = self._root = None
        self._remove_files()

    def _job_processes(self) -> list[psutil.Process]:
        """mpiexec, everything under it (Hydra's proxies and the ranks: they run in sessions of
        their own, so mpiexec's process group is not enough) and the ranks on this host that
        still are this job's engines (their command line names the job's connection files),
        whoever their parent is by now. Never a bare pid: psutil re-checks each process's
        create time before it signals it."""
        procs: dict[int, psutil.Process] = {}
        root = self._root
        if root is not None and _running(root):
            procs[root.pid] = root
            with contextlib.suppress(psutil.Error):
                procs.update((p.pid, p) for p in root.children(recursive=True))
        if self.work_dir:
            from ..engine_main import engine_process

            pattern = engine_file(self.work_dir, "{engine_id}")
            for info in self.engines:
                pid = info.get("pid")
                if pid and pid not in procs and _is_local(info.get("hostname")):
                    proc = engine_process(pid, pattern)
                    if proc is not None:
                        procs[pid] = proc
        return list(procs.values())

    async def _wait(self, procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
        """Wait up to ``timeout`` for ``procs`` to end; those still running. mpiexec, when it is
        our child, is awaited through asyncio (which reaps it); the rest through psutil, in a
        worker thread so the event loop is not blocked."""
        own = self.proc if self.proc is not None and self.proc.returncode is None else None
        others = [p for p in procs if own is None or p.pid != own.pid]
        waits: list[Any] = [asyncio.to_thread(psutil.wait_procs, others, timeout)]
        if own is not None:
            waits.append(_wait_exit(own, timeout))
        results = await asyncio.gather(*waits)
        alive = [p for p in results[0][1] if _running(p)]
        if own is not None and not results[1]:
            alive.extend(p for p in procs if p.pid == own.pid)
        return alive

    def _kill_tree(self) -> None:
        """SIGKILL mpiexec, its proxies and the ranks on this host, and wait briefly."""
        procs = self._job_processes()
        for proc in procs:
            _send(proc, signal.SIGKILL)
        if procs:
            # our own mpiexec child is reaped by asyncio's child watcher, not by psutil here
            own = self.proc.pid if self.proc is not None else None
            psutil.wait_procs([p for p in procs if p.pid != own], timeout=2)
            _remove_orphan_shm(self.started)

    def kill_now(self) -> None:
        self._kill_tree()
        self.pid = self._root = None
        self._remove_files()

    def to_dict(self) -> dict:
        return {
            "launcher": self.name,
            "n": self.n,
            "pid": self.pid,
            "hostname": socket.gethostname(),
            "work_dir": self.work_dir,
            "started": self.started,
            "engines": self.engines,
        }

    @classmethod
    def from_dict(cls, data: dict) -> MPILauncher:
        from ..clusterfile import same_process

        self = cls(data["n"])
        # mpiexec and its tree are signalled only if the pid still is that mpiexec (not by pid;
        # the cluster file records its identity); otherwise only ranks verified by command line
        if data.get("hostname") == socket.gethostname():
            self._root = same_process(data.get("identity"))[0]
            if self._root is not None:
                self.pid = self._root.pid
        self.work_dir = data.get("work_dir")
        self.started = data.get("started")
        self.engines = data.get("engines", [])
        return self

    def __repr__(self) -> str:
        return f"<MPILauncher n={self.n} mpiexec pid={self.pid}>"


def _remove_orphan_shm(since: float | None, directory: str = "/dev/shm") -> None:
    """Remove MPICH shared-memory segments created since ``since`` that no process maps.

    Ranks that exit normally remove them in MPI_Finalize; killed ranks leave them behind
    (several MB of memory each, and a later job with the same name would attach to them).
    """
    if since is None or not os.path.isdir(directory):
        return
    import glob

    candidates = []
    for path in glob.glob(os.path.join(directory, "mpich_shm_*")):
        try:
            if os.stat(path).st_mtime >= since - 1:
                candidates.append(path)
        except OSError:
            pass
    if not candidates:
        return
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                for line in f:
                    if "mpich_shm_" in line:
                        mapped.add(line.split()[-1].replace(" (deleted)", ""))
        except OSError:
            pass
    for path in candidates:
        if path not in mapped:
            with contextlib.suppress(OSError):
                os.unlink(path)
