"""The parallel magics in a real ``InteractiveShell`` against the session's 4 real engines."""

from __future__ import annotations

import _thread
import io
import json
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from beyond_helpers import screen_lines
from faultlib import held_code
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from shell_helpers import cell_outputs, magics_of, run

from ipy_multiengine import client as client_mod
from ipy_multiengine.errors import CompositeError, TimeoutError
from ipy_multiengine.magics import parse_targets
from ipy_multiengine.render import AREA_LIMIT, Lines
from ipy_multiengine.results import PendingResult, ResultList
from ipy_multiengine.targets import engine_range

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------- parsing helpers
def test_parse_targets_without_eval():
    ids = [0, 1, 2, 3]
    assert parse_targets("all", ids) == "all"
    assert parse_targets("0", ids) == [0]
    assert parse_targets("0,2", ids) == [0, 2]
    assert parse_targets("1:3", ids) == [1, 2]
    assert parse_targets("::2", ids) == [0, 2]
    assert parse_targets("0, 2:4", ids) == [0, 2, 3]
    assert parse_targets("-1:", ids) == [3]
    for bad in ("__import__('os')", "1:2:3:4", "::0", "a", "5:9"):
        with pytest.raises(UsageError):
            parse_targets(bad, ids)


def test_engine_range_and_carriage_returns():
    assert engine_range([0, 1, 2, 3]) == "0-3"
    assert engine_range([0, 2]) == "0,2"
    assert engine_range([3, 0, 1]) == "0-1,3"
    lines = Lines()
    for chunk in ["10%", "\r20%", "\r30%\n", "next\r\n", "a\x1b[31mred\x1b[0m"]:
        lines.write(chunk)
    assert lines.text() == "30%\nnext\na\x1b[31mred\x1b[0m"


# ---------------------------------------------------------------------- extension
def test_load_and_unload_extension(ip):
    assert "px" in ip.magics_manager.magics["line"] and "px" in ip.magics_manager.magics["cell"]
    transformer = magics_of(ip).transformer
    assert transformer in ip.input_transformers_cleanup
    ip.run_line_magic("unload_ext", "ipy_multiengine")
    for name in ("px", "autopx", "result", "pxresult", "pxconfig"):
        assert name not in ip.magics_manager.magics["line"]
    assert "px" not in ip.magics_manager.magics["cell"]
    assert transformer not in ip.input_transformers_cleanup
    ip.run_line_magic("load_ext", "ipy_multiengine")
    assert "px" in ip.magics_manager.magics["line"]


# ---------------------------------------------------------------------- tutorial flow
def test_tutorial_px_flow_and_automagic(ip, mec):
    mec.block = True
    cap, res = run(ip, "%px import numpy")
    assert res.success and isinstance(res.result, ResultList)
    n = [r["number"] for r in res.result]
    assert repr(res.result).splitlines()[:2] == ["<Results List>", f"[0] In [{n[0]}]: import numpy"]
    run(ip, "%px a = numpy.ones((2, 2))")
    cap, res = run(ip, "%px print(numpy.linalg.eigvals(a))")
    text = repr(res.result)
    assert (
        f"[3] In [{n[3] + 2}]: print(numpy.linalg.eigvals(a))\n[3] Out[{n[3] + 2}]: [2. 0.]" in text
    )
    assert "<Results List>" in cap.stdout
    cap, res = run(ip, "%result")
    assert repr(res.result) == text
    mec.push_function(dict(f=lambda x: 2.0 * x**4))
    mec.execute("y = f(4.0)")
    assert ip.automagic
    cap, res = run(ip, "px print(y)")
    assert res.success
    assert [r["stdout"] for r in res.result] == ["512.0\n"] * 4
    assert "[0] Out[" in cap.stdout and "512.0" in cap.stdout
    mec.scatter("x", range(64))
    run(ip, "px y = [i**10 for i in x]")
    assert mec.gather("y") == [i**10 for i in range(64)]


def test_autopx_nonblocking_then_px(ip, mec):
    """The tutorial's %autopx session: PendingResults while on, plain local code after."""
    mec.block = False
    run(ip, "%px import numpy")
    cap, res = run(ip, "%autopx")
    assert cap.stdout == "Auto Parallel Enabled\nType %autopx to disable\n"
    # the terminal's completeness check must see plain Python, not a %%px cell
    assert ip.input_transformer_manager.check_complete("max_evals = []") == ("complete", None)
    assert ip.input_transformer_manager.check_complete("for i in range(3):")[0] == "incomplete"
    cap, res = run(ip, "max_evals = []")
    assert isinstance(res.result, PendingResult)
    cap, res = run(
        ip,
        "for i in range(100):\n    a = numpy.random.rand(10,10)\n    a = a+a.transpose()\n"
        "    evals = numpy.linalg.eigvals(a)\n    max_evals.append(evals[0].real)\n",
    )
    assert isinstance(res.result, PendingResult)
    assert "max_evals" not in ip.user_ns
    cap, res = run(ip, "%autopx")
    assert cap.stdout == "Auto Parallel Disabled\n"
    mec.block = True
    cap, res = run(ip, 'px print("Average max eigenvalue is: ", sum(max_evals)/len(max_evals))')
    assert res.success
    assert all(r["stdout"].startswith("Average max eigenvalue is: ") for r in res.result)
    cap, res = run(ip, "local_only = 1")
    assert ip.user_ns["local_only"] == 1


def test_autopx_blocking_streams_and_keeps_local_magics(ip, mec):
    run(ip, "%autopx")
    try:
        cap, res = run(ip, "print('remote', 7)")
        assert res.result is None
        assert sorted(cap.stdout.splitlines()) == [f"[stdout:{i}] remote 7" for i in range(4)]
        cap, res = run(ip, "%pxconfig --no-stream")  # stays local while autopx is on
        assert magics_of(ip).pxconfig_.stream is False
        cap, res = run(ip, "%result")
        assert isinstance(res.result, ResultList)
        cap, res = run(ip, "%%px --targets 0\nprint('own options')")  # not wrapped a second time
        assert cap.stdout == "[stdout:0] own options\n"
    finally:
        run(ip, "%autopx")
    assert not magics_of(ip).transformer.enabled


# ---------------------------------------------------------------------- %%px options
def test_cell_streams_live_per_engine(ip, tmp_path):
    # the engine goes on only once the first line is on the screen: it must be shown while
    # the engine still runs (not when it is done), however late it comes
    go = tmp_path / "go"
    written = []

    class Recorder(io.StringIO):
        def write(self, s):
            written.append(s)
            if "[stdout:0] first" in s:
                go.touch()
            return super().write(s)

    old, sys.stdout = sys.stdout, Recorder()
    try:
        ip.run_cell_magic(
            "px",
            "--targets 0",
            "print('first', flush=True)\n"
            + held_code(go)
            + "print('second', 'released' if os.path.exists("
            + repr(str(go))
            + ") else 'after 30 s')",
        )
    finally:
        sys.stdout = old
    assert any("[stdout:0] first" in s for s in written), written
    assert any("[stdout:0] second released" in s for s in written), written


def test_cell_stdout_stderr_results(ip):
    cap, res = run(ip, "%%px\nimport sys\nprint('out', 1)\nprint('err', 2, file=sys.stderr)\n6*7")
    assert res.success and res.result is None
    assert sorted(
        cap.stdout.splitlines()[i]
        for i in range(len(cap.stdout.splitlines()))
        if "stdout" in cap.stdout.splitlines()[i]
    ) == [f"[stdout:{i}] out 1" for i in range(4)]
    assert sorted(cap.stderr.splitlines()) == [f"[stderr:{i}] err 2" for i in range(4)]
    results = [o for o in cap.outputs if "Out[" in o.data.get("text/plain", "")]
    assert sorted(o.metadata["engine"] for o in results) == [0, 1, 2, 3]
    assert all(
        o.data["text/plain"].startswith(f"Out[{o.metadata['engine']}:")
        and o.data["text/plain"].endswith("]: 42")
        for o in results
    )


@pytest.mark.parametrize(
    "spec,expected",
    [("all", [0, 1, 2, 3]), ("0", [0]), ("0,2", [0, 2]), ("1:3", [1, 2]), ("::2", [0, 2])],
)
def test_targets_option(ip, spec, expected):
    cap, res = run(ip, f"%%px --targets {spec}\nprint('here')")
    assert res.success
    assert sorted(cap.stdout.splitlines()) == [f"[stdout:{i}] here" for i in expected]
    cap, res = run(ip, f"%px --targets={spec} x = 1")
    assert [r["id"] for r in res.result] == expected


def test_targets_errors_are_usage_errors(ip):
    with pytest.raises(UsageError, match="not an engine id"):
        ip.run_cell_magic("px", "--targets 'os.system'", "pass")
    with pytest.raises(UsageError, match="unknown engine id 9"):
        ip.run_line_magic("px", "--targets 9 pass")


def test_client_targets_and_block_are_the_defaults(ip, mec):
    mec.targets = [1, 3]
    _cap, res = run(ip, "%px z = 1")
    assert [r["id"] for r in res.result] == [1, 3]
    mec.targets = "all"
    mec.block = False
    _cap, res = run(ip, "%px z = 2")
    assert isinstance(res.result, PendingResult)
    res.result.get_result()
    _cap, res = run(ip, "%px --block z = 3")
    assert isinstance(res.result, ResultList)


def test_noblock_out_and_result(ip, mec):
    _cap, res = run(ip, "%%px --noblock -o pr\nimport time; time.sleep(0.3); print('done')")
    pr = ip.user_ns["pr"]
    assert isinstance(pr, PendingResult) and res.result is pr
    _cap, res = run(ip, "%result")
    assert [r["stdout"] for r in res.result] == ["done\n"] * 4
    _cap, res = run(ip, "%pxresult")
    assert res.result is pr.get_result()
    _cap, res = run(ip, "%%px --out rl\nprint('x')")
    assert isinstance(ip.user_ns["rl"], ResultList) and len(ip.user_ns["rl"]) == 4


