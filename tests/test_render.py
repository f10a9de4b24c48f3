"""What a notebook or terminal user sees of %px output and progress (issue 14): the magics'
one wait, progress that counts items, labels of rich outputs, one area per engine in engine
order, collapsed tracebacks. Real engines (the session's cluster), a real ``InteractiveShell``."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from faultlib import held_code
from IPython.utils.capture import capture_output
from shell_helpers import cell_outputs, magics_of, run

from ipy_multiengine import _loop
from ipy_multiengine.errors import CompositeError

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------- the one wait (13.5)
def test_px_cell_waits_through_the_one_loop_wait(ip, mec, monkeypatch):
    """A %%px cell's wait (live output, prompts, timeout) is ``_loop.wait``'s, not a loop of its
    own: the wait sees the cell's futures, and its output is still rendered live."""
    seen = []
    real = _loop.wait

    def spy(futures, *args, **kwargs):
        futures = list(futures)
        seen.append(futures)
        return real(futures, *args, **kwargs)

    monkeypatch.setattr(_loop, "wait", spy)
    cap, res = run(ip, "%%px\nprint('hello')")
    assert res.success, res.error_in_exec
    pr = magics_of(ip).last
    assert any(
        len(f) == 4 and all(a is b for a, b in zip(f, pr.futures, strict=True)) for f in seen
    ), seen
    assert sorted(ln for ln in cap.stdout.splitlines() if "hello" in ln) == [
        f"[stdout:{e}] hello" for e in range(4)
    ]
    seen.clear()
    cap, res = run(ip, "%%px --timeout 0.3\nimport time; time.sleep(2)")
    assert not res.success and "not done after 0.3 s" in str(res.error_in_exec)
    assert any(len(f) == 4 for f in seen)
    mec.get_result(timeout=10)


# ---------------------------------------------------------------------- progress (14.1)
_slow = lambda x: __import__("time").sleep(0.04) or x  # noqa: E731  (sent by value)


def test_terminal_progress_counts_items_moves_and_is_cleared(mec, monkeypatch, capsys):
    """In a terminal: a tqdm bar on stderr counting items (not engines), moving as chunks
    complete, with the rate and the engines still busy, and nothing left of it at the end."""
    from beyond_helpers import screen_lines

    from ipy_multiengine import render

    monkeypatch.setattr(render, "interactive", lambda: True)  # pytest's stderr is no terminal
    monkeypatch.setattr(mec, "progress_after", 0.05)
    # small chunks (auto chunking would make few big ones of such short items)
    assert mec.map(_slow, range(80), balanced=True, chunksize=2) == list(range(80))
    err = capsys.readouterr().err
    frames = [f for f in err.replace("\r", "\n").split("\n") if f.startswith("map:")]
    counts = {int(m) for f in frames for m in re.findall(r"(\d+)/80", f)}
    assert 80 in counts, frames
    assert len([c for c in counts if 0 < c < 80]) >= 2, frames  # it moved through items
    assert any("item/s" in f or "items/s" in f for f in frames), frames
    assert any(re.search(r"waiting for engines? [0-3]", f) for f in frames), frames
    assert not any(ln.strip() for ln in screen_lines(err)), screen_lines(err)  # cleared
    # the static map counts items too (one block per engine completes at a time)
    assert mec.map(_slow, range(40)) == list(range(40))
    err = capsys.readouterr().err
    assert "/40" in err and "/4 " not in err and "engine/s" not in err, err
    # wait_interactive shows progress at once (no threshold, no terminal needed)
    monkeypatch.setattr(render, "interactive", lambda: False)
    pr = mec.map(_slow, range(40), block=False, balanced=True)
    assert pr.wait_interactive(timeout=30) is True
    assert pr.get_result() == list(range(40))
    err = capsys.readouterr().err
    assert "40/40" in err and not any(ln.strip() for ln in screen_lines(err)), err


