"""The benchmark driver: ``python -m benchmarks [--quick] [--json out.json]``.

All systems run side by side in one process and every scenario interleaves them: repetition
``i`` runs each system once, in an order rotated by ``i``, so drift on a noisy machine hits all
of them alike. Tables report medians, p10 and p90, and ours/peer as a ratio of medians
(below 1 means ipy_multiengine is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.backends import env_for_children

env_for_children()  # before anything starts a kernel, engine or worker

import numpy as np  # noqa: E402

from benchmarks import backends as B  # noqa: E402
from benchmarks import tasks  # noqa: E402
from benchmarks.stats import Row, fmt_time, table  # noqa: E402

MB = 1 << 20
FACTORIES: dict[str, Callable[[], B.Backend]] = {
    "ours": B.Ours,
    "raw-jc": B.RawKernels,
    "ipp": B.Ipp,
    "dask": B.Dask,
    "pool": B.Pool,
    "joblib": B.Joblib,
    "zmq": B.RawZmq,
}
START_PEERS = ("ours", "raw-jc", "ipp", "dask", "pool")


_T0 = time.perf_counter()


def log(*a: Any) -> None:
    """Progress goes to stderr (with seconds since start); the table to stdout."""
    print(f"[{time.perf_counter() - _T0:6.1f}s]", *a, file=sys.stderr, flush=True)


@dataclass
class Scenario:
    """One timed operation, run on each backend in ``backends`` that has it."""

    key: str
    backends: tuple[str, ...]
    reps: tuple[int, int]  # (quick, full)
    make: Callable[[B.Backend], Callable[[], Any]]  # set up, return the timed call
    check: Callable[[Any], bool] | None = None
    cleanup: Callable[[B.Backend], None] | None = None
    warm: Callable[[B.Backend], Any] | None = None  # warm-up call (default: the timed call)
    no_warm: bool = False  # slow ops: no warm-up, the first timed call's result is checked
    skip_quick: tuple[str, ...] = ()  # backends left out in --quick (too slow to repeat)
    nbytes: int = 0
    labels: dict[str, str] = field(default_factory=dict)


def _arr(nbytes: int) -> np.ndarray:
    return np.arange(nbytes // 8, dtype=np.float64)


def _same_array(a: Any, ref: np.ndarray) -> bool:
    a = np.asarray(a)
    return a.shape == ref.shape and a.dtype == ref.dtype and a[0] == ref[0] and a[-1] == ref[-1]


def scenarios(n: int, quick: bool) -> list[Scenario]:
    """Every operation scenario for ``n`` engines."""
    out: list[Scenario] = [
        Scenario(
            "execute('pass') all",
            ("ours", "raw-same", "raw-jc", "ipp"),
            (15, 60),
            lambda b: b.execute_pass,
        ),
        Scenario("apply(noop) all", ("ours", "ipp", "dask"), (15, 60), lambda b: b.apply_noop),
        Scenario("%px pass", ("ours", "ipp"), (10, 40), lambda b: b.px_pass),
    ]

    def small_pull(b: B.Backend) -> Callable[[], Any]:
        b.push("s", 42, one=False)
        return lambda: b.pull("s", one=False)

    out.append(
        Scenario(
            "pull small value all",
            ("ours", "ipp"),
            (15, 60),
            small_pull,
            check=lambda r: list(r) == [42] * n,
            cleanup=lambda b: b.delete("s"),
        )
    )

    sizes = (1, 100) if quick else (1, 10, 100)
    for size in sizes:
        arr = _arr(size * MB)
        reps = {1: (7, 25), 10: (5, 15), 100: (3, 7)}[size]
        for one in (True, False):
            where = "one" if one else "all"
            moved = size * MB * (1 if one else n)

            def mk_push(b: B.Backend, arr=arr, one=one) -> Callable[[], Any]:
                return lambda: b.push("a", arr, one)

            def mk_pull(b: B.Backend, arr=arr, one=one) -> Callable[[], Any]:
                b.push("a", arr, one)
                return lambda: b.pull("a", one)

            def chk(r: Any, arr=arr, one=one) -> bool:
                return (
                    _same_array(r, arr)
                    if one
                    else (len(r) == n and all(_same_array(x, arr) for x in r))
                )

            peers = ("ours", "ipp", "zmq", "dask")
            big = size >= 100
            out.append(
                Scenario(
                    f"push {size}MB {where}",
                    peers,
                    reps,
                    mk_push,
                    cleanup=lambda b: b.delete("a"),
                    nbytes=moved,
                    no_warm=big,
                    skip_quick=("dask",) if big else (),
                )
            )
            out.append(
                Scenario(
                    f"pull {size}MB {where}",
                    peers,
                    reps,
                    mk_pull,
                    check=chk,
                    cleanup=lambda b: b.delete("a"),
                    nbytes=moved,
                    no_warm=big,
                    skip_quick=("dask",) if big else (),
                )
            )

    a80 = _arr(80 * MB)
    l100k = list(range(100_000))
    for label, seq, reps in (("80MB array", a80, (3, 10)), ("100k list", l100k, (3, 15))):

        def mk_gather(b: B.Backend, seq=seq) -> Callable[[], Any]:
            b.scatter("x", seq)
            return lambda: b.gather("x")

        def chk_g(r: Any, seq=seq) -> bool:
            if isinstance(seq, np.ndarray):
                return _same_array(r, seq) and bool(np.array_equal(r[:: 1 << 16], seq[:: 1 << 16]))
            return list(r) == seq

        peers = ("ours", "ipp", "dask")
        slow = ("dask",) if seq is l100k else ()  # dask pickles a list item by item: ~2 s a call
        out.append(
            Scenario(
                f"scatter {label}",
                peers,
                reps,
                lambda b, seq=seq: lambda: b.scatter("x", seq),
                cleanup=lambda b: b.delete("x"),
                nbytes=a80.nbytes if seq is a80 else 0,
                skip_quick=slow,
            )
        )
        out.append(
            Scenario(
                f"gather {label}",
                peers,
                reps,
                mk_gather,
                check=chk_g,
                cleanup=lambda b: b.delete("x"),
                nbytes=a80.nbytes if seq is a80 else 0,
                skip_quick=slow,
            )
        )

    for m, reps in ((32, (15, 50)), (10_000, (7, 25))):
        seq = list(range(m))
        want = [x + 1 for x in seq]
        out.append(
            Scenario(
                f"map {m} tiny",
                ("ours", "ipp", "pool", "dask", "joblib"),
                reps,
                lambda b, seq=seq: lambda: b.map(tasks.inc, seq),
                check=lambda r, want=want: list(r) == want,
                skip_quick=("dask",) if m > 1000 else (),
            )
        )
    seq = list(range(1000))
    out.append(
        Scenario(
            "balanced map 1000 tiny",
            ("ours", "ipp", "pool", "pool-map", "dask", "joblib"),
            (5, 9),  # ours: default arguments (auto chunks); joblib: its auto batching
            lambda b: lambda: b.lb_map(tasks.inc, seq),
            check=lambda r: list(r) == [x + 1 for x in seq],
            no_warm=True,
            labels={"ipp": "ipp-lbv", "pool": "pool-cs1"},
        )
    )
    return out


class Runner:
    """Owns every started backend, so that every one is stopped whatever happens."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        #: seconds one backend may spend repeating one scenario (after 3 reps), so that a
        #: pathological peer (dask scattering lists item by item) cannot eat the run
        self.budget = 6.0 if args.quick else 15.0
        self.rows: list[Row] = []
        self.running: dict[str, B.Backend] = {}
        self.failed: dict[str, str] = {}

    # ---------------------------------------------------------------- lifecycle
    def start_all(self, n: int, names: tuple[str, ...]) -> None:
        """Start (untimed) every backend in ``names`` with ``n`` engines; remember failures."""
        for name in names:
            if name == "raw-same":
                b: B.Backend = B.RawSameKernels(self.running.get("ours") or B.Ours())
            elif name == "pool-map":  # borrows the running pool
                b = B.PoolMap(self.running.get("pool") or B.Pool())
            else:
                b = FACTORIES[name]()
            try:
                t0 = time.perf_counter()
                b.start(n)
                self.running[name] = b
                log(f"  started {name} n={n} in {time.perf_counter() - t0:.2f}s")
            except B.Unsupported as e:
                self.failed[name] = str(e)
                log(f"  {name}: {e}")
            except Exception as e:
                self.failed[name] = f"start failed: {e!r}"[:160]
                log(f"  {name} start failed:\n{traceback.format_exc()}")
                self._safe_stop(b)

    def stop_all(self) -> None:
        """Stop everything started, raw-same first (it borrows our kernels)."""
        for name in sorted(self.running, key=lambda k: k not in ("raw-same", "pool-map")):
            self._safe_stop(self.running[name])
        self.running.clear()

    @staticmethod
    def _safe_stop(b: B.Backend) -> None:
        try:
            b.stop()
        except Exception:
            log(f"  stopping {b.name} failed:\n{traceback.format_exc()}")

    # ---------------------------------------------------------------- scenarios
    def run_start_stop(self, n: int, reps: int, names: tuple[str, ...]) -> None:
        """Interleaved start (until a first round trip works) and stop of each backend."""
        label = f"start {n} engines"
        rs = {k: Row(label, n, k) for k in names}
        ss = {k: Row(f"stop {n} engines", n, k) for k in names}
        self.rows += list(rs.values()) + list(ss.values())
        alive = list(names)
        fails: dict[str, int] = {}
        for i in range(reps):
            k = i % len(alive) if alive else 0
            for name in alive[k:] + alive[:k]:
                b = FACTORIES[name]()
                before = B.own_children()
                try:
                    t0 = time.perf_counter()
                    b.start(n)
                    t1 = time.perf_counter()
                    b.stop()
                    t2 = time.perf_counter()
                except Exception as e:
                    log(f"  {name} start/stop failed:\n{traceback.format_exc()}")
                    fails[name] = fails.get(name, 0) + 1
                    rs[name].note = f"{fails[name]} of {i + 1} starts FAILED, last: {e!r}"[:160]
                    self._safe_stop(b)
                    if fails[name] >= 2:
                        alive.remove(name)
                    continue
                rs[name].times.append(t1 - t0)
                ss[name].times.append(t2 - t1)
                left = B.wait_gone(B.own_children() - before, 15)
                if left:
                    ss[name].note = f"{len(left)} processes left after stop"
                    log(f"  {name}: processes left after stop: {sorted(left)}")
                log(f"  {label} {name}: start {t1 - t0:.2f}s stop {t2 - t1:.2f}s")

    def run_ops(self, n: int, only: str | None) -> None:
        """Every operation scenario, interleaved across the running backends."""
        for sc in scenarios(n, self.quick):
            if only and only not in sc.key:
                continue
            prepared: dict[str, tuple[Callable[[], Any], Row]] = {}
            for name in sc.backends:
                row = Row(sc.key, n, sc.labels.get(name, name), nbytes=sc.nbytes)
                b = self.running.get(name)
                if b is None:
                    if name in self.failed or name in FACTORIES or name in ("raw-same", "pool-map"):
                        row.note = self.failed.get(name, "not running")
                        self.rows.append(row)
                    continue
                if self.quick and name in sc.skip_quick:
                    row.note = "left out in --quick (slow)"
                    self.rows.append(row)
                    continue
                self.rows.append(row)
                try:
                    fn = sc.make(b)
                    res = None if sc.no_warm else (sc.warm(b) if sc.warm else fn())
                    if (
                        not sc.no_warm
                        and sc.warm is None
                        and sc.check is not None
                        and not sc.check(res)
                    ):
                        row.note = "WRONG RESULT"
                        log(f"  {sc.key} {name}: wrong result: {str(res)[:200]}")
                        continue
                    prepared[name] = (fn, row)
                except B.Unsupported as e:
                    row.note = str(e)
                except Exception as e:
                    row.note = f"error: {e!r}"[:120]
                    log(f"  {sc.key} {name} failed:\n{traceback.format_exc()}")
            reps = sc.reps[0 if self.quick else 1]
            names = list(prepared)
            gc.collect()
            for i in range(reps):
                k = i % len(names) if names else 0
                for name in names[k:] + names[:k]:
                    if name not in prepared:
                        continue
                    fn, row = prepared[name]
                    try:
                        t0 = time.perf_counter()
                        res = fn()
                        row.times.append(time.perf_counter() - t0)
                        if i == 0 and sc.no_warm and sc.check is not None and not sc.check(res):
                            row.note = "WRONG RESULT"
                            log(f"  {sc.key} {name}: wrong result: {str(res)[:200]}")
                        del res
                    except B.Unsupported as e:
                        row.note, row.times = str(e), []
                        del prepared[name]
                    except Exception as e:
                        row.note = f"error: {e!r}"[:120]
                        log(f"  {sc.key} {name} failed:\n{traceback.format_exc()}")
                        del prepared[name]
                    if name in prepared and len(row.times) >= 3 and sum(row.times) > self.budget:
                        row.note = (
                            f"stopped after {len(row.times)} reps (time budget {self.budget:g} s)"
                        )
                        del prepared[name]
                names = [x for x in names if x in prepared]
            if sc.check is not None and sc.warm is not None:
                for fn, row in list(prepared.values()):
                    if not sc.check(fn()):
                        row.note = "WRONG RESULT"
            for name in sc.backends:
                b = self.running.get(name)
                if b is not None and sc.cleanup is not None:
                    with contextlib.suppress(Exception):
                        sc.cleanup(b)
            gc.collect()
            log(
                f"  {sc.key} n={n}: "
                + ", ".join(
                    f"{r.backend} {fmt_time(r.median)}"
                    for r in self.rows[-len(sc.backends) :]
                    if r.scenario == sc.key and r.n == n and r.times
                )
            )

    def run_scaling(
        self, counts: tuple[int, ...], all_names: tuple[str, ...], ipp_max: int = 16
    ) -> None:
        """Start, execute('pass') and push of 1 MB to all, for growing engine counts."""
        arr = _arr(MB)
        for n in counts:
            names = tuple(k for k in all_names if k != "ipp" or n <= ipp_max)
            self.rows += [Row("scale start", n, k) for k in names]
            starts = {r.backend: r for r in self.rows[-len(names) :]}
            for name in names:
                b = FACTORIES[name]()
                try:
                    t0 = time.perf_counter()
                    b.start(n)
                    starts[name].times.append(time.perf_counter() - t0)
                    self.running[name] = b
                except Exception as e:
                    starts[name].note = f"failed: {e!r}"[:120]
                    log(f"  scale {name} n={n} failed:\n{traceback.format_exc()}")
                    self._safe_stop(b)
            log(
                f"  scale n={n} start: "
                + ", ".join(f"{k} {fmt_time(r.median)}" for k, r in starts.items())
            )
            reps = 15 if n <= 8 else 7
            for key, op in (
                ("scale execute('pass')", lambda b: b.execute_pass()),
                ("scale push 1MB all", lambda b: b.push("a", arr, False)),
            ):
                rows = {
                    k: Row(key, n, k, nbytes=arr.nbytes * n if "push" in key else 0)
                    for k in self.running
                }
                self.rows += list(rows.values())
                live = []
                for k in list(self.running):
                    try:
                        op(self.running[k])  # warm-up
                        live.append(k)
                    except B.Unsupported as e:
                        rows[k].note = str(e)
                for i in range(reps):
                    j = i % len(live) if live else 0
                    for k in live[j:] + live[:j]:
                        t0 = time.perf_counter()
                        op(self.running[k])
                        rows[k].times.append(time.perf_counter() - t0)
                log(
                    f"  {key} n={n}: "
                    + ", ".join(f"{k} {fmt_time(r.median)}" for k, r in rows.items())
                )
            for k in list(self.running):
                self.running[k].delete("a")
            self.stop_all()


