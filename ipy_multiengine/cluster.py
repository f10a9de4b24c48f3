"""The owner of a set of engines: starts, restarts, interrupts and stops them, keeps their file.

``Cluster`` is the owner inside the process that started the engines (an ``Owner``, see
``clusterfile``); :func:`stop_cluster_file` and :func:`list_clusters` act on clusters other
processes own, through their files, and never signal a process whose identity (host, psutil
create time, command line) does not match the file.
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import contextlib
import inspect
import os
import signal
import socket
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Enum, Float, Integer, TraitError, Unicode
from traitlets.config import Config, Configurable
from traitlets.traitlets import MetaHasTraits

from . import _loop, wire
from .client import CONFIGURED, check_timeout, config_error, shell_config
from .clusterfile import (  # noqa: F401  (re-exported: the names tests and tools import from here)
    HOW_TO_START,
    Owner,
    ProfileLock,
    answer_request,
    check_owner,
    check_profile,
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
from .errors import EngineError, NoClusterError, RestartError, TimeoutError
from .render import in_notebook  # the one "in a kernel?" check

log = __import__("logging").getLogger("ipy_multiengine")


# ---------------------------------------------------------------------- clusters owned elsewhere
def terminate_verified(
    idents: list[dict], timeout: float = 5.0, refused: list[str] | None = None
) -> list[str]:
    """SIGTERM, then after ``timeout`` SIGKILL, the processes ``idents`` describe, each only
    if it still is that process (:func:`same_process`); the others are never signalled (why
    is appended to ``refused``). Returns the processes that survived (zombies count as gone:
    their parent, not us, reaps them)."""
    procs = []
    for ident in idents:
        proc, why = same_process(ident)
        if proc is None:
            if refused is not None and "exited" not in why:
                refused.append(f"not signalling pid {ident.get('pid')}: {why}")
            continue
        procs.append(proc)
    for sig_name, wait in (("terminate", timeout), ("kill", 5.0)):
        for proc in procs:
            # psutil re-checks the create time: no reused pid is signalled
            with contextlib.suppress(psutil.Error):
                getattr(proc, sig_name)()
        deadline = time.monotonic() + wait
        while procs:
            procs = [p for p in procs if _running(p)]
            if not procs or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not procs:
            break
    return [f"process {p.pid} survived SIGKILL" for p in procs]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _still_running(spec: dict) -> list[str]:
    """The file's local engines that still run (by identity), as one message, or []."""
    here = socket.gethostname()
    still = [
        f"engine {e['id']} (pid {e['pid']})"
        for e in spec["engines"]
        if (i := engine_identity(e, spec))
        and i.get("host") == here
        and isinstance(i.get("create_time"), (int, float))
        and same_process(i)[0] is not None
    ]
    return [f"still running: {', '.join(still)}"] if still else []


def _stop_launcher_record(spec: dict) -> list[str]:
    """Stop what the file's launcher started (the MPI job, the Slurm job, remote engines);
    what could not be stopped, or []. Local engines are stopped by their own entries."""
    from .launchers import launcher_from_dict

    record = spec.get("launcher") or {}
    if record.get("launcher") in (None, "local"):
        return []
    here = socket.gethostname()
    # the launcher's own local process (mpiexec): signal its group only if it is still the one
    ident = record.get("identity")
    if (
        record.get("pid")
        and record.get("hostname", here) == here
        and (ident is None or same_process(ident)[0] is None)
    ):
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
    return []


def clean_stale(path: Path, spec: dict, notes: list[str] | None = None) -> list[str]:
    """A cluster whose owner is gone: stop what it started (by identity), then remove its
    files. Returns what still runs (the file is then kept as the record of it), or [];
    processes not signalled because they are not what the file says go to ``notes``."""
    problems = []
    if spec.get("launcher"):
        problems += _stop_launcher_record(spec)
    here = socket.gethostname()
    engines = [
        i for e in spec["engines"] if (i := engine_identity(e, spec)) and i.get("host") == here
    ]
    problems += terminate_verified(engines, refused=notes)
    problems = problems or _still_running(spec)
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
        return 1, [
            f"not stopping {path}: its owner runs on host {owner.get('host')!r}; stop it there"
        ]
    if state == "none":  # attached kernels: not ours, only forgotten
        remove_files(spec, path)
        return 0, [f"forgot the attached kernels of {path} (they keep running)"]
    if state == "gone":
        if owner.get("pid") and "exited" not in why:
            messages.append(f"not signalling the file's owner pid {owner.get('pid')}: {why}")
        problems = clean_stale(path, spec, notes=messages)
        if problems:
            return 1, messages + problems + [f"kept {path} as the record of what still runs"]
        return (1 if messages else 0), [*messages, f"removed the stale cluster file {path}"]
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
    problems = problems or _still_running(spec)
    if problems or refused:
        return 1, refused + problems
    remove_files(spec, path)
    return 0, [
        f"stopped the engines of {path}; their owner process {owner.get('pid')} keeps running"
    ]


