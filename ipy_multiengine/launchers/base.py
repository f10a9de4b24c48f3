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
- ``await launcher.restart(ids)`` -> {id: new connection info}: fresh kernels for those engines
  (local engines; the others raise :class:`LauncherError` saying why they cannot).
- ``launcher.kill_now()`` synchronous best effort for finalizers and atexit.
- ``launcher.to_dict()`` / ``Launcher.from_dict(d)``: a JSON description stored in the
  cluster file, so another process (``ipmulti stop``) can stop the engines.

Most launchers start ``python -m ipy_multiengine.engine_main`` on the engines' hosts: the
launcher pre-writes each engine's connection file (key, ports 0, mode 0600, in a 0700
directory) with :func:`write_engine_files`, and waits with :func:`wait_for_engines` until
every engine has rewritten its file with the ports it bound.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from ..engine_main import READY_KEY, read_json, write_json_atomic
from ..errors import ConfigError, EngineError, EngineStartTimeout, LauncherError  # noqa: F401  (re-exported)
from ..wire import is_loopback

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")

#: Whether the default encryption policy (``transport_encryption=None``) encrypts engines that
#: listen on loopback only. CurveZMQ encrypts every message once per connection: a 100 MB push
#: to 4 engines then holds 4 ciphertext copies (+400 MB in the client) and runs several times
#: slower, while on loopback only root, who can read the key files anyway, could sniff.
ENCRYPT_LOOPBACK = False


def endpoint(info: dict, port_name: str) -> str:
    """The ZMQ address of one of an engine's channels: ``tcp://IP:PORT`` or ``ipc://PATH-N``."""
    transport = info.get("transport", "tcp")
    sep = ":" if transport == "tcp" else "-"
    return f"{transport}://{info['ip']}{sep}{info[port_name]}"


def encryption_policy(setting: str | None, ip: str) -> str:
    """jupyter_client's ``transport_encryption`` for engines bound to ``ip``: ``setting`` when
    given, else 'auto' for engines listening beyond loopback and 'disabled' on loopback."""
    if setting not in (None, "auto", "required", "disabled"):
        raise ConfigError(
            f"transport_encryption must be None, 'auto', 'required' or 'disabled', not {setting!r}",
            "transport_encryption",
        )
    if setting is not None:
        return setting
    return "auto" if ENCRYPT_LOOPBACK or not is_loopback(ip) else "disabled"


def exit_reason(code: int | None) -> str | None:
    """'exited with code N' / 'was killed by signal SIGKILL' for a return code, None if running."""
    import signal

    if code is None:
        return None
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by signal {name}"
    return f"exited with code {code}"


def new_connection_info(ip: str = "127.0.0.1", kernel_name: str = "") -> dict:
    """A connection info with a fresh key (256 random bits, as the local launcher's) and every
    port 0 (bound by the engine)."""
    info: dict[str, Any] = dict.fromkeys(PORT_NAMES, 0)
    info.update(
        ip=ip,
        transport="tcp",
        key=secrets.token_hex(32),
        signature_scheme="hmac-sha256",
        kernel_name=kernel_name,
    )
    return info


def add_curve_keys(info: dict, policy: str) -> dict:
    """Give ``info`` a fresh CurveZMQ key pair when ``policy`` ('auto', 'required') asks for
    encryption: the kernel (ipykernel) reads both from its connection file; clients get the
    public key only (:func:`connection_info` drops the secret)."""
    import zmq

    if policy in ("auto", "required"):
        if not zmq.has("curve"):
            if policy == "required":
                raise LauncherError(
                    "transport_encryption='required' but this libzmq has no CurveZMQ"
                )
            return info
        public, secret = zmq.curve_keypair()
        info.update(curve_publickey=public.decode("ascii"), curve_secretkey=secret.decode("ascii"))
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


def write_engine_files(
    work_dir: str, n: int, ip: str = "127.0.0.1", transport_encryption: str | None = None
) -> list[str]:
    """Pre-write ``engine-{i}.json`` for i in range(n): fresh key, ports 0, mode 0600, and a
    CurveZMQ key pair when the encryption policy for ``ip`` asks for one."""
    policy = encryption_policy(transport_encryption, "0.0.0.0" if ip in ("*", "") else ip)
    paths = []
    for i in range(n):
        path = engine_file(work_dir, i)
        write_json_atomic(path, add_curve_keys(new_connection_info(ip), policy))
        paths.append(path)
    return paths


