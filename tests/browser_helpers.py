"""A real JupyterLab server and one headless Chromium driven by selenium, for tests of what a
person sees in a notebook.

``lab_server`` starts JupyterLab on 127.0.0.1 (a free port, a random token, a temporary root
directory, private JUPYTER_CONFIG_DIR/JUPYTER_DATA_DIR and JupyterLab settings/workspaces
dirs, a ``python3`` kernelspec pointing at this interpreter so the notebook kernel imports
ipy_multiengine); ``Browser`` is one headless Chromium with a fresh profile; ``Notebook``
drives one open notebook through the DOM (run cells from the Run menu, interrupt from the
toolbar, save with Ctrl+S) and reads back what the page shows. Every step can leave a
screenshot in pytest's temporary directory (``Browser.step``), named in the failure message.
Teardown stops the kernels, the server, every process they started and the browser.

The fixtures ``lab_session`` and ``lab`` (registered in ``conftest.py``) share one server and
one browser between the browser modules a test process runs (with pytest-xdist, the modules of
one worker): ``lab`` hands each module the pair as if new (no kernel left by an earlier module,
and the module's first notebook loads a fresh JupyterLab page in a new workspace).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from faultlib import user_environ, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# JupyterLab user settings for a quiet, deterministic page: no news or update toasts, every
# cell kept in the DOM (no virtual scrolling), no autosave racing our explicit Ctrl+S.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


def have_browser() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: seconds between two polls of the page: each is a WebDriver round trip running script in it
POLL = 0.05


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = POLL) -> Any:
    """``faultlib.wait_for`` at the browser's poll step."""
    return wait_for(cond, timeout, what, step)


