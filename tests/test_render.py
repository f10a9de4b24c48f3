"""What a notebook or terminal user sees of %px output and progress (issue 14): the magics'
one wait, progress that counts items, labels of rich outputs, one area per engine in engine
order, collapsed tracebacks. Real engines (the session's cluster), a real ``InteractiveShell``."""

from __future__ import annotations

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
