"""Cluster lifecycle, cluster files, the ipmulti CLI and connecting from other processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ipy_multiengine import Cluster, MultiEngineClient, NoClusterError
from ipy_multiengine.cluster import cluster_dir, cluster_file_path

pytestmark = pytest.mark.timeout(120)

IPMULTI = [sys.executable, "-m", "ipy_multiengine.cli"]


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


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
        assert e["connection"]["ip"] == "127.0.0.1"
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
    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids),
               10, "engines to exit")


def test_bad_cluster_arguments():
    with pytest.raises(ValueError, match="positive"):
        Cluster(n=0)
    with pytest.raises(ValueError, match="no kernelspec named 'no-such-kernel'"):
        Cluster(n=1, kernel_name="no-such-kernel", profile="nokernel").start()
    assert not cluster_file_path("nokernel").exists()


def test_daemon_cluster_used_from_another_process_then_stopped():
    env = dict(os.environ)
    out = subprocess.run(IPMULTI + ["start", "-n", "2", "--profile", "daemon", "--daemon"], env=env,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path == cluster_file_path("daemon") and path.exists()
    spec = json.loads(path.read_text())
    pids = [spec["owner_pid"]] + [e["pid"] for e in spec["engines"]]
    code = ("from ipy_multiengine import client; mec = client.MultiEngineClient(profile='daemon'); "
            "print(mec.get_ids(), mec.apply(lambda: 6 * 7)); mec.close()")
    used = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert used.returncode == 0, used.stderr
    assert used.stdout.strip() == "[0, 1] [42, 42]"
    listed = subprocess.run(IPMULTI + ["list"], env=env, capture_output=True, text=True, timeout=30)
    assert "daemon" in listed.stdout and "running" in listed.stdout
    stopped = subprocess.run(IPMULTI + ["stop", "--profile", "daemon"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not path.exists()
    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids),
               15, "daemon and engines to exit")


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

        wait_until(gone, 15, "orphaned engines to exit")
    finally:
        if owner.poll() is None:
            owner.kill()
    listed = subprocess.run(IPMULTI + ["list"], capture_output=True, text=True, timeout=30)
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
    out = subprocess.run(IPMULTI + ["demo", "-n", "2"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "<Results List>" in out.stdout and "CompositeError" in out.stdout and "stopped" in out.stdout
