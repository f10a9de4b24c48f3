"""Local engine transports compared (issue 11.16): unix sockets (ipc, the default), loopback TCP,
and TCP with CurveZMQ. Medians of execute latency and of a 100 MB push and pull to 2 engines.

    python benchmarks/transport.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ipy_multiengine import Cluster

CASES = {
    "ipc": dict(transport="ipc"),
    "tcp": dict(transport="tcp"),
    "tcp+curve": dict(transport="tcp", transport_encryption="required"),
}


def median_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("-n", type=int, default=2)
    args = parser.parse_args()
    data = np.ones(100 * 2**20 // 8)  # 100 MB
    clusters = {name: Cluster(n=args.n, **kw) for name, kw in CASES.items()}
    clients = {name: c.start() for name, c in clusters.items()}
    try:
        samples: dict = {name: {"execute": [], "push": [], "pull": []} for name in CASES}
        for mec in clients.values():
            mec.execute("pass")
        for _ in range(args.repeat):  # rounds interleave the transports: load drifts alike
            for name, mec in clients.items():
                # each lambda runs at once, inside this iteration: mec bound by a default anyway
                samples[name]["execute"].append(median_of(lambda m=mec: m.execute("pass"), 10))
                samples[name]["push"].append(median_of(lambda m=mec: m.push({"a": data}), 1))
                samples[name]["pull"].append(median_of(lambda m=mec: m.pull("a"), 1))
    finally:
        for c in clusters.values():
            c.stop()
    print(f"{'transport':<10} {'execute ms':>10} {'push 100MB s':>13} {'pull 100MB s':>13}")
    for name, s in samples.items():
        med = {k: statistics.median(v) for k, v in s.items()}
        print(
            f"{name:<10} {med['execute'] * 1e3:>10.2f} {med['push']:>13.3f} {med['pull']:>13.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
