"""Every parallel magic: ``%px``, ``%%px``, ``%pxconfig``, ``%autopx``, ``%result`` / ``%pxresult``,
``%pxstatus``, ``%pxdebug N``, ``%pxdiff NAME``.

Loaded by ``%load_ext ipy_multiengine`` (``load(ip)``), removed by ``%unload_ext``
(``unload(ip)``). The magics only parse options and call the active ``MultiEngineClient``;
``render.py`` shows what the engines send back while a command runs.

Rendering (documented in ``docs/magics.md``):

* ``%px CODE`` on one line is the tutorial's shortcut for ``mec.execute(CODE)``: blocking, its
  value is the ``ResultList`` (shown as ``<Results List>`` / ``[id] In [n]:`` / ``[id] Out[n]:``).
  Rich displays are shown before it (the Results List names them, with stdout, stderr and
  pager text in its lines). When an engine fails there is no Results List: every engine's
  output is shown, then the ``CompositeError``.
* ``%%px`` cells (and ``%px --stream`` / ``--no-stream`` / ``--group-outputs``) show each
  engine's output as it comes: ``[stdout:N]``/``[stderr:N]`` prefixed lines in a terminal, one
  display area per engine and stream, updated in place, in a notebook; rich outputs carry
  ``metadata.engine``; execute results show as ``Out[N:count]``; a failure raises
  ``CompositeError`` with one ``[N:execute]`` block per failing engine.
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Enum, Float, Integer, List, Unicode, Union, observe

from . import client as _client_mod
from . import stdin
from .errors import CompositeError, MultiEngineError, NoClusterError, TargetsError
from .errors import TimeoutError as MultiEngineTimeout
from .render import (
    LateShower,
    LiveOutput,
    ProgressBar,
    Renderer,
    bars_cleared,
    in_notebook,
    interrupt_after,
    live_printer,
    one_line,
)
from .targets import engine_range
from .targets import parse_targets as _parse_targets_raw
from .targets import resolve as _resolve_targets

#: Seconds to wait for interrupted engines to stop before giving control back.
INTERRUPT_GRACE = 5.0


# ---------------------------------------------------------------------- small helpers
def parse_targets(spec: str, ids: list[int], groups: Any = ()) -> str | list[int]:
    """``targets.parse_targets`` with its errors as ``UsageError`` (shown in one line)."""
    try:
        return _parse_targets_raw(spec, ids, groups)
    except TargetsError as exc:
        raise UsageError(str(exc)) from None


def _split_line(line: str, parser: Any) -> tuple[str, str]:
    """Split ``%px`` line input into leading options and the code, keeping the code verbatim."""
    rest = line.lstrip()
    opts: list[str] = []
    while rest.startswith("-"):
        m = re.match(r"(\S+)\s*", rest)
        assert m is not None
        token = m.group(1)
        if token == "--":
            rest = rest[m.end() :]
            break
        name = token.split("=", 1)[0]
        action = parser._option_string_actions.get(
            name
        )  # argparse has no public lookup of an option
        attached = parser._option_string_actions.get(token[:2])
        if (
            action is None
            and attached is not None
            and attached.nargs != 0
            and not token.startswith("--")
            and (not _compiles(rest) or re.match(r"--(\s|$)", rest[m.end() :]))
        ):
            # `-t0`, `-ores`: argparse's short option with its value attached, on a line that
            # is not code as it stands (`-t0 + 1` is: minus a name), or that ends the options
            # with `--` (`-t0 -- -x` compiles, but as code nobody writes it)
            opts.extend((token[:2], token[2:]))
            rest = rest[m.end() :]
            continue
        if action is None:
            if name == "--help" or (re.match(r"--[A-Za-z]", token) and not _compiles(rest)):
                # a mistyped option (`%px --target 1 ...`), not code that starts with '-'
                # (`%px --x`): said here, not as the engines' SyntaxError
                known = sorted(o for o in parser._option_string_actions if o.startswith("--"))
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                if name == "--help":  # `--help` compiles (-(-help)): every engine's TypeError
                    hint = "%px? shows the help; "
                raise UsageError(
                    f"unknown option {name}; {hint}options: {', '.join(known)} "
                    "(code that starts with '-' goes after '--': %px -- CODE)"
                )
            break  # code that starts with '-', e.g. `%px -x`
        opts.append(token)
        rest = rest[m.end() :]
        if action.nargs != 0 and "=" not in token:
            m = re.match(r"(\S+)\s*", rest)
            if m is None:
                raise UsageError(f"option {name} needs a value")
            opts.append(m.group(1))
            rest = rest[m.end() :]
    return " ".join(opts), rest


def _compiles(code: str) -> bool:
    """Whether ``code`` is valid Python (a syntax check only: nothing runs). Its warnings are
    the engines' to give (they compile it again): not printed here, nor errors under
    ``-W error``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # top-level `await` too: the engines' IPython runs it (autoawait)
            compile(code, "<%px>", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def _timeout_value(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"expected seconds (a number) or 'none', not {text!r}") from None
    if not value >= 0:  # negative, or NaN (which compares false: the wait failed after sending)
        raise UsageError(f"seconds must be a number >= 0 or 'none', not {text!r}")
    return value


# ---------------------------------------------------------------------- %autopx transformer
class AutoPxTransformer:
    """``input_transformers_cleanup`` hook: prefix each cell with ``%%px`` while enabled.

    ``has_side_effects`` keeps IPython's ``check_complete`` from applying it, so the
    terminal still decides whether an input is complete on the plain Python code.

    What stays local while ``%autopx`` is on: every magic of this extension (``%px``,
    ``%%px``, ``%autopx``, ``%pxconfig``, ``%result``, ``%pxstatus``, ...; ``%px`` goes to the
    engines anyway, with its own options), recognised on the first line that is neither blank
    nor a comment, with ``%``/``%%`` or as a bare word (automagic; not ``result``, a common
    variable name, and not ``px = 1``-like code). ``exit``/``quit`` are refused with a
    message: a user typing them means to leave, not to ask every engine kernel to exit.
    """

    has_side_effects = True
    #: Words that end a session; typed under ``%autopx`` they are refused, not sent.
    exit_words = ("exit", "quit", "%exit", "%quit", "exit()", "quit()")

    def __init__(self, local_magics: Any = (), cell_magic: str = "px") -> None:
        self.enabled = False
        self._local = local_magics  # names, or a callable returning them (the magics registered)
        #: the cell magic each input is given to (``px_even`` for ``%autopx_even``)
        self.cell_magic = cell_magic

    @property
    def local_magics(self) -> set[str]:
        names = self._local() if callable(self._local) else self._local
        return set(names) | {"autopx"}

    def __call__(self, lines: list[str]) -> list[str]:
        code = [ln for ln in lines if ln.strip()]
        if len(code) == 1:
            m = re.fullmatch(r"\s*%?px\s+(.*\?)\s*", code[0].rstrip("\n"))
            if m:  # `%px len?`: IPython's help syntax would show the *local* len's help instead
                return [f"get_ipython().run_line_magic('px', {m.group(1)!r})\n"]
        if not self.enabled:
            return lines
        first = next(
            (ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), ""
        )
        if not first:
            return lines
        if first.replace(" ", "") in self.exit_words or re.fullmatch(
            r"(exit|quit)\(\s*\d*\s*\)", first
        ):
            msg = (
                "%autopx: exit/quit not sent to the engines (there it asks each engine kernel to "
                "exit); type %autopx to leave autopx mode, then exit to leave IPython"
            )
            return [f"print({msg!r}, file=__import__('sys').stderr)\n"]
        word, _, rest = first.partition(" ")
        rest = rest.lstrip()
        if word.startswith("%"):
            if word.lstrip("%") in self.local_magics:
                return lines
        elif word in self.local_magics - {"result"} and (
            not re.match(r"[=(\[.,:+\-*/%<>!&|^~@]", rest)
            # `px --targets 0 code`, `px -t0 code`: options, when not Python (`px - x` is)
            or (rest.startswith("-") and len(code) == 1 and not _compiles(first))
        ):
            return lines  # automagic: `autopx`, `pxstatus`, `px code` (not `px = 1`, `px(...)`)
        return [f"%%{self.cell_magic}\n", *lines]


# ---------------------------------------------------------------------- the magics
#: The ``%px`` defaults: the ``ParallelMagics`` traits, and the fields of ``PxConfig``.
PX_DEFAULTS = (
    "targets",
    "block",
    "stream",
    "group_outputs",
    "collapse",
    "progress_after",
    "timeout",
    "line_results",
)


@dataclass
class PxConfig:
    """The session's ``%px``/``%%px`` defaults: the ``ParallelMagics`` traits, overridden by
    ``%pxconfig``. ``None`` targets/block mean: use the client's."""

    targets: Any = None
    block: bool | None = None
    stream: bool = True
    group_outputs: str = "engine"
    collapse: bool = True
    progress_after: float | None = None
    timeout: float | None = None
    line_results: bool = True
    #: the names set by ``%pxconfig`` this session (a configured trait no longer changes them)
    overridden: set = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def from_traits(cls, magics: Any) -> PxConfig:
        """The configured defaults: the traits of ``magics`` (ipython_config.py, ``%config``)."""
        return cls(**{name: getattr(magics, name) for name in PX_DEFAULTS})

    def override(self, name: str, value: Any) -> None:
        """``%pxconfig``: set ``name`` for this session, whatever the trait says."""
        setattr(self, name, value)
        self.overridden.add(name)

    def describe(self) -> str:
        return "\n".join(f"{k}: {getattr(self, k)!r}" for k in PX_DEFAULTS)


def _px_options(f: Any) -> Any:
    decorators = [
        argument(
            "--targets",
            "-t",
            dest="targets",
            default=None,
            help="engines to run on: all, 0, 0,2, 1:3, ::2 (default: the client's targets)",
        ),
        argument(
            "--block",
            dest="block",
            action="store_const",
            const=True,
            default=None,
            help="wait for the engines and show their output (default: the client's block)",
        ),
        argument(
            "--noblock",
            "--no-block",
            dest="block",
            action="store_const",
            const=False,
            help="return a PendingResult at once; %%result shows the output later",
        ),
        argument(
            "--stream",
            dest="stream",
            action="store_const",
            const=True,
            default=None,
            help="show each engine's output live, as it is printed (the default for %%%%px)",
        ),
        argument(
            "--no-stream",
            dest="stream",
            action="store_const",
            const=False,
            help="show the outputs when every engine is done, grouped by --group-outputs",
        ),
        argument(
            "--group-outputs",
            dest="group_outputs",
            choices=("engine", "order", "type"),
            default=None,
            help=(
                "with --no-stream: by engine, in arrival order, or by type (stdout, stderr, "
                "displays, results)"
            ),
        ),
        argument(
            "--collapse",
            dest="collapse",
            action="store_const",
            const=True,
            default=None,
            help=(
                "show identical output of several engines once ([stdout:0-3]) and group "
                "identical tracebacks"
            ),
        ),
        argument("--no-collapse", dest="collapse", action="store_const", const=False),
        argument(
            "--progress-after",
            dest="progress_after",
            default=None,
            metavar="S",
            help="after S seconds, show how many engines are done ('none' to disable)",
        ),
        argument(
            "--timeout",
            dest="timeout",
            default=None,
            metavar="S",
            help="stop waiting after S seconds (the engines keep running; %%result collects later)",
        ),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


@magics_class
class ParallelMagics(Magics):
    """``%px``, ``%%px``, ``%pxconfig``, ``%autopx``, ``%result``/``%pxresult``, ``%pxstatus``,
    ``%pxdebug``, ``%pxdiff``.

    The defaults of ``%px``/``%%px`` are traits: ``c.ParallelMagics.stream = False`` in
    ``ipython_config.py``, or ``%config ParallelMagics.stream = False`` in a session.
    ``%pxconfig`` overrides them for the session; ``%pxconfig --reset`` returns to them.
    """

    targets = Union(
        [Unicode(), Integer(), List(Integer())],
        default_value=None,
        allow_none=True,
        help="Engines %px runs on: None (the client's targets), 'all', a group name, an "
        "engine id or a list of ids.",
    ).tag(config=True)
    block = Bool(
        None,
        allow_none=True,
        help="Whether %px waits for the engines: None (the client's block), True or False.",
    ).tag(config=True)
    stream = Bool(
        True,
        help="%%px shows each engine's output live, as it is printed; False: when "
        "every engine is done, grouped by group_outputs.",
    ).tag(config=True)
    group_outputs = Enum(
        ("engine", "order", "type"),
        default_value="engine",
        help="With stream=False, group the outputs by engine, in arrival order, or by "
        "type (stdout, stderr, displays, results).",
    ).tag(config=True)
    collapse = Bool(
        True,
        help="Show identical tracebacks of several engines once ([0-3:execute]); "
        "--no-collapse shows each. Identical output ([stdout:0-3]) is shown once only with "
        "--collapse given on the line or %pxconfig --collapse.",
    ).tag(config=True)
    progress_after = Float(
        None,
        allow_none=True,
        min=0.0,
        help="Seconds after which %px shows how many engines are done; None: never.",
    ).tag(config=True)
    timeout = Float(
        None,
        allow_none=True,
        min=0.0,
        help="Seconds %px waits before it stops waiting (the engines keep running; %result "
        "collects later); None: forever.",
    ).tag(config=True)
    line_results = Bool(
        True,
        help="A one-line %px returns the tutorial's Results List; False: it "
        "renders like a %%px cell.",
    ).tag(config=True)

    @property
    def _ip(self) -> Any:
        """The shell these magics are registered with (set from construction on)."""
        assert self.shell is not None
        return self.shell

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)  # loads the shell's config (ipython_config.py) into the traits
        self.pxconfig_ = PxConfig.from_traits(self)
        self.transformer = AutoPxTransformer(
            lambda: {name for names in self.magics.values() for name in names} | _SET_NAMES
        )
        #: the client of a named magic set (``mec.activate(suffix=...)``); None: the active one
        self.bound: Any = None
        self.last: Any = None
        self._own_client: Any = None
        self._notebook: bool | None = None  # None: detect (a kernel means notebook rendering)
        #: what ``client()`` told the user on stderr when it connected by itself (a ``%%px``
        #: cell laid out again at its end shows it again: its first output)
        self.notice = ""

    # -- the client
    def client(self) -> Any:
        """The client the magics run on (the bound one of a named set, else the active one,
        else one connected to the running default cluster), told to show its engines' late
        output here."""
        mec = self._client()
        shower = _SHOWERS.get(id(self._ip))
        if shower is not None:
            mec.controller.watch_late(shower)
        return mec

    def _client(self) -> Any:
        if self.bound is not None:
            if self.bound.closed:
                raise UsageError("the client of these magics is closed; activate another one")
            return self.bound
        mec = _client_mod.get_active()
        if mec is not None:
            return mec
        try:
            mec = _client_mod.MultiEngineClient()
        except NoClusterError as exc:
            raise UsageError(
                "no active MultiEngineClient: call mec.activate() on one, or start a cluster "
                f"for %px to connect to. {exc}"
            ) from None
        mec.activate()
        self._own_client = mec
        self.notice = (
            f"%px: connected to the running default cluster ({len(mec.get_ids())} engines: "
            f"{mec.get_ids()}) and activated it\n"
        )
        print(self.notice, end="", file=sys.stderr)
        return mec

    @property
    def notebook(self) -> bool:
        """Render for a notebook (display areas) rather than a terminal; detected unless set."""
        return in_notebook(self.shell) if self._notebook is None else self._notebook

    @notebook.setter
    def notebook(self, value: bool | None) -> None:
        self._notebook = value

    @observe(*PX_DEFAULTS)
    def _default_changed(self, change: Any) -> None:
        # %config ParallelMagics.NAME = ...: the session follows, unless %pxconfig set NAME
        cfg = getattr(self, "pxconfig_", None)
        if cfg is not None and change["name"] not in cfg.overridden:
            setattr(cfg, change["name"], change["new"])

    def reset(self) -> None:
        """Back to the state right after ``%load_ext``: the configured ``%pxconfig`` defaults,
        ``%autopx`` off, notebook rendering detected again, no last command."""
        self.pxconfig_ = PxConfig.from_traits(self)
        self.transformer.enabled = False
        self._notebook = None
        self.last = None

    # -- %px / %%px
    @magic_arguments()
    @_px_options
    @argument(
        "-o",
        "--out",
        dest="out",
        default=None,
        metavar="NAME",
        help="store the ResultList (or PendingResult) in the user namespace as NAME",
    )
    @argument(
        "--local",
        dest="local",
        action="store_true",
        default=False,
        help="also run the code in the local namespace",
    )
    @argument(
        "--init",
        dest="init",
        action="store_true",
        default=False,
        help="setup code: run it on every engine now and again on every engine restarted later "
        "(mec.on_start)",
    )
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
        shower = _SHOWERS.get(id(self._ip))
        if shower is None:
            return self._run(code, args, line_form)
        shower.placing += 1  # late output of earlier commands: shown first, and with this one
        try:
            return self._run(code, args, line_form, shower.show())
        finally:
            shower.placing -= 1

    def _run(
        self,
        code: str,
        args: Any,
        line_form: bool,
        shown: list[tuple[dict, dict]] | None = None,
    ) -> Any:
        """Run ``%px``/``%%px``; ``shown``: displays the cell showed before (late output)."""
        cfg = self.pxconfig_
        if args.timeout is not None and args.block is False:
            raise UsageError(
                "--timeout bounds the wait of a blocking %px; with --noblock nothing waits: "
                "%result --timeout S waits for the PendingResult"
            )
        self.notice = ""
        mec = self.client()
        notice, self.notice = self.notice, ""
        if args.targets is None:
            targets = cfg.targets
            if not args.init:  # (setup code runs on every engine)
                self._check_default_targets(mec, targets)
        else:
            targets = parse_targets(args.targets, mec.get_ids(), getattr(mec, "groups", ()))
        block = (
            args.block
            if args.block is not None
            else (cfg.block if cfg.block is not None else mec.block)
        )
        if args.timeout is not None and not block and not args.init:  # (--init always blocks)
            where = "%pxconfig --noblock" if cfg.block is not None else "the client's block = False"
            raise UsageError(
                f"--timeout bounds the wait of a blocking %px; this one does not block ({where}):"
                " give --block too, or wait with %result --timeout S"
            )
        timeout = cfg.timeout if args.timeout is None else _timeout_value(args.timeout)
        progress_after = (
            cfg.progress_after
            if args.progress_after is None
            else _timeout_value(args.progress_after)
        )
        group = args.group_outputs or cfg.group_outputs
        # identical tracebacks are shown once unless --no-collapse; identical output of
        # several engines ([stdout:0-3]) only when asked: --collapse, or %pxconfig --collapse
        collapse = cfg.collapse if args.collapse is None else args.collapse
        same_output = bool(args.collapse) or (cfg.collapse and "collapse" in cfg.overridden)
        if line_form and cfg.line_results and args.stream is None and args.group_outputs is None:
            mode = "results"
        else:
            stream = cfg.stream if args.stream is None else args.stream
            mode = "stream" if stream else "collect"

        if args.init:
            return self._run_init(mec, code, args, mode, group, (collapse, same_output), timeout)

        live = LiveOutput() if block else None  # queues events until the renderer starts
        # the one progress display of every call (tqdm.auto), shown when asked: --progress-after S
        progress = ProgressBar("%px", progress_after, force=True)
        try:
            pr = mec.execute(
                code, targets=targets, block=False, listener=live.listener if live else None
            )
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        except MultiEngineError as exc:  # e.g. a dead target: the message says it all
            raise one_line(exc) from None
        self.last = pr
        if live is None:
            if args.local:
                self._run_local(code)
            if args.out:
                self._ip.user_ns[args.out] = pr
            return pr

        def lay_out() -> None:
            # a %%px cell's outputs are all its own: engine areas are laid out from the start
            owns_cell = not line_form and not args.local
            renderer = Renderer(
                pr.eids,
                mode,
                self.notebook,
                group,
                same_output,
                owns_cell,
                shown_before=notice,
                displays_before=shown,
            )
            renderer.bars.append(progress)  # the cell's final layout keeps it
            live.start(renderer)

        # The engines run the code from here on: a Ctrl-C interrupts them wherever it comes,
        # also while the output is laid out (a display per area, each flushing the kernel's
        # streams: on a loaded machine the notebook's interrupt may well come then).
        try:
            if args.local and isinstance(self._run_local(code), KeyboardInterrupt):
                # IPython's run_cell caught the Ctrl-C (its traceback is shown): it is the
                # cell's, and stops the engines too
                raise KeyboardInterrupt
            with interrupt_after():  # laid out whole: a Ctrl-C meanwhile is raised after it
                lay_out()
            deadline = None if timeout is None else time.monotonic() + timeout
            timed_out = not self._wait(pr, live, progress, deadline)
        except KeyboardInterrupt:
            stdin.drop(pr.futures)  # no more prompts of this call: one Ctrl-C is enough
            self._interrupted(mec, pr, live, lay_out, progress)
            raise one_line(KeyboardInterrupt()) from None
        finally:
            progress.close(*pr.progress())  # the final count, then the bar ends
        renderer = live.renderer
        assert renderer is not None  # laid out above
        if timed_out:
            renderer.mode = "collect" if renderer.mode == "results" else renderer.mode
            live.close()  # what came so far; later output stays on the PendingResult
            left = pr.unfinished()
            raise one_line(
                MultiEngineTimeout(
                    f"%px: engines {engine_range(left)} not done after {timeout:g} s; they keep "
                    "running. "
                    "%result waits for the output; mec.interrupt() stops them"
                )
            )
        shower = _SHOWERS.get(id(self._ip))
        try:
            result = pr.get_result()
        except CompositeError as err:
            # no Results List will be shown: every engine's stdout and Out first, then the error
            renderer.mode = "collect" if renderer.mode == "results" else renderer.mode
            live.close()
            if shower is not None:
                shower.keep(renderer, _records(err))
            raise self._failed(err, args, collapse) from None
        except BaseException:
            renderer.mode = "collect" if renderer.mode == "results" else renderer.mode
            live.close()
            raise
        live.close()
        if shower is not None:
            shower.keep(renderer, result)
        if args.out:
            self._ip.user_ns[args.out] = result
        return result if mode == "results" else None

    def _check_default_targets(self, mec: Any, targets: Any) -> None:
        """The session's default targets (``%pxconfig --targets``, a named set's targets) still
        name engines of the client: after the cluster shrank, say where they were set, not
        only "unknown engine id" as if this line had named it."""
        if targets is None:
            return
        # the groups (every engine's metadata) only for a value that may name one
        plain = targets == "all" or isinstance(targets, int)
        plain = plain or (isinstance(targets, list) and all(isinstance(t, int) for t in targets))
        groups = None if plain else getattr(mec, "groups", None)
        try:
            _resolve_targets(targets, mec.get_ids(), groups)
        except (ValueError, TypeError) as exc:
            if self.bound is not None:
                where = f"the targets of %{self.transformer.cell_magic} (mec.activate(targets=...))"
                fix = "activate the set again with other targets"
            elif "targets" in self.pxconfig_.overridden:
                where = "%pxconfig --targets"
                fix = "set them again with %pxconfig --targets T, or %pxconfig --targets default"
            else:
                where = "ParallelMagics.targets"
                fix = "set them with %pxconfig --targets T, or %pxconfig --targets default"
            raise UsageError(
                f"{where} {targets!r}: {exc}; {fix} (or give --targets on this line)"
            ) from None

    def _failed(self, err: CompositeError, args: Any, collapse: bool) -> CompositeError:
        """The error a failing cell raises: stored under ``--out``, grouped with ``--collapse``."""
        if collapse:
            err = err.collapsed()
        if args.out:
            self._ip.user_ns[args.out] = err
        return err

    def _run_init(
        self,
        mec: Any,
        code: str,
        args: Any,
        mode: str,
        group: str,
        collapse_both: tuple[bool, bool],
        timeout: float | None,
    ) -> Any:
        """``--init``: ``mec.on_start(code)``, then show its outputs like ``--no-stream``.
        ``collapse_both``: (identical tracebacks once, identical output once)."""
        collapse, same_output = collapse_both
        if args.targets is not None:
            raise UsageError(
                "--init runs on every engine (and on every engine restarted later): "
                "it takes no --targets"
            )
        if not args.block and args.block is not None:
            raise UsageError("--init always blocks: setup code must have run before anything else")
        outcome: BaseException | None = None
        try:
            result = mec.on_start(code, timeout=timeout)
        except (MultiEngineTimeout, CompositeError) as exc:
            outcome = exc
        if args.local:  # here too, once the engines have run it, whatever they did (as --local)
            self._run_local(code)
        try:
            if outcome is not None:
                raise outcome
        except MultiEngineTimeout:
            pr = self.last = mec.last_executed()  # %result (also a named set's) collects it
            left = pr.unfinished()
            raise one_line(
                MultiEngineTimeout(
                    f"%px --init: engines {engine_range(left)} not done after {timeout:g} s, so "
                    "the setup code is not recorded (only code done on every engine is); they "
                    "keep running it: %result waits for the output"
                )
            ) from None
        except CompositeError as err:  # what the engines printed, then the error
            self.last = mec.last_executed()  # %result raises it again, as after a %px
            self._show_records(
                [r for r in err.results if isinstance(r, dict)], "collect", group, same_output
            )
            raise self._failed(err, args, collapse) from None
        self.last = mec.last
        self._show_records(
            result, "results" if mode == "results" else "collect", group, same_output
        )
        if args.out:
            self._ip.user_ns[args.out] = result
        return result if mode == "results" else None

    def _show_records(self, records: list[dict], mode: str, group: str, collapse: bool) -> None:
        """Render finished execute records (stdout, stderr, rich outputs) like ``--no-stream``."""
        renderer = Renderer([r["id"] for r in records], mode, self.notebook, group, collapse)
        for r in records:
            for name in ("stdout", "stderr"):
                if r.get(name):
                    renderer.handle(r["id"], "stream", {"name": name, "text": r[name]})
            for out in r.get("outputs") or []:
                renderer.handle(r["id"], out.get("output_type", ""), out)
        renderer.finish()

    def _wait(
        self, pr: Any, live: LiveOutput, progress: ProgressBar, deadline: float | None
    ) -> bool:
        """Wait for every engine (True) or until ``deadline`` (False) through the package's one
        wait (``stdin.wait`` -> ``_loop.wait``: Ctrl-C, engines' prompts), rendering the
        output as it comes (posted drains) and flushing throttled updates each slice."""
        return stdin.wait(
            pr.futures,
            deadline=deadline,
            tick=live.tick,
            progress=lambda _done, _total: progress(*pr.progress()),
        )

    def _interrupted(
        self,
        mec: Any,
        pr: Any,
        live: LiveOutput,
        lay_out: Callable[[], None],
        progress: ProgressBar,
    ) -> None:
        """Ctrl-C / notebook interrupt: interrupt the engines still running, show their output
        (laid out by ``lay_out`` first if the Ctrl-C came before that)."""
        running = pr.unfinished()
        end = time.monotonic() + INTERRUPT_GRACE
        try:
            # one interrupt is enough: it also reaches an engine that had not begun the code yet
            # (``mec.interrupt``), and it spares the cell's own ``except KeyboardInterrupt``
            if running:
                try:
                    mec.interrupt(running)
                except Exception as exc:  # e.g. an engine died meanwhile: keep collecting
                    with bars_cleared(sys.stderr):  # above a terminal's bar, not onto it
                        print(
                            f"%px: could not interrupt engines {engine_range(running)}: {exc}",
                            file=sys.stderr,
                            flush=True,
                        )
            if live.renderer is None:  # the Ctrl-C came before the output was laid out
                with interrupt_after():
                    lay_out()
            self._wait(pr, live, progress, end)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting at once
        renderer = live.renderer
        if renderer is not None and renderer.mode == "results":
            renderer.mode = "collect"  # there will be no Results List: show everything printed
        live.close()
        still = pr.unfinished()
        msg = (
            f"%px: interrupted engine{'s' if len(running) != 1 else ''} "
            f"{engine_range(running) or '-'}"
        )
        if still:
            msg += f"; {engine_range(still)} still busy (%result waits for them)"
        progress.close(*pr.progress())  # the bar's final count, then a terminal's bar is gone
        print(msg, file=sys.stderr, flush=True)

    def _run_local(self, code: str) -> BaseException | None:
        """Run ``code`` here too (``--local``); the error it raised (shown by IPython), if any."""
        was = self.transformer.enabled
        self.transformer.enabled = False
        try:
            result = self._ip.run_cell(code, store_history=False)
        finally:
            self.transformer.enabled = was
        return getattr(result, "error_in_exec", None)

    # -- %pxstatus / %pxdebug / %pxdiff
    @magic_arguments()
    @argument(
        "--live",
        action="store_true",
        default=False,
        help="in a notebook, keep the table updated in place (until .stop())",
    )
    @argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between live updates"
    )
    @line_magic
    def pxstatus(self, line: str = "") -> Any:
        """The engine table: id, group, host, pid, state, what runs, queue, memory, CPU."""
        args = parse_argstring(self.pxstatus, line)
        if args.interval <= 0:
            raise UsageError(f"--interval must be positive, not {args.interval:g}")
        return self.client().status(live=args.live, interval=args.interval)

    @magic_arguments()
    @argument("engine", help="the engine id whose last exception to debug")
    @line_magic
    def pxdebug(self, line: str = "") -> None:
        """Post-mortem debugging of one engine's last exception, from here (``[N] ipdb>``)."""
        try:
            args = parse_argstring(self.pxdebug, line)
            eid = int(args.engine)
        except (UsageError, ValueError):
            raise UsageError(
                f"%pxdebug needs one engine id, e.g. %pxdebug 0 (got {line.strip()!r})"
            ) from None
        mec = self.client()
        if eid not in mec.get_ids():
            raise UsageError(f"unknown engine id {eid}; valid ids: {mec.get_ids()}")
        language = next(e["language"] for e in mec.engines if e["id"] == eid)
        if language != "python":
            raise UsageError(
                f"engine {eid} runs {language or 'an unknown language'}: "
                "%pxdebug needs a Python engine"
            )
        pr = mec.execute("%debug", targets=eid, block=False, listener=live_printer(eid))
        try:
            pr.get_result()
        finally:
            stdin.serve_pending()  # output that arrived with the end of the session

    @magic_arguments()
    @argument("name", nargs="?", default=None, help="the variable to compare across engines")
    @argument(
        "--targets",
        "-t",
        dest="targets",
        default=None,
        help="engines to compare: all, 0, 0,2, 1:3, ::2 or a group name",
    )
    @line_magic
    def pxdiff(self, line: str = "") -> Any:
        """Which engines hold differing values of ``NAME``: ``%pxdiff NAME [--targets T]``."""
        args = parse_argstring(self.pxdiff, line)
        if not args.name:
            raise UsageError("usage: %pxdiff NAME [--targets T]")
        mec = self.client()
        targets = None
        if args.targets is not None:
            targets = parse_targets(args.targets, mec.get_ids(), mec.groups)
            try:  # an unknown id: one line, as %px --targets says it
                _resolve_targets(targets, mec.get_ids(), mec.groups)
            except (ValueError, TypeError) as exc:
                raise UsageError(f"--targets {args.targets!r}: {exc}") from None
        return mec.diff(args.name, targets=targets)

    # -- %pxconfig
    @magic_arguments()
    @_px_options
    @argument(
        "--line-results",
        dest="line_results",
        action="store_const",
        const=True,
        default=None,
        help="one-line %%px returns the tutorial's Results List (default)",
    )
    @argument(
        "--no-line-results",
        dest="line_results",
        action="store_const",
        const=False,
        help="one-line %%px renders like a %%%%px cell",
    )
    @argument(
        "--reset",
        action="store_true",
        default=False,
        help=(
            "back to the configured defaults (the ParallelMagics traits: ipython_config.py, "
            "%%config)"
        ),
    )
    @line_magic
    def pxconfig(self, line: str) -> None:
        """Set the defaults of ``%px``/``%%px``; with no options, print them.

        Every value is checked before any is set: a bad one raises ``UsageError`` and leaves the
        defaults as they were (``%pxconfig --block --timeout abc`` does not set ``block``)."""
        args = parse_argstring(self.pxconfig, line)
        new: dict[str, Any] = {}
        if args.targets is not None:
            if args.targets.strip() in ("default", "none"):
                new["targets"] = None
            else:
                mec = _client_mod.get_active()
                if ":" in args.targets and mec is None:
                    raise UsageError(
                        "slices in --targets need an active client (to know the engine ids)"
                    )
                ids = mec.get_ids() if mec is not None else []
                groups = getattr(mec, "groups", None) or {}
                targets = parse_targets(args.targets, ids, groups)
                if mec is not None:  # an unknown id now would make every later %px fail
                    try:
                        _resolve_targets(targets, ids, groups)
                    except (ValueError, TypeError) as exc:
                        raise UsageError(f"--targets {args.targets!r}: {exc}") from None
                new["targets"] = targets
        for name in ("block", "stream", "group_outputs", "collapse", "line_results"):
            value = getattr(args, name)
            if value is not None:
                new[name] = value
        if args.progress_after is not None:
            new["progress_after"] = _timeout_value(args.progress_after)
        if args.timeout is not None:
            new["timeout"] = _timeout_value(args.timeout)
        if args.reset:  # back to the configured defaults (the traits)
            self.pxconfig_ = PxConfig.from_traits(self)
        for name, value in new.items():
            self.pxconfig_.override(name, value)
        if not new and not args.reset:
            print(self.pxconfig_.describe())

    # -- %autopx
    @line_magic
    def autopx(self, line: str = "") -> None:
        """Toggle running every cell (or terminal input) on the engines, as if it began with
        ``%%px``."""
        if line.strip() and not line.lstrip().startswith("#"):
            # it toggles: a mistyped %autopx --targets 1 would run on all engines
            raise UsageError(
                f"%autopx takes no arguments (got {line.strip()!r}): it toggles; choose the "
                "engines first with %pxconfig --targets ..."
            )
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
        """The Results List of the last command run on the engines (waits if it is still
        running)."""
        args = parse_argstring(self.result, line)
        mec = self.client()
        if self.bound is not None:  # a named set (%result_even): its own last command only
            pr = self.last
            if pr is None:
                raise UsageError(f"no command has been run with %{self.transformer.cell_magic} yet")
        else:
            try:
                pr = mec.last_executed()
            except ValueError:
                raise UsageError("no command has been run on the engines yet") from None
        timeout = None if args.timeout is None else _timeout_value(args.timeout)
        try:
            return pr.get_result(timeout=timeout)
        except (
            MultiEngineTimeout
        ) as exc:  # one line, as %px --timeout: the magic's frames say nothing
            raise one_line(exc) from None

    @line_magic
    def pxresult(self, line: str = "") -> Any:
        """Alias of ``%result``."""
        return self.result(line)


