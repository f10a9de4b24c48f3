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
import weakref
from pathlib import Path
from typing import Any, Callable

from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir

from . import _loop
from .errors import EngineError, NoClusterError

KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:"]
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
        alive = [pid_alive(p) if p or not spec.get("attached") else True for p in pids]
        state = "running" if owner_alive and all(alive) else ("degraded" if owner_alive else "stale")
        entry.update(state=state, engines=[e["id"] for e in spec["engines"]], pids=pids,
                     owner_pid=spec.get("owner_pid"), engines_alive=alive)
        if state == "stale" and clean:
            _remove_files(spec, path)
            entry["state"] = "stale (removed)"
        out.append(entry)
    return out


def _remove_files(spec: dict, path: Path) -> None:
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
        launcher: Any = "local",
        **launcher_options: Any,
    ) -> None:
        # launcher='mpi'|'slurm'|'ssh'|a plugin name|a Launcher: engines started by it
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
        self.profile = profile
        self.startup_timeout = startup_timeout
        self.env = env
        self.write_file = write_file
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
        if self.write_file and path.exists():
            try:
                read_cluster(path)
            except (NoClusterError, ValueError):
                path.unlink(missing_ok=True)  # stale or broken: ours to replace
            else:
                raise RuntimeError(f"a cluster for profile {self.profile!r} is already running ({path}); "
                                   "stop it with `ipmulti stop` or use another profile")
        if self.launcher is not None:
            self._finalizer = weakref.finalize(self, _stop_launcher, self.launcher)
        else:
            self._finalizer = weakref.finalize(self, _stop_managers, self.managers, [])
        atexit.register(self._finalizer)
        try:
            if self.launcher is not None:
                infos = _loop.run(self.launcher.start(), timeout=self.startup_timeout + 60)
                engines = dict(enumerate(infos))
                liveness = {eid: self.launcher.liveness(eid) for eid in engines}
            else:
                _loop.run(self._start_kernels(), timeout=self.startup_timeout + 10)
                liveness = {eid: self._probe(eid) for eid in self.managers}
                engines = {eid: km.get_connection_info(session=False) for eid, km in self.managers.items()}
                for info in engines.values():
                    info["key"] = self._key
            controller = Controller(engines, liveness, timeout=self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.client = MultiEngineClient(_controller=controller, _cluster=self)
        if self.write_file:
            self._write_cluster_file(path, engines)
        return self.client

    def _probe(self, eid: int) -> Callable[[], str | None]:
        km = self.managers[eid]

        def probe() -> str | None:
            proc = getattr(km.provisioner, "process", None)
            return _exit_reason(proc.poll()) if proc is not None else "has no process"

        return probe

    async def _start_kernels(self) -> None:
        from jupyter_client.kernelspec import NoSuchKernel

        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
        env.pop("JPY_PARENT_PID", None)
        directory = cluster_dir()
        tag = f"{self.profile}-{os.getpid()}"
        for eid in range(self.n):
            km = AsyncKernelManager(kernel_name=self.kernel_name,
                                    connection_file=str(directory / f"engine-{tag}-{eid}.json"))
            km.session.key = self._key.encode()
            km.shutdown_wait_time = 3.0
            self.managers[eid] = km
        logs = {eid: open(directory / f"engine-{tag}-{eid}.log", "wb") for eid in self.managers}
        try:
            results = await asyncio.gather(
                *(km.start_kernel(extra_arguments=KERNEL_ARGS, env=env, stdout=logs[eid], stderr=logs[eid])
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
                raise ValueError(f"no kernelspec named {self.kernel_name!r}; available: {names}") from None
            if isinstance(res, BaseException):
                raise EngineError(f"engine {eid} failed to start: {res}\n{self._log_tail(eid)}", eid) from res
        # an engine that dies while we wait for it: report its own stderr
        await asyncio.sleep(0)
        for eid in self.managers:
            reason = self._probe(eid)()
            if reason:
                raise EngineError(f"engine {eid} {reason} during startup; its output:\n{self._log_tail(eid)}", eid)

    def log_file(self, eid: int) -> Path:
        return cluster_dir() / f"engine-{self.profile}-{os.getpid()}-{eid}.log"

    def _log_tail(self, eid: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file(eid).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def _write_cluster_file(self, path: Path, engines: dict[int, dict]) -> None:
        host = socket.gethostname()
        if self.launcher is not None:
            spec = {
                "profile": self.profile, "owner_pid": os.getpid(), "host": host, "created": time.time(),
                "launcher": self.launcher.to_dict(),
                "engines": [{"id": eid, "pid": info.get("pid"), "host": info.get("hostname", host),
                             "kernel_name": self.kernel_name, "connection": info}
                            for eid, info in engines.items()],
            }
            write_private(path, json.dumps(spec, indent=1))
            self.cluster_file = str(path)
            if self.client is not None:
                self.client.cluster_file = str(path)
            return
        spec = {
            "profile": self.profile, "owner_pid": os.getpid(), "host": host, "created": time.time(),
            "engines": [
                {"id": eid, "pid": getattr(km.provisioner, "pid", None), "host": host,
                 "kernel_name": self.kernel_name, "connection": engines[eid],
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
        logs = [self.log_file(eid) for eid in self.managers]
        if self._finalizer is not None:
            atexit.unregister(self._finalizer)
            self._finalizer.detach()
        if self.launcher is not None:
            _stop_launcher(self.launcher)
        _stop_managers(self.managers, logs)

    def interrupt(self, eids: list[int]) -> None:
        """Interrupt engines through the launcher (over ssh, scancel, or the whole MPI job)."""
        if self.launcher is not None:
            _loop.run(self.launcher.interrupt(eids), timeout=30)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


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
