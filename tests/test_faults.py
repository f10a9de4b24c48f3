"""Fault injection with real engines: kills, segfaults, frozen engines, Ctrl-C, a killed owner,
forged messages, and 200 mixed operations under random faults.

Every test has its own small cluster (engines get killed here), polls with deadlines instead
of sleeping, and checks that every engine process it started is gone at the end.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from faultlib import (
    INTERRUPT_DEADLINE,
    CtrlC,
    SleepOnLoad,
    engine_pid,
    gone,
    hang_code,
    make_hanger,
    marker,
    remember,
    slow_pickle_code,
    small_cluster,
    wait_for,
)

from ipy_multiengine import MultiEngineClient
from ipy_multiengine.errors import CompositeError, EngineError, RemoteError

pytestmark = pytest.mark.timeout(60)

MEASURED: dict[str, list[float]] = {}


def measured(name: str, value: float) -> None:
    MEASURED.setdefault(name, []).append(value)
    print(f"[measure] {name}: {value * 1000:.0f} ms")


# --------------------------------------------------------------------------- kill -9 in flight
def _start_op(mec, op: str, tmp_path: Path):
    """Start ``op`` on both engines; engine 1 hangs in it (engine 0 too for execute/push)."""
    if op == "execute":
        return mec.execute(hang_code(tmp_path, op), block=False)
    if op == "push":
        return mec.push({"x": SleepOnLoad(tmp_path, op)}, block=False)
    if op == "pull":
        mec.execute(slow_pickle_code(tmp_path, op), targets=1)
        mec.execute("slow = 7", targets=0)
        return mec.pull("slow", block=False)
    if op == "map":
        hang = make_hanger(tmp_path, op)
        return mec.map(lambda x, h=hang: h(x) if x >= 2 else x * 10, range(4), block=False)
    raise ValueError(op)


@pytest.mark.parametrize("op", ["execute", "push", "pull", "map"])
def test_kill9_during_operation(op, tmp_path):
    with small_cluster(2) as (cluster, mec):
        mec.execute("before_restart = 1")
        pid = engine_pid(cluster, 1)
        pr = _start_op(mec, op, tmp_path)
        queued = mec.execute("queued = 1", targets=1, block=False)  # waits behind the running op
        # a data operation behind an execute waits in the controller for order (fast path)
        held = mec.pull("before_restart", targets=1, block=False)
        wait_for(marker(tmp_path, op, pid).exists, 20, f"{op} to start on engine 1")
        if op in ("execute", "push"):  # engine 0 hangs too: interrupt it
            wait_for(
                marker(tmp_path, op, engine_pid(cluster, 0)).exists,
                20,
                f"{op} to start on engine 0",
            )
            mec.interrupt(0)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(CompositeError) as info:
            pr.get_result(timeout=10)
        measured("kill -9 detection (local, process poll)", time.monotonic() - t0)
        err = info.value
        dead = [e for e in err.elist if e.engine_id == 1]
        assert len(dead) == 1 and isinstance(dead[0], EngineError)
        assert "engine 1 was killed by signal SIGKILL" in str(dead[0])
        assert "while running" in str(dead[0])
        assert f"[1:{dead[0].method}]: EngineError: engine 1 was killed by signal SIGKILL" in str(
            err
        )
        if op == "map":  # the other engine's part is kept
            assert err.results[0] == [0, 10]
        if op == "pull":
            assert err.results[0] == 7
        if op in ("execute", "push"):
            assert [e.engine_id for e in err.elist] == [0, 1] and err.elist[
                0
            ].ename == "KeyboardInterrupt"
        with pytest.raises(CompositeError, match="engine 1 was killed by signal SIGKILL"):
            queued.get_result(timeout=5)  # queued behind it: failed too
        with pytest.raises(CompositeError, match="engine 1 was killed by signal SIGKILL"):
            held.get_result(timeout=5)  # held in the controller, never sent: failed, no hang
        assert mec.get_ids() == [0, 1] and "1 was killed by signal SIGKILL" in repr(mec.get_ids())
        with pytest.raises(EngineError, match=r"engine 1 is dead .*mec\.restart\(1\)"):
            mec.execute("1", targets=1)
        with pytest.raises(EngineError, match="engine 1 is dead"):
            mec.pull("before_restart")  # all targets: fails at once, nothing sent
        assert mec.pull("before_restart", targets=0) == [1]  # engine 0 unaffected
        t0 = time.monotonic()
        mec.restart(1)
        measured("restart of one engine", time.monotonic() - t0)
        remember(cluster)
        assert mec.execute("print(1)")[1]["stdout"] == "1\n"
        with pytest.raises(CompositeError, match="NameError"):
            mec.pull("before_restart", targets=1)  # fresh namespace, same id


def test_segfault_with_auto_restart_reruns_on_start(tmp_path):
    with small_cluster(2, auto_restart=True) as (cluster, mec):
        mec.on_start("import math; SETUP = 'done'")
        old = engine_pid(cluster, 0)
        with pytest.raises(CompositeError) as info:
            mec.execute("import ctypes; ctypes.string_at(0)", targets=0, timeout=10)
        assert "engine 0 was killed by signal SIGSEGV while running 'import ctypes" in str(
            info.value.elist[0]
        )
        wait_for(
            lambda: engine_pid(cluster, 0) != old, 20, "engine 0 to be restarted automatically"
        )
        mec.wait_ready(timeout=20)
        remember(cluster)
        assert mec.get_ids() == [0, 1] and not mec.get_ids().dead
        assert mec.pull("SETUP") == ["done", "done"]  # on_start ran again on the new engine
        assert mec.execute("print(math.pi)", targets=0)[0]["stdout"].startswith("3.14")
        os.kill(engine_pid(cluster, 1), signal.SIGKILL)  # killed while idle: also restarted
        wait_for(lambda: cluster.restarts.get(1), 20, "engine 1 to be restarted")
        mec.wait_ready(1, timeout=20)
        remember(cluster)
        assert mec.pull("SETUP", targets=1) == ["done"]


def test_os_exit_reports_exit_code():
    with (
        small_cluster(1) as (_cluster, mec),
        pytest.raises(
            CompositeError, match=r"engine 0 exited with code 3 while running 'import os; os._exit"
        ),
    ):
        mec.execute("import os; os._exit(3)", timeout=10)


# --------------------------------------------------------------------------- heartbeats
def test_heartbeat_detects_engines_without_a_local_process(tmp_path):
    """A client that cannot poll the engine processes (as for remote engines) relies on
    heartbeats on its own loop: a frozen engine is declared dead within the period, comes back
    when it answers again, and a killed one is declared dead."""
    with small_cluster(2) as (cluster, _owner):
        spec = json.loads(Path(cluster.cluster_file).read_text())
        for e in spec["engines"]:
            e["host"] = "elsewhere"  # no process to poll from here
        spec["host"] = "elsewhere"
        path = tmp_path / "remote.json"
        path.write_text(json.dumps(spec))
        mec = MultiEngineClient(path, heartbeat=1.0)
        try:
            assert [e["watched_by"] for e in mec.engines] == ["heartbeat", "heartbeat"]
            pid = engine_pid(cluster, 1)
            pr = mec.execute(hang_code(tmp_path, "hb"), targets=1, block=False)
            # frozen once in the cell: a kernel ignores SIGINT between requests, and the
            # interrupt below must stop this cell, not be lost before it began
            wait_for(marker(tmp_path, "hb", pid).exists, 20, "engine 1 to run the cell")
            t0 = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(CompositeError, match="engine 1 stopped answering heartbeats"):
                    pr.get_result(timeout=10)
                measured("frozen engine detection (heartbeat period 1 s)", time.monotonic() - t0)
                assert 1 in mec.get_ids().dead
                assert mec.execute("print(2)", targets=0)[0]["stdout"] == "2\n"
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_for(lambda: not mec.get_ids().dead, 10, "engine 1 to answer heartbeats again")
            mec.interrupt(1)  # a non-owning client: an interrupt_request on the control channel
            assert mec.execute("print(3)", targets=1, timeout=10)[0]["stdout"] == "3\n"
            t0 = time.monotonic()
            os.kill(engine_pid(cluster, 0), signal.SIGKILL)
            wait_for(lambda: 0 in mec.get_ids().dead, 5, "engine 0 to be declared dead")
            measured("kill -9 detection (heartbeat period 1 s)", time.monotonic() - t0)
        finally:
            mec.close()


# --------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("call", ["execute", "map", "barrier", "pull", "apply"])
def test_ctrl_c_in_blocking_call(call, tmp_path):
    with small_cluster(2) as (cluster, mec):
        pids = [engine_pid(cluster, e) for e in (0, 1)]
        ctrl_c = CtrlC(lambda: all(marker(tmp_path, call, p).exists() for p in pids))
        t_raised = None
        try:
            if call == "execute":
                mec.execute(hang_code(tmp_path, call))
            elif call == "map":
                mec.map(make_hanger(tmp_path, call), range(2))
            elif call == "apply":
                mec.apply(make_hanger(tmp_path, call))
            elif call == "barrier":
                mec.barrier(
                    [mec.execute(hang_code(tmp_path, call), targets=i, block=False) for i in (0, 1)]
                )
            elif call == "pull":
                mec.execute(slow_pickle_code(tmp_path, call))
                mec.pull("slow")
        except KeyboardInterrupt:
            t_raised = time.monotonic()
        finally:
            ctrl_c.cancel()
        assert t_raised is not None, "KeyboardInterrupt was swallowed"
        latency = t_raised - ctrl_c.sent_at
        measured("Ctrl-C to KeyboardInterrupt", latency)
        assert latency < INTERRUPT_DEADLINE  # stopped by Ctrl-C, not by the 30 s hang
        # the engines were interrupted and are usable at once
        t0 = time.monotonic()
        assert [r["stdout"] for r in mec.execute("print('after')", timeout=10)] == ["after\n"] * 2
        measured("engines usable again after Ctrl-C", time.monotonic() - t0)


def test_ctrl_c_keeps_output_and_result_is_collectable(tmp_path):
    with small_cluster(2) as (cluster, mec):
        pids = [engine_pid(cluster, e) for e in (0, 1)]
        ctrl_c = CtrlC(lambda: all(marker(tmp_path, "k", p).exists() for p in pids))
        pr = mec.execute(hang_code(tmp_path, "k"), block=False)
        try:
            pr.get_result()
        except KeyboardInterrupt:
            pass
        finally:
            ctrl_c.cancel()
        assert ctrl_c.sent_at is not None
        with pytest.raises(CompositeError, match="KeyboardInterrupt") as info:
            pr.get_result(timeout=10)  # the interrupted call's result, collected later
        assert [e.engine_id for e in info.value.elist] == [0, 1]
        assert [r["stdout"] for r in info.value.results] == [
            "before\n"
        ] * 2  # printed before Ctrl-C


def test_frozen_engine_interrupt_restart_and_stop(tmp_path):
    """An engine blocking SIGINT in C code cannot be interrupted: the client's Ctrl-C still
    returns (after its INTERRUPT_ACK wait, not the engine's 60 s), the other engine stays
    usable, restart replaces the frozen engine, and stop() does not hang on a SIGSTOPped
    engine."""
    with small_cluster(2) as (cluster, mec):
        code = hang_code(
            tmp_path,
            "frozen",
            60,
            before="import signal; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}); ",
        )
        ctrl_c = CtrlC(marker(tmp_path, "frozen", engine_pid(cluster, 1)).exists)
        raised = False
        try:
            mec.execute(code, targets=1)
        except KeyboardInterrupt:
            raised = True
            measured(
                "Ctrl-C to KeyboardInterrupt (engine blocks SIGINT)",
                time.monotonic() - ctrl_c.sent_at,
            )
        finally:
            ctrl_c.cancel()
        assert raised and time.monotonic() - ctrl_c.sent_at < INTERRUPT_DEADLINE
        assert mec.execute("print(0)", targets=0, timeout=10)[0]["stdout"] == "0\n"
        with pytest.raises(TimeoutError):
            mec.execute("print(1)", targets=1, timeout=0.5)  # still frozen: timeout, not a hang
        t0 = time.monotonic()
        mec.restart(1, timeout=30)
        measured("restart of a frozen engine", time.monotonic() - t0)
        remember(cluster)
        assert mec.execute("print(1)", targets=1, timeout=10)[0]["stdout"] == "1\n"
        os.kill(engine_pid(cluster, 0), signal.SIGSTOP)  # small_cluster checks stop() is bounded


def test_stop_with_frozen_and_dead_engines_is_bounded():
    with small_cluster(3) as (cluster, mec):
        os.kill(engine_pid(cluster, 0), signal.SIGSTOP)
        os.kill(engine_pid(cluster, 1), signal.SIGKILL)
        pr = mec.execute("import time; time.sleep(30)", targets=2, block=False)
        wait_for(lambda: 1 in mec.get_ids().dead, 5, "engine 1 to be seen dead")
        t0 = time.monotonic()
        mec.close()  # owning client: stops the cluster
        took = time.monotonic() - t0
        measured("close() with a frozen, a dead and a busy engine", took)
        assert took < 3 * cluster.shutdown_wait + 5
        with pytest.raises(CompositeError, match=r"closed|stopped|killed|exited"):
            pr.get_result(timeout=5)


# --------------------------------------------------------------------------- owner killed
OWNER = textwrap.dedent("""
    import json, os, sys
    os.environ["JUPYTER_RUNTIME_DIR"] = sys.argv[1]
    from ipy_multiengine import Cluster
    c = Cluster(n=2, profile="orphans")
    mec = c.start()
    mec.execute("x = 1")
    print(json.dumps([km.provisioner.pid for km in c.managers.values()]), flush=True)
    sys.stdin.read()
""")


def test_owner_sigkill_leaves_no_orphans(tmp_path):
    runtime = tmp_path / "rt"
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(runtime)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2 and not any(gone(p) for p in pids)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        wait_for(
            lambda: all(gone(p) for p in pids), 10, f"engines {pids} to exit after their owner"
        )
        measured("engines gone after owner SIGKILL", time.monotonic() - t0)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids:
            if not gone(p):
                os.kill(p, signal.SIGKILL)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    out = subprocess.run(
        [sys.executable, "-m", "ipy_multiengine.cli", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "stale (removed)" in out
    left = [p.name for p in (runtime / "ipy_multiengine").iterdir()]
    assert left == [], f"files left after `ipmulti list` cleaned a stale cluster: {left}"


# --------------------------------------------------------------------------- forged messages
def test_forged_message_with_wrong_key_is_not_run(tmp_path):
    import zmq
    from jupyter_client.session import Session

    with small_cluster(1, transport_encryption="auto", transport="tcp") as (
        cluster,
        mec,
    ):  # a TCP test
        info = json.loads(Path(cluster.cluster_file).read_text())["engines"][0]["connection"]
        ctx = zmq.Context()

        def send(key: bytes, marker: Path, curve: bool = True) -> None:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            if curve:
                sock.curve_serverkey = info["curve_publickey"].encode()
                sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
            session = Session(key=key, signature_scheme=info["signature_scheme"])
            session.send(
                sock,
                "execute_request",
                {"code": f"open({str(marker)!r}, 'w').close()", "silent": False},
            )
            return sock

        forged, plain, control = tmp_path / "forged", tmp_path / "plain", tmp_path / "control"
        socks = [send(b"not-the-key", forged), send(info["key"].encode(), plain, curve=False)]

        def dropped() -> bool:
            log = cluster.log_file(0).read_text()
            return "Invalid Signature" in log or "Invalid Message" in log

        # each message came on a connection of its own: the engine may read it after later
        # requests of ours, so wait (to a deadline) until its log says it dropped the forged one
        wait_for(dropped, 30, "the engine to log the forged message as dropped")
        socks.append(send(info["key"].encode(), control))  # the same path with the right key works
        wait_for(control.exists, 10, "the correctly signed message to run")
        mec.execute("pass")
        assert not forged.exists(), "a message signed with the wrong key was executed"
        assert not plain.exists(), "an unencrypted connection reached the engine"
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- random faults
def test_200_mixed_operations_with_random_faults():
    rng = random.Random(int(os.environ.get("FAULT_SEED", "5")))
    stats = dict(ops=0, ok=0, failed_reported=0, kills=0, restarts=0, interrupts=0)
    killed: set[int] = set()  # killed and not restarted yet (death maybe not noticed yet)
    with small_cluster(3) as (cluster, mec):
        mec.on_start("BASE = 100")
        base = '__import__("IPython").get_ipython().user_ns["BASE"]'
        for i in range(200):
            ids = [e["id"] for e in mec.engines if e["ready"]]
            if len(ids) < 3:  # restart what died (sometimes all at once, sometimes one)
                dead = [e for e in mec.get_ids() if e not in ids]
                chosen = dead if rng.random() < 0.5 else dead[:1]
                mec.restart(chosen, timeout=30)
                killed.difference_update(chosen)
                remember(cluster)
                stats["restarts"] += 1
                continue
            op = rng.choice(["execute", "push_pull", "map", "apply", "scatter_gather"])
            targets = rng.sample(ids, rng.randint(1, 3))
            victim = rng.choice(targets) if rng.random() < 0.08 else None
            stats["ops"] += 1
            try:
                if op == "execute":
                    pr = mec.execute(f"print({i} + BASE)", targets=targets, block=False)
                    expect = [{"stdout": f"{i + 100}\n"}] * len(targets)
                    got = lambda r: [{"stdout": x["stdout"]} for x in r]  # noqa: E731
                elif op == "push_pull":
                    mec.push({"v": i}, targets=targets, timeout=30)
                    pr = mec.pull("v", targets=targets, block=False)
                    expect, got = [i] * len(targets), list
                elif op == "map":
                    pr = mec.map(
                        eval(f"lambda x: x * 2 + {base}"), range(7), targets=targets, block=False
                    )
                    expect, got = [x * 2 + 100 for x in range(7)], list
                elif op == "apply":
                    pr = mec.apply(eval(f"lambda a: a + {base}"), i, targets=targets, block=False)
                    expect, got = [i + 100] * len(targets), list
                else:
                    mec.scatter("s", list(range(i, i + 9)), targets=targets, timeout=30)
                    pr = mec.gather("s", targets=targets, block=False)
                    expect, got = list(range(i, i + 9)), list
                if victim is not None:
                    if rng.random() < 0.2:
                        mec.interrupt(victim)
                        stats["interrupts"] += 1
                    else:
                        os.kill(engine_pid(cluster, victim), signal.SIGKILL)
                        killed.add(victim)
                        stats["kills"] += 1
                result = pr.get_result(timeout=30)
            except (CompositeError, EngineError) as err:
                # every failure is reported and names only engines that had a fault
                failed = (
                    {e.engine_id for e in err.elist}
                    if isinstance(err, CompositeError)
                    else {err.engine_id}
                )
                allowed = killed | ({victim} if victim is not None else set())
                assert failed and failed <= allowed, (
                    f"op {i} ({op}) on {targets} failed without a fault: {err}"
                )
                if isinstance(err, CompositeError):
                    assert all(isinstance(e, (EngineError, RemoteError)) for e in err.elist)
                stats["failed_reported"] += 1
                continue
            assert got(result) == expect, (
                f"op {i} ({op}) on {targets} returned a wrong result: {result!r}"
            )
            stats["ok"] += 1
        dead = [e for e in mec.get_ids() if not mec.engines[e]["ready"]]
        if dead or killed:
            mec.restart(sorted(set(dead) | killed), timeout=30)
            remember(cluster)
        assert mec.pull("BASE", timeout=10) == [100, 100, 100]  # every engine usable at the end
    faults = stats["kills"] + stats["interrupts"]
    print(
        f"\nFAULTS: {faults} injected ({stats['kills']} kill -9, {stats['interrupts']} "
        "interrupts), "
        f"{faults} survived; {stats['ops']} operations: {stats['ok']} correct, "
        f"{stats['failed_reported']} failed with a reported error, 0 lost or wrong; "
        f"{stats['restarts']} restarts"
    )
    assert stats["ok"] + stats["failed_reported"] == stats["ops"]


# --------------------------------------------------------------------------- daemon clusters
def _ipmulti(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "ipy_multiengine.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_daemon_cluster_restart_from_other_processes():
    """`ipmulti start --daemon` owns the engines; a client connected by its cluster file sees a
    killed engine as dead, `ipmulti restart` and `mec.restart` (both served by the owner) bring
    it back with the same id, the client follows and re-runs its on_start code, and
    `ipmulti stop` leaves no process or file behind."""
    profile = f"daemon{os.getpid()}"
    path = Path(_ipmulti("start", "-n", "2", "--daemon", "--profile", profile).stdout.strip())
    spec = json.loads(path.read_text())
    owner = spec["owner_pid"]
    pids = {e["pid"] for e in spec["engines"]}
    mec = MultiEngineClient(profile=profile)
    try:
        mec.on_start("SETUP = 'yes'")
        os.kill(spec["engines"][0]["pid"], signal.SIGKILL)
        wait_for(lambda: 0 in mec.get_ids().dead, 5, "the client to see engine 0 dead")
        listing = _ipmulti("list").stdout
        assert any(
            line.split()[:4] == [profile, "degraded", "2", "0"] for line in listing.splitlines()
        ), listing
        t0 = time.monotonic()
        assert _ipmulti("restart", "0", "--profile", profile).stdout.startswith(
            "restarted engine 0 (pid "
        )
        wait_for(
            lambda: mec.engines[0]["ready"], 20, "the client to reconnect to the restarted engine 0"
        )
        measured("ipmulti restart, until a connected client follows", time.monotonic() - t0)
        assert mec.pull("SETUP") == ["yes", "yes"]  # on_start re-ran on the new engine
        mec.execute("x = 1")
        t0 = time.monotonic()
        mec.restart(1)  # a non-owning client asks the owner
        measured("mec.restart from a non-owning client", time.monotonic() - t0)
        assert mec.execute("print(SETUP)", targets=1)[0]["stdout"] == "yes\n"
        with pytest.raises(CompositeError, match="NameError"):
            mec.pull("x", targets=1)
        pids |= {e["pid"] for e in json.loads(path.read_text())["engines"]}
        bad = _ipmulti("restart", "7", "--profile", profile, check=False)
        assert bad.returncode == 2 and "unknown engine ids [7]" in bad.stderr
    finally:
        mec.close()
        _ipmulti("stop", "--profile", profile)
    wait_for(lambda: all(gone(p) for p in pids | {owner}), 10, "the daemon and its engines to exit")
    assert not path.exists() and not list(path.parent.glob(f"*{profile}*"))


def test_restart_needs_an_owner_that_serves_requests(cluster, mec):
    """A client of an embedded Cluster (owned by another process, here faked by a copy of the
    file without the 'serves' marker) gets a precise error instead of a hang."""
    c = MultiEngineClient(cluster.cluster_file)
    try:
        with pytest.raises(EngineError, match=r"does not take requests .*ipmulti start"):
            c.restart(0)
        assert c.execute("print(1)", targets=0)[0]["stdout"] == "1\n"  # still usable
    finally:
        c.close()


def test_restart_survives_a_port_taken_by_another_process():
    """Restart reuses the engine's ports; if another process took one meanwhile (the classic
    jupyter port race, also at startup), the engine is started again on new ports."""
    import socket

    with small_cluster(2, transport="tcp") as (cluster, mec):  # ports exist with TCP only
        mec.execute("pass")
        info = cluster.managers[1].get_connection_info()
        os.kill(engine_pid(cluster, 1), signal.SIGKILL)
        wait_for(lambda: 1 in mec.get_ids().dead, 5, "engine 1 to be seen dead")
        thief = socket.socket()
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wait_for(
            lambda: _try_bind(thief, info["shell_port"]),
            10,
            "the dead engine's shell port to be free",
        )
        thief.listen()
        try:
            mec.restart(1, timeout=30)
            remember(cluster)
            assert cluster.managers[1].get_connection_info()["shell_port"] != info["shell_port"]
            assert mec.execute("print(1)", targets=1)[0]["stdout"] == "1\n"
        finally:
            thief.close()


def _try_bind(sock, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def test_print_measurements():
    """Last in the file: a summary of what the tests above measured (run with -s to see it)."""
    for name, values in MEASURED.items():
        print(
            f"[summary] {name}: min {min(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms, "
            f"n={len(values)}"
        )


@pytest.mark.timeout(90)
def test_a_failed_local_interrupt_is_logged_and_the_others_are_interrupted(caplog, tmp_path):
    """One kernel manager's interrupt failing (injected: its interrupt_kernel raises, as for a
    kernel whose process vanished) is logged, and the other engines are interrupted anyway."""
    import logging

    from ipy_multiengine import _loop  # white-box: the launcher API is async, run on the I/O loop

    def busy(eid: int) -> bool:
        return mec.controller.state(eid).busy_since is not None

    with small_cluster(2) as (cluster, mec):
        pr = mec.execute(hang_code(tmp_path, "cell"), block=False)
        # the cell's own marker, not the engines' "busy" (sent before a kernel takes SIGINT)
        pids = [engine_pid(cluster, e) for e in (0, 1)]
        wait_for(
            lambda: all(marker(tmp_path, "cell", p).exists() for p in pids),
            20,
            "both engines to run the cell",
        )
        wait_for(lambda: busy(0) and busy(1), 20, "both engines seen busy")
        km0 = cluster.launcher.managers[0]

        async def broken() -> None:
            raise RuntimeError("no such kernel process")

        km0.interrupt_kernel = broken  # white-box injection of the failure
        with caplog.at_level(logging.WARNING, logger="ipy_multiengine"):
            _loop.run(cluster.launcher.interrupt([0, 1]), timeout=10)
        assert "could not interrupt engine 0: RuntimeError: no such kernel process" in caplog.text
        wait_for(lambda: not busy(1), 10, "engine 1 to be interrupted")
        assert busy(0)  # its interrupt failed: still in the cell
        del km0.interrupt_kernel
        mec.interrupt(targets=0)
        with pytest.raises(CompositeError, match="KeyboardInterrupt"):
            pr.get_result(timeout=10)


@pytest.mark.timeout(90)
def test_an_engine_that_dies_mid_execute_keeps_what_it_printed():
    """An engine killed while it runs a cell: what it printed before (the last words of a
    crash) had arrived, but the EngineError carried none of it, so it was lost for
    ``get_result``, ``CompositeError.results`` and ``PendingResult.stdout``. Now the error's
    ``result`` is the cell's result record with that output; the other engine's is intact."""
    import threading

    with small_cluster(2) as (cluster, mec):
        said = threading.Event()

        def listener(eid, mtype, content):
            if eid == 0 and mtype == "stream" and "last words" in content.get("text", ""):
                said.set()

        code = (
            "print('last words', flush=True)\nif engine_id == 0:\n    import time; time.sleep(60)\n"
        )
        pr = mec.execute(code, block=False, listener=listener)
        assert said.wait(30), "engine 0's output did not arrive"
        os.kill(engine_pid(cluster, 0), signal.SIGKILL)
        with pytest.raises(CompositeError) as info:
            pr.get_result(timeout=30)
        [err] = info.value.elist
        assert isinstance(err, EngineError) and "killed" in str(err), repr(err)
        assert err.engine_id == 0 and err.result["stdout"] == "last words\n", err.result
        assert err.result["input"]["raw"] == code and err.result["id"] == 0
        assert [r["stdout"] for r in info.value.results] == ["last words\n"] * 2
        assert pr.stdout == ["last words\n"] * 2
        again = pickle.loads(pickle.dumps(err))
        assert again.result == err.result and again.engine_id == 0
        mec.restart(0, timeout=60)
        assert mec.apply(lambda: 1) == [1, 1]
