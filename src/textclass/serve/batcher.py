"""Micro-batching: texts from concurrent requests share one model call.

A model call on 32 texts costs far less than 32 calls on one text, so the server collects what arrives
within a few milliseconds (or until a batch is full) and runs it at once. The model runs in ONE worker
thread: the predictor is not guaranteed thread-safe, torch already uses every core inside a call, and the
event loop stays free to accept and answer requests while the model works.

Written by hand (about 100 lines) because no well-kept library does this for an in-process asyncio server:
the batching in Triton/TorchServe/Ray Serve needs their whole serving stack.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

# The model call: texts and (for text-pair models) their second texts -> probabilities (n, num_labels).
ModelFn = Callable[[list[str], Optional[list[str]]], np.ndarray]
# Told after every model call: number of texts and seconds spent in the model.
BatchObserver = Callable[[int, float], None]


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and accepts no new work."""


@dataclass
class _Chunk:
    """Part of one request, at most `max_batch_size` texts; its future gets their probabilities."""

    texts: list[str]
    pairs: list[str] | None
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Gathers texts from concurrent `submit` calls into model calls of at most `max_batch_size` texts.

    A batch starts with the oldest waiting chunk and closes when it is full or `max_wait_ms` after that
    chunk arrived, whichever comes first. While the model works on a batch, new requests queue up, so under
    load batches fill without waiting at all.
    """

    def __init__(
        self, model_fn: ModelFn, max_batch_size: int = 32, max_wait_ms: float = 5.0, observer: BatchObserver | None = None
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0")
        self.model_fn = model_fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.observer = observer
        self._queue: collections.deque[tuple[float, _Chunk]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    @property
    def queued_texts(self) -> int:
        return sum(len(c.texts) for _, c in self._queue)

    async def start(self) -> None:
        """Start the collecting task and the single model thread (call from the running event loop)."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textclass-model")
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="textclass-batcher")

    async def run_in_model_thread(self, fn: Callable[[], object]) -> object:
        """Run `fn` in the model thread (warm-up, anything else that touches the model)."""
        assert self._executor is not None, "start() first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def submit(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Probabilities for `texts`, in order; the texts may be spread over several model calls."""
        if self._closing or self._task is None or self._wakeup is None:
            raise BatcherClosed("the server is shutting down")
        loop = asyncio.get_running_loop()
        chunks = []
        now = time.monotonic()
        for start in range(0, len(texts), self.max_batch_size):
            end = start + self.max_batch_size
            chunk = _Chunk(list(texts[start:end]), list(pairs[start:end]) if pairs is not None else None, loop.create_future())
            self._queue.append((now, chunk))
            chunks.append(chunk)
        self._wakeup.set()
        parts = await asyncio.gather(*(c.future for c in chunks))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    async def stop(self) -> None:
        """Refuse new work, finish everything already queued, then stop the model thread."""
        self._closing = True
        if self._task is not None and self._wakeup is not None:
            self._wakeup.set()
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

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
            deadline = self._queue[0][0] + self.max_wait
            while self.queued_texts < self.max_batch_size and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            await self._run_batch(batch)

    def _take_batch(self) -> list[_Chunk]:
        """Whole chunks, oldest first, up to max_batch_size texts (a chunk is never split)."""
        batch: list[_Chunk] = []
        size = 0
        while self._queue:
            chunk = self._queue[0][1]
            if batch and size + len(chunk.texts) > self.max_batch_size:
                break
            # A pair model gets pairs with every text and a plain model none, so a batch never mixes them;
            # stop at a change anyway rather than guess.
            if batch and (chunk.pairs is None) != (batch[0].pairs is None):
                break
            self._queue.popleft()
            if chunk.future.cancelled():  # the client went away before its turn
                continue
            batch.append(chunk)
            size += len(chunk.texts)
        return batch

    async def _run_batch(self, batch: list[_Chunk]) -> None:
        if not batch:
            return
        texts = [t for c in batch for t in c.texts]
        pairs = [p for c in batch for p in c.pairs] if batch[0].pairs is not None else None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            probs = await loop.run_in_executor(self._executor, self.model_fn, texts, pairs)
        except Exception as err:  # every waiting caller gets the error; the server logs it once
            log.exception("model call failed on a batch of %d texts", len(texts))
            for c in batch:
                if not c.future.done():
                    c.future.set_exception(err)
            return
        if self.observer is not None:
            self.observer(len(texts), time.perf_counter() - started)
        offset = 0
        for c in batch:
            n = len(c.texts)
            if not c.future.done():
                c.future.set_result(probs[offset : offset + n])
            offset += n
