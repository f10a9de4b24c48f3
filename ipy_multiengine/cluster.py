"""Starting and stopping local engines, and the cluster file other processes connect with.

A cluster file is JSON, mode 0600, in ``jupyter_runtime_dir()/ipy_multiengine/`` (mode 0700)::

    {"profile": "default", "owner_pid": 123, "host": "box", "created": 1700000000.0,
     "engines": [{"id": 0, "pid": 456, "host": "box", "kernel_name": "python3",
                  "connection": {... a Jupyter connection file's content ...}}, ...]}
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import secrets
import signal
import socket
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable

from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir

from . import _loop
from .errors import EngineError, NoClusterError, TimeoutError

log = __import__("logging").getLogger("ipy_multiengine")

#: ``_execute_sleep=0``: ipykernel sleeps 0.5 ms after every execute so that clients which do
#: not wait for ``status: idle`` see the output first; the controller always waits for idle.
KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:", "--IPythonKernel._execute_sleep=0"]
HOW_TO_START = "start one with `ipmulti start -n 4 --daemon`, or in Python: `with Cluster(n=4) as mec: ...`"


# ---------------------------------------------------------------------- cluster files
def cluster_dir() -> Path:
    """``jupyter_runtime_dir()/ipy_multiengine``, created with mode 0700."""
    path = Path(jupyter_runtime_dir()) / "ipy_multiengine"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def cluster_file_path(profile: str = "default") -> Path:
    if not profile or "/" in profile or profile.startswith("."):
        raise ValueError(f"invalid profile name {profile!r}")
    return cluster_dir() / f"cluster-{profile}.json"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def pid_alive(pid: int | None) -> bool:
    """True when process ``pid`` exists on this host and is not a zombie."""
    if not pid:
        return False
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def read_cluster(path: str | os.PathLike) -> dict:
    """Read and validate a cluster file; errors name the file and what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NoClusterError(f"cluster file {path} does not exist; {HOW_TO_START}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed cluster file {path}: not valid JSON ({exc})") from None
    problems = _validate(spec)
    if problems:
        raise ValueError(f"malformed cluster file {path}: {problems}")
    if spec.get("host") == socket.gethostname() and spec.get("owner_pid") and not pid_alive(spec["owner_pid"]):
        raise NoClusterError(
            f"cluster file {path} is stale: its owner process {spec['owner_pid']} is gone; "
            f"`ipmulti list` cleans it up; {HOW_TO_START}")
    return spec


def _validate(spec: Any) -> str:
    if not isinstance(spec, dict):
        return "the top level must be a JSON object"
    engines = spec.get("engines")
    if not isinstance(engines, list) or not engines:
        return "'engines' must be a non-empty list"
    seen = set()
    for i, e in enumerate(engines):
        if not isinstance(e, dict) or not isinstance(e.get("id"), int):
            return f"engine #{i} needs an integer 'id'"
        if e["id"] in seen:
            return f"engine id {e['id']} appears twice"
        seen.add(e["id"])
        conn = e.get("connection")
        if not isinstance(conn, dict):
            return f"engine {e['id']} has no 'connection' object"
        missing = [k for k in ("shell_port", "iopub_port", "control_port", "ip", "key") if k not in conn]
        if missing:
            return f"engine {e['id']} connection lacks {', '.join(missing)}"
    return ""


def resolve_cluster_file(path: str | os.PathLike | None, profile: str | None) -> Path:
    """The cluster file to use: an explicit path, or the given (default: 'default') profile's."""
    if path is not None:
        return Path(path)
    candidate = cluster_file_path(profile or "default")
    if not candidate.exists():
        raise NoClusterError(f"no running cluster for profile {profile or 'default'!r} "
                             f"(no {candidate}); {HOW_TO_START}")
    return candidate


def read_connection_files(files: Any) -> dict[int, dict]:
    """Engine id -> connection info for Jupyter connection files, ids 0.. in order."""
    from jupyter_client.connect import find_connection_file

    if isinstance(files, (str, os.PathLike)):
        files = [files]
    engines = {}
    for eid, name in enumerate(files):
        path = Path(name)
        if not path.exists():
            try:
                path = Path(find_connection_file(str(name)))
            except OSError:
                raise FileNotFoundError(f"no connection file {name!r}") from None
        try:
            info = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path} is not a connection file: {exc}") from None
        missing = [k for k in ("shell_port", "iopub_port", "control_port", "ip", "key") if k not in info]
        if missing:
            raise ValueError(f"{path} is not a kernel connection file: it lacks {', '.join(missing)}")
        engines[eid] = info
    if not engines:
        raise ValueError("attach needs at least one connection file")
    return engines


