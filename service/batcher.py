"""Dynamic batching across concurrent requests, run by the requests' own threads (leader/follower).

Each request runs its whole pipeline (decode, inference, explain, encode) in one worker thread, so
it costs one hop off the event loop and back instead of one per stage. Threads ``submit`` one
payload each and block until their result is ready:

- A thread that finds fewer than ``max_concurrent_batches`` batches running becomes a *leader*:
  it takes the oldest waiting items (its own first) up to ``max_batch_size``, runs ``predict`` on
  them in its own thread, hands every item its result, and, if items are still waiting, wakes the
  oldest one's thread to lead the next batch. An idle server therefore runs a lone request at once,
  with no thread hand-off at all.
- Other threads wait (followers). While a batch runs, new requests queue up and form the next
  one, so batches grow with load and stay at 1 when idle.

A leader may wait before starting, only for requests it knows are coming: those announced with
:meth:`expect` (the server announces a request before decoding its image) are waited for up to
``max_arrival_wait_s``; with ``max_delay_s`` > 0 it also waits that long for the batch to fill.
Neither wait happens when nothing is on its way, so a lone request never waits.

The queue is bounded: ``submit`` raises QueueFullError at once when it is full. Items whose
deadline passed, or whose :class:`Ticket` was cancelled (the caller went away), are dropped before
they cost inference.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class QueueFullError(Exception):
    """The batch queue is full: the server is overloaded."""


class DeadlineExpiredError(Exception):
    """The request's deadline passed before it reached inference."""


class CancelledItemError(Exception):
    """The request was cancelled (its caller went away) before it reached inference."""


class ClosedError(Exception):
    """The batcher is closed: the server is shutting down."""


@dataclass
class BatchInfo:
    """What a request learns about the batch it was part of."""

    size: int  # items inferred together
    queue_seconds: float  # from submit to the start of the batch's predict
    predict_seconds: float  # wall time of the batch's predict call


class Ticket:
    """A request's handle across threads: the event loop cancels it when the caller goes away."""

    __slots__ = ("cancelled", "_item")

    def __init__(self):
        self.cancelled = False
        self._item: _Item | None = None

    def cancel(self) -> None:
        self.cancelled = True
        item = self._item
        if item is not None:
            item.wake.set()  # a waiting follower drops its item and returns


