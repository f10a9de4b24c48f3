"""``launcher='mpi'``: all engines are the ranks of one ``mpiexec -n N`` job.

Engine id = MPI rank. Every rank runs ``python -m ipy_multiengine.engine_main``, which
initialises MPI (mpi4py) before the kernel starts, so code sent with ``%px`` can use
``MPI.COMM_WORLD`` collectives between engines.

The job is one group: ``interrupt()`` interrupts every rank (interrupting only some ranks of
a collective would leave the others blocked in it), and ``stop()`` ends the whole job
(SIGTERM to ``mpiexec``, which takes its ranks down; SIGKILL to its process group after the
timeout).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable

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


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_alive(pgid: int) -> bool:
    return _signal_group(pgid, 0)


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
        **kw,
    ):
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
        self.pid: int | None = None  # mpiexec, leader of its own process group
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
            engine_file(self.work_dir, "{engine_id}"),
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
        return await wait_for_engines(
            paths, self.startup_timeout, alive=self._problem, what=f"mpi launcher ({cmd[0]})"
        )

    def _output_tail(self, limit: int = 2000) -> str:
        try:
            with open(self.output_path, errors="replace") as f:
                return f.read()[-limit:]
        except (OSError, TypeError):
            return ""

    def _problem(self) -> str | None:
        if self.proc is not None and self.proc.returncode is not None:
            return f"mpiexec exited with {self.proc.returncode}:\n{self._output_tail()}"
        return None

    def liveness(self, eid: int):
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
                    try:
                        proc.send_signal(signal.SIGINT)
                    except Exception:  # psutil.NoSuchProcess: gone meanwhile
                        pass
                    continue
            tasks.append(interrupt_via_control(info))
        if tasks:
            await asyncio.gather(*tasks)

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask every rank to shut down (they exit normally, MPI_Finalize cleans up), wait for
        mpiexec; after ``timeout``, SIGTERM to mpiexec, then SIGKILL to its group."""
        if self.pid is None:
            self._remove_files()
            return
        pgid = self.pid
        if self.engines and self.proc is not None and self.proc.returncode is None:
            await asyncio.gather(*(shutdown_via_control(e, timeout) for e in self.engines))
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        if self.proc is None:  # restored from a cluster file: signal the whole group
            _signal_group(pgid, signal.SIGTERM)
        else:
            _terminate(self.proc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and _group_alive(pgid):
            if self.proc is not None and self.proc.returncode is None:
                try:
                    await asyncio.wait_for(self.proc.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
                continue
            # mpiexec is gone: take down whatever rank is left in its group
            _signal_group(pgid, signal.SIGTERM)
            await asyncio.sleep(0.05)
        self._kill_tree()
        if self.proc is not None and self.proc.returncode is None:
            await self.proc.wait()
        self.pid = None
        self._remove_files()

    def _kill_tree(self) -> None:
        """SIGKILL mpiexec, its proxies and the ranks on this host. Hydra puts proxies and
        ranks in sessions of their own, so signalling mpiexec's group is not enough."""
        import psutil

        from ..engine_main import pid_runs_engine

        procs = []
        if self.pid is not None:
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
            _signal_group(self.pid, signal.SIGKILL)
        for info in self.engines:
            pid = info.get("pid")
            if pid and _is_local(info.get("hostname")) and self.work_dir:
                if pid_runs_engine(pid, engine_file(self.work_dir, "{engine_id}")):
                    try:
                        procs.append(psutil.Process(pid))
                    except psutil.Error:
                        pass
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if procs:
            psutil.wait_procs(procs, timeout=2)
            _remove_orphan_shm(self.started)

    def kill_now(self) -> None:
        self._kill_tree()
        self.pid = None
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
        # mpiexec's group is signalled only if the pid still is that mpiexec (never by pid alone;
        # the cluster file records its identity); otherwise only ranks verified by command line
        if (
            data.get("hostname") == socket.gethostname()
            and same_process(data.get("identity"))[0] is not None
        ):
            self.pid = data.get("pid")
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
            try:
                os.unlink(path)
            except OSError:
                pass


def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
