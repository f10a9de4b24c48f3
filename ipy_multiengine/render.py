"""Engine output -> terminal text or notebook displays, for the magics.

``Renderer`` shows one command's outputs live (``stream``), grouped when every engine is done
(``collect``), or next to the tutorial's Results List (``results``): ``[stdout:N]`` prefixed
lines in a terminal, one display area per engine and stream, updated in place, in a notebook.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C module: no enum wrapping (7x faster)
import contextlib
import logging
import re
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .targets import engine_range

#: Seconds between in-place updates of a notebook display area (output is coalesced).
UPDATE_INTERVAL = 0.1
#: Characters after which a notebook stream area is frozen and a new one started, so that
#: in-place updates stay small however much an engine prints.
AREA_LIMIT = 16384
#: Characters of frozen areas a ``%%px`` cell keeps to lay itself out again at its end; a
#: cell printing more is left as shown (its unused reserved displays stay, empty).
RELAYOUT_LIMIT = 4 * 1024 * 1024
#: Engines' display ids remembered for updates from later cells (the oldest are forgotten).
SHOWN_LIMIT = 1024

#: (engine, the engine's display_id) -> the local display ids showing it, in any cell so far:
#: ``h = display(x, display_id=True)`` in one cell and ``h.update(y)`` in a later one updates
#: that engine's output, as in a notebook kernel. Used in the user's thread only.
_shown: OrderedDict[tuple[Any, str], list[str]] = OrderedDict()
_shown_lock = threading.Lock()  # two user threads may render at once (a live output, a %px)


def _remember(eid: Any, remote_id: str, local_id: str) -> None:
    with _shown_lock:
        _shown.setdefault((eid, remote_id), []).append(local_id)
        _shown.move_to_end((eid, remote_id))
        while len(_shown) > SHOWN_LIMIT:
            _shown.popitem(last=False)


def _showing(eid: Any, remote_id: str | None) -> list[str]:
    """The local display ids showing engine ``eid``'s display ``remote_id`` (any cell)."""
    if remote_id is None:
        return []
    with _shown_lock:
        return list(_shown.get((eid, remote_id), ()))


def _forget(eid: Any, prefix: str) -> None:
    """``clear_output`` of ``eid`` in the cell whose local ids start with ``prefix``: those
    displays are gone and cannot be updated; the engine's displays in other cells stay."""
    with _shown_lock:
        for key in [k for k in _shown if k[0] == eid]:
            kept = [i for i in _shown[key] if not i.startswith(prefix)]
            if kept:
                _shown[key] = kept
            else:
                del _shown[key]


def _display(
    bundle: dict, metadata: dict, display_id: str | None = None, update: bool = False
) -> Any:
    from IPython.display import display, update_display

    if update:
        update_display(bundle, raw=True, metadata=metadata, display_id=display_id)
        return None
    if display_id is not None:
        return display(bundle, raw=True, metadata=metadata, display_id=display_id)
    display(bundle, raw=True, metadata=metadata)
    return None


def _labelled(data: dict, metadata: dict | None, eid: Any, label: str) -> tuple[dict, dict]:
    """A copy of a mime bundle labelled with its engine: ``metadata.engine`` at the top level
    and in every mime type's metadata, and a visible ``label`` in text/plain and text/html."""
    data = dict(data)
    md = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (metadata or {}).items()}
    md["engine"] = eid
    for mime in data:
        sub = md.get(mime)
        md[mime] = dict(sub, engine=eid) if isinstance(sub, dict) else {"engine": eid}
    plain = data.get("text/plain")
    if isinstance(plain, str):
        data["text/plain"] = f"{label} " + ("\n" if "\n" in plain else "") + plain
    html = data.get("text/html")
    if isinstance(html, str):
        data["text/html"] = (
            f'<div class="ipy-multiengine-label" style="font-size:smaller;opacity:0.6">'
            f"{label}</div>\n{html}"
        )
    return data, md


#: The rule above every engine area and label in a notebook (text/html; text/plain is the same
#: text without it). An area whose text has ANSI escapes stays text/plain only, so that the
#: frontend renders its colours.
_RULE = "border-top:1px solid rgba(127,127,127,0.45);margin:2px 0 0 0;padding:2px 0 0 0"


def _text_bundle(text: str, cls: str = "ipy-multiengine-area") -> dict:
    """``text`` as a notebook shows an engine's area or label: text/plain, and text/html with
    a rule above it that separates it from the previous engine's output."""
    if "\x1b" in text:
        return {"text/plain": text}
    return {
        "text/plain": text,
        "text/html": f'<pre class="{cls}" style="{_RULE}">{_escape(text)}</pre>',
    }


def _is_rich(data: dict) -> bool:
    """A frontend shows something other than text/plain (a figure, HTML, a DataFrame)."""
    return not set(data) <= {"text/plain"}


def _label_line(label: str, data: dict) -> None:
    """In a notebook, a rich output (a figure, HTML, a DataFrame) shows its engine in a stream
    line before it (``[output:2]``), as ipyparallel prints: the frontend shows the richest mime
    type, never the labelled text/plain alternative. Plain-text outputs carry their label."""
    if not _is_rich(data):
        return
    sys.stdout.write(label + "\n")
    sys.stdout.flush()  # before the display: the kernel sends stream and display in this order


class Lines:
    """Terminal-like text: ``\\n`` starts a line, ``\\r`` makes the next text overwrite the line."""

    def __init__(self) -> None:
        self.lines: list[str] = [""]
        self._cr = False

    def write(self, text: str) -> None:
        for piece in re.split(r"(\r\n|\n|\r)", text):
            if piece in ("\n", "\r\n"):
                self.lines.append("")
                self._cr = False
            elif piece == "\r":
                self._cr = True
            elif piece:
                if self._cr:
                    self.lines[-1] = ""
                    self._cr = False
                self.lines[-1] += piece

    def text(self) -> str:
        return "\n".join(self.lines)

    def pop_complete(self) -> list[str]:
        done, self.lines = self.lines[:-1], self.lines[-1:]
        return done


def one_line(exc: BaseException) -> BaseException:
    """Make IPython show ``exc`` as one line, without the magic's own frames."""

    def render() -> list[str]:
        return [f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__]

    exc._render_traceback_ = render  # type: ignore[attr-defined]
    return exc


