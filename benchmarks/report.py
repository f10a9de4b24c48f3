"""Markdown summary of a run: ``python -m benchmarks.report out.json``.

One row per (scenario, engine count): each system's median, and in parentheses ours/peer
(below 1: ipy_multiengine is faster). Then the memory table and the targets.
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

from benchmarks.stats import fmt_time
from benchmarks.targets import render

COLS = (
    "ours",
    "raw-same",
    "raw-jc",
    "ipp",
    "ipp-lbv",
    "zmq",
    "dask",
    "pool",
    "pool-cs1",
    "pool-map",
    "joblib",
)
MB = 1 << 20


def summary(rows: list[dict]) -> str:
    """The wide markdown table of medians and ratios."""
    groups: OrderedDict[tuple[str, int], dict[str, dict]] = OrderedDict()
    for r in rows:
        groups.setdefault((r["scenario"], r["n"]), {})[r["backend"]] = r
    cols = [c for c in COLS if any(c in g for g in groups.values())]
    out = ["| scenario | n | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for (scen, n), g in groups.items():
        ours = g.get("ours")
        base = ours["median"] if ours and ours["reps"] else None
        cells = []
        for c in cols:
            r = g.get(c)
            if r is None:
                cells.append("")
            elif not r["reps"]:
                cells.append("n/a")
            elif c == "ours" or base is None:
                cells.append(fmt_time(r["median"]))
            else:
                cells.append(f"{fmt_time(r['median'])} ({base / r['median']:.2f})")
        out.append(f"| {scen} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def memory(mem: dict) -> str:
    """The memory results as markdown."""
    if not mem:
        return ""
    keys = [
        ("client_overhead", "client RSS added by start"),
        ("client_growth", "client growth after 3 x 800 MB moved"),
        ("client_push_peak_extra", "client peak extra while pushing 100 MB to all"),
        ("engine_idle_rss", "engine idle RSS"),
        ("engine_after_rss", "engine RSS holding 100 MB"),
        ("engine_peak", "engine peak RSS"),
        ("engine_after_delete_rss", "engine RSS after del"),
        ("other_rss", "other processes (controller, schedulers)"),
    ]
    names = [k for k in mem if "error" not in mem[k]]
    out = ["| (4 engines) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in keys:
        vals = []
        for nm in names:
            v = mem[nm].get(key)
            vals.append("-" if v is None else f"{v / MB:.1f} MB")
        out.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.splitlines()[0]
    )
    ap.add_argument("json")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    m = data["meta"]
    print(
        f"Run of {m['date']} ({m['mode']}, {m['elapsed_s']:.0f} s, git {m['git']}), {m['cpu']}, "
        f"{m['cpus']} cpus, "
        f"{m['mem_gb']} GB, load average {m.get('loadavg_start', [0])[0]:.1f} at start and "
        f"{m.get('loadavg_end', [0])[0]:.1f} at end.\n"
    )
    print(summary(data["rows"]))
    print()
    print(memory(data.get("memory", {})))
    print()
    print("```")
    print(render(data.get("targets", [])))
    print("```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
