"""What a notebook or terminal user sees of %px output and progress (issue 14): the magics'
one wait, progress that counts items, labels of rich outputs, one area per engine in engine
order, collapsed tracebacks. Real engines (the session's cluster), a real ``InteractiveShell``."""

from __future__ import annotations

import json
import re
import time

import pytest
from IPython.utils.capture import capture_output

from ipy_multiengine import _loop

pytestmark = pytest.mark.timeout(60)


def magics_of(ip):
    return ip.magics_manager.registry["ParallelMagics"]


def run(ip, cell):
    with capture_output() as cap:
        res = ip.run_cell(cell)
    return cap, res


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
    assert mec.map(_slow, range(60), balanced=True) == list(range(60))
    err = capsys.readouterr().err
    frames = [f for f in err.replace("\r", "\n").split("\n") if f.startswith("map:")]
    counts = {int(m) for f in frames for m in re.findall(r"(\d+)/60", f)}
    assert {0, 60} & counts or counts, frames
    assert len([c for c in counts if 0 < c < 60]) >= 2, frames  # it moved through items
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


def test_wait_interactive_honours_timeout(mec, capsys):
    pr = mec.execute("import time; time.sleep(1.5)", block=False)
    started = time.monotonic()
    assert pr.wait_interactive(timeout=0.3) is False
    assert time.monotonic() - started < 1.2
    assert "0/4" in capsys.readouterr().err
    assert pr.wait_interactive(timeout=30) is True


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


# ---------------------------------------------------------------------- a notebook (nbclient)
@pytest.mark.timeout(180)
def test_what_a_notebook_user_sees(cluster):
    """One notebook, run by nbclient in a real kernel against the session's cluster, and what
    its saved outputs hold."""
    from test_notebooks import assert_clean_metadata, execute, make_nb

    nb = make_nb(
        [
            "%load_ext ipy_multiengine\nfrom ipy_multiengine import client\n"
            f"mec = client.MultiEngineClient({cluster.cluster_file!r}); mec.activate()\n"
            "mec.block = True; mec.progress_after = 0.1\n"
            "slow = lambda x: __import__('time').sleep(0.04) or x",
            "r = mec.map(slow, range(40), balanced=True)",
            "pr = mec.map(slow, range(40), block=False); pr.wait_interactive()",
        ]
    )
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
    assert_clean_metadata(nb)
