"""Engines of an older ipy_multiengine than the client's (a remote host not yet upgraded)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from faultlib import small_cluster

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
#: main before the one-sequence map sent elements (bal15): its engines unpack every item
BEFORE_ELEMENTS = "29c89bc"


def need_history(commit: str) -> None:
    """Fail (never skip: CI runs every test) saying what is missing when this checkout lacks
    ``commit`` (a shallow clone, a source archive without ``.git``, no git)."""
    try:
        found = subprocess.run(
            ["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        why = found.stderr.strip() or f"git exited with {found.returncode}"
    except OSError as exc:
        found, why = None, f"git cannot run: {exc}"
    if found is None or found.returncode != 0:
        pytest.fail(
            f"this test needs the repository's history: it extracts the package as it was at "
            f"commit {commit} from {REPO}, which has no such commit ({why}). Run it in a full "
            "clone (e.g. `git fetch --unshallow` in a shallow one).",
            pytrace=False,
        )


@pytest.fixture
def old_engine_kernel(tmp_path, monkeypatch):
    """A kernelspec whose kernel imports the package as it was at BEFORE_ELEMENTS (extracted
    from this repository's history): a real engine of the older version. ``-S`` keeps this
    checkout's editable install out of its path; the dependencies come from this venv."""
    need_history(BEFORE_ELEMENTS)
    pkg = tmp_path / "old"
    pkg.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", BEFORE_ELEMENTS, "ipy_multiengine"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive, check=True, timeout=60)
    spec = tmp_path / "jp" / "kernels" / "oldime"
    spec.mkdir(parents=True)
    path = f"{pkg}:{sysconfig.get_paths()['purelib']}"
    argv = [sys.executable, "-S", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps(
            {"argv": argv, "display_name": "old", "language": "python", "env": {"PYTHONPATH": path}}
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jp"))
    return pkg


def test_a_map_over_one_sequence_is_right_on_an_engine_of_an_older_version(old_engine_kernel):
    """An older engine unpacks each item as the function's arguments: a map over one sequence
    of strings or tuples must still pass each element whole, balanced or not."""
    with small_cluster(1, kernel_name="oldime") as (_cluster, mec):
        mec.block = True
        mec.execute("import ipy_multiengine.engine as _e; where = _e.__file__")
        assert mec.pull("where")[0].startswith(str(old_engine_kernel)), "not the old engine"

        def whole(*args):
            return args

        assert mec.map(whole, ["ab", (1, 2)], timeout=30) == [("ab",), ((1, 2),)]
        assert mec.map(whole, ["ab", (1, 2)], balanced=True, timeout=30) == [("ab",), ((1, 2),)]
        assert list(mec.imap(whole, ["ab"], timeout=30)) == [("ab",)]
        assert mec.map(whole, [1, 2], [3, 4], timeout=30) == [(1, 3), (2, 4)]


def test_a_checkout_without_the_old_commit_fails_saying_so():
    """On a clone without that history (shallow, or an archive) the fixture fails saying what
    it needs, not with git's CalledProcessError from inside the fixture."""
    with pytest.raises(pytest.fail.Exception, match=r"needs the repository's history.*0{40}"):
        need_history("0" * 40)
