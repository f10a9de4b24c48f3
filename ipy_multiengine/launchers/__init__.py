"""Launchers: who starts the engines (local, mpi, slurm, ssh, or a plugin).

A launcher is found by name through the entry-point group ``ipy_multiengine.launchers``
(``name = "module:Class"``; the built-in ones are registered in ``pyproject.toml``), or given as
``"package.module:Class"``. See :mod:`ipy_multiengine.launchers.base` for the interface.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigError
from .base import EngineStartTimeout, Launcher, LauncherError

ENTRY_POINT_GROUP = "ipy_multiengine.launchers"


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(import_module(module), attr)


def available_launchers() -> list[str]:
    """The names of the registered launchers."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_launcher_class(name: str | type[Launcher]) -> type[Launcher]:
    """The launcher class registered as ``name`` (or ``name`` itself if it is a class)."""
    if isinstance(name, type):
        return name
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    if ":" in name:  # "package.module:Class"
        return _load(name)
    raise ConfigError(
        f"unknown launcher {name!r}; available: {', '.join(available_launchers())}", "launcher"
    )


def make_launcher(launcher: Any, n: int | None = None, **options: Any) -> Launcher:
    """A launcher instance from a name, a class, or an instance (returned as is)."""
    if isinstance(launcher, Launcher):
        if options.get("startup_timeout") is not None:
            launcher.startup_timeout = options["startup_timeout"]
        return launcher
    cls = get_launcher_class(launcher)
    return cls(**options) if n is None else cls(n, **options)  # None: the launcher's default


def launcher_from_dict(data: dict) -> Launcher:
    """Rebuild a launcher from :meth:`Launcher.to_dict` (e.g. from a cluster file)."""
    return get_launcher_class(data["launcher"]).from_dict(data)


__all__ = [
    "ENTRY_POINT_GROUP",
    "EngineStartTimeout",
    "Launcher",
    "LauncherError",
    "available_launchers",
    "get_launcher_class",
    "launcher_from_dict",
    "make_launcher",
]
