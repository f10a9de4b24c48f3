"""The owner of a set of engines: starts, restarts, interrupts and stops them, keeps their file.

``Cluster`` is the owner inside the process that started the engines (an ``Owner``, see
``clusterfile``); :func:`stop_cluster_file` and :func:`list_clusters` act on clusters other
processes own, through their files, and never signal a process whose identity (host, psutil
create time, command line) does not match the file.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
import signal
import socket
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import psutil
from jupyter_client.manager import AsyncKernelManager

from . import _loop
from .clusterfile import (  # noqa: F401  (re-exported: the names tests and tools import from here)
    HOW_TO_START,
    Owner,
    ProfileLock,
    answer_request,
    check_owner,
    check_profile,
    in_kernel,
    cluster_dir,
    cluster_file_path,
    describe,
    embedded_file_path,
    engine_identity,
    identity,
    liveness_probes,
    new_embedded_id,
    owner_of,
    owner_state,
    pending_requests,
    pid_alive,
    read_cluster,
    read_connection_files,
    read_spec,
    remove_files,
    remove_if_mine,
    request_owner,
    resolve_cluster_file,
    same_process,
    try_identity,
    write_cluster,
    write_private,
)
from .errors import EngineError, NoClusterError, TimeoutError

log = __import__("logging").getLogger("ipy_multiengine")

#: ``_execute_sleep=0``: ipykernel sleeps 0.5 ms after every execute so that clients which do
#: not wait for ``status: idle`` see the output first; the controller always waits for idle.
KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:", "--IPythonKernel._execute_sleep=0"]


# ---------------------------------------------------------------------- clusters owned elsewhere
def terminate_verified(idents: list[dict], timeout: float = 5.0,
                       refused: list[str] | None = None) -> list[str]:
    """SIGTERM, then after ``timeout`` SIGKILL, the processes ``idents`` describe, each only
    if it still is that process (:func:`same_process`); the others are never signalled (why
    is appended to ``refused``). Returns the processes that survived."""
    procs = []
    for ident in idents:
        proc, why = same_process(ident)
        if proc is None:
            if refused is not None and "exited" not in why:
                refused.append(f"not signalling pid {ident.get('pid')}: {why}")
            continue
        procs.append(proc)
    for proc in procs:
        try:
            proc.terminate()  # psutil re-checks the create time: no reused pid is signalled
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [f"process {p.pid} survived SIGKILL" for p in alive]


def _stop_launcher_record(spec: dict) -> list[str]:
    """Stop what the file's launcher started (owner gone); what still runs, or []."""
    from .launchers import launcher_from_dict

    record = spec.get("launcher") or {}
    here = socket.gethostname()
    # the launcher's own local process (mpiexec): signal its group only if it is still the one
    ident = record.get("identity")
    if record.get("pid") and record.get("hostname", here) == here:
        if ident is None or same_process(ident)[0] is None:
            if ident is not None and "exited" in same_process(ident)[1]:
                record = {**record, "pid": None}  # gone already: nothing to signal by group
            else:
                why = same_process(ident)[1] if ident else "the file records no identity for it"
                return [f"not stopping the {record.get('launcher')} job of pid {record['pid']}: {why}"]
    try:
        launcher = launcher_from_dict(record)
        launcher.kill_now()
    except Exception as exc:
        return [f"could not stop the {record.get('launcher')} engines: {type(exc).__name__}: {exc}"]
    still = []
    for e in spec["engines"]:
        eid = engine_identity(e, spec)
        if eid and eid.get("host") == here and isinstance(eid.get("create_time"), (int, float)) \
                and same_process(eid)[0] is not None:
            still.append(f"engine {e['id']} (pid {e['pid']})")
    return [f"still running: {', '.join(still)}"] if still else []


def clean_stale(path: Path, spec: dict, notes: list[str] | None = None) -> list[str]:
    """A cluster whose owner is gone: stop what it started (by identity), then remove its
    files. Returns what still runs (the file is then kept as the record of it), or [];
    processes not signalled because they are not what the file says go to ``notes``."""
    problems = []
    if spec.get("launcher"):
        problems += _stop_launcher_record(spec)
    here = socket.gethostname()
    engines = [i for e in spec["engines"] if (i := engine_identity(e, spec)) and i.get("host") == here]
    problems += terminate_verified(engines, refused=notes)
    if problems:
        return problems
    remove_files(spec, path)
    return []


def list_clusters(clean: bool = True) -> list[dict]:
    """Every cluster file (shared and embedded) with its owner and state; stale ones are
    stopped and removed when ``clean`` (or kept, with what still runs, in ``problems``)."""
    out = []
    for path in _cluster_files():
        entry = describe(path)
        if entry["state"] == "stale" and clean:
            try:
                problems = clean_stale(path, read_spec(path))
            except (NoClusterError, ValueError) as exc:
                problems = [str(exc)]
            if problems:
                entry.update(state="stale (kept)", problems=problems)
            else:
                entry["state"] = "stale (removed)"
        out.append(entry)
    return out


