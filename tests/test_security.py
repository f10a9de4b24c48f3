"""Security defaults: loopback only, a fresh HMAC key per cluster, private files, and CurveZMQ
transport encryption where the kernelspec declares it (the forged-message test is in
test_faults.py)."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import zmq
from faultlib import small_cluster
from jupyter_client.session import Session

from ipy_multiengine import Cluster, MultiEngineClient
from ipy_multiengine.cluster import cluster_dir

pytestmark = pytest.mark.timeout(60)


def _spec(cluster) -> dict:
    return json.loads(Path(cluster.cluster_file).read_text())


def test_engines_listen_on_no_network_port(cluster, mec):
    # changed on purpose by issue 11.16: local engines use unix sockets inside the 0700 runtime
    # dir (no other user can connect), not loopback TCP; with transport='tcp', loopback only
    for e in _spec(cluster)["engines"]:
        assert e["connection"]["transport"] == "ipc" and e["connection"]["ip"].startswith(
            str(cluster_dir())
        )
        listening = [
            c
            for c in psutil.Process(e["pid"]).net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        ]
        # at most ipykernel's own IOPub fork pipe (a loopback PULL that drops every message
        # without its random uuid): nothing readable, no channel of the engine
        assert len(listening) <= 1 and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
    with small_cluster(1, transport="tcp") as (c, _):
        for e in _spec(c)["engines"]:
            assert e["connection"]["ip"] == "127.0.0.1"
            listening = [
                c.laddr.ip
                for c in psutil.Process(e["pid"]).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN
            ]
            assert len(listening) >= 5 and set(listening) == {"127.0.0.1"}, listening


def test_fresh_key_per_cluster(cluster, mec):
    key = _spec(cluster)["engines"][0]["connection"]["key"]
    assert len(key) == 64 and all(e["connection"]["key"] == key for e in _spec(cluster)["engines"])
    assert _spec(cluster)["engines"][0]["connection"]["signature_scheme"] == "hmac-sha256"
    with small_cluster(1) as (other, _):
        assert _spec(other)["engines"][0]["connection"]["key"] != key


def test_private_files(cluster, mec):
    d = cluster_dir()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = list(d.rglob("*"))
    assert any(f.name.startswith("cluster-") for f in files) and any(
        f.suffix == ".log" for f in files
    )
    for f in files:
        if stat.S_ISSOCK(f.stat().st_mode):
            continue  # the engines' unix sockets: the kernel's umask, behind the 0700 directory
        want = 0o700 if f.is_dir() else 0o600  # (a sticky bit on a directory is fine)
        assert stat.S_IMODE(f.stat().st_mode) & 0o777 == want, f"{f} is {oct(f.stat().st_mode)}"
    for e in _spec(cluster)["engines"]:  # the kernels' own connection files hold the keys
        assert stat.S_IMODE(os.stat(e["connection_file"]).st_mode) == 0o600


def test_loopback_engines_are_not_encrypted_by_default(cluster, mec):
    """CurveZMQ copies every message per engine: the default leaves loopback-only engines plain."""
    assert not any(e["encrypted"] for e in mec.engines)
    assert all("curve_publickey" not in e["connection"] for e in _spec(cluster)["engines"])


def test_transport_encryption_auto():
    with small_cluster(1, transport_encryption="auto", transport="tcp") as (c, mec):
        assert [e["encrypted"] for e in mec.engines] == [True]
        e = _spec(c)["engines"][0]
        # clients get the public key only; the secret stays in the kernel's own connection file
        assert (
            len(e["connection"]["curve_publickey"]) == 40
            and "curve_secretkey" not in e["connection"]
        )
        assert "curve_secretkey" in json.loads(Path(e["connection_file"]).read_text())
        assert mec.execute("print(1)")[0]["stdout"] == "1\n"
        info = e["connection"]
        ctx = zmq.Context()
        try:

            def kernel_info(curve: bool) -> bool:
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                if curve:
                    sock.curve_serverkey = info["curve_publickey"].encode()
                    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
                sock.connect(f"tcp://127.0.0.1:{info['shell_port']}")
                Session(key=info["key"].encode()).send(sock, "kernel_info_request", {})
                answered = bool(sock.poll(1500 if not curve else 10000))
                sock.close()
                return answered

            assert kernel_info(curve=True)  # the right key and the server's public key: answered
            assert not kernel_info(curve=False)  # plaintext ZMQ, even with the HMAC key: no answer
        finally:
            ctx.destroy(linger=0)  # term() would block forever on a socket a timeout left open


def test_encryption_policy_default():
    # the policy moved from Cluster._encryption_policy to the launchers' one public function
    from ipy_multiengine.launchers.base import encryption_policy

    assert encryption_policy(None, "127.0.0.1") == "disabled"
    assert encryption_policy(None, "10.1.2.3") == "auto"
    assert encryption_policy("required", "127.0.0.1") == "required"
    with pytest.raises(ValueError, match="transport_encryption"):
        encryption_policy("sometimes", "127.0.0.1")


#: runs as root, imports zmq, then becomes ``nobody`` and counts the IOPub messages it can read
_SNOOP = r"""
import os, sys, time, zmq
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
os.setgroups([]); os.setgid(65534); os.setuid(65534)
assert os.getuid() == 65534
sub.connect(sys.argv[1])
print("ready", flush=True)
n, deadline = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    if sub.poll(100):
        sub.recv_multipart()
        n += 1
