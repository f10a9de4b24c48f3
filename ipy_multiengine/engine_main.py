"""Start one engine: an ordinary IPython kernel, for launchers.

    python -m ipy_multiengine.engine_main --connection-file DIR/engine-{engine_id}.json
    python -m ipy_multiengine.engine_main --stdin --detach        # over ssh

The launcher pre-writes the engine's connection file (key, transport, ip, every port 0,
mode 0600, in a 0700 directory). This wrapper starts ``ipykernel``'s ``IPKernelApp`` on that
file, so the kernel binds free ports on its own host, and then reports back by rewriting the
connection file atomically with the bound ports plus ``engine_id``, ``pid``, ``hostname`` and
``ipy_multiengine_ready: true``. A launcher waits for that key.

The engine id comes from ``--engine-id``, else from the first of ``OMPI_COMM_WORLD_RANK``,
``PMI_RANK``, ``PMIX_RANK``, ``SLURM_PROCID`` that is set, else 0; ``{engine_id}`` in the
connection file name is replaced by it, so one command line serves every rank of an
``mpiexec``/``srun`` job. When the process was started by MPI (an MPI rank variable is set),
``mpi4py`` is imported and MPI initialised before the kernel starts, so
``from mpi4py import MPI; MPI.COMM_WORLD.allreduce(...)`` works between engines.

With ``--stdin`` the connection info is read as JSON from standard input (so it never
appears on a command line), written to a private file, and with ``--detach`` the kernel is
started in a new session that outlives the ssh connection; the report is then printed as one
JSON line on stdout (prefixed by ``IPY_MULTIENGINE_READY ``) and this process exits.

``--signal SIG --pid PID --connection-file F`` sends a signal to an engine started that way
(after checking that PID really is the engine of F), ``--stop`` terminates it, waits, kills
it if needed and removes its files; both are used by the ssh launcher. With ``--stdin``
instead of ``--pid``/``--connection-file`` they act on every ``[pid, file]`` pair of a JSON
list read from standard input (one ssh per host for all its engines).

This module must stay cheap to import: nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

READY_KEY = "ipy_multiengine_ready"
READY_PREFIX = "IPY_MULTIENGINE_READY "
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
BIND_ALL = ("*", "0.0.0.0", "")


def rank_from_environment(environ: Mapping[str, str] | None = None) -> int | None:
    """The engine id a process launcher assigned (MPI rank or Slurm task id), or None."""
    environ = os.environ if environ is None else environ
    for var in RANK_VARIABLES:
        value = environ.get(var)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return None


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return any(environ.get(v) not in (None, "") for v in MPI_RANK_VARIABLES)


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON to ``path`` with mode 0600 so that readers never see a partial file."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_private(path: str, mode: str = "ab") -> IO[Any]:
    """Open ``path`` (created if missing) readable and writable by its owner only (0600),
    whatever the umask: engine logs and job scripts may show what the engines run."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    return os.fdopen(fd, mode)


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None while it is missing or half written."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def report_address(bind_ip: str, environ: Mapping[str, str] | None = None) -> str:
    """The address the controller uses for a kernel bound to ``bind_ip``.

    A specific address is reported as is. For a wide bind (``*``), never a loopback address
    (``gethostbyname(gethostname())`` is 127.0.1.1 on stock Debian): the address of the
    interface that routes to the controller (``IPY_MULTIENGINE_CONTROLLER_HOST``, addresses
    the launcher sets, else Slurm's ``SLURM_SUBMIT_HOST``), else of the default route, else
    the first non-loopback interface address. ``IPY_MULTIENGINE_ENGINE_ADDRESS`` overrides.
    """
    environ = os.environ if environ is None else environ
    if bind_ip not in BIND_ALL:
        return bind_ip
    override = environ.get("IPY_MULTIENGINE_ENGINE_ADDRESS")
    if override:
        return override
    targets = [
        h for h in environ.get("IPY_MULTIENGINE_CONTROLLER_HOST", "").split(",") if h.strip()
    ]
    if environ.get("SLURM_SUBMIT_HOST"):
        targets.append(environ["SLURM_SUBMIT_HOST"])
    targets.append("192.0.2.1")  # TEST-NET-1: only to pick the default route; nothing is sent
    for target in targets:
        address = _route_to(target.strip())
        if address and not _loopback(address):
            return address
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET and not _loopback(a.address):
                    return a.address
    except Exception:
        pass
    return "127.0.0.1"  # no other interface: nothing but this host can reach the kernel anyway


