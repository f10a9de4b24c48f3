"""The parallel magics: ``%px``, ``%%px``, ``%pxconfig``, ``%autopx``, ``%result`` / ``%pxresult``.

Loaded by ``%load_ext ipy_multiengine`` (``load(ip)``), removed by ``%unload_ext``
(``unload(ip)``). The magics only parse options and call the active ``MultiEngineClient``;
this module also renders what the engines send back while a command runs.

Rendering (documented in ``docs/magics.md``):

* ``%px CODE`` on one line is the tutorial's shortcut for ``mec.execute(CODE)``: blocking, its
  value is the ``ResultList`` (shown as ``<Results List>`` / ``[id] In [n]:`` / ``[id] Out[n]:``).
  Rich displays and stderr are shown before it, since the Results List holds text only.
* ``%%px`` cells (and ``%px --stream`` / ``--no-stream`` / ``--group-outputs``) show each
  engine's output as it comes: ``[stdout:N]``/``[stderr:N]`` prefixed lines in a terminal, one
  display area per engine and stream, updated in place, in a notebook; rich outputs carry
  ``metadata.engine``; execute results show as ``Out[N:count]``; a failure raises
  ``CompositeError`` with one ``[N:execute]`` block per failing engine.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from . import client as _client_mod
from . import stdin
from .errors import CompositeError, MultiEngineError, NoClusterError
from .errors import TimeoutError as MultiEngineTimeout

#: Seconds between in-place updates of a notebook display area (output is coalesced).
UPDATE_INTERVAL = 0.1
#: Characters after which a notebook stream area is frozen and a new one started, so that
#: in-place updates stay small however much an engine prints.
AREA_LIMIT = 16384
#: Seconds to wait for interrupted engines to stop before giving control back.
INTERRUPT_GRACE = 5.0
#: Seconds between repeated interrupts of engines that have not stopped yet.
INTERRUPT_REPEAT = 1.0

_DONE = object()


# ---------------------------------------------------------------------- small helpers
def parse_targets(spec: str, ids: list[int], groups: Any = ()) -> str | list[int]:
    """Parse ``all``, ``0``, ``0,2``, ``1:3``, ``::2`` (and mixes like ``0,2:4``) without eval.

    Plain numbers are engine ids; slices select from the list of engine ids like Python
    slicing (``::2`` is every other engine).
    """
    text = spec.strip()
    if text in ("all", "*", ""):
        if text == "":
            raise UsageError("--targets needs a value: all, 0, 0,2, 1:3 or ::2")
        return "all"
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                bits = part.split(":")
                if len(bits) > 3:
                    raise ValueError
                nums = [int(b) if b.strip() else None for b in bits]
                if len(nums) == 3 and nums[2] == 0:
                    raise UsageError(f"--targets {spec!r}: slice step cannot be zero")
                picked = ids[slice(*nums)]
                if not picked:
                    raise UsageError(f"--targets {spec!r}: {part!r} selects no engine; engine ids: {ids}")
                chosen.extend(picked)
            else:
                chosen.append(int(part))
        except ValueError:
            if part in groups:  # a group name (kernelspec of a mixed cluster): the client resolves it
                chosen.append(part)  # type: ignore[arg-type]
                continue
            raise UsageError(f"--targets {spec!r}: {part!r} is not an engine id or a slice; "
                             "use all, 0, 0,2, 1:3 or ::2") from None
    out: list[int] = []
    for t in chosen:
        if t not in out:
            out.append(t)
    return out


def engine_range(eids: list[int]) -> str:
    """``[0, 1, 2, 3]`` -> ``'0-3'``, ``[0, 2]`` -> ``'0,2'``, ``[0, 1, 3]`` -> ``'0-1,3'``."""
    eids = sorted(eids)
    parts: list[str] = []
    i = 0
    while i < len(eids):
        j = i
        while j + 1 < len(eids) and eids[j + 1] == eids[j] + 1:
            j += 1
        parts.append(str(eids[i]) if i == j else f"{eids[i]}-{eids[j]}")
        i = j + 1
    return ",".join(parts)


def _split_line(line: str, parser: Any) -> tuple[str, str]:
    """Split ``%px`` line input into leading options and the code, keeping the code verbatim."""
    rest = line.lstrip()
    opts: list[str] = []
    while rest.startswith("-"):
        m = re.match(r"(\S+)\s*", rest)
        assert m is not None
        token = m.group(1)
        if token == "--":
            rest = rest[m.end():]
            break
        name = token.split("=", 1)[0]
        action = parser._option_string_actions.get(name)
        if action is None:
            break  # code that starts with '-', e.g. `%px -x`
        opts.append(token)
        rest = rest[m.end():]
        if action.nargs != 0 and "=" not in token:
            m = re.match(r"(\S+)\s*", rest)
            if m is None:
                raise UsageError(f"option {name} needs a value")
            opts.append(m.group(1))
            rest = rest[m.end():]
    return " ".join(opts), rest


def _timeout_value(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"expected seconds (a number) or 'none', not {text!r}") from None
    if value < 0:
        raise UsageError(f"seconds must not be negative, not {text!r}")
    return value


def _in_notebook(shell: Any) -> bool:
    return getattr(shell, "kernel", None) is not None


def _display(bundle: dict, metadata: dict, display_id: str | None = None, update: bool = False) -> Any:
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
        data["text/html"] = (f'<div class="ipy-multiengine-label" style="font-size:smaller;opacity:0.6">'
                             f"{label}</div>\n{html}")
    return data, md


class _Lines:
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


def _short(exc: BaseException) -> BaseException:
    """Make IPython show ``exc`` as one line, without the magic's own frames."""
    exc._render_traceback_ = lambda: [f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__]  # type: ignore[attr-defined]
    return exc


