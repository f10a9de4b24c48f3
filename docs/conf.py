"""Sphinx configuration: the user guide (MyST markdown in docs/) and the API reference."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import ipy_multiengine  # the installed package: its docstrings are the reference

project = "ipy_multiengine"
release = version = ipy_multiengine.__version__
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "magic_options",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/README.md.orig"]
# the guide's internal links are checked offline: a link to a missing page or heading is a
# warning (MyST's xref checks), and every cross-reference must resolve (nitpicky); -W makes any
# warning fail the build
nitpicky = True
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
suppress_warnings: list[str] = []
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
# types from other projects that the reference names but does not document
nitpick_ignore_regex = [
    # (no intersphinx: the build is offline) the standard library and the libraries we build on
    (r"py:.*", r"(concurrent\.futures|cf|asyncio|traitlets|zmq|IPython|jupyter_client)\..*"),
    (r"py:.*", r"(collections\.abc|pathlib|os|typing)\..*"),
    (r"py:.*", r"(Any|Callable|Iterable|Iterator|Sequence|Mapping|Path|Config|T)"),
    # internal types the signatures name, deliberately not part of the reference
    (r"py:.*", r"(ipy_multiengine\.)?(\w+\.)*(Controller|EngineIds|Mapper|ParallelFunction)"),
    (r"py:.*", r"(ipy_multiengine\.)?(\w+\.)*(EngineFailure|Owner|Launcher|CommReply)"),
]
html_theme = "alabaster"