def _records(err: CompositeError) -> list[dict]:
    """Every engine's execute record of a failed call: the failing engines' and the others'."""
    failed = [getattr(e, "result", None) for e in err.elist]
    return [r for r in [*err.results, *failed] if isinstance(r, dict)]


_LOADED: dict[int, ParallelMagics] = {}
#: per shell, what shows its engines' late output (one for the default and every named set)
_SHOWERS: dict[int, LateShower] = {}
#: named magic sets (``mec.activate(suffix='_even')``) per (shell, suffix), and their names
_SETS: dict[tuple[int, str], ParallelMagics] = {}
_SET_NAMES: set[str] = set()
#: the magics of a named set: name -> magic kind
SET_MAGICS = {"px": "line_cell", "autopx": "line", "result": "line"}


def activate_set(ip: Any, suffix: str, mec: Any, targets: Any) -> None:
    """``%px{suffix}``, ``%%px{suffix}``, ``%autopx{suffix}``, ``%result{suffix}`` on shell
    ``ip`` for client ``mec`` on ``targets`` (None: the client's), beside the default set;
    ``mec=None`` removes the set. (Called through ``client.activate``; loads the extension.)"""
    load(ip)
    if mec is not None and (id(ip), suffix) not in _SETS:  # a set of ours is just replaced
        table = ip.magics_manager.magics
        clash = [
            f"{name}{suffix}"
            for name in SET_MAGICS
            if f"{name}{suffix}" in table["line"] or f"{name}{suffix}" in table["cell"]
        ]
        if clash:
            raise ValueError(
                f"activate(suffix={suffix!r}): "
                + ", ".join(f"%{n}" for n in clash)
                + (" is" if len(clash) == 1 else " are")
                + " already a magic; choose another suffix (e.g. '_even')"
            )
    old = _SETS.pop((id(ip), suffix), None)
    if old is not None:
        _drop_set(ip, old, suffix)
    if mec is None:
        return
    magics = ParallelMagics(ip)
    # IPython's Magics.__init__ adds every instance to the shell's configurables; %config
    # configures the loaded set only, and a dropped set must not stay referenced by the shell
    if magics in getattr(ip, "configurables", []):
        ip.configurables.remove(magics)
    magics.bound = mec
    if targets is not None:
        magics.pxconfig_.override("targets", targets)
    magics.transformer.cell_magic = f"px{suffix}"
    for name, kind in SET_MAGICS.items():
        ip.register_magic_function(getattr(magics, name), kind, f"{name}{suffix}")
        _SET_NAMES.add(f"{name}{suffix}")
    ip.input_transformers_cleanup.append(magics.transformer)
    _SETS[(id(ip), suffix)] = magics


