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
exclude_patterns = ["_build"]
# the guide's internal links are checked offline: a link to a missing page or heading is a
# warning (MyST's xref checks), and every cross-reference must resolve (nitpicky); -W makes any
# warning fail the build
nitpicky = True
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
# Type annotations (autodoc renders them as py:class references) name the standard library,
# the libraries we build on (no intersphinx: the build is offline) and internal helper types
# that are deliberately not part of the reference; those are not links we promise, so only
# py:class targets are exempt. Every other cross-reference (py:func, py:meth, py:attr, py:exc,
# py:mod, py:obj and MyST's links to pages and headings) must resolve.
nitpick_ignore_regex = [(r"py:class", r".*")]
html_theme = "alabaster"
