"""Shared fixtures: one real 4-engine cluster per session, a clean namespace per test.

Every engine is a real ipykernel process started through jupyter_client and reached over
real ZMQ. Runtime files go to a private temporary directory, and the session fails if any
kernel process outlives it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

# A suite started in the background by a non-interactive shell (`.ci/run &`, a CI runner's
# script step) inherits SIGINT *ignored* (POSIX job control), so Ctrl-C could never be tested:
# restore Python's KeyboardInterrupt; the processes the tests start then get the default action.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_RUNTIME = tempfile.mkdtemp(prefix="ipme-test-runtime-")
os.environ["JUPYTER_RUNTIME_DIR"] = _RUNTIME  # before ipy_multiengine computes any path

import psutil  # noqa: E402
import pytest  # noqa: E402
from browser_helpers import lab, lab_session  # noqa: E402, F401  (the browser modules share them)
from faultlib import reset_engines  # noqa: E402

from ipy_multiengine import Cluster  # noqa: E402


def _running(p: psutil.Process) -> bool:
    """Still running: not exited, and not a zombie (exited, not yet reaped by its parent, e.g.
    init for a daemon's engines)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kernel_children() -> list[psutil.Process]:
    """Kernel and cluster processes started by this test session: our descendants, and detached
    ones (daemons and their engines, reparented away from us) found by the session's private
    JUPYTER_RUNTIME_DIR in their environment."""
    me = psutil.Process()
    candidates = {p.pid: p for p in me.children(recursive=True)}
    for p in psutil.process_iter():
        try:
            if p.pid != me.pid and p.environ().get("JUPYTER_RUNTIME_DIR") == _RUNTIME:
                candidates[p.pid] = p
        except psutil.Error:
            pass
    out = []
    for p in candidates.values():
        try:
            if not _running(p):
                continue
            if any("ipykernel" in part or "ipy_multiengine" in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="session", autouse=True)
def _kernels_start_as_a_users():
    """Every kernel started from this process (engines, nbclient's, the tests' own kernel
    managers) gets an environment without ``PYTEST_CURRENT_TEST``, or its start fails saying
    so: under it ipykernel leaves fd 1 and 2 uncaptured, unlike a user's kernels (start
    yours with ``faultlib.user_environ()``; launchers drop it themselves)."""
    from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

    finalize = KernelProvisionerBase._finalize_env

    def checked(self, env: dict[str, str]) -> None:
        finalize(self, env)
        if "PYTEST_CURRENT_TEST" in env:
            raise AssertionError(
                "a kernel was started with PYTEST_CURRENT_TEST in its environment: it would "
                "not capture fd output as a user's kernel does (start it with "
                "faultlib.user_environ())"
            )

    KernelProvisionerBase._finalize_env = checked  # type: ignore[method-assign]
    yield
    KernelProvisionerBase._finalize_env = finalize  # type: ignore[method-assign]


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_kernels():
    yield
    # a cluster stopped by the last test may still be exiting: give it a few seconds
    _gone, alive = psutil.wait_procs(kernel_children(), timeout=5)
    left = [p for p in alive if _running(p)]
    for p in left:
        p.kill()
    shutil.rmtree(_RUNTIME, ignore_errors=True)
    assert not left, f"kernel processes outlived the test suite: {[p.pid for p in left]}"


@pytest.fixture(scope="session")
def cluster():
    c = Cluster(n=4, profile="tests")
    c.start()
    yield c
    c.stop()


@pytest.fixture
def mec(cluster):
    """The session's 4-engine client, with default options and empty engine namespaces."""
    client = cluster.client
    client.block = True
    client.targets = "all"
    reset_engines(client)  # bounded: names what it waited for
    return client


@pytest.fixture
def ip(mec):
    """A real ``InteractiveShell`` with the extension loaded and ``mec`` active; the magics are
    reset (``%pxconfig`` defaults, ``%autopx`` off) before and after, ``mec`` back to defaults."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ipy_multiengine")
    mec.activate()
    shell.magics_manager.registry["ParallelMagics"].reset()
    yield shell
    shell.magics_manager.registry["ParallelMagics"].reset()  # a test may have reloaded it
    mec.block = True
    mec.targets = "all"


# -- CI: no test may be skipped there (a skip is a test that did not run)
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ``CI`` set, any skipped test fails the run (on the xdist controller, which sees
    every worker's reports, or in a plain run)."""
    if not os.environ.get("CI") or hasattr(session.config, "workerinput") or not _skipped:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"CI: {len(_skipped)} test(s) skipped, which CI does not allow:", red=True
        )
        for nodeid in _skipped:
            reporter.write_line(f"  {nodeid}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
