"""Dynamic batching across concurrent requests, in the style of Ray Serve's ``_BatchQueue``.

Requests ``submit`` one payload each and await their own result. One loop takes the first waiting
item, adds whatever else is already queued (or arrives within ``max_delay_s``, default 0: no added
delay) up to ``max_batch_size``, drops items whose deadline passed or whose caller went away, and
hands the rest to ``predict`` in one call. While a batch runs, new requests queue up and form the
next batch, so batches grow with load and stay at 1 when idle.

The queue is bounded: ``submit`` raises QueueFullError at once when it is full (the server answers
RESOURCE_EXHAUSTED). Only payloads travel through the batcher; each request keeps its own
options in its own coroutine.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


class QueueFullError(Exception):
    """The batch queue is full: the server is overloaded."""


class DeadlineExpiredError(Exception):
    """The request's deadline passed before it reached inference."""


@dataclass
class BatchInfo:
    """What a request learns about the batch it was part of."""

    size: int  # items inferred together
    queue_seconds: float  # from submit to the start of the batch's predict
    predict_seconds: float  # wall time of the batch's predict call


@dataclass
class _Item(Generic[P]):
    payload: P
    future: asyncio.Future
    deadline: float | None  # time.monotonic() seconds
    enqueued: float = field(default_factory=time.perf_counter)


Predict = Callable[[list[Any]], Awaitable[Sequence[Any]]]


class BatchQueue(Generic[P, R]):
    """Batches payloads for ``predict(payloads) -> results`` (one result per payload, same order).

    ``on_batch(size)``, ``on_depth(depth)`` and ``on_drop(reason)`` are optional metric hooks.
    """

    def __init__(self, predict: Predict, max_batch_size: int = 8, max_delay_s: float = 0.0,
                 max_queue_size: int = 256, max_concurrent_batches: int = 1,
                 on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_drop: Callable[[str], None] | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        self.predict = predict
        self.max_batch_size = int(max_batch_size)
        self.max_delay_s = max(0.0, float(max_delay_s))
        self.max_queue_size = int(max_queue_size)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=self.max_queue_size)
        self._slots = asyncio.Semaphore(max(1, int(max_concurrent_batches)))
        self._on_batch, self._on_depth, self._on_drop = on_batch, on_depth, on_drop
        self._loop_task: asyncio.Task | None = None
        self._batch_tasks: set[asyncio.Task] = set()

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="batch-queue")

    async def close(self) -> None:
        """Stop forming batches; running batches finish, waiting items fail with CancelledError."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        if self._batch_tasks:
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.cancel()

    async def submit(self, payload: P, deadline: float | None = None) -> tuple[R, BatchInfo]:
        """Queue ``payload``; return its result and its batch's info.

        ``deadline`` is an absolute ``time.monotonic()``; an item still queued past it is dropped
        with DeadlineExpiredError. Raises QueueFullError at once when the queue is full.
        """
        if self._loop_task is None:
            self.start()
        if deadline is not None and time.monotonic() >= deadline:
            self._drop("deadline")
            raise DeadlineExpiredError("the request's deadline passed before inference")
        item = _Item(payload, asyncio.get_running_loop().create_future(), deadline)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._drop("queue_full")
            raise QueueFullError(f"the server is busy: {self.max_queue_size} requests are already "
                                 f"waiting for inference; retry later") from None
        self._depth()
        return await item.future  # cancelling this cancels the future: the loop skips the item

    def _depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(self._queue.qsize())

    def _drop(self, reason: str) -> None:
        if self._on_drop is not None:
            self._on_drop(reason)

    async def _collect(self) -> list[_Item]:
        """Wait for one item, then take what is queued (waiting up to max_delay_s for more)."""
        batch = [await self._queue.get()]
        if self.max_delay_s > 0:
            end = time.monotonic() + self.max_delay_s
            while len(batch) < self.max_batch_size:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
        while len(batch) < self.max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        self._depth()
        return batch

    def _live(self, batch: list[_Item]) -> list[_Item]:
        """Items still worth inferring: not cancelled, deadline not passed."""
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # the caller went away (cancelled)
                self._drop("cancelled")
            elif item.deadline is not None and now >= item.deadline:
                self._drop("deadline")
                item.future.set_exception(DeadlineExpiredError("the request's deadline passed before inference"))
            else:
                live.append(item)
        return live

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = self._live(await self._collect())
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._predict(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    async def _predict(self, batch: list[_Item]) -> None:
        try:
            if self._on_batch is not None:
                self._on_batch(len(batch))
            start = time.perf_counter()
            try:
                results = await self.predict([item.payload for item in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"predict returned {len(results)} results for {len(batch)} items")
            except Exception as e:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                return
            elapsed = time.perf_counter() - start
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result((result, BatchInfo(len(batch), start - item.enqueued, elapsed)))
        finally:
            self._slots.release()
