"""Helpers shared by the tests that drive the magics in a real ``InteractiveShell``: the
magics object, running a cell as a user does, and what a notebook frontend keeps of it."""

from __future__ import annotations

from typing import Any

from IPython.utils.capture import capture_output


def magics_of(ip: Any) -> Any:
    """The shell's ``ParallelMagics`` (its options, ``last``, ``notebook``)."""
    return ip.magics_manager.registry["ParallelMagics"]


def run(ip: Any, cell: str) -> tuple[Any, Any]:
    """Run ``cell`` like a user would; return (captured output, ExecutionResult)."""
    with capture_output() as cap:
        res = ip.run_cell(cell)
    return cap, res


def cell_outputs(cap: Any) -> list[dict]:
    """What a notebook frontend keeps of captured displays, in order: an update replaces
    every output with its display_id, other displays are appended (JupyterLab's model), and
    a ``clear_output`` empties the capture itself. Stdout is captured apart (``cap.stdout``)."""
    cell: list[tuple[str | None, dict]] = []
    for o in cap.outputs:
        did = (o.transient or {}).get("display_id")
        if o.update:
            cell = [(d, o.data if d == did else data) for d, data in cell]
        else:
            cell.append((did, o.data))
    return [data for _, data in cell]
