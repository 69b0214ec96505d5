"""Serve a FastAPI app with uvicorn on a thread of the calling process.

A node serves its endpoint from a thread so that /metrics reads the
supervisor's own counters. The endpoint binds to loopback by default; a
non-loopback address needs a configured token, because requests that change
state are authorised by it alone.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import threading
import time

from makeway.errors import UsageError

logger = logging.getLogger(__name__)

TOKEN_ENV = "MAKEWAY_HTTP_TOKEN"


def parse_listen(address: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port") into host and port; raise UsageError naming any other value."""
    host, separator, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"HTTP address {address!r} is invalid; write host:port, for example 127.0.0.1:8377")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, configured: str) -> tuple[str, bool]:
    """Return the token that authorises state changes, and whether it was generated here.

    A configured token (http.token, or $MAKEWAY_HTTP_TOKEN) wins. Without one,
    a loopback endpoint gets a random token; any other address is refused.
    """
    token = configured or os.environ.get(TOKEN_ENV, "")
    if token:
        return token, False
    if not is_loopback(host):
        raise UsageError(
            f"refusing to serve HTTP on {host!r} without a token: anyone who reaches it could cancel jobs. "
            f"Set http.token in makeway.toml or ${TOKEN_ENV}, or listen on 127.0.0.1"
        )
    return secrets.token_urlsafe(24), True


class HttpServer:
    """A uvicorn server for `app` on a daemon thread; `start()` returns once it accepts connections."""

    def __init__(self, app, host: str, port: int):
        import uvicorn

        self.host = host
        self.port = port
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        # The node handles SIGINT and SIGTERM itself.
        self._server.install_signal_handlers = lambda: None
        self._thread = threading.Thread(target=self._server.run, name="makeway-http", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise UsageError(f"HTTP endpoint on {self.host}:{self.port} failed to start; is the port in use? "
                                 "Pick another with --http HOST:PORT")
            if time.monotonic() > deadline:
                raise UsageError(f"HTTP endpoint on {self.host}:{self.port} did not start within {timeout_s} s")
            time.sleep(0.01)
        if self.port == 0:
            sockets = [s for server in self._server.servers for s in server.sockets]
            self.port = sockets[0].getsockname()[1] if sockets else self.port

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5.0)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
