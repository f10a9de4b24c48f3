"""Comparing a variable across engines: ``mec.pull_table(names)`` and ``%pxdiff NAME``.

Values are fetched with one ``apply`` per engine that returns only the names defined there, so
an engine lacking a name shows as missing instead of failing the whole call.
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

__all__ = ["lookup", "pull_table", "diff", "Diff"]


def lookup(names: list[str]) -> dict:
    """Runs on an engine: the subset of ``names`` defined in its user namespace."""
    from IPython import get_ipython

    ns = get_ipython().user_ns
    return {n: ns[n] for n in names if n in ns}


def _python_targets(client: Any, targets: Any) -> list[int]:
    eids = client._resolve_targets(targets)
    if targets is None:  # default targets: leave out engines without data operations (e.g. bash)
        eids = [e for e in eids if client._controller.state(e).data_ok and not client._controller.dead(e)]
    return eids


def _fetch(client: Any, names: list[str], targets: Any, timeout: float | None) -> tuple[list[int], list[dict]]:
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"names must be str, not {n!r}")
    eids = _python_targets(client, targets)
    if not eids:
        return [], []
    values = client.apply(lookup, list(names), targets=eids, block=True, timeout=timeout)
    return eids, values


def pull_table(client: Any, names: str | Sequence[str], targets: Any = None, timeout: float | None = None) -> Any:
    """A table of ``names`` by engine: a pandas DataFrame (index ``engine``) when pandas is
    installed, otherwise a list of dicts ``{'engine': id, name: value, ...}`` (a name missing on
    an engine is missing from its dict, NaN in the DataFrame)."""
    names = [names] if isinstance(names, str) else list(names)
    eids, values = _fetch(client, names, targets, timeout)
    rows = [{"engine": eid, **{n: v[n] for n in names if n in v}} for eid, v in zip(eids, values)]
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame.from_records(rows, index="engine", columns=["engine", *names])


def same(a: Any, b: Any) -> bool:
    """Value equality that copes with NumPy arrays, NaN and unorderable types."""
    if type(a) is not type(b):
        return False
    try:
        eq = a == b
        if isinstance(eq, bool):
            if eq:
                return True
        else:
            import numpy as np

            if np.shape(a) == np.shape(b) and bool(np.all(eq)):
                return True
    except Exception:
        pass
    try:  # NaN, containers of arrays, objects without __eq__
        return pickle.dumps(a, protocol=5) == pickle.dumps(b, protocol=5)
    except Exception:
        return False


class Diff:
    """Engines grouped by the value they hold for one name; ``missing`` lacks it."""

    def __init__(self, name: str, groups: list[tuple[Any, list[int]]], missing: list[int]) -> None:
        self.name, self.groups, self.missing = name, groups, missing

    @property
    def identical(self) -> bool:
        return len(self.groups) <= 1 and not self.missing

    def __repr__(self) -> str:
        if not self.groups and not self.missing:
            return f"{self.name}: no engines to compare"
        if self.identical:
            eids = self.groups[0][1]
            return f"{self.name}: the same on all {len(eids)} engines {eids}: {_short_repr(self.groups[0][0])}"
        n = len(self.groups)
        lines = [f"{self.name}: {n} different value{'s' if n != 1 else ''}"
                 + (f", missing on {len(self.missing)} engine{'s' if len(self.missing) != 1 else ''}"
                    if self.missing else "")]
        for value, eids in self.groups:
            lines.append(f"  engines {eids}: {_short_repr(value)}")
        if self.missing:
            lines.append(f"  engines {self.missing}: <not defined>")
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _short_repr(value: Any, width: int = 70) -> str:
    try:
        text = " ".join(repr(value).split())
    except Exception as exc:
        text = f"<unprintable {type(value).__name__}: {exc}>"
    return text if len(text) <= width else text[: width - 1] + "…"


def diff(client: Any, name: str, targets: Any = None, timeout: float | None = None) -> Diff:
    """Group the target engines by the value of ``name`` they hold."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{name!r} is not a variable name")
    eids, values = _fetch(client, [name], targets, timeout)
    groups: list[tuple[Any, list[int]]] = []
    missing = []
    for eid, v in zip(eids, values):
        if name not in v:
            missing.append(eid)
            continue
        for value, members in groups:
            if same(value, v[name]):
                members.append(eid)
                break
        else:
            groups.append((v[name], [eid]))
    return Diff(name, groups, missing)