def test_no_stream_group_outputs(ip):
    code = "import sys\nprint('o1')\nprint('e1', file=sys.stderr)\nprint('o2')\n5"
    cap, _res = run(ip, f"%%px --no-stream --group-outputs engine --targets 0,1\n{code}")
    assert cap.stdout.splitlines() == [
        "[stdout:0] o1",
        "[stdout:0] o2",
        "[stdout:1] o1",
        "[stdout:1] o2",
    ]
    assert [o.metadata["engine"] for o in cap.outputs] == [0, 1]
    cap, _res = run(ip, f"%%px --no-stream --group-outputs type --targets 0,1\n{code}")
    assert cap.stdout.splitlines() == [
        "[stdout:0] o1",
        "[stdout:0] o2",
        "[stdout:1] o1",
        "[stdout:1] o2",
    ]
    assert cap.stderr.splitlines() == ["[stderr:0] e1", "[stderr:1] e1"]
    assert next(o.data["text/plain"] for o in cap.outputs).startswith("Out[0:")
    cap, _res = run(ip, f"%%px --no-stream --group-outputs order --targets 0,1\n{code}")
    assert sorted(cap.stdout.splitlines()) == sorted(
        ["[stdout:0] o1", "[stdout:0] o2", "[stdout:1] o1", "[stdout:1] o2"]
    )


def test_no_stream_engine_grouping_is_in_target_order(ip):
    cap, _res = run(
        ip,
        "%%px --no-stream --group-outputs engine\nimport time, random\n"
        "time.sleep(random.random() / 5)\nprint('hi')",
    )
    assert cap.stdout.splitlines() == [f"[stdout:{i}] hi" for i in range(4)]


def test_collapse_identical_output_and_tracebacks(ip):
    cap, res = run(ip, "%%px --no-stream --collapse\nprint('same')")
    assert cap.stdout.splitlines() == ["[stdout:0-3] same"]
    cap, res = run(ip, "%%px --collapse\n1/0")
    assert isinstance(res.error_in_exec, CompositeError)
    assert "[0-3:execute]:" in cap.stdout and "[1:execute]: \n" not in cap.stdout
    assert cap.stdout.count("ZeroDivisionError") >= 4  # the summary lists every engine


def test_errors_one_block_per_engine_and_cell_fails(ip, mec):
    # identical tracebacks collapse by default (issue 14.5): --no-collapse shows each one
    cap, res = run(ip, "%%px --no-collapse\nprint('before')\n1/0")
    assert not res.success and isinstance(res.error_in_exec, CompositeError)
    out = cap.stdout
    assert "CompositeError: one or more exceptions from call to method: execute" in out
    for i in range(4):
        assert f"[{i}:execute]: ZeroDivisionError: division by zero" in out
        assert f"[{i}:execute]: \n" in out
        assert f"[stdout:{i}] before" in out
    assert "magics.py" not in out  # no local frames, only the remote tracebacks
    with pytest.raises(CompositeError):
        ip.run_cell_magic("px", "--targets 1", "raise ValueError('bad')")
    assert mec.execute("1+1")  # engines still fine


def test_rich_outputs_are_labelled(ip):
    cap, _res = run(
        ip,
        "%%px --targets 0,2\nfrom IPython.display import display, HTML, Latex\n"
        "display(HTML('<b>hi</b>'))\ndisplay(Latex('$x$'))",
    )
    html = [o for o in cap.outputs if "text/html" in o.data]
    assert sorted(o.metadata["engine"] for o in html) == [0, 2]
    for o in html:
        assert (
            "<b>hi</b>" in o.data["text/html"]
            and f"[output:{o.metadata['engine']}]" in o.data["text/html"]
        )
        assert o.metadata["text/html"]["engine"] == o.metadata["engine"]
    latex = [o for o in cap.outputs if "text/latex" in o.data]
    assert sorted(o.metadata["text/latex"]["engine"] for o in latex) == [0, 2]


def test_progress_after(ip):
    # one progress mechanism for every call (issue 13.4): the tqdm bar mec.map shows, which
    # replaced the "[progress] n/4 engines done" lines of before
    cap, _res = run(ip, "%%px --progress-after 0.2\nimport time; time.sleep(0.8)")
    frames = cap.stderr.replace("\r", "\n").splitlines()
    assert any(f.startswith("%px:") and "0/4" in f and "waiting for 0-3" in f for f in frames), (
        frames
    )
    assert any(f.startswith("%px:") and "4/4" in f for f in frames), frames
    cap, _res = run(ip, "%%px --progress-after 30\nx = 1")
    assert "%px:" not in cap.stderr


def test_streamed_lines_are_not_written_after_the_progress_bar(ip, monkeypatch):
    """With --progress-after, engines' lines go above the bar (it is cleared and redrawn), not
    onto the bar's terminal line: seen as a terminal shows it (\\r returns to column 0)."""
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    res = ip.run_cell(
        "%%px --progress-after 0.1 --targets 0,1\nimport time\n"
        "for i in range(4):\n    print('line', i, flush=True); time.sleep(0.25)"
    )
    assert res.success, res.error_in_exec
    shown = screen_lines(screen.getvalue())
    assert "%px:" in screen.getvalue()  # the bar was drawn
    streamed = [ln for ln in shown if "[stdout:" in ln]
    assert len(streamed) == 8 and all(ln.startswith("[stdout:") for ln in streamed), shown


def test_timeout_then_result(ip):
    cap, res = run(
        ip,
        "%%px --timeout 0.2\nimport time; print('early', flush=True); time.sleep(1); print('late')",
    )
    assert isinstance(res.error_in_exec, TimeoutError)
    assert "not done after 0.2 s" in cap.stdout
    cap, res = run(ip, "%result --timeout 10")
    assert [r["stdout"] for r in res.result] == ["early\nlate\n"] * 4


def test_result_timeout_is_one_line_like_px_timeout(ip):
    """%result --timeout S on a command still running: a one-line TimeoutError (as %px
    --timeout gives), not a traceback through the magic's frames."""
    cap, res = run(ip, "%px --noblock import time; time.sleep(1.5)")
    cap, res = run(ip, "%result --timeout 0.2")
    assert isinstance(res.error_in_exec, TimeoutError)
    assert "not finished after 0.2 s" in cap.stdout and "magics.py" not in cap.stdout, cap.stdout
    run(ip, "%result --timeout 10")


def test_local_runs_here_too(ip):
    _cap, _res = run(ip, "%%px --local\nboth = 21 * 2")
    assert ip.user_ns["both"] == 42
    _cap, _res = run(ip, "%px --local both2 = 3")
    assert ip.user_ns["both2"] == 3
    assert client_mod.get_active().pull("both") == [42] * 4


def test_pxconfig_sets_defaults(ip):
    cap, res = run(ip, "%pxconfig")
    assert "stream: True" in cap.stdout and "targets: None" in cap.stdout
    run(ip, "%pxconfig --targets ::2 --no-stream --collapse --timeout 30 --progress-after none")
    cfg = magics_of(ip).pxconfig_
    assert (cfg.targets, cfg.stream, cfg.collapse, cfg.timeout) == ([0, 2], False, True, 30.0)
    cap, res = run(ip, "%%px\nprint('cfg')")
    assert cap.stdout.splitlines() == ["[stdout:0,2] cfg"]
    run(ip, "%pxconfig --no-line-results --noblock")
    cap, res = run(ip, "%px print('p')")
    assert isinstance(res.result, PendingResult)
    res.result.get_result()
    run(ip, "%pxconfig --reset")
    assert magics_of(ip).pxconfig_.targets is None and magics_of(ip).pxconfig_.block is None
    with pytest.raises(UsageError):
        ip.run_line_magic("pxconfig", "--group-outputs nope")


def test_pxconfig_bad_value_sets_nothing_and_unknown_targets_are_refused(ip, mec):
    """A bad value in %pxconfig is a UsageError that leaves every default as it was (not the
    options before it applied), and an engine id the client does not have is refused there,
    not stored to make every later %px fail."""
    before = magics_of(ip).pxconfig_.describe()
    for bad in (
        "--block --timeout abc",
        "--no-stream --progress-after -1",
        "--collapse --targets 9",
        "--noblock --targets 0,7",
        "--reset --no-stream --timeout x",
    ):
        with pytest.raises(UsageError):
            ip.run_line_magic("pxconfig", bad)
        assert magics_of(ip).pxconfig_.describe() == before, bad
    with pytest.raises(UsageError, match=r"unknown engine id 9.*valid ids: \[0, 1, 2, 3\]"):
        ip.run_line_magic("pxconfig", "--targets 9")
    ip.run_line_magic("pxconfig", "--targets 1,3")
    assert magics_of(ip).pxconfig_.targets == [1, 3]


def test_a_nan_timeout_is_refused_before_the_code_is_sent(ip, mec):
    """``%px --timeout nan CODE`` ran CODE on every engine and only then failed inside the
    wait with a ValueError (no output shown); ``%pxconfig --timeout nan`` was stored and made
    every later %px do the same. A NaN is no number of seconds: a UsageError, nothing sent."""
    ip.run_line_magic("px", "y = 0")
    for line in ("--timeout nan y = 7", "--progress-after nan y = 7", "--timeout NaN y = 7"):
        with pytest.raises(UsageError, match=r"(?i)nan"):
            ip.run_line_magic("px", line)
    assert mec.pull("y") == [0, 0, 0, 0]
    before = magics_of(ip).pxconfig_.describe()
    with pytest.raises(UsageError, match=r"(?i)nan"):
        ip.run_line_magic("pxconfig", "--timeout nan")
    assert magics_of(ip).pxconfig_.describe() == before
    with pytest.raises(UsageError, match=r"(?i)nan"):
        ip.run_line_magic("result", "--timeout nan")
    assert ip.run_line_magic("px", "--timeout inf y = 8") is not None
    assert mec.pull("y") == [8, 8, 8, 8]