# ---------------------------------------------------------------------- rendering
@dataclass
class _Area:
    """One engine's text display area in a notebook (its stdout and stderr, each run of one
    stream labelled ``[stdout:N]`` / ``[stderr:N]``), updated in place."""

    eid: int
    segments: list[list[Any]] = field(default_factory=list)  # [stream name, Lines]
    handle_id: str | None = None
    shown: str = ""
    last: float = 0.0
    count: int = 0
    #: what was frozen out of it (past AREA_LIMIT), in order: (data, metadata) of each
    frozen: list[tuple[dict, dict]] = field(default_factory=list)
    #: a late ``clear_output(wait=True)`` of its engine: emptied when its next late text comes
    clear_waiting: bool = False

    def write(self, name: str, text: str) -> None:
        if not self.segments or self.segments[-1][0] != name:
            self.segments.append([name, Lines()])
        self.segments[-1][1].write(text)

    def tail_name(self) -> str | None:
        return self.segments[-1][0] if self.segments else None

    @staticmethod
    def render(eid: int, segments: list[list[Any]]) -> str:
        parts = []
        for name, lines in segments:
            text = lines.text()
            text = text[:-1] if text.endswith("\n") else text  # a final newline adds no line
            stream, _, mark = name.partition(" ")  # "stdout late": printed after it finished
            parts.append(f"[{stream}:{eid}{' ' + mark if mark else ''}] {text}")
        return "\n".join(parts)

    def text(self) -> str:
        """What the area shows; "" when nothing is left in it (e.g. a long line frozen whole:
        an area holding only its label is not shown)."""
        if all(not lines.text().rstrip("\n") for _name, lines in self.segments):
            return ""
        return self.render(self.eid, self.segments)

    def split(self) -> str:
        """Take the complete lines out (returned as text to freeze), keeping the last one."""
        name, last = self.segments[-1]
        if len(last.lines) > 1:
            done = [*self.segments[:-1], [name, Lines()]]
            done[-1][1].lines = [*last.lines[:-1], ""]
            last.lines = last.lines[-1:]
            self.segments = [[name, last]]
        else:
            done, self.segments = self.segments, []
        return self.render(self.eid, done)

    def bundle(self, text: str) -> tuple[dict, dict]:
        names = [seg[0].partition(" ")[0] for seg in self.segments] or ["stdout"]
        return (
            _text_bundle(text),
            {
                "engine": self.eid,
                "stream": names[0],
                "streams": sorted(set(names)),
                "text/plain": {"engine": self.eid},
            },
        )


@dataclass
class _Item:
    """A rich output or result of an engine shown in this cell (``owns_cell``), as it is now."""

    local_id: str | None
    label: str | None  # shown in a label display before it (a rich bundle), else in its text
    data: dict
    md: dict
    cleared: bool = False


