"""The joblib backend with real joblib and real scikit-learn on real engines: ``joblib.Parallel``,
``GridSearchCV(n_jobs=-1)`` and ``cross_val_score`` run in the engines' processes (their pids)
and give exactly the serial run's scores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cloudpickle
import pytest
from faultlib import reset_engines

joblib = pytest.importorskip("joblib")
pytest.importorskip("sklearn")

from joblib.parallel import TimeoutError as JoblibTimeout  # noqa: E402  (multiprocessing's)
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

import ipy_multiengine.joblib_backend  # noqa: E402, F401  (registers "ipy_multiengine")

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def mec(cluster):
    """The session's client, reset once for this module (these tests need no clean namespace
    per test: the per-test reset of conftest's ``mec`` would cost more than the tests)."""
    client = cluster.client
    client.block, client.targets = True, "all"
    reset_engines(client)  # bounded: names what it waited for
    return client


# this module's helpers travel by value: the engines cannot import the tests
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: where PidTree.fit notes the process it ran in (set by the tests; read on the engines)
LOG_DIR = ""


def pid(_x=None) -> int:
    import os

    return os.getpid()


class PidTree(DecisionTreeClassifier):
    """A decision tree that notes the pid of the process each fit ran in (the docs' estimator
    module: the engines import it once for both)."""

    def fit(self, X, y):
        import os
        import uuid

        if LOG_DIR:
            open(os.path.join(LOG_DIR, f"{os.getpid()}-{uuid.uuid4().hex}"), "w").close()
        return super().fit(X, y)


def fit_pids(path: Path) -> set[int]:
    return {int(p.name.split("-")[0]) for p in path.iterdir()}


@pytest.fixture
def engine_pids(mec):
    mec.activate()
    return set(mec.apply(pid))


def test_parallel_runs_on_the_engines(mec, engine_pids):
    with joblib.parallel_config(backend="ipy_multiengine", n_jobs=-1):
        pids = joblib.Parallel()(joblib.delayed(pid)(i) for i in range(40))
        squares = joblib.Parallel(batch_size=3)(joblib.delayed(pow)(i, 2) for i in range(20))
        gen = joblib.Parallel(return_as="generator")(joblib.delayed(abs)(-i) for i in range(5))
        assert list(gen) == list(range(5))
    assert set(pids) <= engine_pids and len(set(pids)) > 1
    assert squares == [i * i for i in range(20)]


def test_errors_raise_their_type_and_engines_stay_usable(mec, engine_pids):
    def boom(i):
        if i == 3:
            raise KeyError(f"item {i}")
        return i

    with joblib.parallel_config(backend="ipy_multiengine", n_jobs=-1):
        with pytest.raises(KeyError, match="item 3"):
            joblib.Parallel()(joblib.delayed(boom)(i) for i in range(8))
        assert joblib.Parallel()(joblib.delayed(boom)(i) for i in range(3)) == [0, 1, 2]


def fails_deep_inside(i):
    if i == 2:
        raise ValueError(f"item {i}")
    return i


def test_an_error_prints_where_the_engine_raised_it(mec, engine_pids):
    # joblib drops the local traceback and keeps the cause: that printed as one line,
    # "RemoteError: ValueError: item 2", with no frame of the engine's traceback
    import traceback

    with (
        joblib.parallel_config(backend="ipy_multiengine", n_jobs=-1),
        pytest.raises(ValueError, match="item 2") as info,
    ):
        joblib.Parallel(batch_size=1)(joblib.delayed(fails_deep_inside)(i) for i in range(4))
    text = "".join(traceback.format_exception(info.value))
    assert "fails_deep_inside" in text and "Remote traceback" in text, text


def test_client_and_targets_as_backend_parameters(mec, engine_pids):
    mine = mec.apply(pid, targets=[1, 2])
    with joblib.parallel_config(backend="ipy_multiengine", client=mec, targets=[1, 2], n_jobs=-1):
        pids = joblib.Parallel()(joblib.delayed(pid)(i) for i in range(12))
    assert set(pids) <= set(mine)


