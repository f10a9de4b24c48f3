"""ipy_multiengine: IPython's classic multiengine interface on ordinary Jupyter kernels.

``from ipy_multiengine import Cluster`` to start engines, ``client.MultiEngineClient()`` to
connect to running ones, ``%load_ext ipy_multiengine`` for the ``%px`` family of magics.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: public name -> the module that defines it. Imported on first use (PEP 562): an engine that
#: imports ``ipy_multiengine.engine`` loads neither the client nor the cluster (issue 15:
#: the engine's idle memory).
_PUBLIC = {
    "MultiEngineClient": "client",
    "PendingResult": "client",
    "ResultList": "client",
    "Cluster": "cluster",
    "CompositeError": "errors",
    "EngineError": "errors",
    "MultiEngineError": "errors",
    "NoClusterError": "errors",
    "RemoteError": "errors",
    "TimeoutError": "errors",
    "Reference": "remote",
    "require": "remote",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif not name.startswith("_"):
        try:  # ``ipy_multiengine.client`` after a bare ``import ipy_multiengine``
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


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