def run_memory(names: tuple[str, ...], n: int) -> dict[str, Any]:
    """Client and engine memory, each backend measured in a fresh subprocess."""
    out: dict[str, Any] = {}
    for name in names:
        log(f"  memory {name} n={n} ...")
        try:
            p = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", name, str(n)],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if p.returncode != 0:
                out[name] = {"error": p.stderr[-2000:]}
                log(f"  memory {name} failed:\n{p.stderr[-2000:]}")
                continue
            out[name] = json.loads(p.stdout.strip().splitlines()[-1])
        except Exception as e:
            out[name] = {"error": repr(e)}
    return out


def meta() -> dict[str, Any]:
    """Machine and versions."""
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    vers = {}
    for pkg in (
        "ipy_multiengine",
        "ipykernel",
        "jupyter_client",
        "ipython",
        "pyzmq",
        "ipyparallel",
        "dask",
        "distributed",
        "numpy",
        "cloudpickle",
    ):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            vers[pkg] = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "versions": vers,
        "git": rev,
        "loadavg_start": os.getloadavg(),
    }


def memory_table(mem: dict[str, Any]) -> str:
    """Render the memory results."""
    lines = [
        f"{'backend':8} {'client+':>9} {'client Δ400MB':>13} {'push peak+':>10} "
        f"{'engine idle':>11} "
        f"{'engine w/ 100MB':>15} {'engine peak':>11} {'engine after del':>16} {'other procs':>11}"
    ]
    for name, m in mem.items():
        if "error" in m:
            lines.append(
                f"{name:8} error: "
                f"{m['error'].strip().splitlines()[-1] if m['error'].strip() else ''}"
            )
            continue

        def mb(v: float | None) -> str:
            return "-" if v is None else f"{v / MB:.1f} MB"

        lines.append(
            f"{name:8} {mb(m.get('client_overhead')):>9} {mb(m.get('client_growth')):>13} "
            f"{mb(m.get('client_push_peak_extra')):>10} {mb(m.get('engine_idle_rss')):>11} "
            f"{mb(m.get('engine_after_rss')):>15} {mb(m.get('engine_peak')):>11} "
            f"{mb(m.get('engine_after_delete_rss')):>16} {mb(m.get('other_rss')):>11}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run everything (see ``--help``)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, 4 engines only, no scaling (< 2 min)",
    )
    ap.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    ap.add_argument(
        "--engines", default=None, help="engine counts, e.g. 2,4 (default 2,4; quick 4)"
    )
    ap.add_argument("--only", default=None, help="run operation scenarios whose name contains this")
    ap.add_argument(
        "--peers",
        default=None,
        help="comma list of systems (default: all of "
        "ours,raw-jc,raw-same,ipp,dask,pool,pool-map,joblib,zmq)",
    )
    ap.add_argument("--no-start", action="store_true", help="skip the start/stop scenario")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory scenario")
    ap.add_argument(
        "--scale-ipp-max",
        type=int,
        default=16,
        help="largest engine count ipyparallel is scaled to",
    )
    ap.add_argument(
        "--scaling",
        default=None,
        help="engine counts for scaling (default full: 1,2,4,8,16,32; quick: none)",
    )
    args = ap.parse_args(argv)

    counts = tuple(int(x) for x in (args.engines or ("4" if args.quick else "2,4")).split(","))
    allnames = ("ours", "raw-same", "raw-jc", "ipp", "dask", "pool", "pool-map", "joblib", "zmq")
    names = tuple(x for x in (args.peers.split(",") if args.peers else allnames))
    scaling = args.scaling if args.scaling is not None else ("" if args.quick else "1,2,4,8,16,32")
    scale_counts = tuple(int(x) for x in scaling.split(",") if x)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    info = meta()
    log(f"benchmarks on {info['cpu']} ({info['cpus']} cpus), python {info['python']}")
    runner = Runner(args)
    mem: dict[str, Any] = {}
    t_all = time.perf_counter()
    try:
        for n in counts:
            if not args.no_start and not args.only:
                log(f"[start/stop, n={n}]")
                peers = ("ours", "raw-jc", "ipp") if args.quick else START_PEERS
                runner.run_start_stop(
                    n, 1 if args.quick else 5, tuple(x for x in peers if x in names)
                )
            log(f"[operations, n={n}]")
            runner.start_all(n, names)
            try:
                runner.run_ops(n, args.only)
            finally:
                runner.stop_all()
        if scale_counts and not args.only:
            log("[scaling]")
            try:
                runner.run_scaling(
                    scale_counts,
                    tuple(x for x in ("ours", "raw-jc", "ipp") if x in names),
                    ipp_max=args.scale_ipp_max,
                )
            except Exception:
                log(f"scaling failed:\n{traceback.format_exc()}")
            finally:
                runner.stop_all()
        if not args.no_memory and not args.only:
            log("[memory]")
            mem_names = ("ours", "raw-jc") if args.quick else ("ours", "raw-jc", "ipp", "dask")
            mem = run_memory(tuple(x for x in mem_names if x in names), 4)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
    except Exception:
        log(f"run failed:\n{traceback.format_exc()}")
    finally:
        runner.stop_all()
    elapsed = time.perf_counter() - t_all
    info["elapsed_s"] = round(elapsed, 1)
    info["loadavg_end"] = os.getloadavg()
    info["mode"] = "quick" if args.quick else "full"

    print(f"# ipy_multiengine benchmarks ({info['mode']}, {info['date']}, {elapsed:.0f} s)")
    print(
        f"# load average at start {info['loadavg_start'][0]:.1f}, at end "
        f"{info['loadavg_end'][0]:.1f}; git {info['git']}"
    )
    print(
        f"# {info['cpu']}, {info['cpus']} cpus, {info['mem_gb']} GB, python {info['python']}, "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    )
    print()
    print(table(runner.rows))
    if mem:
        print("memory (4 engines; moving = push 100 MB to all + pull it back from all):")
        print(memory_table(mem))
        print()
    from benchmarks.targets import evaluate, render

    checks = evaluate([r.to_dict() for r in runner.rows], mem)
    print(render(checks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "meta": info,
                    "rows": [r.to_dict() for r in runner.rows],
                    "memory": mem,
                    "targets": checks,
                },
                f,
                indent=1,
            )
        log(f"wrote {args.json}")
    left = B.wait_gone(B.own_children(), 10)
    if left:
        log(f"WARNING: child processes still alive: {sorted(left)}")
    return 0
