"""CPU time per call, by process role: ``python -m benchmarks.cpu [-n 4] [--calls 300]``.

On a 2-core machine a call to n engines cannot finish faster than (total CPU it burns) / 2,
so this table says which part of a round trip is the floor and whose it is: the client
(this process), the engines, and everything else the system runs (ipyparallel's controller
and schedulers). Wall medians are measured in the same loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.backends import env_for_children

env_for_children()

import psutil  # noqa: E402

from benchmarks import backends as B  # noqa: E402


def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def _role(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "other"
    if "ipykernel" in cmd or "ipyparallel.engine" in cmd or "ipengine" in cmd:
        return "engines"
    return "other"


def measure(b: B.Backend, n: int, calls: int) -> dict[str, dict[str, float]]:
    """op -> {'wall', 'client', 'engines', 'other'} in ms per call."""
    before = B.own_children()
    b.start(n)
    out: dict[str, dict[str, float]] = {}
    try:
        procs = [p for p in B.children() if p.pid not in before]
        me = psutil.Process()
        ops = {"execute('pass')": b.execute_pass}
        try:
            b.push("s", 42, one=False)
            ops["apply(noop)"] = b.apply_noop
            ops["pull small"] = lambda: b.pull("s", one=False)
        except B.Unsupported:
            pass
        for name, fn in ops.items():
            for _ in range(30):
                fn()
            c0 = {p.pid: _cpu(p) for p in procs}
            m0 = _cpu(me)
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            m1 = _cpu(me)
            c1 = {p.pid: _cpu(p) for p in procs}
            row = {
                "wall": statistics.median(ts) * 1e3,
                "client": (m1 - m0) / calls * 1e3,
                "engines": 0.0,
                "other": 0.0,
            }
            for p in procs:
                row[_role(p)] += (c1[p.pid] - c0[p.pid]) / calls * 1e3
            row["total"] = row["client"] + row["engines"] + row["other"]
            out[name] = row
    finally:
        b.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu", description=__doc__.splitlines()[0]
    )
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--peers", default="ours,raw-jc,ipp")
    args = ap.parse_args(argv)
    factories = {"ours": B.Ours, "raw-jc": B.RawKernels, "ipp": B.Ipp}
    print(
        f"CPU ms per call, {args.n} engines, {args.calls} calls ({psutil.cpu_count()} cpus); "
        "'floor' = total CPU / cpus"
    )
    print(
        f"{'op':16} {'system':7} {'wall':>7} {'client':>7} {'engines':>8} {'other':>7} "
        f"{'total':>7} {'floor':>7}"
    )
    for name in args.peers.split(","):
        res = measure(factories[name](), args.n, args.calls)
        for op, r in res.items():
            print(
                f"{op:16} {name:7} {r['wall']:7.2f} {r['client']:7.2f} {r['engines']:8.2f} "
                f"{r['other']:7.2f} "
                f"{r['total']:7.2f} {r['total'] / psutil.cpu_count():7.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
