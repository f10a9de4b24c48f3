"""What a person sees in JupyterLab, in a real headless Chromium (selenium).

One JupyterLab server and one browser (``browser_helpers.lab``: shared with the other browser
modules of this test process, fresh for this one). A notebook
of ``%%px`` cells against the session's cluster (through its cluster file) checks: output that
is live while the cell runs and labelled per engine; an error on one engine next to the others'
output; the toolbar's interrupt of a ``%%px time.sleep(60)``; the saved notebook reopened with
the same outputs. The shipped notebooks (which start their own engines) run top to bottom.
Every step leaves a screenshot in pytest's temporary directory; a failure names it.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from browser_helpers import Notebook, wait_until
from faultlib import INTERRUPT_DEADLINE

nbformat = pytest.importorskip("nbformat")

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def write_notebook(server, name: str, cells: list[str]) -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nbformat.write(nb, server.root / name)
    return name


@pytest.fixture(scope="module")
def px(lab, cluster):
    """The ``%%px`` notebook, open, its client connected to the session's cluster."""
    server, browser = lab
    go = server.root / "go"
    cells = [
        # 0: connect; each engine learns its id
        "%load_ext ipy_multiengine\nfrom ipy_multiengine import client\n"
        f"mec = client.MultiEngineClient({str(cluster.cluster_file)!r}); mec.activate()\n"
        "mec.block = True\nmec.execute('%reset -f')\nmec.scatter('eid', mec.get_ids())\n"
        "mec.execute('eid = eid[0]'); print('connected', mec.get_ids())",
        # 1: live output: every engine prints, then waits for the test to let it finish
        "%%px\nimport pathlib, time\ntime.sleep(0.15 * (3 - eid))  # engine 3 prints first\n"
        "print(f'started on {eid}', flush=True)\n"
        f"while not pathlib.Path({str(go)!r}).exists():\n    time.sleep(0.02)\n"
        "print(f'finished on {eid}')",
        # 2: an error on engine 2 only
        "%%px\nprint(f'ok on {eid}')\nif eid == 2:\n    1/0",
        # 3: interrupt
        "%%px\nimport time\nprint(f'sleeping on {eid}', flush=True)\ntime.sleep(60)",
        # 4: the engines answer after the interrupt
        "%px print(f'alive on {eid}')",
        # 5: a balanced map of 120 items with its progress bar (shown after 0.1 s)
        "def slow(x):\n    import time\n    time.sleep(0.08)\n    return x\n\n"
        "mec.progress_after = 0.1\nprint('sum', sum(mec.map(slow, range(120), balanced=True)))",
        # 6: figures made on engines 1 and 2 (engine 2's first)
        "%%px --targets 1,2\nimport matplotlib, time\ntime.sleep(0.5 * (2 - eid))\n"
        "matplotlib.use('module://matplotlib_inline.backend_inline')\n"
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(2, 1.5))\n"
        "ax.plot([0, 1], [0, eid])\nax.set_title(f'figure of {eid}')\nplt.show()",
    ]
    path = write_notebook(server, "px.ipynb", cells)
    nb = Notebook(browser, server, path)
    with browser.step("px-open"):
        nb.open()
        out = nb.run_and_wait(0, timeout=60)
        assert "connected [0, 1, 2, 3]" in out, out
    nb.go = go
    return nb


def assert_engine_order(text: str, stream: str) -> None:
    where = [text.index(f"[{stream}:{e}]") for e in range(4)]
    assert where == sorted(where), f"not in engine order: {text}"


# Records, at every change of a cell's outputs, where each engine's label is in its text.
WATCH_ORDER = """
const cell = document.querySelectorAll(
  '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')[arguments[0]];
window.__ipmeOrder = [];
window.__ipmeOrderWatch = new MutationObserver(() => {
  const area = cell.querySelector('.jp-Cell-outputArea');
  if (!area) return;
  const text = area.innerText;
  window.__ipmeOrder.push([0, 1, 2, 3].map(e => text.indexOf('[stdout:' + e + ']')));
});
window.__ipmeOrderWatch.observe(cell, {subtree: true, childList: true, characterData: true});
"""

# The engine areas of a cell as shown: their text and the width of the rule above each.
AREA_RULES = """
const cell = document.querySelectorAll(
  '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')[arguments[0]];
return Array.from(cell.querySelectorAll('.ipy-multiengine-area, .ipy-multiengine-label'))
  .map(el => [el.innerText, parseFloat(getComputedStyle(el).borderTopWidth)]);
"""


def assert_areas_ruled(nb: Notebook, index: int, labels: list[str]) -> None:
    """Cell ``index`` shows one area or label per entry of ``labels``, in that order, each
    starting with it and visibly separated from the one before (a rule above it)."""
    shown = nb.driver.execute_script(AREA_RULES, index)
    assert [t.split(" ")[0].strip() for t, _w in shown] == labels, shown
    assert all(w >= 1 for _t, w in shown), f"an area without its rule: {shown}"


