"""input()/getpass() and debuggers on engines, answered by the user (issue 8).

A real terminal ``ipython`` driven by pexpect starts two engines and runs code on them that asks
for input; the prompts arrive prefixed with the engine id and the answers reach the engines. The
same through a notebook kernel run by nbclient with ``allow_stdin`` and a scripted reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

pexpect = pytest.importorskip("pexpect")

from beyond_helpers import assert_gone, screen_lines  # noqa: E402
from faultlib import user_environ  # noqa: E402

pytestmark = pytest.mark.timeout(90)

PROMPT = r"In \[(\d+)\]: "
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Term:
    """A terminal IPython session with two engines and the %px tools loaded."""

    def __init__(self, tmp: Path) -> None:
        env = dict(os.environ, TERM="dumb", JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
        self.child = pexpect.spawn(
            sys.executable,
            [
                "-m",
                "IPython",
                "--simple-prompt",
                "--no-banner",
                "--colors=NoColor",
                "--HistoryManager.hist_file=:memory:",
                "--no-confirm-exit",
            ],
            env=env,
            encoding="utf-8",
            timeout=45,
            echo=False,
            dimensions=(50, 200),
        )
        self.log: list[str] = []
        self.expect(PROMPT)
        self.run(
            "from ipy_multiengine import Cluster; cl = Cluster(n=2, profile='stdin-term'); "
            "mec = cl.start().activate(); get_ipython().run_line_magic('load_ext', "
            "'ipy_multiengine'); "
            "print('PIDS', [e['pid'] for e in mec.engines])"
        )
        self.pids = [
            int(p) for p in re.findall(r"\d+", self.text.split("PIDS", 1)[1].split("]")[0])
        ]

    def expect(self, pattern: str) -> str:
        self.child.expect(pattern)
        raw = self.child.before + (self.child.after if isinstance(self.child.after, str) else "")
        self.text = ANSI.sub("", raw)  # engines colour their tracebacks and debugger listings
        self.log.append(self.text)
        return self.text

    def send(self, line: str) -> None:
        self.child.sendline(line)

    def run(self, line: str) -> str:
        """Run one line and return what it printed before the next prompt."""
        self.send(line)
        return self.expect(PROMPT)

    def close(self) -> None:
        if self.child.isalive():
            try:
                self.child.sendintr()  # leave a debugger or prompt a failed test may have left open
                self.child.sendline("")
                self.child.timeout = 20
                self.run("cl.stop()")
                self.send("exit")
                self.child.expect(pexpect.EOF)
            except pexpect.ExceptionPexpect:
                pass  # the engines exit with their parent below
            finally:
                self.child.close(force=True)
        assert_gone(self.pids)


@pytest.fixture(scope="module")
def term(tmp_path_factory):
    t = Term(tmp_path_factory.mktemp("term"))
    yield t
    t.close()


def test_input_on_an_engine_is_asked_with_its_id(term):
    term.send(
        "mec.execute(\"print('before'); name = input('name? ')\", targets=1); mec.pull('name', "
        "targets=1)"
    )
    term.expect(r"\[1\] name\? ")
    assert "[1] before" in term.text  # output so far is shown before the prompt
    term.send("bob")
    out = term.expect(PROMPT)
    assert "['bob']" in out


def test_getpass_on_an_engine_is_not_echoed(term):
    term.child.setecho(False)
    term.send(
        "mec.execute(\"import getpass; pw = getpass.getpass('password: ')\", targets=0); "
        "mec.pull('pw', targets=0)"
    )
    term.expect(r"\[0\] password: ")
    term.send("s3cret")
    out = term.expect(PROMPT)
    assert "['s3cret']" in out
    assert out.count("s3cret") == 1  # only the pulled value, never the typed text


def test_engines_asking_together_are_asked_one_at_a_time(term):
    term.send("mec.execute(\"v = input('value? ')\"); mec.pull('v')")
    answered = []
    for _ in range(2):
        term.expect(r"\[(\d)\] value\? ")
        eid = term.child.match.group(1)
        answered.append(eid)
        term.send(f"val{eid}")
    out = term.expect(PROMPT)
    assert sorted(answered) == ["0", "1"]
    assert "['val0', 'val1']" in out


def test_end_of_input_raises_eoferror_on_the_engine(term):
    term.send("mec.execute(\"input('more? ')\", targets=0)")
    term.expect(r"\[0\] more\? ")
    term.child.sendeof()
    out = term.expect(PROMPT)
    assert "EOFError" in out and "CompositeError" in out


def test_ctrl_c_at_a_prompt_interrupts_that_engine(term):
    term.send("mec.execute(\"input('stuck? ')\", targets=1)")
    term.expect(r"\[1\] stuck\? ")
    term.child.sendintr()
    out = term.expect(PROMPT)
    assert "KeyboardInterrupt" in out
    out = term.run("mec.execute('print(6 * 7)', targets=1)[0]['stdout']")
    assert "'42\\n'" in out  # the engine is free again


def test_pxdebug_post_mortem_on_an_engine(term):
    term.run("mec.execute('def f(v):\\n    w = v * 2\\n    return 1 / (w - w)\\nf(21)', targets=0)")
    term.send("%pxdebug 0")
    term.expect(r"\[0\] ipdb> ")
    assert "return 1 / (w - w)" in term.text
    term.send("p w")
    term.expect(r"\[0\] 42\s")
    term.expect(r"\[0\] ipdb> ")
    term.send("up")
    term.expect(r"\[0\] ipdb> ")
    assert "f(21)" in term.text
    term.send("q")
    term.expect(PROMPT)
    out = term.run("mec.execute('print(\"alive\")', targets=0)[0]['stdout']")
    assert "alive" in out


def test_pxdebug_argument_errors(term):
    out = term.run("%pxdebug 9")
    assert "unknown engine id 9" in out
    out = term.run("%pxdebug x")
    assert "needs one engine id" in out


def test_breakpoint_on_one_engine(term):
    term.send(
        "mec.execute('a = 5\\nbreakpoint()\\nb = a + 1', targets=0); mec.pull('b', targets=0)"
    )
    term.expect(r"\[0\] ipdb> ")
    assert "breakpoint()" in term.text
    term.send("!a = 10")
    term.expect(r"\[0\] ipdb> ")
    term.send("c")
    out = term.expect(PROMPT)
    assert "[11]" in out


def test_breakpoint_under_px_cell_magic(term):
    pytest.importorskip("ipy_multiengine.magics")
    term.run("%load_ext ipy_multiengine")
    term.send(
        "get_ipython().run_cell_magic('px', '--targets 0', 'a = 1\\nbreakpoint()\\nb = a + 1')"
    )
    term.expect(r"\[0\] ipdb> ")
    term.send("!a = 20")
    term.expect(r"\[0\] ipdb> ")
    term.send("c")
    term.expect(PROMPT)
    out = term.run("mec.pull('b', targets=0)")
    assert "[21]" in out


# ---------------------------------------------------------------------- through a notebook kernel
def stdout_of(cell) -> str:
    """A cell's stdout (a loaded machine may add log lines on stderr)."""
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