class Renderer:
    """Shows one command's outputs: live (``stream``), grouped at the end, or tutorial-style.

    ``handle`` is called in the user's thread for each (engine, msg_type, content) event;
    ``tick`` flushes throttled notebook updates; ``finish`` shows whatever is left.
    """

    def __init__(
        self,
        eids: list[int],
        mode: str,
        notebook: bool,
        group: str = "engine",
        collapse: bool = False,
        owns_cell: bool = False,
        shown_before: str = "",
        displays_before: list[tuple[dict, dict]] | None = None,
    ) -> None:
        """``owns_cell``: every output of the notebook cell from now on is this renderer's (a
        ``%%px`` cell): its layout is reserved at the start and laid out again at the end.
        ``shown_before``: stderr text the cell showed before (the magic's own notice), shown
        again first when the cell is laid out again, which clears it; ``displays_before``:
        displays it showed before (earlier commands' late output), shown again after it."""
        self.eids = eids
        self.mode = mode  # 'stream' | 'collect' | 'results'
        self.notebook = notebook
        self.group = group
        self.collapse = collapse
        self.events: list[tuple[int, str, dict]] = []
        self._prompted: dict[int, int] = {}  # per engine, events seen by its last prompt
        self.areas: dict[Any, _Area] = {}  # by engine, or by chunk (group 'order')
        self._chunks = 0
        self.partial: dict[tuple[int, str], Lines] = {}
        self.rich_ids: dict[int, list[str]] = {}  # an engine's displays shown now (local ids)
        self.free: dict[int, list[str]] = {}  # an engine's cleared displays, reused in order
        self.clear_waiting: set[int] = set()  # engines whose clear_output(wait=True) is pending
        self._uid = f"ipme-{id(self):x}-{time.monotonic_ns():x}"
        self._count = 0
        #: the stream areas shown one after another since the last other output: kept in
        #: engine order (an engine's first area takes its place among them, not the end)
        self._run: list[_Area] = []
        #: the cell's own layout (``owns_cell``): per engine, displays reserved at the start in
        #: engine order -- [its text area, a label, its first rich output] -- filled in place
        self.slots: dict[int, list[str | None]] = {}
        self.items: dict[int, list[_Item]] = {}  # each engine's rich outputs and results
        self._moved = False  # something is shown out of the cell's layout (re-laid at the end)
        self.foreign = False  # something else was shown in the cell: it is not re-laid
        self._kept = 0  # characters of frozen areas kept for the final layout
        self.shown_before = shown_before
        self.displays_before = list(displays_before or [])
        #: progress bars shown in the cell (below its reserved displays): the final layout
        #: shows each again, in its last state, at the end, where it was
        self.bars: list[ProgressBar] = []
        if owns_cell and notebook and mode == "stream" and group != "order":
            self._reserve()

    # -- events
    def handle(self, eid: int, mtype: str, content: dict) -> None:
        if self.mode != "stream":
            self.events.append((eid, mtype, content))
            return
        if eid in self.clear_waiting and mtype in ("stream", "display_data", "execute_result"):
            self._clear_now(eid, deferred=True, reuse=mtype == "display_data")
        if mtype == "stream":
            self._stream(eid, content.get("name", "stdout"), content.get("text", ""))
        elif mtype in ("display_data", "update_display_data"):
            self._rich(eid, content, update=mtype == "update_display_data")
        elif mtype == "execute_result":
            self._result(eid, content)
        elif mtype == "clear_output":
            self._clear(eid, bool(content.get("wait")))
        # 'error' messages are shown once, by the CompositeError raised at the end

    def tick(self, force: bool = False) -> None:
        if not self.notebook:
            return
        now = time.monotonic()
        for area in self.areas.values():
            if force or now - area.last >= UPDATE_INTERVAL:
                self._flush_area(area, now)

    def before_prompt(self, eid: int) -> str:
        """Engine ``eid`` asks for input: what it printed before is shown first. Live: its
        line still without a newline (a terminal), every coalesced area update (a notebook);
        collected: its stream text since its last prompt is returned, for the prompt to show
        (it is shown again at the end, as a plain ``mec.execute``'s is in its result)."""
        if self.mode == "stream":
            if self.notebook:
                self.tick(force=True)
            else:
                self._flush_partial(eid)
            return ""
        start = self._prompted.get(eid, 0)
        self._prompted[eid] = len(self.events)
        return "".join(
            c.get("text", "") for e, t, c in self.events[start:] if e == eid and t == "stream"
        )

    def finish(self) -> None:
        """Show what is left: pending partial lines (stream), or every output (collect/results)."""
        if self.mode == "stream":
            self.tick(force=True)
            for (eid, name), lines in self.partial.items():
                if lines.lines[-1]:
                    self._print_lines(eid, name, [lines.lines[-1]])
                    lines.lines[-1] = ""
            if self.slots:
                self._relayout()
            return
        self._render_collected()

    # -- the cell's own layout (owns_cell)
    def _keep(self, area: _Area, data: dict, md: dict) -> None:
        """Keep a frozen part of an area for the final layout (up to RELAYOUT_LIMIT
        characters in all: past it, the cell is not laid out again, its parts not kept)."""
        if not self.slots or self.foreign:
            return
        self._kept += len(data["text/plain"])
        if self._kept > RELAYOUT_LIMIT:
            self.foreign = True
            for a in self.areas.values():
                a.frozen = []
            return
        area.frozen.append((data, md))

    def _reserve(self) -> None:
        """Reserve every target engine's displays, in engine order, before any output: empty
        (no mime type, so a frontend shows nothing), each filled in place when its engine shows
        something, so that live output never moves."""
        from . import stdin

        self._asked = stdin.asked
        self._late = _late_shown[0]
        for eid in self.eids:
            ids: list[str | None] = [f"{self._uid}-{eid}-{kind}" for kind in ("a", "l", "r")]
            for did in ids:
                _display({}, {}, did)
            self.slots[eid] = ids

    def _relayout(self) -> None:
        """The cell's final state: every engine's area, then its rich outputs and results,
        each after its label, in engine order; no reserved display left empty. A frontend
        cannot remove one output, so the cell is cleared (when its next output arrives: no
        flicker) and shown again, its progress bar last -- unless something else was shown in
        it meanwhile (an engine's prompt), which clearing would lose."""
        from IPython.display import clear_output

        from . import stdin

        if self.foreign or stdin.asked != self._asked or _late_shown[0] != self._late:
            return  # (an engine's prompt, earlier commands' late output: kept where they are)
        shown: list[tuple[dict, dict, str | None]] = []
        for eid in self.eids:
            area = self.areas.get(eid)
            if area is not None:
                shown.extend((data, md, None) for data, md in area.frozen)
                text = area.text()
                if text:
                    shown.append((*area.bundle(text), area.handle_id))
            for item in self.items.get(eid, []):
                if item.cleared:
                    continue
                if item.label:
                    shown.append((*self._label_bundle(eid, item.label), None))
                shown.append((item.data, item.md, item.local_id))
        for bar in self.bars:
            if bar.html is not None and bar.html.data:  # it keeps its id: later draws update it
                shown.append((bar.html.data, {}, bar.html.display_id))
        self.slots = {}
        clear_output(wait=bool(shown or self.shown_before or self.displays_before))
        if self.shown_before:
            sys.stderr.write(self.shown_before)
            sys.stderr.flush()  # before the displays: the kernel sends them in this order
        for data, md in self.displays_before:
            _display(data, md)
        for data, md, did in shown:
            _display(data, md, did)

    @staticmethod
    def _label_bundle(eid: int, label: str) -> tuple[dict, dict]:
        return _text_bundle(label, "ipy-multiengine-label"), {"engine": eid}

    def _show_item(
        self, eid: int, data: dict, md: dict, label: str, local_id: str | None
    ) -> str | None:
        """Show a rich output or result of ``eid`` (``label`` before a rich bundle): in the
        engine's reserved displays when they are free, else after everything (laid out again
        at the end). Returns the local display id (``local_id``, or the reserved one)."""
        rich = _is_rich(data)
        slot = self.slots.get(eid)
        if slot and slot[2] is not None:
            label_id, local_id, slot[1], slot[2] = slot[1], slot[2], None, None
            if rich:
                _display(*self._label_bundle(eid, label), label_id, update=True)
            _display(data, md, local_id, update=True)
        else:
            self._run = []  # areas of engines printing later go below this display
            _label_line(label, data)
            _display(data, md, local_id)
        if self.slots:
            self.items.setdefault(eid, []).append(
                _Item(local_id, label if rich else None, data, md)
            )
        return local_id

    # -- live stream output
    def _stream(self, eid: int, name: str, text: str) -> None:
        if not text:
            return
        if self.notebook:
            area = self._area(eid, name)
            new = not area.segments and area.handle_id is None
            area.write(name, text)
            if new and self.group != "order" and not self.slots:
                self._place(area)
            elif area.handle_id is None or not area.shown:
                self._flush_area(area, time.monotonic())
            return
        lines = self.partial.setdefault((eid, name), Lines())
        lines.write(text)
        self._print_lines(eid, name, lines.pop_complete())

    def _area(self, eid: int, name: str) -> _Area:
        """The area ``eid``'s ``name`` text goes to: the engine's own area, or with group
        'order' the last area when it holds this engine and stream, else a new one (arrival
        order, one label per chunk)."""
        if self.group != "order":
            area = self.areas.get(eid)
            if area is None:
                area = self.areas[eid] = _Area(eid)
                slot = self.slots.get(eid)
                if slot and slot[0] is not None:  # the display reserved for it
                    area.handle_id, slot[0] = slot[0], None
            return area
        area = self.areas.get(self._chunks)
        if area is None or area.eid != eid or area.tail_name() not in (None, name):
            self._chunks += 1
            area = self.areas[self._chunks] = _Area(eid)
        return area

    def _place(self, area: _Area) -> None:
        """Show a new engine area in engine order among the areas shown just before it: a new
        display at the end, then the run's contents reassigned to its displays, sorted."""
        order = {e: i for i, e in enumerate(self.eids)}
        self._flush_area(area, time.monotonic())  # a display of its own, at the end
        run = [*self._run, area]
        ids = [a.handle_id for a in run]
        run.sort(key=lambda a: order.get(a.eid, len(order)))
        for a, handle in zip(run, ids, strict=True):
            if a.handle_id != handle:
                a.handle_id, a.shown = handle, None  # type: ignore[assignment]
                self._flush_area(a, time.monotonic())
        self._run = run

    def _print_lines(self, eid: Any, name: str, lines: list[str]) -> None:
        if not lines:
            return
        out = sys.stderr if name == "stderr" else sys.stdout
        label = f"[{name}:{eid}] "
        with bars_cleared(out):  # a progress bar on the terminal: above it, not after it
            out.write("".join(label + line + "\n" for line in lines))
            out.flush()

    def _flush_area(self, area: _Area, now: float) -> None:
        text = area.text()
        if text == area.shown and area.handle_id is not None:
            return
        if not text and area.handle_id is None:  # e.g. all of it frozen by a split: no blank
            area.last = now
            return
        if len(text) > AREA_LIMIT:
            # freeze the complete lines in the current area and continue in a fresh one; one
            # long line without a newline (dots printed with end='') is cut there, else each
            # update would send the whole line again
            data, md = area.bundle(area.split())
            self._keep(area, data, md)
            if area.handle_id is None:
                _display(data, md)
            else:
                _display(data, md, area.handle_id, update=True)
            area.handle_id, area.shown = None, ""
            self._run = []  # it goes on in a new display at the end
            text = area.text()
            if not text:
                area.last = now
                return
        data, md = area.bundle(text)
        if area.handle_id is None:
            area.count += 1
            area.handle_id = f"{self._uid}-{area.eid}-{area.count}"
            _display(data, md, area.handle_id)
        else:
            _display(data, md, area.handle_id, update=True)
        area.shown, area.last = text, now

    # -- rich outputs
    def _rich(self, eid: int, content: dict, update: bool = False) -> None:
        data, md = _labelled(
            content.get("data") or {}, content.get("metadata"), eid, f"[output:{eid}]"
        )
        remote_id = (content.get("transient") or {}).get("display_id")
        if not self.notebook:
            if update:
                return  # a terminal cannot update what it printed
            self._flush_partial(eid)
            _display(data, md)
            return
        self.tick(force=True)  # keep text printed before this display above it
        if update:
            showing = _showing(eid, remote_id)
            for local_id in showing:
                _display(data, md, local_id, update=True)
            for item in self.items.get(eid, []):
                if item.local_id in showing:
                    item.data, item.md = data, md
            return
        free = self.free.get(eid)
        if free:  # after clear_output: this display takes the place of a cleared one, in place
            local_id = free.pop(0)
            _display(data, md, local_id, update=True)
            for item in self.items.get(eid, []):
                if item.local_id == local_id:
                    item.data, item.md, item.cleared = data, md, False
        else:
            self._count += 1
            local_id = f"{self._uid}-{eid}-r{self._count}"
            local_id = self._show_item(eid, data, md, f"[output:{eid}]", local_id) or local_id
        self.rich_ids.setdefault(eid, []).append(local_id)
        if remote_id is not None:
            _remember(eid, remote_id, local_id)

    def _result(self, eid: int, content: dict) -> None:
        count = content.get("execution_count")
        data, md = _labelled(
            content.get("data") or {}, content.get("metadata"), eid, f"Out[{eid}:{count}]:"
        )
        md["execution_count"] = count
        if not self.notebook:
            self._flush_partial(eid)
            _display(data, md)
        else:
            self.tick(force=True)
            self._show_item(eid, data, md, f"Out[{eid}:{count}]:", None)

    def _clear(self, eid: int, wait: bool = False) -> None:
        """An engine's ``clear_output``: empty that engine's areas (others' stay). With
        ``wait=True`` the clearing waits for that engine's next output, which then takes the
        cleared output's place (a ``clear_output(wait=True)`` + ``display`` loop is one output)."""
        if not self.notebook:
            return
        if wait:
            self.clear_waiting.add(eid)
        else:
            self._clear_now(eid)

    def _clear_now(self, eid: int, deferred: bool = False, reuse: bool = False) -> None:
        self.clear_waiting.discard(eid)
        for area in self.areas.values():
            if area.eid == eid:
                area.segments, area.frozen = [], []
                if not deferred:  # else the output that is arriving fills it at the next tick
                    self._flush_area(area, time.monotonic())
        _forget(eid, self._uid)  # a cleared display cannot be updated any more
        slots = self.free.setdefault(eid, [])
        cleared = self.rich_ids.pop(eid, [])
        for item in self.items.get(eid, []):
            item.cleared = item.cleared or item.local_id in cleared
        for i, local_id in enumerate(cleared):
            if not (reuse and i == 0 and not slots):  # the display arriving now reuses this one
                _display({"text/plain": ""}, {"engine": eid}, local_id, update=True)
        slots.extend(cleared)

    def _flush_partial(self, eid: int) -> None:
        for (e, name), lines in self.partial.items():
            if e == eid and lines.lines[-1]:
                self._print_lines(eid, name, [lines.lines[-1]])
                lines.lines[-1] = ""

    # -- grouped output at the end
    def _render_collected(self) -> None:
        blocks = self._blocks()
        if self.mode == "results":  # stdout, stderr, results, pager text: in the Results List
            blocks = [
                b
                for b in blocks
                if b[1] in ("display_data", "update_display_data")
                and not (b[2].get("metadata") or {}).get("pager")
            ]
        if self.collapse:
            blocks = _collapse(blocks)
        for eids, kind, payload in blocks:
            label = engine_range(eids)
            if kind in ("stdout", "stderr"):
                text = payload.rstrip("\n") if not self.notebook else payload
                if self.notebook:
                    text = text[:-1] if text.endswith("\n") else text
                    data = _text_bundle(f"[{kind}:{label}] {text}")
                    _display(
                        data,
                        {
                            "engine": eids[0] if len(eids) == 1 else eids,
                            "stream": kind,
                            "text/plain": {"engine": eids[0] if len(eids) == 1 else eids},
                        },
                    )
                else:
                    lines = Lines()
                    lines.write(text)
                    self._print_lines(label, kind, lines.lines)
            elif kind in ("display_data", "update_display_data"):
                eid = eids[0] if len(eids) == 1 else eids
                data, md = _labelled(
                    payload.get("data") or {}, payload.get("metadata"), eid, f"[output:{label}]"
                )
                remote_id = (payload.get("transient") or {}).get("display_id")
                if kind == "update_display_data":  # of a display shown in an earlier cell
                    if self.notebook:
                        for local_id in _showing(eid, remote_id):
                            _display(data, md, local_id, update=True)
                elif self.notebook and remote_id is not None and len(eids) == 1:
                    self._count += 1
                    local_id = f"{self._uid}-{eid}-r{self._count}"
                    _label_line(f"[output:{label}]", data)
                    _display(data, md, local_id)
                    _remember(eid, remote_id, local_id)
                else:
                    if self.notebook:
                        _label_line(f"[output:{label}]", data)
                    _display(data, md)
            elif kind == "execute_result":
                count = payload.get("execution_count")
                eid = eids[0] if len(eids) == 1 else eids
                data, md = _labelled(
                    payload.get("data") or {},
                    payload.get("metadata"),
                    eid,
                    f"Out[{label}:{count}]:",
                )
                md["execution_count"] = count
                if self.notebook:
                    _label_line(f"Out[{label}:{count}]:", data)
                _display(data, md)

    def _blocks(self) -> list[tuple[list[int], str, Any]]:
        """Outputs as (engines, kind, payload), grouped by engine, arrival order or type."""
        merged: list[list[Any]] = []  # [eid, kind, payload]
        for eid, mtype, content in self.events:
            if mtype == "stream":
                kind = "stderr" if content.get("name") == "stderr" else "stdout"
                text = content.get("text", "")
                # merge with the last block of the same engine and stream unless something
                # else of that engine came in between
                for blk in reversed(merged):
                    if blk[0] == eid:
                        if blk[1] == kind:
                            blk[2] += text
                            text = None
                        break
                if text is not None:
                    merged.append([eid, kind, text])
            elif mtype in ("display_data", "execute_result"):
                merged.append([eid, mtype, content])
            elif mtype == "update_display_data":  # collected output shows the final content
                did = (content.get("transient") or {}).get("display_id")
                found = False
                for blk in merged:
                    if (
                        blk[0] == eid
                        and blk[1] == "display_data"
                        and did is not None
                        and (blk[2].get("transient") or {}).get("display_id") == did
                    ):
                        blk[2] = dict(
                            blk[2], data=content.get("data"), metadata=content.get("metadata")
                        )
                        found = True
                if not found and did is not None:  # a display of an earlier cell
                    merged = [
                        b
                        for b in merged
                        if not (
                            b[0] == eid
                            and b[1] == mtype
                            and (b[2].get("transient") or {}).get("display_id") == did
                        )
                    ]
                    merged.append([eid, mtype, content])
            elif mtype == "clear_output":
                # (an update of an earlier cell's display is not undone by clearing this one)
                merged = [b for b in merged if b[0] != eid or b[1] == "update_display_data"]
        if self.group == "engine":
            order = {e: i for i, e in enumerate(self.eids)}
            merged.sort(key=lambda b: order.get(b[0], len(order)))  # stable: keeps arrival order
        elif self.group == "type":
            rank = {
                "stdout": 0,
                "stderr": 1,
                "display_data": 2,
                "update_display_data": 2,
                "execute_result": 3,
            }
            order = {e: i for i, e in enumerate(self.eids)}
            merged.sort(key=lambda b: (rank[b[1]], order.get(b[0], len(order))))
        return [([b[0]], b[1], b[2]) for b in merged]


