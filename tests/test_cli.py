"""The ``ipmulti`` command line: argument errors, ``list`` and ``stop`` on files nobody owns.

These run ``ipmulti`` in a subprocess, as a user would; none starts an engine except where
the name says so. Cluster files are written here with ``clusterfile.write_cluster`` to stand
for a file left by a process that is gone (a stale file after a reboot, a shared home).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ipy_multiengine.clusterfile import cluster_dir, cluster_file_path, write_cluster

pytestmark = pytest.mark.timeout(90)

IPMULTI = [sys.executable, "-m", "ipy_multiengine.cli"]
CONN = {"shell_port": 1, "iopub_port": 2, "control_port": 3, "ip": "127.0.0.1", "key": "x"}


def ipmulti(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(IPMULTI + list(args), capture_output=True, text=True, timeout=timeout)


def assert_usage_error(out: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2 and one ``ipmulti: ...`` line naming the offending thing; no traceback."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ipmulti: "), out.stderr
    assert "Traceback" not in out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


# ---------------------------------------------------------------------- o08: bad arguments
def test_o08_start_unknown_launcher_is_one_line():
    assert_usage_error(ipmulti("start", "--launcher", "nosuch", "--profile", "o08a"), "nosuch")


def test_o08_start_zero_engines_of_a_kernelspec_is_one_line():
    assert_usage_error(ipmulti("start", "--engines", "python3=0", "--profile", "o08b"), "python3=0")


def test_o08_start_unknown_launcher_option_is_one_line():
    assert_usage_error(ipmulti("start", "-o", "nosuch=1", "--profile", "o08c"), "nosuch")


def test_start_o_refuses_the_clusters_own_parameters():
    # `-o launcher=...` replaced --launcher, `-o write_file=false` made a shared cluster
    # without a file: -o takes launcher options only, and says so before anything starts
    assert_usage_error(
        ipmulti("start", "-o", 'launcher="nosuch"', "--profile", "o08f"),
        "'launcher' is a parameter of the cluster",
    )
    assert not cluster_file_path("o08f").exists()


def test_o08_start_hosts_without_ssh_launcher_is_one_line():
    assert_usage_error(ipmulti("start", "--hosts", "a=2", "--profile", "o08d"), "--hosts", "ssh")


def test_o08_daemon_checks_arguments_before_detaching():
    assert_usage_error(
        ipmulti("start", "--daemon", "--launcher", "nosuch", "--profile", "o08e"), "nosuch"
    )
    assert not cluster_file_path("o08e").exists()


# ---------------------------------------------------------------------- h14: stop never kills by
# pid alone
@pytest.fixture
def victim():
    """An unrelated live process whose pid a stale cluster file names."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def stale_spec(profile: str, pid: int, host: str, create_time: float | None) -> dict:
    owner = {
        "pid": pid,
        "host": host,
        "kind": "ipmulti",
        "cmdline": ["python", "-m", "ipy_multiengine.cli"],
    }
    if create_time is not None:
        owner["create_time"] = create_time
    return {
        "cluster_id": profile,
        "profile": profile,
        "shared": True,
        "owner": owner,
        "owner_pid": pid,
        "host": host,
        "created": 0,
        "engines": [
            {"id": 0, "pid": pid, "host": host, "create_time": create_time, "connection": CONN}
        ],
    }


@pytest.mark.parametrize("how", ["other-host", "pid-reused", "no-identity"])
def test_h14_stop_with_stale_file_naming_unrelated_process_leaves_it_alive(victim, how):
    profile = f"h14-{how}"
    path = cluster_file_path(profile)
    here = socket.gethostname()
    created = psutil.Process(victim.pid).create_time()
    spec = {
        "other-host": stale_spec(profile, victim.pid, "login-node-2", created),
        "pid-reused": stale_spec(profile, victim.pid, here, created - 1000.0),
        "no-identity": stale_spec(profile, victim.pid, here, None),
    }[how]
    if how == "no-identity":  # a file as older versions wrote it: owner_pid only
        del spec["owner"]
        del spec["engines"][0]["create_time"]
    write_cluster(path, spec)
    out = ipmulti("stop", "--profile", profile)
    assert victim.poll() is None, "ipmulti stop signalled a process the file does not describe"
    assert out.returncode == 1, (out.stdout, out.stderr)
    if how == "other-host":
        assert "login-node-2" in out.stderr
    else:
        assert "not signalling" in out.stderr and str(victim.pid) in out.stderr, out.stderr
    if how == "other-host":
        assert path.exists()  # its owner may live on that host: not ours to remove
        path.unlink()
    else:
        assert not path.exists()  # stale here: removed, nothing signalled


def test_h14_list_does_not_signal_a_reused_pid(victim):
    profile = "h14-list"
    here = socket.gethostname()
    spec = stale_spec(profile, victim.pid, here, psutil.Process(victim.pid).create_time() - 1000.0)
    write_cluster(cluster_file_path(profile), spec)
    out = ipmulti("list")
    assert out.returncode == 0, out.stderr
    assert victim.poll() is None
    assert "h14-list" in out.stdout and "stale" in out.stdout
    assert not cluster_file_path(profile).exists()