def test_grid_search_and_cross_val_score_on_the_engines(mec, engine_pids, tmp_path):
    global LOG_DIR
    X, y = load_iris(return_X_y=True)
    grid = {"max_depth": [1, 2, 3, 4]}
    serial = GridSearchCV(PidTree(random_state=0), grid, cv=3).fit(X, y)
    serial_cv = cross_val_score(PidTree(max_depth=3, random_state=0), X, y, cv=4)
    LOG_DIR = str(tmp_path)
    two = set(mec.apply(pid, targets=[0, 1]))  # two engines: importing sklearn costs CPU each
    try:
        with joblib.parallel_config(backend="ipy_multiengine", targets=[0, 1]):
            search = GridSearchCV(PidTree(random_state=0), grid, cv=3, n_jobs=-1).fit(X, y)
            scores = cross_val_score(PidTree(max_depth=3, random_state=0), X, y, cv=4, n_jobs=-1)
    finally:
        LOG_DIR = ""
    ran = fit_pids(tmp_path)
    # 12 grid fits + 4 cross-validation fits on the engines; the refit runs here
    assert ran - {os.getpid()} == two, (ran, two)
    assert sum(1 for p in tmp_path.iterdir() if int(p.name.split("-")[0]) in two) == 16
    assert list(search.cv_results_["mean_test_score"]) == list(
        serial.cv_results_["mean_test_score"]
    )
    assert search.best_params_ == serial.best_params_
    assert list(scores) == list(serial_cv)


def test_no_client_is_a_clear_error(mec):
    from ipy_multiengine import client as client_mod
    from ipy_multiengine.joblib_backend import EngineBackend

    client_mod.deactivate()
    try:
        with pytest.raises(RuntimeError, match="register_joblib_backend"):
            EngineBackend().effective_n_jobs(-1)
    finally:
        mec.activate()
    with pytest.raises(ValueError, match="name"):
        mec.register_joblib_backend(name="")


def test_a_reset_behind_a_busy_engine_fails_naming_what_it_waited_for(mec, tmp_path):
    """The fixtures' ``%reset -f`` is bounded: behind an engine still busy (what a timed-out
    test leaves), it fails within its deadline saying what it waited for and what runs."""
    flag = tmp_path / "go"
    busy = mec.execute(
        f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.01)",
        targets=[0],
        block=False,
    )
    try:
        with pytest.raises(pytest.fail.Exception) as info:
            reset_engines(mec, timeout=0.5)
        text = str(info.value)
        assert "did not run '%reset -f' within 0.5 s" in text
        assert "import os, time" in text and "busy" in text  # the status table: what runs
    finally:
        flag.touch()
        busy.get_result(timeout=30)
    assert mec.execute("print(7)", targets=[0])[0]["stdout"] == "7\n"  # usable after


def test_one_target_engine_still_runs_the_tasks(mec, engine_pids):
    # joblib runs an effective n_jobs of 1 itself, in this process: one engine must not be 1
    (only,) = mec.apply(pid, targets=[2])
    with joblib.parallel_config(backend="ipy_multiengine", targets=[2], n_jobs=-1):
        pids = joblib.Parallel()(joblib.delayed(pid)(i) for i in range(6))
    assert set(pids) == {only}
    with joblib.parallel_config(backend="ipy_multiengine", targets=[1, 2], n_jobs=-2):
        pids = joblib.Parallel()(joblib.delayed(pid)(i) for i in range(6))
    assert set(pids) == {mec.apply(pid, targets=[1])[0]}  # all but one of the two
    with joblib.parallel_config(backend="ipy_multiengine", n_jobs=1):  # asked for: joblib's own
        assert joblib.Parallel()(joblib.delayed(pid)(i) for i in range(2)) == [os.getpid()] * 2


def slow_pid(t: float) -> int:
    import os
    import time

    time.sleep(t)
    return os.getpid()


def test_positive_n_jobs_bounds_the_engines_used(mec, engine_pids):
    with joblib.parallel_config(backend="ipy_multiengine", n_jobs=2):
        pids = joblib.Parallel(batch_size=1)(joblib.delayed(slow_pid)(0.1) for i in range(12))
    assert set(pids) <= engine_pids and len(set(pids)) <= 2, pids