def test_wait_interactive_honours_timeout(mec, capsys, tmp_path):
    go = tmp_path / "go"
    pr = mec.execute(held_code(go), block=False)  # busy until the test says go (30 s at most)
    try:
        started = time.monotonic()
        assert pr.wait_interactive(timeout=0.3) is False
        took = time.monotonic() - started
        # it returned at its timeout, not when the engines were done (30 s)
        assert took < 0.3 + 5, f"wait_interactive(timeout=0.3) took {took:.2f} s"
        assert "0/4" in capsys.readouterr().err
    finally:
        go.touch()
    assert pr.wait_interactive(timeout=30) is True


def test_ctrl_c_in_px_leaves_no_bar_and_an_intact_message(ip, mec, monkeypatch):
    """Ctrl-C in a %%px cell showing its progress bar in a terminal: the bar is gone from the
    screen and the "interrupted engines" message is a line of its own, not written onto it."""
    import _thread
    import io
    import sys
    import threading

    from beyond_helpers import screen_lines

    from ipy_multiengine import render

    monkeypatch.setattr(render, "interactive", lambda: True)
    drawn = threading.Event()

    class Terminal(io.StringIO):
        def write(self, s):
            n = super().write(s)
            if "0/4" in self.getvalue():
                drawn.set()  # the bar is on the screen
            return n

    def interrupter():
        if drawn.wait(20):
            _thread.interrupt_main()

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    t = threading.Thread(target=interrupter)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt), capture_output(stderr=False):
            ip.run_cell_magic("px", "--progress-after 0", "import time; time.sleep(30)")
    finally:
        t.join()
    monkeypatch.undo()
    shown = [ln for ln in screen_lines(screen.getvalue()) if ln.strip()]
    assert len(shown) == 1 and re.fullmatch(r"%px: interrupted engines [0-3-]+.*", shown[0]), shown
    assert [r["stdout"] for r in mec.execute("print('alive')")] == ["alive\n"] * 4


