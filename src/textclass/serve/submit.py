"""What every classifying endpoint does with its texts: submit them to the batcher and turn its refusals
into HTTP answers (429 with Retry-After when the queue is full, 503 when shutting down), and give up the
queued texts of a client that disconnects, so nobody computes answers nobody will read.

Starlette does not cancel a handler whose client went away (it only tells `receive()`), so the handler
waits for the batcher and for the disconnect together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from pydantic import BaseModel, Field

from textclass.serve.batcher import BatcherClosed, MicroBatcher, QueueFull
from textclass.serve.metrics import queue_full_detail

CLIENT_GONE = 499  # nginx's "client closed request": counted in the metrics, never sent to anyone


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its texts have left the queue."""


class ErrorBody(BaseModel):
    detail: Any = Field(description="What went wrong and what to change.")


async def submit_texts(request: Request, batcher: MicroBatcher, texts: Sequence[str], pairs: Sequence[str] | None) -> np.ndarray:
    """The texts' probabilities; raises the HTTPException to answer when the batcher refuses them."""
    try:
        return await _unless_disconnected(request, batcher.submit(texts, pairs))
    except QueueFull as full:
        raise HTTPException(429, queue_full_detail(batcher), headers={"Retry-After": str(full.retry_after)}) from None
    except BatcherClosed:
        raise HTTPException(503, "the server is shutting down; retry on another instance") from None


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work`, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # cancels the batcher's futures: the texts leave the queue
    if task not in done:
        raise ClientGone()
    return task.result()


async def _disconnect(request: Request) -> None:
    # The body has been read by now, so the next message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass
