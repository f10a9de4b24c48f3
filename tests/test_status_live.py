"""The live engine table in a notebook (issue 8): ``mec.status(live=True)`` displays an HTML table
once and updates that same output in place (``update_display_data`` with its display id) while a
later cell runs a long parallel command. Driven through a real notebook kernel over
jupyter_client, reading the IOPub messages a frontend would get."""

from __future__ import annotations

import re
import time

import pytest
from beyond_helpers import assert_gone
from faultlib import user_environ
from jupyter_client.manager import KernelManager

pytestmark = pytest.mark.timeout(120)


class Notebook:
    def __init__(self) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(
            extra_arguments=["--HistoryManager.hist_file=:memory:"], env=user_environ()
        )
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def send(self, code: str) -> str:
        return self.kc.execute(code)

    def messages(self, msg_id: str, until=None, timeout: float = 60, stop_at_idle: bool = True):
        """IOPub messages of request ``msg_id`` until its idle status (or ``until(msg)`` is
        true)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.01))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                raise AssertionError("\n".join(msg["content"]["traceback"]))
            yield msg
            if until is not None and until(msg):
                return
            if (
                stop_at_idle
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                return

    def run(self, code: str) -> list[dict]:
        msg_id = self.send(code)
        msgs = list(self.messages(msg_id))
        errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
        assert not errors, "\n".join(errors[0]["traceback"])
        return msgs

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


@pytest.fixture
def notebook():
    nb = Notebook()
    yield nb
    nb.close()


def html_of(msg: dict) -> str:
    return msg["content"]["data"].get("text/html", "")


def test_status_table_updates_in_place_during_a_long_px(notebook, tmp_path):
    flag = tmp_path / "go"
    msgs = notebook.run(
        "from ipy_multiengine import Cluster\n"
        "cl = Cluster(n=2, profile='live-status')\nmec = cl.start()\n"
        "print('PIDS', [e['pid'] for e in mec.engines])\n"
        "live = mec.status(live=True, interval=0.05)"
    )
    pids = [
        int(p)
        for m in msgs
        if m["msg_type"] == "stream" and "PIDS" in m["content"]["text"]
        for p in re.findall(r"\d+", m["content"]["text"].split("PIDS", 1)[1])
    ]
    shown = [m for m in msgs if m["msg_type"] == "display_data"]
    assert len(shown) == 1, [m["msg_type"] for m in msgs]
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert html_of(shown[0]).startswith("<table") and ">idle</td>" in html_of(shown[0])
    assert "id  group" in shown[0]["content"]["data"]["text/plain"]  # the terminal form too
    try:
        # a long parallel command in the next cell: the table shows the engines busy meanwhile
        cell = notebook.send(
            f'r = mec.execute("import os, time\\n'
            f'while not os.path.exists({str(flag)!r}): time.sleep(0.01)")'
        )
        updates = []

        def busy_on_both(msg):
            if msg["msg_type"] == "update_display_data":
                updates.append(msg)
                return html_of(msg).count(">busy</td>") == 2
            return False

        list(notebook.messages(cell, until=busy_on_both))
        assert updates and all(
            u["content"]["transient"]["display_id"] == display_id for u in updates
        )
        busy = html_of(updates[-1])
        assert "import os, time while not os.path.exist…" in busy  # what each engine runs
        assert re.search(r"<td>\d+\.\d s</td>", busy)  # and for how long
        flag.touch()
        # the table keeps following the engines after the cell is done (same parent until the next
        # cell)
        rest = list(
            notebook.messages(
                cell,
                until=lambda m: (
                    m["msg_type"] == "update_display_data" and html_of(m).count(">idle</td>") == 2
                ),
                stop_at_idle=False,
            )
        )
        assert ">busy</td>" not in html_of(rest[-1])
        assert not [
            m for m in rest if m["msg_type"] == "display_data"
        ]  # updated, never re-displayed
    finally:
        flag.touch()
        out = notebook.run("live.stop(); print(live.updates); cl.stop()")
    printed = [m for m in out if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"]
    assert int(printed[0]["content"]["text"]) >= 2
    assert_gone(pids)


def test_status_live_outside_a_kernel_is_a_plain_table():
    from ipy_multiengine import status
    from ipy_multiengine.render import in_notebook

    class FakeClient:  # status.show only needs a client for the snapshot
        pass

    assert in_notebook() is False
    calls = []
    orig = status.status
    status.status = lambda c: calls.append(c) or "table"
    try:
        assert status.show(FakeClient(), live=True) == "table"
    finally:
        status.status = orig
    assert len(calls) == 1


def test_h10_o13_o14_notebook_rendering_in_a_real_kernel(notebook):
    """In a real notebook kernel: apply/map output shows as labelled display areas, a
    clear_output(wait=True) + display loop is one output per engine updated in place, and
    pager text is a labelled display."""
    msgs = notebook.run(
        "from ipy_multiengine import Cluster\n"
        "cl = Cluster(n=2, profile='nb-render')\nmec = cl.start().activate()\n"
        "print('PIDS', [e['pid'] for e in mec.engines])\n"
        "%load_ext ipy_multiengine"
    )
    pids = [
        int(p)
        for m in msgs
        if m["msg_type"] == "stream" and "PIDS" in m["content"]["text"]
        for p in re.findall(r"\d+", m["content"]["text"].split("PIDS", 1)[1])
    ]
    try:

        def final_outputs(msgs):
            """The cell's outputs as a frontend keeps them: updates replace by display_id,
            clear_output(wait=True) clears before the next output; empty displays (a %%px
            cell's reserved places) show nothing."""
            cell: list = []
            clear = False
            for m in msgs:
                c = m["content"]
                did = (c.get("transient") or {}).get("display_id")
                if m["msg_type"] == "clear_output":
                    if c.get("wait"):
                        clear = True
                    else:
                        cell = []
                elif m["msg_type"] in ("display_data", "stream", "execute_result", "error"):
                    if clear:
                        cell, clear = [], False
                    cell.append([did, c])
                elif m["msg_type"] == "update_display_data":
                    for entry in cell:
                        if entry[0] == did:
                            entry[1] = c
            return [c for _, c in cell if c.get("data", True)]

        msgs = notebook.run("r = mec.map(lambda x: print('item', x) or x, range(2))")
        texts = sorted(c["data"]["text/plain"] for c in final_outputs(msgs))
        assert texts == ["[stdout:0] item 0", "[stdout:1] item 1"], texts
        assert all(c["metadata"]["engine"] in (0, 1) for c in final_outputs(msgs))

        msgs = notebook.run(
            "%%px\nfrom IPython.display import display, clear_output, HTML\n"
            "for i in range(5):\n    clear_output(wait=True)\n    display(HTML(f'<b>frame "
            "{i}</b>'))"
        )
        # five frames per engine, each cleared: what stays is one labelled frame per engine,
        # in engine order, and the displays sent do not grow with the frames (in place)
        shown = [
            c["data"].get("text/html", c["data"].get("text/plain")) for c in final_outputs(msgs)
        ]
        frames = [t for t in shown if "frame" in t]
        labels = [t for t in shown if "[output:" in t]
        assert len(frames) == 2 and all("frame 4" in t for t in frames), shown
        order = [0 if "[output:0]" in t else 1 for t in labels]
        assert order == sorted(order) and set(order) == {0, 1}, shown  # labelled, engine order
        # frames replace each other in place (update_display_data): a new display of a frame
        # only in the final layout, one per engine, not one per frame
        added = [
            m
            for m in msgs
            if m["msg_type"] == "display_data"
            and "frame" in m["content"]["data"].get("text/html", "")
        ]
        assert len(added) == 2, [m["content"]["data"] for m in added]

        msgs = notebook.run("%%px --targets 0\n%pdoc len")
        pages = [
            c
            for c in final_outputs(msgs)
            if "Return the number of items" in c["data"].get("text/plain", "")
        ]
        assert len(pages) == 1 and pages[0]["metadata"]["engine"] == 0
        assert pages[0]["data"]["text/plain"].startswith("[output:0]")
    finally:
        notebook.run("cl.stop()")
    assert_gone(pids)