def test_a_reused_parallel_keeps_its_n_jobs_after_another_call(mec, engine_pids):
    """``with Parallel(n_jobs=2) as p``: another call in the same ``parallel_config`` block (it
    shares the backend) ended and its ``terminate()`` forgot p's idle executor; p's next call
    made a new one with the engine count of the *last* configured call, so p ran on all four
    engines. Each call keeps its own count now (also after an error shut its executor down)."""
    with (
        joblib.parallel_config(backend="ipy_multiengine"),
        joblib.Parallel(n_jobs=2, batch_size=1) as p,
    ):
        first = p(joblib.delayed(slow_pid)(0.05) for i in range(12))
        joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-i) for i in range(8))
        again = p(joblib.delayed(slow_pid)(0.05) for i in range(12))
        with pytest.raises(KeyError):
            p(joblib.delayed(fails_with_key_error)(i) for i in range(4))
        after_error = p(joblib.delayed(slow_pid)(0.05) for i in range(12))
    for pids in (first, again, after_error):
        assert set(pids) <= engine_pids and len(set(pids)) <= 2, (first, again, after_error)


def fails_with_key_error(i):
    if i == 1:
        raise KeyError(i)
    return i


def test_a_registration_bound_to_a_closed_client_neither_keeps_it_nor_uses_it(
    cluster, mec, engine_pids
):
    """``other.register_joblib_backend()`` then ``other.close()``: the process-wide registration
    held the closed client for good, so every later ``Parallel`` on the backend failed with
    "this MultiEngineClient is closed" (and the client was never freed). Now it is held weakly,
    and a closed one is passed over for the active client."""
    import gc
    import weakref

    from ipy_multiengine import MultiEngineClient

    other = MultiEngineClient(cluster.cluster_file)
    other.register_joblib_backend()
    other.close()
    try:
        with joblib.parallel_config(backend="ipy_multiengine", n_jobs=-1):
            pids = joblib.Parallel()(joblib.delayed(pid)(i) for i in range(8))
        assert set(pids) <= engine_pids, pids  # the active client's engines
        ref = weakref.ref(other)
        del other
        gc.collect()
        assert ref() is None, "the joblib registration keeps a closed client alive"
    finally:
        mec.register_joblib_backend()


def wait_file(path: str, limit: float = 30.0) -> str:
    """Runs on an engine: poll for ``path`` (a deadline, no fixed sleep)."""
    import os
    import time

    end = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)
    return path


def test_an_unconsumed_generator_and_a_later_call_share_one_parallel_config(
    mec, engine_pids, tmp_path
):
    """A ``return_as="generator"`` call not consumed yet, then a second ``Parallel`` in the same
    ``parallel_config``: the second's configure cancelled the first's queued batches (its
    results raised CancelledError), and the first generator dropped while the second ran
    cancelled the second's. As with loky's shared pool, neither call cancels the other now."""
    import gc

    # (the engines are shared: a call's batches wait behind the other's on an engine, so only
    # the second call's batches may block)
    second_go = str(tmp_path / "second")
    with joblib.parallel_config(backend="ipy_multiengine", n_jobs=2):
        first = joblib.Parallel(return_as="generator", batch_size=1)(
            joblib.delayed(slow_pid)(0.02) for _ in range(16)
        )
        squares = joblib.Parallel(batch_size=1)(joblib.delayed(pow)(i, 2) for i in range(6))
        assert squares == [i * i for i in range(6)]
        assert set(first) <= engine_pids

        dropped = joblib.Parallel(return_as="generator", batch_size=1)(
            joblib.delayed(slow_pid)(0.02) for _ in range(16)
        )
        second = joblib.Parallel(return_as="generator", batch_size=1)(
            joblib.delayed(wait_file)(second_go) for _ in range(6)
        )
        del dropped  # its generator closes: joblib aborts that call
        gc.collect()
        open(second_go, "w").close()
        assert list(second) == [second_go] * 6


def start_and_wait(started: str, go: str, limit: float = 30.0) -> str:
    """Runs on an engine: note that it began (``started``), then poll for ``go``."""
    import os
    import time

    open(started, "w").close()
    end = time.monotonic() + limit
    while not os.path.exists(go) and time.monotonic() < end:
        time.sleep(0.01)
    return go


