"""Tiny functions shipped to engines/workers by reference (engines import this module)."""

from __future__ import annotations

import os


def noop() -> None:
    """Do nothing: the cost of one remote call."""
    return None


def inc(x: int) -> int:
    """The tiny task of the map scenarios."""
    return x + 1


def map_chunk(f, chunk: list) -> list:
    """Apply ``f`` to a chunk (how dask gets a DirectView-like chunked map)."""
    return [f(x) for x in chunk]


def getpid() -> int:
    """The process id of the engine/worker."""
    return os.getpid()


def noop_arg(x: object) -> None:
    """A no-op taking one argument (a map item)."""
    return None