def _imports(module) -> list[str]:
    """Every name ``module`` imports, at the top or lazily inside functions."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    return [
        (node.module or "") + "".join("." + a.name for a in node.names)
        if isinstance(node, ast.ImportFrom)
        else ",".join(a.name for a in node.names)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]


def test_results_do_not_depend_on_rendering():
    """Layering: ``results`` (data and waiting) imports nothing of ``render``, not even lazily;
    the bar of ``wait_interactive`` is installed by the client."""
    from ipy_multiengine import client, results

    names = _imports(results)
    assert not [n for n in names if "render" in n], names
    assert results.PendingResult.interactive_bar is client._interactive_bar


def test_stdin_does_not_depend_on_rendering():
    """Layering: ``stdin`` (prompts from engines) imported ``render`` lazily to clear progress
    bars; now the client passes that in (``stdin.set_prompt_guard``)."""
    from ipy_multiengine import client, render, stdin

    names = _imports(stdin)
    assert not [n for n in names if "render" in n], names
    assert client.stdin is stdin and stdin._prompt_guard is render.bars_cleared


@pytest.mark.parametrize("notebook", [True, False])
def test_progress_is_drawn_by_the_waiting_thread_only(monkeypatch, notebook):
    """tqdm's monitor thread redraws a bar whose ``miniters`` grew past 1 once ``maxinterval``
    passed without a draw (a slow gather): a notebook display sent from a thread that is not
    the cell's, a terminal write racing the live output. The bar is drawn by the waiting
    thread only: the monitor, made to run often here, never draws it."""
    import io
    import threading

    import tqdm.std

    from ipy_multiengine import render

    monkeypatch.setattr(render, "in_notebook", lambda shell=None: notebook)
    monkeypatch.setattr(render.sys, "stderr", io.StringIO())
    drawers: set[str] = set()
    real_refresh = tqdm.std.tqdm.refresh

    def refresh(self, *a, **k):
        drawers.add(threading.current_thread().name)
        return real_refresh(self, *a, **k)

    monkeypatch.setattr(tqdm.std.tqdm, "refresh", refresh)
    bar = render.ProgressBar("gather", 0.0, True, "B")
    bar(0, None, [0])
    for i in range(1, 6):
        time.sleep(0.21)  # past mininterval: each update is drawn
        bar(i << 20, None, [0])
    bar.bar.maxinterval = 0.2  # "long" without a draw, from now
    monitor = tqdm.std.TMonitor(tqdm.std.tqdm, 0.05)  # one that looks every 50 ms
    try:
        time.sleep(0.6)
    finally:
        monitor.exit()
    bar.close(6 << 20, None, [])
    assert drawers <= {threading.current_thread().name}, drawers


def test_a_bar_first_drawn_while_a_prompt_is_asked_waits_for_the_prompt(monkeypatch):
    """A prompt (an engine's ``input()``) asked before any bar existed took no lock: the
    waiting thread's bar, first drawn meanwhile, was written where the prompt then went on
    (``%px: 0%|...[0] name? typed``; test_stdin's prompt test failed so under load). The
    prompt holds the bars' lock even when none is drawn: the bar comes after the answer."""
    import io
    import threading

    import tqdm.std
    from beyond_helpers import screen_lines

    from ipy_multiengine import render

    assert not getattr(tqdm.std.tqdm, "_instances", None), "a bar of another test is open"
    screen = io.StringIO()
    monkeypatch.setattr(render.sys, "stdout", screen)
    monkeypatch.setattr(render.sys, "stderr", screen)
    monkeypatch.setattr(render, "in_notebook", lambda shell=None: False)
    asking, drawn = threading.Event(), threading.Event()
    bar = render.ProgressBar("%px", 0.0, True)

    def draw():
        asking.wait(10)
        bar(0, 2, [0, 1])  # the waiting thread's first draw
        drawn.set()

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        with render.bars_cleared(screen):
            asking.set()
            drawn.wait(1.0)  # bounded: with the lock held the bar cannot come before the answer
            screen.write("[0] name? typed\n")
        drawer.join(10)
        assert drawn.is_set()
    finally:
        bar.close()
    lines = screen_lines(screen.getvalue())
    assert "[0] name? typed" in lines, lines


def test_unfinished_gather_is_not_left_at_100_percent(monkeypatch):
    """A gather's total (bytes) is known only once every engine answered: a gather that timed
    out or was interrupted with engines still busy keeps an open total in the bar's final
    state (what a saved notebook holds), not ``100%`` of what arrived."""
    from ipy_multiengine import render

    monkeypatch.setattr(render, "in_notebook", lambda shell=None: True)
    shown: list[dict] = []
    monkeypatch.setattr(render, "_display", lambda data, md, *a, **k: shown.append(data))
    bar = render.ProgressBar("gather", 0.0, True, "B")
    bar(0, None, [0, 1])
    bar.close(3 << 20, None, [1])  # engine 1 never answered
    final = shown[-1]["text/html"]
    assert "3.00MB" in final and "100%" not in final and "waiting for engine 1" in final, final
    bar = render.ProgressBar("gather", 0.0, True, "B")
    bar(0, None, [0, 1])
    bar.close(4 << 20, None, [])  # all answered: the total is what arrived
    assert "100%" in shown[-1]["text/html"], shown[-1]


def test_scatter_and_gather_progress_count_bytes(mec, monkeypatch, capsys):
    from ipy_multiengine import render

    monkeypatch.setattr(render, "interactive", lambda: True)
    monkeypatch.setattr(mec, "progress_after", 0.0)
    mec.execute("import time")
    data = bytes(8 << 20)
    mec.scatter("blob", [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)])
    pr = mec.gather("blob", block=False)
    pr.wait_interactive(timeout=30)
    assert sum(len(b) for b in pr.get_result()) == len(data)
    err = capsys.readouterr().err
    assert re.search(r"scatter:.*M(i)?B?/", err) or "MB" in err, err
    assert re.search(r"gather:.*\d(\.\d)?M", err), err


def test_ctrl_c_while_an_event_renders_neither_loses_nor_repeats_it(monkeypatch, capsys):
    """A Ctrl-C (a real SIGINT) landing while a live output line is written: the interrupt
    still reaches the user, and the line is shown once, not again at the end."""
    import os
    import signal
    import sys

    from ipy_multiengine.render import LiveOutput, Renderer

    real = sys.stdout

    class Interrupting:  # the terminal, where the Ctrl-C arrives mid-write
        fired = False

        def write(self, text: str) -> int:
            real.write(text)
            if not self.fired:
                self.fired = True
                os.kill(os.getpid(), signal.SIGINT)
            return len(text)

        def flush(self) -> None:
            real.flush()

    live = LiveOutput(renderer=Renderer([0, 1], "stream", False))
    monkeypatch.setattr(sys, "stdout", Interrupting())
    live.listener(0, "stream", {"name": "stdout", "text": "hello\n"})
    with pytest.raises(KeyboardInterrupt):
        live._drain()  # what the wait runs in the user's thread
    live.listener(1, "stream", {"name": "stdout", "text": "world\n"})
    live.close()
    monkeypatch.setattr(sys, "stdout", real)
    assert capsys.readouterr().out.splitlines() == ["[stdout:0] hello", "[stdout:1] world"]

    # collected output (--no-stream, a failing or timed-out one-line %px) is shown at close:
    # a Ctrl-C while it is shown comes after all of it, not instead of the rest
    live = LiveOutput(renderer=Renderer([0, 1], "collect", False))
    live.listener(0, "stream", {"name": "stdout", "text": "hello\n"})
    live.listener(1, "stream", {"name": "stdout", "text": "world\n"})
    live._drain()
    monkeypatch.setattr(sys, "stdout", Interrupting())
    with pytest.raises(KeyboardInterrupt):
        live.close()
    monkeypatch.setattr(sys, "stdout", real)
    assert capsys.readouterr().out.splitlines() == ["[stdout:0] hello", "[stdout:1] world"]


def test_area_frozen_whole_leaves_no_blank_output(monkeypatch):
    """A notebook area past AREA_LIMIT whose text is all frozen (one long line without a
    newline) continues in a new display only when more text comes: the end of the cell adds
    no blank output (saved in the notebook as an empty display)."""
    from ipy_multiengine import render

    shown: dict[str, str] = {}
    order: list[str] = []

    def display(data, md, display_id=None, update=False):
        key = display_id or f"anon-{len(order)}"
        if not update:
            order.append(key)
        shown[key] = data["text/plain"]

    monkeypatch.setattr(render, "_display", display)
    r = render.Renderer([0], "stream", True)
    r.handle(0, "stream", {"name": "stdout", "text": "x" * 10})
    r.tick(force=True)
    r.handle(0, "stream", {"name": "stdout", "text": "x" * render.AREA_LIMIT})
    r.tick(force=True)  # past the limit: frozen, nothing left in the area
    r.finish()
    final = [shown[k] for k in order]
    assert final == ["[stdout:0] " + "x" * (render.AREA_LIMIT + 10)], [t[:20] for t in final]


# ---------------------------------------------------------------------- labels, areas (14.2, 14.3)
def test_rich_outputs_get_a_visible_label_line(ip, mec, monkeypatch):
    """In a notebook, a figure/HTML/DataFrame from an engine is preceded by an ``[output:N]``
    label (the frontend shows the image, not the labelled text/plain): outside a ``%%px``
    cell's own layout (a one-line ``%px --stream`` may share its cell) a stream line."""
    import sys

    magics_of(ip).notebook = True
    order = []  # (kind, what) in the order the kernel would send them
    from ipy_multiengine import render

    real = render._display

    def spy(bundle, metadata, display_id=None, update=False):
        if not update:
            order.append(("display", metadata.get("engine")))
        return real(bundle, metadata, display_id, update)

    monkeypatch.setattr(render, "_display", spy)
    with capture_output() as cap:
        real_write = sys.stdout.write

        def write(text):
            if text.strip():
                order.append(("stream", text.strip()))
            return real_write(text)

        monkeypatch.setattr(sys.stdout, "write", write)
        res = ip.run_cell(
            "%px --stream --targets 1,2 from IPython.display import HTML, display; "
            "display(HTML('<b>x</b>')); HTML('<i>y</i>')"
        )
        monkeypatch.undo()
    assert res.success, res.error_in_exec
    pairs = [(order[i], order[i + 1]) for i in range(len(order) - 1)]
    for eid in (1, 2):
        assert (("stream", f"[output:{eid}]"), ("display", eid)) in pairs, order
        assert any(
            a[0] == "stream" and a[1].startswith(f"Out[{eid}:") and b == ("display", eid)
            for a, b in pairs
        ), order
    assert "[output:1]" in cap.stdout and "[output:2]" in cap.stdout


LAYOUT_CELL = (
    "%%px\nimport time\nfrom IPython.display import HTML, display\n"
    "time.sleep(0.25 * (3 - me))  # engine 3 first, engine 0 last\n"
    "if me != 1:  # engine 1 shows nothing\n    print(f'out {me}', flush=True)\n"
    "if me == 2:\n    display(HTML('<b>two</b>'))\n"
    "time.sleep(0.1)\nif me != 1:\n    print(f'more {me}', flush=True)"
)


def test_px_cell_layout_is_reserved_in_engine_order_and_saved_without_blanks(ip, mec, monkeypatch):
    """A ``%%px`` cell in a notebook reserves each engine's displays in engine order before
    any output, so an engine's area never moves while the cell runs, whoever prints first; a
    rich output shows in its engine's place with its label; at the end the cell holds only
    what was shown, in engine order (no blank output for the silent engine), each area and
    label with a visible rule above it."""
    import IPython.display

    from ipy_multiengine import render

    magics_of(ip).notebook = True
    for eid in mec.get_ids():
        mec.push({"me": eid}, targets=eid)
    model: list[list[Any]] = []  # the frontend's outputs: [display_id, data]
    snapshots: list[list[tuple[str | None, dict]]] = []
    clear_next: list[bool] = []
    cleared_at: list[int] = []
    real_display, real_clear = render._display, IPython.display.clear_output

    def display(bundle, metadata, display_id=None, update=False):
        if update:
            for m in model:
                if m[0] == display_id:
                    m[1] = bundle
        else:
            if clear_next:  # clear_output(wait=True): cleared when the next output comes
                model.clear()
                clear_next.clear()
            model.append([display_id, bundle])
        snapshots.append([(d, b) for d, b in model])
        return real_display(bundle, metadata, display_id, update)

    def clear_output(wait=False):
        cleared_at.append(len(snapshots))
        if wait:
            clear_next.append(True)
        else:
            model.clear()
        return real_clear(wait)

    monkeypatch.setattr(render, "_display", display)
    monkeypatch.setattr(IPython.display, "clear_output", clear_output)
    cap, res = run(ip, LAYOUT_CELL)
    assert res.success, res.error_in_exec

    shows = {  # what each engine's outputs read in the frontend
        "area 0": lambda b: b.get("text/plain", "").startswith("[stdout:0]"),
        "area 2": lambda b: b.get("text/plain", "").startswith("[stdout:2]"),
        "label 2": lambda b: b.get("text/plain") == "[output:2]",
        "html 2": lambda b: "<b>two</b>" in b.get("text/html", ""),
        "area 3": lambda b: b.get("text/plain", "").startswith("[stdout:3]"),
    }
    live = snapshots[: cleared_at[0]] if cleared_at else snapshots
    where: dict[str, set[int]] = {k: set() for k in shows}
    for snap in live:
        for what, test in shows.items():
            where[what].update(i for i, (_d, b) in enumerate(snap) if test(b))
    assert all(len(w) == 1 for w in where.values()), f"an output moved while the cell ran: {where}"
    pos = [where[k].pop() for k in shows]
    assert pos == sorted(pos), pos  # engine order, engine 2's rich output after its area
    assert all(b == {} for _d, b in snapshots[11]), "12 displays reserved before any output"
    first = next(i for i, snap in enumerate(snapshots) if any(b for _d, b in snap))
    assert first >= 12, snapshots[first]
    assert len(live[-1]) == 12, "every output went to a display reserved for it"
    assert len(cleared_at) == 1, cleared_at  # laid out again once, at the end
    final = cell_outputs(cap)  # what the notebook keeps (the capture was cleared at the end)
    assert [d.get("text/plain") for d in final] == [
        "[stdout:0] out 0\nmore 0",
        "[stdout:2] out 2\nmore 2",
        "[output:2]",
        "[output:2] <IPython.core.display.HTML object>",
        "[stdout:3] out 3\nmore 3",
    ], final
    assert "<b>two</b>" in final[3]["text/html"]
    for d in (final[0], final[1], final[2], final[4]):
        assert "border-top" in d["text/html"] and d["text/plain"] in d["text/html"], d


def test_one_area_per_engine_in_engine_order(ip, mec):
    """Engines printing in reverse order still get their areas in engine order (0 above 3), one
    area per engine for stdout and stderr, each run of a stream labelled."""
    magics_of(ip).notebook = True
    for eid in mec.get_ids():
        mec.push({"me": eid}, targets=eid)
    cap, res = run(
        ip,
        "%%px\nimport sys, time\ntime.sleep(0.2 * (3 - me))\n"
        "print('out', flush=True); print('err', file=sys.stderr, flush=True)",
    )
    assert res.success, res.error_in_exec
    areas = [d for d in cell_outputs(cap) if d.get("text/plain", "").startswith("[std")]
    assert [re.match(r"\[stdout:(\d)\]", d["text/plain"]).group(1) for d in areas] == list("0123")
    for eid, d in enumerate(areas):
        assert d["text/plain"] == f"[stdout:{eid}] out\n[stderr:{eid}] err", d


def test_group_outputs_order_interleaves_with_a_label_per_chunk(ip, mec):
    magics_of(ip).notebook = True
    for eid in mec.get_ids():
        mec.push({"me": eid}, targets=eid)
    cap, res = run(
        ip,
        "%%px --group-outputs order --targets 0,1\nimport time\ntime.sleep(0.3 * me)\n"
        "print('a', flush=True)\ntime.sleep(0.6 - 0.3 * me)\nprint('b', flush=True)",
    )
    assert res.success, res.error_in_exec
    areas = [d["text/plain"] for d in cell_outputs(cap)]
    assert areas == ["[stdout:0] a", "[stdout:1] a", "[stdout:0] b", "[stdout:1] b"] or areas == [
        "[stdout:0] a",
        "[stdout:1] a\nb",
        "[stdout:0] b",
    ], areas


# ---------------------------------------------------------------------- tracebacks (14.5)
def test_identical_tracebacks_collapse_by_default(ip, mec):
    cap, res = run(ip, "%%px\n1/0")
    assert isinstance(res.error_in_exec, CompositeError)
    out = cap.stdout
    assert "[0-3:execute]: \n" in out and "[1:execute]: \n" not in out, out
    assert re.search(r"the traceback of engine 0's In \[\d+\]; the same error on engines 1-3", out)
    for eid in mec.get_ids():
        mec.push({"me": eid}, targets=eid)
    cap, res = run(ip, "%%px\n1/0 if me < 2 else int('x')")  # different errors stay apart
    out = cap.stdout
    assert "[0-1:execute]: \n" in out and "[2-3:execute]: \n" in out, out
    cap, res = run(ip, "%%px --no-collapse\n1/0")
    out = cap.stdout
    assert all(f"[{e}:execute]: \n" in out for e in range(4)) and "[0-3:execute]" not in out
    assert re.search(r"the traceback of engine 2's In \[\d+\]\)", out)
    assert magics_of(ip).collapse is True


# ---------------------------------------------------------------------- a notebook (nbclient)
@pytest.mark.timeout(180)
def test_what_a_notebook_user_sees(cluster):
    """One notebook, run by nbclient in a real kernel against the session's cluster, and what
    its saved outputs hold."""
    import nbclient
    import nbformat
    from test_notebooks import ANSI, assert_clean_metadata, execute, make_nb

    nb = make_nb(
        [
            "%load_ext ipy_multiengine\nfrom ipy_multiengine import client\n"
            f"mec = client.MultiEngineClient({cluster.cluster_file!r}); mec.activate()\n"
            "mec.block = True; mec.progress_after = 0.1\n"
            "slow = lambda x: __import__('time').sleep(0.04) or x",
            "r = mec.map(slow, range(40), balanced=True)",
            "pr = mec.map(slow, range(40), block=False); pr.wait_interactive()",
            "%%px --targets 2,3\nimport matplotlib\n"
            "matplotlib.use('module://matplotlib_inline.backend_inline')\n"
            "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()",
            "%%px --targets 0,1\n1/0",
        ]
    )
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        execute(nb)
    balanced, interactive = nb.cells[1:3]
    for cell in (balanced, interactive):
        # progress: no stderr stream, no TqdmWarning, one display holding the final state
        assert not [o for o in cell.outputs if o.output_type == "stream"], cell.outputs
        assert "TqdmWarning" not in json.dumps(cell.outputs)
        bars = [o for o in cell.outputs if o.output_type == "display_data"]
        assert len(bars) == 1, cell.outputs
        html = bars[0].data["text/html"]
        assert "<progress" in html and "40/40 items" in html and "items/s" in html, html
        assert "40/40" in bars[0].data["text/plain"]
    # engine order, each figure right after a label naming its engine, with a rule above it
    fig = nb.cells[3].outputs
    assert [(o.metadata["engine"], "image/png" in o.data) for o in fig] == [
        (2, False),
        (2, True),
        (3, False),
        (3, True),
    ], fig
    for i, eid in ((0, 2), (2, 3)):
        assert fig[i].data["text/plain"] == f"[output:{eid}]", fig
        assert "border-top" in fig[i].data["text/html"], fig
    # engines that printed nothing left nothing: no blank output in any saved cell
    assert not [o for c in nb.cells for o in c.outputs if o.get("data") == {}], nb.cells
    # one traceback for two engines, naming them and the engine's In [n]
    tb = ANSI.sub("", "\n".join(nb.cells[4].outputs[-1].traceback))
    assert "[0-1:execute]: " in tb and re.search(
        r"engine 0's In \[\d+\]; the same error on engine 1", tb
    )
    assert_clean_metadata(nb)
    saved = nbformat.reads(nbformat.writes(nb), as_version=4)  # saved and reopened
    assert saved.cells[3].outputs == nb.cells[3].outputs


def _set_fast(mec, on: bool | list[bool]) -> list[bool]:
    """Set the engines' use of their fast sockets (off: the comm carries data), on the loop;
    returns what it was, to restore (``[]``: only that)."""

    async def flip():
        conns = list(mec._controller._engines.values())
        was = [c.fast for c in conns]
        if on != []:  # [] reads only
            for c, v in zip(conns, on if isinstance(on, list) else [on] * len(conns), strict=True):
                c.fast = v
        return was

    return _loop.run(flip(), timeout=10)


@pytest.mark.parametrize("path", ["fast socket", "comm"])
def test_plain_map_progress_moves_by_items_within_engine_blocks(mec, monkeypatch, capsys, path):
    """A plain (one block per engine) map's bar moves as items complete inside the blocks:
    each engine reports how far its block got (no extra round trip), not only at its end, on
    either data path."""
    from ipy_multiengine import render

    monkeypatch.setattr(render, "interactive", lambda: True)  # pytest's stderr is no terminal
    monkeypatch.setattr(mec, "progress_after", 0.05)
    was = _set_fast(mec, [])  # nothing changed: what it is
    assert all(was), "the session's engines have fast sockets"
    _set_fast(mec, path == "fast socket")
    try:
        # 4 blocks of 20 items, 0.04 s each: about 0.8 s per block
        assert mec.map(_slow, range(80)) == list(range(80))
    finally:
        _set_fast(mec, was)
    err = capsys.readouterr().err
    frames = [f for f in err.replace("\r", "\n").split("\n") if f.startswith("map:")]
    counts = {int(m) for f in frames for m in re.findall(r"(\d+)/80", f)}
    assert 80 in counts, frames
    inside = [c for c in counts if c % 20]  # not a whole number of blocks
    assert inside, f"the bar moved only as blocks completed: {sorted(counts)}"


@pytest.mark.parametrize("limit", [10**6, 100])
def test_px_cell_final_layout_keeps_frozen_parts_up_to_a_limit(monkeypatch, limit):
    """A ``%%px`` cell laid out again at its end shows its areas' frozen parts (past
    AREA_LIMIT) too; a cell that printed more than RELAYOUT_LIMIT is left as it was shown
    (not sent again whole), its empty reserved displays staying."""
    import IPython.display

    from ipy_multiengine import render

    sent: list[tuple[str | None, bool, dict]] = []
    cleared: list[bool] = []
    monkeypatch.setattr(
        render, "_display", lambda d, md, did=None, update=False: sent.append((did, update, d))
    )
    monkeypatch.setattr(IPython.display, "clear_output", lambda wait=False: cleared.append(wait))
    monkeypatch.setattr(render, "AREA_LIMIT", 50)
    monkeypatch.setattr(render, "RELAYOUT_LIMIT", limit)
    r = render.Renderer([0, 1], "stream", True, owns_cell=True)
    assert [(u, d) for _i, u, d in sent] == [(False, {})] * 6  # reserved: 3 per engine
    for i in range(4):
        r.handle(1, "stream", {"name": "stdout", "text": f"line {i} " + "y" * 30 + "\n"})
        r.tick(force=True)
    sent.clear()
    r.finish()
    if limit > 100:
        assert cleared == [True]
        text = "".join(d["text/plain"] for _i, _u, d in sent)
        assert all(f"line {i} " in text for i in range(4)), sent
        assert all(not u and d for _i, u, d in sent), sent  # shown again, nothing blank
    else:
        assert cleared == [] and sent == [], (cleared, sent)


def test_collected_areas_are_ruled_too(ip, mec):
    """``--no-stream`` output in a notebook: one labelled area per engine and stream, in
    engine order, each with the same visible rule above it as a live area."""
    magics_of(ip).notebook = True
    cap, res = run(ip, "%%px --no-stream --targets 1,2\nprint('x')")
    assert res.success, res.error_in_exec
    areas = cell_outputs(cap)
    assert [d["text/plain"] for d in areas] == ["[stdout:1] x", "[stdout:2] x"], areas
    assert all("border-top" in d["text/html"] for d in areas), areas


def test_px_cell_long_line_leaves_no_empty_labelled_area(ip, mec):
    """An engine printing one line longer than AREA_LIMIT: the line is frozen whole and
    nothing is left of it, so no area holding only its label (``[stdout:1] ``) is shown or
    saved after it."""
    from ipy_multiengine import render

    magics_of(ip).notebook = True
    cap, res = run(
        ip,
        f"%%px --targets 1\nprint('x' * {render.AREA_LIMIT + 100})\nimport sys; sys.stdout.flush()",
    )
    assert res.success, res.error_in_exec
    final = [d.get("text/plain", "") for d in cell_outputs(cap)]
    assert final and all(not re.fullmatch(r"\[std\w+:\d+\] ?", t) for t in final), [
        t[:20] for t in final
    ]
    assert "".join(final).count("x") == render.AREA_LIMIT + 100


@pytest.mark.parametrize("notebook", [False, True])
def test_collapse_keeps_an_engine_s_repeated_output(ip, mec, notebook):
    """``--no-stream --collapse``: an engine printing the same text twice (a display in
    between) keeps both; an engine's k-th block joins the other engines' k-th identical block,
    never an earlier block of its own (which lost the second text and labelled the first
    ``[stdout:0,0-1,1]``)."""
    magics_of(ip).notebook = notebook
    cap, res = run(
        ip,
        "%%px --no-stream --collapse --targets 0,1\nfrom IPython.display import display, HTML\n"
        "print('tick')\ndisplay(HTML('<b>x</b>'))\nprint('tick')",
    )
    assert res.success, res.error_in_exec
    if notebook:
        shown = [d["text/plain"] for d in cell_outputs(cap)]
        assert shown == [
            "[stdout:0-1] tick",
            "[output:0] <IPython.core.display.HTML object>",
            "[stdout:0-1] tick",
            "[output:1] <IPython.core.display.HTML object>",
        ], shown
    else:
        assert cap.stdout.splitlines() == ["[stdout:0-1] tick", "[stdout:0-1] tick"], cap.stdout
