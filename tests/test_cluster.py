"""Cluster lifecycle, cluster files, the ipmulti CLI and connecting from other processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from faultlib import user_environ, wait_for

from ipy_multiengine import Cluster, MultiEngineClient, NoClusterError
from ipy_multiengine.cluster import cluster_dir, cluster_file_path
from ipy_multiengine.errors import EngineError
from ipy_multiengine.launchers.local import LocalLauncher

pytestmark = pytest.mark.timeout(120)

IPMULTI = [sys.executable, "-m", "ipy_multiengine.cli"]


def test_cluster_file_contents_and_permissions(cluster):
    path = Path(cluster.cluster_file)
    assert path == cluster_file_path("tests")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cluster_dir().stat().st_mode) == 0o700
    spec = json.loads(path.read_text())
    assert spec["owner_pid"] == os.getpid()
    assert [e["id"] for e in spec["engines"]] == [0, 1, 2, 3]
    keys = {e["connection"]["key"] for e in spec["engines"]}
    assert len(keys) == 1 and len(keys.pop()) >= 32  # one fresh key per cluster
    for e in spec["engines"]:
        assert e["kernel_name"] == "python3" and psutil.pid_exists(e["pid"])
        # unix sockets in the private runtime dir since issue 11.16 (loopback TCP before)
        assert e["connection"]["transport"] == "ipc" and e["connection"]["ip"].startswith(
            str(cluster_dir())
        )
        assert stat.S_IMODE(Path(e["connection_file"]).stat().st_mode) == 0o600


def test_second_client_from_cluster_file(cluster, mec):
    mec.push(dict(shared=41))
    with MultiEngineClient(profile="tests") as other:
        assert other.get_ids() == [0, 1, 2, 3]
        assert other.pull("shared") == [41] * 4
        other.execute("shared += 1")
    assert mec.pull("shared") == [42] * 4  # closing the other client left engines running
    with MultiEngineClient(cluster.cluster_file) as third:
        assert third.apply(lambda: 1, targets=3) == [1]


def test_no_cluster_says_how_to_start():
    with pytest.raises(NoClusterError) as info:
        MultiEngineClient(profile="nothing-here")
    assert "ipmulti start" in str(info.value) and "nothing-here" in str(info.value)


def test_embedded_cluster_start_stop_cleans_up():
    c = Cluster(n=2, profile="embedded")
    with c as mec:
        pids = [e["pid"] for e in mec.engines]
        files = [km.connection_file for km in c.managers.values()]
        assert all(Path(f).exists() for f in files)
        assert mec.execute("x = 1", targets=1)[0]["id"] == 1
    assert not Path(c.cluster_file).exists()
    assert not any(Path(f).exists() for f in files)
    wait_for(
        lambda: (
            not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
        ),
        10,
        "engines to exit",
    )


def test_bad_cluster_arguments():
    with pytest.raises(ValueError, match="positive"):
        Cluster(n=0)
    with pytest.raises(ValueError, match="no kernelspec named 'no-such-kernel'"):
        Cluster(n=1, kernel_name="no-such-kernel", profile="nokernel").start()
    assert not cluster_file_path("nokernel").exists()


def test_daemon_cluster_used_from_another_process_then_stopped():
    env = dict(os.environ)
    out = subprocess.run(
        [*IPMULTI, "start", "-n", "2", "--profile", "daemon", "--daemon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path == cluster_file_path("daemon") and path.exists()
    spec = json.loads(path.read_text())
    pids = [spec["owner_pid"]] + [e["pid"] for e in spec["engines"]]
    code = (
        "from ipy_multiengine import client; mec = client.MultiEngineClient(profile='daemon'); "
        "print(mec.get_ids(), mec.apply(lambda: 6 * 7)); mec.close()"
    )
    used = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert used.returncode == 0, used.stderr
    assert used.stdout.strip() == "[0, 1] [42, 42]"
    listed = subprocess.run([*IPMULTI, "list"], env=env, capture_output=True, text=True, timeout=30)
    assert "daemon" in listed.stdout and "running" in listed.stdout
    stopped = subprocess.run(
        [*IPMULTI, "stop", "--profile", "daemon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stopped.returncode == 0, stopped.stderr
    assert not path.exists()
    wait_for(
        lambda: (
            not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
        ),
        15,
        "daemon and engines to exit",
    )


def test_owner_sigkill_leaves_no_engine_behind(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from ipy_multiengine import Cluster\n"
        "mec = Cluster(n=2, profile='victim').start()\n"
        "print(' '.join(str(e['pid']) for e in mec.engines), flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)

        def gone() -> bool:
            for p in pids:
                try:
                    if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                        return False
                except psutil.NoSuchProcess:
                    pass
            return True

        wait_for(gone, 15, "orphaned engines to exit")
    finally:
        if owner.poll() is None:
            owner.kill()
    listed = subprocess.run([*IPMULTI, "list"], capture_output=True, text=True, timeout=30)
    assert "victim" in listed.stdout and "stale" in listed.stdout
    assert not cluster_file_path("victim").exists()  # cleaned by list


def test_malformed_cluster_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"malformed cluster file {bad}"):
        MultiEngineClient(bad)
    bad.write_text(json.dumps({"engines": [{"id": 0, "connection": {"ip": "127.0.0.1"}}]}))
    with pytest.raises(ValueError, match="engine 0 connection lacks shell_port"):
        MultiEngineClient(bad)
    with pytest.raises(NoClusterError, match="does not exist"):
        MultiEngineClient(tmp_path / "missing.json")


def test_demo_command_runs():
    out = subprocess.run([*IPMULTI, "demo", "-n", "2"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert (
        "<Results List>" in out.stdout
        and "CompositeError" in out.stdout
        and "stopped" in out.stdout
    )


# ---------------------------------------------------------------------- h13: embedded clusters are
# private
def ipmulti(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(IPMULTI + list(args), capture_output=True, text=True, timeout=timeout)


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_h13_embedded_clusters_coexist_are_private_and_stop_from_outside_spares_the_owner():
    from ipy_multiengine.clusterfile import embedded_file_path

    one, two = Cluster(n=1), Cluster(n=1)
    with one as m1, two as m2:
        assert one.cluster_id != two.cluster_id
        assert (
            Path(one.cluster_file) == embedded_file_path(one.cluster_id)
            and Path(two.cluster_file).exists()
        )
        assert m1.apply(os.getpid) != m2.apply(os.getpid)
        # neither is what a bare client (or %px) finds: only shared clusters are
        if not cluster_file_path("default").exists():
            with pytest.raises(NoClusterError, match="embedded"):
                MultiEngineClient()
        listed = ipmulti("list")
        assert listed.returncode == 0, listed.stderr
        for c in (one, two):
            row = next(line for line in listed.stdout.splitlines() if c.cluster_file in line)
            assert f"pid {os.getpid()}" in row and "running" in row
        # stopping an embedded cluster from outside stops its engines, never the owner
        pid1 = m1.engines[0]["pid"]
        out = ipmulti("stop", "--file", one.cluster_file)
        assert out.returncode == 0, out.stderr
        assert "keeps running" in out.stdout
        wait_for(lambda: process_gone(pid1), 15, "the embedded cluster's engine to exit")
        assert not Path(one.cluster_file).exists()
        assert m2.apply(lambda: 7) == [7]  # the other cluster (and this process) carry on
    assert not Path(two.cluster_file).exists()


def test_h13_shared_profile_found_by_bare_client_embedded_not(cluster):
    # the session cluster is shared under profile 'tests'; an embedded one beside it is not found
    with Cluster(n=1) as mine:
        with MultiEngineClient(profile="tests") as other:
            assert other.get_ids() == [0, 1, 2, 3]
        assert mine.get_ids() == [0]


@pytest.mark.timeout(180)
def test_h13_kernel_shutdown_leaves_no_cluster_file():
    """A notebook kernel that owns an embedded cluster and shuts down (the notebook closed,
    the kernel restarted) removes its cluster file and stops its engines."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    # the kernel's exit stops its engines: jupyter_client kills a kernel not gone after 5 s,
    # before it removed its file, on a loaded box
    km.shutdown_wait_time = 60.0
    km.start_kernel(env=user_environ())
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        out: list[str] = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])

        reply = kc.execute_interactive(
            "from ipy_multiengine import Cluster\n"
            "c = Cluster(n=1)\nmec = c.start()\n"
            "print(c.cluster_file, mec.engines[0]['pid'], c.owner_kind)\n",
            timeout=90,
            output_hook=hook,
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        path, pid, kind = "".join(out).split()
        assert Path(path).exists() and kind == "kernel"
        km.shutdown_kernel(now=False)
        assert not Path(path).exists(), "the kernel's cluster file outlived the kernel"
        wait_for(lambda: process_gone(int(pid)), 15, "the kernel's engine to exit")
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


# ---------------------------------------------------------------------- o03: one profile, one
# cluster
def test_o03_concurrent_starts_of_one_profile_one_wins_and_only_own_file_is_removed():
    import threading

    clusters = [Cluster(n=1, profile="o03"), Cluster(n=1, profile="o03")]
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def start(i: int) -> None:
        barrier.wait()
        try:
            results[i] = clusters[i].start()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    try:
        won = [i for i in range(2) if not isinstance(results[i], Exception)]
        assert len(won) == 1, results
        winner, loser = clusters[won[0]], clusters[1 - won[0]]
        assert "already running" in str(results[1 - won[0]])
        path = cluster_file_path("o03")
        assert json.loads(path.read_text())["cluster_id"] == "o03"
        loser.stop()
        assert path.exists(), "the cluster that lost the race removed the winner's file"
        with MultiEngineClient(profile="o03") as other:
            assert other.apply(lambda: 1) == [1]
        # a file that is no longer this cluster's (another owner wrote it) is left alone
        spec = json.loads(path.read_text())
        spec["owner"] = {**spec["owner"], "create_time": 1.0}
        from ipy_multiengine.clusterfile import write_cluster

        write_cluster(path, spec)
        winner.stop()
        assert path.exists()
        path.unlink()
        # the profile is free again once its owner stopped
        with Cluster(n=1, profile="o03") as again:
            assert again.get_ids() == [0]
    finally:
        for c in clusters:
            c.stop()


# ---------------------------------------------------------------------- o01: requests reach their
# cluster
def _serving(c: Cluster):
    """Serve ``c``'s owner requests from a thread, as the ``ipmulti start`` loop does."""
    import threading

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.05):
            c.serve_requests()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return stop, t


