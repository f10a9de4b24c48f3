"""The launcher interface and the helpers launchers share.

A *launcher* starts a group of engines (ordinary Jupyter kernels) and hands back each
engine's connection info; the cluster then connects its controller to them. Launchers are
asynchronous: every method runs on the controller's event loop.

Protocol (see :class:`Launcher`):

- ``await launcher.start()`` -> list of connection-info dicts, index = engine id
  (``ip``, ``transport``, the five ports, ``key``, ``signature_scheme``; may carry extra keys
  such as ``engine_id``, ``pid``, ``hostname``).
- ``await launcher.stop()`` stops every engine it started; idempotent.
- ``await launcher.interrupt(ids=None)`` sends SIGINT-like interrupts.
- ``await launcher.poll()`` -> list of bools, one per engine: still running?
- ``launcher.kill_now()`` synchronous best effort for finalizers and atexit.
- ``launcher.to_dict()`` / ``Launcher.from_dict(d)``: a JSON description stored in the
  cluster file, so another process (``ipmulti stop``) can stop the engines.

Most launchers start ``python -m ipy_multiengine.engine_main`` on the engines' hosts: the
launcher pre-writes each engine's connection file (key, ports 0, mode 0600, in a 0700
directory) with :func:`write_engine_files`, and waits with :func:`wait_for_engines` until
every engine has rewritten its file with the ports it bound.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from ..engine_main import READY_KEY, read_json, write_json_atomic

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class LauncherError(RuntimeError):
    """A launcher could not start, reach or stop its engines."""


class EngineStartTimeout(LauncherError, TimeoutError):
    """Some engines never reported within the startup timeout (``missing`` lists them)."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


def new_connection_info(ip: str = "127.0.0.1", kernel_name: str = "") -> dict:
    """A connection info with a fresh key and every port 0 (bound by the engine)."""
    info: dict[str, Any] = dict.fromkeys(PORT_NAMES, 0)
    info.update(
        ip=ip,
        transport="tcp",
        key=uuid.uuid4().hex,
        signature_scheme="hmac-sha256",
        kernel_name=kernel_name,
    )
    return info


