"""Micro-batching: texts from concurrent requests share one model call, through a bounded queue.

A model call on 32 texts costs far less than 32 calls on one text, so the server collects what arrives
within a few milliseconds (or until a batch is full) and runs it at once. The model runs in ONE worker
thread: the predictor is not guaranteed thread-safe, torch already uses every core inside a call, and the
event loop stays free to accept and answer requests while the model works.

The queue is bounded by texts waiting: past the bound `submit` refuses at once (`QueueFull`, with an
estimate of when to retry) instead of letting latency and memory grow without limit. A caller that gives up
(its task is cancelled, e.g. because its client disconnected) takes its waiting texts out of the queue.

Written by hand (about 150 lines) because no well-kept library does this for an in-process asyncio server:
the batching in Triton/TorchServe/Ray Serve needs their whole serving stack.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# The model call: texts and (for text-pair models) their second texts -> probabilities (n, num_labels).
ModelFn = Callable[[list[str], list[str] | None], np.ndarray]
# Told after every model call: number of texts and seconds spent in the model.
BatchObserver = Callable[[int, float], None]


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and accepts no new work (or refused work still waiting)."""


class QueueFull(RuntimeError):
    """Taking these texts would put more than `max_queue_texts` texts in the queue."""

    def __init__(self, queued: int, bound: int, retry_after: int) -> None:
        super().__init__(f"{queued} texts waiting, bound {bound}")
        self.queued, self.bound, self.retry_after = queued, bound, retry_after


@dataclass(eq=False)  # identity comparison: a chunk is removed from the queue by identity
class _Chunk:
    """Part of one request, at most `max_batch_size` texts; its future gets their probabilities."""

    texts: list[str]
    pairs: list[str] | None
    future: asyncio.Future = field(repr=False)
    arrived: float = 0.0


