"""`mistral-jax serve`'s process 0: the engine's thread plus uvicorn on the API; SIGTERM drains and exits 0."""

from __future__ import annotations

import contextlib
import signal
import sys

import uvicorn

from mistral_jax.serving.api import DEFAULT_MAX_REQUEST_BYTES, create_app
from mistral_jax.serving.engine import Engine


def run(engine: Engine, tokenizer, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
        api_key: str | None = None, shutdown_timeout: float = 30.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, enable_lora_loading: bool = False) -> None:
    """Serve until SIGTERM or SIGINT: then stop accepting, let requests in flight finish for up to
    `shutdown_timeout` seconds, cancel the rest and stop the engine (and the other processes' followers)."""
    app = create_app(engine, tokenizer, model_name, api_key, drain_seconds=shutdown_timeout,
                     max_request_bytes=max_request_bytes, enable_lora_loading=enable_lora_loading)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=shutdown_timeout + 1)  # after the streams' own grace period
    server = _Server(config, model_name)
    engine.start()
    try:
        server.run()  # uvicorn handles SIGTERM/SIGINT: stops listening, waits for open requests, returns
    finally:
        engine.stop(timeout=0)


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once it does (the port may have been 0: any free one)."""

    def __init__(self, config: uvicorn.Config, model_name: str) -> None:
        super().__init__(config)
        self.model_name = model_name

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, except that a SIGTERM it drained for is not raised again: the process exits 0."""
        with super().capture_signals():
            yield
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"serving {self.model_name} on http://{host}:{port}", file=sys.stderr, flush=True)
