"""Run the code examples of docs/*.md, so the user guide cannot rot.

Each page's fenced blocks run in order in one IPython session, like a reader typing them:

* ```` ```python ```` and ```` ```ipython ```` blocks run with ``InteractiveShell.run_cell`` and
  must succeed; add ``raises`` after the language (```` ```python raises ````) for an example
  that fails on purpose;
* ```` ```bash test ```` blocks run in bash (``set -e``); other ``bash``/``text`` blocks are
  not run.

The examples connect with ``client.MultiEngineClient()`` to the ``default`` profile, which here
is the session's 4-engine test cluster (its cluster file, copied under the default name).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from ipy_multiengine import client as client_mod

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```([\w-]+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
PAGES = sorted(p.name for p in DOCS.glob("*.md"))


def blocks(path: Path) -> list[tuple[str, set[str], str, int]]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        lang, flags, body = m.group(1), set(m.group(2).split()), m.group(3)
        out.append((lang, flags, body, text.count("\n", 0, m.start()) + 1))
    return out


@pytest.fixture
def default_cluster(cluster, mec):
    """The session cluster, reachable as the running 'default' cluster."""
    from ipy_multiengine.cluster import cluster_file_path

    path = cluster_file_path("default")
    shutil.copy(cluster.cluster_file, path)
    yield mec
    path.unlink(missing_ok=True)


def test_every_page_is_linked_from_the_index():
    index = (DOCS / "index.md").read_text()
    for name in PAGES:
        if name != "index.md":
            assert f"({name})" in index, f"docs/index.md does not link {name}"


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, default_cluster):
    mec = default_cluster
    examples = blocks(DOCS / page)
    if page != "index.md":
        assert any(lang in ("python", "ipython") for lang, *_ in examples), (
            f"{page} has no executed example"
        )
    ip = InteractiveShell.instance()
    ip.reset(new_session=False)
    ip.run_line_magic("load_ext", "ipy_multiengine")
    magics = ip.magics_manager.registry["ParallelMagics"]
    env = dict(
        os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    before = set(_clients(ip))
    try:
        for lang, flags, body, line in examples:
            where = f"docs/{page}:{line}"
            if lang in ("python", "ipython"):
                with capture_output() as cap:
                    res = ip.run_cell(body)
                if "raises" in flags:
                    assert not res.success, f"{where}: expected this example to fail\n{cap.stdout}"
                else:
                    assert res.success, (
                        f"{where} failed:\n{body}\n--- output ---\n{cap.stdout}\n{cap.stderr}"
                    )
            elif lang == "bash" and "test" in flags:
                out = subprocess.run(
                    ["bash", "-e", "-c", body], env=env, capture_output=True, text=True, timeout=90
                )
                assert out.returncode == 0, f"{where} failed:\n{out.stdout}\n{out.stderr}"
        assert not magics.transformer.enabled, f"docs/{page} leaves %autopx on"
    finally:
        magics.transformer.enabled = False
        magics.pxconfig_.__init__()
        for c in _clients(ip):
            if c not in before and c is not mec and not c.closed:
                c.close()
        mec.activate()
        mec.block, mec.targets = True, "all"


def _clients(ip) -> list:
    return [v for v in list(ip.user_ns.values()) if isinstance(v, client_mod.MultiEngineClient)]