@pytest.mark.timeout(180)
def test_o01_restart_request_reaches_exactly_the_cluster_it_names():
    a, b = Cluster(n=1, profile="o01-a"), Cluster(n=1, profile="o01-a-b")
    odd = Cluster(n=1, profile="o01[x]*")
    for c in (a, b, odd):
        c.serves_requests = True
    with a as ma, b as mb, odd as mo:
        pa, pb, po = ma.apply(os.getpid)[0], mb.apply(os.getpid)[0], mo.apply(os.getpid)[0]
        stop_a, ta = _serving(a)
        try:
            # nobody serves o01-a-b yet
            with (
                MultiEngineClient(profile="o01-a-b") as other,
                pytest.raises(Exception, match="restart"),
            ):
                other.restart(timeout=2)
            assert ma.apply(os.getpid) == [pa], (
                "the owner of 'o01-a' took a request meant for 'o01-a-b'"
            )
            stop_b, tb = _serving(b)
            stop_o, to = _serving(odd)
            try:
                with MultiEngineClient(profile="o01-a-b") as other:
                    other.restart(timeout=60)
                    assert other.apply(os.getpid) != [pb]
                with MultiEngineClient(profile="o01[x]*") as other:  # glob characters in a profile
                    other.restart(timeout=60)
                    assert other.apply(os.getpid) != [po]
                assert ma.apply(os.getpid) == [pa]
            finally:
                stop_b.set(), stop_o.set()
                tb.join(10), to.join(10)
        finally:
            stop_a.set()
            ta.join(10)


