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
import socket
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable

from jupyter_core.paths import jupyter_runtime_dir

from . import _loop
from .errors import EngineError, NoClusterError

log = __import__("logging").getLogger("ipy_multiengine")

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


# ---------------------------------------------------------------------- the Cluster
#: Times an engine is started again on new ports when another process took one of its ports
#: between jupyter_client choosing it and the kernel binding it.
PORT_CLASH_RETRIES = 2

#: Automatic restarts allowed per engine per minute before the Cluster gives up on it.
MAX_AUTO_RESTARTS = 5


class Cluster:
    """The owner of one launcher's engines: N local engines (ipykernel kernels) by default.

    ``start()`` launches them concurrently through the launcher (``LocalLauncher`` unless
    ``launcher=`` names another) and returns a connected ``MultiEngineClient``; ``stop()``
    shuts them down (shutdown request, then SIGTERM, then SIGKILL) and removes their files.
    ``with Cluster(n=4) as mec:`` does both. Local engines exit by themselves when this
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
        from .launchers import make_launcher
        from .launchers.base import encryption_policy
        from .launchers.local import LocalLauncher

        encryption_policy(transport_encryption, "127.0.0.1")  # checks the value
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"n must be a positive int, not {n!r}")
        # engines={'python3': 2, 'bash': 3}: engines from several kernelspecs, ids in that order;
        # each kernelspec name is also a group name usable as targets
        kernel_names = None
        if engines is not None:
            if launcher != "local" or launcher_options:
                raise ValueError("engines={kernelspec: n, ...} works with the local launcher only")
            kernel_names = _engine_groups(engines)
            n = len(kernel_names)
        self.profile = profile
        if launcher == "local":
            self.launcher = LocalLauncher(
                4 if n is None else n, kernel_name=kernel_name, kernel_names=kernel_names, env=env,
                startup_timeout=startup_timeout, transport_encryption=transport_encryption,
                shutdown_wait=shutdown_wait, work_dir=cluster_dir(), tag=f"{profile}-{os.getpid()}",
                **launcher_options)
        else:
            # launcher='mpi'|'slurm'|'ssh'|a plugin name|a Launcher (see ipy_multiengine.launchers)
            if transport_encryption is not None:
                launcher_options.setdefault("transport_encryption", transport_encryption)
            self.launcher = make_launcher(launcher, n, kernel_name=kernel_name, env=env,
                                          startup_timeout=startup_timeout, **launcher_options)
        n = self.launcher.n if n is None else n
        self.n = n
        self.kernel_name = kernel_name
        #: engine id -> kernelspec name (= its group)
        self.kernel_names: dict[int, str] = dict(getattr(self.launcher, "kernel_names", None)
                                                 or dict.fromkeys(range(n), kernel_name))
        self.startup_timeout = startup_timeout
        self.env = env
        self.write_file = write_file
        #: restart engines that die, by themselves (at most ``MAX_AUTO_RESTARTS`` a minute each)
        self.auto_restart = auto_restart
        #: CurveZMQ: 'auto' (on where the kernelspec declares support), 'required', 'disabled', or
        #: None (default): on unless the engines listen on loopback only (launchers.base.ENCRYPT_LOOPBACK)
        self.transport_encryption = transport_encryption
        #: seconds a shutdown request gets before SIGTERM, then as long again before SIGKILL
        self.shutdown_wait = shutdown_wait
        #: answer restart requests from other processes (set by ``ipmulti start``)
        self.serves_requests = False
        self.restarts: dict[int, list[float]] = {}
        self._restart_locks: dict[int, asyncio.Lock] = {}
        self.cluster_file: str | None = None
        self.client: Any = None
        self.engines_info: dict[int, dict] = {}
        self._started = False
        self._stopped = False
        self._finalizer: Any = None

    @property
    def managers(self) -> dict[int, Any]:
        """The local launcher's kernel managers by engine id (empty for other launchers)."""
        return getattr(self.launcher, "managers", {})

    def log_file(self, eid: int) -> Path:
        """Engine ``eid``'s own stdout/stderr (local engines)."""
        return self.launcher.log_file(eid)

    # -- starting
    def start(self) -> Any:
        """Start the engines; returns a connected ``MultiEngineClient``."""
        from .client import MultiEngineClient
        from .controller import Controller

        if self._started:
            raise RuntimeError("this Cluster is already started")
        path = cluster_file_path(self.profile)
        if self.write_file and path.exists():
            try:
                read_cluster(path)
            except (NoClusterError, ValueError):
                path.unlink(missing_ok=True)  # stale or broken: ours to replace
            else:
                raise RuntimeError(f"a cluster for profile {self.profile!r} is already running ({path}); "
                                   "stop it with `ipmulti stop` or use another profile")
        self._started = True
        self._finalizer = weakref.finalize(self, _stop_launcher, self.launcher)
        atexit.register(self._finalizer)
        try:
            infos = _loop.run(self.launcher.start(), timeout=(self.startup_timeout or 3600) + 60)
            self.engines_info = dict(enumerate(infos))
            liveness = {eid: self.launcher.liveness(eid) for eid in self.engines_info}
            for attempt in range(PORT_CLASH_RETRIES + 1):
                try:
                    controller = Controller(self.engines_info, liveness, timeout=self.startup_timeout)
                    break
                except EngineError as exc:
                    eid = exc.engine_id
                    info = None
                    if attempt < PORT_CLASH_RETRIES and eid is not None:
                        info = _loop.run(self.launcher.retry_after_clash(eid),
                                         timeout=(self.startup_timeout or 3600) + 10)
                    if info is None:
                        raise self._with_output(exc) from None
                    log.warning("engine %s lost a port to another process while starting; "
                                "started it again on new ports", eid)
                    self.engines_info[eid], liveness[eid] = info, self.launcher.liveness(eid)
        except BaseException:
            self.stop()
            raise
        controller.on_dead = self._on_dead
        self.client = MultiEngineClient(_controller=controller, _cluster=self)
        if self.write_file:
            self._write_cluster_file(path)
        return self.client

    def _with_output(self, exc: EngineError) -> EngineError:
        """``exc`` with the engine's own stdout/stderr appended (why it never became ready)."""
        eid = exc.engine_id
        tail = getattr(self.launcher, "log_tail", None)
        if eid is None or tail is None or eid not in self.managers:
            return exc
        return EngineError(f"{exc}\n--- engine {eid}'s own output (kernel {self.kernel_names.get(eid)!r}, "
                           f"log {self.log_file(eid)}) ---\n{tail(eid)}", eid)

    # -- restarting
    def restart(self, eids: list[int], timeout: float | None = None) -> None:
        """Restart engines ``eids`` keeping their ids and ports, with fresh namespaces."""
        if self._stopped or self.client is None:
            raise EngineError("this Cluster is not running")
        if not self.launcher.can_restart:
            _loop.run(self.launcher.restart(list(eids)), timeout=60)  # raises, saying why
        unknown = [e for e in eids if e not in self.engines_info]
        if unknown:
            raise ValueError(f"unknown engine ids {unknown}; valid ids: {sorted(self.engines_info)}")
        timeout = self.startup_timeout if timeout is None else timeout
        _loop.run(self.restart_async(list(eids), timeout), timeout=timeout + self.shutdown_wait + 10)

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
            self.restarts.setdefault(eid, []).append(time.time())
            info = (await self.launcher.restart([eid]))[eid]
            for attempt in range(PORT_CLASH_RETRIES + 1):
                if self._stopped:  # stop() ran meanwhile: do not leave the new kernel behind
                    raise EngineError(f"engine {eid}: the cluster was stopped during its restart", eid)
                try:
                    await controller.add_engines_async({eid: info}, {eid: self.launcher.liveness(eid)}, timeout)
                    self.engines_info[eid] = info
                    break
                except EngineError as exc:
                    fresh = await self.launcher.retry_after_clash(eid) if attempt < PORT_CLASH_RETRIES else None
                    if fresh is None:
                        raise self._with_output(exc) from None
                    log.warning("engine %s lost a port to another process while restarting; "
                                "started it on new ports", eid)
                    info = fresh

    def _on_dead(self, eid: int, reason: str) -> None:
        """Controller callback (loop thread): restart a dead engine when ``auto_restart`` is on."""
        if not self.auto_restart or self._stopped or not self.launcher.can_restart:
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
        """Interrupt engines through the launcher: kernel managers (signal or message, as the
        kernelspec says) for local engines; over ssh, ``scancel --signal=INT``, the whole MPI job."""
        if self.launcher.can_restart:  # local: do not wait for the kernels to react
            _loop.submit(self.launcher.interrupt(eids))
            return
        _loop.run(self.launcher.interrupt(eids), timeout=60)

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
                meta = self.engine_meta()
                answer["pids"] = {str(e): meta.get(e, {}).get("pid") for e in ids}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            write_private(req.with_suffix(".done"), json.dumps(answer))

    def engine_meta(self) -> dict[int, dict]:
        """Per engine id: group, kernel_name, pid and host, as far as this cluster knows them."""
        return {eid: {k: m.get(k) for k in ("group", "kernel_name", "pid", "host")}
                for eid, m in self.launcher.engine_meta().items()}

    def _write_cluster_file(self, path: Path) -> None:
        host = socket.gethostname()
        meta = self.launcher.engine_meta()
        spec = {
            "profile": self.profile, "owner_pid": os.getpid(), "host": host, "created": time.time(),
            "serves": ["requests"] if self.serves_requests else [],
            "launcher": self.launcher.to_dict(),
            "engines": [dict({"id": eid, "pid": meta.get(eid, {}).get("pid"),
                              "host": meta.get(eid, {}).get("host") or host,
                              "kernel_name": self.kernel_names.get(eid, self.kernel_name),
                              "group": self.kernel_names.get(eid, self.kernel_name),
                              "connection": info},
                             **{k: meta[eid][k] for k in ("connection_file", "log_file") if meta.get(eid, {}).get(k)})
                        for eid, info in self.engines_info.items()],
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
        if self._finalizer is not None:
            atexit.unregister(self._finalizer)
            self._finalizer.detach()
        _stop_launcher(self.launcher)

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


def _stop_launcher(launcher: Any) -> None:
    """Stop a launcher's engines; never hangs (falls back to its synchronous kill). A stop that
    fails is logged with what the launcher says is left running."""
    try:
        _loop.run(launcher.stop(), timeout=30)
    except Exception as exc:
        log.error("stopping the engines of %r failed: %s", launcher, exc)
        launcher.kill_now()
    except BaseException:
        launcher.kill_now()
        raise
