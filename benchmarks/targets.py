"""The targets of issues 6 and 15, checked against one run's medians."""

from __future__ import annotations

import itertools
from typing import Any

MB = 1 << 20


def _median(rows: list[dict], scenario: str, n: int, backend: str) -> float | None:
    for r in rows:
        if r["scenario"] == scenario and r["n"] == n and r["backend"] == backend and r["reps"]:
            return r["median"]
    return None


def _counts(rows: list[dict], scenario: str) -> list[int]:
    return sorted({r["n"] for r in rows if r["scenario"] == scenario and r["reps"]})


def evaluate(rows: list[dict], mem: dict[str, Any]) -> list[dict]:
    """One dict per (target, engine count): what, ratio or value, limit, met (None = not
    measured)."""
    out: list[dict] = []

    def ratio(
        target: str, scen: str, peer: str, limit: float, n: int, invert: bool = False
    ) -> None:
        a, b = _median(rows, scen, n, "ours"), _median(rows, scen, n, peer)
        if a is None or b is None:
            out.append(
                {
                    "target": target,
                    "n": n,
                    "value": None,
                    "limit": limit,
                    "met": None,
                    "detail": f"not measured (ours {a}, {peer} {b})",
                }
            )
            return
        v = b / a if invert else a / b
        met = v >= limit if invert else v <= limit
        rel = ">=" if invert else "<="
        what = f"{peer} time / ours time" if invert else f"ours / {peer}"
        out.append(
            {
                "target": target,
                "n": n,
                "value": round(v, 3),
                "limit": limit,
                "met": met,
                "detail": f"{what} = {v:.2f} ({rel} {limit})",
            }
        )

    for n in _counts(rows, "start 4 engines"):
        ratio("start 4 engines <= 1.2x raw kernel starts", "start 4 engines", "raw-jc", 1.2, n)
        ratio("start 4 engines <= 0.3x ipyparallel", "start 4 engines", "ipp", 0.3, n)
    for n in _counts(rows, "execute('pass') all"):
        peer = "raw-same" if _median(rows, "execute('pass') all", n, "raw-same") else "raw-jc"
        ratio("execute('pass') <= 1.1x raw jupyter_client", "execute('pass') all", peer, 1.1, n)
        ratio("execute('pass') <= 0.8x ipyparallel", "execute('pass') all", "ipp", 0.8, n)

    def at_most(target: str, scen: str, limit: float, n: int) -> None:
        a = _median(rows, scen, n, "ours")
        out.append(
            {
                "target": target,
                "n": n,
                "value": None if a is None else round(a, 6),
                "limit": limit,
                "met": None if a is None else a <= limit,
                "detail": "not measured"
                if a is None
                else f"ours {a * 1e3:.2f} ms (<= {limit * 1e3:g} ms)",
            }
        )

    for n in _counts(rows, "apply(noop) all"):
        ratio("apply no-op <= 0.5x ipyparallel", "apply(noop) all", "ipp", 0.5, n)
        # issue 15, the per-message floor
        ratio(
            "apply no-op on all no slower than dask client.run", "apply(noop) all", "dask", 1.0, n
        )
        if n == 4:
            at_most("floor: apply no-op on all 4 <= 1.5 ms", "apply(noop) all", 1.5e-3, n)
    for op in ("push", "pull"):
        scen = f"{op} 1MB one"
        for n in _counts(rows, scen):
            ratio(f"floor: {op} 1 MB to one engine <= 2x raw zmq", scen, "zmq", 2.0, n)
    for n in _counts(rows, "pull small value all"):
        ratio("pull small value <= 0.5x ipyparallel", "pull small value all", "ipp", 0.5, n)
    for op in ("push", "pull"):
        for where in ("one", "all"):
            scen = f"{op} 100MB {where}"
            for n in _counts(rows, scen):
                ratio(f"{scen}: >= 2x ipyparallel throughput", scen, "ipp", 2.0, n, invert=True)
                ratio(f"{scen}: >= 0.6x raw zmq throughput", scen, "zmq", 0.6, n, invert=True)
    for n in _counts(rows, "map 10000 tiny"):
        ratio("map 10,000 tiny <= 1.0x ipyparallel map_sync", "map 10000 tiny", "ipp", 1.0, n)
        ratio("map 10,000 tiny <= 2x multiprocessing.Pool", "map 10000 tiny", "pool", 2.0, n)
    bal = "balanced map 1000 tiny"
    for n in _counts(rows, bal):
        ratio("balanced map 1000: >= 10x ipyparallel LBV throughput", bal, "ipp-lbv", 10.0, n, True)
        ratio("balanced map 1000: <= 5x Pool.map (default chunks)", bal, "pool-map", 5.0, n)
        ratio("balanced map 1000: stretch <= 2x Pool.map", bal, "pool-map", 2.0, n)
        ratio("balanced map 1000: faster than dask", bal, "dask", 1.0, n)
        ratio("balanced map 1000: faster than joblib-loky", bal, "joblib", 1.0, n)

    ours, raw = mem.get("ours", {}), mem.get("raw-jc", {})
    if ours and "error" not in ours:
        n = ours.get("n", 4)
        lim = (30 + n) * MB
        v = ours.get("client_overhead")
        out.append(
            {
                "target": "client resident overhead <= 30 MB + 1 MB/engine",
                "n": n,
                "value": v,
                "limit": lim,
                "met": None if v is None else v <= lim,
                "detail": f"{v / MB:.1f} MB (<= {lim / MB:.0f} MB)"
                if v is not None
                else "not measured",
            }
        )
        g = ours.get("client_growth")
        rounds = [round(x / MB, 1) for x in ours.get("client_growth_rounds", [])]
        out.append(
            {
                "target": "client does not grow with data moved (3 x 800 MB moved; <= 10 MB)",
                "n": n,
                "value": g,
                "limit": 10 * MB,
                "met": None if g is None else g <= 10 * MB,
                "detail": f"growth {g / MB:.1f} MB, per round {rounds}"
                if g is not None
                else "not measured",
            }
        )
        p = ours.get("client_push_peak_extra")
        out.append(
            {
                "target": "client holds <= one extra copy while pushing 100 MB to all",
                "n": n,
                "value": p,
                "limit": 100 * MB,
                "met": None if p is None else p <= 100 * MB,
                "detail": f"peak extra during push {p / MB:.1f} MB (<= 100 MB)"
                if p is not None
                else "not measured",
            }
        )
        e, e0 = ours.get("engine_idle_rss"), raw.get("engine_idle_rss")
        if e is not None and e0 is not None:
            out.append(
                {
                    "target": "engine idle RSS <= plain ipykernel + 5 MB",
                    "n": n,
                    "value": e - e0,
                    "limit": 5 * MB,
                    "met": e - e0 <= 5 * MB,
                    "detail": (
                        f"ours {e / MB:.1f} MB vs plain {e0 / MB:.1f} MB: +{(e - e0) / MB:.1f} MB"
                    ),
                }
            )
    starts = {
        r["n"]: r["median"]
        for r in rows
        if r["scenario"] == "scale start" and r["backend"] == "ours" and r["reps"]
    }
    execs = {
        r["n"]: r["median"]
        for r in rows
        if r["scenario"] == "scale execute('pass')" and r["backend"] == "ours" and r["reps"]
    }
    if starts or execs:
        ok32 = 32 in starts and 32 in execs
        ns = sorted(execs)
        steps = [execs[b] / execs[a] / (b / a) for a, b in itertools.pairwise(ns) if a >= 4]
        linear = bool(steps) and max(steps) <= 1.25
        out.append(
            {
                "target": "32 engines start and execute; per-call cost grows linearly",
                "n": 32,
                "value": execs.get(32),
                "limit": None,
                "met": ok32 and linear,
                "detail": f"started 32: {ok32}; execute medians "
                + ", ".join(f"{k}: {execs[k] * 1e3:.1f} ms" for k in ns)
                + (
                    f"; doubling-step growth / linear = {[round(s, 2) for s in steps]} (<= 1.25 "
                    "counts as linear)"
                ),
            }
        )
    return out


def render(checks: list[dict]) -> str:
    """The targets as text lines."""
    lines = ["targets (issues 6 and 15):"]
    for c in checks:
        mark = {True: "MET  ", False: "UNMET", None: "  -  "}[c["met"]]
        lines.append(f"  [{mark}] n={c['n']:<2} {c['target']}: {c['detail']}")
    return "\n".join(lines)
