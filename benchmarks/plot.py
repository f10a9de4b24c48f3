"""PNG charts from a ``python -m benchmarks --json out.json`` run.

``python -m benchmarks.plot out.json [--out DIR]`` writes ``ratios-n{N}.png`` (ours/peer per
scenario, log scale, below 1 is faster) and ``scaling.png`` (medians against engine count).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PEERS = ("raw-same", "raw-jc", "ipp", "ipp-lbv", "zmq", "dask", "pool")
COLORS = {
    "raw-same": "#7f7f7f",
    "raw-jc": "#bcbd22",
    "ipp": "#d62728",
    "ipp-lbv": "#ff9896",
    "zmq": "#17becf",
    "dask": "#9467bd",
    "pool": "#8c564b",
    "ours": "#1f77b4",
}


def ratios(rows: list[dict], n: int) -> dict[str, dict[str, float]]:
    """scenario -> peer -> ours median / peer median, for engine count ``n``."""
    med = {(r["scenario"], r["backend"]): r["median"] for r in rows if r["n"] == n and r["reps"]}
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for (scen, backend), m in med.items():
        if backend == "ours" or scen.startswith("scale "):
            continue
        ours = med.get((scen, "ours"))
        if ours:
            out[scen][backend] = ours / m
    return out


def plot_ratios(rows: list[dict], n: int, path: str) -> None:
    """Grouped horizontal bars, one group per scenario."""
    rat = ratios(rows, n)
    scen = [s for s in dict.fromkeys(r["scenario"] for r in rows if r["n"] == n) if s in rat]
    if not scen:
        return
    peers = [p for p in PEERS if any(p in rat[s] for s in scen)]
    h = 0.8 / max(len(peers), 1)
    fig, ax = plt.subplots(figsize=(10, 0.12 * len(scen) * len(peers) + 0.25 * len(scen) + 1.5))
    for i, p in enumerate(peers):
        ys = [k + i * h for k, s in enumerate(scen) if p in rat[s]]
        xs = [rat[s][p] for s in scen if p in rat[s]]
        ax.barh(ys, xs, height=h, label=p, color=COLORS.get(p))
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_ylim(len(scen) - 0.1, -0.3)
    ax.set_yticks([k + h * (len(peers) - 1) / 2 for k in range(len(scen))])
    ax.set_yticklabels(scen)
    ax.set_xlabel("ours / peer (median time; < 1: ipy_multiengine is faster)")
    ax.set_title(f"ipy_multiengine vs peers, {n} engines")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows: list[dict], path: str) -> None:
    """Median against engine count for the three scaling scenarios."""
    keys = ("scale start", "scale execute('pass')", "scale push 1MB all")
    data = [r for r in rows if r["scenario"] in keys and r["reps"]]
    if not data:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, key in zip(axes, keys, strict=False):
        by: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
        for r in data:
            if r["scenario"] == key:
                by[r["backend"]].append((r["n"], r["median"], r["p10"], r["p90"]))
        for b, pts in sorted(by.items()):
            pts.sort()
            ns = [p[0] for p in pts]
            ax.plot(ns, [p[1] for p in pts], "o-", label=b, color=COLORS.get(b))
            ax.fill_between(
                ns, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15, color=COLORS.get(b)
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("engines")
        ax.set_ylabel("seconds (median, p10-p90 band)")
        ax.set_title(key.replace("scale ", ""))
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.plot", description=__doc__.splitlines()[0]
    )
    ap.add_argument("json")
    ap.add_argument(
        "--out", default=None, help="directory for the PNGs (default: next to the JSON)"
    )
    args = ap.parse_args(argv)
    with open(args.json) as f:
        rows = json.load(f)["rows"]
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out, exist_ok=True)
    written = []
    for n in sorted({r["n"] for r in rows if not r["scenario"].startswith("scale ")}):
        p = os.path.join(out, f"ratios-n{n}.png")
        plot_ratios(rows, n, p)
        written.append(p)
    p = os.path.join(out, "scaling.png")
    plot_scaling(rows, p)
    written.append(p)
    for p in written:
        if os.path.exists(p):
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