# ---------------------------------------------------------------------- rendering
@dataclass
class _Area:
    """One engine's stdout or stderr display area in a notebook, updated in place."""

    eid: int
    name: str
    label: str
    lines: _Lines = field(default_factory=_Lines)
    handle_id: str | None = None
    shown: str = ""
    last: float = 0.0
    count: int = 0

    def bundle(self, text: str) -> tuple[dict, dict]:
        text = text[:-1] if text.endswith("\n") else text  # a final newline adds no line
        return ({"text/plain": f"{self.label} {text}"},
                {"engine": self.eid, "stream": self.name, "text/plain": {"engine": self.eid}})


class Renderer:
    """Shows one command's outputs: live (``stream``), grouped at the end, or tutorial-style.

    ``handle`` is called in the user's thread for each (engine, msg_type, content) event;
    ``tick`` flushes throttled notebook updates; ``finish`` shows whatever is left.
    """

    def __init__(self, eids: list[int], mode: str, notebook: bool, group: str = "engine",
                 collapse: bool = False) -> None:
        self.eids = eids
        self.mode = mode  # 'stream' | 'collect' | 'results'
        self.notebook = notebook
        self.group = group
        self.collapse = collapse
        self.events: list[tuple[int, str, dict]] = []
        self.areas: dict[tuple[int, str], _Area] = {}
        self.partial: dict[tuple[int, str], _Lines] = {}
        self.rich_ids: dict[int, list[str]] = {}
        self._uid = f"ipme-{id(self):x}-{time.monotonic_ns():x}"

    # -- events
    def handle(self, eid: int, mtype: str, content: dict) -> None:
        if self.mode != "stream":
            self.events.append((eid, mtype, content))
            return
        if mtype == "stream":
            self._stream(eid, content.get("name", "stdout"), content.get("text", ""))
        elif mtype in ("display_data", "update_display_data"):
            self._rich(eid, content, update=mtype == "update_display_data")
        elif mtype == "execute_result":
            self._result(eid, content)
        elif mtype == "clear_output":
            self._clear(eid)
        # 'error' messages are shown once, by the CompositeError raised at the end

    def tick(self, force: bool = False) -> None:
        if not self.notebook:
            return
        now = time.monotonic()
        for area in self.areas.values():
            if force or now - area.last >= UPDATE_INTERVAL:
                self._flush_area(area, now)

    def finish(self) -> None:
        """Show what is left: pending partial lines (stream), or every output (collect/results)."""
        if self.mode == "stream":
            self.tick(force=True)
            for (eid, name), lines in self.partial.items():
                if lines.lines[-1]:
                    self._print_lines(eid, name, [lines.lines[-1]])
                    lines.lines[-1] = ""
            return
        self._render_collected()

    # -- live stream output
    def _stream(self, eid: int, name: str, text: str) -> None:
        if not text:
            return
        if self.notebook:
            area = self.areas.get((eid, name))
            if area is None:
                area = self.areas[(eid, name)] = _Area(eid, name, f"[{name}:{eid}]")
            area.lines.write(text)
            if area.handle_id is None:
                self._flush_area(area, time.monotonic())
            return
        lines = self.partial.setdefault((eid, name), _Lines())
        lines.write(text)
        self._print_lines(eid, name, lines.pop_complete())

    def _print_lines(self, eid: Any, name: str, lines: list[str]) -> None:
        if not lines:
            return
        out = sys.stderr if name == "stderr" else sys.stdout
        label = f"[{name}:{eid}] "
        out.write("".join(label + line + "\n" for line in lines))
        out.flush()

    def _flush_area(self, area: _Area, now: float) -> None:
        text = area.lines.text()
        if text == area.shown and area.handle_id is not None:
            return
        if len(text) > AREA_LIMIT and len(area.lines.lines) > 1:
            # freeze the complete lines in the current area and continue in a fresh one
            done = "\n".join(area.lines.lines[:-1]) + "\n"
            data, md = area.bundle(done)
            if area.handle_id is None:
                _display(data, md)
            else:
                _display(data, md, area.handle_id, update=True)
            area.lines.lines = area.lines.lines[-1:]
            area.handle_id, area.shown = None, ""
            text = area.lines.text()
            if not text:
                area.last = now
                return
        data, md = area.bundle(text)
        if area.handle_id is None:
            area.count += 1
            area.handle_id = f"{self._uid}-{area.eid}-{area.name}-{area.count}"
            _display(data, md, area.handle_id)
        else:
            _display(data, md, area.handle_id, update=True)
        area.shown, area.last = text, now

    # -- rich outputs
    def _rich(self, eid: int, content: dict, update: bool = False) -> None:
        data, md = _labelled(content.get("data") or {}, content.get("metadata"), eid, f"[output:{eid}]")
        remote_id = (content.get("transient") or {}).get("display_id")
        if not self.notebook:
            if update:
                return  # a terminal cannot update what it printed
            self._flush_partial(eid)
            _display(data, md)
            return
        self.tick(force=True)  # keep text printed before this display above it
        if remote_id is not None:
            local_id = f"{self._uid}-{eid}-d-{remote_id}"
            if update:
                _display(data, md, local_id, update=True)
            else:
                _display(data, md, local_id)
                self.rich_ids.setdefault(eid, []).append(local_id)
        elif not update:
            local_id = f"{self._uid}-{eid}-r{len(self.rich_ids.get(eid, []))}"
            _display(data, md, local_id)
            self.rich_ids.setdefault(eid, []).append(local_id)

    def _result(self, eid: int, content: dict) -> None:
        count = content.get("execution_count")
        data, md = _labelled(content.get("data") or {}, content.get("metadata"), eid, f"Out[{eid}:{count}]:")
        md["execution_count"] = count
        if not self.notebook:
            self._flush_partial(eid)
        else:
            self.tick(force=True)
        _display(data, md)

    def _clear(self, eid: int) -> None:
        """An engine's ``clear_output``: empty that engine's areas (others' stay)."""
        if not self.notebook:
            return
        for (e, _name), area in self.areas.items():
            if e == eid:
                area.lines = _Lines()
                self._flush_area(area, time.monotonic())
        for local_id in self.rich_ids.pop(eid, []):
            _display({"text/plain": ""}, {"engine": eid}, local_id, update=True)

    def _flush_partial(self, eid: int) -> None:
        for (e, name), lines in self.partial.items():
            if e == eid and lines.lines[-1]:
                self._print_lines(eid, name, [lines.lines[-1]])
                lines.lines[-1] = ""

    # -- grouped output at the end
    def _render_collected(self) -> None:
        blocks = self._blocks()
        if self.mode == "results":  # stdout and results are in the returned Results List
            blocks = [b for b in blocks if b[1] in ("stderr", "display_data")]
        if self.collapse:
            blocks = _collapse(blocks)
        for eids, kind, payload in blocks:
            label = engine_range(eids)
            if kind in ("stdout", "stderr"):
                text = payload.rstrip("\n") if not self.notebook else payload
                if self.notebook:
                    text = text[:-1] if text.endswith("\n") else text
                    data = {"text/plain": f"[{kind}:{label}] {text}"}
                    _display(data, {"engine": eids[0] if len(eids) == 1 else eids, "stream": kind,
                                    "text/plain": {"engine": eids[0] if len(eids) == 1 else eids}})
                else:
                    lines = _Lines()
                    lines.write(text)
                    self._print_lines(label, kind, lines.lines)
            elif kind == "display_data":
                eid = eids[0] if len(eids) == 1 else eids
                data, md = _labelled(payload.get("data") or {}, payload.get("metadata"), eid, f"[output:{label}]")
                _display(data, md)
            elif kind == "execute_result":
                count = payload.get("execution_count")
                eid = eids[0] if len(eids) == 1 else eids
                data, md = _labelled(payload.get("data") or {}, payload.get("metadata"), eid,
                                     f"Out[{label}:{count}]:")
                md["execution_count"] = count
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
            elif mtype == "clear_output":
                merged = [b for b in merged if b[0] != eid]
        if self.group == "engine":
            order = {e: i for i, e in enumerate(self.eids)}
            merged.sort(key=lambda b: order.get(b[0], len(order)))  # stable: keeps arrival order
        elif self.group == "type":
            rank = {"stdout": 0, "stderr": 1, "display_data": 2, "execute_result": 3}
            order = {e: i for i, e in enumerate(self.eids)}
            merged.sort(key=lambda b: (rank[b[1]], order.get(b[0], len(order))))
        return [([b[0]], b[1], b[2]) for b in merged]