class MicroBatcher:
    """Gathers texts from concurrent `submit` calls into model calls of at most `max_batch_size` texts.

    A batch starts with the oldest waiting chunk and closes when it is full or `max_wait_ms` after that
    chunk arrived, whichever comes first. While the model works on a batch, new requests queue up, so under
    load batches fill without waiting at all. At most `max_queue_texts` texts wait (default: no bound).
    """

    def __init__(
        self,
        model_fn: ModelFn,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        observer: BatchObserver | None = None,
        max_queue_texts: int | None = None,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or (max_queue_texts is not None and max_queue_texts < 1):
            raise ValueError("max_batch_size and max_queue_texts must be >= 1 and max_wait_ms >= 0")
        self.model_fn = model_fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.observer = observer
        self.max_queue_texts = max_queue_texts
        self._queue: collections.deque[_Chunk] = collections.deque()
        self._queued = 0  # texts in self._queue; a plain int, so other threads may read it
        self._seconds_per_text = 0.0  # moving average over model calls, for Retry-After
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False  # submit takes work
        self._closing = False  # stop(): run what is left without waiting for company, then end

    @property
    def queued_texts(self) -> int:
        """Texts waiting for a model call (not those in the call running now)."""
        return self._queued

    @property
    def full(self) -> bool:
        return self.max_queue_texts is not None and self._queued >= self.max_queue_texts

    def retry_after(self) -> int:
        """Whole seconds until the texts waiting now have been through the model, at the recent pace (>= 1)."""
        return max(1, math.ceil((self._queued + self.max_batch_size) * self._seconds_per_text))

    async def start(self) -> None:
        """Start the collecting task and the single model thread (call from the running event loop)."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textclass-model")
        self._accepting, self._closing = True, False
        self._task = asyncio.create_task(self._run(), name="textclass-batcher")

    async def run_in_model_thread(self, fn: Callable[[], object]) -> object:
        """Run `fn` in the model thread (warm-up, anything else that touches the model)."""
        assert self._executor is not None, "start() first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def submit(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Probabilities for `texts`, in order; the texts may be spread over several model calls.

        Raises `QueueFull` when the texts do not fit in the queue and `BatcherClosed` when shutting down.
        Cancelling the caller takes its texts that are still waiting out of the queue.
        """
        if not self._accepting or self._wakeup is None:
            raise BatcherClosed("the server is shutting down")
        if self.max_queue_texts is not None and self._queued + len(texts) > self.max_queue_texts:
            raise QueueFull(self._queued, self.max_queue_texts, self.retry_after())
        loop = asyncio.get_running_loop()
        chunks = []
        now = time.monotonic()
        for start in range(0, len(texts), self.max_batch_size):
            end = start + self.max_batch_size
            second = list(pairs[start:end]) if pairs is not None else None
            chunk = _Chunk(list(texts[start:end]), second, loop.create_future(), now)
            chunk.future.add_done_callback(functools.partial(self._forget_if_cancelled, chunk))
            self._queue.append(chunk)
            self._queued += len(chunk.texts)
            chunks.append(chunk)
        self._wakeup.set()
        parts = await asyncio.gather(*(c.future for c in chunks))  # cancelling this cancels every chunk
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        """Refuse new work (`BatcherClosed`); what is queued runs as it would have."""
        self._accepting = False

    def refuse_waiting(self) -> int:
        """Fail every chunk still waiting with `BatcherClosed` (shutdown ran out of time); returns how many."""
        refused = 0
        while self._queue:
            chunk = self._pop()
            if not chunk.future.done():
                chunk.future.set_exception(BatcherClosed("the server is shutting down"))
                refused += 1
        return refused

    async def stop(self) -> None:
        """Refuse new work, finish everything already queued without waiting for company, then stop the model thread."""
        self._accepting, self._closing = False, True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _pop(self) -> _Chunk:
        chunk = self._queue.popleft()
        self._queued -= len(chunk.texts)
        return chunk

    def _forget_if_cancelled(self, chunk: _Chunk, done: asyncio.Future) -> None:
        """A cancelled chunk leaves the queue at once: its texts no longer count against the bound.

        A done callback of `chunk.future`, which is `done`."""
        if chunk.future.cancelled() and chunk in self._queue:
            self._queue.remove(chunk)
            self._queued -= len(chunk.texts)

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait until the batch is full or the oldest chunk has waited max_wait (no wait when closing).
            deadline = self._queue[0].arrived + self.max_wait
            while self._queue and self._queued < self.max_batch_size and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            await self._run_batch(self._take_batch())

    def _take_batch(self) -> list[_Chunk]:
        """Whole chunks, oldest first, up to max_batch_size texts (a chunk is never split)."""
        batch: list[_Chunk] = []
        size = 0
        while self._queue:
            chunk = self._queue[0]
            if batch and size + len(chunk.texts) > self.max_batch_size:
                break
            # A pair model gets pairs with every text and a plain model none, so a batch never mixes them;
            # stop at a change anyway rather than guess.
            if batch and (chunk.pairs is None) != (batch[0].pairs is None):
                break
            self._pop()
            if chunk.future.done():  # cancelled or refused before its turn
                continue
            batch.append(chunk)
            size += len(chunk.texts)
        return batch

    async def _run_batch(self, batch: list[_Chunk]) -> None:
        """One model call for the batch; if it fails, one call per chunk, so only the failing chunk fails."""
        if not batch:
            return
        try:
            probs = await self._call(batch)
        except Exception as err:
            if len(batch) == 1:
                _settle(batch[0], err)
                return
            log.warning("model call failed on a batch of %d requests (%s); retrying each alone", len(batch), type(err).__name__)
            for chunk in batch:
                if not chunk.future.done():  # a batch-mate's caller may have gone meanwhile
                    await self._run_batch([chunk])
            return
        offset = 0
        for c in batch:
            _settle(c, probs[offset : offset + len(c.texts)])
            offset += len(c.texts)

    async def _call(self, batch: list[_Chunk]) -> np.ndarray:
        texts = [t for c in batch for t in c.texts]
        pairs: list[str] | None = None
        if batch[0].pairs is not None:  # a text-pair model: every request carries pairs
            pairs = []
            for c in batch:
                assert c.pairs is not None, "a batch mixes texts with and without pairs"
                pairs.extend(c.pairs)
        started = time.perf_counter()
        probs = await asyncio.get_running_loop().run_in_executor(self._executor, self.model_fn, texts, pairs)
        seconds = time.perf_counter() - started
        per_text = seconds / len(texts)
        self._seconds_per_text = per_text if not self._seconds_per_text else 0.8 * self._seconds_per_text + 0.2 * per_text
        if self.observer is not None:
            self.observer(len(texts), seconds)
        return probs


def _settle(chunk: _Chunk, outcome: np.ndarray | Exception) -> None:
    """Give the chunk's caller its rows or its error, unless the caller has gone."""
    if chunk.future.done():
        return
    if isinstance(outcome, Exception):
        chunk.future.set_exception(outcome)
    else:
        chunk.future.set_result(outcome)