def liveness_probes(spec: dict) -> dict[int, Callable[[], str | None]]:
    """Process polls for the engines of ``spec`` that run on this host."""
    here = socket.gethostname()
    probes = {}
    for e in spec["engines"]:
        pid = e.get("pid")
        if pid and e.get("host", spec.get("host")) == here:
            probes[e["id"]] = (lambda p=pid: None if pid_alive(p) else f"exited (process {p} is gone)")
    return probes


def list_clusters(clean: bool = True) -> list[dict]:
    """Every cluster file with its state; stale ones (owner gone) are removed when ``clean``."""
    out = []
    for path in sorted(cluster_dir().glob("cluster-*.json")):
        entry: dict[str, Any] = {"file": str(path), "profile": path.stem[len("cluster-"):]}
        try:
            spec = json.loads(path.read_text())
            problem = _validate(spec)
        except (OSError, json.JSONDecodeError) as exc:
            spec, problem = {}, str(exc)
        if problem:
            entry.update(state=f"malformed ({problem})", engines=[], pids=[])
            out.append(entry)
            continue
        owner_alive = pid_alive(spec.get("owner_pid")) if spec.get("host") == socket.gethostname() else True
        pids = [e.get("pid") for e in spec["engines"]]
        here = socket.gethostname()
        # engines on other hosts (ssh, slurm) or attached ones without a pid: not checkable here
        alive = [pid_alive(e.get("pid")) if e.get("host", spec.get("host")) == here
                 and (e.get("pid") or not spec.get("attached")) else True for e in spec["engines"]]
        state = "running" if owner_alive and all(alive) else ("degraded" if owner_alive else "stale")
        entry.update(state=state, engines=[e["id"] for e in spec["engines"]], pids=pids,
                     owner_pid=spec.get("owner_pid"), engines_alive=alive)
        if state == "stale" and clean:
            _remove_files(spec, path)
            entry["state"] = "stale (removed)"
        out.append(entry)
    return out


# ---------------------------------------------------------------------- requests to an owner
# A process that does not own a cluster (a client connected by its cluster file) asks the
# owner (an `ipmulti start` process) to restart engines by dropping a request file next to
# the cluster file; the owner polls for them and answers with a ``.done`` file.
def _request_path(profile: str, rid: str) -> Path:
    return cluster_dir() / f"request-{profile}-{rid}.json"


def check_owner(path: Path, op: str) -> dict:
    """The cluster file's content if its owner takes requests, else an ``EngineError`` saying why."""
    spec = read_cluster(path)
    owner = spec.get("owner_pid")
    if "requests" not in spec.get("serves", []):
        raise EngineError(
            f"cannot {op} engines of {path}: its owner process {owner} does not take requests (only "
            "clusters started with `ipmulti start` do); restart them from the process that owns them")
    if spec.get("host") != socket.gethostname():
        raise EngineError(f"cannot {op} engines of {path}: its owner runs on host {spec.get('host')!r}")
    return spec


def request_owner(cluster_file: str | os.PathLike, op: str, ids: list[int], timeout: float = 60.0) -> dict:
    """Ask the owner of ``cluster_file`` to run ``op`` ('restart') on engines ``ids``; wait for its answer."""
    path = Path(cluster_file)
    spec = check_owner(path, op)
    owner = spec.get("owner_pid")
    rid = uuid.uuid4().hex
    req = _request_path(spec.get("profile", "default"), rid)
    write_private(req, json.dumps({"op": op, "ids": ids, "cluster_file": str(path)}))
    done = req.with_suffix(".done")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if done.exists():
                answer = json.loads(done.read_text())
                done.unlink(missing_ok=True)
                if answer.get("error"):
                    raise EngineError(f"the owner of {path} could not {op} engines {ids}: {answer['error']}")
                return answer
            if not pid_alive(owner):
                raise EngineError(f"the owner process {owner} of {path} is gone")
            time.sleep(0.05)
    finally:
        req.unlink(missing_ok=True)
    raise EngineError(f"the owner process {owner} of {path} did not {op} engines {ids} within {timeout:g} s")


def _remove_files(spec: dict, path: Path) -> None:
    profile = spec.get("profile")
    if profile:  # unanswered requests and answers nobody collected
        for f in cluster_dir().glob(f"request-{profile}-*"):
            f.unlink(missing_ok=True)
    for e in spec.get("engines", []):
        for key in ("connection_file", "log_file"):
            if e.get(key):
                Path(e[key]).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _exit_reason(code: int | None) -> str | None:
    if code is None:
        return None
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by signal {name}"
    return f"exited with code {code}"


# ---------------------------------------------------------------------- the Cluster
#: Whether the default encryption policy (``transport_encryption=None``) encrypts engines that
#: listen on loopback only. CurveZMQ encrypts every message once per connection: a 100 MB push
#: to 4 engines then holds 4 ciphertext copies (+400 MB in the client) and runs several times
#: slower, while on loopback only root, who can read the key files anyway, could sniff.
ENCRYPT_LOOPBACK = False


def _is_loopback(ip: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


#: Times an engine is started again on new ports when another process took one of its ports
#: between jupyter_client choosing it and the kernel binding it.
PORT_CLASH_RETRIES = 2

#: Automatic restarts allowed per engine per minute before the Cluster gives up on it.
MAX_AUTO_RESTARTS = 5


class Cluster:
    """N local engines (ipykernel kernels) owned by this process.

    ``start()`` launches them concurrently and returns a connected ``MultiEngineClient``;
    ``stop()`` shuts them down (shutdown request, then SIGTERM, then SIGKILL) and removes their
    files. ``with Cluster(n=4) as mec:`` does both. Engines exit by themselves when this
    process dies, even by SIGKILL (ipykernel's parent polling).
    """

    def __init__(
        self,
        n: int | None = None,
        kernel_name: str = "python3",
        profile: str = "default",
        startup_timeout: float = 60.0,
        env: dict[str, str] | None = None,
        write_file: bool = True,
        engines: dict[str, int] | None = None,
        auto_restart: bool = False,
        transport_encryption: str | None = None,
        shutdown_wait: float = 3.0,
        launcher: Any = "local",
        **launcher_options: Any,
    ) -> None:
        # engines={'python3': 2, 'bash': 3}: engines from several kernelspecs, ids in that order;
        # each kernelspec name is also a group name usable as targets
        if engines is not None:
            if launcher != "local" or launcher_options:
                raise ValueError("engines={kernelspec: n, ...} works with the local launcher only")
            kernel_names = _engine_groups(engines)
            n = len(kernel_names)
        # launcher='mpi'|'slurm'|'ssh'|a plugin name|a Launcher: engines started by it
        # (see ipy_multiengine.launchers); 'local' without options: the managers below
        self.launcher = None
        if launcher != "local" or launcher_options:
            from .launchers import make_launcher

            self.launcher = make_launcher(launcher, n, kernel_name=kernel_name, env=env,
                                          startup_timeout=startup_timeout, **launcher_options)
            n = self.launcher.n if n is None else n
        n = 4 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, not {n!r}")
        self.n = n
        self.kernel_name = kernel_name
        #: engine id -> kernelspec name (= its group)
        self.kernel_names: dict[int, str] = kernel_names if engines is not None else dict.fromkeys(range(n), kernel_name)
        self.profile = profile
        self.startup_timeout = startup_timeout
        self.env = env
        self.write_file = write_file
        #: restart engines that die, by themselves (at most ``MAX_AUTO_RESTARTS`` a minute each)
        self.auto_restart = auto_restart
        #: CurveZMQ: 'auto' (on where the kernelspec declares support), 'required', 'disabled', or
        #: None (default): 'auto' unless the engines listen on loopback only (see ENCRYPT_LOOPBACK)
        self.transport_encryption = transport_encryption
        #: seconds a shutdown request gets before SIGTERM, then as long again before SIGKILL
        self.shutdown_wait = shutdown_wait
        #: answer restart requests from other processes (set by ``ipmulti start``)
        self.serves_requests = False
        self.restarts: dict[int, list[float]] = {}
        self._restart_locks: dict[int, asyncio.Lock] = {}
        self.cluster_file: str | None = None
        self.managers: dict[int, AsyncKernelManager] = {}
        self.client: Any = None
        self._key = secrets.token_hex(32)
        self._stopped = False
        self._finalizer: Any = None

    # -- starting
    def start(self) -> Any:
        """Start the engines; returns a connected ``MultiEngineClient``."""
        from .client import MultiEngineClient
        from .controller import Controller

        if self.managers:
            raise RuntimeError("this Cluster is already started")
        path = cluster_file_path(self.profile)
        if self.transport_encryption not in (None, "auto", "required", "disabled"):
            raise ValueError(f"transport_encryption must be None, 'auto', 'required' or 'disabled', "
                             f"not {self.transport_encryption!r}")
        if self.write_file and path.exists():
            try:
                read_cluster(path)
            except (NoClusterError, ValueError):
                path.unlink(missing_ok=True)  # stale or broken: ours to replace
            else:
                raise RuntimeError(f"a cluster for profile {self.profile!r} is already running ({path}); "
                                   "stop it with `ipmulti stop` or use another profile")
        if self.launcher is not None:
            return self._start_launcher(path)
        self._files: list[Path] = [self.log_file(eid) for eid in range(self.n)]
        self._finalizer = weakref.finalize(self, _stop_managers, self.managers, self._files)
        atexit.register(self._finalizer)
        try:
            _loop.run(self._start_kernels(), timeout=self.startup_timeout + 10)
            liveness = {eid: self._probe(eid) for eid in self.managers}
            engines = {eid: self._connection_info(eid) for eid in self.managers}
            for attempt in range(PORT_CLASH_RETRIES + 1):
                try:
                    controller = Controller(engines, liveness, timeout=self.startup_timeout)
                    break
                except EngineError as exc:
                    eid = exc.engine_id
                    if attempt < PORT_CLASH_RETRIES and eid in self.managers and self._port_clash(eid):
                        log.warning("engine %s lost a port to another process while starting; "
                                    "starting it again on new ports", eid)
                        _loop.run(self._fresh_manager(eid), timeout=self.startup_timeout + 10)
                        engines[eid], liveness[eid] = self._connection_info(eid), self._probe(eid)
                        continue
                    raise self._with_output(exc) from None
        except BaseException:
            self.stop()
            raise
        controller.on_dead = self._on_dead
        self.client = MultiEngineClient(_controller=controller, _cluster=self)
        if self.write_file:
            self._write_cluster_file(path)
        return self.client

    def _encryption_policy(self, ip: str) -> str:
        if self.transport_encryption is not None:
            return self.transport_encryption
        return "auto" if ENCRYPT_LOOPBACK or not _is_loopback(ip) else "disabled"

    def _start_launcher(self, path: Path) -> Any:
        """Start the engines through ``self.launcher`` (mpi, slurm, ssh, a plugin)."""
        from .client import MultiEngineClient
        from .controller import Controller

        self._finalizer = weakref.finalize(self, _stop_launcher, self.launcher)
        atexit.register(self._finalizer)
        try:
            infos = _loop.run(self.launcher.start(), timeout=(self.startup_timeout or 3600) + 60)
            self.engines_info = dict(enumerate(infos))
            liveness = {eid: self.launcher.liveness(eid) for eid in self.engines_info}
            controller = Controller(self.engines_info, liveness, timeout=self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.client = MultiEngineClient(_controller=controller, _cluster=self)
        if self.write_file:
            self._write_cluster_file(path)
        return self.client

    def _connection_info(self, eid: int) -> dict:
        """What a client needs to reach engine ``eid``: no CurveZMQ secret key (the kernel's alone)."""
        info = self.managers[eid].get_connection_info(session=False)
        info["key"] = self._key
        info.pop("curve_secretkey", None)
        if isinstance(info.get("curve_publickey"), bytes):
            info["curve_publickey"] = info["curve_publickey"].decode("ascii")
        return info

    def _with_output(self, exc: EngineError) -> EngineError:
        """``exc`` with the engine's own stdout/stderr appended (why it never became ready)."""
        eid = exc.engine_id
        if eid is None or eid not in self.managers:
            return exc
        return EngineError(f"{exc}\n--- engine {eid}'s own output (kernel {self.kernel_name!r}, "
                           f"log {self.log_file(eid)}) ---\n{self._log_tail(eid)}", eid)

    # -- restarting
    def restart(self, eids: list[int], timeout: float | None = None) -> None:
        """Restart engines ``eids`` keeping their ids and ports, with fresh namespaces."""
        if self._stopped or self.client is None:
            raise EngineError("this Cluster is not running")
        if self.launcher is not None:
            raise EngineError(f"engines started by the {self.launcher.name!r} launcher cannot be "
                              "restarted one by one; stop the cluster and start a new one")
        unknown = [e for e in eids if e not in self.managers]
        if unknown:
            raise ValueError(f"unknown engine ids {unknown}; valid ids: {sorted(self.managers)}")
        timeout = self.startup_timeout if timeout is None else timeout
        # a timeout is a promise (issue 11.3): raise at it, and let the restart go on rather
        # than cancel it half way (the engine becomes ready by itself; wait_ready waits for it)
        fut = _loop.submit(self.restart_async(list(eids), timeout))
        try:
            done = _loop.wait([fut], timeout)
        except BaseException:
            fut.cancel()
            raise
        if not done:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is None or log.warning(
                "restart of engines %s failed after its caller stopped waiting: %s", eids, f.exception()))
            ctl = self.client._controller
            why = "; ".join(f"engine {e} {ctl.unavailable(e) or 'is ready'}" for e in eids)
            raise TimeoutError(f"restart of engines {list(eids)} not finished after {timeout:g} s ({why}); "
                               "it goes on: mec.wait_ready() waits for it")
        fut.result()

    async def restart_async(self, eids: list[int], timeout: float) -> None:
        await asyncio.gather(*(self._restart_one(eid, timeout) for eid in eids))
        if self.write_file and self.cluster_file and not self._stopped:
            self._write_cluster_file(Path(self.cluster_file))

    async def _restart_one(self, eid: int, timeout: float) -> None:
        controller = self.client._controller
        lock = self._restart_locks.setdefault(eid, asyncio.Lock())
        async with lock:
            conn = controller.engine(eid)
            conn.ready = False
            if not conn.dead:
                conn.state = "restarting"
            controller._fail_all(conn, "was restarted")
            km = self.managers[eid]
            self.restarts.setdefault(eid, []).append(time.time())
            with self._open_log(eid, "ab") as out:
                await km.restart_kernel(now=True, stdout=out, stderr=out)
            for attempt in range(PORT_CLASH_RETRIES + 1):
                if self._stopped:  # stop() ran meanwhile: do not leave the new kernel behind
                    await self.managers[eid].shutdown_kernel(now=True)
                    raise EngineError(f"engine {eid}: the cluster was stopped during its restart", eid)
                try:
                    await controller.add_engines_async({eid: self._connection_info(eid)},
                                                       {eid: self._probe(eid)}, timeout)
                    break
                except EngineError as exc:
                    if attempt < PORT_CLASH_RETRIES and self._port_clash(eid):
                        log.warning("engine %s lost a port to another process while restarting; "
                                    "starting it on new ports", eid)
                        await self._fresh_manager(eid)
                        continue
                    raise self._with_output(exc) from None

    def _on_dead(self, eid: int, reason: str) -> None:
        """Controller callback (loop thread): restart a dead engine when ``auto_restart`` is on."""
        if not self.auto_restart or self._stopped or self.launcher is not None:
            return
        lock = self._restart_locks.get(eid)
        if lock is not None and lock.locked():
            return  # being restarted already
        recent = [t for t in self.restarts.get(eid, []) if time.time() - t < 60]
        if len(recent) >= MAX_AUTO_RESTARTS:
            log.error("engine %s died %d times within a minute; not restarting it again", eid, len(recent))
            return
        log.warning("engine %s %s; restarting it", eid, reason)

        async def go() -> None:
            try:
                await self.restart_async([eid], self.startup_timeout)
            except Exception as exc:
                log.error("automatic restart of engine %s failed: %s", eid, exc)

        asyncio.ensure_future(go())

    def interrupt(self, eids: list[int]) -> None:
        """Interrupt engines through their kernel managers (signal or message, as the kernelspec
        says), or through the launcher: over ssh, ``scancel --signal=INT``, the whole MPI job."""
        if self.launcher is not None:
            _loop.run(self.launcher.interrupt(eids), timeout=60)
            return

        async def go() -> None:
            await asyncio.gather(*(self.managers[e].interrupt_kernel() for e in eids if e in self.managers),
                                 return_exceptions=True)
        _loop.submit(go())

    def serve_requests(self) -> None:
        """Answer restart requests other processes left for this cluster (see ``request_owner``)."""
        for req in sorted(cluster_dir().glob(f"request-{self.profile}-*.json")):
            try:
                ask = json.loads(req.read_text())
                req.unlink(missing_ok=True)
            except (OSError, ValueError):
                continue
            answer: dict[str, Any] = {"ok": True}
            try:
                if ask.get("op") != "restart":
                    raise ValueError(f"unknown request {ask.get('op')!r}")
                ids = [int(i) for i in ask.get("ids", [])]
                self.restart(ids)
                answer["pids"] = {str(e): getattr(self.managers[e].provisioner, "pid", None) for e in ids}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            write_private(req.with_suffix(".done"), json.dumps(answer))

    def _probe(self, eid: int) -> Callable[[], str | None]:
        km = self.managers[eid]

        def probe() -> str | None:
            proc = getattr(km.provisioner, "process", None)
            return _exit_reason(proc.poll()) if proc is not None else "has no process"

        return probe

    async def _start_kernels(self) -> None:
        from jupyter_client.kernelspec import NoSuchKernel

        env = self._env()
        for eid in range(self.n):
            self._new_manager(eid)
        logs = {eid: self._open_log(eid, "wb") for eid in self.managers}
        try:
            results = await asyncio.gather(
                *(km.start_kernel(extra_arguments=_kernel_args(km), env=env, stdout=logs[eid], stderr=logs[eid])
                  for eid, km in self.managers.items()),
                return_exceptions=True,
            )
        finally:
            for f in logs.values():
                f.close()
        for eid, res in zip(self.managers, results):
            if isinstance(res, NoSuchKernel):
                from jupyter_client.kernelspec import KernelSpecManager

                names = sorted(KernelSpecManager().find_kernel_specs())
                raise ValueError(f"no kernelspec named {self.kernel_names[eid]!r}; available: {names}") from None
            if isinstance(res, BaseException):
                raise EngineError(f"engine {eid} failed to start: {res}\n{self._log_tail(eid)}", eid) from res
        # an engine that dies while we wait for it: report its own stderr
        await asyncio.sleep(0)
        for eid in self.managers:
            reason = self._probe(eid)()
            if reason:
                raise EngineError(f"engine {eid} {reason} during startup; its output:\n{self._log_tail(eid)}", eid)

    def engine_meta(self) -> dict[int, dict]:
        """Per engine id: group, kernel_name, pid and host, as far as this cluster knows them."""
        host = socket.gethostname()
        return {eid: {"group": self.kernel_names.get(eid, self.kernel_name),
                      "kernel_name": self.kernel_names.get(eid, self.kernel_name),
                      "pid": getattr(km.provisioner, "pid", None), "host": host}
                for eid, km in self.managers.items()}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
        env.pop("JPY_PARENT_PID", None)  # jupyter_client sets ours: engines die with this process
        return env

    def _new_manager(self, eid: int) -> AsyncKernelManager:
        tag = f"{self.profile}-{os.getpid()}"
        km = AsyncKernelManager(kernel_name=self.kernel_names.get(eid, self.kernel_name),
                                connection_file=str(cluster_dir() / f"engine-{tag}-{eid}.json"))
        km.session.key = self._key.encode()
        km.shutdown_wait_time = self.shutdown_wait
        km.transport_encryption = self._encryption_policy(km.ip)
        self.managers[eid] = km
        return km

    def _port_clash(self, eid: int) -> bool:
        """Did engine ``eid`` die because another process took one of its ports meanwhile?"""
        return "Address already in use" in self._log_tail(eid, 40)

    async def _fresh_manager(self, eid: int) -> None:
        """Replace engine ``eid``'s kernel by a new one on new ports (after a port clash)."""
        old = self.managers[eid]
        try:
            await old.shutdown_kernel(now=True)
        except Exception as exc:
            log.debug("engine %s: shutting down the old kernel: %s", eid, exc)
        km = self._new_manager(eid)
        with self._open_log(eid, "wb") as out:
            await km.start_kernel(extra_arguments=_kernel_args(km), env=self._env(), stdout=out, stderr=out)

    def _open_log(self, eid: int, mode: str) -> Any:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
        return os.fdopen(os.open(self.log_file(eid), flags, 0o600), mode)

    def log_file(self, eid: int) -> Path:
        return cluster_dir() / f"engine-{self.profile}-{os.getpid()}-{eid}.log"

    def _log_tail(self, eid: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file(eid).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def _write_cluster_file(self, path: Path) -> None:
        host = socket.gethostname()
        if self.launcher is not None:
            spec = {
                "profile": self.profile, "owner_pid": os.getpid(), "host": host, "created": time.time(),
                "launcher": self.launcher.to_dict(),
                "engines": [{"id": eid, "pid": info.get("pid"), "host": info.get("hostname", host),
                             "kernel_name": self.kernel_name, "connection": info}
                            for eid, info in self.engines_info.items()],
            }
            write_private(path, json.dumps(spec, indent=1))
            self.cluster_file = str(path)
            if self.client is not None:
                self.client.cluster_file = str(path)
            return
        spec = {
            "profile": self.profile, "owner_pid": os.getpid(), "host": host, "created": time.time(),
            "serves": ["requests"] if self.serves_requests else [],
            "engines": [
                {"id": eid, "pid": getattr(km.provisioner, "pid", None), "host": host,
                 "kernel_name": self.kernel_names[eid], "group": self.kernel_names[eid],
                 "connection": self._connection_info(eid),
                 "connection_file": km.connection_file, "log_file": str(self.log_file(eid))}
                for eid, km in self.managers.items()
            ],
        }
        write_private(path, json.dumps(spec, indent=1))
        self.cluster_file = str(path)
        if self.client is not None:
            self.client.cluster_file = str(path)

    # -- stopping
    def stop(self) -> None:
        """Stop every engine and remove the cluster's files; never hangs, safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.client is not None and not self.client.closed:
            self.client._cluster = None
            self.client.close()
        if self.cluster_file:
            Path(self.cluster_file).unlink(missing_ok=True)
            for f in cluster_dir().glob(f"request-{self.profile}-*"):
                f.unlink(missing_ok=True)
        logs = [self.log_file(eid) for eid in self.managers]
        if self._finalizer is not None:
            atexit.unregister(self._finalizer)
            self._finalizer.detach()
        if self.launcher is not None:
            _stop_launcher(self.launcher)
        _stop_managers(self.managers, logs)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _engine_groups(engines: Any) -> dict[int, str]:
    """``{'python3': 2, 'bash': 1}`` -> ``{0: 'python3', 1: 'python3', 2: 'bash'}`` (checked)."""
    if not isinstance(engines, dict) or not engines:
        raise ValueError(f"engines must be a non-empty dict of kernelspec name to count, not {engines!r}")
    out: dict[int, str] = {}
    for name, count in engines.items():
        if not isinstance(name, str) or not name or name == "all":
            raise ValueError(f"invalid kernelspec/group name {name!r} in engines")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"engines[{name!r}] must be a positive int, not {count!r}")
        for _ in range(count):
            out[len(out)] = name
    return out


def _kernel_args(km: AsyncKernelManager) -> list[str]:
    """``KERNEL_ARGS`` for ipykernel-based kernels only (others may reject unknown options)."""
    try:
        argv = " ".join(km.kernel_spec.argv)
    except Exception:
        return []
    return list(KERNEL_ARGS) if ("ipykernel" in argv or "bash_kernel" in argv) else []


def _stop_launcher(launcher: Any) -> None:
    """Stop a launcher's engines; never hangs (falls back to its synchronous kill)."""
    try:
        _loop.run(launcher.stop(), timeout=30)
    except BaseException:
        launcher.kill_now()


def _stop_managers(managers: dict[int, AsyncKernelManager], extra_files: list[Path]) -> None:
    """Shut kernels down concurrently: shutdown request, then SIGTERM/SIGKILL if they linger."""

    async def shutdown(km: AsyncKernelManager) -> None:
        try:
            if await km.is_alive():
                await asyncio.wait_for(km.shutdown_kernel(now=False), km.shutdown_wait_time + 2)
            else:
                await km.cleanup_resources()
        except Exception:
            try:
                await km.shutdown_kernel(now=True)
            except Exception:
                proc = getattr(km.provisioner, "process", None)
                if proc is not None and proc.poll() is None:
                    proc.kill()

    async def all_down() -> None:
        await asyncio.gather(*(shutdown(km) for km in managers.values()), return_exceptions=True)

    if managers:
        try:
            _loop.run(all_down(), timeout=15)
        except BaseException:
            for km in managers.values():
                proc = getattr(km.provisioner, "process", None)
                if proc is not None and proc.poll() is None:
                    proc.kill()
        for km in managers.values():
            Path(km.connection_file).unlink(missing_ok=True)
    for f in extra_files:
        Path(f).unlink(missing_ok=True)
    managers.clear()