def connection_info(report: dict) -> dict:
    """What a client needs from an engine report: no bookkeeping keys, no CurveZMQ secret key
    (the kernel's alone)."""
    return {k: v for k, v in report.items() if k not in (READY_KEY, "curve_secretkey")}


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


def remote_path_word(path: str, what: str = "python") -> str:
    """``path`` as one shell word for the engines' host: a leading ``~``, ``$HOME`` or
    ``${HOME}`` is that host's home directory (expanded by its shell, as a user expects), the
    rest is quoted literally; any other ``~user``, ``$VAR`` or backquote is refused up front."""
    import re
    import shlex

    m = re.fullmatch(r"(~|\$HOME|\$\{HOME\})(/.*)?", path)
    if m:
        return '"$HOME"' + (shlex.quote(m.group(2)) if m.group(2) else "")
    if path.startswith("~") or "$" in path or "`" in path:
        raise ConfigError(
            f"{what}={path!r}: only a leading ~, $HOME or ${{HOME}} is expanded on the "
            "engines' host; give an absolute path",
            what,
        )
    return shlex.quote(path)


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


#: variables of the starting process that must not reach engines from ``base``: pytest's
#: ``PYTEST_CURRENT_TEST`` names the test *this* process runs, and under it ipykernel leaves fd 1
#: and 2 uncaptured (it guards against fighting pytest's capture in its own process), so the
#: output of C code and subprocesses of engines started from a test suite went to their log
#: instead of to the caller, unlike everywhere else.
NOT_INHERITED = ("JPY_PARENT_PID", "PYTEST_CURRENT_TEST")


