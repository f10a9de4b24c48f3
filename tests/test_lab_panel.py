"""The Engines panel in a real JupyterLab and headless Chromium (``browser_helpers``).

One JupyterLab and one browser (``browser_helpers.lab``: shared with the other browser modules
of this test process, fresh for the module); the server extension and the prebuilt
labextension come from the installed package (``IPME_BUILD_LABEXTENSION=1 pip install -e .``
or a wheel). Checks, as a person clicks: the panel lists the session cluster's engines; while a
notebook runs ``%%px time.sleep(60)`` the panel's "Interrupt all" stops it within 2 s; restart
from the panel keeps the engine id (a 1-engine ``ipmulti`` cluster started through the API,
whose owner takes restart requests); "open console" on engine 1 evaluates ``x`` pushed by
``mec.push``. The debugger in that console is tested at the kernel-protocol level (the same
server kernel, over the server's websocket) in ``test_server_ext.py``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

browser_helpers = pytest.importorskip(
    "browser_helpers", reason="tests/browser_helpers.py (JupyterLab + Chromium) is not there"
)
nbformat = pytest.importorskip("nbformat")

pytestmark = pytest.mark.timeout(240)

from faultlib import INTERRUPT_DEADLINE  # noqa: E402

import ipy_multiengine  # noqa: E402

BUILT = Path(ipy_multiengine.__file__).parent / "labextension" / "package.json"
KEY = "cluster-tests"  # the session cluster's id in the panel


@pytest.fixture(scope="module")
def built():
    if not BUILT.exists():
        msg = "the labextension is not built: IPME_BUILD_LABEXTENSION=1 pip install -e ."
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def api(server, path, body=None, timeout=60):
    req = urllib.request.Request(
        f"{server.url}/ipy_multiengine/api/{path}",
        method="GET" if body is None else "POST",
        headers={"Authorization": f"token {server.token}"},
        data=None if body is None else json.dumps(body).encode(),
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def rows(driver, key):
    """The panel's engine rows of cluster ``key``: id -> state (read in one round trip)."""
    found = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map("
        "r => [r.getAttribute('data-engine'), r.getAttribute('data-state')]);",
        f"[data-cluster='{key}'] [data-engine]",
    )
    return {int(eid): state for eid, state in found}


def text(driver, selector):
    return driver.execute_script(
        "const n = document.querySelector(arguments[0]); return n ? n.innerText : '';", selector
    )


