"""Cluster files: their paths, the one reader and writer, validation, staleness, owner requests.

A cluster file is JSON, mode 0600, in ``jupyter_runtime_dir()/ipy_multiengine/`` (mode 0700)::

    {"cluster_id": "default", "profile": "default", "shared": true,
     "owner": {"pid": 123, "host": "box", "create_time": 1700000000.1, "cmdline": [...],
               "kind": "ipmulti"},
     "owner_pid": 123, "host": "box", "created": 1700000000.0, "serves": ["requests"],
     "engines": [{"id": 0, "pid": 456, "create_time": ..., "host": "box", "kernel_name": "python3",
                  "connection": {... a Jupyter connection file's content ...}}, ...]}

A cluster started for sharing (``ipmulti start``, or ``Cluster(profile=P)``) writes
``cluster-{profile}.json`` and holds ``cluster-{profile}.lock`` (an exclusive ``flock``) for its
whole life; an embedded cluster (``Cluster()`` without a profile) writes
``embedded-{unique id}.json``, which only an explicit path finds. A process that does not own a
cluster reaches its owner through :class:`FileOwner`: requests are files in the cluster's own
request directory, answered by the owner with a ``.done`` file naming the cluster file.

Nothing here signals a process: :func:`same_process` tells whether a recorded pid is still the
process the file describes (host, psutil create time, command line); callers signal only then.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from jupyter_core.paths import jupyter_runtime_dir, secure_write

from .errors import EngineError, NoClusterError, TimeoutError

log = logging.getLogger(__name__)

HOW_TO_START = (
    "start one with `ipmulti start -n 4 --daemon`, or in Python: "
    "`Cluster(n=4, profile='default').start()` (shared; `with Cluster(n=4) as mec:` is "
    "embedded: private to mec, never found by profile)"
)
CONNECTION_KEYS = ("shell_port", "iopub_port", "control_port", "ip", "key")
SHARED_PREFIX, EMBEDDED_PREFIX = "cluster-", "embedded-"
#: Seconds a client connected by cluster file watches for its owner to restart a dead engine.
FOLLOW_RESTART_FOR = 60.0


# ---------------------------------------------------------------------- paths
def runtime_dir(*parts: str) -> Path:
    """``jupyter_runtime_dir()/ipy_multiengine[/parts...]``, each level created with mode 0700."""
    path = Path(jupyter_runtime_dir()) / "ipy_multiengine"
    for part in (None, *parts):
        path = path / part if part else path
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
    return path


def cluster_dir() -> Path:
    """The directory of cluster files (``runtime_dir()``)."""
    return runtime_dir()


def check_profile(profile: str) -> str:
    """``profile`` if it can name a file of its own (no ``/``, no leading dot), else ValueError."""
    if (
        not isinstance(profile, str)
        or not profile
        or "/" in profile
        or "\0" in profile
        or profile.startswith(".")
    ):
        raise ValueError(f"invalid profile name {profile!r}")
    return profile


def cluster_file_path(profile: str = "default") -> Path:
    """The file of the shared cluster of ``profile`` (what ``MultiEngineClient(profile=...)``
    reads)."""
    return cluster_dir() / f"{SHARED_PREFIX}{check_profile(profile)}.json"


def embedded_file_path(cluster_id: str) -> Path:
    """The file of the embedded cluster ``cluster_id`` (found by path only, never by profile)."""
    return cluster_dir() / f"{EMBEDDED_PREFIX}{check_profile(cluster_id)}.json"


def new_embedded_id() -> str:
    """A unique id for an embedded cluster: this process's pid and a random part."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def lock_path(profile: str) -> Path:
    return cluster_dir() / f"{SHARED_PREFIX}{check_profile(profile)}.lock"


def request_dir(cluster_file: str | os.PathLike, create: bool = True) -> Path:
    """The request directory of exactly this cluster file: ``requests/<its file name>/``."""
    name = Path(cluster_file).name
    return runtime_dir("requests", name) if create else cluster_dir() / "requests" / name


def log_path(name: str) -> Path:
    return cluster_dir() / name


