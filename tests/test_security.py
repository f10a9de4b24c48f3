"""Security defaults: loopback only, a fresh HMAC key per cluster, private files, and CurveZMQ
transport encryption where the kernelspec declares it (the forged-message test is in
test_faults.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import psutil
import pytest
import zmq
from jupyter_client.session import Session

from ipy_multiengine.cluster import cluster_dir

from faultlib import small_cluster

pytestmark = pytest.mark.timeout(60)


def _spec(cluster) -> dict:
    return json.loads(Path(cluster.cluster_file).read_text())


def test_engines_listen_on_loopback_only(cluster, mec):
    for e in _spec(cluster)["engines"]:
        assert e["connection"]["ip"] == "127.0.0.1"
        listening = [c.laddr.ip for c in psutil.Process(e["pid"]).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]
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
    assert any(f.name.startswith("cluster-") for f in files) and any(f.suffix == ".log" for f in files)
    for f in files:
        want = 0o700 if f.is_dir() else 0o600  # (a sticky bit on a directory is fine)
        assert stat.S_IMODE(f.stat().st_mode) & 0o777 == want, f"{f} is {oct(f.stat().st_mode)}"
    for e in _spec(cluster)["engines"]:  # the kernels' own connection files hold the keys
        assert stat.S_IMODE(os.stat(e["connection_file"]).st_mode) == 0o600


def test_loopback_engines_are_not_encrypted_by_default(cluster, mec):
    """CurveZMQ copies every message per engine: the default leaves loopback-only engines plain."""
    assert not any(e["encrypted"] for e in mec.engines)
    assert all("curve_publickey" not in e["connection"] for e in _spec(cluster)["engines"])


def test_transport_encryption_auto():
    with small_cluster(1, transport_encryption="auto") as (c, mec):
        assert [e["encrypted"] for e in mec.engines] == [True]
        e = _spec(c)["engines"][0]
        # clients get the public key only; the secret stays in the kernel's own connection file
        assert len(e["connection"]["curve_publickey"]) == 40 and "curve_secretkey" not in e["connection"]
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
            ctx.term()


def test_encryption_policy_default():
    # the policy moved from Cluster._encryption_policy to the launchers' one public function
    from ipy_multiengine.launchers.base import encryption_policy

    assert encryption_policy(None, "127.0.0.1") == "disabled"
    assert encryption_policy(None, "10.1.2.3") == "auto"
    assert encryption_policy("required", "127.0.0.1") == "required"
    with pytest.raises(ValueError, match="transport_encryption"):
        encryption_policy("sometimes", "127.0.0.1")