def _collapse(blocks: list[tuple[list[int], str, Any]]) -> list[tuple[list[int], str, Any]]:
    """Merge identical stream blocks of different engines into one (``[stdout:0-3]``): an
    engine's k-th block of a text joins the other engines' k-th block of that text, so that an
    engine printing the same text twice keeps both and is never merged with itself."""
    out: list[tuple[list[int], str, Any]] = []
    index: dict[tuple[str, str, int], int] = {}
    nth: dict[tuple[tuple[int, ...], str, str], int] = {}  # blocks of this text per engine
    for eids, kind, payload in blocks:
        if kind in ("stdout", "stderr"):
            own = (tuple(eids), kind, payload)
            nth[own] = nth.get(own, 0) + 1
            key = (kind, payload, nth[own])
            if key in index:
                out[index[key]][0].extend(eids)
                continue
            index[key] = len(out)
        out.append((list(eids), kind, payload))
    return out


def bars_cleared(out: Any) -> Any:
    """Context for writing lines to ``out`` while a tqdm progress bar may be drawn on the
    terminal: the bar is cleared first and redrawn below the text (``tqdm.external_write_mode``).
    It holds tqdm's lock even when no bar is drawn yet: a bar another thread draws for the
    first time meanwhile waits, instead of being written where the text (a prompt) goes on."""
    from tqdm.std import tqdm

    return tqdm.external_write_mode(file=out)


