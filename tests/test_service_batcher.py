"""The dynamic batcher with a fake predict: batching, bounded queue, deadlines, cancellation, errors."""
from __future__ import annotations

import asyncio
import time

import pytest

from conceptlens.service.batcher import BatchQueue, DeadlineExpiredError, QueueFullError


class FakePredict:
    """Doubles each payload; records batches; can be held until released."""

    def __init__(self, hold: bool = False):
        self.batches: list[list] = []
        self.gate = asyncio.Event()
        if not hold:
            self.gate.set()
        self.entered = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.entered.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [p * 2 for p in payloads]


async def test_concurrent_requests_share_batches_and_keep_their_results():
    predict = FakePredict(hold=True)
    q = BatchQueue(predict, max_batch_size=4)
    tasks = [asyncio.create_task(q.submit(i)) for i in range(10)]
    await predict.entered.wait()  # the first item is in predict; the other 9 wait
    await asyncio.sleep(0)
    predict.gate.set()
    results = await asyncio.gather(*tasks)
    assert [r for r, _ in results] == [2 * i for i in range(10)]
    sizes = [len(b) for b in predict.batches]
    assert sum(sizes) == 10 and max(sizes) <= 4 and max(sizes) > 1
    assert all(info.size == len(next(b for b in predict.batches if i in b)) for i, (_, info) in enumerate(results))
    await q.close()


async def test_no_added_delay_a_lone_request_runs_alone():
    predict = FakePredict()
    q = BatchQueue(predict, max_batch_size=8, max_delay_s=0.0)
    result, info = await q.submit(3)
    assert result == 6 and info.size == 1
    assert predict.batches == [[3]]
    await q.close()


async def test_max_delay_waits_for_the_batch_to_fill():
    predict = FakePredict()
    q = BatchQueue(predict, max_batch_size=2, max_delay_s=5.0)
    first = asyncio.create_task(q.submit(1))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(q.submit(2))
    assert [r for r, _ in await asyncio.gather(first, second)] == [2, 4]
    assert predict.batches == [[1, 2]]  # filled before the delay ran out
    await q.close()


async def test_full_queue_raises_at_once():
    predict = FakePredict(hold=True)
    drops = []
    q = BatchQueue(predict, max_batch_size=1, max_queue_size=2, on_drop=drops.append)
    running = asyncio.create_task(q.submit(0))
    await predict.entered.wait()  # item 0 left the queue for predict
    waiting = [asyncio.create_task(q.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):
        await q.submit(3)
    assert drops == ["queue_full"]
    predict.gate.set()
    assert [r for r, _ in await asyncio.gather(running, *waiting)] == [0, 2, 4]
    await q.close()


async def test_expired_requests_are_dropped_before_inference():
    predict = FakePredict(hold=True)
    drops = []
    q = BatchQueue(predict, max_batch_size=4, on_drop=drops.append)
    running = asyncio.create_task(q.submit(0))
    await predict.entered.wait()
    doomed = asyncio.create_task(q.submit(7, deadline=time.monotonic() + 0.05))
    fine = asyncio.create_task(q.submit(8, deadline=time.monotonic() + 60))
    await asyncio.sleep(0.1)
    predict.gate.set()
    with pytest.raises(DeadlineExpiredError):
        await doomed
    assert (await fine)[0] == 16 and (await running)[0] == 0
    assert all(7 not in b for b in predict.batches)
    assert drops == ["deadline"]
    with pytest.raises(DeadlineExpiredError):  # already past at submit
        await q.submit(9, deadline=time.monotonic() - 1)
    await q.close()


async def test_cancelled_requests_are_dropped_before_inference():
    predict = FakePredict(hold=True)
    drops = []
    q = BatchQueue(predict, max_batch_size=4, on_drop=drops.append)
    running = asyncio.create_task(q.submit(0))
    await predict.entered.wait()
    gone = asyncio.create_task(q.submit(5))
    await asyncio.sleep(0)
    gone.cancel()
    stays = asyncio.create_task(q.submit(6))
    await asyncio.sleep(0)
    predict.gate.set()
    assert (await stays)[0] == 12 and (await running)[0] == 0
    assert all(5 not in b for b in predict.batches)
    assert drops == ["cancelled"]
    await q.close()


async def test_a_failing_batch_fails_its_items_and_the_queue_goes_on():
    predict = FakePredict()
    predict.fail = RuntimeError("model exploded")
    q = BatchQueue(predict, max_batch_size=4)
    with pytest.raises(RuntimeError, match="exploded"):
        await q.submit(1)
    predict.fail = None
    assert (await q.submit(2))[0] == 4
    await q.close()


async def test_metric_hooks_see_batch_sizes_and_depth():
    predict = FakePredict(hold=True)
    sizes, depths = [], []
    q = BatchQueue(predict, max_batch_size=3, on_batch=sizes.append, on_depth=depths.append)
    tasks = [asyncio.create_task(q.submit(i)) for i in range(4)]
    await predict.entered.wait()
    await asyncio.sleep(0)
    predict.gate.set()
    await asyncio.gather(*tasks)
    assert sum(sizes) == 4 and max(depths) >= 1 and depths[-1] == 0
    await q.close()


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        BatchQueue(FakePredict, max_batch_size=0)
    with pytest.raises(ValueError):
        BatchQueue(FakePredict, max_queue_size=0)