def test_line_form_options_and_code_verbatim(ip):
    res = ip.run_line_magic("px", "--targets 0  s = 'a  --b   c'")
    assert res[0]["input"]["raw"] == "s = 'a  --b   c'"
    assert client_mod.get_active().pull("s", targets=0) == ["a  --b   c"]
    with capture_output() as cap:
        res = ip.run_line_magic("px", "--stream --targets 1 print('streamed')")
    assert res is None and cap.stdout == "[stdout:1] streamed\n"
    with pytest.raises(UsageError):
        ip.run_line_magic("px", "--targets 0")


def test_autopx_with_arguments_is_refused_and_changes_nothing(ip):
    """``%autopx --targets 1`` toggled autopx on and ignored the argument: every later cell ran
    on all engines. It is refused, saying how to choose the engines, and the mode is left as
    it was."""
    magics = magics_of(ip)
    assert not magics.transformer.enabled
    with pytest.raises(UsageError, match=r"%autopx takes no arguments \(got '--targets 1'\)"):
        ip.run_line_magic("autopx", "--targets 1")
    assert not magics.transformer.enabled
    with capture_output():
        ip.run_line_magic("autopx", "# a comment is no argument")
        assert magics.transformer.enabled
        ip.run_line_magic("autopx", "")
    assert not magics.transformer.enabled


def test_a_mistyped_option_is_named_not_sent_to_the_engines_as_code(ip):
    """``%px --target 0 x = 1`` (for --targets) went to every engine as code and came back as
    each engine's SyntaxError; an unknown option that cannot start Python code is named, with
    the option meant. Code that starts with '-' still runs: ``%px --x`` (valid Python) and
    anything after ``--``."""
    mec = client_mod.get_active()
    with pytest.raises(UsageError, match=r"unknown option --target; did you mean --targets\?"):
        ip.run_line_magic("px", "--target 0 x = 1")
    with pytest.raises(UsageError, match=r"unknown option --bogus"):
        ip.run_line_magic("px", "--bogus print(1)")
    # `--help` is valid Python (-(-help)): it went to every engine, each raising TypeError
    with pytest.raises(UsageError, match=r"unknown option --help; %px\? shows the help"):
        ip.run_line_magic("px", "--help")
    with pytest.raises(UsageError, match=r"unknown option --help"):
        ip.run_line_magic("px", "--targets 0 --help")
    ip.run_line_magic("px", "x = 3")
    assert ip.run_line_magic("px", "--targets 0 --x")[0]["input"]["raw"] == "--x"
    assert mec.pull("x", targets=0) == [3]
    res = ip.run_line_magic("px", "--targets 0 -- --x")
    assert res[0]["input"]["raw"] == "--x"


def test_the_option_check_compiles_code_silently_and_under_warnings_as_errors(ip):
    """Telling code that starts with '-' from a mistyped option compiles it here: its
    SyntaxWarning was printed in the user's console (the engines print their own), and with
    warnings as errors (``-W error``) the warning made valid code an "unknown option"."""
    import warnings

    ip.run_line_magic("px", "x = 3")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = ip.run_line_magic("px", "--targets 0 --x is 3")
    assert res[0]["input"]["raw"] == "--x is 3"
    assert not [w for w in seen if issubclass(w.category, SyntaxWarning)], [
        str(w.message) for w in seen
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = ip.run_line_magic("px", "--targets 0 --x is 3")
    assert res[0]["input"]["raw"] == "--x is 3"


def test_notebook_rendering_updates_areas_in_place(ip):
    """With a kernel (forced here) each engine's stream is one display area updated in place."""
    magics_of(ip).notebook = True
    with capture_output() as cap:
        ip.run_cell_magic(
            "px",
            "--targets 0,1",
            "import time\nfor i in range(3):\n"
            "    print(f'step {i}', flush=True); time.sleep(0.15)\n7",
        )
    areas = [o for o in cap.outputs if o.metadata.get("stream") == "stdout"]
    # one area per engine, whatever the number of updates
    finals = {}
    for o in areas:
        finals[o.metadata["engine"]] = o.data["text/plain"]
    assert finals == {
        0: "[stdout:0] step 0\nstep 1\nstep 2",
        1: "[stdout:1] step 0\nstep 1\nstep 2",
    }
    results = [o for o in cap.outputs if o.data.get("text/plain", "").startswith("Out[")]
    assert sorted(o.metadata["engine"] for o in results) == [0, 1]


def test_ctrl_c_interrupts_engines_and_keeps_them_usable(ip, mec):
    started = threading.Event()

    class Watch(io.StringIO):
        def write(self, s):
            n = super().write(s)
            if all(f"[stdout:{i}] started" in self.getvalue() for i in range(4)):
                started.set()  # every engine is inside the cell
            return n

    def interrupter():
        if started.wait(20):
            _thread.interrupt_main()

    old, sys.stdout = sys.stdout, Watch()
    t = threading.Thread(target=interrupter)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            ip.run_cell_magic(
                "px",
                "",
                "import time\nprint('started', flush=True)\ntime.sleep(30)\nprint('never')",
            )
        shown = sys.stdout.getvalue()
    finally:
        sys.stdout = old
        t.join()
    assert time.monotonic() - t0 < 15
    # what was printed before the interrupt is shown (an engine interrupted before its
    # print() may have printed nothing)
    assert re.search(r"\[stdout:\d\] started", shown) and "never" not in shown
    res = mec.execute("print('alive')")
    assert [r["stdout"] for r in res] == ["alive\n"] * 4


@pytest.mark.parametrize("when", ["laying out", "before laying out"])
def test_ctrl_c_before_the_wait_interrupts_engines(ip, mec, monkeypatch, when, tmp_path):
    """A Ctrl-C (a real SIGINT) that comes once the code is sent but before the wait, while a
    notebook's ``%%px`` cell lays out its engines' output areas (each display flushes the
    kernel's streams: slow on a loaded machine) or just before, interrupts the engines as one
    during the wait does, and the output is laid out all the same. It was raised out of the
    layout: the engines kept running and the notebook's next cell waited for them."""
    from contextlib import contextmanager

    from ipy_multiengine import magics, render

    signalled = []
    marks = tmp_path / "started"
    marks.mkdir()

    def sigint_once() -> None:
        if not signalled:  # the SIGINT the kernel got, at this point
            signalled.append(True)
            # once every engine runs the code: one interrupted before it began (between
            # messages) loses its request instead, another story
            deadline = time.monotonic() + 20
            while len(list(marks.iterdir())) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)  # polls for a condition (the engines started), bounded
            signal.raise_signal(signal.SIGINT)

    if when == "laying out":
        real_display = render._display

        def display(*args, **kwargs):
            sigint_once()  # at the first area of the layout
            return real_display(*args, **kwargs)

        monkeypatch.setattr(render, "_display", display)
    else:
        real_after = magics.interrupt_after

        @contextmanager
        def interrupt_after():
            sigint_once()  # the handler is not swapped yet: KeyboardInterrupt from here
            with real_after():
                yield

        monkeypatch.setattr(magics, "interrupt_after", interrupt_after)
    finished = []

    class Renderer(magics.Renderer):
        def finish(self) -> None:
            finished.append(self.eids)
            super().finish()

    monkeypatch.setattr(magics, "Renderer", Renderer)
    magics_of(ip).notebook = True  # the layout of a kernel's cell (forced here)
    _interrupted_as_one(
        ip,
        mec,
        "",
        "import os, pathlib, time\n"
        f"pathlib.Path({str(marks)!r}, str(os.getpid())).touch()\n"
        "time.sleep(30)\nprint('never')",
    )
    assert signalled
    # the engines' areas were laid out (once): one display per area reserved for each engine
    assert finished == [[0, 1, 2, 3]]  # the engines' output, laid out once, shown to the end


def _interrupted_as_one(ip, mec, line: str, code: str) -> None:
    """Run ``%%px line`` (``code``, interrupted by a SIGINT it arranges) and check that the
    Ctrl-C interrupted every engine within seconds and left them usable."""
    t0 = time.monotonic()
    try:
        with capture_output() as cap, pytest.raises(KeyboardInterrupt):
            ip.run_cell_magic("px", line, code)
        pr = magics_of(ip).last
        assert pr.wait(10), "the engines were not interrupted"
    finally:
        left = magics_of(ip).last
        if left is not None and not left.ready():  # left running by a failure: not the next test's
            mec.interrupt()
            left.wait(10)
    assert time.monotonic() - t0 < 15
    assert "%px: interrupted engines 0-3" in cap.stderr
    errors = [f.exception() for f in pr.futures]
    assert all(getattr(e, "ename", None) == "KeyboardInterrupt" for e in errors), errors
    res = mec.execute("print('alive')")
    assert [r["stdout"] for r in res] == ["alive\n"] * 4


