"""`ServeSettings`: batching, limits and timeouts of `textclass serve`.

Its own module so that the serving modules (app, server, HF routes) can import it without importing the
`textclass.serve` package, whose `serve()` imports them; `from textclass.serve import ServeSettings` still works.
"""

from __future__ import annotations

from dataclasses import dataclass

from textclass.errors import UserError


@dataclass(frozen=True)
class ServeSettings:
    """Batching, limits and timeouts; each is a `textclass serve` option."""

    max_batch_size: int = 32  # texts per model call
    max_wait_ms: float = 5.0  # how long the first text of a batch waits for company
    max_texts: int = 64  # texts per request
    max_chars: int = 10_000  # characters per text
    max_body_bytes: int = 1_000_000  # request body size
    api_key: str | None = None  # when set, /v1/*, /info, POST / and /predict, /metrics need it
    max_queue_texts: int | None = None  # texts waiting for the model; None: `queue_bound`'s default
    read_timeout: float = 30.0  # seconds for a request's head, and again for its body, to arrive
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's)

    def __post_init__(self) -> None:
        if self.max_queue_texts is not None and self.max_queue_texts < self.max_texts:
            raise UserError(
                f"--max-queue-texts {self.max_queue_texts} is below --max-texts {self.max_texts}: "
                "a full request could never be accepted; raise it or lower --max-texts"
            )

    @property
    def queue_bound(self) -> int:
        """The most texts waiting for the model; past it, requests get 429 with Retry-After.

        Default: max(4 * max_batch_size, 2 * max_texts), 128 with the other defaults. Four batches keep the
        model busy (the next batch is always ready when one ends) while bounding an accepted text's wait
        to about four model calls (~1 s: the README's serve benchmark, MiniLM with torch on 2 cores, ran
        a call of 31 short texts in ~0.26 s) and the queue's memory to 128 texts; two full requests fit, so
        a request of max_texts is never refused by an idle server. An
        unbounded queue only turns overload into minutes of latency and gigabytes of memory (62,976
        texts, 2.1 GB and a 110 s median were measured before the bound); a 429 lets a client or load
        balancer go elsewhere at once.
        """
        if self.max_queue_texts is not None:
            return self.max_queue_texts
        return max(4 * self.max_batch_size, 2 * self.max_texts)
