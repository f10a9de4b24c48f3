"""``launcher='local'``: kernels on this machine through jupyter_client's kernel managers.

The one way local engines start: ``Cluster(n=4)`` (and ``ipmulti start``) own a
``LocalLauncher``. Each engine is an ``AsyncKernelManager`` with its own connection file and
log (mode 0600) in the launcher's directory; engines restart through :meth:`restart`, keeping
their ids and ports; an engine that lost a port to another process between jupyter_client
choosing it and the kernel binding it is started again on new ports.

Because engines are started by ``AsyncKernelManager`` from a kernelspec, any kernelspec whose
metadata names a jupyter_client *kernel provisioner* (Docker, Kubernetes, YARN... from the
gateway provisioners) starts its engines wherever that provisioner puts them, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, EngineError, TargetsError
from .base import (
    Launcher,
    LauncherError,
    encryption_policy,
    engine_environment,
    exit_reason,
    make_work_dir,
)

#: ``_execute_sleep=0``: ipykernel sleeps 0.5 ms after every execute so that clients which do
#: not wait for ``status: idle`` see the output first; the controller always waits for idle.
KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:", "--IPythonKernel._execute_sleep=0"]


def kernel_args(km: Any) -> list[str]:
    """``KERNEL_ARGS`` for ipykernel-based kernels only (others may reject unknown options)."""
    try:
        argv = " ".join(km.kernel_spec.argv)
    except Exception:
        return []
    return list(KERNEL_ARGS) if ("ipykernel" in argv or "bash_kernel" in argv) else []


#: the longest unix socket path Linux accepts (sun_path is 108 bytes with its NUL)
UNIX_PATH_MAX = 107
#: Bytes of an engine's log read for the output its process wrote itself before it died.
OWN_OUTPUT_BYTES = 16384

log = logging.getLogger("ipy_multiengine")


def _remove_engine_files(km: Any) -> None:
    """Remove a stopped kernel's connection file and every unix socket it had (the kernel's
    five, which jupyter_client removes only when it cleans up, and the engine helper's fast
    socket, which it does not know: ``clusterfile.remove_sockets``)."""
    from ..clusterfile import remove_sockets

    remove_sockets(km.get_connection_info(session=False))
    Path(km.connection_file).unlink(missing_ok=True)


def _fits(prefix: str) -> bool:
    """Do ``PREFIX-N`` socket paths fit in a unix socket address (room for the port number)?"""
    return len(os.fsencode(prefix)) + 8 <= UNIX_PATH_MAX


class LocalLauncher(Launcher):
    """``n`` kernels of kernelspec ``kernel_name`` (default ``python3``), started concurrently.

    ``kernel_names`` (engine id -> kernelspec) mixes kernelspecs; ``work_dir`` is the 0700
    directory for connection files and logs (default: a fresh one under the runtime dir, removed
    on stop), ``tag`` names the files in it; ``env`` is the engines' whole environment (default:
    this process's); ``kernel_args`` replaces :data:`KERNEL_ARGS`; ``transport_encryption`` as
    jupyter_client's (None: on unless the kernels listen beyond loopback); ``transport``: 'ipc'
    (unix sockets in the 0700 directory: the default where possible) or 'tcp'; ``shutdown_wait``:
    seconds a shutdown request gets before SIGTERM, then as long again before SIGKILL.
    """

    name = "local"
    can_restart = True

    def __init__(
        self,
        n: int | None = None,
        *,
        kernel_names: dict[int, str] | None = None,
        work_dir: str | os.PathLike | None = None,
        tag: str | None = None,
        kernel_args: Iterable[str] | None = None,
        shutdown_wait: float = 3.0,
        transport: str | None = None,
        **kw: Any,
    ):
        env = kw.pop("env", None)
        if kernel_names:
            n = len(kernel_names)
        super().__init__(4 if n is None else n, **kw)  # 4 engines by default
        self.kernel_name = self.kernel_name or "python3"
        self.kernel_names = (
            dict(kernel_names) if kernel_names else dict.fromkeys(range(self.n), self.kernel_name)
        )
        self.base_env = None if env is None else dict(env)
        self.work_dir_base = None if work_dir is None else str(work_dir)
        self.tag = tag or f"local-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.kernel_args = None if kernel_args is None else list(kernel_args)
        self.shutdown_wait = shutdown_wait
        if transport not in (None, "ipc", "tcp"):
            raise ConfigError(
                f"transport must be None, 'ipc' or 'tcp', not {transport!r}", "transport"
            )
        #: 'ipc': unix sockets in the 0700 directory, so no other local user can connect (a
        #: TCP port on loopback, IOPub above all, is open to every user of the machine); None
        #: (default): 'ipc' where unix sockets exist and the paths fit, else 'tcp'
        self.transport = transport
        self.key = secrets.token_hex(32)
        self.managers: dict[int, Any] = {}
        #: each engine's log size when its current kernel started (its output begins there)
        self._log_starts: dict[int, int] = {}
        #: the private directory of the unix sockets when the work directory's path is too long
        self.socket_dir: str | None = None

    # ------------------------------------------------------------------ files
    def log_file(self, eid: int) -> Path:
        """Engine ``eid``'s stdout and stderr (the kernel's own, e.g. why it died)."""
        return Path(self._dir(), f"engine-{self.tag}-{eid}.log")

    def log_tail(self, eid: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file(eid).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def own_output(self, eid: int, lines: int = 20, limit: int = OWN_OUTPUT_BYTES) -> str:
        """The last ``lines`` lines engine ``eid``'s current kernel wrote to its log (since its
        last start or restart; at most ``limit`` bytes read: quick enough for the I/O loop),
        or "" when it wrote none. A crash's traceback is put first only when a fatal signal
        killed the kernel: the log also holds what its children wrote to their stderr (a
        worker's own crash), which is not the engine's."""
        start = self._log_starts.get(eid, 0)
        proc = getattr(getattr(self.managers.get(eid), "provisioner", None), "process", None)
        code = proc.poll() if proc is not None else None
        crashed = proc is None or (code is not None and -code in FATAL_SIGNALS)
        try:
            with open(self.log_file(eid), "rb") as f:
                size = f.seek(0, os.SEEK_END)
                begin = max(start, size - limit)
                f.seek(begin)
                data = f.read(limit)
        except OSError:
            return ""
        text = data.decode(errors="replace").splitlines()
        if begin > start and text:
            text = text[1:]  # read from the middle of a line
        return "\n".join(_last_words(text, lines) if crashed else text[-lines:]).strip("\n")

    def _dir(self) -> str:
        if self.work_dir is None:
            if self.work_dir_base is not None:
                os.makedirs(self.work_dir_base, mode=0o700, exist_ok=True)
                self.work_dir = self.work_dir_base
            else:
                self.work_dir = make_work_dir(prefix="ipmulti-local-")
        return self.work_dir

    def _open_log(self, eid: int, mode: str) -> Any:
        from ..engine_main import open_private

        try:  # where the output of the kernel started now begins (``own_output``)
            self._log_starts[eid] = os.path.getsize(self.log_file(eid)) if "a" in mode else 0
        except OSError:
            self._log_starts[eid] = 0
        return open_private(str(self.log_file(eid)), mode)

    def _remove_files(self) -> None:
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None
        if self.work_dir_base is None:
            super()._remove_files()  # our own directory
            return
        for eid in self.kernel_names:  # a shared directory: only our files
            self.log_file(eid).unlink(missing_ok=True)
            Path(self._dir(), f"engine-{self.tag}-{eid}.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------ starting
    def environment(self) -> dict[str, str]:
        """The engines' environment (see :func:`~.base.engine_environment`)."""
        return engine_environment(self.env, base=self.base_env)

    def _new_manager(self, eid: int) -> Any:
        from jupyter_client.manager import AsyncKernelManager

        km = AsyncKernelManager(
            kernel_name=self.kernel_names[eid],
            connection_file=os.path.join(self._dir(), f"engine-{self.tag}-{eid}.json"),
        )
        km.session.key = self.key.encode()
        km.shutdown_wait_time = self.shutdown_wait
        ipc = self._ipc_prefix(eid)
        if ipc is not None:
            km.transport, km.ip = "ipc", ipc
        if ipc is None and self.transport is None and self.transport_encryption is None:
            # no unix socket possible: loopback TCP, whose IOPub port every local user can
            # subscribe to without a key, so encrypt by default (the kernelspec permitting)
            log.warning(
                "engine %s: no unix socket path fits (TMPDIR too long); using loopback TCP "
                "with CurveZMQ encryption where the kernelspec supports it",
                eid,
            )
            km.transport_encryption = "auto"
        else:
            km.transport_encryption = encryption_policy(
                self.transport_encryption, "127.0.0.1" if ipc else km.ip
            )
        self.managers[eid] = km
        return km

    def _ipc_prefix(self, eid: int) -> str | None:
        """The unix-socket path prefix of engine ``eid`` (``PREFIX-1`` .. ``PREFIX-5``), or None
        for TCP (asked for, or no unix sockets). The sockets live in the 0700 work directory;
        when its path is too long for a unix socket (a deep runtime dir, a long profile name),
        in a private 0700 directory of their own under the temporary directory instead."""
        if self.transport == "tcp" or not hasattr(socket, "AF_UNIX"):
            return None
        prefix = os.path.join(self._dir(), f"ipc-{self.tag}-{eid}")
        if _fits(prefix):
            return prefix
        prefix = os.path.join(self._socket_dir(), str(eid))
        if _fits(prefix):
            return prefix
        if self.transport == "ipc":
            raise LauncherError(
                f"transport='ipc': the socket path {prefix!r} is too long for a unix "
                "socket; set TMPDIR or JUPYTER_RUNTIME_DIR to a shorter directory",
                eid,
            )
        return None

    def _socket_dir(self) -> str:
        """A short private (0700, unpredictable name) directory for the engines' unix sockets,
        removed with the launcher's other files."""
        if self.socket_dir is None:
            import tempfile

            self.socket_dir = tempfile.mkdtemp(prefix="ipme-")
        return self.socket_dir

    def _args(self, km: Any) -> list[str]:
        return kernel_args(km) if self.kernel_args is None else list(self.kernel_args)

    async def _start_kernel(self, eid: int, km: Any, env: dict, log_mode: str = "wb") -> None:
        with self._open_log(eid, log_mode) as out:
            await km.start_kernel(extra_arguments=self._args(km), env=env, stdout=out, stderr=out)

    async def _start(self) -> list[dict]:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        env = self.environment()
        for eid in self.kernel_names:
            self._new_manager(eid)
        start = asyncio.gather(
            *(self._start_kernel(eid, km, env) for eid, km in self.managers.items()),
            return_exceptions=True,
        )
        try:
            results = await asyncio.wait_for(start, self.startup_timeout)
        except asyncio.TimeoutError:
            raise LauncherError(
                f"local launcher: kernels not started within {self.startup_timeout:g} s"
            ) from None
        for eid, res in zip(list(self.managers), results, strict=True):
            if isinstance(res, NoSuchKernel):
                names = sorted(KernelSpecManager().find_kernel_specs())
                raise ConfigError(
                    f"no kernelspec named {self.kernel_names[eid]!r}; available: {names}",
                    "kernel_name",
                ) from None
            if isinstance(res, BaseException):
                raise LauncherError(
                    f"engine {eid} failed to start: {res}\n{self.log_tail(eid)}", eid
                ) from res
        await asyncio.sleep(0)
        for eid in self.managers:  # an engine that died at once: report its own stderr
            reason = self.liveness(eid)()
            if reason:
                raise LauncherError(
                    f"engine {eid} {reason} during startup; its output:\n{self.log_tail(eid)}", eid
                )
        return [self.connection_info(eid) for eid in sorted(self.managers)]

    def connection_info(self, eid: int) -> dict:
        """What a client needs to reach engine ``eid``: no CurveZMQ secret key (the kernel's
        alone)."""
        km = self.managers[eid]
        info = km.get_connection_info(session=False)
        info["key"] = self.key
        info.pop("curve_secretkey", None)
        if isinstance(info.get("curve_publickey"), bytes):
            info["curve_publickey"] = info["curve_publickey"].decode("ascii")
        info.update(
            engine_id=eid,
            pid=getattr(km.provisioner, "pid", None),
            hostname=socket.gethostname(),
            kernel_name=self.kernel_names[eid],
        )
        return info

    def _refresh(self, eid: int) -> dict:
        info = self.connection_info(eid)
        if eid < len(self.engines):
            self.engines[eid] = info
        return info

    # ------------------------------------------------------------------ control
    def liveness(self, eid: int) -> Callable[[], str | None]:
        def probe() -> str | None:
            km = self.managers.get(eid)
            proc = getattr(getattr(km, "provisioner", None), "process", None)
            return exit_reason(proc.poll()) if proc is not None else "has no process"

        return probe

    async def restart(self, ids: Iterable[int]) -> dict[int, dict]:
        """Restart engines ``ids`` on their ports (jupyter_client's restart), fresh namespaces."""
        ids = list(ids)
        unknown = [e for e in ids if e not in self.managers]
        if unknown:
            raise TargetsError(f"unknown engine ids {unknown}; valid ids: {sorted(self.managers)}")

        async def one(eid: int) -> None:
            with self._open_log(eid, "ab") as out:
                await self.managers[eid].restart_kernel(now=True, stdout=out, stderr=out)

        await asyncio.gather(*(one(e) for e in ids))
        return {eid: self._refresh(eid) for eid in ids}

    async def add(self, n: int) -> dict[int, dict]:
        """Start ``n`` more engines (kernelspec ``kernel_name``), ids after the highest one;
        if any fails to start, the ones this call started are stopped and the error raised."""
        first = max(self.kernel_names, default=-1) + 1
        ids = list(range(first, first + n))
        env = self.environment()
        for eid in ids:
            self.kernel_names[eid] = self.kernel_name or "python3"
            self._new_manager(eid)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(self._start_kernel(eid, self.managers[eid], env) for eid in ids),
                    return_exceptions=True,
                ),
                self.startup_timeout,
            )
            for eid, res in zip(ids, results, strict=True):
                if isinstance(res, BaseException):
                    raise LauncherError(
                        f"engine {eid} failed to start: {res}\n{self.log_tail(eid)}", eid
                    ) from res
        except BaseException:
            await asyncio.shield(self.remove(ids))
            raise
        self.n += n
        self.engines.extend(self.connection_info(eid) for eid in ids)
        return {eid: self.connection_info(eid) for eid in ids}

    async def remove(self, ids: Iterable[int]) -> None:
        """Stop engines ``ids`` and forget them (what ``add`` undoes when it fails)."""
        for eid in list(ids):
            km = self.managers.pop(eid, None)
            self.kernel_names.pop(eid, None)
            if km is None:
                continue
            try:
                await km.shutdown_kernel(now=True)
            except Exception:
                self._kill(km)
            _remove_engine_files(km)

    def port_clash(self, eid: int) -> bool:
        """Did engine ``eid`` die because another process took one of its ports meanwhile?"""
        return "Address already in use" in self.log_tail(eid, 40)

    async def retry_after_clash(self, eid: int) -> dict | None:
        if eid not in self.managers or not self.port_clash(eid):
            return None
        with contextlib.suppress(Exception):
            await self.managers[eid].shutdown_kernel(now=True)
        km = self._new_manager(eid)
        await self._start_kernel(eid, km, self.environment())
        return self._refresh(eid)

    async def interrupt(self, ids: Iterable[int] | None = None) -> None:
        """Through the kernel managers: a signal or a message, as each kernelspec says."""
        targets = list(self.managers) if ids is None else [i for i in ids if i in self.managers]
        results = await asyncio.gather(
            *(self.managers[i].interrupt_kernel() for i in targets), return_exceptions=True
        )
        # one engine's failure must not stop the others, nor go unseen
        for eid, res in zip(targets, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("could not interrupt engine %s: %s: %s", eid, type(res).__name__, res)

    async def send_signal(self, ids: Iterable[int], signum: int) -> None:
        """Through the kernel managers (their own process handles, never a pid from a file):
        each engine's process group, as jupyter_client signals kernels."""
        ids = list(ids)
        unknown = [e for e in ids if e not in self.managers]
        if unknown:
            raise TargetsError(f"unknown engine ids {unknown}; valid ids: {sorted(self.managers)}")
        # a kernel whose process has exited (and been reaped) has only a number left: its
        # process group id may already be another session's. Polled here, a running process
        # keeps its pid (only this process reaps it) until the signal below is sent.
        gone = [e for e in ids if not self._running(self.managers[e])]
        if gone:
            raise EngineError(
                f"engine{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))}: the "
                "process has exited; no signal sent (restart it first)",
                gone[0],
            )
        for eid in ids:
            await self.managers[eid].signal_kernel(signum)

    def engine_meta(self) -> dict[int, dict]:
        host = socket.gethostname()
        return {
            eid: {
                "group": self.kernel_names[eid],
                "kernel_name": self.kernel_names[eid],
                "pid": getattr(km.provisioner, "pid", None),
                "host": host,
                "connection_file": km.connection_file,
                "log_file": str(self.log_file(eid)),
            }
            for eid, km in self.managers.items()
        }

    # ------------------------------------------------------------------ stopping
    async def stop(self, timeout: float | None = None) -> None:
        """Shut kernels down concurrently: a shutdown request, then SIGTERM/SIGKILL if they
        linger; every manager's resources (ports, connection file) are cleaned up."""
        wait = self.shutdown_wait if timeout is None else timeout

        async def down(km: Any) -> None:
            try:
                km.shutdown_wait_time = wait
                if await km.is_alive():
                    await asyncio.wait_for(km.shutdown_kernel(now=False), wait + 2)
                else:
                    await km.cleanup_resources()
            except Exception:
                try:
                    await km.shutdown_kernel(now=True)
                except Exception:
                    self._kill(km)

        managers = list(self.managers.values())
        await asyncio.gather(*(down(km) for km in managers), return_exceptions=True)
        left = [km for km in managers if self._running(km)]
        for km in managers:
            if not self._running(km):  # a live kernel's files stay: the record of what runs
                _remove_engine_files(km)
            else:
                Path(km.connection_file).unlink(missing_ok=True)
        self.managers.clear()
        self._remove_files()
        if left:
            raise LauncherError(
                "local launcher: kernels still running after stop: pids "
                + ", ".join(str(km.provisioner.pid) for km in left),
                method="stop",
            )

    @staticmethod
    def _running(km: Any) -> bool:
        proc = getattr(getattr(km, "provisioner", None), "process", None)
        return proc is not None and proc.poll() is None

    @staticmethod
    def _kill(km: Any) -> None:
        proc = getattr(getattr(km, "provisioner", None), "process", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)

    def kill_now(self) -> None:
        for km in self.managers.values():
            self._kill(km)
            Path(km.connection_file).unlink(missing_ok=True)
        self.managers.clear()
        self._remove_files()

    def to_dict(self) -> dict:
        return {
            "launcher": self.name,
            "n": self.n,
            "kernel_name": self.kernel_name,
            "pids": [e.get("pid") for e in self.engines],
            "hostname": socket.gethostname(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> LocalLauncher:
        """A launcher without kernel managers: another process stops these engines by their
        identities in the cluster file (see ``cluster.clean_stale``), not through it."""
        return cls(data["n"], kernel_name=data.get("kernel_name"))


#: how the traceback a crashing engine's faulthandler writes begins (``engine._install_crash_dump``)
FATAL_ERROR = "Fatal Python error: "
#: the signals faulthandler writes that traceback for
FATAL_SIGNALS = frozenset(
    int(getattr(signal, name))
    for name in ("SIGSEGV", "SIGFPE", "SIGABRT", "SIGBUS", "SIGILL")
    if hasattr(signal, name)
)


def _last_words(text: list[str], lines: int) -> list[str]:
    """The last ``lines`` lines of ``text``; when they end in a crash's traceback (faulthandler
    prints the innermost frame first, the user's code, and the kernel's own frames below it),
    the first ``lines`` lines of the traceback instead (of the crashing thread when it has every
    thread's), after the last ``lines`` lines written before it (a C library's message before
    its abort)."""
    at = next((i for i in range(len(text) - 1, -1, -1) if text[i].startswith(FATAL_ERROR)), None)
    if at is None:
        return text[-lines:]
    before, dump = text[:at][-lines:], text[at:]
    current = next((i for i, line in enumerate(dump) if line.startswith("Current thread ")), None)
    if current is not None:  # every thread's stack (all_threads): the crashing one's first
        others = sum(line.startswith("Thread ") for line in dump[:current])
        dump = [dump[0], f"  ({others} other threads' stacks in the log)", *dump[current:]]
    if len(dump) > lines:
        dump = [*dump[:lines], f"  ... ({len(dump) - lines} more lines in the log)"]
    return [*before, *dump]