def interactive() -> bool:
    """Someone watches: a notebook kernel, or stderr is a terminal (progress bars only then)."""
    return in_notebook() or bool(getattr(sys.stderr, "isatty", lambda: False)())


def _amount(n: float | None, unit: str) -> str:
    """``n`` units for people: ``15.3MB`` (bytes), ``40`` (items), ``?`` (not known)."""
    if n is None:
        return "?"
    if unit == "B":
        from tqdm.std import tqdm

        return tqdm.format_sizeof(n, "B", 1024)
    return f"{n:g}"


class HtmlBar:
    """A tqdm bar drawn as one notebook display updated in place (``display_id`` /
    ``update_display``): no ipywidgets needed, no TqdmWarning, nothing written to stderr, and
    a saved notebook holds only its last state. Made by ``ProgressBar`` in a notebook."""

    def __init__(self, **kwargs: Any) -> None:
        import io

        from tqdm.std import tqdm

        owner = self

        class _Bar(tqdm):  # tqdm counts, times and formats; this draws
            def display(self, msg: str | None = None, pos: int | None = None) -> bool:
                owner.draw(self)
                return True

        self.display_id = f"ipme-progress-{id(self):x}-{time.monotonic_ns():x}"
        self.shown = False
        self.data: dict = {}  # what it shows now
        # tqdm's own terminal writes (a status printer) go to this buffer, never to stderr
        self.bar = _Bar(file=io.StringIO(), **kwargs)

    def draw(self, bar: Any) -> None:
        d = bar.format_dict
        text = bar.format_meter(**dict(d, ncols=80))
        n, total, unit = d["n"], d["total"], d.get("unit", "it")
        rate = d.get("rate") or (n / d["elapsed"] if d.get("elapsed") else None)
        desc = d.get("prefix") or ""
        if unit == "B":
            done = f"{_amount(n, unit)}/{_amount(total, unit)}" if total else _amount(n, unit)
            speed = f", {_amount(rate, unit)}/s" if rate else ""
        else:
            done = f"{n:g}/{_amount(total, unit)} {unit}s"
            speed = f", {rate:.1f} {unit}s/s" if rate else ""
        elapsed = bar.format_interval(d.get("elapsed") or 0)
        post = f", {d['postfix']}" if d.get("postfix") else ""
        pct = f"{100.0 * n / total:.0f}%" if total else ""
        value = f'value="{n}" max="{total}" ' if total else ""  # no total: indeterminate
        html = (
            '<div class="ipy-multiengine-progress" style="font-family:monospace">'
            f"{_escape(desc)}: "
            f'<progress {value}style="width:30%;vertical-align:middle">{pct}</progress> '
            f"{pct} {_escape(done)} [{elapsed}{_escape(speed)}{_escape(post)}]</div>"
        )
        data = self.data = {"text/plain": text, "text/html": html}
        _display(data, {}, self.display_id, update=self.shown)
        self.shown = True


def _escape(text: str) -> str:
    import html

    return html.escape(str(text))


class ProgressBar:
    """The one progress display of every blocking call (``map``, ``gather``, ``scatter``,
    ``barrier``, ``imap``, ``%px --progress-after``, ``wait_interactive``): a bar of ``unit``s
    done (items of a map, bytes of a scatter/gather, engines of an execute), with the rate and
    the engines still busy, shown once the call has taken ``after`` seconds, in an interactive
    session (or always with ``force``, when the user asked for it).

    In a notebook it is an HTML display updated in place (``HtmlBar``) that keeps its final
    state; in a terminal a tqdm bar on stderr, cleared at the end. ``progress(done, total,
    waiting)`` is what each slice of the wait calls; ``close(done, total, waiting)`` shows the
    final count first."""

    def __init__(
        self, desc: str, after: float | None, force: bool = False, unit: str = "engine"
    ) -> None:
        self.desc, self.after, self.force, self.unit = desc, after, force, unit
        self.started = time.monotonic()
        self.bar: Any = None
        self.html: HtmlBar | None = None  # the notebook's bar, once shown
        self.shown = 0
        self.waiting: list[int] | None = None
        self.drawn = 0.0

    def __call__(
        self, done: int, total: int | None, waiting: list[int] | None = None, final: bool = False
    ) -> None:
        if self.bar is None:
            if (
                self.after is None
                or final
                or (total is not None and done >= total)
                or time.monotonic() - self.started < self.after
                or not (self.force or interactive())
            ):
                return
            self.bar = self._make(total)
        if total != self.bar.total:
            self.bar.total = total
        if waiting is not None and waiting != self.waiting:
            self.waiting = waiting
            who = engine_range(waiting)
            if who and self.unit != "engine":
                who = f"engine{'s' if len(waiting) > 1 else ''} {who}"
            self.bar.set_postfix_str(f"waiting for {who}" if waiting else "", refresh=False)
        now = time.monotonic()
        if done != self.shown:
            self.bar.update(done - self.shown)
            self.shown = done
        elif final or now - self.drawn >= 1.0:  # elapsed time and rate move on
            self.bar.refresh()
        else:
            return
        self.drawn = now

    def _make(self, total: int | None) -> Any:
        kwargs: dict[str, Any] = {
            "total": total,
            "desc": self.desc,
            "unit": self.unit,
            "mininterval": 0.2,
            # fixed, not tqdm's dynamic miniters: tqdm's monitor thread redraws a bar whose
            # miniters grew past 1 after maxinterval (10 s) without a draw, i.e. an HTML bar
            # displayed from a thread that is not the cell's; drawn by the waiting thread only
            "miniters": 1,
        }
        if self.unit == "B":
            kwargs.update(unit_scale=True, unit_divisor=1024)
        if in_notebook():
            self.html = HtmlBar(leave=True, **kwargs)
            return self.html.bar
        from tqdm.std import tqdm

        return tqdm(leave=False, file=sys.stderr, **kwargs)

    def close(
        self, done: int | None = None, total: int | None = None, waiting: list[int] | None = None
    ) -> None:
        """Show the final count (when given), then end the bar: a notebook keeps its last state,
        a terminal's line is cleared."""
        if self.bar is not None:
            if done is not None:
                # a total not known ahead (a gather's bytes) is known now, if nothing is left:
                # a call that timed out or was interrupted is not shown as 100% done
                if total is None and not waiting:
                    total = done
                self(done, total, waiting, final=True)
            self.bar.close()
            self.bar = None