def test_px_output_is_live_and_labelled(px):
    b = px.browser
    with b.step("px-live"):
        px.driver.execute_script(WATCH_ORDER, 1)
        px.run(1)
        # while the cell still runs (the engines wait for `go`), the page shows every engine's
        # first line with its label
        text = wait_until(
            lambda: (t := px.output_text(1)).count("started on") == 4 and t,
            30,
            "the four engines' first lines while the cell runs",
        )
        assert px.code_cells()[1]["prompt"].strip() == "[*]:", "the cell is still running"
        for e in range(4):
            assert re.search(rf"\[stdout:{e}\][^\n]*started on {e}", text), text
        assert "finished" not in text
        assert_engine_order(text, "stdout")
    with b.step("px-finished"):
        px.go.touch()
        px.wait_idle(30, "the live cell to finish")
        text = px.output_text(1)
        for e in range(4):
            assert f"started on {e}" in text and f"finished on {e}" in text, text
        assert_engine_order(text, "stdout")
        blocks = re.split(r"(?=\[stdout:\d\])", text)
        assert all(f"finished on {e}" in blocks[e + 1] for e in range(4)), blocks  # one area each
        seen = px.driver.execute_script(
            "window.__ipmeOrderWatch.disconnect(); return window.__ipmeOrder;"
        )
        # every state the page showed while the cell ran: the engines' areas never swapped
        shown = [[i for i in where if i >= 0] for where in seen]
        assert seen and all(s == sorted(s) for s in shown), seen
        assert_areas_ruled(px, 1, [f"[stdout:{e}]" for e in range(4)])


def test_error_on_one_engine_shows_its_traceback_and_the_others_output(px):
    with px.browser.step("px-error"):
        text = px.run_and_wait(2, timeout=30)
        for e in (0, 1, 3):
            assert f"ok on {e}" in text, text
        assert "ok on 2" in text  # printed before the error
        assert "[2:execute]" in text and "ZeroDivisionError" in text, text
        assert not any(f"[{e}:execute]" in text for e in (0, 1, 3)), text
        px.browser.shot_element(px.cell_element(2), "cell-px-error")
        outputs = px.code_cells()[2]["outputs"]
        assert any(o["mime"] == "application/vnd.jupyter.stderr" for o in outputs), outputs


def test_toolbar_interrupt_stops_a_sleeping_px_cell(px):
    b = px.browser
    with b.step("px-interrupt-running"):
        px.run(3)
        wait_until(
            lambda: px.output_text(3).count("sleeping on") == 4,
            30,
            "the four engines to start sleeping",
        )
    with b.step("px-interrupted"):
        px.interrupt()
        t0 = time.monotonic()  # the click has been delivered to the page
        wait_until(
            lambda: px.code_cells()[3]["prompt"].strip() not in ("[*]:", ""),
            INTERRUPT_DEADLINE,
            "the interrupted cell to stop",
            step=0.02,
        )
        stopped = time.monotonic() - t0
        text = px.output_text(3)
        assert "KeyboardInterrupt" in text, text
        # stopped by the interrupt, not by the 60 s sleep's end (2 s here failed at load 6)
        assert stopped < INTERRUPT_DEADLINE, f"the interrupt took {stopped:.2f} s"
    with b.step("px-alive-after-interrupt"):
        t0 = time.monotonic()
        text = px.run_and_wait(4, timeout=15)
        assert all(f"alive on {e}" in text for e in range(4)), text
        assert time.monotonic() - t0 < 10


WATCH_COUNTS = """
const cell = document.querySelectorAll(
  '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')[arguments[0]];
const pattern = new RegExp(arguments[1]);
window.__ipmeSeen = [];
window.__ipmeWatch = new MutationObserver(() => {
  const area = cell.querySelector('.jp-Cell-outputArea');
  const m = area && area.innerText.match(pattern);
  if (m) window.__ipmeSeen.push(Number(m[1]));
});
window.__ipmeWatch.observe(cell, {subtree: true, childList: true, characterData: true,
                                  attributes: true});
"""


def test_progress_bar_moves_through_items_and_leaves_nothing_on_stderr(px):
    with px.browser.step("px-progress"):
        # every state the page renders, recorded in the page itself (polling could miss some)
        px.driver.execute_script(WATCH_COUNTS, 5, r"(\d+)/120")
        px.run(5)
        px.wait_idle(60, "the map with a progress bar to finish")
        seen = set(
            px.driver.execute_script("window.__ipmeWatch.disconnect(); return window.__ipmeSeen;")
        )
        outputs = px.code_cells()[5]["outputs"]
        text = px.output_text(5)
        assert "sum 7140" in text, text
        assert len([n for n in seen if 0 < n < 120]) >= 2, f"the bar did not move: {seen}"
        assert "120/120" in text and "item" in text, text  # items, not engines
        assert not any(o["mime"] == "application/vnd.jupyter.stderr" for o in outputs), outputs
        assert "IProgress" not in text and "TqdmWarning" not in text, text
        bars = px.driver.execute_script(
            "return document.querySelectorAll("
            "'.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')[5]"
            ".querySelectorAll('.jp-OutputArea-output progress').length"
        )
        assert bars == 1, f"{bars} HTML progress bars shown"
        px.browser.shot_element(px.cell_element(5), "cell-progress")


