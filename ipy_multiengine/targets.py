"""Engine targets: the one parser of ``--targets`` text, the one resolver of ``targets=`` values,
and the id-range formatter."""

from __future__ import annotations

import numbers
from typing import Any

from .errors import TargetsError


def parse_targets(spec: str, ids: list[int], groups: Any = ()) -> str | list[int]:
    """Parse ``all``, ``0``, ``0,2``, ``1:3``, ``::2`` (and mixes like ``0,2:4``) without eval.

    Plain numbers are engine ids; slices select from the list of engine ids like Python
    slicing (``::2`` is every other engine).
    """
    text = spec.strip()
    if text in ("all", "*", ""):
        if text == "":
            raise TargetsError("--targets needs a value: all, 0, 0,2, 1:3 or ::2")
        return "all"
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                bits = part.split(":")
                if len(bits) > 3:
                    raise ValueError
                nums = [int(b) if b.strip() else None for b in bits]
                if len(nums) == 3 and nums[2] == 0:
                    raise TargetsError(f"--targets {spec!r}: slice step cannot be zero")
                picked = ids[slice(*nums)]
                if not picked:
                    raise TargetsError(
                        f"--targets {spec!r}: {part!r} selects no engine; engine ids: {ids}"
                    )
                chosen.extend(picked)
            else:
                chosen.append(int(part))
        except TargetsError:
            raise
        except ValueError:
            if (
                part in groups
            ):  # a group name (kernelspec of a mixed cluster): the client resolves it
                chosen.append(part)  # type: ignore[arg-type]
                continue
            raise TargetsError(
                f"--targets {spec!r}: {part!r} is not an engine id or a slice; "
                "use all, 0, 0,2, 1:3 or ::2"
            ) from None
    out: list[int] = []
    for t in chosen:
        if t not in out:
            out.append(t)
    return out


def engine_range(eids: list[int]) -> str:
    """``[0, 1, 2, 3]`` -> ``'0-3'``, ``[0, 2]`` -> ``'0,2'``, ``[0, 1, 3]`` -> ``'0-1,3'``."""
    eids = sorted(eids)
    parts: list[str] = []
    i = 0
    while i < len(eids):
        j = i
        while j + 1 < len(eids) and eids[j + 1] == eids[j] + 1:
            j += 1
        parts.append(str(eids[i]) if i == j else f"{eids[i]}-{eids[j]}")
        i = j + 1
    return ",".join(parts)


def resolve(targets: Any, ids: list[int], groups: dict[str, list[int]] | None = None) -> list[int]:
    """A ``targets=`` value (``'all'``, an id, a list of ids, group names) -> the engine ids, in
    order; ``ValueError``/``TypeError`` naming the offending value and the valid ids otherwise."""
    ids = list(ids)
    groups = groups or {}
    if isinstance(targets, str):
        if targets == "all":
            return list(ids)
        if targets in groups:
            return list(groups[targets])
        names = f"'all', a group name ({', '.join(map(repr, groups))})" if groups else "'all'"
        raise TargetsError(
            f"targets must be {names}, an engine id or a list of ids, not {targets!r}; "
            f"valid ids: {ids}"
        )
    if isinstance(targets, numbers.Integral) and not isinstance(targets, bool):
        chosen = [int(targets)]
    elif isinstance(targets, (list, tuple, range)):
        chosen = []
        for t in targets:
            if isinstance(t, str) and t in groups:
                chosen.extend(groups[t])
                continue
            if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                raise TypeError(
                    f"engine ids must be ints, not {t!r} ({type(t).__name__}), or group names "
                    f"({', '.join(map(repr, groups)) or 'none'}); valid ids: {ids}"
                )
            chosen.append(int(t))
        if not chosen:
            raise TargetsError(f"targets is an empty list; valid ids: {ids}")
    else:
        raise TypeError(
            f"targets must be 'all', an int or a list of ints, not {targets!r} "
            f"({type(targets).__name__}); valid ids: {ids}"
        )
    known = set(ids)
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise TargetsError(
            f"unknown engine id{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(str, unknown))}; valid ids: {ids}"
        )
    if len(set(chosen)) != len(chosen):
        raise TargetsError(f"targets lists an engine twice: {chosen}")
    return chosen