def _collapse(blocks: list[tuple[list[int], str, Any]]) -> list[tuple[list[int], str, Any]]:
    """Merge identical stream blocks of different engines into one (``[stdout:0-3]``)."""
    out: list[tuple[list[int], str, Any]] = []
    index: dict[tuple[str, str], int] = {}
    for eids, kind, payload in blocks:
        if kind in ("stdout", "stderr"):
            key = (kind, payload)
            if key in index:
                out[index[key]][0].extend(eids)
                continue
            index[key] = len(out)
        out.append((list(eids), kind, payload))
    return out


class _Progress:
    """After ``after`` seconds, shows how many engines are done (in place in a notebook)."""

    def __init__(self, after: float | None, notebook: bool, started: float) -> None:
        self.after, self.notebook, self.started = after, notebook, started
        self.shown: int | None = None
        self.display_id = f"ipme-progress-{id(self):x}-{time.monotonic_ns():x}"

    def tick(self, eids: list[int], futures: list[Any], final: bool = False) -> None:
        if self.after is None:
            return
        elapsed = time.monotonic() - self.started
        if elapsed < self.after and self.shown is None:
            return
        done = sum(f.done() for f in futures)
        if done == self.shown and not final:
            return
        waiting = [e for e, f in zip(eids, futures) if not f.done()]
        text = f"[progress] {done}/{len(futures)} engines done after {elapsed:.1f} s"
        if waiting:
            text += f"; waiting for {engine_range(waiting)}"
        if self.notebook:
            _display({"text/plain": text}, {}, self.display_id, update=self.shown is not None)
        else:
            print(text, file=sys.stderr, flush=True)
        self.shown = done