def test_figure_made_on_an_engine_shows(px):
    with px.browser.step("px-figures"):
        px.run_and_wait(6, timeout=60)
        outputs = px.code_cells()[6]["outputs"]
        assert sum(o["images"] for o in outputs) == 2, outputs
        # engine order (engine 2 plotted first): engine 1's label, its figure, then engine 2's
        shown = [o["text"].strip() if not o["images"] else "figure" for o in outputs]
        assert shown == ["[output:1]", "figure", "[output:2]", "figure"], outputs
        assert_areas_ruled(px, 6, ["[output:1]", "[output:2]"])
        px.browser.shot_element(px.cell_element(6), "cell-figures")


def test_saved_notebook_reopens_with_the_same_outputs(px):
    b = px.browser
    with b.step("px-saved"):
        before = [(c["prompt"], c["outputs"]) for c in px.code_cells()]
        assert sum(len(o) for _p, o in before) >= 6, before
        px.save()
    with b.step("px-reopened"):
        px.close()
        again = Notebook(b, px.server, px.path).open()
        after = [(c["prompt"], c["outputs"]) for c in again.code_cells()]
        assert after == before
        # the separators are kept too (the saved HTML, sanitized or not, keeps its rule)
        assert_areas_ruled(again, 1, [f"[stdout:{e}]" for e in range(4)])
        assert_areas_ruled(again, 6, ["[output:1]", "[output:2]"])


# ------------------------------------------------------------------ the shipped notebooks


def _run_shipped(lab, name: str) -> tuple[Notebook, list[dict]]:
    server, browser = lab
    shutil.copy(NOTEBOOKS / name, server.root / name)
    expected_failures = [
        i
        for i, c in enumerate(
            c for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells if c.cell_type == "code"
        )
        if "raises-exception" in c.metadata.get("tags", [])
    ]
    nb = Notebook(browser, server, name)
    try:
        with browser.step(f"{name}-open"):
            nb.open()
        with browser.step(f"{name}-top-to-bottom"):
            # JupyterLab 4 runs on past cells tagged raises-exception (the shipped notebooks'
            # deliberate errors) and stops at any other failing cell
            failed = nb.run_everything(timeout=150)
            cells = nb.code_cells()
            nb.dump(name)
            assert failed == [], [cells[i] for i in failed]
            assert all(c["prompt"].strip() not in ("[ ]:", "", "[*]:") for c in cells)
            shown_errors = [
                i
                for i, c in enumerate(cells)
                if any("Traceback" in o["text"] or "Error" in o["text"] for o in c["outputs"])
                and any(o["mime"] == "application/vnd.jupyter.stderr" for o in c["outputs"])
            ]
            assert set(expected_failures) <= set(shown_errors), shown_errors
            nb.save()
            nb.close()
    finally:
        server.shutdown_kernel(name)
    return nb, cells


def _cell_text(cells: list[dict], needle: str) -> str:
    for c in cells:
        if needle in c["source"]:
            return "\n".join(o["text"] for o in c["outputs"])
    raise AssertionError(f"no cell with {needle!r}")


def test_tutorial_runs_top_to_bottom(lab):
    _nb, cells = _run_shipped(lab, "tutorial.ipynb")
    assert "[0, 1, 2, 3]" in _cell_text(cells, "mec.get_ids()")
    out = _cell_text(cells, "mec.execute('print(c)')")
    assert re.search(r"\[0\] Out\[\d+\]: 15", out) and re.search(r"\[1\] Out\[\d+\]: -5", out)
    assert "True" in _cell_text(cells, "serial_result == parallel_result")
    px_cell = _cell_text(cells, "evals.real.min()")
    assert all(f"[stdout:{e}]" in px_cell for e in range(4)), px_cell
    assert "Average max eigenvalue is:" in _cell_text(cells, 'px print("Average')
    err = _cell_text(cells, "mec.execute('1/0')")
    assert "[3:execute]: ZeroDivisionError: division by zero" in err, err


def test_monte_carlo_runs_top_to_bottom(lab):
    _nb, cells = _run_shipped(lab, "monte_carlo_pi.ipynb")
    m = re.search(r"pi is about (\d\.\d+)", _cell_text(cells, "pi_estimate ="))
    assert m and abs(float(m.group(1)) - 3.14159) < 0.05
    plot = next(c for c in cells if "plt.show()" in c["source"])
    assert sum(o["images"] for o in plot["outputs"]) == 4, plot["outputs"]
    assert _cell_text(cells, "my_counts.append").count("local estimate 3.1") == 4