# ---------------------------------------------------------------------- o02: stale cleanup stops
# what ran
@pytest.mark.timeout(240)
def test_o02_stale_mpi_cluster_cleanup_stops_mpiexec_and_ranks(tmp_path):
    from ipy_multiengine.launchers.base import find_executable

    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed")
    if find_executable("mpiexec") is None:
        pytest.skip("no mpiexec")
    script = tmp_path / "owner.py"
    script.write_text(
        "import time\nfrom ipy_multiengine import Cluster\n"
        "mec = Cluster(n=1, launcher='mpi', profile='o02', startup_timeout=90).start()\n"
        "print('ready', flush=True)\ntime.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert owner.stdout.readline().strip() == "ready"
        path = cluster_file_path("o02")
        spec = json.loads(path.read_text())
        pids = [spec["engines"][0]["pid"], spec["launcher"]["pid"]]
        assert all(not process_gone(p) for p in pids)
        owner.kill()
        owner.wait(10)
        listed = ipmulti("list", timeout=90)
        assert listed.returncode == 0, listed.stderr
        assert "stale (removed)" in listed.stdout, listed.stdout
        wait_for(
            lambda: all(process_gone(p) for p in pids), 15, "mpiexec and its rank to be stopped"
        )
        assert not path.exists()
    finally:
        if owner.poll() is None:
            owner.kill()
        for p in pids:
            if not process_gone(p):
                psutil.Process(p).kill()


def profile_free(profile: str) -> bool:
    from ipy_multiengine.clusterfile import ProfileLock

    lock = ProfileLock(profile)
    try:
        lock.acquire()
    except RuntimeError:
        return False
    lock.release()
    return True


def test_h13_shared_cluster_of_a_user_process_stopped_from_outside_frees_its_profile():
    """``ipmulti stop`` on a profile owned by a notebook/script stops the engines, not the
    process; the owner does not auto-restart them and the profile can be started again."""
    c = Cluster(n=1, profile="h13-out", auto_restart=True)
    with c as mec:
        pid = mec.engines[0]["pid"]
        out = ipmulti("stop", "--profile", "h13-out")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: process_gone(pid), 15, "the engine to exit")
        wait_for(lambda: 0 in mec.get_ids().dead, 15, "the owner to notice")
        wait_for(lambda: profile_free("h13-out"), 15, "the owner to free the profile")
        assert not cluster_file_path("h13-out").exists()
        with Cluster(n=1, profile="h13-out") as again:
            assert again.apply(lambda: 3) == [3]
        assert c.restarts == {}  # not brought back by auto_restart


