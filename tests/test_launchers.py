"""Launchers against real systems started by this suite: MPI (mpich from PyPI), a private
Slurm (munge + slurmctld + slurmd), private sshd servers on 127.0.0.1 and in a network
namespace, and kernels started by hand for attach.

A system that cannot run here (not root, package missing) skips its tests with the reason,
except under CI (``CI`` set), where that is a failure: CI installs everything with
``.ci/install-system-deps``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from faultlib import user_environ, wait_for
from launcher_systems import NetnsHost, SlurmCluster, SSHKeys, SSHServer, Unavailable

from ipy_multiengine import Cluster, CompositeError, MultiEngineClient
from ipy_multiengine.engine_main import rank_from_environment
from ipy_multiengine.launchers import (
    EngineStartTimeout,
    LauncherError,
    available_launchers,
    get_launcher_class,
)
from ipy_multiengine.launchers.mpi import MPILauncher
from ipy_multiengine.launchers.ssh import SSHLauncher

SRC = str(Path(__file__).resolve().parents[1])
RUNTIME = os.environ["JUPYTER_RUNTIME_DIR"]  # private, set by conftest
# what every engine started over ssh or by slurm needs to import this tree and keep its
# files in the suite's private runtime dir
ENGINE_ENV = {"PYTHONPATH": SRC, "JUPYTER_RUNTIME_DIR": RUNTIME}


def ipmulti(
    *args: str, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run the ``ipmulti`` CLI of this checkout in a subprocess."""
    env = dict(os.environ, PYTHONPATH=SRC) if env is None else env
    return subprocess.run(
        [sys.executable, "-m", "ipy_multiengine.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but: {reason}")
    pytest.skip(reason)


SSH_ENGINE_DIR = os.path.join(RUNTIME, "ipy_multiengine", "engines")  # engine_main --stdin files


def engine_processes(marker: str = RUNTIME) -> list[psutil.Process]:
    """The engine_main processes (whoever their parent is: sshd, slurmstepd, hydra...) whose
    command line contains ``marker`` (a launcher's work dir; default: any of this suite)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ipy_multiengine.engine_main" in cmd and marker in cmd:
            out.append(p)
    return out


def wait_no_engines(marker: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = []
    for p in engine_processes(marker):
        try:
            left.append((p.pid, p.cmdline()))
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"engine processes left behind: {left}"


def interrupt_sleep(mec, wait: float = 20.0) -> None:
    """Run a long sleep everywhere, interrupt it once every engine runs it (its print: a kernel
    ignores SIGINT between requests, and a fixed 1 s wait was no proof on a loaded box), and
    check every engine got KeyboardInterrupt."""
    started: set[int] = set()

    def listener(eid: int, mtype: str, content: dict) -> None:
        if mtype == "stream" and "started" in content.get("text", ""):
            started.add(eid)

    n = len(mec.get_ids())
    pr = mec.execute(
        "import time; print('started', flush=True); time.sleep(60)", block=False, listener=listener
    )
    wait_for(lambda: len(started) == n, 60, f"all {n} engines to start the sleep")
    t0 = time.monotonic()
    mec.interrupt()
    with pytest.raises(CompositeError) as info:
        pr.get_result(timeout=wait)
    assert time.monotonic() - t0 < wait
    assert len(info.value.elist) == len(mec.get_ids())
    assert all("KeyboardInterrupt" in str(e) for e in info.value.elist), info.value
    assert [r["stdout"] for r in mec.execute("print('alive')")] == ["alive\n"] * len(mec.get_ids())


# ---------------------------------------------------------------------- units
def test_rank_from_environment():
    assert rank_from_environment({}) is None
    assert rank_from_environment({"PMI_RANK": "3"}) == 3
    assert rank_from_environment({"OMPI_COMM_WORLD_RANK": "2", "SLURM_PROCID": "5"}) == 2
    assert rank_from_environment({"PMIX_RANK": "1"}) == 1
    assert rank_from_environment({"SLURM_PROCID": "7"}) == 7


def test_launchers_are_found_by_name_and_entry_point():
    assert {"local", "mpi", "slurm", "ssh"} <= set(available_launchers())
    assert get_launcher_class("mpi") is MPILauncher
    assert get_launcher_class("ssh") is SSHLauncher
    assert get_launcher_class("ipy_multiengine.launchers.mpi:MPILauncher") is MPILauncher
    with pytest.raises(ValueError, match=r"unknown launcher 'nope'.*mpi"):
        get_launcher_class("nope")
    with pytest.raises(TypeError, match="unknown option"):
        Cluster(2, launcher="mpi", no_such_option=1)
    with pytest.raises(ValueError, match="hosts add up to 3"):
        SSHLauncher(2, hosts={"a": 1, "b": 2})


def test_engine_main_binds_free_ports_and_reports_them(tmp_path):
    from ipy_multiengine.engine_main import read_json, write_json_atomic
    from ipy_multiengine.launchers.base import new_connection_info

    os.chmod(tmp_path, 0o700)
    path = tmp_path / "engine-5.json"
    write_json_atomic(str(path), new_connection_info())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    env = dict(os.environ, PYTHONPATH=SRC, SLURM_PROCID="5")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ipy_multiengine.engine_main",
            "--connection-file",
            str(tmp_path / "engine-{engine_id}.json"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (read_json(str(path)) or {}).get("ipy_multiengine_ready"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        report = read_json(str(path))
        assert report["engine_id"] == 5 and report["pid"] == proc.pid
        assert all(
            report[p] > 0
            for p in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
        )
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        mec = MultiEngineClient.attach([str(path)])
        assert mec.execute("import os; print(os.getpid())")[0]["stdout"] == f"{proc.pid}\n"
        mec.close()
    finally:
        proc.kill()
        proc.wait()


def test_engine_main_bound_to_all_interfaces_reports_a_reachable_address(tmp_path):
    """ip='*' (multi-host MPI/Slurm): the kernel binds every interface and reports the address
    others should use (the host's, or IPY_MULTIENGINE_ENGINE_ADDRESS)."""
    from ipy_multiengine.engine_main import read_json, write_json_atomic
    from ipy_multiengine.launchers.base import new_connection_info

    path = tmp_path / "engine-0.json"
    write_json_atomic(str(path), new_connection_info(ip="*"))
    env = dict(os.environ, PYTHONPATH=SRC, IPY_MULTIENGINE_ENGINE_ADDRESS="127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipy_multiengine.engine_main", "-f", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (read_json(str(path)) or {}).get("ipy_multiengine_ready"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        report = read_json(str(path))
        assert report["ip"] == "127.0.0.1"
        listening = {
            c.laddr.ip for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"
        }
        assert "0.0.0.0" in listening
        mec = MultiEngineClient.attach([str(path)])
        assert mec.execute("print(1)")[0]["stdout"] == "1\n"
        mec.close()
    finally:
        proc.kill()
        proc.wait()


def answers_kernel_info(info: dict, curve: bool, wait: float = 2.0) -> bool:
    """Does the engine of ``info`` answer a kernel_info_request on its shell socket (right HMAC
    key), sent in plaintext or with CurveZMQ?"""
    import zmq
    from jupyter_client.session import Session

    ctx = zmq.Context()
    timeout = wait if not curve else 10 * wait
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        # a plaintext handshake the engine refused before the send (a loaded box) leaves the
        # DEALER without a peer: its send then blocked for good (the test's timeout, once)
        sock.sndtimeo = int(timeout * 1000)
        if curve:
            sock.curve_serverkey = info["curve_publickey"].encode()
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        try:
            Session(key=info["key"].encode()).send(sock, "kernel_info_request", {})
        except zmq.Again:
            return False  # no peer took it: not answered
        return bool(sock.poll(int(timeout * 1000)))
    finally:
        # destroy, not term: a test timeout raised inside poll leaves the socket open, and
        # term() would then block the worker forever in C, where the timeout cannot reach
        ctx.destroy(linger=0)


def assert_encrypted(c, mec) -> None:
    """Every engine of ``c`` is encrypted: the client got the public key only, a CurveZMQ
    client is answered, a plaintext one (even with the HMAC key) is refused."""
    assert all(e["encrypted"] for e in mec.engines)
    for info in c.engines_info.values():
        assert len(info["curve_publickey"]) == 40 and "curve_secretkey" not in info
        assert answers_kernel_info(info, curve=True)
        assert not answers_kernel_info(info, curve=False)
    spec = json.loads(Path(c.cluster_file).read_text()) if c.cluster_file else {}
    assert "curve_secretkey" not in json.dumps(spec)


@pytest.mark.timeout(120)
def test_o06_engine_bound_wide_in_a_netns_host_reports_its_routable_address(ssh_hosts, tmp_path):
    """ip='*' on a host whose name resolves to loopback (as 127.0.1.1 on Debian): the engine
    reports the address of its interface toward the controller, never loopback."""
    from ipy_multiengine.engine_main import read_json
    from ipy_multiengine.launchers.base import write_engine_files

    _keys, _local, _remote, ns = ssh_hosts
    in_ns = ["ip", "netns", "exec", ns.name, sys.executable]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPY_MULTIENGINE_")}
    env["PYTHONPATH"] = SRC
    probe = (
        "import socket; from ipy_multiengine.engine_main import report_address as r; "
        "print(socket.gethostbyname(socket.gethostname()), r('*', {}))"
    )
    naive, fallback = subprocess.run(
        [*in_ns, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert naive.startswith("127.")  # what the old code reported
    assert fallback == ns.ns_ip  # no controller named, no default route: the interface's address
    os.chmod(tmp_path, 0o700)
    [path] = write_engine_files(str(tmp_path), 1, ip="*")
    env["IPY_MULTIENGINE_CONTROLLER_HOST"] = ns.host_ip
    proc = subprocess.Popen(
        [*in_ns, "-m", "ipy_multiengine.engine_main", "-f", path],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (read_json(path) or {}).get("ipy_multiengine_ready"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        report = read_json(path)
        assert report["ip"] == ns.ns_ip
        # bound wide: encrypted by default, and reachable from here at the reported address
        assert "curve_publickey" in report
        from ipy_multiengine.launchers.base import connection_info

        info = connection_info(report)
        assert answers_kernel_info(info, curve=True) and not answers_kernel_info(info, curve=False)
        mec = MultiEngineClient.attach([path])
        try:
            assert mec.execute("print(1)")[0]["stdout"] == "1\n"
        finally:
            mec.close()
    finally:
        proc.kill()
        proc.wait()


def test_13_launcher_errors_are_package_errors_and_pickle():
    import pickle

    from ipy_multiengine.errors import EngineError, MultiEngineError

    err = LauncherError("engine 3 failed to start", 3)
    assert isinstance(err, MultiEngineError) and isinstance(err, EngineError)
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.engine_id) == (LauncherError, str(err), 3)
    t = EngineStartTimeout("engines 1, 2 never reported", [1, 2])
    assert isinstance(t, TimeoutError) and isinstance(t, MultiEngineError)
    back = pickle.loads(pickle.dumps(t))
    assert (type(back), str(back), back.missing) == (EngineStartTimeout, str(t), [1, 2])


def test_13_launcher_interface_is_abstract_and_restart_says_why_not():
    import asyncio

    from ipy_multiengine.launchers.base import Launcher
    from ipy_multiengine.launchers.local import LocalLauncher
    from ipy_multiengine.launchers.slurm import SlurmLauncher

    class Half(Launcher):
        async def stop(self, timeout=5.0):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Half(1)
    assert not hasattr(Launcher, "poll")
    assert LocalLauncher.can_restart
    for launcher in (MPILauncher(2), SlurmLauncher(2), SSHLauncher(hosts={"h": 2})):
        assert not launcher.can_restart
        with pytest.raises(LauncherError, match=f"{launcher.name}.*cannot be restarted one by one"):
            asyncio.run(launcher.restart([0]))


@pytest.mark.timeout(120)
def test_13_local_engines_start_and_restart_through_the_local_launcher():
    from ipy_multiengine.launchers.local import KERNEL_ARGS, LocalLauncher

    c = Cluster(n=2, profile="test-13-local", write_file=False)
    assert isinstance(c.launcher, LocalLauncher) and c.managers is c.launcher.managers
    mec = c.start()
    try:
        old = c.engine_meta()[1]["pid"]
        # the fast kernel arguments (the old LocalLauncher lacked _execute_sleep=0) reach every
        # kernel
        for km in c.managers.values():
            cmd = psutil.Process(km.provisioner.pid).cmdline()
            assert all(a in cmd for a in KERNEL_ARGS), cmd
        mec.execute("a = 5")
        mec.restart(1)
        assert c.engine_meta()[1]["pid"] != old and not psutil.pid_exists(old)
        assert mec.execute("print('a' in dir())")[1]["stdout"] == "False\n"
        assert mec.execute("print(a)", targets=0)[0]["stdout"] == "5\n"
        files = [km.connection_file for km in c.managers.values()] + [
            str(c.log_file(e)) for e in (0, 1)
        ]
        assert all(os.path.exists(f) for f in files)
    finally:
        c.stop()
    assert not c.managers and not any(os.path.exists(f) for f in files)


# ---------------------------------------------------------------------- MPI
@pytest.fixture(scope="module")
def mpi_cluster():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        unavailable("mpi4py is not installed (pip install mpi4py mpich)")
    from ipy_multiengine.launchers.base import find_executable

    if find_executable("mpiexec") is None:
        unavailable("no mpiexec (pip install mpich)")
    c = Cluster(4, launcher="mpi", profile="test-mpi", startup_timeout=90)
    c.start()
    yield c
    work_dir = c.launcher.work_dir
    c.stop()
    wait_no_engines(work_dir)


@pytest.mark.timeout(180)
def test_mpi_engine_ids_are_ranks_and_allreduce_works(mpi_cluster):
    mec = mpi_cluster.client
    assert mec.get_ids() == [0, 1, 2, 3]
    mec.execute("from mpi4py import MPI; comm = MPI.COMM_WORLD; rank = comm.rank")
    assert mec.pull("rank") == [0, 1, 2, 3]
    mec.execute("total = comm.allreduce(rank + 1)")
    assert mec.pull("total") == [10] * 4


@pytest.mark.timeout(120)
def test_mpi_scatter_between_engines(mpi_cluster):
    mec = mpi_cluster.client
    mec.execute(
        textwrap.dedent("""\
        import numpy as np
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        data = np.arange(16.0).reshape(4, 4) if comm.rank == 0 else None
        part = np.empty(4)
        comm.Scatter(data, part, root=0)
        back = comm.gather(part.sum(), root=0)
    """)
    )
    parts = mec.pull("part")
    for rank, part in enumerate(parts):
        np.testing.assert_array_equal(part, np.arange(4.0) + 4 * rank)
    assert mec.pull("back", targets=0) == [[6.0, 22.0, 38.0, 54.0]]


@pytest.mark.timeout(120)
def test_mpi_allreduce_and_scatter_from_px(mpi_cluster):
    """The tutorial's promise: scatter/gather *between* engines with MPI, typed as %px."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ipy_multiengine")
    mec = mpi_cluster.client
    mec.activate()
    try:
        res = shell.run_cell(
            "%px from mpi4py import MPI; comm = MPI.COMM_WORLD; s = comm.allreduce(comm.rank)"
        )
        assert res.success, res.error_in_exec
        res = shell.run_cell(
            textwrap.dedent("""\
            %%px
            import numpy as np
            parts = [np.arange(3) + 10 * i for i in range(comm.size)]
            chunk = comm.scatter(parts if comm.rank == 0 else None, root=0)
            total = comm.reduce(chunk.sum(), root=0)
            """)
        )
        assert res.success, res.error_in_exec
    finally:
        shell.run_line_magic("unload_ext", "ipy_multiengine")
    assert mec.pull("s") == [6] * 4
    for rank, chunk in enumerate(mec.pull("chunk")):
        np.testing.assert_array_equal(chunk, np.arange(3) + 10 * rank)
    assert mec.pull("total", targets=0) == [sum(3 + 30 * r for r in range(4))]


@pytest.mark.timeout(120)
def test_mpi_interrupt_is_one_group(mpi_cluster):
    interrupt_sleep(mpi_cluster.client)


@pytest.mark.timeout(120)
def test_mpi_stop_leaves_no_process():
    c = Cluster(2, launcher="mpi", profile="test-mpi-stop")
    mec = c.start()
    pids = [e["pid"] for e in c.launcher.engines]
    mpiexec = c.launcher.pid
    assert mec.execute("print(1)")[0]["stdout"] == "1\n"
    work_dir = c.launcher.work_dir
    c.stop()
    assert not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        for p in [*pids, mpiexec]
    )
    assert not os.path.exists(work_dir)
    assert not Path(RUNTIME, "ipy_multiengine", "cluster-test-mpi-stop.json").exists()


@pytest.mark.timeout(120)
def test_mpi_stop_kills_a_rank_that_ignores_shutdown_and_sigterm():
    """A rank busy in code, ignoring SIGTERM: stop() asks, waits ``timeout``, SIGTERMs, waits,
    then SIGKILLs mpiexec, Hydra's proxy and the rank (each found through psutil: mpiexec's
    children, the rank by its command line), and returns within its bounds."""
    c = Cluster(1, launcher="mpi", profile="test-mpi-stuck")
    mec = c.start()
    launcher = c.launcher
    try:
        work_dir = launcher.work_dir
        mpiexec = psutil.Process(launcher.pid)
        mec.execute("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
        mec.execute("import time; time.sleep(600)", block=False)
        tree = [mpiexec, *mpiexec.children(recursive=True)]
        assert len(tree) >= 2 and len(engine_processes(work_dir)) == 2  # mpiexec + the rank
        from ipy_multiengine import _loop  # white-box: the launcher API is async, run on its loop

        t0 = time.monotonic()
        _loop.run(launcher.stop(timeout=1.0), timeout=30)
        took = time.monotonic() - t0
        _, alive = psutil.wait_procs(tree, timeout=1)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        assert not engine_processes(work_dir)
        assert took < 1 + 1 + 1 + 2 + 3  # shutdown, mpiexec, TERM and KILL waits, slack
        assert not os.path.exists(work_dir)
    finally:
        c.stop()


def _group_or_other_bits(root: str) -> list[str]:
    """Regular files under ``root`` that anybody but their owner may read or write."""
    loose = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                loose.append(f"{path} {oct(stat.S_IMODE(st.st_mode))}")
    return loose


@pytest.mark.timeout(120)
def test_launcher_logs_are_private_whatever_the_umask():
    """mpiexec's log and the detached ssh engines' logs are 0600 even under umask 022 (they
    were created with the umask's 0644; the directories are 0700, this is the second wall)."""
    old = os.umask(0o022)
    try:
        c = Cluster(1, launcher="mpi", profile="test-private-mpi")
        c.start()
        try:
            assert os.path.exists(c.launcher.output_path)
            assert not _group_or_other_bits(c.launcher.work_dir)
        finally:
            c.stop()
        c = Cluster(
            launcher="ssh",
            hosts={"good": 1},
            ssh=FAKE_SSH,
            python=sys.executable,
            env=ENGINE_ENV,
            profile="test-private-ssh",
        )
        c.start()
        try:
            assert any(f.endswith(".log") for f in os.listdir(SSH_ENGINE_DIR))
            assert not _group_or_other_bits(SSH_ENGINE_DIR)
        finally:
            c.stop()
    finally:
        os.umask(old)


@pytest.mark.timeout(60)
def test_mpi_startup_timeout_names_missing_engines(tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    c = Cluster(2, launcher="mpi", python=str(fake), startup_timeout=2, profile="test-mpi-fail")
    with pytest.raises(EngineStartTimeout, match=r"engine\(s\) 0, 1 never reported") as info:
        c.start()
    assert info.value.missing == [0, 1]
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(fake) in " ".join(p.info["cmdline"] or [])
    ]


@pytest.mark.timeout(60)
def test_mpi_job_that_dies_is_reported(tmp_path):
    c = Cluster(2, launcher="mpi", python="/bin/false", profile="test-mpi-fail2")
    with pytest.raises(LauncherError, match="mpiexec exited"):
        c.start()


@pytest.mark.timeout(90)
def test_cli_start_daemon_with_mpi_launcher_and_stop():
    run = ipmulti
    r = run("start", "--daemon", "--launcher", "mpi", "-n", "2", "--profile", "test-cli-mpi")
    assert r.returncode == 0, r.stderr
    spec = json.loads(Path(r.stdout.strip()).read_text())
    assert spec["launcher"]["launcher"] == "mpi" and [e["id"] for e in spec["engines"]] == [0, 1]
    mec = MultiEngineClient(profile="test-cli-mpi")
    mec.execute("from mpi4py import MPI; r = MPI.COMM_WORLD.rank")
    assert mec.pull("r") == [0, 1]
    mec.close()
    r = run("stop", "--profile", "test-cli-mpi")
    assert r.returncode == 0, r.stderr
    wait_no_engines(spec["launcher"]["work_dir"])


@pytest.mark.timeout(120)
def test_h15_mpi_engines_bound_wide_are_encrypted_by_default():
    c = Cluster(2, launcher="mpi", ip="*", env=ENGINE_ENV, profile="test-h15-mpi")
    mec = c.start()
    work_dir = c.launcher.work_dir
    try:
        assert_encrypted(c, mec)
        assert [r["stdout"] for r in mec.execute("print(7)")] == ["7\n", "7\n"]
    finally:
        c.stop()
    wait_no_engines(work_dir)


@pytest.mark.timeout(120)
def test_h15_mpi_honours_transport_encryption_on_loopback():
    c = Cluster(
        1, launcher="mpi", transport_encryption="required", env=ENGINE_ENV, profile="test-h15-mpi2"
    )
    mec = c.start()
    work_dir = c.launcher.work_dir
    try:
        assert_encrypted(c, mec)
    finally:
        c.stop()
    wait_no_engines(work_dir)


# ---------------------------------------------------------------------- Slurm
@pytest.fixture(scope="module")
def slurm():
    system = SlurmCluster()
    try:
        system.start()
    except Unavailable as exc:
        unavailable(str(exc))
    yield system
    system.stop()


def squeue(slurm) -> str:
    return subprocess.run(
        ["squeue", "-h", "-o", "%i %T"],
        env=dict(os.environ, **slurm.env),
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()


@pytest.mark.timeout(180)
def test_slurm_engines(slurm):
    c = Cluster(
        2,
        launcher="slurm",
        profile="test-slurm",
        ip="127.0.0.1",
        env={**slurm.env, **ENGINE_ENV},
        partition=slurm.PARTITION,
        time="10",
        sbatch_lines=["#SBATCH --comment=ipmulti-test"],
        startup_timeout=90,
    )
    mec = c.start()
    work_dir = c.launcher.work_dir
    try:
        job = c.launcher.job_id
        assert job in squeue(slurm) and "RUNNING" in squeue(slurm)
        assert mec.get_ids() == [0, 1]
        mec.execute(
            "import os; task = int(os.environ['SLURM_PROCID']); job = os.environ['SLURM_JOB_ID']"
        )
        assert mec.pull("task") == [0, 1]
        assert mec.pull("job") == [job, job]
        mec.scatter("a", np.arange(10))
        np.testing.assert_array_equal(mec.gather("a"), np.arange(10))
        interrupt_sleep(mec)
        script = Path(c.launcher.work_dir, "engines.sbatch").read_text()
        assert (
            "#SBATCH --partition=ipmtest" in script and "#SBATCH --comment=ipmulti-test" in script
        )
        assert "srun" in script
    finally:
        c.stop()
    deadline = time.monotonic() + 20
    while job in squeue(slurm) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job not in squeue(slurm)
    wait_no_engines(work_dir)


def wait_engine_error(pr, started: float, bound: float) -> float:
    """``pr`` fails with EngineError (the engine died); seconds from ``started`` until it did."""
    from ipy_multiengine.errors import EngineError

    with pytest.raises((EngineError, CompositeError)) as info:
        pr.get_result(timeout=bound + 30)
    took = time.monotonic() - started
    assert "EngineError" in repr(info.value) or isinstance(info.value, EngineError), info.value
    return took


#: the documented detection bound for heartbeat-watched engines: 4/3 x the period (3 s)
HEARTBEAT_BOUND = 4 / 3 * 3.0


@pytest.mark.timeout(180)
def test_h06_slurm_engine_killed_is_noticed_by_heartbeats(slurm):
    c = Cluster(
        2,
        launcher="slurm",
        profile="test-h06-slurm",
        ip="127.0.0.1",
        env={**slurm.env, **ENGINE_ENV},
        partition=slurm.PARTITION,
        time="10",
        startup_timeout=90,
    )
    mec = c.start()
    work_dir = c.launcher.work_dir
    try:
        assert c.launcher.liveness(1) is None  # no process this client can poll: heartbeats
        pid = c.launcher.engines[1]["pid"]
        pr = mec.execute("import time; time.sleep(60)", targets=1, block=False)
        t0 = time.monotonic()
        os.kill(pid, 9)
        took = wait_engine_error(pr, t0, HEARTBEAT_BOUND)
        assert took < HEARTBEAT_BOUND + 1.5, f"noticed after {took:.1f} s"
        assert mec.execute("print('ok')", targets=0)[0]["stdout"] == "ok\n"
    finally:
        c.stop()
    wait_no_engines(work_dir)


@pytest.mark.timeout(180)
def test_h15_slurm_engines_listen_wide_encrypted_by_default(slurm):
    c = Cluster(
        2,
        launcher="slurm",
        profile="test-h15-slurm",
        env={**slurm.env, **ENGINE_ENV},
        partition=slurm.PARTITION,
        time="10",
        startup_timeout=90,
    )
    mec = c.start()
    work_dir = c.launcher.work_dir
    try:
        assert all(not e["ip"].startswith("127.") for e in c.engines_info.values())
        assert_encrypted(c, mec)
        assert mec.execute("print(3)")[1]["stdout"] == "3\n"
    finally:
        c.stop()
    wait_no_engines(work_dir)


# ---------------------------------------------------------------------- SSH
@pytest.fixture(scope="module")
def ssh_hosts():
    """Two ssh 'hosts': sshd on 127.0.0.1 and sshd in a network namespace."""
    started = []
    try:
        keys = SSHKeys()
        started.append(keys)
        local = SSHServer(keys).start()
        started.append(local)
        ns = NetnsHost().start()
        started.append(ns)
        remote = SSHServer(keys, address=ns.ns_ip, netns=ns.name).start()
        started.append(remote)
    except Unavailable as exc:
        for s in reversed(started):
            s.remove() if isinstance(s, SSHKeys) else s.stop()
        unavailable(str(exc))
    yield keys, local, remote, ns
    for s in reversed(started):
        s.remove() if isinstance(s, SSHKeys) else s.stop()


def ssh_options(keys) -> dict:
    return dict(
        python=sys.executable,
        env=ENGINE_ENV,
        known_hosts=str(keys.known_hosts),
        identity_file=str(keys.user_key),
        ssh_args=["-F", "/dev/null"],
    )


@pytest.mark.timeout(180)
def test_ssh_engines_on_two_hosts(ssh_hosts):
    keys, local, remote, ns = ssh_hosts
    c = Cluster(
        launcher="ssh",
        hosts={local.destination: 2, remote.destination: 1},
        profile="test-ssh",
        **ssh_options(keys),
    )
    mec = c.start()
    try:
        assert mec.get_ids() == [0, 1, 2]
        # engines 0, 1 live on this host, engine 2 inside the namespace (it sees only its veth)
        mec.execute(
            "import subprocess; links = subprocess.run(['ip', '-br', 'link'], capture_output=True, "
            "text=True).stdout"
        )
        links = mec.pull("links")
        assert all(ns.veth_ns not in x for x in links[:2]) and ns.veth_ns in links[2]
        # the kernels listen on the remote loopback only; we reach them through ssh forwards
        for e in c.launcher.engines:
            assert e["ip"] == "127.0.0.1"
        remote_files = [r["connection_file"] for r in c.launcher.remote]
        for f in remote_files:
            assert oct(os.stat(f).st_mode & 0o777) == "0o600"
            assert json.loads(Path(f).read_text())["ip"] == "127.0.0.1"
        # data round trip, 8 MB each way
        data = np.random.default_rng(0).random(1_000_000)
        mec.push({"x": data})
        mec.execute("y = x * 2")
        for y in mec.pull("y"):
            np.testing.assert_array_equal(y, data * 2)
        mec.scatter("s", list(range(9)))
        assert mec.pull("s") == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
        assert mec.gather("s") == list(range(9))
        interrupt_sleep(mec)
        assert len(engine_processes(SSH_ENGINE_DIR)) == 3
        # this cluster's port forwarders (psutil: a reused pid is not the same process); a
        # scan of every ssh on the machine also caught other test runs' forwarders
        forwarders = [psutil.Process(f.pid) for f in c.launcher.forwarders if f is not None]
        assert len(forwarders) == 3  # one per engine
    finally:
        c.stop()
    wait_no_engines(SSH_ENGINE_DIR)
    assert not any(os.path.exists(f) for f in remote_files)
    assert not [p for p in forwarders if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.timeout(60)
def test_ssh_refuses_unknown_host_key(ssh_hosts, tmp_path):
    keys, local, _remote, _ns = ssh_hosts
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    options = ssh_options(keys)
    options["known_hosts"] = str(empty)
    c = Cluster(launcher="ssh", hosts={local.destination: 1}, profile="test-ssh-key", **options)
    with pytest.raises(LauncherError, match=r"(?i)host key verification failed"):
        c.start()
    wait_no_engines(SSH_ENGINE_DIR)


@pytest.mark.timeout(60)
def test_ssh_connection_info_never_on_a_command_line(ssh_hosts):
    keys, local, _remote, _ns = ssh_hosts
    launcher = SSHLauncher(hosts={local.destination: 1}, **ssh_options(keys))
    cmd = [
        *launcher.ssh_command(local.destination),
        launcher.remote_command(local.destination, "--stdin"),
    ]
    assert "StrictHostKeyChecking=yes" in cmd and "BatchMode=yes" in cmd
    assert not any("key" in part and "hmac" in part for part in cmd)
    c = Cluster(launcher=launcher, n=1, profile="test-ssh-argv")
    mec = c.start()
    try:
        key = c.launcher.engines[0]["key"]
        for p in psutil.process_iter(["cmdline"]):
            assert key not in " ".join(p.info["cmdline"] or [])
        assert mec.execute("print(2 + 2)")[0]["stdout"] == "4\n"
    finally:
        c.stop()
    wait_no_engines(SSH_ENGINE_DIR)


@pytest.mark.timeout(180)
def test_h06_ssh_engine_killed_in_the_netns_host_is_noticed_by_heartbeats(ssh_hosts):
    keys, _local, remote, _ns = ssh_hosts
    c = Cluster(
        launcher="ssh", hosts={remote.destination: 2}, profile="test-h06-ssh", **ssh_options(keys)
    )
    mec = c.start()
    try:
        assert c.launcher.liveness(0) is None  # the forwarder outlives the kernel: heartbeats
        pid = c.launcher.remote[0]["pid"]
        pr = mec.execute("import time; time.sleep(60)", targets=0, block=False)
        t0 = time.monotonic()
        os.kill(pid, 9)  # the kernel only; its ssh port forward stays up
        took = wait_engine_error(pr, t0, HEARTBEAT_BOUND)
        assert took < HEARTBEAT_BOUND + 1.5, f"noticed after {took:.1f} s"
        assert mec.execute("print('ok')", targets=1)[0]["stdout"] == "ok\n"
    finally:
        c.stop()
    wait_no_engines(SSH_ENGINE_DIR)


@pytest.mark.timeout(180)
def test_h15_ssh_honours_transport_encryption(ssh_hosts):
    keys, _local, remote, _ns = ssh_hosts
    c = Cluster(
        launcher="ssh",
        hosts={remote.destination: 1},
        profile="test-h15-ssh",
        transport_encryption="required",
        **ssh_options(keys),
    )
    mec = c.start()
    try:
        assert_encrypted(c, mec)  # through the forward: plaintext refused by the kernel itself
        assert all("curve_secretkey" not in (r or {}) for r in c.launcher.remote)
    finally:
        c.stop()
    wait_no_engines(SSH_ENGINE_DIR)


# ---------------------------------------------------------------------- ssh without sshd
FAKE_SSH = str(Path(__file__).with_name("fake_ssh.py"))  # runs the remote command locally


def forwarders() -> list[psutil.Process]:
    """Port forwarders (``fake_ssh -N``) of this suite's fake_ssh, nobody else's."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "-N" in cmd and FAKE_SSH in cmd[:2]:
            out.append(p)
    return out


@pytest.mark.timeout(120)
def test_o04_failing_ssh_host_leaves_no_engines_of_the_other_hosts():
    # 'bad' refuses the connection at once while 'good' is still starting its two engines:
    # the start must fail, and nothing it started (kernels, port forwarders) may outlive it
    c = Cluster(
        launcher="ssh",
        hosts={"good": 2, "bad": 1},
        ssh=FAKE_SSH,
        python=sys.executable,
        env=ENGINE_ENV,
        profile="test-o04",
    )
    with pytest.raises(LauncherError, match=r"engine 2 on bad failed to start.*Connection refused"):
        c.start()
    assert not engine_processes(SSH_ENGINE_DIR) and not forwarders()
    # and none comes up late (the bug: they finished starting after start() had given up)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert not engine_processes(SSH_ENGINE_DIR), "an engine came up after the failed start"
        time.sleep(0.2)
    assert not os.path.exists(SSH_ENGINE_DIR) or not os.listdir(SSH_ENGINE_DIR)


@pytest.mark.timeout(120)
def test_o04_failed_remote_stop_is_reported_with_what_is_left():
    launcher = SSHLauncher(hosts={"good": 2}, ssh=FAKE_SSH, python=sys.executable, env=ENGINE_ENV)
    c = Cluster(launcher=launcher, profile="test-o04-stop")
    mec = c.start()
    try:
        assert mec.execute("print(1)")[0]["stdout"] == "1\n"
        with pytest.raises(LauncherError, match="'ssh' launcher cannot be restarted one by one"):
            mec.restart(0)  # a clear refusal, before anything is touched
        assert mec.execute("print(2)", targets=0)[0]["stdout"] == "2\n"
        pids = [e["pid"] for e in launcher.engines]
        launcher.ssh = "/bin/false"  # the host cannot be reached any more
        with pytest.raises(LauncherError, match=r"could not stop engine\(s\) 0, 1: good"):
            from ipy_multiengine import (
                _loop,
            )  # white-box: the launcher API is async, run on the I/O loop

            _loop.run(launcher.stop(timeout=1.0), timeout=60)
        assert all(psutil.pid_exists(p) for p in pids)  # really still there, and still recorded
    finally:
        launcher.ssh = FAKE_SSH
        c.stop()  # the second stop reaches the host and takes them down
    wait_no_engines(SSH_ENGINE_DIR)


@pytest.fixture
def home_python(tmp_path, monkeypatch):
    """A fake home with ``venv/bin/python`` (a wrapper for this interpreter); HOME points there
    (fake_ssh's remote shell inherits it, as a remote login shell has its own HOME)."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("HOME", str(tmp_path))
    return wrapper


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "python", ["~/venv/bin/python", "$HOME/venv/bin/python", "${HOME}/venv/bin/python"]
)
def test_o07_ssh_python_in_home(home_python, python):
    c = Cluster(
        launcher="ssh",
        hosts={"good": 1},
        ssh=FAKE_SSH,
        python=python,
        env=ENGINE_ENV,
        profile="test-o07",
    )
    mec = c.start()
    try:
        assert (
            mec.execute("import sys; print(sys.executable)")[0]["stdout"] == sys.executable + "\n"
        )
    finally:
        c.stop()
    wait_no_engines(SSH_ENGINE_DIR)


def test_o07_home_python_in_slurm_script_and_bad_forms_refused(home_python):
    from ipy_multiengine.launchers.slurm import SlurmLauncher

    launcher = SlurmLauncher(1, python="~/venv/bin/python")
    launcher.work_dir = "/tmp/x"
    line = launcher.srun_command()
    word = line.split()[1]
    out = subprocess.run(
        ["sh", "-c", f"echo {word}"], capture_output=True, text=True
    ).stdout.strip()
    assert out == str(home_python)
    for bad in ("$VENV/bin/python", "~other user/python", "/opt/`id`/python"):
        for cls in (SSHLauncher, SlurmLauncher):
            with pytest.raises(ValueError, match="python="):
                cls(1, python=bad, **({"hosts": {"h": 1}} if cls is SSHLauncher else {}))


# ---------------------------------------------------------------------- attach
@pytest.fixture
def two_kernels(tmp_path):
    from jupyter_client.manager import KernelManager

    kms = []
    for i in range(2):
        km = KernelManager(
            kernel_name="python3", connection_file=str(tmp_path / f"kernel-{i}.json")
        )
        km.start_kernel(extra_arguments=["--HistoryManager.hist_file=:memory:"], env=user_environ())
        kms.append(km)
    yield kms
    for km in kms:
        km.shutdown_kernel(now=True)


@pytest.mark.timeout(90)
def test_attach_hand_started_kernels_and_close_leaves_them_running(two_kernels):
    files = [km.connection_file for km in two_kernels]
    mec = MultiEngineClient.attach(files)
    assert mec.get_ids() == [0, 1]
    mec.execute("import os; pid = os.getpid()")
    assert mec.pull("pid") == [km.provisioner.pid for km in two_kernels]
    mec.scatter("a", [1, 2, 3, 4])
    assert mec.pull("a") == [[1, 2], [3, 4]]
    mec.close()
    assert all(km.is_alive() for km in two_kernels)
    # the kernels keep their state and serve the next client
    again = MultiEngineClient.attach(files[::-1])
    assert again.pull("a") == [[3, 4], [1, 2]]
    again.close()
    assert all(km.is_alive() for km in two_kernels)


@pytest.mark.timeout(90)
def test_cli_attach_then_stop_forgets_but_does_not_kill(two_kernels):
    files = [km.connection_file for km in two_kernels]
    run = ipmulti
    r = run("attach", *files, "--profile", "test-attach")
    assert r.returncode == 0, r.stderr
    mec = MultiEngineClient(profile="test-attach")
    assert mec.execute("print('hi')")[0]["stdout"] == "hi\n"
    mec.close()
    assert "test-attach" in run("list").stdout
    r = run("stop", "--profile", "test-attach")
    assert r.returncode == 0, r.stderr
    assert all(km.is_alive() for km in two_kernels)
    assert all(os.path.exists(f) for f in files)


def test_attach_rejects_what_is_not_a_connection_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="lacks"):
        MultiEngineClient.attach([str(bad)])
    with pytest.raises(FileNotFoundError):
        MultiEngineClient.attach([str(tmp_path / "missing.json")])


@pytest.mark.timeout(180)
def test_slurm_engines_as_an_mpi_job(slurm):
    """srun --mpi=pmi2 (Slurm's PMI2 server, spoken by the mpich wheel): MPI between engines."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    c = Cluster(
        3,
        launcher="slurm",
        mpi="pmi2",
        profile="test-slurm-mpi",
        ip="127.0.0.1",
        env={**slurm.env, **ENGINE_ENV},
        startup_timeout=90,
    )
    mec = c.start()
    work_dir = c.launcher.work_dir
    try:
        mec.execute(
            "from mpi4py import MPI; comm = MPI.COMM_WORLD; r = comm.rank; s = comm.allreduce(r)"
        )
        assert mec.pull("r") == [0, 1, 2]
        assert mec.pull("s") == [3, 3, 3]
    finally:
        c.stop()
    wait_no_engines(work_dir)


# ---------------------------------------------------------------------- local, provisioners
@pytest.mark.timeout(90)
def test_local_launcher_through_the_launcher_interface():
    c = Cluster(
        2,
        launcher="local",
        kernel_args=["--HistoryManager.hist_file=:memory:"],
        profile="test-local-launcher",
    )
    mec = c.start()
    try:
        assert mec.get_ids() == [0, 1]
        mec.execute("import os; pid = os.getpid()")
        pids = mec.pull("pid")
        assert pids == [e["pid"] for e in c.launcher.engines]
        interrupt_sleep(mec)
    finally:
        c.stop()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) for p in pids)


@pytest.mark.timeout(90)
def test_kernelspec_naming_a_provisioner_works_as_engines(tmp_path, monkeypatch):
    """A kernelspec whose metadata names a jupyter_client kernel provisioner (here the
    built-in local one, as the gateway provisioners for Docker/Kubernetes/YARN would be)."""
    spec_dir = tmp_path / "kernels" / "ipm-provisioned"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "provisioned",
                "language": "python",
                "env": {"IPM_PROVISIONED": "yes"},
                "metadata": {
                    "kernel_provisioner": {"provisioner_name": "local-provisioner", "config": {}}
                },
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    with Cluster(2, kernel_name="ipm-provisioned", profile="test-provisioner") as mec:
        mec.execute("import os; flag = os.environ.get('IPM_PROVISIONED')")
        assert mec.pull("flag") == ["yes", "yes"]


@pytest.mark.timeout(90)
def test_mpi_engines_of_a_killed_owner_are_stopped_by_ipmulti_stop():
    run = ipmulti
    r = run("start", "--daemon", "--launcher", "mpi", "-n", "2", "--profile", "test-mpi-orphan")
    assert r.returncode == 0, r.stderr
    spec = json.loads(Path(r.stdout.strip()).read_text())
    work_dir = spec["launcher"]["work_dir"]
    from ipy_multiengine.launchers import launcher_from_dict

    try:
        assert len(engine_processes(work_dir)) == 3  # mpiexec + 2 ranks
        mpiexec = psutil.Process(spec["launcher"]["pid"])
        tree = [mpiexec, *mpiexec.children(recursive=True)]  # + hydra proxies
        os.kill(spec["owner_pid"], 9)  # the owner dies without stopping anything
        time.sleep(0.5)
        assert len(engine_processes(work_dir)) == 3
        launcher_from_dict(spec["launcher"]).kill_now()  # what `ipmulti stop` does then
        wait_no_engines(work_dir, timeout=5)
        _gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive
    finally:
        launcher_from_dict(spec["launcher"]).kill_now()
        assert run("stop", "--profile", "test-mpi-orphan").returncode == 0


@pytest.mark.timeout(90)
def test_slurm_job_stuck_in_the_queue_times_out_with_its_state(slurm):
    c = Cluster(
        2,
        launcher="slurm",
        profile="test-slurm-pending",
        ip="127.0.0.1",
        env={**slurm.env, **ENGINE_ENV},
        sbatch_lines=["#SBATCH --begin=now+1hour"],
        startup_timeout=3,
    )
    with pytest.raises(
        EngineStartTimeout, match=r"engine\(s\) 0, 1 never reported.*PENDING \(BeginTime\)"
    ):
        c.start()
    deadline = time.monotonic() + 20
    while "PENDING" in squeue(slurm) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "PENDING" not in squeue(slurm)  # cancelled


@pytest.mark.timeout(120)
def test_cli_start_daemon_with_ssh_launcher(ssh_hosts):
    keys, local, remote, ns = ssh_hosts
    run = lambda *a: ipmulti(*a, timeout=90)  # noqa: E731
    r = run(
        "start",
        "--daemon",
        "--launcher",
        "ssh",
        "--profile",
        "test-cli-ssh",
        "--hosts",
        f"{local.destination}=1,{remote.destination}=1",
        "-o",
        f"python={sys.executable}",
        "-o",
        f"env={json.dumps(ENGINE_ENV)}",
        "-o",
        f"known_hosts={keys.known_hosts}",
        "-o",
        f"identity_file={keys.user_key}",
        "-o",
        'ssh_args=["-F", "/dev/null"]',
    )
    assert r.returncode == 0, r.stderr
    try:
        mec = MultiEngineClient(profile="test-cli-ssh")
        assert mec.get_ids() == [0, 1]
        mec.execute(
            "import subprocess; links = subprocess.run(['ip', '-br', 'link'], capture_output=True, "
            "text=True).stdout"
        )
        assert [ns.veth_ns in x for x in mec.pull("links")] == [False, True]
        mec.close()
    finally:
        r = run("stop", "--profile", "test-cli-ssh")
    assert r.returncode == 0, r.stderr
    wait_no_engines(SSH_ENGINE_DIR)


def test_engines_do_not_inherit_the_test_that_started_them(monkeypatch):
    """pytest's PYTEST_CURRENT_TEST (the test of the process that starts engines) reached
    them, and ipykernel then left their fd 1 and 2 uncaptured. An engine variable set on
    purpose is kept."""
    from ipy_multiengine.launchers.base import engine_environment

    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/x.py::test (call)")
    monkeypatch.setenv("PYTEST_VERSION", "9")
    assert "PYTEST_CURRENT_TEST" not in engine_environment()
    assert "PYTEST_CURRENT_TEST" not in engine_environment(base=dict(os.environ))
    assert engine_environment()["PYTEST_VERSION"] == "9"  # tells nothing to ipykernel
    assert engine_environment({"PYTEST_CURRENT_TEST": "mine"})["PYTEST_CURRENT_TEST"] == "mine"