def test_input_through_nbclient_with_a_scripted_reply(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    class StdinClient(nbclient.NotebookClient):
        """nbclient answering input requests from a script (nbclient itself disables stdin)."""

        replies: ClassVar[list[str]] = ["scripted answer", "p w", "q"]
        prompts: ClassVar[list] = []

        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            kc.allow_stdin = True
            self._stdin_task = asyncio.ensure_future(self._answer(kc))
            return kc

        async def _answer(self, kc):
            while True:
                msg = await kc.stdin_channel.get_msg()
                if msg["msg_type"] == "input_request":
                    self.prompts.append((msg["content"]["prompt"], msg["content"]["password"]))
                    kc.input(self.replies.pop(0) if self.replies else "\x04")

        engine_log = "(not read)"

        async def _async_handle_timeout(self, timeout, cell=None):
            # read while the engine is still there (stopping the cluster removes its log)
            outs = "".join(o.get("text", "") for o in self.nb.cells[0].outputs)
            logs = re.findall(r"LOG (\S+)", outs)
            with contextlib.suppress(OSError, IndexError):
                self.engine_log = Path(logs[0]).read_text(errors="replace")[-4000:]
            # where the engine and the notebook kernel wait, when py-spy is installed
            spy = shutil.which("py-spy") or shutil.which(
                "py-spy", path=str(Path(sys.executable).parent)
            )
            if spy:
                pids = re.findall(r"\d+", stdout_of(self.nb.cells[0]))
                for pid in [*pids, str(self.km.provisioner.pid)]:
                    out = subprocess.run(
                        [spy, "dump", "--pid", pid], capture_output=True, text=True, timeout=30
                    )
                    self.engine_log += f"\n--- py-spy dump {pid}\n{out.stdout}{out.stderr}"
            return await super()._async_handle_timeout(timeout, cell)

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "from ipy_multiengine import Cluster\n"
            "cl = Cluster(n=1, profile='stdin-nb')\nmec = cl.start()\n"
            "pids = [e['pid'] for e in mec.engines]; print(pids)\n"
            "import sys; print('LOG', cl.log_file(0), file=sys.stderr)"
        ),
        nbformat.v4.new_code_cell(
            "mec.execute(\"name = input('name? ')\")\nprint(mec.pull('name'))"
        ),
        nbformat.v4.new_code_cell(
            "from ipy_multiengine import CompositeError\n"
            "get_ipython().run_line_magic('load_ext', 'ipy_multiengine'); mec.activate()\n"
            "try:\n    mec.execute('w = 21 * 2\\n1 / (w - w)')\n"
            "except CompositeError:\n    pass"
        ),
        nbformat.v4.new_code_cell("%pxdebug 0"),
        nbformat.v4.new_code_cell("cl.stop()"),
    ]
    client = StdinClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute(env=user_environ())
    except nbclient.exceptions.CellTimeoutError as exc:
        # what was asked and what the engine logged: a hang is told apart from a lost reply
        pytest.fail(
            f"{exc}\nprompts asked: {StdinClient.prompts}\n"
            f"engine 0 log, stacks:\n{client.engine_log}"
        )
    finally:
        task = getattr(client, "_stdin_task", None)
        if task is not None:
            task.cancel()
    pids = [int(p) for p in re.findall(r"\d+", stdout_of(nb.cells[0]))]
    assert StdinClient.prompts == [
        ("[0] name? ", False),
        ("[0] ipdb> ", False),
        ("[0] ipdb> ", False),
    ]
    assert stdout_of(nb.cells[1]) == "['scripted answer']\n"
    debug_out = ANSI.sub("", "".join(o.get("text", "") for o in nb.cells[3].outputs))
    assert "[0] ----> 2 1 / (w - w)" in debug_out and "[0] 42\n" in debug_out
    assert_gone(pids)