def test_ctrl_c_in_the_local_part_of_a_cell_interrupts_the_engines(ip, mec, tmp_path):
    """``%%px --local``: a Ctrl-C while the cell's code runs here was caught by IPython's
    ``run_cell`` (a KeyboardInterrupt traceback) and the cell then waited for the engines,
    which went on running: one Ctrl-C stopped only the local half of the cell."""
    import os

    marks = tmp_path / "started"
    marks.mkdir()
    code = (
        "import os, pathlib, signal, time\n"
        f"if os.getpid() == {os.getpid()}:\n"
        "    _end = time.monotonic() + 20\n"  # the SIGINT once every engine runs the code
        f"    _marks = pathlib.Path({str(marks)!r})\n"
        "    while len(list(_marks.iterdir())) < 4 and time.monotonic() < _end:\n"
        "        time.sleep(0.02)\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "else:\n"
        f"    pathlib.Path({str(marks)!r}, str(os.getpid())).touch()\n"
        "    time.sleep(30)\n"
        "    print('never')"
    )
    _interrupted_as_one(ip, mec, "--local", code)


def test_no_client_says_how_to_start_one(ip, mec):
    client_mod.deactivate()
    try:
        with pytest.raises(UsageError, match="ipmulti start"):
            ip.run_line_magic("px", "x = 1")
    finally:
        mec.activate()


def test_no_client_connects_to_running_default_cluster(ip, cluster, mec):
    from ipy_multiengine.cluster import cluster_file_path

    default = cluster_file_path("default")
    shutil.copy(cluster.cluster_file, default)
    client_mod.deactivate()
    try:
        with capture_output() as cap:
            res = ip.run_line_magic("px", "via_default = 1")
        assert "connected to the running default cluster" in cap.stderr
        active = client_mod.get_active()
        assert active is not None and active is not mec
        assert active.cluster_file == str(default)
        assert len(res) == 4 and mec.pull("via_default") == [1] * 4
        # %unload_ext closes the client %px connected by itself (nobody else holds it)
        ip.run_line_magic("unload_ext", "ipy_multiengine")
        assert active.closed
        ip.run_line_magic("load_ext", "ipy_multiengine")
    finally:
        default.unlink(missing_ok=True)
        other = client_mod.get_active()
        if other is not None and other is not mec:
            other.close()
        mec.activate()
    json.loads(Path(cluster.cluster_file).read_text())  # the session cluster is untouched


def test_init_runs_now_and_is_recorded_for_restarts(ip, mec):
    try:
        cap, res = run(ip, "%%px --init\nINIT_VALUE = 5\nprint('set up')")
        assert res.success, cap.stdout
        assert cap.stdout.splitlines() == [f"[stdout:{i}] set up" for i in range(4)]
        assert mec.on_start_code[-1] == "INIT_VALUE = 5\nprint('set up')"
        assert mec.pull("INIT_VALUE") == [5] * 4
        cap, res = run(ip, "%px --init INIT_OTHER = 1")
        assert isinstance(res.result, ResultList) and mec.on_start_code[-1] == "INIT_OTHER = 1"
        with pytest.raises(UsageError, match="no --targets"):
            ip.run_cell_magic("px", "--init --targets 0", "x = 1")
        n = len(mec.on_start_code)
        with pytest.raises(CompositeError):
            ip.run_cell_magic("px", "--init", "1/0")
        assert len(mec.on_start_code) == n  # failing setup code is not recorded
    finally:
        mec.clear_on_start()


# ---------------------------------------------------------------------- issue 11 / 12 regressions
def _shown(cap) -> str:
    """Everything a user saw: printed text and the text/plain of every display."""
    return (
        cap.stdout + cap.stderr + "".join(o.data.get("text/plain", "") + "\n" for o in cap.outputs)
    )


def test_h09_one_line_px_shows_all_output_then_the_error(ip, mec):
    mec.scatter("i", [0, 1, 2, 3])  # engine 0: i == [0] succeeds, engines 1-3 fail
    cap, res = run(ip, "%px print('checkpoint', i); 1/0 if i[0] else 42")
    assert isinstance(res.error_in_exec, CompositeError)
    shown = _shown(cap)
    for eid in range(4):
        assert f"[stdout:{eid}] checkpoint [{eid}]" in shown, shown
    assert re.search(r"Out\[0:\d+\]: 42", shown), shown
    # the same for a --no-stream cell and for an engine that fails on the line form of %px -o
    cap, res = run(ip, "%px -o err print('again', i); 1/0 if i[0] else 43")
    assert isinstance(ip.user_ns["err"], CompositeError)
    assert re.search(r"Out\[0:\d+\]: 43", _shown(cap)) and "[stdout:3] again [3]" in _shown(cap)


def test_h09_failing_init_shows_what_the_engines_printed(ip, mec):
    try:
        cap, res = run(ip, "%%px --init\nprint('setting up')\n1/0")
        assert isinstance(res.error_in_exec, CompositeError)
        assert "[stdout:0] setting up" in _shown(cap) and "[stdout:3] setting up" in _shown(cap)
    finally:
        mec.clear_on_start()


def test_h10_output_of_apply_map_parallel_reaches_the_user_and_the_pending_result(ip, mec):
    def f(x):
        import warnings

        print("processing", x)
        warnings.warn(f"careful with {x}", stacklevel=1)
        return x

    with capture_output() as cap:
        assert mec.map(f, range(4)) == [0, 1, 2, 3]
    for x in range(4):  # engine x got item x (contiguous blocks)
        assert f"[stdout:{x}] processing {x}" in cap.stdout, cap.stdout
        assert re.search(rf"\[stderr:{x}\] .*UserWarning: careful with {x}", cap.stderr), cap.stderr
    with capture_output() as cap:
        assert mec.map(f, range(6), balanced=True) == list(range(6))
    assert sorted(int(line.split()[-1]) for line in cap.stdout.splitlines()) == list(range(6)), (
        cap.stdout
    )
    assert all(re.match(r"\[stdout:\d\] processing \d$", line) for line in cap.stdout.splitlines())
    with capture_output() as cap:
        assert mec.apply(lambda: print("hello from apply"), targets=[1, 2]) == [None, None]
    assert sorted(cap.stdout.splitlines()) == [
        "[stdout:1] hello from apply",
        "[stdout:2] hello from apply",
    ]

    @mec.parallel()
    def g(x):
        from IPython.display import display

        display({"answer": x}, raw=False)
        return x * 2

    with capture_output() as cap:
        assert g(range(4)) == [0, 2, 4, 6]
    shown = _shown(cap)
    assert all(f"[output:{e}]" in shown for e in range(4)), shown

    # kept on the PendingResult, per engine, blocking or not (nothing printed for block=False)
    with capture_output() as cap:
        pr = mec.apply(lambda: print("kept"), block=False)
        pr.get_result()
    assert pr.stdout == ["kept\n"] * 4 and pr.stderr == [""] * 4 and cap.stdout == ""
    pr = mec.map(f, range(4), block=False)
    pr.get_result()
    assert pr.stdout == [f"processing {x}\n" for x in range(4)]
    assert all("careful with" in s for s in pr.stderr)
    pr = mec.apply(
        lambda: __import__("IPython.display").display.display("rich"), targets=0, block=False
    )
    pr.get_result()
    assert pr.outputs[0][0]["output_type"] == "display_data"
    assert pr.outputs[0][0]["data"]["text/plain"] == "'rich'"
    # a failing call keeps (and shows) what was printed before the error
    with capture_output() as cap, pytest.raises(CompositeError):
        mec.apply(lambda: (print("before the error"), 1 / 0), targets=[0, 3])
    assert (
        "[stdout:0] before the error" in cap.stdout and "[stdout:3] before the error" in cap.stdout
    )
    assert mec.last.stdout == ["before the error\n"] * 2


def test_o10_autopx_keeps_every_extension_magic_local(ip, mec):
    mec.execute("o10 = 1")
    run(ip, "%autopx")
    try:
        for cell in (
            "%pxstatus",
            "%pxdiff o10",
            "pxstatus",
            "%pxconfig",
            "%%px --targets 0\no10 = 1",
        ):
            cap, res = run(ip, cell)
            assert res.success, (cell, res.error_in_exec, cap.stdout)
        cap, res = run(ip, "%pxdiff o10")
        assert res.result.identical  # the local magic's value, not a PendingResult/ResultList
        cap, res = run(ip, "  \n# a comment first\n\n%pxstatus")
        assert res.success and not isinstance(res.result, (ResultList, PendingResult))
        # a comment (and blank lines) before %autopx: it still turns autopx off
        cap, res = run(ip, "# done with the engines\n\n%autopx")
        assert "Auto Parallel Disabled" in cap.stdout
        assert not magics_of(ip).transformer.enabled
        run(ip, "%autopx")
        # code whose first word is a magic's name stays Python code for the engines
        cap, res = run(ip, "pxstatus = 5")
        assert "pxstatus" not in ip.user_ns and mec.pull("pxstatus") == [5] * 4
    finally:
        if magics_of(ip).transformer.enabled:
            run(ip, "%autopx")
        mec.execute("del pxstatus")


def test_autopx_px_with_options_is_the_local_magic_minus_code_stays_code(ip, mec):
    """Under ``%autopx``, ``px --targets 0 CODE`` and ``px -t0 CODE`` (automagic ``%px`` with
    its options, as typed outside autopx) were sent to every engine as code, because a word
    followed by '-' may be a subtraction: a SyntaxError on each. A line that is not Python
    as it stands is the magic; ``px - x`` (valid Python) still goes to the engines."""
    mec.execute("px = 10; x = 3")
    run(ip, "%autopx")
    try:
        for line in ("px --targets 0 print('zero')", "px -t0 print('zero')"):
            cap, res = run(ip, line)
            assert res.success, (line, res.error_in_exec)
            assert [r["id"] for r in res.result] == [0], (line, res.result)
            assert res.result[0]["stdout"] == "zero\n"
        cap, res = run(ip, "px -x")
        assert res.success, res.error_in_exec
        shown = [o.data.get("text/plain", "") for o in cap.outputs]
        assert [t.split(": ")[-1] for t in shown] == ["7"] * 4, shown
    finally:
        if magics_of(ip).transformer.enabled:
            run(ip, "%autopx")


