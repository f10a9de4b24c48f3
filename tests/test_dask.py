"""``mec.become_dask()`` / ``mec.stop_dask()`` with real dask.distributed on the session's
engines: dask tasks run in the engine processes, every connection needs the cluster's TLS
certificate, and stopping leaves the engines' namespaces as they were."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import cloudpickle
import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(120)

# this module's helpers travel by value: the engines cannot import the tests
cloudpickle.register_pickle_by_value(sys.modules[__name__])


#: the workers' scratch directories, seen while the dask cluster runs
SCRATCH: list[str] = []


def user_names():
    """Runs on an engine: the user namespace's public names."""
    return sorted(k for k in get_ipython().user_ns if not k.startswith("_"))  # noqa: F821


@pytest.fixture(scope="module")
def dask_client(cluster):
    """One dask cluster on the four session engines for the whole module (start-up is the
    expensive part); stopped at the end if a test did not stop it."""
    mec = cluster.client
    mec.execute("%reset -f", block=True)
    before = mec.apply(user_names)
    client = mec.become_dask()
    yield mec, client, before
    with contextlib.suppress(RuntimeError):  # unless the last test stopped it
        mec.stop_dask()


def test_dask_array_tasks_run_in_the_engines(dask_client):
    mec, client, _ = dask_client
    engine_pids = set(mec.apply(os.getpid))
    assert sorted(client.run(os.getpid).values()) == sorted(engine_pids)
    x = da.arange(4000, chunks=250)
    assert int((x * 2).sum().compute()) == 2 * sum(range(4000))
    ran = x.map_blocks(lambda b: np.full_like(b, os.getpid())).compute()
    assert set(ran.tolist()) <= engine_pids and os.getpid() not in set(ran.tolist())
    assert len(set(ran.tolist())) > 1  # spread over several engines


def test_only_tls_with_the_cluster_certificate_on_loopback(dask_client):
    _, client, _ = dask_client
    address = client.scheduler.address
    assert address.startswith("tls://127.0.0.1:")
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 4 and all(w.startswith("tls://127.0.0.1:") for w in workers)
    assert sorted(w["name"] for w in workers.values()) == [f"engine-{e}" for e in range(4)]
    # spilled data goes to a private directory of each worker (removed by stop_dask)
    scratch = client.run(lambda dask_worker: dask_worker.local_directory)
    for path in scratch.values():
        private = [p for p in Path(path).parents if p.name.startswith("ipme-dask-")]
        assert private and private[0].stat().st_mode & 0o077 == 0, path  # under a 0700 dir
    SCRATCH.extend(scratch.values())
    # another local user without the certificate: plain TCP, or TLS with a certificate of
    # their own, is refused
    with pytest.raises((OSError, TimeoutError)):
        distributed.Client(address.replace("tls://", "tcp://"), timeout=3)
    from distributed.security import Security

    with pytest.raises((OSError, TimeoutError)):
        distributed.Client(address, security=Security.temporary(), timeout=3)


def test_become_dask_twice_and_bad_input(dask_client):
    mec, _, _ = dask_client
    with pytest.raises(RuntimeError, match="already runs a dask cluster"):
        mec.become_dask()
    with pytest.raises(ValueError, match="nthreads"):
        mec.become_dask(nthreads=0)
    with pytest.raises(TypeError, match="security"):
        mec.become_dask(security=None)


def test_stop_dask_leaves_the_engines_as_they_were(dask_client):
    mec, client, before = dask_client
    mec.stop_dask()
    assert client.status == "closed"
    assert mec.apply(user_names) == before  # no names added by the bridge
    threads = mec.apply(lambda: [t.name for t in __import__("threading").enumerate()])
    assert not any("dask" in name.lower() for names in threads for name in names), threads
    assert SCRATCH and not any(os.path.exists(p) for p in SCRATCH)  # removed
    mec["z"] = 5
    assert mec.pull("z") == [5] * 4  # still usable
    with pytest.raises(RuntimeError, match="no dask cluster"):
        mec.stop_dask()
    mec.execute("%reset -f")


def test_closing_the_client_stops_its_dask_cluster():
    # mec.close() without stop_dask(): the scheduler must not keep listening in this process
    from faultlib import small_cluster

    with small_cluster(1) as (_cluster, mec):
        client = mec.become_dask()
        cluster = client.cluster
        assert int(da.arange(10, chunks=5).sum().compute()) == 45
        mec.close()
        assert client.status == "closed"
        assert cluster.status.name == "closed", cluster.status
        with pytest.raises(RuntimeError, match="no dask cluster"):
            mec.stop_dask()


def test_become_dask_keeps_its_timeout_with_a_busy_engine(tmp_path):
    # an engine busy in a cell cannot start its worker: the timeout bounds the whole call
    # (it was the timeout + 5 s for the start, then as long again for stopping the workers)
    import time

    from faultlib import small_cluster

    release = tmp_path / "go"
    with small_cluster(2) as (_cluster, mec):
        busy = mec.execute(
            f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.01)",
            targets=1,
            block=False,
        )
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            mec.become_dask(timeout=3)
        elapsed = time.monotonic() - t0
        release.touch()
        busy.get_result(timeout=20)
        assert elapsed < 7, elapsed
        # the engines as they were: no worker left behind, and dask starts again
        threads = mec.apply(lambda: [t.name for t in __import__("threading").enumerate()])
        dask_threads = [[n for n in names if "dask" in n.lower()] for names in threads]
        assert dask_threads == [[], []], dask_threads
        client = mec.become_dask(timeout=60)
        assert int(da.arange(10, chunks=5).sum().compute()) == 45
        mec.stop_dask()
        assert client.status == "closed"