def test_a_timed_out_call_stops_its_running_batches(mec, engine_pids, tmp_path):
    """``Parallel(timeout=1)`` over long tasks raised after 1 s, but its running batches went on
    on the engines, so the next call waited behind them (4.16 s measured for 5 s tasks). They
    are interrupted now: the next call runs at once."""
    import time

    never = str(tmp_path / "never")
    try:
        with joblib.parallel_config(backend="ipy_multiengine", n_jobs=-1):
            with pytest.raises(JoblibTimeout):
                joblib.Parallel(timeout=1, batch_size=1)(
                    joblib.delayed(start_and_wait)(str(tmp_path / f"a{i}"), never) for i in range(8)
                )
            began = time.monotonic()
            pids = joblib.Parallel(batch_size=1)(joblib.delayed(pid)(i) for i in range(8))
            took = time.monotonic() - began
        assert set(pids) <= engine_pids
        # before: the next call waited for the 30 s tasks it queued behind
        assert took < 10, f"the next call took {took:.1f} s"
        assert len(list(tmp_path.glob("a*"))) <= 4  # those queued in the executor never ran
    finally:
        open(never, "w").close()


def test_an_abort_interrupts_no_other_calls_or_clients_work(cluster, mec, engine_pids, tmp_path):
    """Call A aborts (its timeout) while call B's batches wait behind A's on every engine, and
    another client's task runs on engine 0 with A's batch waiting behind it. A's running batches
    are interrupted, so B's begin at once; B's and the other client's are not interrupted, and
    A's batch behind the other client's task never runs."""
    from faultlib import wait_for

    from ipy_multiengine import MultiEngineClient

    go, never = str(tmp_path / "go"), str(tmp_path / "never")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    other = MultiEngineClient(cluster.cluster_file)
    keep_ex = other.executor(targets=[0])
    try:
        keep = keep_ex.submit(start_and_wait, str(tmp_path / "keep"), go)
        wait_for((tmp_path / "keep").exists, 30, "the other client's task on engine 0")
        with joblib.parallel_config(backend="ipy_multiengine", n_jobs=-1):
            a = joblib.Parallel(return_as="generator", timeout=1, batch_size=1)(
                joblib.delayed(start_and_wait)(str(tmp_path / "a" / str(i)), never)
                for i in range(4)
            )
            wait_for(lambda: len(list((tmp_path / "a").iterdir())) == 3, 30, "A on engines 1-3")
            b = joblib.Parallel(return_as="generator", batch_size=1)(
                joblib.delayed(start_and_wait)(str(tmp_path / "b" / str(i)), go) for i in range(4)
            )
            with pytest.raises(JoblibTimeout):
                list(a)
            # B's batches behind A's begin as A's are interrupted (before: when `never` timed
            # out, 30 s later)
            wait_for(lambda: len(list((tmp_path / "b").iterdir())) == 3, 10, "B on engines 1-3")
            assert not keep.done()
            open(go, "w").close()
            assert list(b) == [go] * 4  # none of B's was interrupted
        assert keep.result(timeout=30) == go  # nor the other client's
        assert len(list((tmp_path / "a").iterdir())) == 3  # A's batch behind it never ran
    finally:
        open(go, "w").close()
        open(never, "w").close()
        keep_ex.shutdown(wait=True)
        other.close()


class _Call:
    """Stands for a ``Parallel`` call as the backend sees it: joblib's ``_running`` (set before
    ``configure``, cleared as the call ends, before its ``terminate``) and ``_aborting``."""

    def __init__(self, running: bool = True) -> None:
        self._running = running
        self._aborting = False


class _Callback:
    """joblib's batch callback as the backend sees it: it names its call."""

    def __init__(self, parallel: _Call) -> None:
        self.parallel = parallel
        self.called: list = []

    def __call__(self, future) -> None:
        self.called.append(future)


def touch_file(path: str) -> str:
    open(path, "w").close()
    return path


