"""Timing statistics and the results table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of ``xs``."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Row:
    """One (scenario, engine count, backend) measurement."""

    scenario: str
    n: int
    backend: str
    times: list[float] = field(default_factory=list)
    note: str = ""
    nbytes: int = 0  # bytes moved per call, for throughput

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def p10(self) -> float:
        return percentile(self.times, 10)

    @property
    def p90(self) -> float:
        return percentile(self.times, 90)

    def to_dict(self) -> dict:
        return {
            "scenario": self.scenario,
            "n": self.n,
            "backend": self.backend,
            "median": self.median,
            "p10": self.p10,
            "p90": self.p90,
            "reps": len(self.times),
            "times": self.times,
            "note": self.note,
            "nbytes": self.nbytes,
        }


def fmt_time(t: float) -> str:
    """Seconds as a short human string."""
    if t != t:  # nan
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.2f} ms" if t < 0.1 else f"{t * 1e3:.0f} ms"
    return f"{t:.2f} s"


def fmt_rate(nbytes: int, t: float) -> str:
    """Throughput in GB/s, empty when no bytes move."""
    if not nbytes or t != t or t <= 0:
        return ""
    return f"{nbytes / t / 1e9:.2f} GB/s"


def table(rows: list[Row], ours: str = "ours") -> str:
    """Render rows grouped by (scenario, n) with the ratio ours/peer (median over median)."""
    out = []
    head = (
        f"{'scenario':34} {'n':>2} {'backend':9} {'median':>10} {'p10':>10} {'p90':>10} "
        f"{'reps':>4} {'rate':>10} {'ours/peer':>9}"
    )
    out.append(head)
    out.append("-" * len(head))
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.scenario, r.n), []).append(r)
    for (scen, n), rs in groups.items():
        base = next((r for r in rs if r.backend == ours and r.times), None)
        for r in rs:
            if not r.times:
                out.append(f"{scen:34} {n:>2} {r.backend:9} {'skipped: ' + r.note}")
                continue
            ratio = ""
            if base is not None and r is not base:
                ratio = f"{base.median / r.median:.2f}x"
            out.append(
                f"{scen:34} {n:>2} {r.backend:9} {fmt_time(r.median):>10} {fmt_time(r.p10):>10} "
                f"{fmt_time(r.p90):>10} {len(r.times):>4} {fmt_rate(r.nbytes, r.median):>10} "
                f"{ratio:>9}" + (f"  ({r.note})" if r.note else "")
            )
        out.append("")
    return "\n".join(out)
