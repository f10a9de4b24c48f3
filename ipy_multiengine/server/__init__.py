"""The Jupyter server extension: this user's clusters, live, and actions on their engines.

Enabled on install (``jupyter-config/jupyter_server_config.d/ipy_multiengine.json``); see
``jupyter server extension list``. The watcher (``watch.py``) runs on the package's loop
thread; the REST API (``handlers.py``) is served under ``{base_url}ipy_multiengine/api/``;
``consoles.py`` makes an engine a kernel of the server (a console, the debugger).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float

from .watch import Watcher

__all__ = ["MultiEngineExtension", "Watcher"]


class MultiEngineExtension(ExtensionApp):
    """``c.MultiEngineExtension.scan_interval`` and friends configure it."""

    name = "ipy_multiengine"
    scan_interval = Float(1.0, help="seconds between two scans of the cluster files").tag(
        config=True
    )

    def initialize_settings(self) -> None:
        self._untrack_control_types()
        self.watcher = Watcher(interval=self.scan_interval)
        self.settings["ipy_multiengine_watcher"] = self.watcher
        self.watcher.start()
        self.log.info("ipy_multiengine: watching clusters; API at ipy_multiengine/api/clusters")

    def _untrack_control_types(self) -> None:
        """Our control requests (an interrupt or abort naming its requests) have busy and idle
        statuses on IOPub, seen by every client of the engine: JupyterLab (a console on an
        engine) took them for the shell's and showed a running engine idle. It ignores the
        types jupyter_server does not track (``untracked_message_types``, in its page config
        too): ours join them."""
        from ..wire import CONTROL_MSG_TYPES

        server = self.serverapp
        if server is None:
            return
        km = server.kernel_manager
        untracked = list(getattr(km, "untracked_message_types", None) or [])
        ours = sorted(
            {*CONTROL_MSG_TYPES, *(t.replace("_request", "_reply") for t in CONTROL_MSG_TYPES)}
        )
        if hasattr(km, "untracked_message_types"):
            km.untracked_message_types = [*untracked, *(t for t in ours if t not in untracked)]
            page = server.web_app.settings.get("page_config_data")
            if isinstance(page, dict) and "untracked_message_types" in page:
                page["untracked_message_types"] = list(km.untracked_message_types)

    def initialize_handlers(self) -> None:
        from .handlers import handlers

        self.handlers.extend(handlers())

    async def stop_extension(self) -> None:
        await asyncio.wrap_future(self.watcher.stop())
        from .consoles import release

        if self.serverapp is not None:
            release(self.serverapp.kernel_manager)


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "ipy_multiengine.server", "app": MultiEngineExtension}]


def _jupyter_labextension_paths() -> list[dict]:
    """The prebuilt JupyterLab extension, when the package was built with it."""
    return [{"src": str(Path(__file__).parent.parent / "labextension"), "dest": "ipy_multiengine"}]
