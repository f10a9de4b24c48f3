"""Client and engine memory for one backend, in a fresh process:
``python -m benchmarks.memory NAME N``.

Prints one JSON line. "Moving 400 MB" is pushing a 100 MB array to all 4 engines and pulling
it back from all of them; it is done three times to see whether the client grows with data moved.
"""

from __future__ import annotations

import gc
import json
import sys
import time

from benchmarks.backends import env_for_children

env_for_children()

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from benchmarks import backends as B  # noqa: E402

MB = 1 << 20
IMPORTS = {
    # the package's names load on first use (PEP 562): import what Cluster needs, so that the
    # library's own import is left out of the client's overhead, as for the other backends
    "ours": "ipy_multiengine.cluster",
    "raw-jc": "jupyter_client",
    "ipp": "ipyparallel",
    "dask": "distributed",
}
FACTORIES = {"ours": B.Ours, "raw-jc": B.RawKernels, "ipp": B.Ipp, "dask": B.Dask}


def rss(pid: int | None = None) -> int:
    """Resident set size in bytes."""
    return (psutil.Process(pid) if pid else psutil.Process()).memory_info().rss


def reset_peak(pid: int | str = "self") -> None:
    """Reset VmHWM (Linux: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def is_engine(p: psutil.Process) -> bool:
    """Kernels, ipengines and dask worker processes; not controllers, trackers, nannies."""
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    if "resource_tracker" in cmd:
        return False
    return any(
        k in cmd for k in ("ipykernel", "ipyparallel.engine", "ipengine", "multiprocessing.spawn")
    )


def main(name: str, n: int) -> dict:
    """Measure; return the dict printed as JSON."""
    __import__(IMPORTS[name])
    b = FACTORIES[name]()
    arr = np.arange(100 * MB // 8, dtype=np.float64)
    gc.collect()
    before = {p.pid for p in B.children()}
    base = rss()
    out: dict = {"backend": name, "n": n, "client_base_rss": base}
    b.start(n)
    try:
        b.execute_pass() if name in ("ours", "raw-jc", "ipp") else b.apply_noop()
        time.sleep(1.0)
        gc.collect()
        new = [p for p in B.children() if p.pid not in before]
        engines = [p for p in new if is_engine(p)]
        others = [p for p in new if not is_engine(p)]
        started = rss()
        out["client_overhead"] = started - base
        out["engines"] = len(engines)
        out["engine_idle_rss"] = (
            float(np.median([p.memory_info().rss for p in engines])) if engines else None
        )
        out["other_rss"] = sum(p.memory_info().rss for p in others)
        out["other_procs"] = len(others)
        growth, push_peaks, pull_peaks = [], [], []
        try:
            for _ in range(3):
                gc.collect()
                r0 = rss()
                reset_peak()
                for p in engines:
                    reset_peak(p.pid)
                b.push("a", arr, one=False)
                push_peaks.append(peak() - r0)
                r1 = rss()
                reset_peak()
                res = b.pull("a", one=False)
                pull_peaks.append(peak() - r1 - arr.nbytes * n)
                del res
                out["engine_after_rss"] = float(np.median([p.memory_info().rss for p in engines]))
                out["engine_peak"] = max(peak(p.pid) for p in engines)
                b.delete("a")
                gc.collect()
                time.sleep(0.3)
                growth.append(rss() - started)
        except B.Unsupported as e:
            out["moving"] = f"unsupported: {e}"
        if growth:
            out["client_growth"] = growth[-1]
            out["client_growth_rounds"] = growth
            out["client_push_peak_extra"] = max(push_peaks)
            out["client_pull_peak_extra"] = max(pull_peaks)
        out["client_peak_total"] = peak()
        out["engine_after_delete_rss"] = (
            float(np.median([p.memory_info().rss for p in engines])) if engines else None
        )
    finally:
        b.stop()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
