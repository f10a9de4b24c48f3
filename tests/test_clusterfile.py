"""Cluster files without engines: the one writer, the one reader, process identity, owner
requests addressed to exactly one cluster, and stale records that must not be thrown away.

The "owner" in the request tests is this test process (its identity is real); a thread plays
its serving loop. Unrelated processes are real ``sleep`` processes.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading

import psutil
import pytest

from ipy_multiengine import NoClusterError
from ipy_multiengine.cluster import list_clusters
from ipy_multiengine.clusterfile import (
    EngineError,
    FileOwner,
    answer_request,
    cluster_file_path,
    identity,
    pending_requests,
    read_cluster,
    read_spec,
    request_dir,
    request_owner,
    same_process,
    write_cluster,
    write_private,
)

pytestmark = pytest.mark.timeout(60)

CONN = {"shell_port": 1, "iopub_port": 2, "control_port": 3, "ip": "127.0.0.1", "key": "x"}


def spec_for(profile: str, owner: dict, **extra) -> dict:
    return {
        "cluster_id": profile,
        "profile": profile,
        "shared": True,
        "owner": owner,
        "owner_pid": owner["pid"],
        "host": owner["host"],
        "serves": ["requests"],
        "engines": [{"id": 0, "connection": CONN}],
        **extra,
    }


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def test_write_private_is_0600_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "c.json"
    write_private(path, "one")
    write_private(path, "two")
    assert path.read_text() == "two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_write_cluster_refuses_a_malformed_spec(tmp_path):
    with pytest.raises(ValueError, match="'engines' must be a non-empty list"):
        write_cluster(tmp_path / "c.json", {"engines": []})
    assert not (tmp_path / "c.json").exists()


def test_o09_read_spec_names_a_non_utf8_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=f"malformed cluster file {bad}: not UTF-8"):
        read_spec(bad)
    with pytest.raises(NoClusterError):
        read_spec(tmp_path / "missing.json")


def test_same_process_checks_host_create_time_and_command_line(sleeper):
    ident = identity(sleeper.pid)
    assert same_process(ident)[0].pid == sleeper.pid
    assert "another process" in same_process({**ident, "create_time": ident["create_time"] - 50})[1]
    assert "another command" in same_process({**ident, "cmdline": ["something", "else"]})[1]
    assert "host" in same_process({**ident, "host": "elsewhere"})[1]
    assert "no start time" in same_process({"pid": sleeper.pid, "host": socket.gethostname()})[1]


def test_a_file_whose_owner_pid_was_reused_is_stale(sleeper):
    path = cluster_file_path("cf-reused")
    owner = {**identity(sleeper.pid), "create_time": 1.0}
    write_cluster(path, spec_for("cf-reused", owner))
    try:
        with pytest.raises(NoClusterError, match="stale"):
            read_cluster(path)
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- o01: exact addressing
def test_o01_requests_go_to_the_directory_of_exactly_one_cluster_file():
    a, ab, odd = (cluster_file_path(p) for p in ("cf-a", "cf-a-b", "cf[x]*"))
    dirs = {request_dir(p) for p in (a, ab, odd)}
    assert len(dirs) == 3 and all(d.is_dir() for d in dirs)
    for path, name in ((ab, "r1.json"), (odd, "r2.json")):
        write_private(
            request_dir(path) / name,
            json.dumps({"op": "restart", "ids": [0], "cluster_file": os.path.realpath(path)}),
        )
    assert list(pending_requests(a)) == []  # 'cf-a' never sees what is meant for 'cf-a-b'
    assert [ask["cluster_file"] for _, ask in pending_requests(ab)] == [os.path.realpath(ab)]
    assert [ask["cluster_file"] for _, ask in pending_requests(odd)] == [os.path.realpath(odd)]
    assert list(pending_requests(ab)) == []  # each request is taken once


def test_o01_a_request_file_naming_another_cluster_is_refused_by_the_owner():
    a, ab = cluster_file_path("cf2-a"), cluster_file_path("cf2-a-b")
    req = request_dir(a) / "r.json"
    write_private(req, json.dumps({"op": "restart", "ids": [0], "cluster_file": str(ab)}))
    assert list(pending_requests(a)) == []
    answer = json.loads(req.with_suffix(".done").read_text())
    assert "another cluster file" in answer["error"] and answer["cluster_file"] == os.path.realpath(
        a
    )


def test_an_owner_that_does_not_answer_in_time_is_a_timeout_error():
    """Nobody serves the requests of this (live) owner: the call raises our TimeoutError, like
    every other wait that runs out, at its timeout (not the default 60 s)."""
    import time

    from ipy_multiengine.errors import TimeoutError as MultiEngineTimeout

    path = cluster_file_path("cf-silent")
    write_cluster(path, spec_for("cf-silent", {**identity(), "kind": "ipmulti"}))
    try:
        t0 = time.monotonic()
        with pytest.raises(MultiEngineTimeout, match=r"within 0\.5 s"):
            request_owner(path, "restart", [0], timeout=0.5)
        took = time.monotonic() - t0
        # its own timeout, not the default 60 s: what it takes past it is the box's speed
        # (0.3 s of slack is a loaded box's scheduling)
        assert 0.5 <= took < 0.5 + 5, f"request_owner(timeout=0.5) took {took:.2f} s"
    finally:
        path.unlink()


def test_o01_an_answer_from_another_cluster_is_not_accepted():
    path = cluster_file_path("cf3")
    write_cluster(path, spec_for("cf3", {**identity(), "kind": "ipmulti"}))
    stop = threading.Event()

    def wrong_owner() -> None:  # answers naming some other cluster file
        while not stop.wait(0.02):
            for req, _ in pending_requests(path):
                answer_request(req, cluster_file_path("cf3-other"), {"ok": True})

    t = threading.Thread(target=wrong_owner)
    t.start()
    try:
        with pytest.raises(EngineError, match="came from the owner of"):
            request_owner(path, "restart", [0], timeout=10)
    finally:
        stop.set()
        t.join()
        path.unlink()


def test_file_owner_restart_fails_clearly_when_the_owner_does_not_serve():
    path = cluster_file_path("cf4")
    write_cluster(path, {**spec_for("cf4", {**identity(), "kind": "kernel"}), "serves": []})
    try:
        owner = FileOwner(path)
        with pytest.raises(EngineError, match="does not take requests"):
            owner.restart([0], timeout=1)
    finally:
        path.unlink()


# ---------------------------------------------------------------------- o02: keep the record
def test_o02_stale_launcher_record_whose_pid_was_reused_is_kept_and_nothing_signalled(sleeper):
    """The owner is gone and the file's mpiexec pid now belongs to an unrelated process: that
    process is not signalled, the file stays as the record, and list says why."""
    path = cluster_file_path("cf-mpi")
    here = socket.gethostname()
    gone_owner = {"pid": 2**22 - 3, "host": here, "create_time": 1.0, "kind": "ipmulti"}
    launcher = {
        "launcher": "mpi",
        "n": 1,
        "pid": sleeper.pid,
        "hostname": here,
        "work_dir": None,
        "started": None,
        "engines": [],
        "identity": {**identity(sleeper.pid), "create_time": 2.0},
    }
    write_cluster(path, spec_for("cf-mpi", gone_owner, launcher=launcher))
    try:
        entry = next(c for c in list_clusters(clean=True) if c["profile"] == "cf-mpi")
        assert entry["state"] == "stale (kept)"
        assert any(f"pid {sleeper.pid}" in p for p in entry["problems"]), entry
        assert path.exists() and sleeper.poll() is None
        assert psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- engine_main: signal by
# identity
def test_engine_main_signal_and_stop_refuse_a_pid_that_is_not_the_engine(sleeper, tmp_path):
    conn = str(tmp_path / "engine-0.json")
    cmd = [sys.executable, "-m", "ipy_multiengine.engine_main"]
    out = subprocess.run(
        [*cmd, "--signal", "TERM", "--pid", str(sleeper.pid), "--connection-file", conn],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 3 and "no engine with pid" in out.stderr
    out = subprocess.run(
        [*cmd, "--stop", "--stdin", "--timeout", "1"],
        input=json.dumps([[sleeper.pid, conn]]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0
    assert sleeper.poll() is None  # neither signalled the unrelated process
    # a process that does run that engine's command line is stopped
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", conn])
    reaper = threading.Thread(target=engine.wait)  # like a real engine's parent, reap it at once
    reaper.start()
    try:
        out = subprocess.run(
            [*cmd, "--stop", "--stdin", "--timeout", "5"],
            input=json.dumps([[engine.pid, conn]]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        reaper.join(10)
        assert engine.returncode is not None
    finally:
        engine.kill()
        reaper.join(10)
    assert os.path.isdir(tmp_path)


def test_a_request_through_a_relative_path_reaches_the_owner(monkeypatch):
    """Clients may name the cluster file by a relative path; the owner knows its absolute one."""
    path = cluster_file_path("cf5")
    write_cluster(path, spec_for("cf5", {**identity(), "kind": "ipmulti"}))
    monkeypatch.chdir(path.parent)
    stop = threading.Event()

    def owner() -> None:
        while not stop.wait(0.02):
            for req, ask in pending_requests(path):
                answer_request(req, path, {"ok": True, "ids": ask["ids"]})

    t = threading.Thread(target=owner)
    t.start()
    try:
        assert request_owner(path.name, "restart", [0], timeout=10)["ids"] == [0]
    finally:
        stop.set()
        t.join()
        path.unlink()


def test_stale_cleanup_never_removes_a_newer_cluster_file_written_meanwhile(sleeper):
    """Stale cleanup reads the file, SIGTERMs what it names, waits, then removed whatever file
    was at the path by then: a new owner of the profile that had started meanwhile (after
    `ipmulti stop`, or an `ipmulti list` racing an `ipmulti start`) lost its live cluster file."""
    from ipy_multiengine.cluster import clean_stale

    path = cluster_file_path("cf-race")
    stale = spec_for("cf-race", {**identity(sleeper.pid), "create_time": 1.0})  # owner gone
    write_cluster(path, stale)
    stale = read_spec(path)
    live = spec_for("cf-race", {**identity(), "kind": "process"}, created=2.0)
    write_cluster(path, live)  # the new owner claims the profile and writes its file
    try:
        assert clean_stale(path, stale) == []
        assert read_spec(path)["owner"]["pid"] == os.getpid()  # the live file is still there
        assert (
            sleeper.poll() is None
        )  # and nothing was signalled: the stale file named no engine pid
    finally:
        path.unlink(missing_ok=True)
    write_cluster(path, stale)
    assert clean_stale(path, read_spec(path)) == [] and not path.exists()  # its own file: removed


def test_profile_lock_taken_for_an_instant_by_a_stale_cleanup_is_not_a_running_cluster():
    """`ipmulti list` (stale cleanup) takes a free profile's lock for an instant to remove its
    file: a cluster of that profile starting at that instant failed with 'already running'."""
    from ipy_multiengine.clusterfile import ProfileLock

    cleanup = ProfileLock("cf-instant")
    cleanup.acquire()
    released = threading.Timer(0.2, cleanup.release)  # remove_stale: acquire, then release (unlink)
    released.start()
    starting = ProfileLock("cf-instant")
    try:
        starting.acquire()
        assert starting.held
    finally:
        released.join()
        starting.release()