@pytest.mark.timeout(180)
def test_o03_two_concurrent_ipmulti_start_daemons_of_one_profile():
    procs = [
        subprocess.Popen(
            [*IPMULTI, "start", "-n", "1", "--profile", "o03d", "--daemon"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    path = cluster_file_path("o03d")
    try:
        assert codes == [0, 1], outs
        loser_err = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 1)
        assert "already running" in loser_err
        spec = json.loads(path.read_text())
        with MultiEngineClient(profile="o03d") as mec:
            assert mec.apply(lambda: 5) == [5]
    finally:
        stopped = ipmulti("stop", "--profile", "o03d")
    assert stopped.returncode == 0, stopped.stderr
    assert not path.exists()
    wait_for(
        lambda: all(
            process_gone(p) for p in [spec["owner_pid"]] + [e["pid"] for e in spec["engines"]]
        ),
        20,
        "the daemon and its engine to exit",
    )


@pytest.mark.timeout(120)
def test_file_owner_stop_asks_an_ipmulti_start_owner_to_stop():
    """The owner interface's ``stop`` for a cluster reached through its file: a 'stop' request
    the ``ipmulti start`` loop answers by stopping (no signal involved)."""
    proc = subprocess.Popen(
        [*IPMULTI, "start", "-n", "1", "--profile", "fo-stop", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "engines ready" in proc.stdout.readline()
        with MultiEngineClient(profile="fo-stop") as mec:
            pid = mec.engines[0]["pid"]
            mec.owner.stop()
        assert proc.wait(30) == 0
        assert "cluster stopped" in proc.stdout.read()
        assert not cluster_file_path("fo-stop").exists()
        wait_for(lambda: process_gone(pid), 15, "the engine to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("profile", ["sockets", "s" * 80])
def test_stale_cleanup_after_owner_sigkill_removes_the_unix_sockets(profile, tmp_path):
    """A SIGKILLed owner's engines exit, but their unix sockets stay; `ipmulti list` removed the
    stale cluster file, connection files and logs and left every socket (5 per engine) behind."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys\nfrom ipy_multiengine import Cluster\n"
        f"Cluster(n=2, profile={profile!r}).start()\nprint('up', flush=True)\nsys.stdin.read()\n"
    )
    owner = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout.readline().strip() == "up"
        spec = json.loads(cluster_file_path(profile).read_text())
        socks = [
            Path(f"{e['connection']['ip']}-{e['connection'][k]}")
            for e in spec["engines"]
            for k in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
        ]
        assert all(stat.S_ISSOCK(s.stat().st_mode) for s in socks)
        pids = [e["pid"] for e in spec["engines"]]
        owner.kill()
        owner.wait(10)
        wait_for(
            lambda: (
                not any(
                    psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids
                )
            ),
            15,
            "orphaned engines to exit",
        )
    finally:
        if owner.poll() is None:
            owner.kill()
    listed = subprocess.run([*IPMULTI, "list"], capture_output=True, text=True, timeout=30)
    assert "stale (removed)" in listed.stdout, listed.stdout
    assert not cluster_file_path(profile).exists()
    assert [s for s in socks if os.path.lexists(s)] == []
    sock_dirs = {s.parent for s in socks} - {cluster_dir()}
    assert all(not d.exists() for d in sock_dirs), sock_dirs


def test_ctrl_c_while_stop_closes_the_client_still_stops_the_engines_and_removes_the_file():
    """stop() marked the cluster stopped, then a Ctrl-C while its client closed (it waits on the
    I/O loop) skipped the rest: the engines and the cluster file stayed, and a second stop()
    was a no-op, so nothing could stop them before the process exited."""
    c = Cluster(n=1, shutdown_wait=1.0)
    mec = c.start()
    pid, path = mec.engines[0]["pid"], Path(c.cluster_file)
    # white-box: the client's finalizer is swapped to inject the Ctrl-C inside stop()
    close_controller = mec._finalizer

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    mec._finalizer = ctrl_c
    try:
        with pytest.raises(KeyboardInterrupt):
            c.stop()
        file_left = path.exists()
        engine_left = (
            psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        )
    finally:
        close_controller()
        c.launcher.kill_now()  # whatever stop() left behind
        c._file_finalizer()  # white-box cleanup: stop() was interrupted before it removed the file
    assert not file_left and not engine_left, (file_left, engine_left)


#: for a daemon's interpreter: a pause between its cluster file and its "engines ready" line
_SLOW_READY_LINE = """
import sys
if "ipy_multiengine.cli" in sys.orig_argv:  # `ipmulti start` (the daemon writes the file)
    import time
    import ipy_multiengine.cluster as _c

    _write = _c.Cluster._write_cluster_file

    def _write_then_pause(self, path):
        _write(self, path)
        time.sleep(1.5)

    _c.Cluster._write_cluster_file = _write_then_pause
"""


@pytest.mark.timeout(120)
def test_a_daemon_start_returns_once_its_log_says_its_engines_are_ready(tmp_path):
    """`ipmulti start --daemon` returned once the cluster file named its daemon, which writes
    "N engines ready" to its log only after that file: read when the start returned, the log
    could say nothing yet (a daemon descheduled between the two, on a loaded box; here held
    there 1.5 s). The start returns once the log says it too."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_READY_LINE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    start = [*IPMULTI, "start", "-n", "1", "--profile", "dready", "--daemon"]
    first = subprocess.run(start, env=env, capture_output=True, text=True, timeout=90)
    try:
        assert first.returncode == 0, first.stderr
        assert "engines ready" in (cluster_dir() / "daemon-dready.log").read_text()
    finally:
        stopped = ipmulti("stop", "--profile", "dready")
    assert stopped.returncode == 0, stopped.stderr


@pytest.mark.timeout(120)
def test_second_daemon_of_a_running_profile_leaves_the_owners_log_alone():
    """Every `ipmulti start --daemon` truncated `daemon-PROFILE.log` and sent its daemon's output
    there: a second one of a running profile emptied the owner's log (and, started together,
    the two daemons overwrote each other's lines: the loser's 'already running' came out
    garbled)."""
    first = ipmulti("start", "-n", "1", "--profile", "dlog", "--daemon")
    assert first.returncode == 0, first.stderr
    log = cluster_dir() / "daemon-dlog.log"
    try:
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        before = log.read_text()
        assert "engines ready" in before
        second = ipmulti("start", "-n", "1", "--profile", "dlog", "--daemon")
        assert second.returncode == 1 and "already running" in second.stderr, second.stderr
        assert log.read_text() == before
        assert not list(cluster_dir().glob(".daemon-dlog*"))
    finally:
        stopped = ipmulti("stop", "--profile", "dlog")
    assert stopped.returncode == 0, stopped.stderr
    assert not log.exists()


@pytest.mark.timeout(120)
def test_a_restart_request_that_times_out_leaves_the_engines_usable():
    """mec.restart() of a cluster owned by `ipmulti start` marks the engines unavailable, asks
    the owner and waits; when that failed (here: a timeout too short for the owner to take the
    request), the engines stayed 'not ready yet' in this client for good, alive and well."""
    first = ipmulti("start", "-n", "1", "--profile", "restart-to", "--daemon")
    assert first.returncode == 0, first.stderr
    try:
        mec = MultiEngineClient(profile="restart-to")
        try:
            assert mec.apply(lambda: 1) == [1]
            with pytest.raises(Exception, match="within"):
                mec.restart(0, timeout=0.001)
            mec.wait_ready(timeout=30)  # TimeoutError: still 'not ready yet (restarting)'
            assert mec.apply(lambda: 2, timeout=30) == [2]
            assert mec.controller.unavailable(0) is None
        finally:
            mec.close()
    finally:
        stopped = ipmulti("stop", "--profile", "restart-to")
    assert stopped.returncode == 0, stopped.stderr


def test_a_call_on_all_engines_during_add_engines_sees_the_new_engine_wholly_or_not_at_all():
    """``Cluster.add_engines`` in one thread, calls on all engines in another: the new engine
    was published while still connecting, so a call in that window failed with "engine 1 is
    not ready yet (connecting): restart it". Now each call runs on 1 engine or on 2."""
    import threading

    with Cluster(n=1, profile="fix3-add-race") as mec:
        added: list = []
        adder = threading.Thread(target=lambda: added.append(mec.owner.add_engines(1)))
        adder.start()
        seen = []
        while adder.is_alive():
            seen.append(len(mec.execute("x = 1", targets="all", block=True)))
        adder.join(60)
        wait_for(lambda: added, 1, "add_engines to return")
        assert added == [[1]]
        assert set(seen) <= {1, 2} and len(mec.execute("x = 1", targets="all")) == 2


def test_stopped_engines_exit_by_themselves_even_when_the_control_thread_flushes_late(tmp_path):
    """ipykernel's ``close`` stops the IOPub thread before it joins the control thread, which
    still flushes stdout/stderr after answering the shutdown request: a flush caught by the
    IOPub thread's end blocked for good, and the kernel manager SIGTERMed the engine 1.5 s
    later (one stop of 4 engines in five, here). The flush is made late on purpose; each
    engine records whether its control thread was still running when IOPub was stopped (the
    window of that hang), which the engine helper's wait must rule out, and exits with 0.
    (Given 30 s to exit, not the default 3 s: an engine blocked for good is still SIGTERMed,
    and one slow to exit on a loaded box, load 19 here once, is not taken for it.)"""
    # the engine's namespace is cleared at exit (IPython's atexit reset) before ipykernel's
    # close runs: what these functions use is bound as defaults, not looked up as globals
    late_flush = (
        "import sys, threading, time, os\n"
        "from ipykernel.kernelapp import IPKernelApp as _A\n"
        "_app = _A.instance()\n"
        "def _late(flush, app=_app, threading=threading, time=time):\n"
        "    def f():\n"
        "        control = threading.current_thread().name == 'Control'\n"
        "        if control and app.kernel._shutdown_message:\n"
        "            time.sleep(0.3)\n"
        "        return flush()\n"
        "    return f\n"
        "sys.stdout.flush = _late(sys.stdout.flush)\n"
        f"def _stop_noted(stop=_app.iopub_thread.stop, app=_app, open=open, "
        f"path=os.path.join({str(tmp_path)!r}, str(os.getpid()))):\n"
        "    with open(path, 'w') as fh:\n"
        "        fh.write(str(app.control_thread.is_alive()))\n"
        "    stop()\n"
        "_app.iopub_thread.stop = _stop_noted\n"
    )
    cluster = Cluster(n=2, profile="late-flush", shutdown_wait=30.0)
    mec = cluster.start()
    try:
        mec.execute(late_flush)
        processes = [km.provisioner.process for km in cluster.launcher.managers.values()]
        assert len(processes) == 2 and all(p is not None for p in processes)
    finally:
        cluster.stop()
    noted = {p.pid: (tmp_path / str(p.pid)).read_text() for p in processes}
    assert noted == {p.pid: "False" for p in processes}  # control had ended before IOPub stopped
    assert [p.returncode for p in processes] == [0, 0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("failure", ["key-less connection", "launcher raises"])
def test_a_failed_restart_leaves_the_engine_dead_saying_why_not_restarting(failure):
    """A restart whose launcher fails (it raises, or returns a connection without a key, which
    the client refuses) left the engine "restarting" for good: every later call to it failed
    with "not ready yet (restarting)" (wait_ready waited for nothing). Now the engine is dead,
    saying the restart failed and why; the others work; a restart that works brings it back."""
    with Cluster(n=2, profile=f"restart-fails-{failure.split()[0]}", write_file=False) as mec:
        launcher = mec.owner.launcher
        real = launcher.restart

        async def failing(ids):
            if failure == "launcher raises":
                raise RuntimeError("no kernel today")
            infos = await real(ids)
            return {e: {**info, "key": ""} for e, info in infos.items()}

        launcher.restart = failing
        with pytest.raises(Exception, match=r"no kernel today|key"):
            mec.restart(1, timeout=60)
        why = mec.controller.unavailable(1)
        assert why is not None and "failed to restart" in why, why
        assert "restarting" not in why
        with pytest.raises(Exception, match="failed to restart"):
            mec.apply(lambda: 1, targets=1, timeout=10)
        assert mec.apply(lambda: 0, targets=0) == [0]
        launcher.restart = real
        mec.restart(1, timeout=60)
        assert mec.apply(lambda: 1, targets=1) == [1]


class _BadRestartLauncher(LocalLauncher):
    """A launcher with a defect: while ``bad`` is set, its restart starts the kernel but returns
    connection info a client cannot use (``"keyless"``: without its key; ``"none"``: no info
    for the engine)."""

    bad: str | None = None

    async def restart(self, ids):
        infos = await super().restart(ids)
        if self.bad == "keyless":
            return {e: {k: v for k, v in i.items() if k != "key"} for e, i in infos.items()}
        if self.bad == "none":
            return {}
        return infos


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad", ["keyless", "none"])
def test_a_restart_returning_unusable_info_fails_at_once_and_the_file_agrees(bad):
    """A launcher whose restart returns info without a key (a ValueError, no EngineError, from
    the client's check) or none for the engine (a bare ``KeyError: 1``) left the kernel it had
    started running: the owner had the engine dead, while the cluster file named that live
    kernel, so a second client attached through the file used it. Now the restart fails with
    an EngineError naming the engine and what is wrong, the owner reports it dead, and the
    kernel is stopped: a client attached through the file sees it dead too; a restart by a
    launcher that works brings it back for both."""
    import time

    profile = f"restart-unusable-{bad}"
    launcher = _BadRestartLauncher(2, work_dir=cluster_dir(), tag=profile)
    with Cluster(n=2, launcher=launcher, profile=profile) as mec:
        launcher.bad = bad
        t0 = time.monotonic()
        with pytest.raises(EngineError) as info:
            mec.restart(1, timeout=60)
        assert time.monotonic() - t0 < 20
        text = str(info.value)
        assert info.value.engine_id == 1 and text.startswith("engine 1 "), text
        assert ("no key" if bad == "keyless" else "no connection info") in text, text
        assert "_BadRestartLauncher" in text, text
        assert "failed to restart" in (mec.controller.dead(1) or ""), mec.controller.unavailable(1)
        with pytest.raises(Exception, match="failed to restart"):
            mec.apply(lambda: 1, targets=1, timeout=10)
        assert mec.apply(lambda: 0, targets=0) == [0]
        spec = json.loads(Path(mec.owner.cluster_file).read_text())
        pid1 = next(e["pid"] for e in spec["engines"] if e["id"] == 1)
        assert pid1 == mec.owner.engine_meta()[1]["pid"]
        wait_for(lambda: not psutil.pid_exists(pid1), 10, f"the unusable kernel {pid1} to end")
        with MultiEngineClient(profile=profile) as other:  # attached through the file
            assert f"process {pid1} is gone" in (other.controller.dead(1) or "")
            assert other.apply(lambda: 0, targets=0) == [0]
        launcher.bad = None
        mec.restart(1, timeout=60)
        assert mec.apply(lambda: 1, targets=1) == [1]
        with MultiEngineClient(profile=profile) as other:
            assert other.apply(lambda: 2) == [2, 2]


@pytest.mark.timeout(120)
def test_a_client_attaches_to_a_cluster_with_a_dead_engine_and_follows_its_restart():
    """A second client of a running cluster one of whose engines is dead (killed, no
    auto_restart) could not attach at all: ``MultiEngineClient(profile=...)`` raised "engine 1
    exited", so nobody could use the other engines, or restart that one, from a new session.
    Now the dead engine is listed dead, saying why, the others work, and when the owner
    restarts it the client reconnects to it (as for an engine that dies while attached)."""
    from faultlib import engine_pid

    with Cluster(n=2, profile="attach-with-dead") as mec:
        pid = engine_pid(mec.owner, 1)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: mec.controller.dead(1), 30, "the owner to see engine 1 dead")
        with MultiEngineClient(profile="attach-with-dead") as other:
            assert other.get_ids() == [0, 1]
            why = other.controller.dead(1) or ""
            assert f"process {pid} is gone" in why, why
            assert other.apply(lambda: 0, targets=0) == [0]
            with pytest.raises(EngineError, match="engine 1 is dead"):
                other.apply(lambda: 1, targets=1, timeout=10)
            mec.restart(1, timeout=60)
            other.wait_ready(timeout=30)
            assert other.apply(lambda: 2) == [2, 2]


@pytest.mark.timeout(120)
def test_an_attached_client_reconnects_to_a_dead_engine_its_owner_restarts_later(monkeypatch):
    """A client attached to a cluster with a dead engine followed the owner's restart only
    for FOLLOW_RESTART_FOR (60 s) after it saw the death; an owner restarting it later (the
    usual case: auto_restart off, someone notices) left it dead in that client for good:
    every call to it failed "engine 1 is dead". Now a call after the cluster file lists the
    restarted engine reconnects to it (the follow window is made to have passed at once)."""
    from faultlib import engine_pid

    from ipy_multiengine import clusterfile

    monkeypatch.setattr(clusterfile, "FOLLOW_RESTART_FOR", 0.0)
    with Cluster(n=2, profile="attach-dead-later") as mec:
        os.kill(engine_pid(mec.owner, 1), signal.SIGKILL)
        wait_for(lambda: mec.controller.dead(1), 30, "the owner to see engine 1 dead")
        with MultiEngineClient(profile="attach-dead-later") as other:
            assert other.controller.dead(1)
            mec.restart(1, timeout=60)
            assert other.apply(lambda: 2, timeout=30) == [2, 2]
            # and one that dies while attached, restarted after the window, the same
            os.kill(engine_pid(mec.owner, 0), signal.SIGKILL)
            wait_for(lambda: other.controller.dead(0), 30, "the client to see engine 0 dead")
            mec.restart(0, timeout=60)
            assert other.apply(lambda: 3, timeout=30) == [3, 3]


@pytest.mark.timeout(120)
def test_a_restart_whose_caller_stops_waiting_goes_on_and_the_engine_comes_back():
    """``mec.restart(0, timeout=t)`` with ``t`` shorter than a kernel's start raised
    "not finished after t s ...; it goes on: mec.wait_ready() waits for it", but the same ``t``
    was the restart's own deadline to connect: it failed ("did not answer kernel_info within
    t s"), the engine stayed dead (wait_ready timed out) while the new kernel ran on, listed
    alive in the cluster file. The caller's timeout now only ends the caller's wait."""
    from faultlib import engine_pid

    with Cluster(n=1, profile="restart-goes-on") as mec:
        old = engine_pid(mec.owner, 0)
        with pytest.raises(TimeoutError, match="it goes on"):
            mec.restart(0, timeout=0.05)
        mec.wait_ready(timeout=60)
        assert mec.apply(lambda: 1, timeout=30) == [1]
        assert mec.controller.dead(0) is None
        new = engine_pid(mec.owner, 0)
        assert new != old and psutil.pid_exists(new)
        spec = json.loads(Path(mec.owner.cluster_file).read_text())
        assert [e["pid"] for e in spec["engines"]] == [new]


@pytest.mark.timeout(120)
def test_restarts_asked_for_do_not_use_up_the_automatic_ones():
    """Every restart, also one a user asked for, counted against auto_restart's limit of
    MAX_AUTO_RESTARTS a minute: after that many ``mec.restart`` calls, an engine that died was
    not restarted ("died 5 times within a minute"; it had not died once). Only automatic
    restarts count now."""
    from faultlib import engine_pid

    from ipy_multiengine.cluster import MAX_AUTO_RESTARTS

    with Cluster(n=1, profile="restarts-asked", write_file=False, auto_restart=True) as mec:
        for _ in range(MAX_AUTO_RESTARTS):
            mec.restart(0, timeout=60)
        os.kill(engine_pid(mec.owner, 0), signal.SIGKILL)
        wait_for(lambda: mec.controller.unavailable(0), 10, "engine 0 to be seen dead")
        mec.wait_ready(timeout=60)
        assert mec.apply(lambda: 1) == [1]
        assert len(mec.owner.restarts[0]) == 1


def _restart_fails_once(launcher) -> list:
    """Make ``launcher.restart`` raise "no kernel this time" on its first call only; returns
    the list of the engine ids of each call."""
    real = launcher.restart
    calls: list = []

    async def once_failing(ids):
        calls.append(list(ids))
        if len(calls) == 1:
            raise RuntimeError("no kernel this time")
        return await real(ids)

    launcher.restart = once_failing
    return calls


@pytest.mark.timeout(120)
def test_a_failed_restart_is_tried_again_by_auto_restart():
    """With ``auto_restart``, an engine whose restart failed is dead like any other dead engine:
    it is restarted again (here the launcher fails once), not left for good."""
    with Cluster(n=1, profile="restart-fails-auto", write_file=False, auto_restart=True) as mec:
        calls = _restart_fails_once(mec.owner.launcher)
        with pytest.raises(Exception, match="no kernel this time"):
            mec.restart(0, timeout=60)
        mec.wait_ready(timeout=60)
        assert mec.apply(lambda: 3) == [3]
        assert len(calls) == 2, calls


@pytest.mark.timeout(120)
def test_an_interrupted_restart_leaves_the_engine_dead_saying_so():
    """A restart cancelled half way (Ctrl-C in mec.restart cancels it) left the engine
    "restarting" for good; it is dead now, saying its restart was interrupted, and a restart
    brings it back."""
    import threading

    from ipy_multiengine import _loop

    with Cluster(n=1, profile="restart-interrupted", write_file=False) as mec:
        launcher = mec.owner.launcher
        real = launcher.restart
        entered = threading.Event()

        async def stuck(ids):
            import asyncio

            entered.set()
            await asyncio.Event().wait()  # never set: the restart hangs in the launcher

        launcher.restart = stuck
        fut = _loop.submit(mec.owner.restart_async([0], 60))
        assert entered.wait(30)
        fut.cancel()
        wait_for(
            lambda: mec.controller.unavailable(0) != "is not ready yet (restarting)",
            10,
            "the interrupted restart to be reported",
        )
        assert "its restart was interrupted" in (mec.controller.unavailable(0) or "")
        launcher.restart = real
        mec.restart(0, timeout=60)
        assert mec.apply(lambda: 5) == [5]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("route", ["mec.interrupt", "owner.interrupt"])
def test_an_interrupt_during_a_restart_does_not_kill_the_new_kernel(route):
    """``mec.interrupt()`` while an engine restarts (from another thread, or the owner's own
    interrupt, as the plain fallback calls it): the engine's new kernel had just been spawned,
    and the kernel manager's SIGINT killed it before its handler was installed; the restart
    failed and the engine was left dead ("killed by signal SIGINT"). Nothing runs there yet:
    nothing is interrupted, the restart ends and the engine works."""
    import asyncio
    import threading

    with Cluster(n=1, profile=f"restart-interrupt-{route}", write_file=False) as mec:
        launcher = mec.owner.launcher
        real = launcher.restart
        spawned, interrupted = threading.Event(), threading.Event()

        async def spawn_then_wait(ids):
            infos = await real(ids)  # the new kernel's process exists, still starting
            spawned.set()
            await asyncio.to_thread(interrupted.wait, 20)
            return infos

        launcher.restart = spawn_then_wait
        errors: list[BaseException] = []

        def restart() -> None:
            try:
                mec.restart(0, timeout=60)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=restart)
        t.start()
        try:
            assert spawned.wait(30), "the restart never spawned the new kernel"
            if route == "mec.interrupt":
                mec.interrupt(0)
            else:
                mec.owner.interrupt([0])
        finally:
            interrupted.set()
            t.join(60)
        launcher.restart = real
        assert not errors, errors
        assert mec.apply(lambda: 5, timeout=30) == [5]


@pytest.mark.timeout(120)
def test_a_dead_engine_whose_restart_fails_says_so_and_auto_restart_tries_again():
    """An engine that died (here kill -9) is restarted by auto_restart; when that restart
    failed (the launcher raised once) the engine stayed dead for good, still saying it was
    killed: fail_restart left an engine dead already alone, so the owner never heard of the
    failed restart and auto_restart never tried again (as it does for an engine alive before
    its restart). Now it is tried again; a manual restart of a dead engine that fails says so."""
    from faultlib import engine_pid

    with Cluster(n=1, profile="restart-dead-fails", write_file=False, auto_restart=True) as mec:
        cluster = mec.owner
        calls = _restart_fails_once(cluster.launcher)
        os.kill(engine_pid(cluster, 0), signal.SIGKILL)
        wait_for(lambda: len(calls) >= 2, 30, "auto_restart to try again after its failure")
        mec.wait_ready(timeout=60)
        assert mec.apply(lambda: 3) == [3]

        cluster.auto_restart = False
        calls.clear()
        os.kill(engine_pid(cluster, 0), signal.SIGKILL)
        wait_for(lambda: mec.controller.dead(0), 30, "engine 0 to be seen dead")
        with pytest.raises(Exception, match="no kernel this time"):
            mec.restart(0, timeout=60)
        assert "failed to restart: no kernel this time" in (mec.controller.unavailable(0) or "")
        mec.restart(0, timeout=60)
        assert mec.apply(lambda: 5) == [5]


def _assert_each_engine_error_is_kept(err: BaseException) -> None:
    """``err``, the error of a restart of engines 0, 1 and 2 where 0 and 2 failed (each with
    "no kernel for engine N" raised in the launcher), keeps each engine's own exception: by
    engine id in ``errors`` (tracebacks included), all of them in its cause (a group), so that
    a printed traceback and IPython's rendering show both. Only engine 0's was chained."""
    import pickle
    import traceback

    from ipy_multiengine.errors import RestartError

    assert isinstance(err, RestartError) and err.engine_id == 0, repr(err)
    assert sorted(err.errors) == [0, 2], err.errors
    for eid, own in err.errors.items():
        assert isinstance(own, RuntimeError) and str(own) == f"no kernel for engine {eid}"
        frames = [f.name for f in traceback.extract_tb(own.__traceback__)]
        assert "failing_for_0_and_2" in frames, (eid, frames)
        assert err.for_engine(eid).engine_id == eid and str(own) in str(err.for_engine(eid))
    assert isinstance(err.__cause__, BaseExceptionGroup), repr(err.__cause__)
    assert list(err.__cause__.exceptions) == [err.errors[0], err.errors[2]]
    printed = "".join(traceback.format_exception(err))
    rendered = "\n".join(err._render_traceback_())
    for text in (printed, rendered):
        assert "RuntimeError: no kernel for engine 0" in text, text
        assert "RuntimeError: no kernel for engine 2" in text, text
        assert text.count("failing_for_0_and_2") >= 2, text
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is RestartError and str(again) == str(err)
    texts = lambda e: {i: str(x) for i, x in e.errors.items()}  # noqa: E731
    assert texts(again) == texts(err)
    # under tblib (which pickles causes) with a member that does not pickle: its cause, raised
    # `from` a plain group, failed the whole error; the group the constructor makes carries
    # each member on its own
    import threading

    from tblib import pickling_support
    from test_errors import _pickling_by_own_reduce

    err.errors[2].lock = threading.Lock()
    try:
        with _pickling_by_own_reduce():
            pickling_support.install(err, err.__cause__)
            again = pickle.loads(pickle.dumps(err))
    finally:
        del err.errors[2].lock
    assert type(again.errors[0]) is RuntimeError and str(again.errors[0]) == str(err.errors[0])
    assert str(again.__cause__.exceptions[1]) == "RuntimeError: no kernel for engine 2"


@pytest.mark.timeout(150)
def test_a_restart_of_several_engines_finishes_the_others_when_one_fails():
    """One engine's failed restart raised at once while the others' went on unwatched, and the
    cluster file was not rewritten: the engines that came back kept their old pids in it (a
    second client saw them dead). Now every restart ends first, the file records the engines
    that came back, and the error names each engine that did not and keeps its exception."""
    with Cluster(n=3, profile="restart-several") as mec:
        cluster = mec.owner
        launcher = cluster.launcher
        real = launcher.restart

        async def failing_for_0_and_2(ids):
            if ids[0] in (0, 2):
                raise RuntimeError(f"no kernel for engine {ids[0]}")
            return await real(ids)

        launcher.restart = failing_for_0_and_2
        before = {
            e["id"]: e["pid"] for e in json.loads(Path(cluster.cluster_file).read_text())["engines"]
        }
        with pytest.raises(EngineError) as info:
            mec.restart([0, 1, 2], timeout=60)
        assert "no kernel for engine 0" in str(info.value)
        assert "no kernel for engine 2" in str(info.value)
        _assert_each_engine_error_is_kept(info.value)
        assert mec.controller.state(1).ready, mec.controller.unavailable(1)
        assert mec.apply(lambda: 1, targets=1) == [1]
        pid1 = mec.controller.state(1).pid
        assert pid1 != before[1]
        after = {
            e["id"]: e["pid"] for e in json.loads(Path(cluster.cluster_file).read_text())["engines"]
        }
        assert after[1] == pid1, (before, after)
        launcher.restart = real
        mec.restart([0, 2], timeout=60)
        assert mec.apply(lambda: 2) == [2, 2, 2]


@pytest.mark.timeout(150)
def test_a_restart_stopped_by_ctrl_c_records_the_engines_that_came_back():
    """A Ctrl-C during a restart of several engines cancels the restarts still going; the
    ones that had come back (new pids) were not written to the cluster file (only a restart
    that ended was), so a second client attached through it saw those engines dead."""
    import asyncio

    from faultlib import CtrlC

    with Cluster(n=2, profile="restart-ctrl-c") as mec:
        cluster = mec.owner
        launcher = cluster.launcher
        real = launcher.restart
        path = Path(cluster.cluster_file)

        def pids() -> dict:
            return {e["id"]: e["pid"] for e in json.loads(path.read_text())["engines"]}

        before = pids()
        stuck = asyncio.Event()  # never set: engine 0's restart waits until it is cancelled

        async def stuck_for_0(ids):
            if ids[0] == 0:
                await stuck.wait()
            return await real(ids)

        launcher.restart = stuck_for_0
        back = lambda: (  # noqa: E731  engine 1 restarted, connected and ready
            mec.controller.state(1).ready and mec.controller.state(1).pid != before[1]
        )
        ctrl_c = CtrlC(back, timeout=60)
        try:
            with pytest.raises(KeyboardInterrupt):
                mec.restart([0, 1], timeout=120)
        finally:
            ctrl_c.cancel()
        assert ctrl_c.sent_at is not None
        pid1 = mec.controller.state(1).pid
        wait_for(lambda: pids()[1] == pid1, 20, f"engine 1's new pid {pid1} in the cluster file")
        assert mec.apply(lambda: 1, targets=1) == [1]
        launcher.restart = real
        mec.restart(0, timeout=60)
        assert mec.apply(lambda: 2) == [2, 2]


def test_an_engine_that_dies_shows_what_its_process_wrote_itself():
    """A local engine's process that wrote to its own stderr and died (a C library's message
    before an abort): the text reached its log only, and the EngineError said "killed by
    signal SIGABRT" alone, naming no log. Now the error ends with the last lines the current
    kernel wrote to its log (not a previous kernel's: after a restart they are gone); what
    calls to the dead engine say stays one line."""
    from faultlib import small_cluster

    from ipy_multiengine.errors import CompositeError

    with small_cluster(1) as (cluster, mec):
        log = cluster.log_file(0)
        code = (
            "import os, time\n"
            "os.write(2, b'C-level last words\\n')\n"  # fd 2, as a C library writes
            # ipykernel copies fd 2 to the log from a thread: wait (a file poll) until it has
            f"while b'C-level last' not in open({str(log)!r}, 'rb').read(): time.sleep(0.005)\n"
            "os.abort()\n"
        )
        with pytest.raises(CompositeError) as info:
            mec.execute(code, timeout=30)
        [err] = info.value.elist
        assert str(err).startswith("engine 0 was killed by signal SIGABRT while running"), err
        assert f"\n--- engine 0's own output (log {log}) ---\nC-level last words" in str(err)
        assert "own output (log" in "\n".join(info.value._render_traceback_())  # %px shows it
        assert mec.controller.dead(0) == "was killed by signal SIGABRT"
        mec.restart(0, timeout=60)
        with pytest.raises(CompositeError) as info:
            mec.execute("import os; os.abort()", timeout=30)
        # the restarted kernel's own output only: its abort's traceback, not the C library's
        assert "C-level" not in str(info.value), info.value
        assert "Fatal Python error: Aborted" in str(info.value)


def _segfault(mec, prelude: str = "") -> str:
    from ipy_multiengine.errors import CompositeError

    mec.execute("def boom():\n    import ctypes\n    ctypes.string_at(0)\n")
    with pytest.raises(CompositeError) as info:
        mec.execute(prelude + "boom()", timeout=60)
    [err] = info.value.elist
    return str(err)


def test_a_segfaulting_engine_shows_the_python_traceback_of_the_crash():
    """A segfault in C code killed the engine with "killed by signal SIGSEGV" and its log tail
    alone: faulthandler was not enabled in the kernel, and one enabled in a cell
    (``faulthandler.enable()``, which ipykernel points at fd 2, the pipe its own thread of the
    dying process reads) wrote into that pipe, lost. The engine's helper enables it on the
    process's own stderr, its private log, and the error shows the traceback from its
    innermost frame, the user's ``boom``."""
    from faultlib import small_cluster

    with small_cluster(1) as (cluster, mec):
        log = cluster.log_file(0)
        assert mec.execute(
            "import os; print(os.path.islink('/proc/self/fd/2') and os.readlink('/proc/self/fd/2'))"
        )[0]["stdout"].startswith("pipe:")
        for prelude in ("", "import faulthandler; faulthandler.enable(); "):
            text = _segfault(mec, prelude)
            assert "was killed by signal SIGSEGV" in text, text
            own = text.split(f"--- engine 0's own output (log {log}) ---\n", 1)[1]
            lines = own.splitlines()
            assert lines[0] == "Fatal Python error: Segmentation fault", own
            assert any(line.endswith(" in string_at") for line in lines[:6]), own
            assert any(line.endswith("line 3 in boom") for line in lines[:6]), own
            assert len(lines) <= 22 and "more lines in the log" in lines[-1], own
            assert os.stat(log).st_mode & 0o077 == 0 and os.stat(log.parent).st_mode & 0o077 == 0
            mec.restart(0, timeout=60)
        assert mec.apply(lambda: 5) == [5]
    assert not log.exists()


def test_a_forked_child_s_crash_is_not_shown_as_the_engine_s():
    """A process the engine forks (multiprocessing's default on Linux) inherited the engine's
    crash dump: a worker's segfault wrote its traceback into the engine's log only, and when
    the engine died later of something else (SIGKILL: the OOM killer) its error showed that
    traceback, "Fatal Python error: Segmentation fault", as the engine's own last words, in
    place of the lines the engine wrote last. A forked child's dump goes to its own stderr now,
    ipykernel's pipe (the cell shows it), and a crash's traceback is put first only for an
    engine a fatal signal killed."""
    from faultlib import small_cluster

    from ipy_multiengine.errors import CompositeError

    code = (
        "import ctypes, multiprocessing\n"
        "def work():\n"
        "    ctypes.string_at(0)\n"
        "child = multiprocessing.get_context('fork').Process(target=work)\n"
        "child.start(); child.join(); print('child exit', child.exitcode)\n"
    )
    with small_cluster(1) as (cluster, mec):
        log = cluster.log_file(0)
        pr = mec.execute(code, block=False)
        [record] = pr.get_result(timeout=60)
        assert record["stdout"] == f"child exit {-signal.SIGSEGV}\n"

        def seen() -> bool:
            return "in work" in record["stderr"] + (pr.late[0].get("stderr") or "")

        wait_for(seen, 30, "the child's traceback in the cell's stderr")
        last = (
            "import os, signal, time\n"
            "os.write(2, b''.join(b'later %d\\n' % i for i in range(25)))\n"  # as C code writes
            f"while b'later 24' not in open({str(log)!r}, 'rb').read(): time.sleep(0.005)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        with pytest.raises(CompositeError) as info:
            mec.execute(last, timeout=60)
    text = str(info.value.elist[0])
    assert "killed by signal SIGKILL" in text, text
    own = text.split(f"--- engine 0's own output (log {log}) ---\n", 1)[1]
    assert "Fatal Python error" not in own and own.endswith("later 24"), own
