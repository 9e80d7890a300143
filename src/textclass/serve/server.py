"""uvicorn, configured for a server that must not be held open or shut down noisily.

Two additions to uvicorn, each a few lines because uvicorn has no option for them:

- A deadline for the request head. uvicorn's keep-alive timer runs only between requests and stops at the
  first byte, so a client that trickles its headers (slowloris) or connects and sends nothing would hold a
  connection forever. The body's deadline is the middleware's (408, see `metrics.ServingMiddleware`).
- Draining. On SIGTERM uvicorn closes idle keep-alive connections at once and, at its graceful timeout,
  cancels what is left, logging a traceback per request. Here open connections stay open while accepted work
  finishes, so a request sent on one gets the documented 503; work still queued at `--graceful-timeout` gets
  503 too; one log line sums it up.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from textclass.serve.settings import ServeSettings

if TYPE_CHECKING:
    from textclass.serve.batcher import MicroBatcher
    from textclass.serve.metrics import ServerState

log = logging.getLogger(__name__)


def head_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11), closing a connection whose request head takes over `seconds`."""

    class HeadTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_overdue)

        def _head_overdue(self) -> None:
            # Between requests (no cycle, or the last one answered) the head of the next one is overdue.
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutProtocol


def uvicorn_config(
    app: Any, settings: ServeSettings, graceful_timeout: float = 30.0, access_log: bool = False, log_level: str = "info"
) -> uvicorn.Config:
    """The one uvicorn configuration, shared by `textclass serve` and the tests."""
    return uvicorn.Config(
        app,
        http=head_timeout_protocol(settings.read_timeout),
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]  # a float works: call_later
        timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]
        access_log=access_log,
        log_level=log_level,
        lifespan="on",
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which drains as the module docstring says; `state` and `batcher` are the app's."""

    def __init__(self, config: uvicorn.Config, state: ServerState, batcher: MicroBatcher, graceful_timeout: float) -> None:
        super().__init__(config)
        self.state, self.batcher, self.graceful_timeout = state, batcher, graceful_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True  # at once: the next request already gets 503, /ready already says so
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.draining = True
        for server in self.servers:  # no new connections; open ones stay open until the work is done
            server.close()
        for sock in sockets or []:
            sock.close()
        self.batcher.close()  # new work gets 503; queued work runs as it would have
        deadline = time.monotonic() + self.graceful_timeout
        while self.server_state.tasks and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        self.batcher.refuse_waiting()  # out of time: what still waits gets 503 rather than a cancellation
        await super().shutdown(sockets)  # closes idle connections, waits for the model call still running
        log.info("draining: %d requests finished, %d refused", self.state.finished, self.state.refused)