def in_notebook(shell: Any = None) -> bool:
    """True inside a Jupyter kernel (render display areas), False in a terminal or script:
    the one "in a kernel?" check, for this process or for ``shell``."""
    if shell is None:
        if "IPython" not in sys.modules:
            return False
        from IPython import get_ipython

        shell = get_ipython()
    return getattr(shell, "kernel", None) is not None


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Run the block whole: a Ctrl-C (SIGINT) arriving in it is raised when it ends, by the
    handler it would have reached. In the main thread only (the one Python signals); other
    threads, or a SIGINT that is ignored or not Python's, run the block as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = _signal.getsignal(signal.SIGINT)
    except (ValueError, OSError):
        previous = None
    if not callable(previous):
        yield
        return
    caught: list[tuple[int, Any]] = []
    _signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        _signal.signal(signal.SIGINT, previous)
        if caught:
            previous(*caught[0])  # e.g. default_int_handler: KeyboardInterrupt from here


class LiveOutput:
    """Shows what a blocking call's functions print or display, labelled by engine, while the
    caller waits (``apply``, ``map``, ``@parallel``, and ``%%px`` with its own ``Renderer``).

    ``listener`` runs on the controller's loop thread: it only queues the event (on this
    object) and posts a drain to the waiting user thread (``stdin.post``), which renders the
    events in order with engines' input prompts; ``tick`` flushes throttled notebook updates
    (the waiting thread's wait calls it every slice). ``close`` shows what is left, itself,
    even when another thread is busy serving the mailbox, and stops listening (output after a
    timeout stays on the ``PendingResult``). A ``LiveOutput`` made without a renderer (the
    engines are known only once the call is sent) keeps the events until ``start(renderer)``.
    """

    def __init__(self, eids: list[int] | None = None, renderer: Renderer | None = None) -> None:
        # made with the engines: its renderer is made on the first event (most calls print
        # nothing, and a renderer and its finish were a tenth of a fast call's client CPU)
        self._eids = None if renderer is not None or eids is None else list(eids)
        self.renderer = renderer
        self.closed = False
        self._events: deque = deque()  # appended on the loop thread, taken in user threads
        self._lock = threading.Lock()  # any waiting thread may serve the posted drains
        from . import stdin

        stdin.watch(self)  # shows what it holds back before an engine's prompt

    def start(self, renderer: Renderer) -> None:
        """Render with ``renderer`` from now on (the events queued so far first)."""
        from . import stdin

        with self._lock:
            self.renderer = renderer
        stdin.post(self._drain)

    def listener(self, eid: int, mtype: str, content: dict) -> None:
        if self.closed or mtype == "error":  # a failing function is reported by the CompositeError
            return
        from . import stdin

        self._events.append((eid, mtype, content))
        stdin.post(self._drain)

    def _drain(self) -> None:
        with self._lock:
            if self.renderer is None:
                if self._eids is None or not self._events:
                    return
                self.renderer = Renderer(self._eids, "stream", in_notebook())
            while not self.closed:
                try:
                    event = self._events[0]
                except IndexError:
                    break
                # one event is shown whole, then taken off: a Ctrl-C arriving while it is
                # rendered (the wait serves drains in the interrupted thread) is raised right
                # after, so that it neither loses the event nor shows it twice
                with interrupt_after():
                    self.renderer.handle(*event)
                    self._events.popleft()
            if not self.closed:
                self.renderer.tick()

    def before_prompt(self, eid: int) -> str:
        """Engine ``eid`` asks for input (``stdin.watch``): show what is held back of its
        output first; returns collected text of it to show before the prompt."""
        self._drain()
        with self._lock:
            if self.closed or self.renderer is None:
                return ""
            return self.renderer.before_prompt(eid)

    def tick(self) -> None:
        """Flush throttled notebook updates (called by the waiting thread's wait, each slice)."""
        with self._lock:
            if not self.closed and self.renderer is not None:
                self.renderer.tick()

    def close(self) -> None:
        from . import stdin

        stdin.serve_pending()  # prompts and output posted before the reply (engines flush first)
        self._drain()  # this call's events, also if another thread holds the mailbox now
        stdin.unwatch(self)
        with self._lock:
            if not self.closed:
                self.closed = True
                self._events.clear()
                if self.renderer is not None:
                    # what is left (a collected cell's every output) is shown whole: a Ctrl-C
                    # meanwhile is raised after it, instead of dropping the rest
                    with interrupt_after():
                        self.renderer.finish()


def live_printer(eid: int) -> Any:
    """A listener (``%pxdebug``) that shows one engine's output as it arrives, ``[N] `` before each
    line, in the user's thread (``stdin.post``, in order with the debugger's prompts)."""
    from . import stdin

    prefix = f"[{eid}] "

    def write(stream: Any, text: str) -> None:
        stream.write("".join(prefix + line for line in text.splitlines(True)))
        if not text.endswith("\n"):
            stream.write("\n")
        stream.flush()

    def listener(_eid: int, mtype: str, content: dict) -> None:
        if mtype == "stream":
            stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
            stdin.post(lambda: write(stream, content.get("text", "")))
        elif mtype == "error":
            stdin.post(lambda: write(sys.stderr, "\n".join(content.get("traceback", []))))
        elif mtype in ("display_data", "execute_result"):
            text = (content.get("data") or {}).get("text/plain")
            if text:
                stdin.post(lambda: write(sys.stdout, str(text)))

    return listener


