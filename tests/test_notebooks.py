"""Notebooks executed by nbclient in a real notebook kernel.

* a notebook of ``%%px`` cells against the session's cluster (through its cluster file):
  per-engine stream areas, html and image/png displays, ``Out[N:count]``, per-engine errors,
  and the notebook's interrupt during a running ``%%px``;
* ``notebooks/tutorial.ipynb`` and ``notebooks/monte_carlo_pi.ipynb``, which start their own
  4 local engines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
from faultlib import user_environ

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_nb(cells: list[str]):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    return nb


def execute(nb, cwd: Path | None = None, allow_errors: bool = False, during=None):
    client = nbclient.NotebookClient(
        nb,
        timeout=90,
        kernel_name="python3",
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(cwd or ROOT)}},
    )
    if during is None:
        client.execute(env=user_environ())
        return nb
    with client.setup_kernel(env=user_environ()):
        helper = threading.Thread(target=during, args=(client,), daemon=True)
        helper.start()
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        helper.join(30)
    return nb


def texts(cell) -> str:
    out = []
    for o in cell.outputs:
        if o.output_type == "stream":
            out.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            out.append(o.data.get("text/plain", ""))
        elif o.output_type == "error":
            out.append("\n".join(o.traceback))
    return ANSI.sub("", "\n".join(out))


def assert_clean_metadata(nb):
    """Saved outputs are ordinary nbformat outputs: no transient/bookkeeping fields."""
    nbformat.validate(nb)
    raw = json.dumps([c.get("outputs", []) for c in nbformat.from_dict(nb).cells])
    assert "transient" not in raw and "display_id" not in raw and "ipme-" not in raw


def test_px_cells_in_a_notebook(cluster):
    nb = make_nb(
        [
            f"%load_ext ipy_multiengine\nfrom ipy_multiengine import client\n"
            f"mec = client.MultiEngineClient({cluster.cluster_file!r}); mec.activate(); mec.block "
            "= True",
            "%%px\nimport sys, time\nfor i in range(3):\n    print(f'step {i}', flush=True)\n    "
            "time.sleep(0.05)\n"
            "print('\\x1b[31mred\\x1b[0m')\nprint('warn', file=sys.stderr)\n6 * 7",
            "%%px --targets 0,1\nfrom IPython.display import HTML, "
            "display\ndisplay(HTML('<b>engine html</b>'))",
            "%%px --targets 2\nimport matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
            "%%px\nfor i in range(5):\n    print(f'\\r{i * 25}%', end='', flush=True)\nprint()",
            "%px z = 1",
            "%%px --targets 1,3\n1/0",
            "print('not reached')",
        ]
    )
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        execute(nb)
    streams, html, png, results = (nb.cells[i] for i in (1, 2, 3, 1))
    # one area per engine (issue 14.3: was one per engine and stream), in engine order, each
    # run of a stream labelled, with metadata.engine
    areas = [
        o
        for o in streams.outputs
        if o.output_type == "display_data" and o.metadata.get("stream") in ("stdout", "stderr")
    ]
    assert [o.metadata["engine"] for o in areas] == [0, 1, 2, 3]
    for eid, o in enumerate(areas):
        assert o.data["text/plain"] == (
            f"[stdout:{eid}] step 0\nstep 1\nstep 2\n\x1b[31mred\x1b[0m\n[stderr:{eid}] warn"
        )  # ANSI kept
        assert o.metadata["streams"] == ["stderr", "stdout"]
    outs = [o for o in results.outputs if o.data.get("text/plain", "").startswith("Out[")]
    assert sorted(o.metadata["engine"] for o in outs) == [0, 1, 2, 3]
    assert all(
        re.fullmatch(rf"Out\[{o.metadata['engine']}:\d+\]: 42", o.data["text/plain"]) for o in outs
    )
    # rich outputs keep their mime types and carry their engine
    h = [o for o in html.outputs if "engine html" in o.get("data", {}).get("text/html", "")]
    assert [o.metadata["engine"] for o in h] == [0, 1]
    assert all(
        "<b>engine html</b>" in o.data["text/html"] and o.metadata["text/html"]["engine"] in (0, 1)
        for o in h
    )
    imgs = [o for o in png.outputs if "image/png" in o.get("data", {})]
    assert (
        len(imgs) == 1
        and imgs[0].metadata["engine"] == 2
        and imgs[0].metadata["image/png"]["engine"] == 2
    )
    # \r progress lines collapse to their last state
    progress = nb.cells[4]
    assert sorted(o.data["text/plain"] for o in progress.outputs) == [
        f"[stdout:{e}] 100%" for e in range(4)
    ]
    # the tutorial's one-line form
    assert "<Results List>" in texts(nb.cells[5])
    # errors: one error output, one block per failing engine, and the notebook stopped there
    err = nb.cells[6]
    errors = [o for o in err.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "CompositeError"
    tb = texts(err)
    # identical tracebacks collapse by default (issue 14.5): one block naming both engines
    assert "[1,3:execute]: \n" in tb and "[0:execute]" not in tb
    assert tb.count("ZeroDivisionError: division by zero") >= 3  # the summary: 1 and 3
    assert nb.cells[7].outputs == []
    assert_clean_metadata(nb)


def test_display_handle_updated_from_a_later_cell(cluster):
    """nbclient (as JupyterLab) applies update_display_data across cells: a handle made in one
    %%px cell and updated in a later one updates that engine's output, not the other engine's
    output with the same display_id."""
    nb = make_nb(
        [
            f"%load_ext ipy_multiengine\nfrom ipy_multiengine import client\n"
            f"mec = client.MultiEngineClient({cluster.cluster_file!r}); mec.activate(); mec.block "
            "= True",
            "%%px --targets 0,1\nfrom IPython.display import display\nh = display('first', "
            "display_id='shared')",
            "%%px --targets 0\nh.update('updated later')",
        ]
    )
    execute(nb)
    shown = sorted(
        o.data["text/plain"] for o in nb.cells[1].outputs if o.output_type == "display_data"
    )
    assert shown == ["[output:0] 'updated later'", "[output:1] 'first'"], shown
    assert_clean_metadata(nb)


def test_notebook_interrupt_of_running_px(cluster, mec):
    marker = Path(tempfile.mkdtemp(prefix="ipme-int-")) / "started"
    nb = make_nb(
        [
            f"%load_ext ipy_multiengine\nfrom ipy_multiengine import client\n"
            f"mec = client.MultiEngineClient({cluster.cluster_file!r}); mec.activate(); mec.block "
            "= True",
            f"%%px\nimport time, pathlib, os\nprint('started', flush=True)\n"
            f"pathlib.Path({str(marker)!r} + "
            "str(os.getpid())).touch()\ntime.sleep(60)\nprint('never')",
            "%px print('alive')",
        ]
    )
    nb.cells[1].metadata["tags"] = ["raises-exception"]

    def interrupt(client):
        deadline = time.monotonic() + 60
        while len(list(marker.parent.iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)  # polls for a condition (the engines started), bounded
        os.kill(client.km.provisioner.pid, signal.SIGINT)  # what the interrupt button does

    t0 = time.monotonic()
    execute(nb, during=interrupt)
    took = time.monotonic() - t0
    cell = nb.cells[1]
    text = texts(cell)
    started = sorted(p.name for p in marker.parent.iterdir())
    assert took < 60, f"took {took:.1f} s; engines started: {started}; cell output:\n{text}"
    assert "KeyboardInterrupt" in text
    assert all(f"[stdout:{e}] started" in text for e in range(4)) and "never" not in text
    assert any(o.output_type == "error" and o.ename == "KeyboardInterrupt" for o in cell.outputs)
    assert all(f"[{e}] Out[" in texts(nb.cells[2]) for e in range(4)) and "alive" in texts(
        nb.cells[2]
    )


@pytest.mark.parametrize("name", ["tutorial.ipynb", "monte_carlo_pi.ipynb"])
def test_shipped_notebooks_run_top_to_bottom(name):
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    execute(nb, cwd=NOTEBOOKS)
    assert_clean_metadata(nb)
    if name == "tutorial.ipynb":
        check_tutorial(nb)
    else:
        check_monte_carlo(nb)


def _cell(nb, needle: str):
    for cell in nb.cells:
        if cell.cell_type == "code" and needle in cell.source:
            return cell
    raise AssertionError(f"no cell with {needle!r}")


def check_tutorial(nb):
    assert "[0, 1, 2, 3]" in texts(_cell(nb, "mec.get_ids()"))
    out = texts(_cell(nb, "mec.execute('print(c)')"))
    assert (
        "<Results List>" in out
        and re.search(r"\[0\] Out\[\d+\]: 15", out)
        and re.search(r"\[1\] Out\[\d+\]: -5", out)
    )
    assert "True" in texts(_cell(nb, "serial_result == parallel_result"))
    assert "Auto Parallel Enabled" in texts(_cell(nb, "%autopx"))
    assert "PendingResult" in texts(_cell(nb, "max_evals = []"))
    assert "Average max eigenvalue is:" in texts(_cell(nb, 'px print("Average'))
    assert re.search(r"\[3\] Out\[\d+\]: 512.0", texts(_cell(nb, "px print(y)")))
    assert "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]" in texts(
        _cell(nb, "mec.gather('a')")
    )
    err = texts(_cell(nb, "mec.execute('1/0')"))
    assert "CompositeError" in err and "[3:execute]: ZeroDivisionError: division by zero" in err
    assert "ZeroDivisionError" in texts(_cell(nb, "e.raise_exception()"))


def check_monte_carlo(nb):
    out = texts(_cell(nb, "pi_estimate ="))
    m = re.search(r"pi is about (\d\.\d+)", out)
    assert m and abs(float(m.group(1)) - 3.14159) < 0.05
    plot = _cell(nb, "plt.show()")
    imgs = [o for o in plot.outputs if "image/png" in o.get("data", {})]
    assert sorted(o.metadata["engine"] for o in imgs) == [0, 1, 2, 3]
    assert "local estimate 3.1" in texts(_cell(nb, "my_counts.append"))


def test_px_cell_final_layout_keeps_the_notice_and_the_bar(cluster):
    """The first ``%%px`` of a notebook without an active client connects to the running
    default cluster and says so (stderr); with ``--progress-after`` (or ``%pxconfig
    --progress-after``, for every cell) it also shows a bar. The cell's final layout (cleared
    and shown again) keeps both: the notice first, the engines' areas in engine order, the
    bar last in its final state, and no empty reserved display is saved."""
    from ipy_multiengine.cluster import cluster_file_path

    default = cluster_file_path("default")
    shutil.copy(cluster.cluster_file, default)
    try:
        nb = make_nb(
            [
                "%load_ext ipy_multiengine",
                "%%px --targets 0,2 --progress-after 0.1\nimport time\ntime.sleep(0.8)\n"
                "print('done')",
            ]
        )
        execute(nb)
    finally:
        default.unlink(missing_ok=True)
    outs = nb.cells[1].outputs
    assert not [o for o in outs if o.get("data") == {}], outs
    notice = [o for o in outs if o.output_type == "stream" and o.name == "stderr"]
    assert notice and "connected to the running default cluster" in notice[0].text, outs
    assert outs.index(notice[0]) == 0, outs  # said before the engines' output, as it happened
    shown = [o.data["text/plain"] for o in outs if o.output_type == "display_data"]
    assert shown[:2] == ["[stdout:0] done", "[stdout:2] done"], shown
    bars = [o for o in outs if "ipy-multiengine-progress" in o.get("data", {}).get("text/html", "")]
    assert len(bars) == 1 and outs[-1] is bars[0] and "2/2" in bars[0].data["text/plain"], outs
    assert_clean_metadata(nb)
