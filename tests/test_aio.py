"""``await pr`` (an awaitable ``PendingResult``) in ``asyncio.run`` and in a notebook cell with
top-level await (ipykernel's own loop, through nbclient), with real engines: the caller's loop
keeps running while it waits, errors raise as ``CompositeError``, a cancelled await leaves the
request collectable and the controller intact."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from ipy_multiengine.errors import CompositeError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def mec(cluster):
    """The session's client, reset once for this module (these tests need no clean namespace
    per test: the per-test reset of conftest's ``mec`` would cost more than the tests)."""
    client = cluster.client
    client.block, client.targets = True, "all"
    client.execute("%reset -f", block=True)
    return client


async def ticking_while(awaitable, period: float = 0.01):
    """Await ``awaitable`` while another coroutine ticks every ``period``; (result, ticks)."""
    ticks = 0
    stop = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(period)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        return await awaitable, ticks
    finally:
        stop.set()
        await task


def test_await_execute_does_not_block_the_loop(mec):
    async def main():
        pr = mec.execute("import time; time.sleep(0.5); x = 3", block=False)
        return await ticking_while(pr)

    t0 = time.monotonic()
    result, ticks = asyncio.run(main())
    took = time.monotonic() - t0
    assert [r["id"] for r in result] == mec.get_ids()
    assert "time.sleep(0.5)" in result[0]["input"]["raw"]
    # a blocked loop ticks at most once; a free one about took/0.01 times
    assert ticks >= 0.5 * took / 0.01 / 4, (ticks, took)
    assert mec.pull("x") == [3] * 4


def test_await_data_calls_and_gather(mec):
    async def main():
        return await asyncio.gather(
            mec.apply(lambda a: a + 1, 1, block=False),
            mec.map(lambda v: v * 2, range(8), block=False),
            mec.map(lambda v: -v, range(5), block=False, balanced=True),
        )

    assert asyncio.run(main()) == [[2] * 4, [v * 2 for v in range(8)], [-v for v in range(5)]]


def test_errors_raise_as_composite_error_on_await(mec):
    async def main():
        await mec.execute("1/0", targets=[0, 2], block=False)

    with pytest.raises(CompositeError) as info:
        asyncio.run(main())
    assert [e.engine_id for e in info.value.elist] == [0, 2]
    assert "ZeroDivisionError" in str(info.value)


def test_cancelled_await_leaves_the_request_collectable(mec, caplog):
    pr = mec.execute("import time; time.sleep(0.6); y = 5", block=False)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pr, 0.05)  # cancels the awaiting task

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())  # the loop is closed before the request finishes
        result = pr.get_result(timeout=20)  # still collectable, from a plain thread
    assert [r["id"] for r in result] == mec.get_ids()
    assert mec.pull("y") == [5] * 4
    assert not [r for r in caplog.records if "callback" in r.getMessage()], caplog.text


def test_await_in_a_notebook_cell_keeps_the_kernel_loop_running(cluster):
    from test_notebooks import execute, make_nb, texts

    nb = make_nb(
        [
            "from ipy_multiengine import client\n"
            f"mec = client.MultiEngineClient({cluster.cluster_file!r})",
            "import asyncio, time\n"
            "ticks = 0\n"
            "async def ticker():\n"
            "    global ticks\n"
            "    while True:\n"
            "        await asyncio.sleep(0.01)\n"
            "        ticks += 1\n"
            "task = asyncio.create_task(ticker())\n"
            "t0 = time.monotonic()\n"
            "res = await mec.execute('import time; time.sleep(0.5)', targets=0, block=False)\n"
            "took = time.monotonic() - t0\n"
            "task.cancel()\n"
            "print('ids', [r['id'] for r in res], 'free', ticks >= 0.5 * took / 0.01 / 4, ticks)",
            "try:\n"
            "    await mec.execute('1/0', targets=1, block=False)\n"
            "except client.CompositeError as e:\n"
            "    print('raised', type(e).__name__, e.elist[0].ename)\n"
            "mec.close()",
        ]
    )
    execute(nb)
    assert "ids [0] free True" in texts(nb.cells[1]), texts(nb.cells[1])
    assert "raised CompositeError ZeroDivisionError" in texts(nb.cells[2])


def test_timed_out_awaits_leave_nothing_behind(mec):
    # polling with wait_for: every await that timed out must take its waiter (and so a
    # reference to its loop) off the call, not add one more done-callback per poll
    import gc
    import weakref

    pr = mec.execute("import time; time.sleep(0.5)", targets=0, block=False)
    loop = asyncio.new_event_loop()

    async def poll() -> int:
        n = 0
        while True:
            try:
                await asyncio.wait_for(pr, 0.001)
                return n
            except asyncio.TimeoutError:
                n += 1

    try:
        polls = loop.run_until_complete(poll())
    finally:
        loop.close()
    assert polls > 3
    (fut,) = pr.futures
    assert len(fut._done_callbacks) <= 2  # one relay, not one callback per poll
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None  # the call holds no reference to the caller's closed loop
    assert pr.get_result(timeout=10) is not None
