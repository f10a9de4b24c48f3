"""ipy_multiengine: IPython's classic multiengine interface on ordinary Jupyter kernels.

``from ipy_multiengine import Cluster`` to start engines, ``client.MultiEngineClient()`` to
connect to running ones, ``%load_ext ipy_multiengine`` for the ``%px`` family of magics.
"""

from typing import Any

from .client import MultiEngineClient, PendingResult, ResultList
from .cluster import Cluster
from .errors import (
    CompositeError,
    EngineError,
    MultiEngineError,
    NoClusterError,
    RemoteError,
    TimeoutError,
)
from .remote import Reference, require

#: the one version source: pyproject.toml reads it (``dynamic = ["version"]``)
__version__ = "0.1.0"

__all__ = [
    "Cluster",
    "CompositeError",
    "EngineError",
    "MultiEngineClient",
    "MultiEngineError",
    "NoClusterError",
    "PendingResult",
    "Reference",
    "RemoteError",
    "ResultList",
    "TimeoutError",
    "require",
]


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext ipy_multiengine``: register the parallel magics."""
    from .magics import load

    load(ip)


def unload_ipython_extension(ip: Any) -> None:
    """``%unload_ext ipy_multiengine``: remove the magics and the ``%autopx`` transformer."""
    from .magics import unload

    unload(ip)