# ---------------------------------------------------------------------- o09: list survives a bad
# file
def test_o09_list_reports_a_non_utf8_file_and_lists_the_others():
    bad = cluster_dir() / "cluster-o09-bad.json"
    bad.write_bytes(b'{"profile": "o09-bad", "engines": "\xff\xfe"}')
    good = cluster_file_path("o09-good")  # attached kernels: no owner, never stale
    write_cluster(
        good,
        {
            "cluster_id": "o09-good",
            "profile": "o09-good",
            "shared": True,
            "attached": True,
            "engines": [{"id": 0, "connection": CONN}],
        },
    )
    try:
        out = ipmulti("list")
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
        rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
        assert "malformed" in rows["o09-bad"] and "UTF-8" in rows["o09-bad"]
        assert "attached" in rows["o09-good"]
        listed = json.loads(ipmulti("list", "--json").stdout)
        assert {c["profile"] for c in listed} >= {"o09-bad", "o09-good"}
    finally:
        bad.unlink(missing_ok=True)
        good.unlink(missing_ok=True)


def test_list_shows_owner_column_and_stop_of_unknown_profile_says_so():
    out = ipmulti("stop", "--profile", "nobody-here")
    assert out.returncode == 1 and "no cluster for profile 'nobody-here'" in out.stderr
    out = ipmulti("list")
    assert out.returncode == 0
    assert "owner" in out.stdout.splitlines()[0] or out.stdout.strip() == "no clusters"


def test_stop_refuses_a_cluster_owned_on_another_host():
    profile = "remote-owner"
    spec = stale_spec(profile, os.getpid(), "some-other-host", 1.0)
    path = cluster_file_path(profile)
    write_cluster(path, spec)
    try:
        out = ipmulti("stop", "--profile", profile)
        assert out.returncode == 1 and "some-other-host" in out.stderr
        assert Path(path).exists()
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- exit codes and messages
@pytest.mark.parametrize("command", [["stop"], ["restart"], ["attach", "/dev/null"], ["start"]])
def test_an_invalid_profile_is_a_usage_error_not_a_traceback(command):
    assert_usage_error(ipmulti(*command, "--profile", "a/b"), "invalid profile name 'a/b'")


def test_stop_file_never_deletes_a_file_that_is_not_a_cluster_file(tmp_path):
    """`ipmulti stop --file notes.json` on a file that is no cluster file said 'removing it' and
    deleted it: the user's file, anywhere. Only a malformed file in the cluster directory is
    removed."""
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "data"}')
    out = ipmulti("stop", "--file", str(mine))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert mine.read_text() == '{"my": "data"}'
    assert "not a cluster file" in out.stderr and str(mine) in out.stderr
    ours = cluster_dir() / "cluster-o10bad.json"
    ours.write_text("{not json")
    out = ipmulti("stop", "--profile", "o10bad")
    assert out.returncode == 1 and "removing it" in out.stderr and not ours.exists(), out.stderr


def test_stop_file_that_does_not_exist_names_the_file_not_a_profile(tmp_path):
    out = ipmulti("stop", "--file", str(tmp_path / "gone.json"))
    assert out.returncode == 1 and str(tmp_path / "gone.json") in out.stderr
    assert "profile" not in out.stderr, out.stderr


def test_ctrl_c_while_ipmulti_start_starts_engines_stops_them_with_a_message():
    """Ctrl-C during `ipmulti start` stopped the engines but ended in a KeyboardInterrupt traceback
    (killed by SIGINT); now one line, exit code 130, nothing left behind."""
    import signal
    import time

    proc = subprocess.Popen(
        [*IPMULTI, "start", "-n", "2", "--profile", "ctrlc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        kids: list[psutil.Process] = []
        while len(kids) < 2:  # both kernels spawned: the start is under way
            assert time.monotonic() < deadline and proc.poll() is None, "kernels never started"
            kids = [
                k
                for k in psutil.Process(proc.pid).children(recursive=True)
                if "ipykernel" in " ".join(k.cmdline())
            ]
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "Traceback" not in err and "interrupted while starting" in err, err
    psutil.wait_procs(kids, timeout=15)
    assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    assert not cluster_file_path("ctrlc").exists()


def test_daemon_log_is_private():
    """`ipmulti start --daemon` wrote its log with the umask's mode (0644)."""
    out = ipmulti(
        "start",
        "--daemon",
        "--profile",
        "logmode",
        "--kernel",
        "no-such-kernelspec",
        "--timeout",
        "20",
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "no-such-kernelspec" in out.stderr  # the daemon's own output, from its private log
    assert not list(cluster_dir().glob("*daemon-logmode*"))  # which is gone with it


def test_attach_does_not_take_a_profile_whose_cluster_is_still_starting(tmp_path):
    """A Cluster claims its profile (the lock) long before its file exists (engines start first):
    `ipmulti attach` then wrote the profile's file, said it had, and the starting cluster
    overwrote it moments later. Now attach claims the profile too and refuses."""
    from ipy_multiengine.clusterfile import ProfileLock

    conn = tmp_path / "kernel-1.json"
    conn.write_text(json.dumps({**CONN, "stdin_port": 4, "hb_port": 5}))
    starting = ProfileLock("attach-race")
    starting.acquire()  # a cluster of the profile is starting
    try:
        out = ipmulti("attach", "--profile", "attach-race", "--no-check", str(conn))
        assert out.returncode == 1 and "already running" in out.stderr, (out.stdout, out.stderr)
        assert not cluster_file_path("attach-race").exists()
    finally:
        starting.release()
    out = ipmulti("attach", "--profile", "attach-race", "--no-check", str(conn))
    try:
        assert out.returncode == 0, out.stderr
        assert cluster_file_path("attach-race").exists()
    finally:
        cluster_file_path("attach-race").unlink(missing_ok=True)


def test_version_is_one_source():
    """`ipmulti --version` shows ipy_multiengine.__version__, which the installed metadata
    (pyproject's dynamic version) also reports."""
    from importlib.metadata import version

    import ipy_multiengine

    out = ipmulti("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ipmulti {ipy_multiengine.__version__}"
    assert version("ipy_multiengine") == ipy_multiengine.__version__
