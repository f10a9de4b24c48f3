"""Where the time goes: py-spy on the client and on one engine while an operation loops.

``python -m benchmarks.profile OP [--backend ours|ipp] [-n 4] [--seconds 8] [--out DIR]``
with OP one of ``execute``, ``apply``, ``pull_small``, ``push100``, ``pull100``, ``push100one``,
``pull100one``, ``push1one``, ``pull1one`` (1 MB), ``map10k``, ``lbmap``. Writes collapsed
stacks (``DIR/OP-client.txt``, ``DIR/OP-engine.txt``, flamegraph-ready) and prints the top
functions by self and inclusive samples (CPU only: py-spy skips idle samples), plus the
per-call median during recording.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter

from benchmarks.backends import env_for_children

env_for_children()

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from benchmarks import backends as B  # noqa: E402
from benchmarks import tasks  # noqa: E402

MB = 1 << 20


def ops(b: B.Backend) -> dict:
    """OP name -> the call to loop."""
    big = np.arange(100 * MB // 8, dtype=np.float64)
    one_mb = np.ones(MB // 8)
    seq10k = list(range(10_000))
    seq1k = list(range(1000))

    def pull_small():
        return b.pull("s", one=False)

    def pull100(one=False):
        return b.pull("big", one=one)

    return {
        "execute": b.execute_pass,
        "apply": b.apply_noop,
        "pull_small": pull_small,
        "push100": lambda: b.push("big", big, one=False),
        "pull100": pull100,
        "push100one": lambda: b.push("big", big, one=True),
        "pull100one": lambda: pull100(True),
        "push1one": lambda: b.push("one", one_mb, one=True),
        "pull1one": lambda: b.pull("one", one=True),
        "map10k": lambda: b.map(tasks.inc, seq10k),
        "lbmap": lambda: b.lb_map(tasks.inc, seq1k),
    }


def summarize(path: str, top: int) -> str:
    """Top functions by self and by inclusive samples from a py-spy raw (collapsed) file."""
    selfc: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip()
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            total += n
            frames = [
                re.sub(r"\s*\(.*?/(site-packages|lib/python3\.\d+|src)/", " (", fr)
                for fr in stack.split(";")
            ]
            frames = [
                fr
                for fr in frames
                if not fr.startswith("process ") and not fr.startswith("thread ")
            ]
            if not frames:
                continue
            selfc[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    if not total:
        return "  (no samples)"
    out = [f"  {total} samples"]
    out.append("  self:")
    out += [f"    {100 * c / total:5.1f}%  {fr}" for fr, c in selfc.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {100 * c / total:5.1f}%  {fr}" for fr, c in incl.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.profile", description=__doc__.splitlines()[0]
    )
    ap.add_argument("op")
    ap.add_argument("--backend", default="ours", choices=("ours", "ipp"))
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="/tmp/bench-profile")
    args = ap.parse_args(argv)
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    os.makedirs(args.out, exist_ok=True)

    b = B.Ours() if args.backend == "ours" else B.Ipp()
    before = B.own_children()
    b.start(args.n)
    try:
        b.push("s", 42, one=False)
        b.push("big", np.arange(100 * MB // 8, dtype=np.float64), one=False)
        b.push("one", np.ones(MB // 8), one=False)
        fn = ops(b)[args.op]
        fn()
        engines = [
            p
            for p in B.children()
            if p.pid not in before
            and any(
                k in " ".join(p.cmdline()) for k in ("ipykernel", "ipyparallel.engine", "ipengine")
            )
        ]
        eng = engines[0].pid
        tag = f"{args.backend}-{args.op}"
        files = {"client": f"{args.out}/{tag}-client.txt", "engine": f"{args.out}/{tag}-engine.txt"}
        spies = [
            subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--duration",
                    str(int(args.seconds)),
                    "--output",
                    files[who],
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for who, pid in (("client", os.getpid()), ("engine", eng))
        ]
        time.sleep(1.0)  # let py-spy attach
        times = []
        t_end = time.monotonic() + args.seconds - 1.5
        cpu0 = {p.pid: p.cpu_times() for p in [psutil.Process(), *engines]}
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        cpu1 = {p.pid: p.cpu_times() for p in [psutil.Process(), *engines]}
        for s in spies:
            s.wait(60)
        med = statistics.median(times)
        print(f"{tag}: {len(times)} calls, median {med * 1e3:.2f} ms")
        for pid in cpu0:
            d = (cpu1[pid].user + cpu1[pid].system - cpu0[pid].user - cpu0[pid].system) / len(times)
            who = "client" if pid == os.getpid() else f"engine {pid}"
            print(f"  CPU per call, {who}: {d * 1e3:.2f} ms")
        for who, path in files.items():
            print(f"[{who}] {path}")
            print(summarize(path, args.top) if os.path.exists(path) else "  (py-spy wrote nothing)")
    finally:
        b.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