#: Characters of late output a session holds until it is shown: a message that comes while less
#: waits is held whole (one large display is shown), later ones are counted and said, not kept.
LATE_PENDING_LIMIT = 262144
#: Finished cells whose engine areas late output is appended to in a notebook (the oldest
#: are forgotten: their late output is shown with the next %px instead).
LATE_AREAS = 64
#: Engine areas kept for them in all (each at most ``AREA_LIMIT`` characters): past it older
#: cells are forgotten first, the latest cell's areas are all kept (a large cluster).
LATE_AREAS_MAX = 1024
#: Late output displays made in a notebook so far: a ``%%px`` cell that saw one made while it
#: ran is not laid out again at its end (that clears the cell, and would lose it).
_late_shown = [0]


class LateShower:
    """Shows what engines print after their command has finished (a thread the code started,
    a timer): the controller's late output (``Controller.watch_late``), labelled
    ``[stdout:N late, In [n]]``, or ``[stdout:N late, from an earlier command]`` when the
    controller cannot tell which command it belongs to. It is also kept on that command's
    record (``record["late"]``, shown by ``%result``); this only shows it.

    Called on the controller's thread, it only queues (a message that comes while less than
    ``LATE_PENDING_LIMIT`` characters wait is held whole; the rest is counted and said, with
    its size and commands) and posts a ``show`` to a thread that
    waits for engines (``stdin.post``). ``show`` renders in the user's thread: in a terminal
    every queued output; in a notebook, output of a ``%%px`` cell whose engine areas are
    known (``keep``) is appended to that cell's area in place (``update_display``), the rest
    only when ``place`` (a ``%px`` shows it with its own output).

    With ``at_prompt`` (a terminal IPython, which prints other threads' text above its prompt)
    late output that comes while the prompt waits is printed at once, by a thread of its own,
    not only when the next cell runs; in a notebook that thread appends to the cells' areas
    while the kernel idles (the rest waits for a ``%px``). A notebook cell run again (its
    ``cell_id``) cleared its areas: they are forgotten, its late output shown with a ``%px``."""

    def __init__(self, notebook: Any, at_prompt: bool = False) -> None:
        """``notebook()``: whether to render for a notebook now."""
        self._notebook = notebook
        self._at_prompt = at_prompt
        self._idle = False  # between two cells (the prompt waits): set by after_cell
        self._depth = 0  # cells running (a cell's --local code runs one inside it)
        self._cell: str | None = None  # the running notebook cell's id, when it has one
        self._wake = threading.Event()
        self._printer: threading.Thread | None = None
        self.closed = False
        self._lock = threading.Lock()
        self._render = threading.Lock()  # one show at a time (any waiting thread may serve one)
        self._queue: deque[tuple[int, str, int | None, str, dict]] = deque()
        self._size = 0
        #: per engine: late messages not kept, their characters, and the commands they were of
        self._dropped: dict[int, tuple[int, int, set[str]]] = {}
        self._posted = False
        #: (engine, execute msg_id) -> that engine's area in the cell that ran it (a notebook),
        #: and that cell's id
        self._areas: OrderedDict[tuple[int, str], tuple[_Area, str | None]] = OrderedDict()
        #: the keys of ``_areas`` per finished cell, oldest first (bounded by LATE_AREAS cells)
        self._cells: deque[list[tuple[int, str]]] = deque()
        #: a %px is running: late output not placed in its own cell is shown with it
        self.placing = 0

    def __call__(
        self, eid: int, msg_id: str, number: int | None, mtype: str, content: dict
    ) -> None:
        """(controller's thread) Queue one late output and ask a waiting thread to show it."""
        from . import stdin

        if self.closed:
            return
        size = _late_size((eid, msg_id, number, mtype, content))
        with self._lock:
            if self._size >= LATE_PENDING_LIMIT:
                n, chars, where = self._dropped.get(eid, (0, 0, set()))
                self._dropped[eid] = (n + 1, chars + size, where | {_late_where(msg_id, number)})
            else:
                self._size += size
                self._queue.append((eid, msg_id, number, mtype, content))
            post, self._posted = not self._posted, True
        if post:
            stdin.post(lambda: self.show(None))
        if self._idle and (self._at_prompt or self._notebook()):
            self._wake.set()
            if self._printer is None:
                self._printer = threading.Thread(
                    target=self._print_at_prompt, name="ipy_multiengine late output", daemon=True
                )
                self._printer.start()

    def _print_at_prompt(self) -> None:
        """(its own thread) Show late output that comes while the terminal's prompt waits, or
        the notebook kernel idles (only what goes to its cell's area: ``show(None)``)."""
        while not self.closed:
            self._wake.wait()
            self._wake.clear()
            if self._idle and not self.closed:
                try:
                    self.show(None)
                except Exception:  # a closed stdout, say: shown with the next cell instead
                    logging.getLogger("ipy_multiengine").exception("showing late output failed")

    def close(self) -> None:
        """Show what waits (it is not dropped), then take no more."""
        self.show()
        self.closed = True
        self._wake.set()

    def keep(self, renderer: Renderer, records: list[Any]) -> None:
        """A finished ``%%px`` cell: late output of its ``records`` goes to its engine areas
        (a notebook's live areas, still shown in that cell)."""
        if not (renderer.notebook and renderer.mode == "stream" and renderer.group != "order"):
            return
        kept: dict[tuple[int, str], _Area] = {}
        for r in records:
            late = r.get("late") if isinstance(r, dict) else None
            area = renderer.areas.get(r.get("id")) if late is not None else None
            if late is not None and area is not None and area.handle_id is not None:
                # what it shows, not the parts frozen out of it (kept for the cell's own final
                # layout, which is done): those would stay alive with it, megabytes a cell
                kept[(r["id"], late.msg_id)] = replace(area, frozen=[])
        if not kept:
            return
        with self._lock:
            for key, area in kept.items():
                self._areas[key] = (area, self._cell)
            self._cells.append(list(kept))
            while len(self._cells) > LATE_AREAS or (
                len(self._areas) > LATE_AREAS_MAX and len(self._cells) > 1
            ):
                for key in self._cells.popleft():
                    self._areas.pop(key, None)

    def show(self, place: bool | None = True) -> list[tuple[dict, dict]]:
        """Show what is queued (user's thread). ``place``: also what cannot go to its own
        cell's area (None: only while a %px runs, or in a terminal). Returns the displays it
        made in the running cell (a notebook), for a ``%%px`` cell to show them again when it
        lays itself out."""
        notebook = bool(self._notebook())
        made: list[tuple[dict, dict]] = []
        if place is None:
            place = not notebook or self.placing > 0
        with self._render:
            with self._lock:
                self._posted = False
                events, kept = list(self._queue), []
                self._queue.clear()
                dropped, self._dropped = self._dropped, {}
                areas = {key: area for key, (area, _cell) in self._areas.items()}
            lines: dict[tuple[int, str, str], Lines] = {}
            for event in events:
                eid, msg_id, _number, mtype, content = event
                area = areas.get((eid, msg_id)) if notebook else None
                if area is not None and mtype == "stream" and self._append(area, content):
                    continue
                if area is not None and mtype == "clear_output":
                    self._clear_area(area, bool(content.get("wait")))
                    continue
                if notebook and not place:
                    kept.append(event)
                    continue
                self._show_one(event, notebook, lines, made)
            _flush_late(lines)
            for eid, (n, chars, where) in sorted(dropped.items()):
                _note(
                    f"[late:{eid}] {n} late message{'s' if n != 1 else ''} of engine {eid} "
                    f"({chars} characters; {', '.join(w[2:] for w in sorted(where))}) not "
                    f"shown: more than {LATE_PENDING_LIMIT} characters of late output waited "
                    "to be shown; %result shows what its command's record kept",
                    notebook,
                    made,
                )
            with self._lock:
                self._size = sum(_late_size(e) for e in kept) + sum(
                    _late_size(e) for e in self._queue
                )
                self._queue.extendleft(reversed(kept))
            _late_shown[0] += len(made)
        return made

    def before_cell(self, info: Any = None) -> None:
        """IPython's ``pre_run_cell``: show what came while the prompt waited. A notebook cell
        run again has had its outputs cleared by the frontend, which ignores updates of them:
        its areas are forgotten (their late output waits for a ``%px``, not sent to nowhere)."""
        self._idle = False
        self._depth += 1
        cell = getattr(info, "cell_id", None)
        if self._depth == 1:
            self._cell = cell
            if cell is not None:
                with self._lock:
                    for key in [k for k, (_a, c) in self._areas.items() if c == cell]:
                        del self._areas[key]
                    cells = [[k for k in keys if k in self._areas] for keys in self._cells]
                    self._cells = deque(keys for keys in cells if keys)
        self.show(None)

    def after_cell(self, _result: Any = None) -> None:
        """IPython's ``post_run_cell``: show what came while the cell ran, before the prompt."""
        try:
            self.show(None)
        finally:
            self._depth = max(0, self._depth - 1)  # (an empty cell has no pre_run_cell)
            self._idle = self._depth == 0

    @staticmethod
    def _clear_area(area: _Area, wait: bool) -> None:
        """A late ``clear_output`` of its engine: empty that engine's area of the cell, as the
        engine asked (its other outputs, separate displays, stay); with ``wait`` when its next
        late text comes, which then takes the cleared text's place (a progress loop)."""
        if wait:
            area.clear_waiting = True
            return
        area.segments, area.clear_waiting = [], False
        if area.handle_id is not None:
            _display({"text/plain": ""}, area.bundle("")[1], area.handle_id, update=True)
            area.shown = ""

    @staticmethod
    def _append(area: _Area, content: dict) -> bool:
        """Append late stream text to its cell's area, in place; False if it would not fit."""
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        segments = [[n, _copy_lines(lines)] for n, lines in area.segments]
        waiting = area.clear_waiting
        if waiting:
            area.segments, area.clear_waiting = [], False
        area.write(f"{name} late", content.get("text", ""))
        text = area.text()
        if len(text) > AREA_LIMIT or area.handle_id is None:
            area.segments, area.clear_waiting = segments, waiting  # shown as a new output
            return False
        _display(*area.bundle(text), area.handle_id, update=True)
        area.shown = text
        return True

    @staticmethod
    def _show_one(
        event: tuple[int, str, int | None, str, dict],
        notebook: bool,
        lines: dict[tuple[int, str, str], Lines],
        made: list[tuple[dict, dict]],
    ) -> None:
        eid, msg_id, number, mtype, content = event
        where = " late" + _late_where(msg_id, number)
        if mtype in ("stream", "error"):
            if mtype == "error":
                name, text = "stderr", "\n".join(content.get("traceback") or []) + "\n"
            else:
                name = "stderr" if content.get("name") == "stderr" else "stdout"
                text = content.get("text", "")
            if notebook:
                text = text[:-1] if text.endswith("\n") else text
                bundle = _text_bundle(f"[{name}:{eid}{where}] {text}")
                meta = {"engine": eid, "stream": name, "late": True, "text/plain": {"engine": eid}}
                _display(bundle, meta)
                made.append((bundle, meta))
            else:
                key = (eid, name, where)
                if key not in lines:  # what came before it first: stdout and stderr in order
                    _flush_late(lines)
                lines.setdefault(key, Lines()).write(text)
            return
        if mtype not in ("display_data", "execute_result", "update_display_data"):
            return  # clear_output: nothing of a finished command is cleared here
        label = f"[output:{eid}{where}]"
        data, md = _labelled(content.get("data") or {}, content.get("metadata"), eid, label)
        md["late"] = True
        remote_id = (content.get("transient") or {}).get("display_id")
        if mtype == "update_display_data":
            if notebook:  # the engine's display, wherever it is shown (a terminal cannot)
                for local_id in _showing(eid, remote_id):
                    _display(data, md, local_id, update=True)
            return
        _flush_late(lines)  # text printed before it, first
        if notebook:
            _label_line(label, data)
            local_id = f"ipme-late-{eid}-{time.monotonic_ns():x}"
            _display(data, md, local_id)
            if _is_rich(data):
                made.append(Renderer._label_bundle(eid, label))
            made.append((data, md))
            if remote_id is not None:
                _remember(eid, remote_id, local_id)
        else:
            _display(data, md)