def _drop_set(ip: Any, magics: ParallelMagics, suffix: str) -> None:
    if magics in getattr(ip, "configurables", []):
        ip.configurables.remove(magics)
    if magics.transformer in ip.input_transformers_cleanup:
        ip.input_transformers_cleanup.remove(magics.transformer)
    table = ip.magics_manager.magics
    for name, kind in SET_MAGICS.items():
        for k in ("line", "cell") if kind == "line_cell" else (kind,):
            table[k].pop(f"{name}{suffix}", None)
        _SET_NAMES.discard(f"{name}{suffix}")


_client_mod.activation_hooks.append(activate_set)


def load(ip: Any) -> ParallelMagics:
    """Register the magics and the ``%autopx`` transformer on shell ``ip`` (idempotent)."""
    magics = _LOADED.get(id(ip))
    if magics is not None:
        return magics
    magics = ParallelMagics(ip)
    ip.register_magics(magics)
    ip.input_transformers_cleanup.append(magics.transformer)
    _LOADED[id(ip)] = magics
    # late output (printed after its command finished) is shown before each cell runs (before
    # its own output) and after it (before the next prompt); in a notebook, outside its own
    # cell, only with a %px
    terminal = sys.modules.get("IPython.terminal.interactiveshell")
    at_prompt = terminal is not None and isinstance(ip, terminal.TerminalInteractiveShell)
    shower = _SHOWERS[id(ip)] = LateShower(lambda: magics.notebook, at_prompt)
    ip.events.register("pre_run_cell", shower.before_cell)
    ip.events.register("post_run_cell", shower.after_cell)
    return magics


