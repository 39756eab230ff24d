"""What every connection of one listener shares: how many may be open, how long and how large a
request head may be. Its own module because both transports (the fast path's protocol and
aiohttp's handler, in gateway.http.server) count against the same limits."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

log = logging.getLogger("gateway.server")


@dataclass
class ConnectionLimits:
    """Shared by every connection of one server: how many may be open, how long and how large a
    request head may be."""

    max_connections: int  # 0: no limit
    header_timeout: float  # 0: no limit
    max_head_size: int = 65536  # request line and every header line together
    open: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection in, or close it when max_connections are open."""
        if self.max_connections and self.open >= self.max_connections:
            log.warning("connection refused: %d connections open (max_connections)", self.open)
            transport.close()
            return False
        self.opened()
        return True

    def opened(self) -> None:
        self.open += 1
        self.idle.clear()

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0:
            self.idle.set()