def _cluster_files() -> list[Path]:
    from .clusterfile import cluster_files

    return cluster_files()


def stop_cluster_file(path: Path, timeout: float = 20.0) -> tuple[int, list[str]]:
    """Stop the cluster of file ``path`` from another process: ``(exit code, messages)``.

    An ``ipmulti start`` owner is asked to stop (SIGTERM, only after its identity checks);
    an embedded or notebook owner is never signalled: its engines are stopped (by identity)
    and its file removed. A stale file's engines are stopped by identity."""
    messages: list[str] = []
    spec = read_spec(path)
    state, why = owner_state(spec)
    owner = owner_of(spec) or {}
    if state == "remote":
        return 1, [f"not stopping {path}: its owner runs on host {owner.get('host')!r}; stop it there"]
    if state == "none":  # attached kernels: not ours, only forgotten
        remove_files(spec, path)
        return 0, [f"forgot the attached kernels of {path} (they keep running)"]
    if state == "gone":
        if owner.get("pid") and "exited" not in why:
            messages.append(f"not signalling the file's owner pid {owner.get('pid')}: {why}")
        problems = clean_stale(path, spec, notes=messages)
        if problems:
            return 1, messages + problems + [f"kept {path} as the record of what still runs"]
        return (1 if messages else 0), messages + [f"removed the stale cluster file {path}"]
    if owner.get("kind") == "ipmulti":
        refused: list[str] = []
        left = terminate_verified([owner], timeout=timeout, refused=refused)
        if left or refused:
            return 1, refused + left
        if path.exists():  # the owner did not clean up (killed): what it started may still run
            problems = clean_stale(path, spec)
            if problems:
                return 1, problems
        return 0, []
    # an embedded (or notebook) owner: stop its engines, never the process itself; the mark
    # tells the owner first that the deaths to come are a stop (no auto-restart)
    write_cluster(path, {**spec, "stopped_by": identity()})
    idents = [i for e in spec["engines"] if (i := engine_identity(e, spec))]
    problems, refused = [], []
    if spec.get("launcher"):
        problems += _stop_launcher_record(spec)
    problems += terminate_verified(idents, timeout=5.0, refused=refused)
    if problems or refused:
        return 1, refused + problems
    remove_files(spec, path)
    return 0, [f"stopped the engines of {path}; their owner process {owner.get('pid')} keeps running"]


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