# ---------------------------------------------------------------------- %autopx transformer
class AutoPxTransformer:
    """``input_transformers_cleanup`` hook: prefix each cell with ``%%px`` while enabled.

    ``has_side_effects`` keeps IPython's ``check_complete`` from applying it, so the
    terminal still decides whether an input is complete on the plain Python code.
    """

    has_side_effects = True
    #: Inputs starting with these stay local while ``%autopx`` is on (``%px``/``%%px`` go to
    #: the engines anyway, with their own options).
    local_magics = ("%autopx", "%pxconfig", "%result", "%pxresult", "%px", "%%px")

    def __init__(self) -> None:
        self.enabled = False

    def __call__(self, lines: list[str]) -> list[str]:
        if not self.enabled:
            return lines
        first = next((ln.strip() for ln in lines if ln.strip()), "")
        if not first:
            return lines
        word = first.split()[0]
        if word in self.local_magics or first == "autopx":
            return lines
        return ["%%px\n"] + lines


# ---------------------------------------------------------------------- the magics
@dataclass
class PxConfig:
    """Defaults of ``%px``/``%%px``, set by ``%pxconfig``. ``None`` means: use the client's."""

    targets: Any = None
    block: bool | None = None
    stream: bool = True
    group_outputs: str = "engine"
    collapse: bool = False
    progress_after: float | None = None
    timeout: float | None = None
    line_results: bool = True

    def describe(self) -> str:
        return "\n".join(f"{k}: {v!r}" for k, v in self.__dict__.items())