@pytest.mark.parametrize(
    "typed", ["exit", "quit", "exit()", "quit()", "  exit  ", "# bye\nexit", "%exit"]
)
def test_o10_exit_under_autopx_is_refused_with_a_message(ip, mec, typed):
    ids = list(mec.get_ids())
    numbers = [r["number"] for r in mec.execute("pass")]
    run(ip, "%autopx")
    try:
        cap, _res = run(ip, typed)
        assert "not sent to the engines" in cap.stderr and "%autopx" in cap.stderr
        assert not ip.exit_now
    finally:
        run(ip, "%autopx")
    # nothing reached the engines: their execution counts moved by one (this execute) only
    assert [r["number"] for r in mec.execute("pass")] == [n + 1 for n in numbers]
    assert list(mec.get_ids()) == ids


UPDATED = (
    "from IPython.display import display\nh = display('step 1', display_id=True)\nh.update('step "
    "2 (final)')"
)


@pytest.mark.parametrize("notebook", [True, False])
def test_o12_collected_output_shows_a_display_s_final_content(ip, notebook):
    magics_of(ip).notebook = notebook
    for cell in (
        f"%%px --no-stream --targets 0,1\n{UPDATED}",
        "%px --targets 0,1 h = display('A', display_id=True); h.update('B (final)')",
    ):
        cap, res = run(ip, cell)
        assert res.success, res.error_in_exec
        texts = [d.get("text/plain", "") for d in cell_outputs(cap)]
        rich = [t for t in texts if t.startswith("[output:")]
        assert len(rich) == 2 and all("final" in t for t in rich), texts
        assert not any("step 1" in t or t.endswith("'A'") for t in texts), texts


@pytest.mark.parametrize(
    "shown", ["%%px --targets 0,1\n", "%%px --no-stream --targets 0,1\n", "%px --targets 0,1 "]
)
def test_o12_display_updated_from_a_later_cell_on_its_engine_only(ip, shown):
    """As in a notebook kernel, a display handle updated in a later cell updates the output it
    made, on that engine only (both engines used the same display_id)."""
    magics_of(ip).notebook = True
    cap1, res = run(
        ip, shown + "from IPython.display import display; h = display('A', display_id='same')"
    )
    assert res.success, res.error_in_exec
    import IPython.display

    with pytest.MonkeyPatch.context() as mp:
        # the capture forgets everything at a clear_output; a frontend applies an update of an
        # earlier cell's display at once, and clearing the later cell does not undo it
        mp.setattr(IPython.display, "clear_output", lambda wait=False: None)
        cap2, res = run(ip, shown.replace("0,1", "0") + "h.update('B (updated)')")
    assert res.success, res.error_in_exec

    class Both:
        outputs = cap1.outputs + cap2.outputs

    texts = sorted(
        d.get("text/plain", "") for d in cell_outputs(Both) if "[output:" in d.get("text/plain", "")
    )
    assert texts == ["[output:0] 'B (updated)'", "[output:1] 'A'"], texts


def test_notebook_long_line_without_newline_is_not_resent_whole_at_each_update(ip):
    """An engine printing one ever longer line (dots with end='') fills areas of at most about
    AREA_LIMIT characters: no update carries the whole line so far, and nothing is lost."""
    from ipy_multiengine.render import AREA_LIMIT

    magics_of(ip).notebook = True
    cap, res = run(
        ip,
        "%%px --targets 0\nimport time\nfor i in range(60):\n"
        "    print('x' * 1000, end='', flush=True); time.sleep(0.02)",
    )
    assert res.success, res.error_in_exec
    sizes = [len(o.data.get("text/plain", "")) for o in cap.outputs]
    assert max(sizes) <= 3 * AREA_LIMIT < 60000, sizes  # an area plus what came in between
    final = [d["text/plain"] for d in cell_outputs(cap)]
    assert all(t.startswith("[stdout:0] ") for t in final), final
    assert "".join(t[len("[stdout:0] ") :] for t in final) == "x" * 60000


def test_o13_clear_output_wait_loop_keeps_one_output_updated_in_place(ip):
    magics_of(ip).notebook = True
    cap, res = run(
        ip,
        "%%px --targets 0,1\nfrom IPython.display import display, clear_output, HTML\n"
        "for i in range(5):\n    clear_output(wait=True)\n    display(HTML(f'<b>frame {i}</b>'))",
    )
    assert res.success, res.error_in_exec
    added = [
        o
        for o in cap.outputs
        if not o.update and not re.fullmatch(r"\[output:\d\]", o.data.get("text/plain", ""))
    ]
    assert len(added) == 2, [o.data for o in cap.outputs]  # one display per engine, never more
    final = cell_outputs(cap)
    labels = [d for d in final if re.fullmatch(r"\[output:\d\]", d["text/plain"])]
    assert [d["text/plain"] for d in labels] == ["[output:0]", "[output:1]"], final
    final = [d for d in final if d not in labels]
    assert sorted(d["text/html"].rsplit(">", 2)[-2] for d in final) == [
        "<b>frame 4</b",
        "<b>frame 4</b",
    ] or all("frame 4" in d["text/html"] for d in final), final
    assert not any(
        d.get("text/plain") == "" for d in final
    )  # no blank outputs saved into the .ipynb
    # clear_output(wait=True) with text: the engine's stream area shows only the last frame
    cap, res = run(
        ip,
        "%%px --targets 0\nfrom IPython.display import clear_output\n"
        "for i in range(3):\n    clear_output(wait=True)\n    print('tick', i, flush=True)",
    )
    final = cell_outputs(cap)
    assert [d["text/plain"] for d in final] == ["[stdout:0] tick 2"], final


def test_o14_pager_output_is_shown_labelled_by_engine(ip, mec):
    doc = "Return the number of items"
    res = mec.execute("len?", targets=[0, 1])
    assert all((r["outputs"][0]["metadata"] or {}).get("pager") for r in res)
    assert doc in res[0]["outputs"][0]["data"]["text/plain"]
    assert re.search(rf"\[1\] Out\[\d+\]: .*{doc}", repr(res), re.S)
    cap, res = run(ip, "%px --targets 0,1 len?")  # the Results List shows it once per engine
    assert isinstance(res.result, ResultList) and repr(res.result).count(doc) == 2
    for notebook in (False, True):
        magics_of(ip).notebook = notebook
        for cell in ("%%px --targets 0,1\n%pdoc len", "%%px --no-stream --targets 0,1\n%pdoc len"):
            cap, res = run(ip, cell)
            assert res.success, res.error_in_exec
            pages = [o for o in cap.outputs if doc in o.data.get("text/plain", "")]
            assert sorted(o.metadata["engine"] for o in pages) == [0, 1], (cell, cap.outputs)
            assert all(
                o.data["text/plain"].startswith(f"[output:{o.metadata['engine']}]") for o in pages
            )
    cap, res = run(ip, "%%px --targets 0\n%psource len")  # no Python source for a builtin: said so
    assert res.success


@pytest.mark.timeout(120)
def test_o15_compare_and_status_list_restarting_engines_as_skipped(ip):
    import os

    from ipy_multiengine import Cluster

    with Cluster(n=2, profile=f"o15-{os.getpid()}") as mec2:
        mec2.execute("x = 1")
        mec2.on_start("import time; time.sleep(4)")  # keeps the restarting engine not ready a while
        t = threading.Thread(target=mec2.restart, args=(1,), kwargs={"timeout": 60})
        t.start()
        try:
            deadline = time.monotonic() + 20
            while mec2.engines[1]["ready"] and time.monotonic() < deadline:
                time.sleep(0.005)  # polling for the restart to begin, bounded by the deadline
            assert not mec2.engines[1]["ready"], "the restart never began"
            d = mec2.diff("x")
            assert d.groups == [(1, [0])] and list(d.skipped) == [1], (d.groups, d.skipped)
            text = repr(d)
            assert "all 1 engines" not in text and "skipped" in text and "engine 1" in text, text
            with capture_output() as cap:
                table = mec2.pull_table("x")
            skipped = table.attrs["skipped"] if hasattr(table, "attrs") else table.skipped
            assert list(skipped) == [1] and "skipped engine 1" in cap.stderr
            mec2.activate()
            cap, res = run(ip, "%pxdiff x")
            assert "skipped" in repr(res.result)
            status = mec2.status()
            row = next(r for r in status.cells() if r["id"] == "1")
            assert row["rss"] == "-" and row["cpu"] == "-" and row["pid"] == "-", row
        finally:
            t.join()
        assert mec2.diff("x").skipped == {}  # restarted: compared again (x is gone there: missing)
        assert mec2.diff("x").missing == [1]


def test_targets_module_is_the_one_resolver(mec):
    from ipy_multiengine import targets

    assert targets.resolve("all", [0, 1, 2]) == [0, 1, 2]
    assert targets.resolve([2, "g"], [0, 1, 2], {"g": [0]}) == [2, 0]
    with pytest.raises(ValueError, match="unknown engine id 7; valid ids"):
        targets.resolve(7, [0, 1])
    with pytest.raises(ValueError, match="unknown engine id 7"):
        mec.execute("pass", targets=7)  # the client resolves through it
    assert targets.parse_targets("::2", [0, 1, 2, 3]) == [0, 2]
    with pytest.raises(targets.TargetsError):
        targets.parse_targets("1:2:3:4", [0, 1])


def test_h10_output_after_a_timeout_stays_on_the_pending_result(ip, mec):
    from ipy_multiengine.errors import TimeoutError as METimeout

    def slow():
        import time

        print("early", flush=True)
        time.sleep(1.0)
        print("late")

    with capture_output() as cap, pytest.raises(METimeout):
        mec.apply(slow, targets=0, timeout=0.4)
    assert "[stdout:0] early" in cap.stdout and "late" not in cap.stdout
    pr = mec.last
    with capture_output() as cap:
        pr.get_result(timeout=10)
        mec.execute("pass")  # an unrelated wait does not print the timed-out call's output
    assert "late" not in cap.stdout
    assert pr.stdout == ["early\nlate\n"]