print(n, flush=True)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["default", "tcp"])
def test_h16_another_user_cannot_read_an_engines_output(transport):
    """Local engines use unix sockets in the 0700 runtime dir by default: ``nobody`` cannot
    subscribe to IOPub. (With transport='tcp', the old default, it reads every message.)"""
    import subprocess
    import sys

    from ipy_multiengine.launchers.base import endpoint

    if os.geteuid() != 0:
        pytest.skip("needs root to become another user (nobody)")
    kw = {} if transport == "default" else {"transport": "tcp"}
    with small_cluster(1, **kw) as (c, mec):
        info = c.engines_info[0]
        assert info["transport"] == ("ipc" if transport == "default" else "tcp")
        snoop = subprocess.Popen(
            [sys.executable, "-c", _SNOOP, endpoint(info, "iopub_port"), "4"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert snoop.stdout.readline().strip() == "ready"
            pr = mec.execute(
                "import time\nfor i in range(30):\n    print(i, flush=True); time.sleep(0.1)",
                block=False,
            )
            assert pr.get_result(timeout=30)[0]["stdout"].split() == [str(i) for i in range(30)]
            seen = int(snoop.stdout.readline())
        finally:
            snoop.kill()
            snoop.wait()
        if transport == "default":
            assert seen == 0, f"another user read {seen} IOPub messages"
        else:
            assert seen > 0  # the hole the unix sockets close


def test_a_socket_path_too_long_for_the_runtime_dir_stays_on_private_unix_sockets():
    """A long profile name (or a deep JUPYTER_RUNTIME_DIR) made the unix socket paths too long:
    the engines then fell back, silently, to plain loopback TCP, whose IOPub any local user can
    read. They now keep unix sockets, in a private 0700 directory of their own, removed at stop."""
    c = Cluster(n=1, profile="p" * 80, shutdown_wait=1.0)
    c.start()
    try:
        conn = _spec(c)["engines"][0]["connection"]
        assert conn["transport"] == "ipc", conn
        sock_dir = Path(conn["ip"]).parent
        assert sock_dir != cluster_dir() and len(os.fsencode(conn["ip"])) + 8 <= 107
        assert (
            stat.S_IMODE(sock_dir.stat().st_mode) == 0o700 and sock_dir.stat().st_uid == os.getuid()
        )
        pid = _spec(c)["engines"][0]["pid"]
        listening = [
            x for x in psutil.Process(pid).net_connections("inet") if x.status == psutil.CONN_LISTEN
        ]
        assert len(listening) <= 1, listening  # at most ipykernel's own IOPub fork pipe
        assert c.client.execute("a = 6 * 7", block=True) and c.client.pull("a") == [42]
    finally:
        c.stop()
    assert not sock_dir.exists()


def test_control_requests_of_the_launchers_reach_encrypted_engines():
    """The launchers' own control requests (interrupt, and shutdown: how MPI, Slurm and remote
    engines are stopped so that they exit normally) were sent in plaintext: an encrypted engine
    never saw them, so each stop waited out its timeouts (10 s for the MPI launcher) and then
    killed the ranks. Sent with CurveZMQ now, they are answered."""
    from ipy_multiengine import _loop
    from ipy_multiengine.launchers.base import interrupt_via_control, shutdown_via_control

    with small_cluster(1, transport_encryption="auto", transport="tcp") as (c, mec):
        info = _spec(c)["engines"][0]["connection"]
        assert "curve_publickey" in info
        assert _loop.run(interrupt_via_control(info, timeout=10), timeout=30)
        assert mec.execute("print(2)")[0]["stdout"] == "2\n"
        assert _loop.run(shutdown_via_control(info, timeout=10), timeout=30)


class _Listener:
    """A TCP port where an engine's ports would be: it counts the connections made to it, so a
    test can tell that a client refused to talk before anything was sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def conn(self, key: str) -> dict:
        """A connection info whose every port is this listener's."""
        ports = dict.fromkeys(("shell_port", "iopub_port", "stdin_port", "control_port"), self.port)
        return {**ports, "hb_port": self.port, "ip": "127.0.0.1", "transport": "tcp", "key": key}

    def connected(self, wait: float = 0.5) -> bool:
        """Whether anyone connected (within ``wait`` s: ZMQ connects on its own I/O thread)."""
        self.sock.settimeout(wait)
        try:
            self.sock.accept()[0].close()
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener():
    lst = _Listener()
    yield lst
    lst.close()


def test_a_cluster_file_engine_without_a_key_is_refused_before_anything_is_sent(
    cluster, listener, tmp_path
):
    """A Jupyter session with an empty key signs nothing: an engine listed with ``"key": ""``
    would run whatever anyone reaching its ports sends. The client refuses the file, naming the
    engine and the file, and sends nothing to any of its engines."""
    spec = _spec(cluster)  # a live owner (this process): the file is not stale
    spec["engines"] = [
        {**spec["engines"][0], "id": 0, "connection": listener.conn("a" * 64)},
        {**spec["engines"][1], "id": 1, "connection": listener.conn("")},
    ]
    path = tmp_path / "cluster-nokey.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError) as err:
        MultiEngineClient(str(path), timeout=5)
    text = str(err.value)
    assert f"engine 1 (cluster file {path}) has no key" in text, text
    assert "signs nothing" in text and "nothing was sent" in text, text
    assert not listener.connected(), "the client connected to an engine of that file"


def test_a_connection_file_without_a_key_is_refused_by_attach_and_ipmulti(listener, tmp_path):
    """``MultiEngineClient.attach`` and ``ipmulti attach`` (which writes a cluster file from
    connection files) refuse a connection file with an empty key, naming it, and connect to
    nothing; so does a Controller given such connection info directly."""
    import subprocess
    import sys

    from ipy_multiengine.clusterfile import cluster_file_path
    from ipy_multiengine.controller import Controller

    good, bad = tmp_path / "kernel-good.json", tmp_path / "kernel-nokey.json"
    good.write_text(json.dumps(listener.conn("k" * 64)))
    bad.write_text(json.dumps({**listener.conn(""), "signature_scheme": "hmac-sha256"}))
    with pytest.raises(ValueError) as err:
        MultiEngineClient.attach([good, bad], timeout=5)
    assert f"engine 1 (connection file {bad}) has no key" in str(err.value), str(err.value)
    out = subprocess.run(
        [sys.executable, "-m", "ipy_multiengine.cli", "attach", "--profile", "nokey", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert f"engine 0 (connection file {bad}) has no key" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not cluster_file_path("nokey").exists()
    with pytest.raises(ValueError, match=r"engine 3 \(the connection info given to this client"):
        Controller({3: listener.conn("")}, timeout=5).connect()
    assert not listener.connected(), "a client connected to an engine without a key"


def test_every_launcher_makes_a_fresh_key():
    """The local launcher and the connection files the MPI, Slurm and SSH launchers pre-write
    for their engines always hold a fresh 256-bit key."""
    from ipy_multiengine.launchers.base import new_connection_info, write_engine_files
    from ipy_multiengine.launchers.local import LocalLauncher

    keys = [LocalLauncher(n=1).key, LocalLauncher(n=1).key, new_connection_info()["key"]]
    with tempfile.TemporaryDirectory() as work:
        for f in write_engine_files(work, 2):
            keys.append(json.loads(Path(f).read_text())["key"])
    assert all(isinstance(k, str) and len(k) == 64 for k in keys), keys
    assert len(set(keys)) == len(keys), "a key was reused"


def test_any_mapping_of_connection_info_is_accepted_and_a_secret_is_never_echoed(mec):
    """The key check reads any mapping (the client's own ``state(eid).connection`` is a
    read-only one, which it refused as 'no key'); a key of the wrong type is named by its type,
    never printed."""
    from types import MappingProxyType

    from ipy_multiengine.controller import Controller

    info = mec.controller.state(0).connection
    assert isinstance(info, MappingProxyType)
    other = MultiEngineClient.from_controller(Controller({0: info}, timeout=30).connect())
    try:
        assert other.apply(lambda: 6 * 7) == [42]
    finally:
        other.close()
    with pytest.raises(ValueError) as err:
        Controller({0: {**info, "key": 918273645}}, timeout=5).connect()
    assert "a int" in str(err.value) and "918273645" not in str(err.value)
    with pytest.raises(ValueError, match=r"engine 0 .*not a mapping"):
        Controller({0: [("key", "x" * 64)]}, timeout=5).connect()


def test_the_client_s_socket_identity_is_not_its_session_id(mec):
    """Every IOPub subscriber reads the client's session id in message headers; had its
    DEALER sockets used it as their identity, anyone could take it over on an engine's ROUTER
    by connecting with it first. An input() on the fast path still finds the client."""
    conn = mec.controller._conn(0)  # white-box, read only
    identities = {
        ch: s.getsockopt(zmq.IDENTITY)
        for ch, s in conn.sockets.items()
        if s.getsockopt(zmq.TYPE) == zmq.DEALER
    }
    assert {"shell", "stdin", "control", "fast"} <= set(identities), identities
    assert len(set(identities.values())) == 1  # the engine routes input requests by it
    assert conn.session.bsession not in identities.values()
    assert mec.controller._conn(1).identity != conn.identity


def _refused_on_fast(mec) -> int:
    """How many messages engine 0's fast socket has refused unread (white-box, read only)."""

    def count():
        from ipy_multiengine import engine

        return sum(seen[0] for seen in engine._server[0].unchecked.values())

    return mec.apply(count, targets=0)[0]


def test_messages_refused_on_the_fast_socket_put_no_text_of_theirs_in_the_users_output():
    """Anyone reaching a TCP engine's fast port (no key needed) sent garbage whose refusal was
    logged with the sender's own bytes on the kernel's stderr, which reaches the client as the
    output of whatever request is the engine's parent then: text of their choice on the user's
    screen. Refusals are told in our words only, and warned about at most once a minute. What
    the engine logs (to its stderr) is recorded on the engine itself: what reaches the screen
    depends on the flush timer."""
    record = (
        "import logging\n"
        "_ime_err = []\n"
        "class _Keep(logging.Handler):\n"
        "    def emit(self, record, _err=_ime_err):\n"
        "        _err.append(record.getMessage())\n"
        "logging.getLogger('ipy_multiengine').addHandler(_Keep())\n"
    )
    with small_cluster(1, transport="tcp") as (_c, mec):
        url = mec.controller._conn(0).url("fast")  # white-box, read only
        mec.execute(record)
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        try:
            s.connect(url)
            for i in range(200):
                s.send_multipart(
                    [b"<IDS|MSG>", b"RUN pip install evil %d" % i, b"{}", b"{}", b"{}", b"{}"]
                )
            # the garbage's connection is its own: a request of ours may be read before it,
            # so wait (to a deadline) until the engine has counted all 200 as refused
            deadline = time.monotonic() + 30
            while _refused_on_fast(mec) < 200:
                assert time.monotonic() < deadline, _refused_on_fast(mec)
        finally:
            s.close()
            ctx.term()
        written = "\n".join(mec.pull("_ime_err")[0])
    assert "evil" not in written, written[:500]
    assert written.count("refused") == 1, written[:500]
