"""Build hook: the JupyterLab extension (TypeScript in labextension/) into the wheel.

A wheel build runs ``npm install`` and ``npm run build:prod`` in ``labextension/`` (through
hatch-jupyter-builder's ``npm_builder``, which skips the work when the output is newer than
the sources); the output is ``ipy_multiengine/labextension/``. An editable install skips the
build unless ``IPME_BUILD_LABEXTENSION=1`` is set, so ``pip install -e .`` stays fast and works
without node; everything but the JupyterLab panel works without it. ``IPME_BUILD_LABEXTENSION=0``
skips it for any wheel (tests/test_wheel.py: the npm build takes minutes).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HERE = Path(__file__).parent
OUTPUT = HERE / "ipy_multiengine" / "labextension"


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        if os.environ.get("IPME_BUILD_LABEXTENSION") == "0":  # e.g. tests/test_wheel.py
            self.app.display_warning(
                "ipy_multiengine: IPME_BUILD_LABEXTENSION=0: a wheel without the JupyterLab panel"
            )
            return
        built = (OUTPUT / "package.json").exists()
        if version == "editable" and os.environ.get("IPME_BUILD_LABEXTENSION") != "1":
            self.app.display_info(
                "ipy_multiengine: editable install without building the JupyterLab extension "
                f"({'a build is there already' if built else 'no panel until it is built'}); "
                "set IPME_BUILD_LABEXTENSION=1 to build it (needs node and npm)"
            )
            return
        if shutil.which("npm") is None:
            if built and version == "standard":
                self.app.display_warning("ipy_multiengine: no npm; using the prebuilt labextension")
                return
            message = (
                "ipy_multiengine: building the JupyterLab extension needs node and npm "
                "(none on PATH)"
            )
            if version == "editable":
                self.app.display_warning(message + "; skipped")
                return
            raise RuntimeError(message)
        from hatch_jupyter_builder import npm_builder

        npm_builder(
            self.target_name,
            version,
            path=str(HERE / "labextension"),
            build_cmd="build:prod",
            source_dir=str(HERE / "labextension" / "src"),
            build_dir=str(OUTPUT),
            npm="npm",
        )