def test_another_calls_end_never_pulls_the_executor_from_under_a_call(mec, tmp_path):
    """joblib's ``terminate()`` names no call: the end of call A shut down every executor with
    nothing pending, so call B, configured but not submitted yet (or between the lookup of its
    executor and its submit), met a shut-down executor: ``RuntimeError``, raised in a callback
    thread where it is lost, and B hung. Now an end only forgets the executors of calls that
    have ended, never shuts one down; a submit that meets a shut-down executor anyway gets a
    fresh one, unless its call aborts (then its batch is cancelled, never run)."""
    from ipy_multiengine.joblib_backend import EngineBackend

    backend = EngineBackend(client=mec)
    b, ended = _Call(), _Call()
    backend.configure(n_jobs=-1, parallel=ended)
    ended._running = False
    backend.configure(n_jobs=-1, parallel=b)
    executor = backend._executors[b]
    backend.terminate()  # call A ends: B is running, with nothing pending yet
    assert not executor.is_shutdown
    assert ended not in backend._executors and b in backend._executors  # an ended one forgotten
    done = _Callback(b)
    assert backend.submit(pid, callback=done).result(timeout=30) in set(mec.apply(pid))
    assert len(done.called) == 1

    executor.shutdown(wait=False)  # met shut down all the same: recovers with a fresh one
    assert backend.submit(pid, callback=_Callback(b)).result(timeout=30) in set(mec.apply(pid))
    assert backend._executors[b] is not executor

    b._aborting = True  # B aborts (joblib sets the flag, then calls abort_everything)
    backend.abort_everything()
    assert b not in backend._executors
    late = _Callback(b)
    path = tmp_path / "late"
    fut = backend.submit(lambda: touch_file(str(path)), callback=late)  # dispatched meanwhile
    assert fut.cancelled() and late.called == [fut]  # joblib's callback ignores it (aborting)
    assert b not in backend._executors  # no new executor for an aborting call
    mec.apply(pid)  # (anything sent would have run by now: each engine runs in order)
    assert not path.exists()


def test_a_batch_that_cannot_be_sent_fails_the_call_also_from_a_callback_thread(mec, engine_pids):
    """joblib dispatches the batches after its first ones from the thread that completes a
    batch (a done-callback): a batch that could not be sent there (an argument that cannot be
    pickled) raised in that callback, where ``concurrent.futures`` only logs it, and the call
    waited for that batch forever. It fails the call with its error now, as in the caller's
    thread."""
    import threading

    items = [1] * 12 + [threading.Lock()] + [1] * 3  # far beyond the first dispatches
    outcome: dict = {}

    def run() -> None:
        try:
            with joblib.parallel_config(backend="ipy_multiengine", n_jobs=2):
                outcome["result"] = joblib.Parallel(batch_size=1)(
                    joblib.delayed(abs)(x) for x in items
                )
        except BaseException as exc:  # what the call raised: checked below
            outcome["error"] = exc

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(30)
    assert not caller.is_alive(), "the call hung on the batch it could not send"
    assert isinstance(outcome.get("error"), TypeError), outcome
    assert "lock" in str(outcome["error"])
    with joblib.parallel_config(backend="ipy_multiengine", n_jobs=-1):  # the engines are usable
        assert joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]


def boom_key(i):
    raise KeyError(i)


def no_items():
    raise ValueError("no items")
    yield  # a generator that fails as it is first consumed


def test_an_abort_before_any_batch_stops_no_other_call(mec, engine_pids, tmp_path):
    """A reused ``Parallel`` (``with Parallel() as p``) whose call failed before it sent any
    batch (its iterator raised) had no executor (its earlier call's abort had dropped it):
    ``abort_everything`` found no aborting call and stopped the *last configured* one, another
    running call, whose batches were cancelled and interrupted (it raised ``CancelledError``).
    Only a call flagged as aborting is stopped now."""
    go = str(tmp_path / "go")
    with (
        joblib.parallel_config(backend="ipy_multiengine", n_jobs=-1),
        joblib.Parallel() as p,
    ):
        with pytest.raises(KeyError):
            p(joblib.delayed(boom_key)(i) for i in range(2))
        other = joblib.Parallel(return_as="generator", batch_size=1)(
            joblib.delayed(start_and_wait)(str(tmp_path / f"o{i}"), go) for i in range(4)
        )
        try:
            with pytest.raises(ValueError, match="no items"):
                p(joblib.delayed(abs)(x) for x in no_items())
        finally:
            open(go, "w").close()
        assert list(other) == [go] * 4  # (before: CancelledError)