def _loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "0.0.0.0")


def _route_to(host: str) -> str | None:
    """The local address the kernel's routing table uses toward ``host`` (a UDP connect sends
    nothing), or None when ``host`` is unknown or unreachable."""
    try:
        infos = socket.getaddrinfo(host, 9, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return None
    for *_, sockaddr in infos:
        if _loopback(str(sockaddr[0])):
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect(sockaddr)
            return s.getsockname()[0]
        except OSError:
            continue
        finally:
            s.close()
    return None


def _init_mpi(mode: str) -> None:
    if mode == "no" or (mode == "auto" and not launched_by_mpi()):
        return
    try:
        from mpi4py import MPI  # noqa: F401  (MPI_Init_thread happens at import)
    except ImportError:
        if mode == "yes":
            raise
        print(
            "ipy_multiengine.engine_main: started by MPI but mpi4py is not installed; "
            "engines run without MPI",
            file=sys.stderr,
        )


def run_kernel(connection_file: str, engine_id: int, mpi: str, kernel_args: list[str]) -> None:
    """Start IPKernelApp on ``connection_file``, report its ports, and serve until shutdown."""
    info = read_json(connection_file)
    if info is None:
        raise SystemExit(f"engine_main: cannot read connection file {connection_file}")
    bind_ip = info.get("ip", "127.0.0.1")
    if bind_ip in BIND_ALL:
        info["ip"] = "0.0.0.0"
        write_json_atomic(connection_file, info)
    _init_mpi(mpi)

    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(
        [
            "-f",
            connection_file,
            "--HistoryManager.hist_file=:memory:",
            *kernel_args,
        ]
    )
    # IPKernelApp has merged the bound ports into the file (not atomically); rewrite it
    # whole with our report so a launcher never reads a half-written file as ready.
    bound = dict(read_json(connection_file) or info)
    bound.update(
        ip=report_address(bind_ip),
        transport=app.transport,
        shell_port=app.shell_port,
        iopub_port=app.iopub_port,
        stdin_port=app.stdin_port,
        control_port=app.control_port,
        hb_port=app.hb_port,
        engine_id=engine_id,
        pid=os.getpid(),
        hostname=socket.gethostname(),
    )
    bound[READY_KEY] = True
    write_json_atomic(connection_file, bound)
    app.start()


def _private_dir() -> str:
    from .clusterfile import runtime_dir

    return str(runtime_dir("engines"))


def run_detached(
    info: dict, engine_id: int, mpi: str, kernel_args: list[str], timeout: float
) -> int:
    """Write ``info`` privately, start the kernel in a new session, print its report."""
    import subprocess
    import uuid

    info = {k: v for k, v in info.items() if k != READY_KEY}
    for attempt in range(3):  # a concurrent --stop may remove the emptied directory
        directory = _private_dir()
        path = os.path.join(directory, f"engine-{engine_id}-{uuid.uuid4().hex[:12]}.json")
        try:
            write_json_atomic(path, info)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    log_path = path[: -len(".json")] + ".log"
    log = open_private(log_path)
    cmd = [
        sys.executable,
        "-m",
        "ipy_multiengine.engine_main",
        "--connection-file",
        path,
        "--engine-id",
        str(engine_id),
        "--mpi",
        mpi,
        "--",
        *kernel_args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while True:
        report = read_json(path)
        if report and report.get(READY_KEY):
            report["connection_file"] = path
            report["log_file"] = log_path
            try:
                print(READY_PREFIX + json.dumps(report), flush=True)
            except (BrokenPipeError, OSError):  # the launcher gave up (cancelled): no orphan
                proc.kill()
                proc.wait()
                _remove(path, log_path)
                return 1
            return 0
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            try:
                with open(log_path, errors="replace") as f:
                    tail = f.read()[-3000:]
            except OSError:
                tail = ""
            print(
                f"engine_main: engine {engine_id} on {socket.gethostname()} did not start "
                f"(exit code {proc.poll()}):\n{tail}",
                file=sys.stderr,
            )
            _remove(path, log_path)
            return 1
        time.sleep(0.05)


def _remove(*paths: str) -> None:
    """Remove files that may already be gone."""
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def engine_process(pid: int, connection_file: str) -> psutil.Process | None:
    """The ``psutil.Process`` with ``pid`` if it is the engine of ``connection_file`` (its
    command line names that file), else None. Never trust a bare pid: it may belong to
    anybody by now; a process we may not inspect is not ours to signal either."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        args = proc.cmdline()
    except psutil.Error:
        return None
    return proc if connection_file in args else None


def pid_runs_engine(pid: int, connection_file: str) -> bool:
    """Is process ``pid`` alive (not a zombie) and the engine of ``connection_file``?"""
    return engine_process(pid, connection_file) is not None


def signal_engine(pid: int, connection_file: str, signame: str) -> int:
    proc = engine_process(pid, connection_file)
    if proc is None:
        print(f"engine_main: no engine with pid {pid} for {connection_file}", file=sys.stderr)
        return 3
    if signame != "0":  # signal 0: only check that the engine runs
        import psutil

        try:  # psutil checks the create time again: a pid reused meanwhile is not signalled
            proc.send_signal(
                getattr(signal, signame if signame.startswith("SIG") else "SIG" + signame)
            )
        except psutil.NoSuchProcess:
            return 3
    return 0


def _running(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_engines(engines: list[tuple[int, str]], timeout: float) -> int:
    """SIGTERM every engine (pid, connection file) that still is that engine, wait up to
    ``timeout``, SIGKILL those left; remove their files."""
    import psutil

    procs = [p for pid, f in engines if (p := engine_process(pid, f)) is not None]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=5.0)
    alive = [p for p in alive if _running(p)]  # a zombie is gone (its parent reaps it)
    if alive:
        print(
            "engine_main: engine process(es) still running after SIGKILL: "
            + ", ".join(str(p.pid) for p in alive),
            file=sys.stderr,
        )
        return 1  # their files stay: the record of what still runs
    for _, connection_file in engines:
        _remove(connection_file, connection_file[: -len(".json")] + ".log")
        directory = os.path.dirname(connection_file)
        if directory == os.path.dirname(os.path.abspath(connection_file)) and directory.endswith(
            os.path.join("ipy_multiengine", "engines")
        ):
            # our private directory goes when its last engine does
            with contextlib.suppress(OSError):
                os.rmdir(directory)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ipy_multiengine.engine_main",
        description="Start an ipy_multiengine engine (an IPython kernel) and report its ports.",
    )
    parser.add_argument(
        "--connection-file",
        "-f",
        help="pre-written connection file; '{engine_id}' is replaced by the engine id",
    )
    parser.add_argument(
        "--engine-id",
        type=int,
        default=None,
        help="engine id (default: MPI rank / SLURM_PROCID / 0)",
    )
    parser.add_argument(
        "--stdin", action="store_true", help="read the connection info as JSON from standard input"
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="start the kernel in a new session, print its report, exit",
    )
    parser.add_argument(
        "--mpi",
        choices=("auto", "yes", "no"),
        default="auto",
        help="initialise MPI before the kernel (auto: when started by MPI)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="with --detach: seconds to wait for the kernel"
    )
    parser.add_argument("--signal", dest="signame", help="send signal SIGNAME to --pid")
    parser.add_argument("--stop", action="store_true", help="terminate the engine --pid")
    parser.add_argument("--pid", type=int)
    parser.add_argument("kernel_args", nargs="*", help="extra IPKernelApp arguments after --")
    args = parser.parse_args(argv)

    if args.signame or args.stop:
        if args.stdin:  # several engines: JSON [[pid, connection_file], ...] on stdin
            engines = [(int(pid), str(f)) for pid, f in json.loads(sys.stdin.read())]
        elif args.pid is not None and args.connection_file:
            engines = [(args.pid, args.connection_file)]
        else:
            parser.error("--signal/--stop need --pid and --connection-file, or --stdin")
        if args.stop:
            return stop_engines(engines, args.timeout)
        codes = [signal_engine(pid, f, args.signame.upper()) for pid, f in engines]
        return max(codes, default=0)

    engine_id = args.engine_id
    if engine_id is None:
        engine_id = rank_from_environment()
    if engine_id is None:
        engine_id = 0

    if args.stdin:
        info = json.loads(sys.stdin.read())
        if not args.detach:
            path = os.path.join(_private_dir(), f"engine-{engine_id}-{os.getpid()}.json")
            write_json_atomic(path, info)
            run_kernel(path, engine_id, args.mpi, args.kernel_args)
            return 0
        return run_detached(info, engine_id, args.mpi, args.kernel_args, args.timeout)

    if not args.connection_file:
        parser.error("--connection-file or --stdin is required")
    path = args.connection_file.replace("{engine_id}", str(engine_id))
    run_kernel(path, engine_id, args.mpi, args.kernel_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
