"""Running the app: uvicorn with bounded connections, and an HTTP/1.1 protocol that closes
connections slow to send their headers."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from captioner.errors import ConfigError, LibraryError
from captioner.server.app import create_app
from captioner.server.guards import LOCAL_HOSTS


def serve(captioner, db: Path | None, host: str = "127.0.0.1", port: int = 8000, *,
          allowed_hosts: Sequence[str] = (), header_timeout: float = 10.0, max_upload_mb: float = 20.0,
          batch_wait_ms: float = 5.0, allow_private_urls: bool = False) -> None:
    """Run the app with uvicorn until interrupted. It answers to this machine's names, the address
    it listens on, IP addresses, and `allowed_hosts`."""
    import uvicorn

    if db is not None and not Path(db).is_file():
        raise LibraryError(f"{db}: no such database (make one with: captioner index FOLDER --db {db})")
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be 1 to 65535, not {port}")
    hosts = [*LOCAL_HOSTS, *allowed_hosts, host, socket.gethostname(), socket.getfqdn()]
    # bounded: at most 64 connections at once (more get 503), idle keep-alive connections closed after
    # 5 s, and a connection that has not sent a request's headers within `header_timeout` s is closed
    app = create_app(captioner, db, allowed_hosts=hosts, max_upload_mb=max_upload_mb, batch_wait_ms=batch_wait_ms,
                     allow_private_urls=allow_private_urls)
    uvicorn.run(app, host=host, port=port, log_level="info", limit_concurrency=64, timeout_keep_alive=5,
                http=slow_header_protocol(header_timeout))


def slow_header_protocol(header_timeout: float):
    """uvicorn's HTTP/1.1 protocol, closing connections that are slow to send their headers (so that
    connections which never finish a request cannot hold every slot: slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _deadline = None
        _waiting_for = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._waiting_for = self.cycle  # until a new request cycle starts, its headers are awaited
            self._deadline = self.loop.call_later(header_timeout, self._too_slow)

        def handle_events(self) -> None:
            super().handle_events()
            if self._deadline is not None and self.cycle is not self._waiting_for:  # headers complete
                self._deadline.cancel()
                self._deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def _too_slow(self) -> None:
            self._deadline = None
            if self.cycle is self._waiting_for and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return Protocol
