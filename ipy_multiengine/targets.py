"""Engine targets: the one parser of ``--targets`` text and the id-range formatter."""

from __future__ import annotations

from typing import Any


class TargetsError(ValueError):
    """A targets specification that names no engine or cannot be parsed."""


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
                    raise TargetsError(f"--targets {spec!r}: {part!r} selects no engine; engine ids: {ids}")
                chosen.extend(picked)
            else:
                chosen.append(int(part))
        except TargetsError:
            raise
        except ValueError:
            if part in groups:  # a group name (kernelspec of a mixed cluster): the client resolves it
                chosen.append(part)  # type: ignore[arg-type]
                continue
            raise TargetsError(f"--targets {spec!r}: {part!r} is not an engine id or a slice; "
                             "use all, 0, 0,2, 1:3 or ::2") from None
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
