"""Test helper: an ASGI app served by uvicorn in a thread, on a port the OS chose, used once it answers.

The socket is bound to port 0 here and handed to uvicorn still open, so no other process can take the port
between choosing and binding it (``free_port()`` then bind could race). Readiness is an answer over HTTP:
``GET /health`` is polled until any response comes back (a 404 from an app without that route counts: the
server is accepting and handling requests), within a deadline, never a fixed sleep.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


class BackgroundServer:
    """``with BackgroundServer(app) as url: ...``; ``url`` ends in ``/v1`` like palr's own helper."""

    def __init__(self, app: Any, host: str = "127.0.0.1", startup_timeout: float = 30.0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = int(self.sock.getsockname()[1])
        self.base = f"http://{host}:{self.port}"
        self.url = f"{self.base}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> str:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not self.thread.is_alive():
                self.sock.close()
                raise RuntimeError("the server thread ended before it answered")
            try:
                httpx.get(f"{self.base}/health", timeout=1.0)
                return self.url
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"the server did not answer within {self.startup_timeout:.0f} s") from None
            time.sleep(0.02)  # the next poll, not a guess at how long start-up takes

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