def engine_environment(extra: dict | None = None, base: dict | None = None) -> dict:
    """The one environment for engine processes: ``base`` (default: ours) without
    :data:`NOT_INHERITED` (our ``JPY_PARENT_PID``: jupyter_client sets its own, so engines die
    with this process), plus malloc tunables that speed up receives, this package importable,
    and ``extra`` (which may set anything)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    for name in NOT_INHERITED:
        env.pop(name, None)
    # the engines must import this very package, also when it runs from a source tree
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in paths and not _installed_elsewhere(src):
        env["PYTHONPATH"] = os.pathsep.join([src, *paths])
    env.setdefault("IPY_MULTIENGINE_CONTROLLER_HOST", controller_addresses())
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def controller_addresses() -> str:
    """This host's non-loopback IPv4 addresses, comma-separated: engines bound wide report the
    address of their interface that routes to one of them (``IPY_MULTIENGINE_CONTROLLER_HOST``)."""
    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        out += [
            a.address
            for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")
        ]
    return ",".join(out)


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
    assert rc is not None  # communicate() returned: the process has ended
    out_s, err_s = out.decode(errors="replace"), err.decode(errors="replace")
    if check and rc != 0:
        raise LauncherError(
            f"{' '.join(cmd[:3])}... exited with {rc}: {err_s.strip() or out_s.strip()}"
        )
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
        server_key = info.get("curve_publickey")
        if server_key:  # an encrypted engine refuses plaintext: it never saw the request
            sock.curve_serverkey = (
                server_key.encode() if isinstance(server_key, str) else server_key
            )
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.connect(endpoint(info, "control_port"))
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


class Launcher(abc.ABC):
    """Starts and stops one group of engines.

    Subclasses set ``name`` and implement ``_start`` (the template :meth:`start` stops what was
    started when it fails), ``stop``, ``kill_now`` and ``to_dict``/``from_dict``; they may
    override ``interrupt``, ``liveness`` and ``restart``.
    """

    name: ClassVar[str] = ""
    #: whether :meth:`restart` works (local kernels); the others raise :class:`LauncherError`
    can_restart: ClassVar[bool] = False
    #: the directory holding this group's connection files and logs (None until started)
    work_dir: str | None = None

    def __init__(
        self,
        n: int,
        *,
        kernel_name: str | None = None,
        env: dict | None = None,
        startup_timeout: float | None = 60.0,
        transport_encryption: str | None = None,
        **kw: Any,
    ):
        if kw:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {sorted(kw)}")
        encryption_policy(transport_encryption, "127.0.0.1")  # checks the value
        #: CurveZMQ as jupyter_client's setting: 'auto', 'required', 'disabled', or None (on for
        #: engines that listen beyond loopback)
        self.transport_encryption = transport_encryption
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"n must be a positive int, not {n!r}", "n")
        self.n: int = n
        self.kernel_name = kernel_name
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.engines: list[dict] = []  # connection info per engine after start()

    def started_dir(self) -> str:
        """The work directory, which ``start()`` sets (asking before it is a bug, said so)."""
        if self.work_dir is None:
            raise LauncherError(f"{self.name} launcher: no work directory yet (not started)")
        return self.work_dir

    def liveness(self, eid: int) -> Callable[[], str | None] | None:
        """A cheap synchronous probe for the controller: a reason once engine ``eid`` is known
        to be dead, else None; must not block (it runs on the I/O loop). None (the default):
        this client cannot poll the engine's process, so the controller watches it by
        heartbeats instead."""
        return None

    async def start(self) -> list[dict]:
        """Start every engine; on any failure (Ctrl-C included) stop what was started, then
        raise."""
        try:
            self.engines = list(await self._start())
        except BaseException as exc:
            try:
                await asyncio.shield(self.stop(timeout=2.0))
            except BaseException as stop_exc:
                self.kill_now()
                exc.add_note(f"stopping the engines that had started failed too: {stop_exc}")
            raise
        return self.engines

    async def add(self, n: int) -> dict[int, dict]:
        """Start ``n`` more engines in the running cluster: ``{id: connection info}``."""
        raise LauncherError(
            f"the {self.name} launcher cannot add engines to a running cluster (only 'local' "
            "can); start a new cluster with more engines",
            method="add",
        )

    async def send_signal(self, ids: Iterable[int], signum: int) -> None:
        """Send signal ``signum`` to engines ``ids``."""
        raise LauncherError(
            f"the {self.name} launcher cannot send signals to single engines (only 'local' "
            "can); interrupt them with mec.interrupt()",
            method="send_signal",
        )

    async def remove(self, ids: Iterable[int]) -> None:
        """Stop and forget engines ``ids`` (undoing a failed ``add``); launchers that cannot
        add engines have none to remove."""
        return None

    @abc.abstractmethod
    async def _start(self) -> list[dict]:
        """Start the engines; connection info per engine, index = engine id."""

    @abc.abstractmethod
    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every engine started; idempotent. Raises :class:`LauncherError` naming what is
        left running when it could not."""

    async def restart(self, ids: Iterable[int]) -> dict[int, dict]:
        """Fresh kernels for engines ``ids``; their new connection info by id."""
        raise LauncherError(
            f"engines started by the {self.name!r} launcher cannot be restarted one "
            "by one; stop the cluster and start a new one",
            method="restart",
        )

    async def retry_after_clash(self, eid: int) -> dict | None:
        """When engine ``eid`` died because another process took one of its ports, start it
        again on new ports and return its new connection info; else None."""
        return None

    async def interrupt(self, ids: Iterable[int] | None = None) -> None:
        """Default: interrupt_request on each engine's control channel."""
        targets = range(len(self.engines)) if ids is None else ids
        await asyncio.gather(*(interrupt_via_control(self.engines[i]) for i in targets))

    def engine_meta(self) -> dict[int, dict]:
        """Per engine id: kernel_name (= group), pid and host, as far as the launcher knows."""
        return {
            i: {
                "group": info.get("kernel_name") or self.kernel_name or "python3",
                "kernel_name": info.get("kernel_name") or self.kernel_name or "python3",
                "pid": info.get("pid"),
                "host": info.get("hostname") or info.get("ssh_host"),
            }
            for i, info in enumerate(self.engines)
        }

    @abc.abstractmethod
    def kill_now(self) -> None:
        """Synchronous best-effort stop (finalizers, atexit, Ctrl-C during start)."""

    def to_dict(self) -> dict:
        """JSON-able state that :meth:`from_dict` turns back into a launcher able to stop and
        interrupt the same engines from another process."""
        return {"launcher": self.name}

    @classmethod
    def from_dict(cls, data: dict) -> Launcher:
        raise LauncherError(
            f"launcher {cls.name!r} cannot be restored from a cluster file", method="restore"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} n={self.n}>"

    def _remove_files(self) -> None:
        """Remove ``work_dir`` (connection files, logs) once the engines are gone."""
        if self.work_dir and os.path.isdir(self.work_dir):
            shutil.rmtree(self.work_dir, ignore_errors=True)
