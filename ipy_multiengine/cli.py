"""``ipmulti``: start, stop and list clusters, and run the demo tour."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .cluster import Cluster, check_launcher_option, list_clusters, stop_cluster_file
from .clusterfile import (
    EMBEDDED_PREFIX,
    SHARED_PREFIX,
    ProfileLock,
    check_profile,
    cluster_dir,
    cluster_file_path,
    owner_state,
    read_cluster,
    read_connection_files,
    read_spec,
    request_owner,
    write_cluster,
)
from .errors import MultiEngineError, NoClusterError

#: What ``ipmulti start`` prints once its engines are ready (after its cluster file is written)
READY = "engines ready, cluster file"


class UsageError(MultiEngineError, ValueError):
    """A bad command-line argument: ``ipmulti: message`` and exit code 2."""


def parse_engines(text: str) -> dict[str, int]:
    """``'python3=2,bash=3'`` -> ``{'python3': 2, 'bash': 3}``."""
    out: dict[str, int] = {}
    for part in text.split(","):
        name, sep, count = part.strip().partition("=")
        if not sep or not name.strip() or not count.strip().isdigit() or int(count) < 1:
            raise UsageError(
                f"--engines {text!r}: expected KERNELSPEC=N[,KERNELSPEC=N...], e.g. "
                "python3=2,bash=3"
            )
        out[name.strip()] = out.get(name.strip(), 0) + int(count)
    return out


def _start(args: argparse.Namespace) -> int:
    if args.daemon:
        return _start_daemon(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cluster = _make_cluster(args)
    cluster.serves_requests = True  # `ipmulti restart` and mec.restart() from other processes
    cluster.owner_kind = (
        "ipmulti"  # `ipmulti stop` may SIGTERM this process (after identity checks)
    )
    try:
        mec = cluster.start()
    except KeyboardInterrupt:  # start() stopped whatever had started
        print(
            "ipmulti: interrupted while starting; the engines that had started are stopped",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        print(f"ipmulti: could not start the cluster: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"{len(mec.get_ids())} {READY} {cluster.cluster_file}", flush=True)
        if not args.quiet:
            print("Press Ctrl-C to stop.", flush=True)
        while not stop.wait(0.2) and not cluster.stop_requested:
            cluster.serve_requests()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    print("cluster stopped", flush=True)
    return 0


def _make_cluster(args: argparse.Namespace) -> Cluster:
    """The ``Cluster`` ``ipmulti start`` arguments describe; ``UsageError`` for bad ones,
    before anything starts."""
    if args.hosts and args.launcher != "ssh":
        raise UsageError(f"--hosts works with --launcher ssh only (not {args.launcher!r})")
    options = _launcher_options(args)
    engines = parse_engines(args.engines) if args.engines else None
    try:
        return Cluster(
            n=args.n,
            kernel_name=args.kernel,
            profile=args.profile,
            startup_timeout=args.timeout,
            auto_restart=args.auto_restart,
            transport_encryption=args.encryption,
            engines=engines,
            **options,
        )
    except (ValueError, TypeError, KeyError, LookupError) as exc:
        raise UsageError(_one_line(exc)) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _start_daemon(args: argparse.Namespace) -> int:
    _make_cluster(args)  # check the arguments here, where the user sees the error
    path = cluster_file_path(args.profile)
    log = cluster_dir() / f"daemon-{args.profile}.log"
    cmd = [
        sys.executable,
        "-m",
        "ipy_multiengine.cli",
        "start",
        f"--profile={args.profile}",  # NAME=VALUE: a profile may begin with '-'
        f"--kernel={args.kernel}",
        "--timeout",
        str(args.timeout),
        "--quiet",
        f"--launcher={args.launcher}",
    ]
    cmd += ["-n", str(args.n)] if args.n is not None else []
    cmd += ["--hosts", args.hosts] if args.hosts else []
    for opt in args.launcher_option:
        cmd += ["-o", opt]
    if args.auto_restart:
        cmd.append("--auto-restart")
    if args.engines:
        cmd += ["--engines", args.engines]
    if args.encryption:
        cmd += ["--encryption", args.encryption]
    # a log of its own (0600) until this daemon owns the profile: a second `start --daemon` of
    # a running profile must neither truncate the owner's log nor write into it
    own_log = cluster_dir() / f".daemon-{args.profile}.{os.getpid()}.log"
    with os.fdopen(os.open(own_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + args.timeout + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(
                "ipmulti: the cluster process exited with code "
                f"{proc.returncode}:\n{own_log.read_text()}",
                file=sys.stderr,
            )
            own_log.unlink(missing_ok=True)
            return 1
        try:
            # its cluster file names it once its engines are ready, and then it says so in its
            # log: wait for both (a log read at once could say nothing yet)
            owner = (read_spec(path).get("owner") or {}).get("pid")
            if owner == proc.pid and READY.encode() in own_log.read_bytes():
                os.replace(own_log, log)
                print(path)
                return 0
        except (NoClusterError, ValueError):
            pass
        time.sleep(0.1)
    proc.terminate()
    os.replace(own_log, log)
    print(f"ipmulti: engines not ready after {args.timeout:g} s; see {log}", file=sys.stderr)
    return 1


def _launcher_options(args: argparse.Namespace) -> dict:
    """``--launcher``, ``--hosts`` and ``-o KEY=VALUE`` as Cluster keyword arguments."""
    if args.launcher == "local" and not args.hosts and not args.launcher_option:
        return {}
    options: dict = {"launcher": args.launcher}
    if args.hosts:  # "host1=2,host2=2" or "host1,host2"
        hosts: dict = {}
        for item in args.hosts.split(","):
            host, _, count = (
                item.strip().rpartition("=") if "=" in item else (item.strip(), "", "1")
            )
            if not host or not count.isdigit():
                raise UsageError(f"--hosts: expected HOST=N[,HOST=N...], got {item!r}")
            hosts[host] = int(count)
        options["hosts"] = hosts
    for opt in args.launcher_option:
        key, sep, value = opt.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"-o: expected KEY=VALUE, got {opt!r}")
        try:
            # the engines' environment has no flag of its own: -o env={"NAME": "value"}
            check_launcher_option(key, allow=frozenset({"env"}))
        except ValueError as exc:
            raise UsageError(f"-o {opt!r}: {exc}") from None
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _attach(args: argparse.Namespace) -> int:
    """Register running kernels as the engines of a profile, without owning them. The profile
    is claimed (its lock) while it is checked and written, as ``Cluster`` claims it: a cluster
    of the profile that is still starting (its file not written yet) is not overwritten later."""
    lock = ProfileLock(args.profile)
    try:
        lock.acquire()
    except RuntimeError as exc:
        print(f"ipmulti: {exc}", file=sys.stderr)
        return 1
    try:
        return _attach_claimed(args)
    finally:
        lock.release()


def _attach_claimed(args: argparse.Namespace) -> int:
    path = cluster_file_path(args.profile)
    try:
        spec = read_spec(path)
    except NoClusterError:
        pass
    except ValueError:
        path.unlink(missing_ok=True)  # malformed: nobody's
    else:
        if owner_state(spec)[0] != "gone":
            print(
                f"ipmulti: profile {args.profile!r} already has a cluster ({path}); "
                "use another --profile or `ipmulti stop` it",
                file=sys.stderr,
            )
            return 1
        print(
            f"ipmulti: the cluster of {path} is stale; `ipmulti stop --profile {args.profile}` "
            "cleans it up first",
            file=sys.stderr,
        )
        return 1
    try:
        engines = read_connection_files(args.files)
    except (OSError, ValueError) as exc:
        print(f"ipmulti: {exc}", file=sys.stderr)
        return 1
    if args.check:
        from .client import MultiEngineClient

        try:
            MultiEngineClient.attach(args.files, timeout=args.timeout).close()
        except Exception as exc:
            print(f"ipmulti: cannot reach the kernels: {exc}", file=sys.stderr)
            return 1
    spec = {
        "cluster_id": args.profile,
        "profile": args.profile,
        "shared": True,
        "attached": True,
        "attached_from": socket.gethostname(),
        "created": time.time(),
        "engines": [
            {"id": eid, "connection": info, "connection_file": None}
            for eid, info in engines.items()
        ],
    }
    write_cluster(path, spec)
    print(path)
    return 0


def _target(args: argparse.Namespace) -> Path:
    """The cluster file ``stop``/``restart`` act on: ``--file`` (e.g. an embedded cluster's, from
    ``ipmulti list``) or the shared cluster of ``--profile``."""
    return Path(args.file) if getattr(args, "file", None) else cluster_file_path(args.profile)


def _stop(args: argparse.Namespace) -> int:
    path = _target(args)
    try:
        code, messages = stop_cluster_file(path)
    except NoClusterError:
        print(
            f"ipmulti: no cluster file {path} (it does not exist)"
            if args.file
            else f"ipmulti: no cluster for profile {args.profile!r} ({path} does not exist)",
            file=sys.stderr,
        )
        return 1
    except ValueError as exc:
        if _is_cluster_file(path):  # malformed, in our own directory: nobody's
            print(f"ipmulti: {_one_line(exc)}; removing it", file=sys.stderr)
            path.unlink(missing_ok=True)
        else:  # --file naming something else: not ours to delete
            print(f"ipmulti: {_one_line(exc)}; not a cluster file, left as it is", file=sys.stderr)
        return 1
    for m in messages:
        print(f"ipmulti: {m}", file=sys.stderr if code else sys.stdout)
    if code == 0:
        if not args.file:
            (cluster_dir() / f"daemon-{args.profile}.log").unlink(missing_ok=True)
        print(f"stopped cluster {args.profile if not args.file else path}")
    return code


def _is_cluster_file(path: Path) -> bool:
    """Is ``path`` a cluster file in the cluster directory (``cluster-*.json``,
    ``embedded-*.json``)?"""
    try:
        return (
            path.resolve().parent == cluster_dir().resolve()
            and path.suffix == ".json"
            and path.name.startswith((SHARED_PREFIX, EMBEDDED_PREFIX))
        )
    except OSError:
        return False


def _restart(args: argparse.Namespace) -> int:
    path = _target(args)
    try:
        spec = read_cluster(path)
        ids = args.ids or [e["id"] for e in spec["engines"]]
        known = {e["id"] for e in spec["engines"]}
        unknown = [i for i in ids if i not in known]
        if unknown:
            print(
                f"ipmulti: unknown engine ids {unknown}; valid ids: {sorted(known)}",
                file=sys.stderr,
            )
            return 2
        answer = request_owner(path, "restart", ids, timeout=args.timeout)
    except (MultiEngineError, ValueError) as exc:
        print(f"ipmulti: {exc}", file=sys.stderr)
        return 1
    pids = answer.get("pids", {})
    print(
        f"restarted engine{'s' if len(ids) > 1 else ''} "
        + ", ".join(f"{i} (pid {pids.get(str(i))})" for i in ids)
    )
    return 0


def _scale(args: argparse.Namespace) -> int:
    path = _target(args)
    try:
        spec = read_cluster(path)
        have = len(spec["engines"])
        if args.engines < have:
            print(
                f"ipmulti: the cluster has {have} engines; scale only grows it (to stop some, "
                "stop the cluster and start a smaller one)",
                file=sys.stderr,
            )
            return 2
        if args.engines == have:
            print(f"the cluster already has {have} engines")
            return 0
        answer = request_owner(
            path, "add", [args.engines - have], timeout=args.timeout, extra={"to": args.engines}
        )
    except (MultiEngineError, ValueError) as exc:
        print(f"ipmulti: {exc}", file=sys.stderr)
        return 1
    ids = answer.get("ids") or []
    total = answer.get("engines", args.engines)
    if not ids:  # another request grew it meanwhile
        print(f"the cluster already has {total} engines")
        return 0
    print(f"added engine{'s' if len(ids) != 1 else ''} {', '.join(map(str, ids))}: {total} engines")
    return 0


def _list(args: argparse.Namespace) -> int:
    clusters = list_clusters(clean=True)
    if args.json:
        print(json.dumps(clusters, indent=1))
        return 0
    if not clusters:
        print("no clusters")
        return 0
    print(f"{'profile':<16} {'state':<18} {'engines':<8} {'dead':<10} {'owner':<28} pids / file")
    for c in clusters:
        dead = [
            e for e, ok in zip(c["engines"], c.get("engines_alive", []), strict=False) if not ok
        ]
        name = c["profile"] if c["shared"] else f"{c['profile']}*"
        where = " ".join(map(str, c["pids"])) if c["shared"] else c["file"]
        print(
            f"{name:<16} {c['state']:<18} {len(c['engines']):<8} "
            f"{','.join(map(str, dead)) or '-':<10} "
            f"{c['owner']:<28} {where}"
        )
        for problem in c.get("problems", []):
            print(f"    {problem}")
    if any(not c["shared"] for c in clusters):
        print(
            "* embedded (private to its owner: reach it by its file, "
            "`ipmulti stop --file FILE` stops its engines only)"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import tour

    return tour(n=args.n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipmulti", description="Manage ipy_multiengine clusters.")
    parser.add_argument("--version", action="version", version=f"ipmulti {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start N engines (foreground until Ctrl-C, or --daemon)")
    p.add_argument(
        "-n", type=int, default=None, help="number of engines (default 4; ssh: from --hosts)"
    )
    p.add_argument(
        "--launcher",
        default="local",
        help="who starts the engines: local (default), mpi, slurm, ssh, or a plugin",
    )
    p.add_argument("--hosts", help="ssh launcher: HOST=N[,HOST=N...]")
    p.add_argument(
        "-o",
        "--launcher-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="launcher option (VALUE as JSON if it parses), e.g. -o partition=gpu "
        '-o \'mpiexec_args=["-hosts", "a,b"]\'',
    )

    p.add_argument("--profile", default="default")
    p.add_argument("--kernel", default="python3", help="kernelspec name of the engines")
    p.add_argument(
        "--engines",
        metavar="SPEC=N,...",
        default=None,
        help="engines from several kernelspecs, e.g. python3=2,bash=3 (overrides -n/--kernel); "
        "each kernelspec name is a group usable as targets",
    )
    p.add_argument("--daemon", action="store_true", help="detach once every engine is ready")
    p.add_argument("--timeout", type=float, default=60.0, help="startup timeout in seconds")
    p.add_argument("--auto-restart", action="store_true", help="restart engines that die")
    p.add_argument(
        "--encryption",
        choices=["auto", "required", "disabled"],
        default=None,
        help="CurveZMQ transport encryption: auto (where the kernelspec supports it), required, "
        "disabled (default: auto, except for engines listening on loopback only)",
    )
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_start)
    p = sub.add_parser("restart", help="restart engines of a running cluster, keeping their ids")
    p.add_argument("ids", nargs="*", type=int, help="engine ids (default: all)")
    p.add_argument("--profile", default="default")
    p.add_argument("--file", default=None, help="the cluster file (instead of --profile)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=_restart)
    p = sub.add_parser(
        "scale", help="grow a running cluster (started with `ipmulti start`) to N engines"
    )
    p.add_argument("engines", type=int, help="the number of engines wanted in all")
    p.add_argument("--profile", default="default")
    p.add_argument("--file", default=None, help="the cluster file (instead of --profile)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=_scale)
    p = sub.add_parser(
        "attach",
        help="make running kernels (connection files) the engines of a profile; "
        "they are not owned: `ipmulti stop` only forgets them",
    )
    p.add_argument(
        "files", nargs="+", help="kernel connection files (paths or kernel-*.json names)"
    )
    p.add_argument("--profile", default="default")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument(
        "--no-check", dest="check", action="store_false", help="do not connect to the kernels first"
    )
    p.set_defaults(func=_attach)
    p = sub.add_parser("stop", help="stop a running cluster and remove its files")
    p.add_argument("--profile", default="default")
    p.add_argument(
        "--file",
        default=None,
        help="the cluster file (e.g. an embedded cluster's, from `ipmulti list`)",
    )
    p.set_defaults(func=_stop)
    p = sub.add_parser("list", help="list clusters (stale ones are cleaned up)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)
    p = sub.add_parser("demo", help="start 4 local engines, tour the API, stop them")
    p.add_argument("-n", type=int, default=4)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (getattr(args, "n", 1) or 1) < 1:
        print("ipmulti: -n must be at least 1", file=sys.stderr)
        return 2
    if getattr(args, "profile", None) is not None:
        try:
            check_profile(args.profile)
        except ValueError as exc:
            print(f"ipmulti: --profile: {exc}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"ipmulti: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