@dataclass(eq=False)
class _Item(Generic[P]):
    payload: P
    deadline: float | None  # time.monotonic() seconds
    ticket: Ticket | None
    wake: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    lead: bool = False  # handed the lead of the next batch
    taken: bool = False  # in a running batch
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class BatchQueue(Generic[P, R]):
    """Batches payloads for ``predict(payloads) -> results`` (one result per payload, same order).

    ``predict`` is a plain function, called in the thread of the batch's leader. ``on_batch(size,
    seconds)`` (after each predict, with its wall time), ``on_depth(depth)`` and ``on_drop(reason)``
    are optional metric hooks.
    """

    def __init__(self, predict: Callable[[list[P]], Sequence[R]], max_batch_size: int = 8,
                 max_delay_s: float = 0.0, max_queue_size: int = 256, max_concurrent_batches: int = 1,
                 max_arrival_wait_s: float = 0.01,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_drop: Callable[[str], None] | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be at least 1")
        self.predict = predict
        self.max_batch_size = int(max_batch_size)
        self.max_delay_s = max(0.0, float(max_delay_s))
        self.max_arrival_wait_s = max(0.0, float(max_arrival_wait_s))
        self.max_queue_size = int(max_queue_size)
        self.max_concurrent_batches = int(max_concurrent_batches)
        self._on_batch, self._on_depth, self._on_drop = on_batch, on_depth, on_drop
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # notified when an item is queued or an arrival is called off
        self._queue: deque[_Item] = deque()
        self._leaders = 0  # batches being formed or run
        self._expected = 0  # announced requests not yet submitted
        self._closed = False

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._queue)

    # -- arrivals --------------------------------------------------------------------------------
    def expect(self, deadline: float | None = None, ticket: Ticket | None = None) -> None:
        """Announce a request that will ``submit`` soon (its image is about to be decoded).

        A request whose deadline already passed or whose ticket was cancelled is refused here,
        before it costs a decode: DeadlineExpiredError or CancelledItemError.
        """
        with self._lock:
            self._refuse_dropped(deadline, ticket)
            self._expected += 1

    def unexpect(self) -> None:
        """Call off an announced request that will not submit (its decode failed)."""
        with self._lock:
            self._expected = max(0, self._expected - 1)
            self._arrived.notify_all()

    def close(self) -> None:
        """Refuse new items; queued and running ones still finish."""
        with self._lock:
            self._closed = True
            self._arrived.notify_all()

    # -- submit ----------------------------------------------------------------------------------
    def submit(self, payload: P, deadline: float | None = None, ticket: Ticket | None = None,
               expected: bool = False) -> tuple[R, BatchInfo]:
        """Queue ``payload`` and block until its result; returns (result, its batch's info).

        ``deadline`` is an absolute ``time.monotonic()``: an item still queued past it is dropped
        with DeadlineExpiredError. A cancelled ``ticket`` drops it with CancelledItemError.
        ``expected``: this request was announced with :meth:`expect`. Raises QueueFullError at
        once when the queue is full and ClosedError after :meth:`close`.
        """
        item = _Item(payload, deadline, ticket)
        with self._lock:
            if expected:  # arrived (queued or refused below): a waiting leader stops waiting for it
                self._expected = max(0, self._expected - 1)
                self._arrived.notify_all()
            if self._closed:
                raise ClosedError("the server is shutting down")
            self._refuse_dropped(deadline, ticket)
            if len(self._queue) >= self.max_queue_size:
                self._drop("queue_full")
                raise QueueFullError(f"the server is busy: {self.max_queue_size} requests are already "
                                     f"waiting for inference; retry later")
            self._queue.append(item)
            if ticket is not None:
                ticket._item = item
            lead = self._leaders < self.max_concurrent_batches
            if lead:
                self._leaders += 1
            self._depth()
            self._arrived.notify_all()
        if lead:
            self._lead(item)
        else:
            self._follow(item)
        if item.error is not None:
            raise item.error
        return item.result

    def _follow(self, item: _Item) -> None:
        while True:
            timeout = None if item.deadline is None else max(0.0, item.deadline - time.monotonic())
            item.wake.wait(timeout)
            with self._lock:
                if item.done:
                    return
                if item.lead:
                    break
                item.wake.clear()
                if item.taken:  # in a running batch: its result is coming
                    continue
                reason = _drop_reason(item.deadline, item.ticket)
                if reason is not None:
                    self._queue.remove(item)
                    self._depth()
                    self._fail(item, reason)
                    return
        self._lead(item)

    # -- leading a batch -------------------------------------------------------------------------
    def _lead(self, own: _Item) -> None:
        """Run batches until ``own`` has its result, then pass the lead on (or give the slot back)."""
        try:
            while not own.done:
                batch = self._take()
                if batch:
                    self._run(batch)
        finally:
            with self._lock:
                nxt = next((i for i in self._queue if not i.lead), None)
                if nxt is not None:
                    nxt.lead = True
                    nxt.wake.set()
                else:
                    self._leaders -= 1

    def _take(self) -> list[_Item]:
        """Under the lock: the oldest live items, after waiting for announced arrivals."""
        with self._lock:
            now = time.monotonic()
            arrivals_until = now + self.max_arrival_wait_s
            fill_until = now + self.max_delay_s
            while len(self._queue) < self.max_batch_size and not self._closed:
                now = time.monotonic()
                until = max(fill_until, arrivals_until if self._expected > 0 else 0.0)
                if now >= until:
                    break
                self._arrived.wait(until - now)
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue.popleft()
                reason = _drop_reason(item.deadline, item.ticket)
                if reason is not None:
                    self._fail(item, reason)
                else:
                    item.taken = True
                    batch.append(item)
            self._depth()
            return batch

    def _run(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        results, error = None, None
        try:
            results = self.predict([item.payload for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"predict returned {len(results)} results for {len(batch)} items")
        except Exception as e:
            error = e
        elapsed = time.perf_counter() - start
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed)
        with self._lock:
            for i, item in enumerate(batch):
                if error is None:
                    item.result = (results[i], BatchInfo(len(batch), start - item.enqueued, elapsed))
                item.error, item.done = error, True
                item.wake.set()

    # -- helpers (called with the lock held) -----------------------------------------------------
    def _refuse_dropped(self, deadline: float | None, ticket: Ticket | None) -> None:
        reason = _drop_reason(deadline, ticket)
        if reason is not None:
            self._drop(reason)
            raise _drop_error(reason)

    def _fail(self, item: _Item, reason: str) -> None:
        self._drop(reason)
        item.error = _drop_error(reason)
        item.done = True
        item.wake.set()

    def _depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._queue))

    def _drop(self, reason: str) -> None:
        if self._on_drop is not None:
            self._on_drop(reason)


def _drop_reason(deadline: float | None, ticket: Ticket | None) -> str | None:
    """"cancelled", "deadline", or None for a request still worth inferring."""
    if ticket is not None and ticket.cancelled:
        return "cancelled"
    if deadline is not None and time.monotonic() >= deadline:
        return "deadline"
    return None


def _drop_error(reason: str) -> Exception:
    if reason == "cancelled":
        return CancelledItemError("the request was cancelled before inference")
    return DeadlineExpiredError("the request's deadline passed before inference")