class Cluster(Owner):
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
        profile: str | None = None,
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
        #: a profile makes the cluster shared: ``MultiEngineClient(profile=...)`` (and for
        #: 'default' a bare ``MultiEngineClient()`` / ``%px``) finds it, one per profile at a
        #: time (an exclusive lock). Without one it is embedded: private to whoever holds it,
        #: with a unique id, any number side by side.
        self.profile = None if profile is None else check_profile(profile)
        self.shared = profile is not None
        self.cluster_id: str = profile if profile is not None else new_embedded_id()
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
        self._lock = ProfileLock(profile) if profile is not None else None
        self._owner = identity()
        #: removes this cluster's file (if still its own) and drops the profile lock: at stop(),
        #: at exit, and when a notebook kernel shuts down
        #: 'ipmulti' for an ``ipmulti start`` process (``ipmulti stop`` may SIGTERM it); otherwise
        #: the owner is never signalled from outside, only its engines are stopped
        self.owner_kind = "kernel" if in_kernel() else "process"
        self._written: dict[str, str | None] = {"path": None}
        self._file_finalizer = weakref.finalize(self, _release_file, self._written, self.cluster_id,
                                                self._owner, self._lock)

    #: a ``Cluster`` owns its engines: closing its client stops them
    owns_engines = True

    # -- the cluster file
    def _claim(self) -> Path:
        """The file this cluster writes. A shared profile is claimed first (its exclusive lock,
        held until ``stop``); a stale file of it is cleaned up (what it started is stopped by
        identity), a live one refuses."""
        if not self.shared:
            return embedded_file_path(self.cluster_id)
        path = cluster_file_path(self.profile)
        self._lock.acquire()
        try:
            spec = read_spec(path)
        except NoClusterError:
            return path
        except ValueError:
            path.unlink(missing_ok=True)  # malformed: nobody's
            return path
        state, why = owner_state(spec)
        problems = clean_stale(path, spec) if state == "gone" else []
        if state != "gone" or problems:
            self._lock.release()
            what = {"none": "attached kernels", "remote": "a cluster owned on another host"}.get(state, "a cluster")
            if problems:
                raise RuntimeError(f"profile {self.profile!r}: the owner of {path} is gone ({why}) but what it "
                                   f"started could not be stopped: {'; '.join(problems)}")
            raise RuntimeError(f"profile {self.profile!r} already has {what} ({path}); "
                               f"`ipmulti stop --profile {self.profile}` it or use another profile")
        return path

    def _stopped_from_outside(self) -> bool:
        """Has another process (``ipmulti stop``) stopped our engines and removed our file? Then
        do not bring them back, and free the profile for a new cluster."""
        path = self._written.get("path")
        if self._stopped or not path:
            return False
        try:
            if "stopped_by" not in read_spec(path):
                return False
        except NoClusterError:
            pass
        except ValueError:
            return False
        if self._lock is not None and self._lock.held:
            log.warning("another process stopped this cluster (ipmulti stop, %s): its engines "
                        "are not restarted and profile %r is free again", path, self.profile)
            self._lock.release()
        return True

    # -- starting
    def start(self) -> Any:
        """Start the engines; returns a connected ``MultiEngineClient``."""
        from .client import MultiEngineClient
        from .controller import Controller

        if self.managers or self.client is not None:
            raise RuntimeError("this Cluster is already started")
        if self._stopped:
            raise RuntimeError("this Cluster was stopped; create a new one")
        if self.transport_encryption not in (None, "auto", "required", "disabled"):
            raise ValueError(f"transport_encryption must be None, 'auto', 'required' or 'disabled', "
                             f"not {self.transport_encryption!r}")
        path = self._claim() if self.write_file else cluster_file_path(self.cluster_id) if self.shared \
            else embedded_file_path(self.cluster_id)
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
                    controller = Controller(engines, liveness, timeout=self.startup_timeout).connect()
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
            controller = Controller(self.engines_info, liveness, timeout=self.startup_timeout).connect()
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
            await controller.begin_restart(eid, "was restarted")
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
        if self._stopped_from_outside():
            return
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
        """Answer the requests other processes left for exactly this cluster's file (see
        ``clusterfile.request_owner``): 'restart' engines, or 'stop' (``stop_requested``)."""
        if not self.cluster_file:
            return
        for req, ask in pending_requests(self.cluster_file):
            answer: dict[str, Any] = {"ok": True}
            try:
                if ask.get("op") == "stop":
                    self.stop_requested = True
                elif ask.get("op") == "restart":
                    ids = [int(i) for i in ask.get("ids", [])]
                    self.restart(ids)
                    answer["pids"] = {str(e): getattr(self.managers[e].provisioner, "pid", None) for e in ids}
                else:
                    raise ValueError(f"unknown request {ask.get('op')!r}")
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            answer_request(req, self.cluster_file, answer)

    #: set when another process asked this cluster to stop (the ``ipmulti start`` loop stops it)
    stop_requested = False

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
        tag = f"{self.cluster_id}-{os.getpid()}"
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
        return cluster_dir() / f"engine-{self.cluster_id}-{os.getpid()}-{eid}.log"

    def _log_tail(self, eid: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file(eid).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def _write_cluster_file(self, path: Path) -> None:
        host = socket.gethostname()
        spec: dict[str, Any] = {
            "cluster_id": self.cluster_id, "profile": self.profile, "shared": self.shared,
            "owner": {**self._owner, "kind": self.owner_kind},
            "owner_pid": os.getpid(), "host": host, "created": time.time(),
            "serves": ["requests"] if self.serves_requests else [],
        }
        if self.launcher is not None:
            record = self.launcher.to_dict()
            if record.get("pid") and record.get("hostname", host) == host:
                record["identity"] = try_identity(record["pid"])  # so a stale cleanup signals only it
            spec["launcher"] = record
            spec["engines"] = [{"id": eid, "pid": info.get("pid"), "host": info.get("hostname", host),
                                "kernel_name": self.kernel_name, "connection": info}
                               for eid, info in self.engines_info.items()]
        else:
            spec["engines"] = [
                {"id": eid, "pid": getattr(km.provisioner, "pid", None), "host": host,
                 "kernel_name": self.kernel_names[eid], "group": self.kernel_names[eid],
                 "connection": self._connection_info(eid),
                 "connection_file": km.connection_file, "log_file": str(self.log_file(eid))}
                for eid, km in self.managers.items()
            ]
        for e in spec["engines"]:
            if e.get("pid") and e.get("host") == host:
                e["create_time"] = (try_identity(e["pid"]) or {}).get("create_time")
        write_cluster(path, spec)
        self._written["path"] = self.cluster_file = str(path)
        if self.client is not None:
            self.client.cluster_file = str(path)

    # -- stopping
    def stop(self) -> None:
        """Stop every engine and remove the cluster's files; never hangs, safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.client is not None and not self.client.closed:
            self.client.close()
        self._file_finalizer()  # our file only (another cluster may own the profile by now)
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


def _release_file(written: dict, cluster_id: str, owner: dict, lock: ProfileLock | None) -> None:
    """Remove the cluster file if it still is this owner's, then drop the profile lock."""
    try:
        if written.get("path"):
            remove_if_mine(written["path"], cluster_id, owner)
    finally:
        if lock is not None:
            lock.release()


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