def unload(ip: Any) -> None:
    """Remove the magics and the ``%autopx`` transformer from shell ``ip``."""
    for key in [k for k in _SETS if k[0] == id(ip)]:
        _drop_set(ip, _SETS.pop(key), key[1])
    magics = _LOADED.pop(id(ip), None)
    if magics is None:
        return
    shower = _SHOWERS.pop(id(ip), None)
    if shower is not None:
        shower.close()  # what waits is shown, not dropped
        ip.events.unregister("pre_run_cell", shower.before_cell)
        ip.events.unregister("post_run_cell", shower.after_cell)
    own = magics._own_client  # the client %px connected by itself: nobody else can close it
    magics._own_client = None
    if own is not None and not own.closed:
        own.close()
    if magics.transformer in ip.input_transformers_cleanup:
        ip.input_transformers_cleanup.remove(magics.transformer)
    table = ip.magics_manager.magics
    for kind, names in magics.magics.items():
        for name in names:
            if (
                table[kind].get(name) is not None
                and getattr(table[kind][name], "__self__", None) is magics
            ):
                del table[kind][name]
    ip.magics_manager.registry.pop(type(magics).__name__, None)
    if magics in getattr(ip, "configurables", []):  # %config ParallelMagics: the loaded one only
        ip.configurables.remove(magics)