# ---------------------------------------------------------------------- the Cluster
#: Times an engine is started again on new ports when another process took one of its ports
#: between jupyter_client choosing it and the kernel binding it.
PORT_CLASH_RETRIES = 2

#: Automatic restarts allowed per engine per minute before the Cluster gives up on it.
MAX_AUTO_RESTARTS = 5


class _OwnerConfigurableMeta(abc.ABCMeta, MetaHasTraits):
    """``Owner`` is an ABC, ``Configurable`` a ``HasTraits``: one metaclass for both."""


class Cluster(Owner, Configurable, metaclass=_OwnerConfigurableMeta):
    """The owner of one launcher's engines: N local engines (ipykernel kernels) by default.

    ``start()`` launches them concurrently through the launcher (``LocalLauncher`` unless
    ``launcher=`` names another) and returns a connected ``MultiEngineClient``; ``stop()``
    shuts them down (shutdown request, then SIGTERM, then SIGKILL) and removes their files.
    ``with Cluster(n=4) as mec:`` does both. Local engines exit by themselves when this
    process dies, even by SIGKILL (ipykernel's parent polling).

    Every argument is a configurable trait: an argument not given takes the value of
    ``config`` (default: inside IPython the shell's config, i.e. ``c.Cluster.n = 8`` in
    ``ipython_config.py``; outside IPython none), else the trait's default. See
    ``docs/configuration.md``.
    """

    n = Integer(
        None,
        allow_none=True,
        min=1,
        help="Number of engines; None: 4 for the local launcher, the launcher's own count "
        "otherwise (ssh hosts, ...).",
    ).tag(config=True)
    kernel_name = Unicode(
        "python3",
        help="Kernelspec of the engines (any Python kernelspec with "
        "ipy_multiengine importable; other kernels can execute only).",
    ).tag(config=True)
    profile = Unicode(
        None,
        allow_none=True,
        help="Shared cluster of that profile (found by MultiEngineClient(profile=...), one "
        "at a time); None: embedded (private, found by its file only).",
    ).tag(config=True)
    startup_timeout = Float(
        60.0, min=0.0, help="Seconds to wait for every engine to be ready."
    ).tag(config=True)
    env = Dict(
        default_value=None,
        allow_none=True,
        help="Environment of the engines; None: this process's.",
    ).tag(config=True)
    write_file = Bool(True, help="Write a cluster file others can connect with.").tag(config=True)
    engines = Dict(
        default_value=None,
        allow_none=True,
        help="Engines from several kernelspecs, {kernelspec: n, ...} (local launcher only); "
        "ids in that order, each kernelspec also a group name.",
    ).tag(config=True)
    auto_restart = Bool(
        False, help="Restart engines that die (at most MAX_AUTO_RESTARTS a minute each)."
    ).tag(config=True)
    transport_encryption = Enum(
        ("auto", "required", "disabled"),
        default_value=None,
        allow_none=True,
        help="CurveZMQ: 'auto' (where the kernelspec supports it), 'required', "
        "'disabled'; None: on unless the engines listen on loopback only.",
    ).tag(config=True)
    shutdown_wait = Float(
        3.0,
        min=0.0,
        help="Seconds a stopping engine gets before it is terminated "
        "(SIGTERM, then as long again before SIGKILL).",
    ).tag(config=True)
    launcher = AnyTrait(
        "local",
        help="The launcher: 'local', 'mpi', 'slurm', 'ssh', a plugin name or a "
        "Launcher instance (after construction: the Launcher itself).",
    ).tag(config=True)
    launcher_options = Dict(
        help="Options of the launcher (hosts=..., python=..., ip=...); keyword "
        "arguments of Cluster(...) are added to them."
    ).tag(config=True)

    def __init__(
        self,
        n: int | None = CONFIGURED,
        kernel_name: str = CONFIGURED,
        profile: str | None = CONFIGURED,
        startup_timeout: float = CONFIGURED,
        env: dict[str, str] | None = CONFIGURED,
        write_file: bool = CONFIGURED,
        engines: dict[str, int] | None = CONFIGURED,
        auto_restart: bool = CONFIGURED,
        transport_encryption: str | None = CONFIGURED,
        shutdown_wait: float = CONFIGURED,
        launcher: Any = CONFIGURED,
        *,
        config: Config | None = None,
        **launcher_options: Any,
    ) -> None:
        from .launchers import make_launcher
        from .launchers.base import encryption_policy
        from .launchers.local import LocalLauncher

        given = {
            k: v
            for k, v in dict(
                n=n,
                kernel_name=kernel_name,
                profile=profile,
                startup_timeout=startup_timeout,
                env=env,
                write_file=write_file,
                engines=engines,
                auto_restart=auto_restart,
                transport_encryption=transport_encryption,
                shutdown_wait=shutdown_wait,
                launcher=launcher,
            ).items()
            if v is not CONFIGURED
        }
        for key in ("env", "engines"):  # any mapping, as before (os.environ, ...)
            if isinstance(given.get(key), Mapping) and not isinstance(given[key], dict):
                given[key] = dict(given[key])
        # arguments are checked as before (the same ValueError), configured values by their traits
        if "transport_encryption" in given:
            encryption_policy(transport_encryption, "127.0.0.1")  # checks the value
        if (
            n is not None
            and n is not CONFIGURED
            and (not isinstance(n, int) or isinstance(n, bool) or n < 1)
        ):
            raise ValueError(f"n must be a positive int, not {n!r}")
        try:
            Configurable.__init__(
                self, config=shell_config() if config is None else config, **given
            )
        except TraitError as exc:
            raise config_error(type(self), exc) from None
        n, kernel_name, profile = self.n, self.kernel_name, self.profile
        startup_timeout, env, write_file, engines = (
            self.startup_timeout,
            self.env,
            self.write_file,
            self.engines,
        )
        auto_restart, transport_encryption = self.auto_restart, self.transport_encryption
        shutdown_wait, launcher = self.shutdown_wait, self.launcher
        launcher_options = {**self.launcher_options, **launcher_options}
        # engines={'python3': 2, 'bash': 3}: engines from several kernelspecs, ids in that order;
        # each kernelspec name is also a group name usable as targets
        kernel_names = None
        if engines is not None:
            if launcher != "local":
                raise ValueError("engines={kernelspec: n, ...} works with the local launcher only")
            kernel_names = _engine_groups(engines)
            n = len(kernel_names)
        #: a profile makes the cluster shared: ``MultiEngineClient(profile=...)`` (and for
        #: 'default' a bare ``MultiEngineClient()`` / ``%px``) finds it, one per profile at a
        #: time (an exclusive lock). Without one it is embedded: private to whoever holds it,
        #: with a unique id, any number side by side.
        self.profile = None if profile is None else check_profile(profile)
        self.shared = profile is not None
        self.cluster_id: str = profile if profile is not None else new_embedded_id()
        # the one launcher this cluster owns: 'local' (kernel managers on this machine), or
        # 'mpi'|'slurm'|'ssh'|a plugin name|a Launcher instance (see ipy_multiengine.launchers)
        if launcher == "local":
            self.launcher = LocalLauncher(
                4 if n is None else n,
                kernel_name=kernel_name,
                kernel_names=kernel_names,
                env=env,
                startup_timeout=startup_timeout,
                transport_encryption=transport_encryption,
                shutdown_wait=shutdown_wait,
                work_dir=cluster_dir(),
                tag=f"{self.cluster_id}-{os.getpid()}",
                **launcher_options,
            )
        else:
            if transport_encryption is not None:
                launcher_options.setdefault("transport_encryption", transport_encryption)
            self.launcher = make_launcher(
                launcher,
                n,
                kernel_name=kernel_name,
                env=env,
                startup_timeout=startup_timeout,
                **launcher_options,
            )
        n = self.launcher.n if n is None else n
        self.n = n
        self.kernel_name = kernel_name
        #: engine id -> kernelspec name (= its group)
        self.kernel_names: dict[int, str] = dict(
            getattr(self.launcher, "kernel_names", None) or dict.fromkeys(range(n), kernel_name)
        )
        self.startup_timeout = startup_timeout
        self.env = env
        self.write_file = write_file
        #: restart engines that die, by themselves (at most ``MAX_AUTO_RESTARTS`` a minute each)
        self.auto_restart = auto_restart
        #: CurveZMQ: 'auto' (on where the kernelspec declares support), 'required', 'disabled', or
        #: None (default): on unless the engines listen on loopback only
        #: (launchers.base.ENCRYPT_LOOPBACK)
        self.transport_encryption = transport_encryption
        #: seconds a shutdown request gets before SIGTERM, then as long again before SIGKILL
        self.shutdown_wait = shutdown_wait
        #: answer restart requests from other processes (set by ``ipmulti start``)
        self.serves_requests = False
        #: engine id -> when it was restarted automatically (``time.monotonic()``) within the
        #: last minute (restarts asked for by a user do not count against MAX_AUTO_RESTARTS)
        self.restarts: dict[int, list[float]] = {}
        self._restart_locks: dict[int, asyncio.Lock] = {}
        #: engines add_engines is starting: not restarted automatically (a failed one is
        #: stopped and forgotten by add_engines itself)
        self._adding: set[int] = set()
        self.cluster_file: str | None = None
        self.client: Any = None
        #: connection info per engine id, as the launcher reported it
        self.engines_info: dict[int, dict] = {}
        self._started = False
        self._stopped = False
        self._finalizer: Any = None
        self._lock = ProfileLock(profile) if profile is not None else None
        self._owner = identity()
        #: removes this cluster's file (if still its own) and drops the profile lock: at stop(),
        #: at exit, and when a notebook kernel shuts down
        #: 'ipmulti' for an ``ipmulti start`` process (``ipmulti stop`` may SIGTERM it); otherwise
        #: the owner is never signalled from outside, only its engines are stopped
        self.owner_kind = "kernel" if in_notebook() else "process"
        self._written: dict[str, str | None] = {"path": None}
        self._file_finalizer = weakref.finalize(
            self, _release_file, self._written, self.cluster_id, self._owner, self._lock
        )

    #: a ``Cluster`` owns its engines: closing its client stops them
    owns_engines = True

    @property
    def managers(self) -> dict[int, Any]:
        """The local launcher's kernel managers by engine id (empty for other launchers)."""
        return getattr(self.launcher, "managers", {})

    def log_file(self, eid: int) -> Path:
        """Engine ``eid``'s own stdout/stderr (local engines)."""
        return self.launcher.log_file(eid)

    # -- the cluster file
    def _claim(self) -> Path:
        """The file this cluster writes. A shared profile is claimed first (its exclusive lock,
        held until ``stop``); a stale file of it is cleaned up (what it started is stopped by
        identity), a live one refuses."""
        if not self.shared:
            return embedded_file_path(self.cluster_id)
        assert self.profile is not None and self._lock is not None  # shared: it has a profile
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
            what = {"none": "attached kernels", "remote": "a cluster owned on another host"}.get(
                state, "a cluster"
            )
            if problems:
                raise RuntimeError(
                    f"profile {self.profile!r}: the owner of {path} is gone ({why}) but what it "
                    f"started could not be stopped: {'; '.join(problems)}"
                )
            raise RuntimeError(
                f"profile {self.profile!r} already has {what} ({path}); "
                f"`ipmulti stop --profile {self.profile}` it or use another profile"
            )
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
            log.warning(
                "another process stopped this cluster (ipmulti stop, %s): its engines "
                "are not restarted and profile %r is free again",
                path,
                self.profile,
            )
            self._lock.release()
        return True

    # -- starting
    def start(self) -> Any:
        """Start the engines; returns a connected ``MultiEngineClient``."""
        from .client import MultiEngineClient
        from .controller import Controller

        if self._started or self.client is not None:
            raise RuntimeError("this Cluster is already started")
        if self._stopped:
            raise RuntimeError("this Cluster was stopped; create a new one")
        path = (
            self._claim()
            if self.write_file
            else cluster_file_path(self.cluster_id)
            if self.shared
            else embedded_file_path(self.cluster_id)
        )
        self._started = True
        self._finalizer = weakref.finalize(self, _stop_launcher, self.launcher)
        atexit.register(self._finalizer)
        try:
            infos = _loop.run(self.launcher.start(), timeout=(self.startup_timeout or 3600) + 60)
            self.engines_info = dict(enumerate(infos))
            liveness = {eid: self.launcher.liveness(eid) for eid in self.engines_info}
            for attempt in range(PORT_CLASH_RETRIES + 1):
                try:
                    controller = Controller(
                        self.engines_info, liveness, timeout=self.startup_timeout
                    ).connect()
                    break
                except EngineError as exc:
                    eid = exc.engine_id
                    info = None
                    if attempt < PORT_CLASH_RETRIES and eid is not None:
                        info = _loop.run(
                            self.launcher.retry_after_clash(eid),
                            timeout=(self.startup_timeout or 3600) + 10,
                        )
                    if info is None or eid is None:
                        raise self._with_output(exc) from None
                    log.warning(
                        "engine %s lost a port to another process while starting; "
                        "started it again on new ports",
                        eid,
                    )
                    self.engines_info[eid], liveness[eid] = info, self.launcher.liveness(eid)
        except BaseException:
            self.stop()
            raise
        controller.on_dead = self._on_dead
        controller.own_output = self._own_output
        try:  # a bad configured client value (MultiEngineClient.targets...) stops what started
            self.client = MultiEngineClient.from_controller(controller, self, config=self.config)
        except BaseException:
            self.stop()
            raise
        if self.write_file:
            self._write_cluster_file(path)
        return self.client

    def _own_output(self, eid: int) -> str:
        """(loop thread, the controller's ``own_output``) The last lines engine ``eid``'s
        current kernel wrote to its log itself, under a label naming the log, or "": what a
        process that died wrote to its own stderr (a C library's message before an abort)
        reached nothing else."""
        own = getattr(self.launcher, "own_output", None)
        if own is None or eid not in self.managers:
            return ""
        text = own(eid)
        if not text.strip():
            return ""
        return f"--- engine {eid}'s own output (log {self.log_file(eid)}) ---\n{text}"

    def _with_output(self, exc: EngineError) -> EngineError:
        """``exc`` with the engine's own stdout/stderr appended (why it never became ready)."""
        eid = exc.engine_id
        tail = getattr(self.launcher, "log_tail", None)
        if eid is None or tail is None or eid not in self.managers:
            return exc
        return EngineError(
            f"{exc}\n--- engine {eid}'s own output (kernel {self.kernel_names.get(eid)!r}, "
            f"log {self.log_file(eid)}) ---\n{tail(eid)}",
            eid,
        )

    # -- restarting
    def restart(self, eids: list[int], timeout: float | None = None) -> None:
        """Restart engines ``eids`` keeping their ids and ports, with fresh namespaces."""
        if self._stopped or self.client is None:
            raise EngineError("this Cluster is not running")
        timeout = check_timeout(timeout)
        if not self.launcher.can_restart:
            _loop.run(self.launcher.restart(list(eids)), timeout=60)  # raises, saying why not
        unknown = [e for e in eids if e not in self.engines_info]
        if unknown:
            raise ValueError(
                f"unknown engine ids {unknown}; valid ids: {sorted(self.engines_info)}"
            )
        timeout = self.startup_timeout if timeout is None else timeout
        # a timeout is a promise (issue 11.3): raise at it, and let the restart go on rather
        # than cancel it half way (the engine becomes ready by itself; wait_ready waits for it):
        # the restart's own deadline to connect is not the caller's (a short one failed it, and
        # left the engine dead while its new kernel ran on)
        fut = _loop.submit(self.restart_async(list(eids), max(timeout, self.startup_timeout)))
        try:
            done = _loop.wait([fut], timeout)
        except BaseException:
            fut.cancel()
            raise
        if not done:
            fut.add_done_callback(
                lambda f: (
                    f.cancelled()
                    or f.exception() is None
                    or log.warning(
                        "restart of engines %s failed after its caller stopped waiting: %s",
                        eids,
                        f.exception(),
                    )
                )
            )
            ctl = self.client.controller
            why = "; ".join(f"engine {e} {ctl.unavailable(e) or 'is ready'}" for e in eids)
            raise TimeoutError(
                f"restart of engines {list(eids)} not finished after {timeout:g} s ({why}); "
                "it goes on: mec.wait_ready() waits for it"
            )
        fut.result()

    async def restart_async(self, eids: list[int], timeout: float, automatic: bool = False) -> None:
        """Restart each engine of ``eids`` (together); every restart ends before this does,
        the cluster file records the engines that came back, and then the failures are raised:
        the one error, or one naming each engine that did not come back."""
        try:
            outcomes = await asyncio.gather(
                *(self._restart_one(eid, timeout, automatic) for eid in eids),
                return_exceptions=True,
            )
        finally:
            # also when cancelled (Ctrl-C in restart): the cancel ends the restarts still going
            # first, and the engines already back have new pids a second client must see
            if (
                self.write_file
                and self.cluster_file
                and not self._stopped
                and not self._stopped_from_outside()
            ):
                self._write_cluster_file(Path(self.cluster_file))
        failed = [
            (e, x) for e, x in zip(eids, outcomes, strict=True) if isinstance(x, BaseException)
        ]
        if len(failed) == 1:
            raise failed[0][1]
        if failed:
            # each engine's own exception, traceback included: the mapping for code, the group
            # for a printed traceback (its cause, made by the constructor: the group it makes
            # pickles member by member, a plain one replacing it failed under tblib)
            raise RestartError(
                f"the restart of engines {[e for e, _ in failed]} failed: "
                + "; ".join(f"engine {e}: {str(x) or type(x).__name__}" for e, x in failed),
                dict(failed),
            )

    async def _restart_one(self, eid: int, timeout: float, automatic: bool = False) -> None:
        controller = self.client.controller
        lock = self._restart_locks.setdefault(eid, asyncio.Lock())
        async with lock:
            await controller.begin_restart(eid, "was restarted")
            if automatic:
                self.restarts.setdefault(eid, []).append(time.monotonic())
            try:
                await self._bring_back(eid, timeout)
            except BaseException as exc:
                # never left "restarting": every call to it would wait for a restart that
                # ended (an engine that came back ready, as a restart cut short by its
                # caller's timeout can, is left alone)
                if not self._stopped:
                    first = str(exc).split("\n", 1)[0] or type(exc).__name__
                    interrupted = isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt))
                    controller.fail_restart(
                        eid,
                        "its restart was interrupted"
                        if interrupted
                        else f"failed to restart: {first}",
                    )
                raise

    async def _bring_back(self, eid: int, timeout: float) -> None:
        """The restart of engine ``eid`` proper: the launcher's restart, then connecting to the
        engine (started again on new ports when it lost one to another process)."""
        controller = self.client.controller
        info = await self._usable_info(eid, await self.launcher.restart([eid]))
        for attempt in range(PORT_CLASH_RETRIES + 1):
            if self._stopped:  # stop() ran meanwhile; it stops the launcher's new kernel too
                raise EngineError(f"engine {eid}: the cluster was stopped during its restart", eid)
            try:
                await controller.add_engines_async(
                    {eid: info}, {eid: self.launcher.liveness(eid)}, timeout
                )
                self.engines_info[eid] = info
                break
            except EngineError as exc:
                fresh = (
                    await self.launcher.retry_after_clash(eid)
                    if attempt < PORT_CLASH_RETRIES
                    else None
                )
                if fresh is None:
                    raise self._with_output(exc) from None
                log.warning(
                    "engine %s lost a port to another process while restarting; "
                    "started it on new ports",
                    eid,
                )
                info = fresh

    async def _usable_info(self, eid: int, infos: Any) -> dict:
        """Engine ``eid``'s connection info from the launcher's restart answer ``infos``, or an
        ``EngineError`` naming the engine and what is wrong with it (none for it, not a
        mapping, no key). The kernel the launcher started for it is stopped first: nobody can
        use it, and left running, the cluster file named it alive while this owner had it dead
        (a second client attached through the file used it)."""
        source = f"the restart by the {type(self.launcher).__name__} launcher"
        try:
            if not isinstance(infos, Mapping) or eid not in infos:
                raise ValueError(
                    f"engine {eid} ({source}) has no connection info: the launcher returned "
                    + (
                        f"info for engines {sorted(infos, key=str)} only"
                        if isinstance(infos, Mapping)
                        else f"a {type(infos).__name__}, not a mapping of engine ids to info"
                    )
                )
            wire.check_keys({eid: infos[eid]}, source)
        except ValueError as exc:
            try:
                await self.launcher.send_signal([eid], signal.SIGKILL)
                probe = self.launcher.liveness(eid)
                deadline = time.monotonic() + 5
                while probe is not None and not probe() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)  # its exit, reaped: the cluster file names it gone
            except Exception as kill_exc:
                log.warning(
                    "engine %s: could not stop the kernel of its failed restart (%s); it may run "
                    "until the cluster stops",
                    eid,
                    kill_exc,
                )
            raise EngineError(str(exc), eid, "restart") from exc
        return infos[eid]

    def send_signal(self, eids: list[int], signum: int) -> None:
        """Send signal ``signum`` to engines ``eids`` through the launcher (local engines:
        their kernel managers' process handles)."""
        if self._stopped or self.client is None:
            raise EngineError("this Cluster is not running")
        _loop.run(self.launcher.send_signal(list(eids), signum), timeout=30)

    def add_engines(self, n: int = 1, timeout: float | None = None) -> list[int]:
        """Grow the running cluster by ``n`` engines (local launcher); returns their ids.

        The new engines run the recorded ``on_start`` code before they are ready; the cluster
        file is rewritten (atomically) so that clients attached through it see them
        (``mec.wait_for_engines(n)``, or their next call). If an engine fails to start or to
        connect, the engines of this call are stopped and the error is raised."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"add_engines needs a positive number of engines, not {n!r}")
        timeout = check_timeout(timeout)
        if self._stopped or self.client is None:
            raise EngineError("this Cluster is not running")
        timeout = self.startup_timeout if timeout is None else timeout
        infos = _loop.run(self.launcher.add(n), timeout=(timeout or 3600) + 30)
        ids = sorted(infos)
        self._adding.update(ids)
        try:
            self.client.controller.add_engines(
                infos,
                {e: self.launcher.liveness(e) for e in ids},
                timeout=timeout or 3600,
                forget_failed=True,  # stopped below: never listed, not even as dead
            )
        except BaseException:
            # engines that connected stay (e.g. their on_start code is still running: they
            # become ready when it ends); the others are stopped
            ctl = self.client.controller
            failed = [e for e in ids if e not in ctl.ids or ctl.dead(e)]
            _loop.run(self.launcher.remove(failed), timeout=30)
            # stopped and forgotten by the launcher: no longer listed (as dead, with "restart
            # it" advice no restart can follow), nor in every call on all engines
            if not ctl.closed:
                ctl.forget(failed, "engine failed to start and was stopped")
            kept = {e: infos[e] for e in ids if e not in failed}
            self.engines_info.update(kept)
            if kept and self.write_file and self.cluster_file and not self._stopped:
                self._write_cluster_file(Path(self.cluster_file))
            raise
        finally:
            self._adding.difference_update(ids)
        self.engines_info.update(infos)
        meta = self.launcher.engine_meta()
        for eid in ids:
            self.kernel_names.setdefault(eid, meta.get(eid, {}).get("kernel_name"))
        self.client.refresh()
        if self.write_file and self.cluster_file and not self._stopped:
            self._write_cluster_file(Path(self.cluster_file))
        return ids

    def _on_dead(self, eid: int, reason: str) -> None:
        """Controller callback (loop thread): restart a dead engine when ``auto_restart`` is on."""
        if self._stopped_from_outside():
            return
        if not self.auto_restart or self._stopped or not self.launcher.can_restart:
            return
        if eid in self._adding:
            return  # add_engines stops it (it failed to start)
        lock = self._restart_locks.get(eid)
        if lock is not None and lock.locked():
            return  # being restarted already
        recent = self.restarts[eid] = [
            t for t in self.restarts.get(eid, []) if time.monotonic() - t < 60
        ]
        if len(recent) >= MAX_AUTO_RESTARTS:
            log.error(
                "engine %s died %d times within a minute; not restarting it again", eid, len(recent)
            )
            return
        log.warning("engine %s %s; restarting it", eid, reason)

        async def go() -> None:
            try:
                await self.restart_async([eid], self.startup_timeout, automatic=True)
            except Exception as exc:
                log.error("automatic restart of engine %s failed: %s", eid, exc)

        _loop.background(go(), f"automatic restart of engine {eid}")

    def interrupt(self, eids: list[int]) -> None:
        """Interrupt engines through the launcher: kernel managers (signal or message, as the
        kernelspec says) for local engines; over ssh, ``scancel --signal=INT``, the whole MPI
        job."""
        if self.launcher.can_restart:  # local: the kernel managers answer at once, do not wait
            _loop.submit(self._interrupt(eids))
            return
        _loop.run(self._interrupt(eids), timeout=60)

    async def _interrupt(self, eids: list[int]) -> None:
        """(loop) The launcher's interrupt of ``eids``, except engines being restarted: their
        new kernel may still be starting, and SIGINT then kills it (the restart failed, the
        engine was left dead); nothing of anybody's runs there yet."""
        restarting = [e for e in eids if (lock := self._restart_locks.get(e)) and lock.locked()]
        if restarting:
            log.info("engines %s are restarting: not interrupted", restarting)
        left = [e for e in eids if e not in restarting]
        if left:
            await self.launcher.interrupt(left)

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
                elif self.stop_requested:  # taken in this same round: it stops right after
                    raise EngineError(
                        f"the cluster is stopping (asked to); cannot {ask.get('op')} engines"
                    )
                elif ask.get("op") == "signal":
                    self.send_signal([int(i) for i in ask.get("ids", [])], int(ask["signal"]))
                elif ask.get("op") == "add" and "to" in ask:
                    # `ipmulti scale N`: a total, counted here where requests are served one
                    # by one (two concurrent scales to N must not add twice)
                    more = int(ask["to"]) - len(self.engines_info)
                    answer["ids"] = self.add_engines(more) if more > 0 else []
                    answer["engines"] = len(self.engines_info)
                elif ask.get("op") == "add":
                    answer["ids"] = self.add_engines(int(ask.get("ids", [1])[0]))
                elif ask.get("op") == "restart":
                    ids = [int(i) for i in ask.get("ids", [])]
                    self.restart(ids)
                    meta = self.engine_meta()
                    answer["pids"] = {str(e): meta.get(e, {}).get("pid") for e in ids}
                else:
                    raise ValueError(f"unknown request {ask.get('op')!r}")
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            answer_request(req, self.cluster_file, answer)

    #: set when another process asked this cluster to stop (the ``ipmulti start`` loop stops it)
    stop_requested = False

    def engine_meta(self) -> dict[int, dict]:
        """Per engine id: group, kernel_name, pid and host, as far as this cluster knows them."""
        return {
            eid: {k: m.get(k) for k in ("group", "kernel_name", "pid", "host")}
            for eid, m in self.launcher.engine_meta().items()
        }

    def _write_cluster_file(self, path: Path) -> None:
        host = socket.gethostname()
        spec: dict[str, Any] = {
            "cluster_id": self.cluster_id,
            "profile": self.profile,
            "shared": self.shared,
            "owner": {**self._owner, "kind": self.owner_kind},
            "owner_pid": os.getpid(),
            "host": host,
            "created": time.time(),
            "serves": ["requests"] if self.serves_requests else [],
        }
        if (
            self.launcher.name != "local"
        ):  # local engines: their own entries say all (pid, identity)
            record = self.launcher.to_dict()
            if record.get("pid") and record.get("hostname", host) == host:
                record["identity"] = try_identity(
                    record["pid"]
                )  # so a stale cleanup signals only it
            spec["launcher"] = record
        meta = self.launcher.engine_meta()
        spec["engines"] = []
        for eid, info in self.engines_info.items():
            m = meta.get(eid, {})
            e = {
                "id": eid,
                "pid": m.get("pid", info.get("pid")),
                "host": m.get("host") or host,
                "kernel_name": self.kernel_names.get(eid, self.kernel_name),
                "group": self.kernel_names.get(eid, self.kernel_name),
                "connection": info,
            }
            e.update({k: m[k] for k in ("connection_file", "log_file") if m.get(k)})
            spec["engines"].append(e)
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
        # each step runs whatever the one before raised (a Ctrl-C while the client closes):
        # a second stop() is a no-op, so this one must not leave engines or files behind
        try:
            if self.client is not None and not self.client.closed:
                self.client.close()
        finally:
            try:
                self._file_finalizer()  # our file only (another cluster may own the profile by now)
            finally:
                if self._finalizer is not None:
                    atexit.unregister(self._finalizer)
                    self._finalizer.detach()
                _stop_launcher(self.launcher)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def check_launcher_option(key: Any, allow: frozenset[str] = frozenset()) -> str:
    """``key`` if it can name a launcher option (``ipmulti start -o KEY=VALUE``, a start
    request's ``options``), else ValueError naming it: not a name, or one of ``Cluster``'s own
    parameters (``launcher``, ``profile``, ``write_file``...), which have their own fields,
    unless the caller ``allow``s it (``ipmulti start -o env={...}``: no flag of its own)."""
    if not isinstance(key, str) or not key.isidentifier():
        raise ValueError(f"launcher option {key!r} is not a name (KEY=VALUE, KEY an identifier)")
    if key in _CLUSTER_PARAMETERS and key not in allow:
        raise ValueError(
            f"{key!r} is a parameter of the cluster, not a launcher option "
            "(the launcher, engines, profile and kernelspec have their own fields)"
        )
    return key


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
        raise ValueError(
            f"engines must be a non-empty dict of kernelspec name to count, not {engines!r}"
        )
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


#: Cluster's own keyword arguments: never launcher options
_CLUSTER_PARAMETERS = frozenset(inspect.signature(Cluster.__init__).parameters) - {"self"}
