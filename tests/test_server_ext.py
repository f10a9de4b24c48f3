"""The Jupyter server extension's REST API against real clusters, through jupyter_server's own
pytest plugin (a real ServerApp on the test's loop, ``jp_fetch`` with the server's token).

The session's ``cluster`` fixture (profile 'tests', owned by this process) is listed and
interrupted; restart and stop need an owner that takes requests, so one test starts a
1-engine cluster through the API (``ipmulti start --daemon``) and restarts and stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import tornado.httpclient

pytest_plugins = ["pytest_jupyter.jupyter_server"]

pytestmark = pytest.mark.timeout(90)

RUNTIME = os.environ["JUPYTER_RUNTIME_DIR"]  # conftest's private runtime dir


@pytest.fixture
def jp_runtime_dir():
    """The server's runtime dir is the session's, where its clusters' files are."""
    return RUNTIME


@pytest.fixture
def jp_server_config():
    return {
        "ServerApp": {"jpserver_extensions": {"ipy_multiengine.server": True}},
        "MultiEngineExtension": {"scan_interval": 0.2},
    }


async def api(jp_fetch, *path, method="GET", body=None, **kw):
    r = await jp_fetch(
        "ipy_multiengine",
        "api",
        *path,
        method=method,
        body=None if body is None and method == "GET" else json.dumps(body or {}),
        **kw,
    )
    return json.loads(r.body)


async def until(jp_fetch, pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        snap = await api(jp_fetch, "clusters")
        found = pred(snap)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s; last snapshot: {snap}")
        await asyncio.sleep(0.1)


def cluster_of(snap, key):
    return next((c for c in snap["clusters"] if c["id"] == key), None)


async def test_lists_the_session_cluster_and_its_engines(jp_fetch, mec, cluster):
    mec.execute("import time", block=True)
    key = "cluster-tests"

    def idle_engines(snap):
        c = cluster_of(snap, key)
        return c if c and [e["state"] for e in c["engines"]] == ["idle"] * 4 else None

    c = await until(jp_fetch, idle_engines, 10, "the 4 engines of cluster-tests listed idle")
    assert c["shared"] and c["profile"] == "tests" and c["state"] == "running"
    assert [e["id"] for e in c["engines"]] == mec.get_ids()
    e0 = c["engines"][0]
    assert e0["local"] and e0["rss"] > 1_000_000 and e0["pid"] == mec.engine_meta()[0]["pid"]
    assert "interrupt" in c["can"] and "restart" not in c["can"]  # its owner takes no requests


async def test_busy_engine_shows_code_and_interrupt_stops_it_within_2s(jp_fetch, mec):
    key = "cluster-tests"
    await until(jp_fetch, lambda s: cluster_of(s, key), 10, "cluster-tests listed")
    pr = mec.execute("import time; time.sleep(60)", targets=[1], block=False)

    def busy(snap):
        e = cluster_of(snap, key)["engines"][1]
        return e if e["state"] == "busy" and "time.sleep(60)" in e["running"] else None

    e = await until(jp_fetch, busy, 10, "engine 1 busy with time.sleep(60)")
    assert e["busy_since"] <= time.time()
    t0 = time.monotonic()
    r = await api(jp_fetch, "clusters", key, "interrupt", method="POST", body={"ids": [1]})
    assert r == {"interrupted": [1]}
    with pytest.raises(Exception) as info:
        await asyncio.to_thread(pr.get_result, timeout=5)
    took = time.monotonic() - t0
    assert "KeyboardInterrupt" in str(info.value), info.value
    assert took < 2.0, f"the interrupt took {took:.2f} s"
    await until(
        jp_fetch,
        lambda s: cluster_of(s, key)["engines"][1]["state"] == "idle",
        5,
        "engine 1 idle after the interrupt",
    )


async def test_refuses_requests_without_the_token(jp_fetch, jp_base_url, http_server_client):
    for method, path, body in [
        ("GET", "clusters", None),
        ("POST", "clusters/cluster-tests/interrupt", "{}"),
        ("POST", "clusters", '{"n": 1, "profile": "nope"}'),
    ]:
        with pytest.raises(tornado.httpclient.HTTPClientError) as info:
            await http_server_client.fetch(
                f"{jp_base_url}ipy_multiengine/api/{path}", method=method, body=body
            )
        assert info.value.code in (401, 403), (method, path, info.value.code)
    assert not os.path.exists(os.path.join(RUNTIME, "ipy_multiengine", "cluster-nope.json"))


async def test_bad_requests_name_what_is_wrong(jp_fetch):
    cases = [
        ({"n": 0, "profile": "x"}, "'n' must be an integer"),
        ({"n": 1, "profile": "../x"}, "'profile'"),
        ({"n": 1, "profile": "x", "kernel": "nosuchkernel"}, "no kernelspec 'nosuchkernel'"),
        ({"n": 1, "profile": "x", "launcher": "nope"}, "no launcher 'nope'"),
        ({"n": 1, "profile": "tests"}, "has a cluster already"),
        ({"m": 1}, "unknown field"),
    ]
    for body, words in cases:
        with pytest.raises(tornado.httpclient.HTTPClientError) as info:
            await api(jp_fetch, "clusters", method="POST", body=body)
        assert words in info.value.response.body.decode(), (body, info.value.response.body)
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await api(
            jp_fetch, "clusters", "cluster-tests", "interrupt", method="POST", body={"ids": [9]}
        )
    assert b"has no engine [9]" in info.value.response.body
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await api(jp_fetch, "clusters", "cluster-tests", "restart", method="POST", body={})
    assert info.value.code == 409 and b"does not take requests" in info.value.response.body


async def test_start_restart_keeps_the_id_and_stop(jp_fetch):
    profile = f"lab{os.getpid()}"
    key = f"cluster-{profile}"
    r = await api(jp_fetch, "clusters", method="POST", body={"n": 1, "profile": profile})
    assert r["id"] == key
    try:
        c = await until(
            jp_fetch,
            lambda s: (c := cluster_of(s, key)) and c["engines"][0]["state"] == "idle" and c,
            15,
            "the new cluster's engine idle",
        )
        assert c["can"] == ["interrupt", "console", "restart", "stop"]
        old_pid = c["engines"][0]["pid"]
        r = await api(jp_fetch, "clusters", key, "restart", method="POST", body={"ids": [0]})
        assert r["restarted"] == [0]
        e = await until(
            jp_fetch,
            lambda s: (
                (e := cluster_of(s, key)["engines"][0])["state"] == "idle"
                and e["pid"] != old_pid
                and e
            ),
            15,
            "engine 0 restarted (new pid) and idle",
        )
        assert e["id"] == 0
    finally:
        r = await api(jp_fetch, "clusters", key, "stop", method="POST", body={})
    assert r == {"stopped": key}
    await until(jp_fetch, lambda s: cluster_of(s, key) is None, 15, "the stopped cluster gone")