def test_h10_apply_output_shown_while_another_thread_serves_the_mailbox(mec):
    """A blocking apply's output is shown even when another thread is busy serving the shared
    mailbox of engines' prompts and output when the call ends (it is not dropped at close)."""
    from ipy_multiengine import stdin

    busy, release = threading.Event(), threading.Event()

    def occupied():  # another thread's served item (e.g. a prompt being answered there)
        busy.set()
        release.wait(20)

    stdin.post(occupied)
    server = threading.Thread(target=stdin.serve_pending)
    server.start()
    assert busy.wait(10)
    try:
        with capture_output() as cap:
            assert mec.apply(lambda: print("from the engine") or 7, targets=[0, 1]) == [7, 7]
    finally:
        release.set()
        server.join(10)
    assert sorted(ln for ln in cap.stdout.splitlines() if "from the engine" in ln) == [
        "[stdout:0] from the engine",
        "[stdout:1] from the engine",
    ], cap.stdout


def test_result_of_a_named_set_is_its_own_command_never_another_s(ip, mec):
    """``%result_even`` before any ``%px_even`` returned the default set's last command (on
    engines outside the set): the wrong call's results, silently. It says the set has run
    nothing yet; after a ``%px_even`` it is that command."""
    mec.activate(suffix="_even", targets=[0, 2])
    try:
        _cap, res = run(ip, "%px print('default set')")
        assert res.success, res.error_in_exec
        _cap, res = run(ip, "%result_even")
        assert isinstance(res.error_in_exec, UsageError), res.result
        assert "%px_even" in str(res.error_in_exec), res.error_in_exec
        _cap, res = run(ip, "%px_even print('even set')")
        assert res.success, res.error_in_exec
        _cap, res = run(ip, "%result_even")
        assert [r["id"] for r in res.result] == [0, 2] and "even set" in res.result[0]["stdout"]
    finally:
        client_mod.deactivate("_even")


def test_result_of_a_named_set_after_a_failed_or_timed_out_init_is_that_init(ip, mec):
    """``%px_even --init`` that failed or timed out did not become the set's last command:
    ``%result_even`` gave the set's command before (``%result`` gives the init's error again,
    and the timeout's message says ``%result`` waits for its output). It is the init now."""
    mec.activate(suffix="_even", targets=[0, 2])
    try:
        _cap, res = run(ip, "%px_even print('before')")
        assert res.success, res.error_in_exec
        _cap, res = run(ip, "%px_even --init 1/0")
        assert isinstance(res.error_in_exec, CompositeError), res.error_in_exec
        _cap, res = run(ip, "%result_even")
        assert isinstance(res.error_in_exec, CompositeError), res.result
        _cap, res = run(ip, "%px_even --init --timeout 0.2 import time; time.sleep(1); y = 7")
        assert isinstance(res.error_in_exec, TimeoutError), res.error_in_exec
        _cap, res = run(ip, "%result_even --timeout 30")
        assert res.success, res.error_in_exec
        assert [r["input"]["raw"] for r in res.result] == ["import time; time.sleep(1); y = 7"] * 4
    finally:
        client_mod.deactivate("_even")


def test_a_short_option_with_its_value_attached_is_an_option(ip, mec):
    """``%px -t0 print(1)`` (argparse's ``-t 0``) went to every engine as the code ``-t0
    print(1)``, each failing with a SyntaxError; ``-ores`` likewise. A short option with its
    value attached is read as the option when the line is not valid code as it stands; code
    that compiles (``-t0 + 1``: minus a name) stays code."""
    res = ip.run_line_magic("px", "-t0 print('zero only')")
    assert [r["id"] for r in res] == [0] and res[0]["input"]["raw"] == "print('zero only')"
    ip.run_line_magic("px", "-ores -t1 x = 5")
    assert [r["id"] for r in ip.user_ns["res"]] == [1]
    assert mec.pull("x", targets=1) == [5]
    ip.run_line_magic("px", "t0 = 2")
    assert ip.run_line_magic("px", "--targets 2 -t0 + 1")[0]["input"]["raw"] == "-t0 + 1"


def test_an_attached_short_option_before_double_dash_is_an_option(ip, mec):
    """``%px -t0 -- -x``: the attached option, then ``--`` before code that starts with '-' (as
    docs/magics.md says). The whole line compiles (``-t0 - (-(-x))``), so it went to every
    engine as code: a NameError on each. An attached option followed by ``--`` is the option."""
    ip.run_line_magic("px", "x = 3")
    res = ip.run_line_magic("px", "-t0 -- -x")
    assert [r["id"] for r in res] == [0] and res[0]["input"]["raw"] == "-x", res


def test_code_with_top_level_await_that_starts_with_a_short_option_letter_is_code(ip, mec):
    """The engines run top-level ``await`` (IPython's autoawait), but the line was checked as
    plain Python: ``%px -total + await f()`` did not compile there, so ``-t otal`` was taken as
    the option and the valid line refused as a usage error (unknown engines 'otal')."""
    ip.run_line_magic("px", "import asyncio; total = 5")
    res = ip.run_line_magic("px", "--targets 1 -total + await asyncio.sleep(0, 2)")
    assert [r["id"] for r in res] == [1], res
    assert res[0]["input"]["raw"] == "-total + await asyncio.sleep(0, 2)", res
    assert res[0]["result"]["text/plain"] == "-3", res


def test_pxdiff_unknown_target_is_a_one_line_usage_error(ip):
    """``%pxdiff x --targets 9`` raised the client's TargetsError with the magic's frames (a
    full traceback), where ``%px --targets 9`` says it in one line; now the same UsageError."""
    _cap, res = run(ip, "%pxdiff x --targets 9")
    assert isinstance(res.error_in_exec, UsageError), res.error_in_exec
    assert "unknown engine id 9" in str(res.error_in_exec)


def test_init_timeout_is_one_line_and_says_the_code_is_not_recorded(ip, mec):
    """``%px --init --timeout S`` that timed out showed the TimeoutError with the magic's frames
    and did not say that the setup code was not recorded (it is recorded only once it ran
    everywhere). One line now, saying so; ``%result`` collects the run."""
    cap, res = run(ip, "%px --init --timeout 0.2 import time; time.sleep(1); done_init = 1")
    assert isinstance(res.error_in_exec, TimeoutError), res.error_in_exec
    assert "not recorded" in str(res.error_in_exec), res.error_in_exec
    assert "Traceback" not in cap.stdout, cap.stdout
    assert mec.on_start_code == []
    _cap, res = run(ip, "%result --timeout 30")
    assert res.success, res.error_in_exec
    assert mec.pull("done_init") == [1, 1, 1, 1]


@pytest.mark.timeout(90)
def test_px_shows_the_unread_last_words_of_an_engine_that_died(ip, tmp_path):
    """%px on an engine that printed and died, its output still unread in this process's
    IOPub socket when the death was noticed: the cell showed the error without the last words.
    Now they are shown with it."""
    from faultlib import small_cluster, unread_last_words

    with small_cluster(1) as (cluster, mec2):
        mec2.activate()
        with unread_last_words(cluster, mec2, 0, tmp_path) as state:
            cap, res = run(ip, "%%px --timeout 30\n" + state["code"])
        assert state.get("arrived"), "the last words never reached the controller's socket"
        assert isinstance(res.error_in_exec, CompositeError), res.error_in_exec
        assert "killed by signal SIGKILL" in str(res.error_in_exec)
        shown = cap.stdout + "".join(o.data.get("text/plain", "") for o in cap.outputs)
        printed = shown.split("CompositeError:")[0]  # the error's message quotes the code
        assert "first" in printed and "last words" in printed, shown


# ---------------------------------------------------------------------- late output
def _late_code(flag: Path, text: str = "done", first: str = "") -> str:
    """Engine code that starts a thread printing ``text`` once ``flag`` exists (the engine
    polls for it): output that comes after its command has finished."""
    return (
        "import os, threading, time\n"
        f"{first}"
        "def _late_job():\n"
        f"    while not os.path.exists({str(flag)!r}):\n"
        "        time.sleep(0.005)\n"
        f"    print({text!r}, flush=True)\n"
        "_late = threading.Thread(target=_late_job, daemon=True)\n"
        "_late.start()"
    )


def _arrived(records: list, text: str = "done") -> None:
    """Wait (bounded) until every record's late output holds ``text``."""
    deadline = time.monotonic() + 15
    while not all(text in (r.get("late") or {}).get("stdout", "") for r in records):
        assert time.monotonic() < deadline, f"no late output arrived: {records!r}"
        time.sleep(0.01)


class _Seen:
    """A late output watcher for a test to wait on (held weakly: keep a reference)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def __call__(self, *event) -> None:
        self.events.append(event)

    def wait(self, n: int) -> None:
        deadline = time.monotonic() + 15
        while len(self.events) < n:
            assert time.monotonic() < deadline, f"{n} late outputs did not arrive: {self.events}"
            time.sleep(0.01)


def _late_steps(steps: list[tuple[Path, str]]) -> str:
    """Engine code: a thread that runs each step's code once its flag exists (polled)."""
    body = "".join(
        f"    while not os.path.exists({str(f)!r}):\n        time.sleep(0.005)\n    {code}\n"
        for f, code in steps
    )
    return (
        "import os, sys, threading, time\nfrom IPython.display import display\n"
        f"def _late_job():\n{body}"
        "_late = threading.Thread(target=_late_job, daemon=True)\n_late.start()"
    )