def click(driver, selector, timeout=10):
    """Click the element ``selector`` names (found afresh if the panel redrew it meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            found = css(driver, selector)
            if found:
                found[0].click()
                return
        except StaleElementReferenceException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing to click at {selector}")
        time.sleep(0.05)  # polls for the element, bounded by the deadline


def show_panel(driver):
    """Show the Engines panel in the left sidebar (opening a file shows the file browser)."""
    shown = (
        "const p = document.getElementById('ipy_multiengine-engines');"
        "return !!p && !p.classList.contains('lm-mod-hidden');"
    )
    if not driver.execute_script(shown):
        click(driver, "[data-id='ipy_multiengine-engines']", timeout=30)
    browser_helpers.wait_until(lambda: driver.execute_script(shown), 10, "the Engines panel shown")


@pytest.fixture(scope="module")
def page(built, lab, cluster):
    """A notebook connected to the session cluster, open, and the Engines panel shown."""
    server, browser = lab
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_code_cell(
            "%load_ext ipy_multiengine\nfrom ipy_multiengine import client\n"
            f"mec = client.MultiEngineClient({str(cluster.cluster_file)!r}); mec.activate()\n"
            "print('connected', mec.get_ids())"
        ),
        nbformat.v4.new_code_cell("%%px --targets 0\nimport time\ntime.sleep(60)"),
    ]
    nbformat.write(nb, server.root / "panel.ipynb")
    notebook = browser_helpers.Notebook(browser, server, "panel.ipynb")
    with browser.step("panel-open"):
        notebook.open()
        assert "connected [0, 1, 2, 3]" in notebook.run_and_wait(0, timeout=60)
        show_panel(browser.driver)
    return server, browser, notebook


def test_panel_lists_the_clusters_engines(page):
    _server, browser, _ = page
    with browser.step("panel-lists"):
        browser_helpers.wait_until(
            lambda: rows(browser.driver, KEY) == dict.fromkeys(range(4), "idle"),
            20,
            "the 4 engines of cluster-tests idle in the panel",
            step=0.1,
        )
        shown = text(browser.driver, f"[data-cluster='{KEY}']")
        assert "tests (running)" in shown and "MB" in shown, shown


def test_panel_interrupt_stops_a_px_cell(page):
    server, browser, notebook = page
    d = browser.driver
    with browser.step("panel-busy"):
        notebook.run(1)
        browser_helpers.wait_until(
            lambda: (
                rows(d, KEY).get(0) == "busy"
                and "time.sleep(60)" not in notebook.output_text(1)
                and "import time" in text(d, f"[data-cluster='{KEY}'] [data-engine='0']")
            ),
            20,
            "engine 0 busy in the panel, showing its code",
            step=0.1,
        )
    with browser.step("panel-interrupted"):
        t0 = time.monotonic()
        click(d, f"[data-cluster='{KEY}'] .ipme-cluster-head [data-action='interrupt']")

        def engine_idle():
            c = next(c for c in api(server, "clusters")["clusters"] if c["id"] == KEY)
            return c["engines"][0]["state"] == "idle"

        browser_helpers.wait_until(
            engine_idle, INTERRUPT_DEADLINE, "engine 0 idle after the interrupt"
        )
        stopped = time.monotonic() - t0
        browser_helpers.wait_until(
            lambda: "KeyboardInterrupt" in notebook.output_text(1) and not notebook.busy_cells(),
            INTERRUPT_DEADLINE,
            "the %%px cell to show the interrupt",
            step=0.05,
        )
        shown = time.monotonic() - t0
        # stopped by the click, not by the 60 s sleep's end; the cell's display adds the
        # notebook kernel's reply and the page's render (2.3 s once, on 2 loaded cores)
        assert stopped < INTERRUPT_DEADLINE, f"the engine stopped {stopped:.2f} s after the click"
        assert shown < INTERRUPT_DEADLINE, f"the cell showed the interrupt {shown:.2f} s after"
        browser_helpers.wait_until(lambda: rows(d, KEY).get(0) == "idle", 10, "engine 0 idle")


def test_panel_restart_keeps_the_engine_id(page):
    server, browser, _ = page
    d = browser.driver
    profile = f"panel{os.getpid()}"
    key = f"cluster-{profile}"
    api(server, "clusters", {"n": 1, "profile": profile})
    try:
        with browser.step("panel-restart"):
            browser_helpers.wait_until(
                lambda: rows(d, key) == {0: "idle"}, 20, "the new cluster's engine idle"
            )
            pid = next(c for c in api(server, "clusters")["clusters"] if c["id"] == key)["engines"][
                0
            ]["pid"]
            click(d, f"[data-cluster='{key}'] [data-engine='0'] [data-action='restart']")

            def restarted():
                c = next(c for c in api(server, "clusters")["clusters"] if c["id"] == key)
                e = c["engines"][0]
                return e["pid"] != pid and e["state"] == "idle" and rows(d, key) == {0: "idle"}

            browser_helpers.wait_until(restarted, 30, "engine 0 restarted (new pid), idle")
            assert "done" in text(d, "[data-ipme='status']")
    finally:
        api(server, f"clusters/{key}/stop", {})


def test_open_console_on_engine_1_sees_pushed_x(page, mec):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _server, browser, _ = page
    d = browser.driver
    mec.push({"x": 4321}, targets=1)
    with browser.step("panel-console"):
        click(d, f"[data-cluster='{KEY}'] [data-engine='1'] [data-action='console']")
        prompt = browser_helpers.wait_until(
            lambda: css(
                d, ".jp-CodeConsole:not(.lm-mod-hidden) .jp-CodeConsole-promptCell .cm-content"
            ),
            30,
            "the engine console's prompt",
        )[0]
        prompt.click()
        prompt.send_keys("x")
        ActionChains(d).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        browser_helpers.wait_until(
            lambda: any(
                o.text.strip() == "4321"
                for o in css(d, ".jp-CodeConsole:not(.lm-mod-hidden) .jp-OutputArea-output")
            ),
            20,
            "the console to show x = 4321",
        )
    assert mec.pull("x", targets=1) == [4321]


def test_start_form_starts_a_2_engine_cluster_and_stop_ends_it(page):
    """The panel's "Start a cluster" form (engines, profile, kernelspec, launcher): a 2-engine
    cluster is listed idle; the cluster's Stop button ends it, and every process it had (owner
    and engines) is gone."""
    import psutil

    from ipy_multiengine import clusterfile

    server, browser, _ = page
    d = browser.driver
    profile = f"form{os.getpid()}"
    key = f"cluster-{profile}"
    form = "[data-ipme='start-form']"
    procs: list[psutil.Process] = []
    try:
        with browser.step("panel-start-form"):
            click(d, f"{form} summary")
            browser_helpers.wait_until(
                lambda: css(d, f"{form} select[name='kernel'] option[value='python3']"),
                10,
                "the kernelspecs in the form",
            )
            for name, value in (("n", "2"), ("profile", profile)):
                field = css(d, f"{form} input[name='{name}']")[0]
                field.clear()
                field.send_keys(value)
            assert css(d, f"{form} select[name='launcher'] option[value='ssh']")  # all listed
            click(d, f"{form} [data-action='start']")
            browser_helpers.wait_until(
                lambda: rows(d, key) == {0: "idle", 1: "idle"},
                90,
                "the form's 2-engine cluster idle in the panel",
                step=0.2,
            )
            assert "done" in text(d, "[data-ipme='status']")
            spec = clusterfile.read_spec(clusterfile.cluster_file_path(profile))
            for ident in [
                spec["owner"],
                *(clusterfile.engine_identity(e, spec) for e in spec["engines"]),
            ]:
                proc, why = clusterfile.same_process(ident)
                assert proc is not None, why
                procs.append(proc)
            assert len(procs) == 3
        with browser.step("panel-stop"):
            click(d, f"[data-cluster='{key}'] .ipme-cluster-head [data-action='stop']")
            browser_helpers.wait_until(
                lambda: not css(d, f"[data-cluster='{key}']"), 30, "the cluster gone from the panel"
            )

            def ended(p: psutil.Process) -> bool:
                try:
                    return p.status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    return True

            browser_helpers.wait_until(
                lambda: all(ended(p) for p in procs), 15, "the owner and engines to exit"
            )
    finally:
        if clusterfile.cluster_file_path(profile).exists():
            api(server, f"clusters/{key}/stop", {})


def test_insert_client_code_into_the_active_notebook_and_run_it(page):
    """ "Insert client code" puts the cluster's connection code in a cell above the active one
    of the current notebook; run, it connects (the next cell sees the engines)."""
    server, browser, _ = page
    d = browser.driver
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell("print('ids', mec.get_ids())")]
    nbformat.write(nb, server.root / "insert.ipynb")
    notebook = browser_helpers.Notebook(browser, server, "insert.ipynb")
    expected = (
        "from ipy_multiengine import client\n"
        'mec = client.MultiEngineClient(profile="tests")\nmec.activate()'
    )
    try:
        with browser.step("panel-insert"):
            notebook.open()
            show_panel(d)
            click(d, f"[data-cluster='{KEY}'] .ipme-cluster-head [data-action='insert']")
            browser_helpers.wait_until(
                lambda: (
                    [c["source"] for c in notebook.code_cells()]
                    == [expected, "print('ids', mec.get_ids())"]
                ),
                10,
                "the client code in a cell above the active one",
            )
        with browser.step("panel-insert-run"):
            notebook.run_and_wait(0, timeout=60)
            assert "ids [0, 1, 2, 3]" in notebook.run_and_wait(1, timeout=30)
            notebook.save()
            notebook.close()
    finally:
        server.shutdown_kernel("insert.ipynb")