def test_input_in_a_notebook_without_stdin_gives_the_engine_eof(tmp_path):
    """nbclient refuses stdin: the engine's input() gets EOFError and the user is told why."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "from ipy_multiengine import Cluster, CompositeError\n"
            "cl = Cluster(n=1, profile='stdin-nb-none')\nmec = cl.start()\n"
            "pids = [e['pid'] for e in mec.engines]; print(pids)"
        ),
        nbformat.v4.new_code_cell(
            "try:\n    mec.execute(\"input('name? ')\")\n"
            "except CompositeError as e:\n    print('ENGINE', e.elist[0].ename)"
        ),
        nbformat.v4.new_code_cell("cl.stop()"),
    ]
    nbclient.NotebookClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute(env=user_environ())
    pids = [int(p) for p in re.findall(r"\d+", stdout_of(nb.cells[0]))]
    outs = nb.cells[1].outputs
    assert any(
        "cannot ask for input here" in o.get("text", "") for o in outs if o.get("name") == "stderr"
    )
    assert any(o.get("text") == "ENGINE EOFError\n" for o in outs)
    assert_gone(pids)


@pytest.mark.parametrize("how", ["execute", "px"])
def test_o11_ctrl_c_at_one_prompt_drops_the_call_s_other_prompts(term, how):
    # engine 0 asks at once; engine 1 asks later, after the interrupt of the call reached it
    # (it swallows that KeyboardInterrupt): its prompt must not be asked either
    term.run("mec.scatter('k', [0, 1])")
    code = (
        "import time\ntry:\n    time.sleep(1.5 * k[0])\nexcept KeyboardInterrupt:\n    pass\n"
        "who = input('who? ')"
    )
    term.send(f"mec.execute({code!r})" if how == "execute" else f"%px exec({code!r})")
    term.expect(r"\[(\d)\] who\? ")
    assert term.child.match.group(1) == "0"
    term.child.sendintr()  # Ctrl-C at the first engine's prompt: the other's is not asked
    out = term.expect(PROMPT)
    assert "KeyboardInterrupt" in out and not re.search(r"\[\d\] who\? ", out), out
    out = term.run(
        "mec.execute('print(6 * 7)')[1]['stdout']"
    )  # waits for engine 1's late prompt too
    assert "'42\\n'" in out and not re.search(r"\[\d\] who\? ", out)  # engines free, nothing queued


def test_output_before_each_prompt_is_shown_once_each_stream_on_its_own(mec, monkeypatch, capsys):
    """A call without live output (plain blocking ``mec.execute``) shows what the engine printed
    before each of its prompts: stdout and stderr are followed separately, so output of the
    stream that grew is shown, not the other stream's old text again."""
    answers = iter(["X", "Y"])
    prompts: list[str] = []

    def fake_input(prompt=""):  # the user typing at the local prompt
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("builtins.input", fake_input)
    res = mec.execute(
        "import sys\nprint('a', flush=True)\nprint('e', file=sys.stderr, flush=True)\n"
        "x = input('one? ')\nprint('b', flush=True)\ny = input('two? ')\nprint('got', x, y)",
        targets=0,
    )
    assert prompts == ["[0] one? ", "[0] two? "]
    assert res[0]["stdout"] == "a\nb\ngot X Y\n"
    shown = capsys.readouterr().out
    assert shown.splitlines() == ["[0] a", "[0] e", "[0] b"], shown