def test_late_output_of_a_silent_execute_is_labelled_as_of_an_earlier_command(ip, mec, tmp_path):
    """A thread started by a silent execute (no record, no route) printed later: that output
    was labelled ``In [n]`` of the command before it, which did not print it. It is labelled
    as late output of an earlier command."""
    flag = tmp_path / "go"
    seen = _Seen()
    mec.controller.watch_late(seen)
    try:
        _cap, res = run(ip, "%px --targets 0 x_before = 1")
        assert res.success, res.error_in_exec
        mec.execute(_late_code(flag), targets=0, silent=True)
        flag.touch()
        seen.wait(1)
        cap, _ = run(ip, "x_local = 1")
        assert cap.stdout == "[stdout:0 late, from an earlier command] done\n", cap.stdout
    finally:
        flag.touch()
        mec.execute("_late.join(10)", targets=0)


def test_late_stdout_and_stderr_are_shown_in_the_order_they_came(ip, mec, tmp_path):
    """Late text waiting to be shown was grouped by stream: stdout first, then stderr,
    whatever the order the engine printed it in. It is printed in the order it came."""
    import contextlib

    flags = [tmp_path / f"f{i}" for i in range(3)]
    seen = _Seen()
    mec.controller.watch_late(seen)
    code = _late_steps(
        [
            (flags[0], "print('one', flush=True)"),
            (flags[1], "print('two', file=sys.stderr, flush=True)"),
            (flags[2], "print('three', flush=True)"),
        ]
    )
    try:
        _cap, res = run(ip, "%%px --targets 0\n" + code)
        assert res.success, res.error_in_exec
        n = magics_of(ip).last.get_result()[0]["number"]
        for i, flag in enumerate(flags):  # each one arrived before the next is printed
            flag.touch()
            seen.wait(i + 1)
        both = io.StringIO()
        with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
            ip.run_cell("x_local = 1")
        assert both.getvalue() == (
            f"[stdout:0 late, In [{n}]] one\n[stderr:0 late, In [{n}]] two\n"
            f"[stdout:0 late, In [{n}]] three\n"
        ), both.getvalue()
    finally:
        for flag in flags:
            flag.touch()
        mec.execute("_late.join(10)", targets=0)


def test_one_late_display_larger_than_the_bound_is_shown_and_what_is_dropped_is_said(
    ip, mec, tmp_path
):
    """Late output is bounded (256 KiB a record keeps, 256 KiB waiting to be shown): a single
    late display larger than that was counted, never shown nor kept, and the note said
    neither its size nor its command. A message that comes while less is held is kept whole;
    what comes past the bound is said, with its size and command."""
    from ipy_multiengine import render, wire

    big = 300_000
    assert big > wire.LATE_LIMIT and big > render.LATE_PENDING_LIMIT
    flags = [tmp_path / "one", tmp_path / "two"]
    seen = _Seen()
    mec.controller.watch_late(seen)
    shown = f"display({{'text/plain': 'x' * {big}}}, raw=True)"
    code = _late_steps([(flags[0], shown), (flags[1], shown)])
    try:
        _cap, res = run(ip, "%%px --targets 0\n" + code)
        assert res.success, res.error_in_exec
        [record] = magics_of(ip).last.get_result()
        n = record["number"]
        for flag in flags:
            flag.touch()
        seen.wait(2)
        assert len(record["late"]["outputs"]) == 1, "the first late display was not kept"
        assert record["late"]["dropped"] == 1 and record["late"]["dropped_chars"] == big + 1
        cap, _ = run(ip, "x_local = 1")
        plains = [o.data.get("text/plain", "") for o in cap.outputs]
        assert [p[-big:] == "x" * big for p in plains] == [True], "the display was not shown"
        assert plains[0].startswith(f"[output:0 late, In [{n}]]"), plains[0][:80]
        assert (
            f"[late:0] 1 late message of engine 0 ({big + 1} characters; In [{n}]) not shown"
            in cap.stderr
        ), cap.stderr
        text = repr(magics_of(ip).last.get_result())
        assert f"[0] Late[{n}]: ... 1 more late message ({big + 1} characters) not kept" in text
    finally:
        for flag in flags:
            flag.touch()
        mec.execute("_late.join(10)", targets=0)


def test_output_after_its_command_finished_is_shown_before_the_next_prompt(ip, mec, tmp_path):
    """A thread the code started printed after its command had finished (its request idle):
    the controller dropped it. It is kept on that command's records (``%result`` shows it as
    ``Late[n]``) and shown once, labelled with its engine and as late, when the next cell runs
    (a terminal)."""
    flag = tmp_path / "go"
    try:
        _cap, res = run(ip, "%%px --targets 0,1\n" + _late_code(flag))
        assert res.success, res.error_in_exec
        records = magics_of(ip).last.get_result()
        n = records[0]["number"]
        flag.touch()
        _arrived(records)
        cap, _ = run(ip, "x_local = 1")
        assert f"[stdout:0 late, In [{n}]] done\n" in cap.stdout, cap.stdout
        assert f"[stdout:1 late, In [{records[1]['number']}]] done\n" in cap.stdout
        cap, _ = run(ip, "x_local = 2")
        assert "late" not in cap.stdout, cap.stdout  # shown once
        _cap, res = run(ip, "%result")
        assert f"[0] Late[{n}]: done" in repr(res.result), repr(res.result)
    finally:
        flag.touch()
        mec.execute("_late.join(10)", targets=[0, 1])


def test_late_output_goes_to_its_cell_s_area_in_a_notebook(ip, mec, tmp_path):
    """In a notebook the late output of a ``%%px`` cell is appended to that cell's engine
    area in place (``update_display`` of its display id), not shown in the cell running now."""
    magics_of(ip).notebook = True
    flag = tmp_path / "go"
    try:
        cap1, res = run(ip, "%%px --targets 0\n" + _late_code(flag, first="print('first')\n"))
        assert res.success, res.error_in_exec
        areas = [o for o in cap1.outputs if o.metadata.get("stream") == "stdout"]
        area_id = areas[-1].transient["display_id"]
        with capture_output() as cap2:  # while the kernel idles, or when the next cell runs
            flag.touch()
            _arrived(magics_of(ip).last.get_result())
            ip.run_cell("x_local = 1")
        updates = [o for o in cap2.outputs if (o.transient or {}).get("display_id") == area_id]
        assert [o.update for o in updates] == [True], cap2.outputs
        assert updates[0].data["text/plain"] == "[stdout:0] first\n[stdout:0 late] done"
        assert len(cap2.outputs) == 1 and not cap2.stdout
    finally:
        flag.touch()
        mec.execute("_late.join(10)", targets=[0])


def test_a_late_clear_output_empties_its_cell_s_area_in_a_notebook(ip, mec, tmp_path):
    """A thread that shows its progress by ``clear_output(wait=True)`` + ``print`` after its
    ``%%px`` cell finished: the late clear_output was ignored and every step was appended to
    the cell's engine area. It empties that engine's area, as it does while the cell runs: the
    area shows the last step (``wait=True``: once that comes), and nothing after a plain
    ``clear_output()``."""
    magics_of(ip).notebook = True
    flags = [tmp_path / f"f{i}" for i in range(3)]
    seen = _Seen()
    mec.controller.watch_late(seen)
    code = _late_steps(
        [
            (flags[0], "clear_output(wait=True); print('step 1', flush=True)"),
            (flags[1], "clear_output(wait=True); print('step 2', flush=True)"),
            (flags[2], "clear_output()"),
        ]
    )
    try:
        cap1, res = run(
            ip,
            "%%px --targets 0\nfrom IPython.display import clear_output\nprint('first')\n" + code,
        )
        assert res.success, res.error_in_exec
        area_id = [o for o in cap1.outputs if o.metadata.get("stream") == "stdout"][-1].transient[
            "display_id"
        ]

        def area_updates(cap) -> list[str]:
            return [
                o.data["text/plain"]
                for o in cap.outputs
                if o.update and (o.transient or {}).get("display_id") == area_id
            ]

        with capture_output() as cap2:
            flags[0].touch()
            seen.wait(2)
            flags[1].touch()
            seen.wait(4)
            ip.run_cell("x_local = 1")
        assert area_updates(cap2)[-1] == "[stdout:0 late] step 2", cap2.outputs
        with capture_output() as cap3:
            flags[2].touch()
            seen.wait(5)
            ip.run_cell("x_local = 2")
        assert area_updates(cap3) == [""], cap3.outputs
    finally:
        for flag in flags:
            flag.touch()
        mec.execute("_late.join(10)", targets=0)


def test_a_notebook_cell_s_printed_text_is_not_kept_alive_for_its_late_output(ip, mec, tmp_path):
    """To append late output to a finished ``%%px`` cell's areas, the last 64 cells' areas were
    kept whole: with every part frozen out of them (kept for the cell's own final layout, up to
    4 MiB of text a cell), megabytes of printed text stayed alive after the cells were done.
    Only what an area still shows is kept, and late output still goes there."""
    from ipy_multiengine import magics as magics_mod

    magics_of(ip).notebook = True
    flag = tmp_path / "go"
    much = "for i in range(20000):\n    print('x' * 60)\ntime.sleep(0.5)\nprint('tail')\n"
    try:
        _cap, res = run(ip, "%%px --targets 0\n" + _late_code(flag, first="import time\n" + much))
        assert res.success, res.error_in_exec
        shower = magics_mod._SHOWERS[id(ip)]
        kept = [area for (eid, _msg_id), (area, _cell) in shower._areas.items() if eid == 0]
        assert kept, "the cell's area is not kept for its late output"
        held = sum(len(data["text/plain"]) for area in kept for data, _md in area.frozen)
        held += sum(len(lines.text()) for area in kept for _name, lines in area.segments)
        assert held < 2 * AREA_LIMIT, f"{held} characters of the cell's text kept alive"
        area_id = kept[-1].handle_id
        with capture_output() as cap2:  # while the kernel idles, or when the next cell runs
            flag.touch()
            _arrived(magics_of(ip).last.get_result())
            ip.run_cell("x_local = 1")
        updates = [o for o in cap2.outputs if (o.transient or {}).get("display_id") == area_id]
        assert [o.data["text/plain"] for o in updates] == ["[stdout:0] tail\n[stdout:0 late] done"]
    finally:
        flag.touch()
        mec.execute("_late.join(10)", targets=[0])