# ---------------------------------------------------------------------- the one writer
def write_private(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (0600):
    jupyter_core's ``secure_write`` to a temporary name, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        with secure_write(str(tmp)) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_cluster(path: str | os.PathLike, spec: dict) -> None:
    """Validate ``spec`` and write it as the cluster file ``path``."""
    problem = _validate(spec)
    if problem:
        raise ValueError(f"refusing to write a malformed cluster file {path}: {problem}")
    write_private(path, json.dumps(spec, indent=1))


# ---------------------------------------------------------------------- process identity
def identity(pid: int | None = None, kind: str | None = None) -> dict:
    """What tells process ``pid`` (default: this one) apart from a later one with its pid:
    host, create time and command line (psutil)."""
    proc = psutil.Process(pid)
    with proc.oneshot():
        out = {
            "pid": proc.pid,
            "host": socket.gethostname(),
            "create_time": proc.create_time(),
            "cmdline": proc.cmdline(),
        }
    if kind:
        out["kind"] = kind
    return out


def try_identity(pid: int | None) -> dict | None:
    """:func:`identity` of ``pid``, or None when there is no such process."""
    if not pid:
        return None
    try:
        return identity(pid)
    except psutil.Error:
        return None


def same_process(ident: dict | None) -> tuple[psutil.Process | None, str]:
    """``(process, "")`` when the process ``ident`` describes still runs on this host, else
    ``(None, why not)``. Only such a process may be signalled."""
    if not isinstance(ident, dict) or not isinstance(ident.get("pid"), int):
        return None, "the file records no process identity"
    pid = ident["pid"]
    if ident.get("host") != socket.gethostname():
        return None, f"process {pid} ran on host {ident.get('host')!r}, not on this host"
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None, f"process {pid} has exited"
            created = proc.create_time()
            cmdline = proc.cmdline() if ident.get("cmdline") is not None else None
    except psutil.NoSuchProcess:
        return None, f"process {pid} has exited"
    except psutil.Error as exc:
        return None, f"process {pid} cannot be inspected ({type(exc).__name__})"
    if not isinstance(ident.get("create_time"), (int, float)):
        return (
            None,
            f"the file records no start time for pid {pid}, so it cannot be told from another "
            "process",
        )
    if abs(created - ident["create_time"]) > 0.05:
        return None, f"pid {pid} now belongs to another process (started at {time.ctime(created)})"
    if ident.get("cmdline") is not None and ident["cmdline"] != cmdline:
        return None, f"pid {pid} now runs another command ({' '.join(cmdline or [])[:80]!r})"
    return proc, ""


def pid_alive(pid: int | None) -> bool:
    """True when process ``pid`` exists on this host and is not a zombie (no identity check:
    for polling a child we started; never a reason to signal)."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def owner_of(spec: dict) -> dict | None:
    """The owner identity a cluster file records (None for attached kernels: no owner)."""
    owner = spec.get("owner")
    if isinstance(owner, dict) and spec.get("owner_pid", owner.get("pid")) == owner.get("pid"):
        return owner
    if spec.get("owner_pid"):  # a file without identity: can never be verified
        return {"pid": spec.get("owner_pid"), "host": spec.get("host")}
    return None


def owner_state(spec: dict) -> tuple[str, str]:
    """``('alive'|'gone'|'remote'|'none', detail)`` for the owner of ``spec``."""
    owner = owner_of(spec)
    if owner is None:
        return "none", "attached kernels, no owner"
    if owner.get("host") != socket.gethostname():
        return "remote", f"owner on host {owner.get('host')!r}"
    proc, why = same_process(owner)
    return ("alive", "") if proc is not None else ("gone", why)


# ---------------------------------------------------------------------- the one reader
def read_spec(path: str | os.PathLike) -> dict:
    """Read and validate a cluster file, stale or not. ``NoClusterError`` when it does not
    exist, ``ValueError`` naming the file when it is malformed (not UTF-8, not JSON, ...)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise NoClusterError(f"cluster file {path} does not exist; {HOW_TO_START}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"malformed cluster file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read cluster file {path}: {exc}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed cluster file {path}: not valid JSON ({exc})") from None
    problems = _validate(spec)
    if problems:
        raise ValueError(f"malformed cluster file {path}: {problems}")
    return spec


def read_cluster(path: str | os.PathLike) -> dict:
    """Read a cluster file whose owner still runs; errors name the file and what is wrong."""
    spec = read_spec(path)
    state, why = owner_state(spec)
    if state == "gone":
        raise NoClusterError(
            f"cluster file {path} is stale: its owner process "
            f"{(owner_of(spec) or {}).get('pid')} is gone ({why}); "
            f"`ipmulti list` cleans it up; {HOW_TO_START}"
        )
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
        missing = [k for k in CONNECTION_KEYS if k not in conn]
        if missing:
            return f"engine {e['id']} connection lacks {', '.join(missing)}"
    return ""


def resolve_cluster_file(path: str | os.PathLike | None, profile: str | None) -> Path:
    """The cluster file to use: an explicit path, or the shared cluster of ``profile``
    (default 'default'). Embedded clusters are never found by profile."""
    if path is not None:
        return Path(path)
    candidate = cluster_file_path(profile or "default")
    if not candidate.exists():
        raise NoClusterError(
            f"no running cluster for profile {profile or 'default'!r} "
            f"(no {candidate}); {HOW_TO_START}"
        )
    return candidate


def engines_of(spec: dict) -> dict[int, dict]:
    """Engine id -> connection info."""
    return {e["id"]: e["connection"] for e in spec["engines"]}


def engine_meta_of(spec: dict) -> dict[int, dict]:
    """Engine id -> group, kernel_name, pid and host, as the file records them."""
    return {
        e["id"]: {
            "group": e.get("group", e.get("kernel_name")),
            "kernel_name": e.get("kernel_name"),
            "pid": e.get("pid"),
            "host": e.get("host", spec.get("host")),
        }
        for e in spec["engines"]
    }


def read_connection_files(files: Any) -> dict[int, dict]:
    """Engine id -> connection info for Jupyter connection files, ids 0.. in order."""
    from jupyter_client.connect import find_connection_file

    from .wire import check_keys

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
        missing = [k for k in CONNECTION_KEYS if k not in info]
        if missing:
            raise ValueError(
                f"{path} is not a kernel connection file: it lacks {', '.join(missing)}"
            )
        check_keys({eid: info}, f"connection file {path}")
        engines[eid] = info
    if not engines:
        raise ValueError("attach needs at least one connection file")
    return engines


def liveness_probes(spec: dict) -> dict[int, Callable[[], str | None]]:
    """Process polls for the engines of ``spec`` that run on this host (by identity when the
    file records it, so a reused pid does not look alive)."""
    here = socket.gethostname()
    probes: dict[int, Callable[[], str | None]] = {}
    for e in spec["engines"]:
        pid = e.get("pid")
        if pid and e.get("host", spec.get("host")) == here:
            if isinstance(e.get("create_time"), (int, float)):
                ident = {"pid": pid, "host": here, "create_time": e["create_time"]}
                probes[e["id"]] = functools.partial(_gone_unless_same, ident)
            else:
                probes[e["id"]] = functools.partial(_gone_unless_alive, pid)
    return probes


def _gone_unless_same(ident: dict) -> str | None:
    return (
        None if same_process(ident)[0] is not None else f"exited (process {ident['pid']} is gone)"
    )


def _gone_unless_alive(pid: int) -> str | None:
    return None if pid_alive(pid) else f"exited (process {pid} is gone)"


def engine_identity(e: dict, spec: dict) -> dict | None:
    """The identity an engine entry records (None: not a local process we could verify)."""
    if not e.get("pid"):
        return None
    return {
        "pid": e["pid"],
        "host": e.get("host", spec.get("host")),
        "create_time": e.get("create_time"),
    }


def cluster_files() -> list[Path]:
    """Every cluster file, shared and embedded, sorted."""
    d = cluster_dir()
    return sorted([*d.glob(f"{SHARED_PREFIX}*.json"), *d.glob(f"{EMBEDDED_PREFIX}*.json")])


def describe(path: Path) -> dict:
    """One ``ipmulti list`` entry: file, profile, shared, owner, state, engines; never raises."""
    shared = path.name.startswith(SHARED_PREFIX)
    stem = path.stem[len(SHARED_PREFIX if shared else EMBEDDED_PREFIX) :]
    entry: dict[str, Any] = {
        "file": str(path),
        "profile": stem if shared else "(embedded)",
        "cluster_id": stem,
        "shared": shared,
    }
    try:
        spec = read_spec(path)
    except (NoClusterError, ValueError) as exc:
        entry.update(state=f"malformed ({exc})", engines=[], pids=[], owner="-")
        return entry
    if not shared:
        entry["profile"] = spec.get("profile") or "(embedded)"
    state, why = owner_state(spec)
    owner = owner_of(spec)
    here = socket.gethostname()
    alive = []
    for e in spec["engines"]:
        ident = engine_identity(e, spec)
        if ident is None or ident.get("host") != here:
            alive.append(True)  # on another host, or attached without a pid: not checkable here
        elif isinstance(ident.get("create_time"), (int, float)):
            alive.append(same_process(ident)[0] is not None)
        else:
            alive.append(pid_alive(ident["pid"]))
    if state == "gone":
        cluster_state = "stale"
    elif state == "none":
        cluster_state = "attached"
    else:
        cluster_state = "running" if all(alive) else "degraded"
    entry.update(
        state=cluster_state,
        engines=[e["id"] for e in spec["engines"]],
        pids=[e.get("pid") for e in spec["engines"]],
        engines_alive=alive,
        owner_pid=(owner or {}).get("pid"),
        owner=_owner_text(owner, state, why),
        launcher=(spec.get("launcher") or {}).get("launcher", "local"),
    )
    return entry


def _owner_text(owner: dict | None, state: str, why: str) -> str:
    if owner is None:
        return "none (attached)"
    kind = owner.get("kind") or "?"
    where = "" if owner.get("host") == socket.gethostname() else f"@{owner.get('host')}"
    text = f"pid {owner.get('pid')}{where} ({kind})"
    return text if state != "gone" else f"{text}, gone: {why}"


def remove_files(spec: dict, path: Path) -> None:
    """Remove a cluster file and the files it names (connection files, logs, its requests).

    ``spec`` was read some time ago (seconds: stale engines get SIGTERM and time to exit); the
    file at ``path`` is removed only if it still is that cluster's, never a new owner's file
    of the same profile written meanwhile."""
    for e in spec.get("engines", []):
        for key in ("connection_file", "log_file"):
            if e.get(key):
                Path(e[key]).unlink(missing_ok=True)
        remove_sockets(e.get("connection"))
    try:
        now = read_spec(path)
    except (NoClusterError, ValueError):
        now = None  # gone, or malformed: nobody's
    if now is not None and _file_identity(now) != _file_identity(spec):
        log.info("not removing %s: another cluster wrote it meanwhile", path)
        return
    remove_requests(path)
    Path(path).unlink(missing_ok=True)
    name = Path(path).name
    if name.startswith(SHARED_PREFIX) and name.endswith(".json"):
        ProfileLock.remove_stale(name[len(SHARED_PREFIX) : -len(".json")])


def _file_identity(spec: dict) -> tuple:
    """What tells one cluster's file from a later one at the same path: its id and its owner
    (attached kernels have none: when the file was written)."""
    owner = owner_of(spec)
    key = (
        (owner.get("pid"), owner.get("host"), owner.get("create_time"))
        if owner
        else spec.get("created")
    )
    return spec.get("cluster_id"), key


def remove_sockets(conn: Any) -> None:
    """Remove the unix sockets of a dead engine (``wire.socket_paths`` of its connection info,
    ``transport='ipc'``): a killed kernel leaves them behind. Only sockets are removed, and
    their directory when it is a launcher's own private socket directory (``ipme-*``) and now
    empty."""
    import stat

    from .wire import socket_paths

    paths = socket_paths(conn)
    if not paths:
        return
    for sock in map(Path, paths):
        try:
            if stat.S_ISSOCK(sock.lstat().st_mode):
                sock.unlink()
        except OSError:
            pass
    parent = Path(conn["ip"]).parent
    if parent.name.startswith("ipme-") and parent != cluster_dir():
        with contextlib.suppress(OSError):
            parent.rmdir()


def remove_requests(path: str | os.PathLike) -> None:
    """Remove exactly this cluster file's request directory (unanswered requests, answers)."""
    d = request_dir(path, create=False)
    if d.is_dir():
        for f in d.iterdir():
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            d.rmdir()


def remove_if_mine(path: str | os.PathLike, cluster_id: str, owner: dict) -> bool:
    """Remove the cluster file ``path`` only if it still is the one this owner wrote."""
    try:
        spec = read_spec(path)
    except (NoClusterError, ValueError):
        return False
    mine = (
        spec.get("cluster_id") == cluster_id
        and (spec.get("owner") or {}).get("pid") == owner.get("pid")
        and (spec.get("owner") or {}).get("create_time") == owner.get("create_time")
    )
    if mine:
        remove_requests(path)
        Path(path).unlink(missing_ok=True)
    return mine


# ---------------------------------------------------------------------- claiming a profile
class ProfileLock:
    """The exclusive claim of a shared profile, held for the cluster's life (``flock`` on
    ``cluster-{profile}.lock``; the kernel drops it when the holder dies, even by SIGKILL)."""

    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.path = lock_path(profile)
        self._fd: int | None = None
        self._guard = threading.Lock()  # release() runs on the loop thread and at stop()

    #: seconds ``acquire`` retries: others hold the lock for an instant too (a stale cleanup's
    #: :meth:`remove_stale` takes it to remove the file), which must not look like a live owner
    ACQUIRE_RETRY = 1.0

    def acquire(self) -> None:
        deadline = time.monotonic() + self.ACQUIRE_RETRY
        while not self._try_acquire():
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        else:
            return
        try:
            spec = read_spec(cluster_file_path(self.profile))
            holder = f" (owner {_owner_text(owner_of(spec), 'alive', '')})"
        except (NoClusterError, ValueError):
            holder = " (it is still starting)"
        raise RuntimeError(
            f"a cluster for profile {self.profile!r} is already running{holder}; "
            f"stop it with `ipmulti stop --profile {self.profile}`, or use another "
            "profile, or no profile (embedded)"
        )

    def _try_acquire(self) -> bool:
        """Take the lock without waiting. The lock file is unlinked by whoever releases it, so
        after locking, check that the file locked is still the one at the path (else retry)."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # released and unlinked meanwhile: lock the new file instead

    def release(self) -> None:
        with self._guard:
            if self._fd is not None:
                self.path.unlink(missing_ok=True)  # while still holding it: see _try_acquire
                os.close(self._fd)
                self._fd = None

    @classmethod
    def remove_stale(cls, profile: str) -> None:
        """Remove the lock file of a profile nobody holds (its owner is gone)."""
        lock = cls(profile)
        if lock._try_acquire():
            lock.release()

    @property
    def held(self) -> bool:
        return self._fd is not None


# ---------------------------------------------------------------------- requests to an owner
def check_owner(path: Path, op: str) -> dict:
    """The cluster file's content if its owner takes requests, else an ``EngineError`` saying
    why."""
    spec = read_cluster(path)
    owner = owner_of(spec) or {}
    if "requests" not in spec.get("serves", []):
        raise EngineError(
            f"cannot {op} engines of {path}: its owner process {owner.get('pid')} does not take "
            "requests "
            "(only clusters started with `ipmulti start` do); do it from the process that owns them"
        )
    if owner.get("host") != socket.gethostname():
        raise EngineError(
            f"cannot {op} engines of {path}: its owner runs on host {owner.get('host')!r}"
        )
    return spec


def request_owner(
    cluster_file: str | os.PathLike,
    op: str,
    ids: list[int],
    timeout: float = 60.0,
    extra: dict | None = None,
) -> dict:
    """Ask the owner of ``cluster_file`` to run ``op`` on engines ``ids`` (with the arguments
    ``extra``); wait for its answer, which must come from the owner of this very file."""
    path = Path(cluster_file)
    spec = check_owner(path, op)
    owner = owner_of(spec) or {}
    rid = uuid.uuid4().hex
    req = request_dir(path) / f"{rid}.json"
    write_private(
        req,
        json.dumps(
            {
                **(extra or {}),
                "op": op,
                "ids": ids,
                "cluster_file": _canonical(path),
                "cluster_id": spec.get("cluster_id"),
            }
        ),
    )
    done = req.with_suffix(".done")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if done.exists():
                answer = json.loads(done.read_text())
                done.unlink(missing_ok=True)
                if answer.get("cluster_file") != _canonical(path):
                    raise EngineError(
                        f"the answer to a request for {path} came from the owner of "
                        f"{answer.get('cluster_file')!r}"
                    )
                if answer.get("error"):
                    raise EngineError(
                        f"the owner of {path} could not {op} engines {ids}: {answer['error']}"
                    )
                return answer
            if same_process(owner)[0] is None:
                if op == "stop" and not req.exists():
                    return {"ok": True}  # it took the request and stopped before answering
                raise EngineError(f"the owner process {owner.get('pid')} of {path} is gone")
            time.sleep(0.05)
    finally:
        req.unlink(missing_ok=True)
    raise TimeoutError(
        f"the owner process {owner.get('pid')} of {path} did not {op} engines {ids} within "
        f"{timeout:g} s"
    )


def pending_requests(cluster_file: str | os.PathLike) -> Iterator[tuple[Path, dict]]:
    """(owner side) The requests left for exactly this cluster file, each removed as read."""
    d = request_dir(cluster_file, create=False)
    if not d.is_dir():
        return
    for req in sorted(d.glob("*.json")):
        try:
            ask = json.loads(req.read_text())
        except (OSError, ValueError):
            continue
        finally:
            req.unlink(missing_ok=True)
        if not isinstance(ask, dict) or ask.get("cluster_file") != _canonical(cluster_file):
            answer_request(req, cluster_file, {"error": "the request names another cluster file"})
            continue
        yield req, ask


def answer_request(req: Path, cluster_file: str | os.PathLike, answer: dict) -> None:
    """(owner side) Answer request ``req``, naming this cluster file."""
    write_private(
        req.with_suffix(".done"), json.dumps({**answer, "cluster_file": _canonical(cluster_file)})
    )


def _canonical(path: str | os.PathLike) -> str:
    """One spelling per cluster file (relative paths, symlinks), for addressing requests."""
    return os.path.realpath(path)


# ---------------------------------------------------------------------- the owner interface
class Owner(abc.ABC):
    """What a client asks of whoever owns its engines. ``Cluster`` implements it in the owning
    process; :class:`FileOwner` for a cluster reached through its file."""

    #: the cluster file, when there is one
    cluster_file: str | None = None
    #: True when closing the client stops the engines (the client's own embedded cluster)
    owns_engines: bool = False

    @abc.abstractmethod
    def interrupt(self, eids: list[int]) -> None:
        """Interrupt what engines ``eids`` run."""

    @abc.abstractmethod
    def restart(self, eids: list[int], timeout: float | None = None) -> None:
        """Restart engines ``eids`` keeping their ids; the client is connected to the new ones
        after."""

    @abc.abstractmethod
    def engine_meta(self) -> dict[int, dict]:
        """Per engine id: group, kernel_name, pid, host."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the engines (for a proxy: ask the owner to)."""

    def refresh(self, timeout: float = 60.0) -> list[int]:
        """Connect the client to engines its owner added since (``add_engines``, ``ipmulti
        scale``); the ids connected. The owning process connects them itself: nothing to do."""
        return []

    def add_engines(self, n: int, timeout: float = 60.0) -> list[int]:
        """Ask the owner for ``n`` more engines; their ids."""
        raise EngineError("cannot add engines: this client does not know who owns its engines")

    def send_signal(self, eids: list[int], signum: int) -> None:
        """Send signal ``signum`` to engines ``eids`` (the owner signals its own processes)."""
        raise EngineError(
            f"cannot send signal {signum} to engines {eids}: this client does not own them "
            "(kernels attached by connection file); signal them from the process that started "
            "them, or interrupt them with mec.interrupt()"
        )


class NoOwner(Owner):
    """Kernels attached by connection file: nobody to ask; interrupts go over the control
    channel."""

    def __init__(self, controller: Any) -> None:
        self._controller = controller

    def interrupt(self, eids: list[int]) -> None:
        self._controller.interrupt(eids)

    def restart(self, eids: list[int], timeout: float | None = None) -> None:
        raise EngineError(
            "cannot restart engines this client neither owns nor knows a cluster file for"
        )

    def engine_meta(self) -> dict[int, dict]:
        return {}

    def stop(self) -> None:
        raise EngineError(
            "attached kernels have no owner to stop them; shut them down where they run"
        )


class FileOwner(Owner):
    """The owner of a cluster reached through its file (another process): restarts are owner
    requests, interrupts go over the engines' control channels, and engines its owner restarts
    by itself are followed (``follow_restart`` is the controller's ``on_dead``)."""

    cluster_file: str  # always a file here

    def __init__(
        self, path: str | os.PathLike, controller: Any = None, spec: dict | None = None
    ) -> None:
        self.cluster_file = str(path)
        self._controller = controller
        self._spec = read_cluster(path) if spec is None else spec
        self._restarting: set[int] = set()
        #: dead engines ``follow_restart`` watches the file for (``refresh`` leaves them to it)
        self._following: set[int] = set()
        self.closed = False
        # one refresh at a time: a call from another thread waits for the engines being
        # connected instead of finding them listed but not ready (and failing)
        self._refreshing = threading.Lock()
        try:  # the file as read now: refresh() reads it again only once it changed
            self._stamp: int | None = os.stat(self.cluster_file).st_mtime_ns
        except OSError:
            self._stamp = None

    def interrupt(self, eids: list[int]) -> None:
        self._controller.interrupt(eids)

    def engine_meta(self) -> dict[int, dict]:
        return engine_meta_of(self._spec)

    def restart(self, eids: list[int], timeout: float | None = None) -> None:
        check_owner(Path(self.cluster_file), "restart")
        # one deadline for asking the owner and reconnecting (a timeout is a promise)
        deadline = time.monotonic() + (60.0 if timeout is None else timeout)
        self._restarting.update(eids)
        try:
            self._controller.set_unavailable(eids, "restarting")
            try:
                request_owner(
                    self.cluster_file,
                    "restart",
                    eids,
                    timeout=max(deadline - time.monotonic(), 0.01),
                )
            except BaseException:
                # the owner did not restart them (or not yet): they were marked unavailable and
                # would stay so in this client for good; reconnect to what the file lists, in
                # the background (a restart still under way keeps its ports: that connects too)
                self._reconnect_later(eids)
                raise
            spec = self._spec = read_cluster(self.cluster_file)
            engines = {e: info for e, info in engines_of(spec).items() if e in eids}
            probes = liveness_probes(spec)
            self._controller.add_engines(
                engines,
                {e: p for e, p in probes.items() if e in eids},
                timeout=max(deadline - time.monotonic(), 0.01),
            )
        finally:
            self._restarting.difference_update(eids)

    def _reconnect_later(self, eids: list[int]) -> None:
        """Reconnect engines ``eids`` to their entries in the cluster file, on the loop; a
        failure is logged (nobody waits for it)."""
        from . import _loop

        async def reconnect() -> None:
            try:
                spec = read_spec(self.cluster_file)
                engines = {e: info for e, info in engines_of(spec).items() if e in eids}
                probes = {e: p for e, p in liveness_probes(spec).items() if e in eids}
                if engines and not self.closed:
                    await self._controller.add_engines_async(
                        engines, probes, timeout=FOLLOW_RESTART_FOR
                    )
            except Exception as exc:
                log.warning(
                    "could not reconnect to engines %s after a failed restart request: %s",
                    eids,
                    exc,
                )

        _loop.submit(reconnect())

    def stop(self) -> None:
        request_owner(self.cluster_file, "stop", [], timeout=60.0)

    def send_signal(self, eids: list[int], signum: int) -> None:
        request_owner(self.cluster_file, "signal", eids, timeout=60.0, extra={"signal": signum})

    def add_engines(self, n: int, timeout: float = 60.0) -> list[int]:
        answer = request_owner(self.cluster_file, "add", [n], timeout=timeout)
        self.refresh(timeout)
        return list(answer.get("ids") or [])

    def refresh(self, timeout: float = 60.0) -> list[int]:
        """Connect to the engines the cluster file lists that this client does not know yet
        (read only when the file changed since the last look)."""
        with self._refreshing:
            return self._refresh(timeout)

    def _refresh(self, timeout: float) -> list[int]:
        try:
            stamp = os.stat(self.cluster_file).st_mtime_ns
        except OSError:
            return []
        if stamp == self._stamp:
            return []
        try:
            spec = read_spec(self.cluster_file)
        except Exception as exc:  # being replaced, or gone: the next call looks again
            log.debug("cluster file %s not readable now: %s", self.cluster_file, exc)
            return []
        self._stamp = stamp  # one attempt per version of the file, even if connecting fails
        known = set(self._controller.ids)
        engines = {e: info for e, info in engines_of(spec).items() if e not in known}
        # a dead engine its owner restarted after ``follow_restart`` stopped looking (someone
        # restarting it minutes later): without this it stayed dead here for good
        restarted = {
            e: entry["connection"]
            for entry in spec["engines"]
            if (e := entry["id"]) in known
            and e not in self._following | self._restarting
            and self._restarted(e, entry, spec)
        }
        engines.update(restarted)
        if engines:
            probes = liveness_probes(spec)
            self._controller.add_engines(
                engines, {e: p for e, p in probes.items() if e in engines}, timeout=timeout
            )
        self._spec, self._stamp = spec, stamp
        return sorted(e for e in engines if e not in restarted)

    def _restarted(self, eid: int, entry: dict, spec: dict, dead: Any = None) -> bool:
        """Whether the file's ``entry`` is a new process for engine ``eid``, dead here (its
        snapshot ``dead``: the one that died): other connection info, or another pid alive."""
        conn = self._controller.state(eid) if dead is None else dead
        if not conn.dead:
            return False
        probe = liveness_probes(spec).get(eid)
        if probe is not None and probe() is not None:
            return False  # its process is gone: not (yet) restarted
        return entry["connection"] != dict(conn.connection) or (
            probe is not None
            and bool(entry.get("pid"))
            and entry.get("pid") != conn.engine_info.get("pid")
        )

    def follow_restart(self, eid: int, reason: str) -> None:
        """(loop thread) Engine ``eid`` died: if its owner restarts it (``auto_restart``,
        ``ipmulti restart``, another client's ``restart``), reconnect to the new process as soon
        as the cluster file lists it."""
        import asyncio

        from . import _loop

        controller = self._controller
        dead = controller.state(eid)  # an immutable snapshot: its generation names this connection

        async def follow() -> None:
            deadline = time.monotonic() + FOLLOW_RESTART_FOR
            try:
                while time.monotonic() < deadline and not self.closed:
                    await asyncio.sleep(0.25)
                    conn = controller.state(eid)
                    if conn.generation != dead.generation or not conn.dead:
                        return  # reconnected
                    if eid in self._restarting:
                        return  # being restarted by this client (mec.restart)
                    try:
                        spec = read_spec(self.cluster_file)
                        entry = next(e for e in spec["engines"] if e["id"] == eid)
                    except Exception:
                        continue
                    if self._restarted(eid, entry, spec, conn):
                        probe = liveness_probes(spec).get(eid)
                        try:
                            await controller.add_engines_async(
                                {eid: entry["connection"]}, {eid: probe} if probe else {}, 30
                            )
                        except Exception as exc:
                            log.warning("could not reconnect to restarted engine %s: %s", eid, exc)
                        return
            finally:
                # after this, refresh() reconnects it once the file lists it restarted
                self._following.discard(eid)

        self._following.add(eid)
        _loop.background(follow(), f"following the restart of engine {eid}")