def test_prompt_is_not_written_onto_a_progress_bar(mec, monkeypatch):
    """An engine asking for input while the progress bar is drawn: the bar is cleared first,
    so the prompt starts its own terminal line (\\r returns to column 0)."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "ipy_multiengine")
    mec.activate()
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)

    def fake_input(prompt=""):
        screen.write(prompt + "typed\n")  # what the terminal shows: the prompt, the echoed answer
        return "typed"

    monkeypatch.setattr("builtins.input", fake_input)
    res = ip.run_cell(
        "%%px --progress-after 0.1 --targets 0,1\nimport time; time.sleep(0.6)\n"
        "print('got', input('name? '))"
    )
    assert res.success, res.error_in_exec
    assert "%px:" in screen.getvalue()  # the bar was drawn
    shown = screen_lines(screen.getvalue())
    prompts = [ln for ln in shown if "name? " in ln]
    assert len(prompts) == 2 and all(
        re.fullmatch(r"\[[01]\] name\? typed", ln) for ln in prompts
    ), shown


def test_input_in_an_applied_function_asks_the_user(mec, monkeypatch):
    """``input()`` inside a function run by ``mec.apply`` read the engine kernel's own stdin
    (ipykernel forwards it for execute requests only): ``EOFError: EOF when reading a line``
    on the engine, although the engine helper sets the request as parent for exactly this."""
    prompts: list[str] = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        return "typed"

    monkeypatch.setattr("builtins.input", fake_input)
    assert mec.apply(lambda: input("who? "), targets=[1]) == ["typed"]
    assert prompts == ["[1] who? "]
    # the engine's own input() is back as it was: an execute still forwards it by itself
    assert mec.execute("x = input('again? ')", targets=[1]) and mec.pull("x", targets=1) == [
        "typed"
    ]


def test_input_in_a_thread_of_an_applied_function_asks_the_user(mec, monkeypatch):
    """A thread started (and joined) by an applied function finds the client to ask through
    ipykernel's saved context (threads have none of their own), which the engine helper sets
    for every operation. (That this saved context holds no earlier request's buffers is
    checked on the comm path by test_fastpath's buffers-freed check.)"""
    prompts: list[str] = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        return "from a thread"

    monkeypatch.setattr("builtins.input", fake_input)

    def ask_in_a_thread():
        import threading

        got = []
        t = threading.Thread(target=lambda: got.append(input("thread? ")))
        t.start()
        t.join(30)
        return got

    assert mec.apply(ask_in_a_thread, targets=[2]) == [["from a thread"]]
    assert prompts == ["[2] thread? "]


def _prompting_shell(ip, monkeypatch, notebook):
    """The test shell rendering for a terminal or a notebook, its stdout a screen, and a list
    for a fake ``input`` to note (the prompt, what was shown when it was asked)."""
    from shell_helpers import magics_of

    magics_of(ip).notebook = notebook
    screen = io.StringIO()
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(sys, "stdout", screen)
    return screen, seen


def test_a_partial_line_printed_before_input_is_shown_before_the_prompt(ip, monkeypatch):
    """Terminal ``%%px``: ``print('Enter your name:', end=' '); input()`` showed the bare
    prompt ``[0] `` and the question only after the answer (``[stdout:0] Enter your name: hi
    ...``): the live output keeps a line until its newline. The asking engine's line is
    written out before its prompt."""
    screen, seen = _prompting_shell(ip, monkeypatch, notebook=False)

    def fake_input(prompt=""):
        seen.append((prompt, screen.getvalue()))
        screen.write(prompt + "ada\n")
        return "ada"

    monkeypatch.setattr("builtins.input", fake_input)
    res = ip.run_cell(
        "%%px --targets 0\nprint('Enter your name:', end=' ', flush=True)\nx = input()\n"
        "print('hi', x)"
    )
    assert res.success, res.error_in_exec
    assert [p for p, _ in seen] == ["[0] "], seen
    assert seen[0][1].splitlines() == ["[stdout:0] Enter your name: "], seen
    assert screen.getvalue().splitlines() == [
        "[stdout:0] Enter your name: ",
        "[0] ada",
        "[stdout:0] hi ada",
    ]


def test_output_printed_before_input_is_in_the_notebook_before_the_prompt(ip, monkeypatch):
    """Notebook ``%%px``: an area's updates are coalesced (``UPDATE_INTERVAL``), and while the
    user is asked nothing flushed them: the line printed just before ``input()`` (the question)
    was not shown until the answer. Every area is brought up to date before the prompt."""
    from IPython.utils.capture import capture_output
    from shell_helpers import cell_outputs

    from ipy_multiengine import render

    monkeypatch.setattr(render, "UPDATE_INTERVAL", 3600.0)  # only a forced flush shows it
    _screen, seen = _prompting_shell(ip, monkeypatch, notebook=True)
    with capture_output() as cap:

        def fake_input(prompt=""):
            seen.append((prompt, "\n".join(d.get("text/plain", "") for d in cell_outputs(cap))))
            return "7"

        monkeypatch.setattr("builtins.input", fake_input)
        res = ip.run_cell(
            "%%px --targets 1\nprint('step 1 done', flush=True)\nimport time; time.sleep(0.05)\n"
            "print('Please type x below', flush=True)\nx = input('x? ')\nprint('got', x)"
        )
    assert res.success, res.error_in_exec
    assert [p for p, _ in seen] == ["[1] x? "], seen
    assert "[stdout:1] step 1 done\nPlease type x below" in seen[0][1], seen


def test_one_line_px_shows_what_the_engine_printed_before_its_prompt(ip, mec, monkeypatch):
    """A one-line ``%px`` collects its output for the Results List: the engine's question
    printed before ``input()`` was not on the screen when the user was asked (a plain
    ``mec.execute`` shows it, ``[0] ...``). It is shown before the prompt, as there."""
    screen, seen = _prompting_shell(ip, monkeypatch, notebook=False)

    def fake_input(prompt=""):
        seen.append((prompt, screen.getvalue()))
        return "3"

    monkeypatch.setattr("builtins.input", fake_input)
    res = ip.run_cell("%px --targets 0 print('How many?', flush=True); n = int(input())")
    assert res.success, res.error_in_exec
    assert seen == [("[0] ", "[0] How many?\n")], seen
    assert mec.pull("n", targets=0) == [3]


def _lagging_iopub(mec, monkeypatch, lag: float) -> None:
    """Deliver the engines' IOPub messages to ``mec``'s controller ``lag`` s late, in their
    order (white-box): as when IOPub, a connection of its own, is behind the stdin channel."""
    import collections

    ctl = mec.controller
    real = ctl._on_frames
    queue: collections.deque = collections.deque()

    def deliver() -> None:
        real(*queue.popleft())

    def lagging(conn, channel, frames):
        if channel != "iopub":
            return real(conn, channel, frames)
        queue.append((conn, channel, frames))
        asyncio.get_running_loop().call_later(lag, deliver)  # each delivers the oldest: in order

    monkeypatch.setattr(ctl, "_on_frames", lagging)


def test_the_question_is_shown_before_the_prompt_also_when_iopub_comes_late(ip, mec, monkeypatch):
    """The question printed before ``input()`` comes on IOPub, the ``input_request`` on the
    stdin channel: two connections, in no set order. The controller gave IOPub 20 ms (a sleep)
    to catch up: when its messages came later (a loaded box, a remote engine), the prompt was
    shown before the question. It waits until IOPub has brought what the engine published
    before it asked."""
    screen, seen = _prompting_shell(ip, monkeypatch, notebook=False)

    def fake_input(prompt=""):
        seen.append((prompt, screen.getvalue()))
        return "3"

    monkeypatch.setattr("builtins.input", fake_input)
    _lagging_iopub(mec, monkeypatch, 0.3)
    res = ip.run_cell("%px --targets 0 print('How many?', flush=True); n = int(input())")
    assert res.success, res.error_in_exec
    assert seen == [("[0] ", "[0] How many?\n")], seen
    monkeypatch.undo()
    assert mec.pull("n", targets=0) == [3]


def test_a_prompt_shows_only_its_own_call_s_output_before_it(ip, mec, monkeypatch, tmp_path):
    """Before each prompt every live output in the process was asked for "its" engine's text:
    while a one-line ``%px`` on engines 0 and 1 still waited for engine 1, another thread's
    ``mec.execute`` asking for input on engine 0 showed the ``%px``'s engine 0 output too, as
    if engine 0 had printed it before that question (and the ``%px``'s own later prompt would
    not). Only the asking call's output is shown before its prompt."""
    import threading

    from shell_helpers import magics_of

    go = tmp_path / "go"
    mec.execute("import os, time", targets=[0, 1])
    mec.execute(
        "def wait_for(path):\n"
        "    end = time.monotonic() + 30\n"
        "    while not os.path.exists(path) and time.monotonic() < end:\n"
        "        time.sleep(0.01)\n",
        targets=1,
    )
    mec.execute("def wait_for(path): pass", targets=0)  # engine 0 is done at once
    screen, seen = _prompting_shell(ip, monkeypatch, notebook=False)

    def fake_input(prompt=""):
        seen.append((prompt, screen.getvalue()))
        go.touch()  # engine 1 of the %px may finish now
        return "t"

    monkeypatch.setattr("builtins.input", fake_input)
    magics = magics_of(ip)
    magics.last = None
    other: list = []

    def other_call() -> None:
        end = time.monotonic() + 30
        while magics.last is None and time.monotonic() < end:
            threading.Event().wait(0.01)  # the %px is sent: this call runs after it on engine 0
        try:
            other.append(
                mec.execute("print('other asks', flush=True); v = input('v? ')", targets=0)
            )
        except BaseException as exc:
            other.append(exc)

    thread = threading.Thread(target=other_call, daemon=True)
    thread.start()
    res = ip.run_cell(f"%px --targets 0,1 print('px output', flush=True); wait_for({str(go)!r})")
    thread.join(30)
    assert res.success, res.error_in_exec
    assert other and not isinstance(other[0], BaseException), other
    assert [p for p, _ in seen] == ["[0] v? "], seen
    assert seen[0][1] == "[0] other asks\n", seen
