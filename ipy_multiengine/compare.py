"""Comparing a variable across engines: ``mec.pull_table(names)`` and ``%pxdiff NAME``.

Values are fetched with one ``apply`` per engine that returns only the names defined there, so
an engine lacking a name shows as missing instead of failing the whole call. With default
targets, engines that cannot answer now (dead, restarting, not Python) are skipped and listed
as skipped (``Diff.skipped``, ``pull_table(...).attrs['skipped']`` / ``.skipped``), never
dropped silently.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["Diff", "Rows", "diff", "lookup", "pull_table"]


def lookup(names: list[str]) -> dict:
    """Runs on an engine: the subset of ``names`` defined in its user namespace."""
    from IPython import get_ipython

    ns = get_ipython().user_ns
    return {n: ns[n] for n in names if n in ns}


def _skip_reason(row: dict) -> str | None:
    """Why an engine (a row of ``mec.engines``) cannot be compared now, or None."""
    if row.get("dead"):
        return f"dead: {row['dead']}"
    if row.get("ready") is False:
        return str(row.get("state") or "not ready")
    if not row.get("data_ops"):
        return f"{row.get('language') or 'unknown language'}: no data operations"
    return None


def _python_targets(client: Any, targets: Any) -> tuple[list[int], dict[int, str]]:
    """The engines to compare, and the skipped ones with the reason. Default targets leave out
    engines that cannot answer now (dead, restarting, without data operations, e.g. bash);
    explicit targets are used as given (a bad one is a clear error from the call)."""
    from .targets import resolve

    eids = resolve(
        client.targets if targets is None else targets, list(client.get_ids()), client.groups
    )
    if targets is not None:
        return eids, {}
    rows = {r["id"]: r for r in client.engines}
    skipped = {e: why for e in eids if (why := _skip_reason(rows.get(e, {})))}
    return [e for e in eids if e not in skipped], skipped


def _fetch(
    client: Any, names: list[str], targets: Any, timeout: float | None
) -> tuple[list[int], list[dict], dict[int, str]]:
    from .errors import CompositeError, EngineError, RemoteError

    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"names must be str, not {n!r}")
    for attempt in range(3):
        eids, skipped = _python_targets(client, targets)
        if not eids:
            return [], [], skipped
        try:
            values = client.apply(lookup, list(names), targets=eids, block=True, timeout=timeout)
            return eids, values, skipped
        except EngineError:  # an engine became unavailable (restart) between the look and the call
            if targets is not None or attempt == 2:
                raise
        except CompositeError as err:
            if targets is not None or any(isinstance(e, RemoteError) for e in err.elist):
                raise
            # engines that died or began restarting during the call are skipped, with the reason
            lost = {e.engine_id: str(e) for e in err.elist if e.engine_id is not None}
            keep = [(e, v) for e, v in zip(eids, err.results, strict=True) if e not in lost]
            return [e for e, _ in keep], [v for _, v in keep], {**skipped, **lost}
    raise AssertionError("unreachable")  # pragma: no cover


def _skipped_text(skipped: dict[int, str]) -> str:
    return "; ".join(f"engine {e} ({why})" for e, why in sorted(skipped.items()))


def pull_table(
    client: Any, names: str | Sequence[str], targets: Any = None, timeout: float | None = None
) -> Any:
    """A table of ``names`` by engine: a pandas DataFrame (index ``engine``) when pandas is
    installed, otherwise a list of dicts ``{'engine': id, name: value, ...}`` (a name missing on
    an engine is missing from its dict, NaN in the DataFrame)."""
    names = [names] if isinstance(names, str) else list(names)
    eids, values, skipped = _fetch(client, names, targets, timeout)
    if skipped:  # never dropped silently: said here, and kept on the table
        print(f"pull_table: skipped {_skipped_text(skipped)}", file=sys.stderr)
    rows = [
        {"engine": eid, **{n: v[n] for n in names if n in v}}
        for eid, v in zip(eids, values, strict=True)
    ]
    try:
        import pandas as pd
    except ImportError:
        return Rows(rows, skipped)
    df = pd.DataFrame.from_records(rows, index="engine", columns=["engine", *names])
    df.attrs["skipped"] = dict(skipped)
    return df


class Rows(list):
    """``pull_table`` without pandas: a list of dicts; ``skipped`` maps engine id -> reason."""

    def __init__(self, rows: list[dict], skipped: dict[int, str]) -> None:
        super().__init__(rows)
        self.skipped = dict(skipped)


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

    def __init__(
        self,
        name: str,
        groups: list[tuple[Any, list[int]]],
        missing: list[int],
        skipped: dict[int, str] | None = None,
    ) -> None:
        self.name, self.groups, self.missing = name, groups, missing
        self.skipped: dict[int, str] = dict(skipped or {})  # engine id -> why it was not compared

    @property
    def identical(self) -> bool:
        return len(self.groups) <= 1 and not self.missing

    def __repr__(self) -> str:
        text = self._compared()
        if self.skipped:
            text += f"\n  skipped: {_skipped_text(self.skipped)}"
        return text

    def _compared(self) -> str:
        if not self.groups and not self.missing:
            return f"{self.name}: no engines to compare"
        if self.identical:
            eids = self.groups[0][1]
            if self.skipped:
                return (
                    f"{self.name}: the same on the {len(eids)} "
                    f"engine{'s' if len(eids) != 1 else ''} "
                    f"compared {eids}: {_short_repr(self.groups[0][0])}"
                )
            return (
                f"{self.name}: the same on all {len(eids)} engines {eids}: "
                f"{_short_repr(self.groups[0][0])}"
            )
        n = len(self.groups)
        lines = [
            f"{self.name}: {n} different value{'s' if n != 1 else ''}"
            + (
                f", missing on {len(self.missing)} engine{'s' if len(self.missing) != 1 else ''}"
                if self.missing
                else ""
            )
        ]
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
    eids, values, skipped = _fetch(client, [name], targets, timeout)
    groups: list[tuple[Any, list[int]]] = []
    missing = []
    for eid, v in zip(eids, values, strict=True):
        if name not in v:
            missing.append(eid)
            continue
        for value, members in groups:
            if same(value, v[name]):
                members.append(eid)
                break
        else:
            groups.append((v[name], [eid]))
    return Diff(name, groups, missing, skipped)