def test_late_output_comes_to_its_cell_s_area_while_the_notebook_kernel_is_idle(ip, mec, tmp_path):
    """In a notebook, late output of a ``%%px`` cell was appended to its area only when some
    cell ran next: while the kernel idled nothing showed it, and a user waiting for the thread's
    text saw none. It is appended at once (as a terminal prints it above its prompt)."""
    magics_of(ip).notebook = True
    flag = tmp_path / "go"
    try:
        cap1, res = run(ip, "%%px --targets 0\n" + _late_code(flag, first="print('first')\n"))
        assert res.success, res.error_in_exec
        areas = [o for o in cap1.outputs if o.metadata.get("stream") == "stdout"]
        area_id = areas[-1].transient["display_id"]
        with capture_output() as idle:  # no cell runs
            flag.touch()
            deadline = time.monotonic() + 15
            while not [o for o in idle.outputs if o.update]:
                assert time.monotonic() < deadline, "nothing shown while the kernel idled"
                time.sleep(0.01)
        (update,) = idle.outputs
        assert update.transient["display_id"] == area_id, update.transient
        assert update.data["text/plain"] == "[stdout:0] first\n[stdout:0 late] done"
        cap2, _ = run(ip, "x_local = 1")
        assert not cap2.outputs and not cap2.stdout, (cap2.outputs, cap2.stdout)  # shown once
    finally:
        flag.touch()
        mec.execute("_late.join(10)", targets=[0])


def test_late_output_of_a_cell_run_again_is_not_sent_to_its_cleared_areas(ip, mec, tmp_path):
    """A notebook cell ``%%px --targets 0`` started a thread, then was edited and run again
    (``--targets 1``): the thread's later output still went to the first run's engine area, which
    the frontend had cleared when the cell ran again (it ignores updates of such a display), so
    it was shown nowhere, ever. The areas of a cell run again are forgotten: its late output is
    shown with the next ``%px``, as output without an area is."""
    magics_of(ip).notebook = True
    flag = tmp_path / "go"
    try:
        with capture_output():
            code = _late_code(flag, first="print('first')\n")
            res = ip.run_cell("%%px --targets 0\n" + code, cell_id="cell-a")
        assert res.success, res.error_in_exec
        first = magics_of(ip).last.get_result()
        n = first[0]["number"]
        with capture_output():
            res = ip.run_cell("%%px --targets 1\nprint('again')", cell_id="cell-a")
        assert res.success, res.error_in_exec
        flag.touch()
        _arrived(first)
        with capture_output() as cap:
            ip.run_cell("x_local = 1", cell_id="cell-b")
            ip.run_cell("%%px --targets 1\nprint('next')", cell_id="cell-c")
        texts = [o.get("text/plain", "") for o in cell_outputs(cap)]
        assert f"[stdout:0 late, In [{n}]] done" in texts, texts
    finally:
        flag.touch()
        mec.execute("_late.join(10)", targets=[0])


def test_late_output_areas_are_remembered_for_the_last_64_cells_not_64_engine_areas(
    ip, mec, tmp_path
):
    """The documented "last 64 cells are remembered" counted engine areas: with 3 engines a
    cell, a cell 22 cells back was forgotten (and on a cluster of more than 64 engines, part of
    the cell just run), its late output not put in its area. It counts cells."""
    from ipy_multiengine.render import LATE_AREAS

    magics_of(ip).notebook = True
    flag = tmp_path / "go"
    try:
        cap1, res = run(ip, "%%px --targets 0\n" + _late_code(flag, first="print('first')\n"))
        assert res.success, res.error_in_exec
        first = magics_of(ip).last.get_result()
        area_id = [o for o in cap1.outputs if o.metadata.get("stream") == "stdout"][-1].transient[
            "display_id"
        ]
        later = LATE_AREAS // 3 + 1
        for _ in range(later):  # other engines: the thread's output stays labelled with cell 1
            _cap, res = run(ip, "%%px --targets 1:4\nprint('other')")
            assert res.success, res.error_in_exec
        with capture_output() as cap2:  # while the kernel idles, or when the next cell runs
            flag.touch()
            _arrived(first)
            ip.run_cell("x_local = 1")
        updates = [o for o in cap2.outputs if (o.transient or {}).get("display_id") == area_id]
        assert [o.data["text/plain"] for o in updates] == ["[stdout:0] first\n[stdout:0 late] done"]
    finally:
        flag.touch()
        mec.execute("_late.join(10)", targets=[0])


def test_late_output_without_an_area_is_shown_with_the_next_px_in_a_notebook(ip, mec, tmp_path):
    """A one-line ``%px`` (its Results List has no area to update): its late output is not put
    in an unrelated local cell, but shown labelled with the next ``%px``, before its output."""
    magics_of(ip).notebook = True
    flag = tmp_path / "go"
    try:
        run(ip, "%px --targets 0 exec(" + repr(_late_code(flag)) + ")")
        records = magics_of(ip).last.get_result()
        flag.touch()
        _arrived(records)
        cap, _ = run(ip, "x_local = 1")
        assert not cap.outputs and not cap.stdout, (cap.outputs, cap.stdout)
        cap, _ = run(ip, "%%px --targets 1\nprint('next')")
        texts = [o.data.get("text/plain", "") for o in cap.outputs]
        n = records[0]["number"]
        assert texts[0] == f"[stdout:0 late, In [{n}]] done", texts
        assert texts[-1] == "[stdout:1] next", texts
    finally:
        flag.touch()
        mec.execute("_late.join(10)", targets=[0])


# ---------------------------------------------------------------------- options not ignored
def test_timeout_with_noblock_is_a_usage_error_before_anything_is_sent(ip, mec):
    """``%px --timeout S --noblock`` returned a PendingResult and ignored the timeout (nothing
    waits): a usage error now, saying what waits instead, and the code is not sent."""
    _cap, res = run(ip, "%px --timeout 5 --noblock sent_anyway = 1")
    assert isinstance(res.error_in_exec, UsageError), res.error_in_exec
    assert "%result --timeout" in str(res.error_in_exec)
    mec.execute("not_sent = 'sent_anyway' not in globals()")
    assert mec.pull("not_sent") == [True] * 4


def test_timeout_with_a_nonblocking_default_is_a_usage_error_too(ip, mec):
    """The same ``--timeout S`` when not blocking is the default (``%pxconfig --noblock``, the
    client's ``block = False``): the line did not block and the timeout was ignored without a
    word. A usage error naming where the default comes from; ``--block`` on the line works."""
    run(ip, "%pxconfig --noblock")
    _cap, res = run(ip, "%px --timeout 5 sent_anyway = 1")
    assert isinstance(res.error_in_exec, UsageError), res.error_in_exec
    assert "%pxconfig --noblock" in str(res.error_in_exec), res.error_in_exec
    magics_of(ip).reset()
    mec.block = False
    _cap, res = run(ip, "%px --timeout 5 sent_anyway = 1")
    assert isinstance(res.error_in_exec, UsageError), res.error_in_exec
    assert "block = False" in str(res.error_in_exec), res.error_in_exec
    _cap, res = run(ip, "%px --timeout 5 --block blocked = 1")
    assert res.success, res.error_in_exec
    mec.execute("not_sent = 'sent_anyway' not in globals()", block=True)
    assert mec.pull(["not_sent", "blocked"], block=True) == [[True, 1]] * 4


def test_init_with_local_runs_the_setup_code_here_too(ip, mec):
    """``%px --init --local CODE`` ran the setup code on the engines only (``--local`` was
    ignored): it runs here too, once the engines have run it, as ``--local`` does."""
    ip.user_ns.pop("INIT_HERE", None)
    try:
        _cap, res = run(ip, "%px --init --local INIT_HERE = 3")
        assert res.success, res.error_in_exec
        assert ip.user_ns.get("INIT_HERE") == 3
        assert mec.pull("INIT_HERE") == [3] * 4
        assert mec.on_start_code == ["INIT_HERE = 3"]
    finally:
        mec.clear_on_start()
        ip.user_ns.pop("INIT_HERE", None)


def test_pxconfig_targets_left_unknown_after_the_cluster_shrank_name_pxconfig(ip, mec):
    """``%pxconfig --targets 1`` and then engine 1 left the cluster: every later ``%px`` failed
    with the client's "unknown engine id 1", as if the line had named it. It names
    ``%pxconfig --targets`` and how to set it again; ``--targets`` on the line still works."""
    from faultlib import small_cluster

    with small_cluster(2) as (_cluster, small):
        small.activate()
        try:
            run(ip, "%pxconfig --targets 1")
            small.controller.forget([1], "left the cluster")
            _cap, res = run(ip, "%px shrunk = 1")
            assert isinstance(res.error_in_exec, UsageError), res.error_in_exec
            text = str(res.error_in_exec)
            assert text.startswith("%pxconfig --targets [1]:") and "unknown engine id" in text
            assert "%pxconfig --targets default" in text
            _cap, res = run(ip, "%px --targets 0 shrunk = 1")
            assert res.success, res.error_in_exec
        finally:
            mec.activate()