def _late_size(event: tuple[int, str, int | None, str, dict]) -> int:
    _eid, _msg_id, _number, mtype, content = event
    if mtype == "stream":
        return len(content.get("text", ""))
    return 1 + sum(len(str(v)) for v in (content.get("data") or {}).values())


def _copy_lines(lines: Lines) -> Lines:
    copy = Lines()
    copy.lines, copy._cr = list(lines.lines), lines._cr
    return copy


def _late_where(msg_id: str, number: int | None) -> str:
    """The label's part saying which command late output is of: ``, In [n]``, or that the
    controller cannot tell (``msg_id`` "": a silent or data request, or a forgotten one)."""
    if not msg_id:
        return ", from an earlier command"
    return f", In [{number}]" if number is not None else ""


def _flush_late(lines: dict[tuple[int, str, str], Lines]) -> None:
    """Print the late terminal text held in ``lines`` (in the order it came), and forget it."""
    for (eid, name, where), text in lines.items():
        _print_late(eid, name, where, text.lines if text.lines[-1] else text.lines[:-1])
    lines.clear()


def _note(text: str, notebook: bool, made: list[tuple[dict, dict]]) -> None:
    """A note about late output (what was not shown): on stderr, or a notebook display."""
    if notebook:
        bundle = _text_bundle(text)
        meta = {"stream": "stderr", "late": True}
        _display(bundle, meta)
        made.append((bundle, meta))
    else:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _print_late(eid: int, name: str, where: str, lines: list[str]) -> None:
    """Print late terminal lines of engine ``eid``, each labelled ``[stdout:N late, In [n]]``
    (``where``: `` late, In [n]``, see ``_late_where``)."""
    if not lines:
        return
    out = sys.stderr if name == "stderr" else sys.stdout
    label = f"[{name}:{eid}{where}] "
    with bars_cleared(out):
        out.write("".join(label + line + "\n" for line in lines))
        out.flush()