def make_work_dir(base: str | None = None, prefix: str = "ipmulti-") -> str:
    """A fresh 0700 directory for the connection files of one cluster.

    ``base`` defaults to ``jupyter_runtime_dir()/ipy_multiengine``; for launchers whose
    engines run on other hosts (Slurm) it must be on a file system those hosts share.
    """
    if base is None:
        from ..clusterfile import runtime_dir

        base = str(runtime_dir())
    os.makedirs(base, mode=0o700, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(path, 0o700)
    return path


def engine_file(work_dir: str, engine_id: int | str) -> str:
    return os.path.join(work_dir, f"engine-{engine_id}.json")


def write_engine_files(work_dir: str, n: int, ip: str = "127.0.0.1") -> list[str]:
    """Pre-write ``engine-{i}.json`` for i in range(n): fresh key, ports 0, mode 0600."""
    paths = []
    for i in range(n):
        path = engine_file(work_dir, i)
        write_json_atomic(path, new_connection_info(ip))
        paths.append(path)
    return paths


def connection_info(report: dict) -> dict:
    """The connection-info part of an engine report (drops our bookkeeping keys)."""
    return {k: v for k, v in report.items() if k != READY_KEY}


async def wait_for_engines(
    paths: list[str],
    timeout: float | None,
    *,
    alive: Callable[[], Any] | None = None,
    what: str = "engines",
    interval: float = 0.05,
) -> list[dict]:
    """Wait until every file in ``paths`` carries an engine's report; return the reports.

    ``alive()`` is called on every round: it returns None while the launch may still
    succeed, or a message explaining why it cannot (the job died, ...), which is raised as
    :class:`LauncherError`. On timeout, :class:`EngineStartTimeout` names the engines that
    never appeared.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    reports: dict[int, dict] = {}
    rounds = 0
    while True:
        for i, path in enumerate(paths):
            if i not in reports:
                data = read_json(path)
                if data and data.get(READY_KEY):
                    reports[i] = connection_info(data)
        if len(reports) == len(paths):
            return [reports[i] for i in range(len(paths))]
        if alive is not None and rounds % 10 == 0:
            problem = alive()
            if inspect.isawaitable(problem):
                problem = await problem
            if problem:
                # the last engines may have reported just before the job ended
                missing = [i for i in range(len(paths)) if i not in reports]
                raise LauncherError(f"{what}: {problem} (engines never started: {missing})")
        if deadline is not None and time.monotonic() > deadline:
            missing = [i for i in range(len(paths)) if i not in reports]
            raise EngineStartTimeout(
                f"{what}: engine(s) {', '.join(map(str, missing))} never reported "
                f"within the startup timeout of {timeout:g} s",
                missing,
            )
        rounds += 1
        await asyncio.sleep(interval)


def find_executable(name: str, near: str | None = None) -> str | None:
    """``name`` next to the Python ``near`` (a venv's bin), next to ours, then on PATH."""
    if os.path.isabs(name):
        return name if os.access(name, os.X_OK) else None
    for python in (near, sys.executable):
        if python:
            candidate = os.path.join(os.path.dirname(python), name)
            if os.access(candidate, os.X_OK):
                return candidate
    return shutil.which(name)


def engine_environment(extra: dict | None = None) -> dict:
    """Environment for engine processes: ours, plus malloc tunables that speed up receives."""
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    # the engines must import this very package, also when it runs from a source tree
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in paths and not _installed_elsewhere(src):
        env["PYTHONPATH"] = os.pathsep.join([src, *paths])
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def _installed_elsewhere(src: str) -> bool:
    """True when ``src`` is a site-packages directory (the package is installed)."""
    return os.path.basename(src) in ("site-packages", "dist-packages")


async def run_command(
    cmd: list[str],
    *,
    input: bytes | None = None,
    timeout: float | None = 30.0,
    env: dict | None = None,
    check: bool = True,
) -> tuple[int, str, str]:
    """Run ``cmd`` to completion; returns (returncode, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    rc = proc.returncode
    out_s, err_s = out.decode(errors="replace"), err.decode(errors="replace")
    if check and rc != 0:
        raise LauncherError(f"{' '.join(cmd[:3])}... exited with {rc}: {err_s.strip() or out_s.strip()}")
    return rc, out_s, err_s


async def _control_request(info: dict, msg_type: str, content: dict, timeout: float) -> dict | None:
    """Send one request on an engine's control channel; its reply content, or None if none came."""
    import zmq
    import zmq.asyncio
    from jupyter_client.session import Session

    session = Session(
        key=info["key"].encode() if isinstance(info["key"], str) else info["key"],
        signature_scheme=info.get("signature_scheme", "hmac-sha256"),
    )
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"{info.get('transport', 'tcp')}://{info['ip']}:{info['control_port']}")
        session.send(sock, session.msg(msg_type, content))
        if not await sock.poll(timeout * 1000):
            return None
        _, parts = session.feed_identities(await sock.recv_multipart())
        return session.deserialize(parts)["content"]
    except (zmq.ZMQError, KeyError, OSError, ValueError):
        return None
    finally:
        sock.close()


async def interrupt_via_control(info: dict, timeout: float = 5.0) -> bool:
    """Send ``interrupt_request`` on an engine's control channel; True when it replied ok.

    Works for any kernel, wherever it runs, as long as its control port is reachable (the
    kernel interrupts itself with SIGINT). Used for engines we cannot signal directly.
    """
    reply = await _control_request(info, "interrupt_request", {}, timeout)
    return reply is not None and reply.get("status") == "ok"


async def shutdown_via_control(info: dict, timeout: float = 5.0) -> bool:
    """Send ``shutdown_request`` on an engine's control channel; True when it replied.

    A kernel that shuts down this way exits normally (atexit handlers run: MPI_Finalize,
    which removes MPI's shared-memory segments that a killed rank would leave behind).
    """
    return await _control_request(info, "shutdown_request", {"restart": False}, timeout) is not None


class Launcher:
    """Starts and stops one group of engines. Subclasses set ``name`` and implement
    ``start``, ``stop``, ``interrupt``, ``poll``, ``kill_now`` and ``to_dict``/``from_dict``.
    """

    name: ClassVar[str] = ""
    #: the directory holding this group's connection files and logs (None until started)
    work_dir: str | None = None

    def __init__(
        self,
        n: int | None = None,
        *,
        kernel_name: str | None = None,
        env: dict | None = None,
        startup_timeout: float | None = 60.0,
        **kw: Any,
    ):
        if kw:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {sorted(kw)}")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"n must be a positive int, not {n!r}")
        self.n = n
        self.kernel_name = kernel_name
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.engines: list[dict] = []  # connection info per engine after start()

    def liveness(self, eid: int) -> Callable[[], str | None]:
        """A cheap synchronous probe for the controller: a reason once engine ``eid`` is
        known to be dead, else None. Must not block (it runs on the I/O loop)."""
        return lambda: None

    async def start(self) -> list[dict]:
        raise NotImplementedError

    async def stop(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    async def interrupt(self, ids: Iterable[int] | None = None) -> None:
        """Default: interrupt_request on each engine's control channel."""
        targets = range(len(self.engines)) if ids is None else ids
        await asyncio.gather(*(interrupt_via_control(self.engines[i]) for i in targets))

    async def poll(self) -> list[bool]:
        raise NotImplementedError

    def kill_now(self) -> None:
        """Synchronous best-effort stop (finalizers, atexit, Ctrl-C during start)."""

    def to_dict(self) -> dict:
        """JSON-able state that :meth:`from_dict` turns back into a launcher able to stop,
        interrupt and poll the same engines from another process."""
        return {"launcher": self.name}

    @classmethod
    def from_dict(cls, data: dict) -> Launcher:
        raise NotImplementedError(f"launcher {cls.name!r} cannot be restored from a cluster file")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} n={self.n}>"

    def _remove_files(self) -> None:
        """Remove ``work_dir`` (connection files, logs) once the engines are gone."""
        if self.work_dir and os.path.isdir(self.work_dir):
            shutil.rmtree(self.work_dir, ignore_errors=True)


def dumps(data: dict) -> str:
    return json.dumps(data, sort_keys=True)
