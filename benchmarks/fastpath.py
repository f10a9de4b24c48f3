"""The per-message floor and scaling (issue 15 items 2-3), beside the peer benchmarks.

    python -m benchmarks.fastpath quick [-n 4] [--calls 200]     # apply no-op / pull small / 1 MB
    python -m benchmarks.fastpath scale [--max 64] [--calls 30]   # 1, 2, 4, ... engines

``quick`` prints medians of: apply no-op on all engines, pull of a small value from all,
push and pull of 1 MB to one engine, execute('pass') on all, and the client's CPU per call.
``scale`` starts a cluster of each size and prints start time, execute/apply medians and the
client CPU per call (per engine, too). The machine's load is printed with every table: these
are figures of one moment of a shared box, not timed tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("JUPYTER_RUNTIME_DIR", tempfile.mkdtemp(prefix="ime-bench-"))

import numpy as np

from ipy_multiengine import Cluster


def _noop() -> int:
    return 0


def timed(fn, calls: int) -> tuple[float, float]:
    """(median wall ms, mean client CPU ms) of ``calls`` calls of ``fn`` after a warm-up."""
    for _ in range(max(calls // 10, 3)):
        fn()
    walls = []
    c0 = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / calls
    return statistics.median(walls) * 1e3, cpu * 1e3


def ops(mec, one_mb: bool = True) -> dict:
    mec.push({"s": 42})
    big = np.ones(2**20 // 8)
    found = {
        "apply no-op on all": lambda: mec.apply(_noop),
        "pull small from all": lambda: mec.pull("s"),
        "execute('pass') on all": lambda: mec.execute("pass"),
    }
    if one_mb:
        mec.push({"big": big}, targets=0)
        found["push 1 MB to one"] = lambda: mec.push({"big": big}, targets=0)
        found["pull 1 MB from one"] = lambda: mec.pull("big", targets=0)
    return found


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cpus"


def quick(n: int, calls: int, **kw) -> None:
    with Cluster(n=n, **kw) as mec:
        print(f"# {n} engines, {calls} calls each; {load()}")
        for name, fn in ops(mec).items():
            wall, cpu = timed(fn, calls)
            print(f"{name:26} {wall:8.3f} ms   client CPU {cpu:7.3f} ms/call", flush=True)


def scale(maximum: int, calls: int) -> None:
    print(f"# {load()}")
    print(
        f"{'engines':>7} {'start s':>8} {'execute ms':>11} {'apply ms':>9} "
        f"{'exec ms/eng':>11} {'apply ms/eng':>12} {'CPU ms/call':>11} {'CPU us/msg':>10}"
    )
    n = 1
    while n <= maximum:
        t0 = time.perf_counter()
        cluster = Cluster(n=n)
        mec = cluster.start()
        start = time.perf_counter() - t0
        try:
            found = ops(mec, one_mb=False)
            ex, _ = timed(found["execute('pass') on all"], calls)
            ap, cpu = timed(found["apply no-op on all"], calls)
        finally:
            cluster.stop()
        print(
            f"{n:7d} {start:8.2f} {ex:11.2f} {ap:9.2f} {ex / n:11.3f} {ap / n:12.3f} "
            f"{cpu:11.3f} {cpu / n * 1e3:10.1f}",
            flush=True,
        )
        n *= 2
    print(f"# {load()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["quick", "scale"])
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--max", type=int, default=64)
    args = parser.parse_args()
    if args.what == "quick":
        quick(args.n, args.calls)
    else:
        scale(args.max, args.calls)


if __name__ == "__main__":
    main()