def _px_options(f: Any) -> Any:
    decorators = [
        argument("--targets", "-t", dest="targets", default=None,
                 help="engines to run on: all, 0, 0,2, 1:3, ::2 (default: the client's targets)"),
        argument("--block", dest="block", action="store_const", const=True, default=None,
                 help="wait for the engines and show their output (default: the client's block)"),
        argument("--noblock", "--no-block", dest="block", action="store_const", const=False,
                 help="return a PendingResult at once; %%result shows the output later"),
        argument("--stream", dest="stream", action="store_const", const=True, default=None,
                 help="show each engine's output live, as it is printed (the default for %%%%px)"),
        argument("--no-stream", dest="stream", action="store_const", const=False,
                 help="show the outputs when every engine is done, grouped by --group-outputs"),
        argument("--group-outputs", dest="group_outputs", choices=("engine", "order", "type"), default=None,
                 help="with --no-stream: by engine, in arrival order, or by type (stdout, stderr, displays, results)"),
        argument("--collapse", dest="collapse", action="store_const", const=True, default=None,
                 help="show identical output of several engines once ([stdout:0-3]) and group identical tracebacks"),
        argument("--no-collapse", dest="collapse", action="store_const", const=False),
        argument("--progress-after", dest="progress_after", default=None, metavar="S",
                 help="after S seconds, show how many engines are done ('none' to disable)"),
        argument("--timeout", dest="timeout", default=None, metavar="S",
                 help="stop waiting after S seconds (the engines keep running; %%result collects later)"),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


@magics_class
class ParallelMagics(Magics):
    """``%px``, ``%%px``, ``%pxconfig``, ``%autopx``, ``%result``/``%pxresult``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.pxconfig_ = PxConfig()
        self.transformer = AutoPxTransformer()
        self.last: Any = None
        self._own_client: Any = None
        self._notebook: bool | None = None  # None: detect (a kernel means notebook rendering)

    # -- the client
    def client(self) -> Any:
        mec = _client_mod.get_active()
        if mec is not None:
            return mec
        try:
            mec = _client_mod.MultiEngineClient()
        except NoClusterError as exc:
            raise UsageError(
                "no active MultiEngineClient: call mec.activate() on one, or start a cluster "
                f"for %px to connect to. {exc}") from None
        mec.activate()
        self._own_client = mec
        print(f"%px: connected to the running default cluster ({len(mec.get_ids())} engines: "
              f"{mec.get_ids()}) and activated it", file=sys.stderr)
        return mec

    @property
    def notebook(self) -> bool:
        return _in_notebook(self.shell) if self._notebook is None else self._notebook

    # -- %px / %%px
    @magic_arguments()
    @_px_options
    @argument("-o", "--out", dest="out", default=None, metavar="NAME",
              help="store the ResultList (or PendingResult) in the user namespace as NAME")
    @argument("--local", dest="local", action="store_true", default=False,
              help="also run the code in the local namespace")
    @argument("--init", dest="init", action="store_true", default=False,
              help="setup code: run it on every engine now and again on every engine restarted later "
                   "(mec.on_start)")
    @line_cell_magic
    def px(self, line: str, cell: str | None = None) -> Any:
        """Run code on the engines: ``%px CODE`` (one line) or a ``%%px`` cell.

        One line blocking returns the ResultList (the tutorial's ``<Results List>``); a cell
        streams each engine's output live (``[stdout:N]``), shows results as ``Out[N:count]``
        and raises ``CompositeError`` when an engine fails. See ``docs/magics.md``.
        """
        if cell is None:
            opt_text, code = _split_line(line, self.px.parser)
            line_form = True
        else:
            opt_text, code = line, cell.rstrip("\n")
            line_form = False
        args = parse_argstring(self.px, opt_text)
        if not code.strip():
            raise UsageError("%px needs code to run: %px CODE, or a %%px cell")
        return self._run(code, args, line_form)

    def _run(self, code: str, args: Any, line_form: bool) -> Any:
        cfg = self.pxconfig_
        mec = self.client()
        targets = cfg.targets if args.targets is None else parse_targets(args.targets, mec.get_ids(), getattr(mec, "groups", ()))
        block = args.block if args.block is not None else (cfg.block if cfg.block is not None else mec.block)
        timeout = cfg.timeout if args.timeout is None else _timeout_value(args.timeout)
        progress_after = cfg.progress_after if args.progress_after is None else _timeout_value(args.progress_after)
        group = args.group_outputs or cfg.group_outputs
        collapse = cfg.collapse if args.collapse is None else args.collapse
        if line_form and cfg.line_results and args.stream is None and args.group_outputs is None:
            mode = "results"
        else:
            stream = cfg.stream if args.stream is None else args.stream
            mode = "stream" if stream else "collect"

        if args.init:
            return self._run_init(mec, code, args, mode, group, collapse, timeout)

        events: queue.Queue = queue.Queue()
        closed = threading.Event()

        def listener(eid: int, mtype: str, content: dict) -> None:
            if not closed.is_set():
                events.put((eid, mtype, content))

        try:
            pr = mec.execute(code, targets=targets, block=False, listener=listener if block else None)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        except MultiEngineError as exc:  # e.g. a dead target: the message says it all
            raise _short(exc) from None
        self.last = pr
        if args.local:
            self._run_local(code)
        if not block:
            if args.out:
                self.shell.user_ns[args.out] = pr
            return pr

        for fut in pr.futures:
            fut.add_done_callback(lambda _f: events.put(_DONE))
        renderer = Renderer(pr.eids, mode, self.notebook, group, collapse)
        started = time.monotonic()
        progress = _Progress(progress_after, self.notebook, started)
        deadline = None if timeout is None else started + timeout
        try:
            timed_out = not self._pump(pr, events, renderer, progress, deadline)
        except KeyboardInterrupt:
            self._interrupted(mec, pr, events, renderer, progress)
            raise _short(KeyboardInterrupt()) from None
        finally:
            if not pr.ready():
                closed.set()
        if progress.shown is not None and progress.shown != len(pr.futures):
            progress.tick(pr.eids, pr.futures, final=True)
        if timed_out:
            renderer.mode = "collect" if renderer.mode == "results" else renderer.mode
            renderer.finish()
            left = [e for e, f in zip(pr.eids, pr.futures) if not f.done()]
            raise _short(MultiEngineTimeout(
                f"%px: engines {engine_range(left)} not done after {timeout:g} s; they keep running. "
                "%result waits for the output; mec.interrupt() stops them"))
        renderer.finish()
        try:
            result = pr.get_result()
        except CompositeError as err:
            raise self._failed(err, args, collapse) from None
        if args.out:
            self.shell.user_ns[args.out] = result
        return result if mode == "results" else None

    def _failed(self, err: CompositeError, args: Any, collapse: bool) -> CompositeError:
        """The error a failing cell raises: stored under ``--out``, grouped with ``--collapse``."""
        if args.out:
            self.shell.user_ns[args.out] = err
        if collapse:
            err.collapse = True
        return err

    def _run_init(self, mec: Any, code: str, args: Any, mode: str, group: str, collapse: bool,
                  timeout: float | None) -> Any:
        """``--init``: ``mec.on_start(code)``, then show its outputs like ``--no-stream``."""
        if args.targets is not None:
            raise UsageError("--init runs on every engine (and on every engine restarted later): "
                             "it takes no --targets")
        if not args.block and args.block is not None:
            raise UsageError("--init always blocks: setup code must have run before anything else")
        try:
            result = mec.on_start(code, timeout=timeout)
        except CompositeError as err:
            raise self._failed(err, args, collapse) from None
        self.last = mec.last
        renderer = Renderer([r["id"] for r in result], "results" if mode == "results" else "collect",
                            self.notebook, group, collapse)
        for r in result:
            for name in ("stdout", "stderr"):
                if r.get(name):
                    renderer.handle(r["id"], "stream", {"name": name, "text": r[name]})
            for out in r.get("outputs") or []:
                renderer.handle(r["id"], out.get("output_type", ""), out)
        renderer.finish()
        if args.out:
            self.shell.user_ns[args.out] = result
        return result if mode == "results" else None

    def _pump(self, pr: Any, events: queue.Queue, renderer: Renderer, progress: _Progress,
              deadline: float | None) -> bool:
        """Render events until every engine is done (True) or ``deadline`` passes (False)."""
        while True:
            stdin.serve_pending()  # engines' input()/breakpoint() prompts, one at a time
            ready = pr.ready()
            wait = 0.0 if ready else UPDATE_INTERVAL
            if deadline is not None and not ready:
                wait = min(wait, max(deadline - time.monotonic(), 0.0))
            try:
                item = events.get(timeout=wait) if wait > 0 else events.get_nowait()
                while True:
                    if item is not _DONE:
                        renderer.handle(*item)
                    item = events.get_nowait()
            except queue.Empty:
                pass
            renderer.tick()
            if ready:
                return True
            progress.tick(pr.eids, pr.futures)
            if deadline is not None and time.monotonic() >= deadline and not pr.ready():
                return False

    def _interrupted(self, mec: Any, pr: Any, events: queue.Queue, renderer: Renderer,
                     progress: _Progress) -> None:
        """Ctrl-C / notebook interrupt: interrupt the engines still running, show their output."""
        running = [e for e, f in zip(pr.eids, pr.futures) if not f.done()]
        end = time.monotonic() + INTERRUPT_GRACE
        try:
            # An engine that has not started running the code yet ignores an interrupt (a kernel
            # only listens for SIGINT while it executes): repeat it for engines still busy with it.
            while True:
                still = [e for e, f in zip(pr.eids, pr.futures) if not f.done()]
                if still:
                    try:
                        mec.interrupt(still)
                    except Exception as exc:  # e.g. an engine died meanwhile: keep collecting
                        print(f"%px: could not interrupt engines {engine_range(still)}: {exc}",
                              file=sys.stderr)
                if self._pump(pr, events, renderer, progress, min(end, time.monotonic() + INTERRUPT_REPEAT)):
                    break
                if time.monotonic() >= end:
                    break
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting at once
        if renderer.mode == "results":
            renderer.mode = "collect"  # there will be no Results List: show everything printed
        renderer.finish()
        still = [e for e, f in zip(pr.eids, pr.futures) if not f.done()]
        msg = f"%px: interrupted engine{'s' if len(running) != 1 else ''} {engine_range(running) or '-'}"
        if still:
            msg += f"; {engine_range(still)} still busy (%result waits for them)"
        print(msg, file=sys.stderr, flush=True)

    def _run_local(self, code: str) -> None:
        was = self.transformer.enabled
        self.transformer.enabled = False
        try:
            self.shell.run_cell(code, store_history=False)
        finally:
            self.transformer.enabled = was

    # -- %pxconfig
    @magic_arguments()
    @_px_options
    @argument("--line-results", dest="line_results", action="store_const", const=True, default=None,
              help="one-line %%px returns the tutorial's Results List (default)")
    @argument("--no-line-results", dest="line_results", action="store_const", const=False,
              help="one-line %%px renders like a %%%%px cell")
    @argument("--reset", action="store_true", default=False, help="restore every default")
    @line_magic
    def pxconfig(self, line: str) -> None:
        """Set the defaults of ``%px``/``%%px``; with no options, print them."""
        args = parse_argstring(self.pxconfig, line)
        cfg = self.pxconfig_
        if args.reset:
            self.pxconfig_ = cfg = PxConfig()
        changed = False
        if args.targets is not None:
            if args.targets.strip() in ("default", "none"):
                cfg.targets = None
            else:
                mec = _client_mod.get_active()
                ids = mec.get_ids() if mec is not None else []
                if ":" in args.targets and mec is None:
                    raise UsageError("slices in --targets need an active client (to know the engine ids)")
                cfg.targets = parse_targets(args.targets, ids, getattr(mec, "groups", ()))
            changed = True
        for name in ("block", "stream", "group_outputs", "collapse", "line_results"):
            value = getattr(args, name)
            if value is not None:
                setattr(cfg, name, value)
                changed = True
        if args.progress_after is not None:
            cfg.progress_after = _timeout_value(args.progress_after)
            changed = True
        if args.timeout is not None:
            cfg.timeout = _timeout_value(args.timeout)
            changed = True
        if not changed and not args.reset:
            print(cfg.describe())

    # -- %autopx
    @line_magic
    def autopx(self, line: str = "") -> None:
        """Toggle running every cell (or terminal input) on the engines, as if it began with ``%%px``."""
        if self.transformer.enabled:
            self.transformer.enabled = False
            print("Auto Parallel Disabled")
        else:
            self.client()  # fail now, not at the next input, when there is no cluster
            self.transformer.enabled = True
            print("Auto Parallel Enabled")
            print("Type %autopx to disable")

    # -- %result
    @magic_arguments()
    @argument("--timeout", dest="timeout", default=None, metavar="S", help="wait at most S seconds")
    @line_magic
    def result(self, line: str = "") -> Any:
        """The Results List of the last command run on the engines (waits if it is still running)."""
        args = parse_argstring(self.result, line)
        mec = self.client()
        try:
            pr = mec.last_executed()  # the last command executed on each engine
        except ValueError:
            raise UsageError("no command has been run on the engines yet") from None
        timeout = None if args.timeout is None else _timeout_value(args.timeout)
        return pr.get_result(timeout=timeout)

    @line_magic
    def pxresult(self, line: str = "") -> Any:
        """Alias of ``%result``."""
        return self.result(line)


_LOADED: dict[int, ParallelMagics] = {}


def load(ip: Any) -> ParallelMagics:
    """Register the magics and the ``%autopx`` transformer on shell ``ip`` (idempotent)."""
    magics = _LOADED.get(id(ip))
    if magics is not None:
        return magics
    magics = ParallelMagics(ip)
    ip.register_magics(magics)
    ip.input_transformers_cleanup.append(magics.transformer)
    _LOADED[id(ip)] = magics
    return magics


def unload(ip: Any) -> None:
    """Remove the magics and the ``%autopx`` transformer from shell ``ip``."""
    magics = _LOADED.pop(id(ip), None)
    if magics is None:
        return
    own = magics._own_client  # the client %px connected by itself: nobody else can close it
    magics._own_client = None
    if own is not None and not own.closed:
        own.close()
    if magics.transformer in ip.input_transformers_cleanup:
        ip.input_transformers_cleanup.remove(magics.transformer)
    table = ip.magics_manager.magics
    for kind, names in magics.magics.items():
        for name in names:
            if table[kind].get(name) is not None and getattr(table[kind][name], "__self__", None) is magics:
                del table[kind][name]
    ip.magics_manager.registry.pop(type(magics).__name__, None)