class LabServer:
    """One JupyterLab server process (see the module docstring)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.token = secrets.token_hex(16)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log = base / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        # keeps the session's private JUPYTER_RUNTIME_DIR (conftest); the kernels a user's
        # server starts have no pytest variables
        env = user_environ()
        env.update(
            JUPYTER_CONFIG_DIR=str(self.base / "config"),
            JUPYTER_DATA_DIR=str(self.base / "data"),
            JUPYTER_PATH=str(self.base / "data"),
            JUPYTERLAB_SETTINGS_DIR=str(self.base / "lab-settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(self.base / "lab-workspaces"),
            JUPYTER_PLATFORM_DIRS="1",
            IPYTHONDIR=str(self.base / "ipython"),
            MPLBACKEND="module://matplotlib_inline.backend_inline",
        )
        env.pop("JPY_SESSION_NAME", None)
        return env

    def _prepare(self) -> None:
        self.root.mkdir(parents=True)
        spec = self.base / "data" / "kernels" / "python3"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "Python 3 (ipykernel)",
                    "language": "python",
                }
            )
        )
        config = self.base / "config"
        config.mkdir(parents=True)
        (config / "jupyter_server_config.json").write_text(
            json.dumps(
                {
                    "ServerApp": {
                        # only what the page needs: a faster start, fewer processes
                        "jpserver_extensions": {
                            "jupyter_lsp": False,
                            "jupyter_server_terminals": False,
                            "notebook_shim": False,
                        },
                        "terminals_enabled": False,
                        "allow_root": True,  # CI containers run as root
                    }
                }
            )
        )
        for rel, values in LAB_SETTINGS.items():
            path = self.base / "lab-settings" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))

    def start(self, timeout: float = 120) -> None:
        self._prepare()
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = free_port()
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "jupyterlab",
                        "--no-browser",
                        "--ServerApp.ip=127.0.0.1",
                        f"--ServerApp.port={self.port}",
                        "--ServerApp.port_retries=0",
                        f"--IdentityProvider.token={self.token}",
                        f"--ServerApp.root_dir={self.root}",
                        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                        "--ServerApp.shutdown_no_activity_timeout=600",
                    ],
                    env=self._env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    if self.api("GET", "/api/status") is not None:
                        return
                time.sleep(0.1)  # polls for the server to answer, bounded
            if self.proc.poll() is None:
                raise AssertionError(f"JupyterLab did not answer in {timeout} s: {self.log}")
        raise AssertionError(f"JupyterLab did not start: {self.log.read_text()[-3000:]}")

    def api(self, method: str, path: str, timeout: float = 10) -> Any:
        req = urllib.request.Request(
            self.url + path,
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method in ("POST",) else None,
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else {}

    def kernels(self) -> list[dict]:
        return self.api("GET", "/api/kernels")

    def lab_url(self, path: str, workspace: str) -> str:
        """The page of notebook ``path`` in a fresh JupyterLab workspace ``workspace`` (so no
        earlier tab is restored, and no earlier notebook's kernel started again)."""
        return f"{self.url}/lab/workspaces/{workspace}/tree/{path}?token={self.token}"

    def kernel_state(self, path: str) -> str | None:
        """The execution state the server knows for the kernel of notebook ``path``."""
        for s in self.api("GET", "/api/sessions"):
            if s.get("path") == path and s.get("kernel"):
                return s["kernel"].get("execution_state")
        return None

    def shutdown_kernel(self, path: str) -> None:
        for s in self.api("GET", "/api/sessions"):
            if s.get("path") == path and s.get("kernel"):
                self.api("DELETE", f"/api/kernels/{s['kernel']['id']}", timeout=30)

    def stop(self) -> list[int]:
        """Shut down the kernels (so notebooks' own clusters stop their engines), then the
        server; then end whatever the server started that is still alive (engines of a kernel
        that died early). Returns the pids that had to be ended that way."""
        if self.proc is None:
            return []
        try:
            started = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            started = []
        with contextlib.suppress(OSError, urllib.error.URLError):
            for k in self.kernels():
                with contextlib.suppress(OSError, urllib.error.URLError):
                    self.api("DELETE", f"/api/kernels/{k['id']}", timeout=30)
        with contextlib.suppress(OSError, urllib.error.URLError):
            self.api("POST", "/api/shutdown")
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # the same psutil.Process objects: create time checked, never a pid alone
        _gone, alive = psutil.wait_procs(started, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _gone, alive = psutil.wait_procs(alive, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.proc = None
        return [p.pid for p in alive]


@contextlib.contextmanager
def lab_server(base: Path) -> Iterator[LabServer]:
    server = LabServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def lab_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabServer, Browser]]:
    """One JupyterLab and one Chromium for every browser module of this test process."""
    require_browser()
    base = tmp_path_factory.mktemp("lab")
    with lab_server(base) as server:
        browser = Browser(base)
        try:
            yield server, browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def lab(lab_session: tuple[LabServer, Browser]) -> Iterator[tuple[LabServer, Browser]]:
    """(server, browser) for one module, as if new: before and after it, every kernel of the
    server is shut down and the browser leaves JupyterLab's page (the module's first
    ``Notebook.open`` loads a fresh page, in a new workspace: no tab of another module)."""
    server, browser = lab_session
    fresh(server, browser)
    yield server, browser
    fresh(server, browser)


def fresh(server: LabServer, browser: Browser) -> None:
    """Shut down every kernel of ``server`` and blank the page (see ``lab``)."""
    with contextlib.suppress(Exception):  # a page that is gone already is as good
        browser.driver.get("about:blank")
    for s in server.api("GET", "/api/sessions"):
        server.api("DELETE", f"/api/sessions/{s['id']}", timeout=30)
    for k in server.kernels():
        server.api("DELETE", f"/api/kernels/{k['id']}", timeout=30)
    wait_until(lambda: not server.kernels(), 30, "the server's kernels to shut down", step=0.1)


class Browser:
    """One headless Chromium (fresh profile) with step screenshots in ``shots``."""

    def __init__(self, base: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.shots = base / "screenshots"
        self.shots.mkdir(parents=True, exist_ok=True)
        self.profile = base / "chromium-profile"
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            f"--user-data-dir={self.profile}",
        ):
            opts.add_argument(arg)
        self.service = Service(CHROMEDRIVER, log_output=str(base / "chromedriver.log"))
        self.driver = webdriver.Chrome(service=self.service, options=opts)
        self.count = 0

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A named step of a test: its screenshot is kept, and a failure names it; its
        duration goes to ``steps.log`` beside the screenshots."""
        t0 = time.monotonic()
        try:
            yield
        except BaseException as exc:
            try:
                path = self.shot(name + "-FAILED")
            except Exception as shot_exc:  # the browser itself may be gone
                path = f"(no screenshot: {shot_exc})"
            if isinstance(exc, AssertionError):
                raise AssertionError(f"step {name!r} failed, screenshot {path}: {exc}") from exc
            raise
        finally:
            with open(self.shots / "steps.log", "a") as log:
                log.write(f"{name}: {time.monotonic() - t0:.2f} s\n")
        self.shot(name)

    def shot_element(self, element: Any, name: str) -> Path:
        """A screenshot of one element (e.g. a cell), for the docs."""
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        path = self.shots / f"{name}.png"
        element.screenshot(str(path))
        return path

    def close(self) -> None:
        try:
            proc = psutil.Process(self.service.process.pid)
            started = proc.children(recursive=True)
        except (psutil.Error, AttributeError):
            started = []
        with contextlib.suppress(Exception):
            self.driver.quit()
        _gone, alive = psutil.wait_procs(started, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


# JavaScript that reads one notebook's cells as a person sees them, in one round trip.
_READ_CELLS = """
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!panel) return null;
return Array.from(panel.querySelectorAll('.jp-Notebook .jp-Cell')).map(cell => ({
  kind: cell.classList.contains('jp-CodeCell') ? 'code' :
        (cell.classList.contains('jp-MarkdownCell') ? 'markdown' : 'raw'),
  prompt: (cell.querySelector('.jp-InputArea-prompt') || {innerText: ''}).innerText,
  source: Array.from(cell.querySelectorAll('.jp-InputArea-editor .cm-line'))
               .map(l => l.textContent).join('\\n'),
  outputs: Array.from(cell.querySelectorAll('.jp-OutputArea-output')).map(o => ({
    mime: o.getAttribute('data-mime-type') || '',
    text: o.innerText,
    images: o.querySelectorAll('img').length,
  })),
}));
"""


class Notebook:
    """One notebook open in the browser, driven as a person does."""

    opened = 0  # pages opened so far: each gets its own workspace

    def __init__(self, browser: Browser, server: LabServer, path: str) -> None:
        self.browser, self.server, self.path = browser, server, path
        self.driver = browser.driver

    def open(self, timeout: float = 120) -> Notebook:
        """Open the notebook as a person does: the first time by loading JupyterLab's page
        for it, later in the same page with File > Open from Path (one page load for the
        whole module). Waits until every cell is shown and the kernel is idle."""
        import nbformat
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        n = len(nbformat.read(self.server.root / self.path, as_version=4).cells)
        if not self.driver.current_url.startswith(self.server.url):
            Notebook.opened += 1
            self.driver.get(self.server.lab_url(self.path, f"w{Notebook.opened}"))
        else:
            self.menu("File", "filebrowser:open-path")
            field = wait_until(
                lambda: self.driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog input"),
                10,
                "the Open from Path dialog",
            )[0]
            field.send_keys(self.path, Keys.ENTER)
        wait_until(
            lambda: (
                self.current_tab() == Path(self.path).name
                and len(self.cells()) == n
                and self.kernel_status() == "idle"
                and self.server.kernel_state(self.path) == "idle"
            ),
            timeout,
            f"{self.path} open ({n} cells) with an idle kernel",
            step=0.2,
        )
        return self

    def current_tab(self) -> str | None:
        return self.driver.execute_script(
            "const t = document.querySelector("
            "'.jp-MainAreaWidget ~ * .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel, "
            "#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel');"
            "return t ? t.innerText.trim() : null;"
        )

    def close(self) -> None:
        """File > Close Tab (saved first by the caller, so no dialog); waits until it is gone."""
        name = Path(self.path).name
        self.menu("File", "application:close")
        wait_until(lambda: self.current_tab() != name, 15, f"the tab of {name} to close")

    # --- reading -------------------------------------------------------------------------
    def cells(self) -> list[dict]:
        return self.driver.execute_script(_READ_CELLS) or []

    def code_cells(self) -> list[dict]:
        return [c for c in self.cells() if c["kind"] == "code"]

    def kernel_status(self) -> str:
        """What the toolbar's kernel status shows (``idle``, ``busy``, ...)."""
        return self.driver.execute_script(
            "const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');"
            "const el = p && p.querySelector('.jp-Notebook-ExecutionIndicator');"
            "return el ? el.getAttribute('data-status') : null;"
        )

    def busy_cells(self) -> list[int]:
        return [i for i, c in enumerate(self.code_cells()) if "[*]" in c["prompt"]]

    def wait_idle(self, timeout: float, what: str = "the notebook to finish") -> None:
        wait_until(
            lambda: (
                self.cells()
                and self.kernel_status() == "idle"
                and not self.busy_cells()
                and self.server.kernel_state(self.path) == "idle"
            ),
            timeout,
            what,
            step=0.1,
        )

    def dump(self, name: str) -> Path:
        """Every cell as the page shows it, as JSON beside the screenshots (for diagnosis)."""
        path = self.browser.shots / f"{name}.json"
        path.write_text(json.dumps(self.cells(), indent=1))
        return path

    def output_text(self, index: int) -> str:
        return "\n".join(o["text"] for o in self.code_cells()[index]["outputs"])

    # --- acting --------------------------------------------------------------------------
    def cell_element(self, index: int) -> Any:
        from selenium.webdriver.common.by import By

        panel = self.driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden)")
        return panel.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell")[index]

    def select(self, index: int) -> None:
        """Click code cell ``index``'s prompt: selects it in command mode."""
        cell = self.cell_element(index)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
        from selenium.webdriver.common.by import By

        cell.find_element(By.CSS_SELECTOR, ".jp-InputArea-prompt").click()

    def menu(self, top: str, command: str) -> None:
        """Click the menu bar's ``top`` menu, then the item running ``command``."""
        from selenium.webdriver.common.by import By

        for item in self.driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item"):
            if item.text.strip() == top:
                item.click()
                break
        else:
            raise AssertionError(f"no menu {top!r}")
        wait_until(
            lambda: self.driver.find_elements(
                By.CSS_SELECTOR, f'.lm-Menu-item[data-command="{command}"]'
            ),
            5,
            f"menu item {command}",
        )[0].click()

    def run(self, index: int) -> None:
        """Run code cell ``index`` (select it, Ctrl+Enter) without waiting for it to finish."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        self.select(index)
        ActionChains(self.driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(
            Keys.CONTROL
        ).perform()
        wait_until(
            lambda: self.code_cells()[index]["prompt"].strip() not in ("[ ]:", ""),
            10,
            f"cell {index} to start",
        )

    def run_and_wait(self, index: int, timeout: float = 60) -> str:
        self.run(index)
        self.wait_idle(timeout, f"cell {index} to finish")
        return self.output_text(index)

    def run_all_below(self, index: int, timeout: float = 120) -> None:
        """Select code cell ``index`` and Run > Run Selected Cell and All Below; wait until
        the kernel is idle and no cell is queued."""
        self.select(index)
        self.menu("Run", "notebook:run-all-below")
        self.wait_idle(timeout, f"the cells from {index} on to finish")

    def run_everything(self, timeout: float = 150) -> list[int]:
        """Run every code cell top to bottom as a person would: Run All Below from the top,
        and after a cell that fails (which stops the run) again from the cell after it.
        Returns the indices of the code cells that failed."""
        deadline = time.monotonic() + timeout
        failed: list[int] = []
        start = 0
        n = len(self.code_cells())
        while start < n:
            self.run_all_below(start, timeout=max(1.0, deadline - time.monotonic()))
            cells = self.code_cells()
            stopped = next(
                (i for i in range(start, n) if cells[i]["prompt"].strip() in ("[ ]:", "")), None
            )
            if stopped is None:
                break
            assert stopped > start, f"cell {start} did not run: {cells[start]}"
            failed.append(stopped - 1)
            start = stopped
        return failed

    def interrupt(self) -> None:
        """Click the toolbar's interrupt-kernel button."""
        from selenium.webdriver.common.by import By

        panel = self.driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden)")
        panel.find_element(
            By.CSS_SELECTOR, '.jp-Toolbar [data-command="notebook:interrupt-kernel"]'
        ).click()

    def save(self) -> None:
        """Ctrl+S, then wait until the page says it is saved (no dirty mark on its tab; other
        notebooks open in the page may have unsaved changes)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        ActionChains(self.driver).key_down(Keys.CONTROL).send_keys("s").key_up(
            Keys.CONTROL
        ).perform()
        wait_until(
            lambda: (
                not self.driver.execute_script(
                    "return document.querySelector("
                    "'#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current.jp-mod-dirty')"
                )
            ),
            15,
            "the notebook to be saved",
        )


def require_browser() -> None:
    """Skip only where the browser cannot exist; CI installs it (.ci/install-system-deps)."""
    if os.environ.get("CI") and not have_browser():
        pytest.fail("CI must have chromium and chromedriver (.ci/install-system-deps)")
    if not have_browser():
        pytest.skip("chromium/chromedriver not installed (.ci/install-system-deps)")
    pytest.importorskip("selenium")
    pytest.importorskip("jupyterlab")
