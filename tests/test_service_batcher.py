"""The dynamic batcher with a fake predict: batching in the callers' threads, announced arrivals,
bounded queue, deadlines, cancellation, errors."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conceptlens.service.batcher import (BatchQueue, CancelledItemError, ClosedError, DeadlineExpiredError,
                                         QueueFullError, Ticket)

WAIT = 10  # seconds a test waits for something that should happen at once; failing means a hang


class FakePredict:
    """Doubles each payload; records batches and the threads that ran them; can be held."""

    def __init__(self, hold: bool = False):
        self.batches: list[list] = []
        self.threads: list[int] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.entered = threading.Event()
        self.fail: Exception | None = None

    def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.threads.append(threading.get_ident())
        self.entered.set()
        assert self.gate.wait(WAIT)
        if self.fail is not None:
            raise self.fail
        return [p * 2 for p in payloads]


def wait_for(condition) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def hold_first(pool, q: BatchQueue, predict: FakePredict):
    """Submit item 0 and wait until it is inside the held predict; returns its future."""
    running = pool.submit(q.submit, 0)
    assert predict.entered.wait(WAIT)
    return running


@pytest.fixture
def pool():
    with ThreadPoolExecutor(32) as p:
        yield p


def test_a_lone_request_runs_at_once_in_its_own_thread():
    predict = FakePredict()
    q = BatchQueue(predict, max_batch_size=8, max_delay_s=0.0)
    result, info = q.submit(3)
    assert result == 6 and info.size == 1
    assert predict.batches == [[3]] and predict.threads == [threading.get_ident()]


def test_concurrent_requests_share_batches_and_keep_their_results(pool):
    predict = FakePredict(hold=True)
    q = BatchQueue(predict, max_batch_size=4)
    first = hold_first(pool, q, predict)
    rest = [pool.submit(q.submit, i) for i in range(1, 10)]
    wait_for(lambda: q.depth == 9)
    predict.gate.set()
    results = [f.result(WAIT) for f in [first, *rest]]
    assert [r for r, _ in results] == [2 * i for i in range(10)]
    sizes = [len(b) for b in predict.batches]
    assert sizes[0] == 1 and sum(sizes) == 10 and max(sizes) == 4
    assert all(info.size == len(next(b for b in predict.batches if i in b)) for i, (_, info) in enumerate(results))
    assert len(set(predict.threads)) > 1  # the lead passed from thread to thread


def test_max_delay_waits_for_the_batch_to_fill(pool):
    predict = FakePredict()
    q = BatchQueue(predict, max_batch_size=2, max_delay_s=30.0)
    first = pool.submit(q.submit, 1)
    wait_for(lambda: q.depth == 1)
    second = pool.submit(q.submit, 2)
    assert [first.result(WAIT)[0], second.result(WAIT)[0]] == [2, 4]
    assert predict.batches == [[1, 2]]  # filled long before the delay ran out


def test_a_batch_waits_for_announced_requests_and_only_for_them(pool):
    predict = FakePredict()
    q = BatchQueue(predict, max_batch_size=4, max_arrival_wait_s=30.0)
    q.expect()  # a request is decoding
    first = pool.submit(q.submit, 1)
    wait_for(lambda: q.depth == 1)
    assert not predict.batches  # the leader waits for the announced request
    second = pool.submit(q.submit, 2, expected=True)
    assert [first.result(WAIT)[0], second.result(WAIT)[0]] == [2, 4]
    assert predict.batches == [[1, 2]]
    q.expect()
    third = pool.submit(q.submit, 3)
    wait_for(lambda: q.depth == 1)
    q.unexpect()  # its decode failed: the batch goes without it
    assert third.result(WAIT)[0] == 6 and predict.batches[-1] == [3]


def test_full_queue_raises_at_once(pool):
    predict = FakePredict(hold=True)
    drops = []
    q = BatchQueue(predict, max_batch_size=1, max_queue_size=2, on_drop=drops.append)
    running = hold_first(pool, q, predict)
    waiting = [pool.submit(q.submit, i) for i in (1, 2)]
    wait_for(lambda: q.depth == 2)
    with pytest.raises(QueueFullError):
        q.submit(3)
    assert drops == ["queue_full"]
    predict.gate.set()
    assert [f.result(WAIT)[0] for f in (running, *waiting)] == [0, 2, 4]


def test_expired_requests_are_dropped_before_inference(pool):
    predict = FakePredict(hold=True)
    drops = []
    q = BatchQueue(predict, max_batch_size=4, on_drop=drops.append)
    running = hold_first(pool, q, predict)
    doomed = pool.submit(q.submit, 7, time.monotonic() + 0.05)
    fine = pool.submit(q.submit, 8, time.monotonic() + 60)
    with pytest.raises(DeadlineExpiredError):
        doomed.result(WAIT)  # the waiting thread gives up by itself, while the batch still runs
    predict.gate.set()
    assert fine.result(WAIT)[0] == 16 and running.result(WAIT)[0] == 0
    assert all(7 not in b for b in predict.batches)
    assert drops == ["deadline"]
    with pytest.raises(DeadlineExpiredError):  # already past at submit
        q.submit(9, deadline=time.monotonic() - 1)


def test_cancelled_requests_are_dropped_before_inference(pool):
    predict = FakePredict(hold=True)
    drops = []
    q = BatchQueue(predict, max_batch_size=4, on_drop=drops.append)
    running = hold_first(pool, q, predict)
    ticket = Ticket()
    gone = pool.submit(q.submit, 5, None, ticket)
    wait_for(lambda: q.depth == 1)
    ticket.cancel()
    with pytest.raises(CancelledItemError):
        gone.result(WAIT)
    stays = pool.submit(q.submit, 6)
    predict.gate.set()
    assert stays.result(WAIT)[0] == 12 and running.result(WAIT)[0] == 0
    assert all(5 not in b for b in predict.batches)
    assert drops == ["cancelled"]
    cancelled_early = Ticket()
    cancelled_early.cancel()
    with pytest.raises(CancelledItemError):
        q.submit(1, ticket=cancelled_early)


def test_a_failing_batch_fails_its_items_and_the_queue_goes_on():
    predict = FakePredict()
    predict.fail = RuntimeError("model exploded")
    q = BatchQueue(predict, max_batch_size=4)
    with pytest.raises(RuntimeError, match="exploded"):
        q.submit(1)
    predict.fail = None
    assert q.submit(2)[0] == 4


def test_concurrent_batches_run_side_by_side(pool):
    predict = FakePredict(hold=True)
    q = BatchQueue(predict, max_batch_size=1, max_concurrent_batches=2)
    a, b = pool.submit(q.submit, 1), pool.submit(q.submit, 2)
    wait_for(lambda: len(predict.batches) == 2)  # both in predict while it is held
    predict.gate.set()
    assert sorted([a.result(WAIT)[0], b.result(WAIT)[0]]) == [2, 4]


def test_metric_hooks_see_batch_sizes_and_depth(pool):
    predict = FakePredict(hold=True)
    sizes, depths = [], []
    q = BatchQueue(predict, max_batch_size=3, on_batch=lambda size, seconds: sizes.append(size),
                   on_depth=depths.append)
    first = hold_first(pool, q, predict)
    rest = [pool.submit(q.submit, i) for i in range(1, 4)]
    wait_for(lambda: q.depth == 3)
    predict.gate.set()
    for f in (first, *rest):
        f.result(WAIT)
    assert sizes == [1, 3] and max(depths) == 3 and depths[-1] == 0


def test_closed_queue_refuses_new_items():
    q = BatchQueue(FakePredict(), max_batch_size=2)
    q.close()
    with pytest.raises(ClosedError):
        q.submit(1)


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        BatchQueue(FakePredict(), max_batch_size=0)
    with pytest.raises(ValueError):
        BatchQueue(FakePredict(), max_queue_size=0)
    with pytest.raises(ValueError):
        BatchQueue(FakePredict(), max_concurrent_batches=0)
